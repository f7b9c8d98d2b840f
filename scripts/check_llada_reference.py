"""Cross-check against LLaDA's own sampler: our ``rollout.generate`` on our LLaDA implementation
versus ``generate()`` of ML-GSAI/LLaDA's ``generate.py`` driving the published LLaDA modeling code,
token for token at temperature 0, on a tiny random checkpoint in the published layout.

    git clone https://github.com/ML-GSAI/LLaDA /path/to/LLaDA    # not vendored here
    .venv/bin/python scripts/check_llada_reference.py --llada-repo /path/to/LLaDA

The CI tests hold the same property against an independent loop written from LLaDA's description
(tests/test_models_sampling.py); this script runs the authors' code itself where a checkout exists.
Equal-length batches go through both samplers as batches; left-padded batches of ours are compared
row by row with the reference run on each row alone (the published model ignores padding masks).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SETTINGS = [(16, 16, 8), (6, 16, 8), (12, 24, 8), (32, 32, 32), (8, 32, 4)]  # (steps, gen_length, block_length)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llada-repo", type=Path, required=True, help="a checkout of github.com/ML-GSAI/LLaDA")
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("llada_generate", args.llada_repo / "generate.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)

    from helpers.published import build_published_folder, published_model
    from rollout import PolicyAdapter, generate
    from test_rollout_sampler import left_pad, random_prompts

    folder = build_published_folder("llada", Path(tempfile.mkdtemp()) / "llada", init_std=0.3, mute_mask=True,
                                    layers=3)
    published, ours = published_model("llada", folder), PolicyAdapter.from_pretrained(str(folder)).eval()
    mask_id, compared = ours.mask_token_id, 0

    def ref(prompts, **kw):  # the reference needs an attention mask for CFG; all ones = no padding
        return reference.generate(published, prompts, attention_mask=torch.ones_like(prompts), mask_id=mask_id, **kw)

    for steps, gen_length, block_length in SETTINGS:
        for cfg_scale in (0.0, 1.0):
            kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)
            batch = torch.stack(random_prompts([7, 7, 7], seed=steps + gen_length))
            assert torch.equal(ref(batch, **kw), generate(ours, batch, mask_id=mask_id, **kw).sequences), kw
            rows = random_prompts([4, 9, 6], seed=steps)
            ids, mask = left_pad(rows)
            out = generate(ours, ids, attention_mask=mask, mask_id=mask_id, **kw)
            for i, r in enumerate(rows):
                assert torch.equal(ref(r[None], **kw)[0, len(r):], out.completion_ids[i]), (kw, i)
            compared += 1 + len(rows)
    print(f"token-exact with {args.llada_repo / 'generate.py'}: {compared} batches/rows, "
          f"{len(SETTINGS) * 2} settings (steps, gen/block length, CFG 0 and 1), temperature 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
