"""Worker for tests/test_rank_equivalence.py: the SFT and diffu-GRPO trainers on a tiny LLaDA-architecture
model under ZeRO-2 and ZeRO-3, two optimizer steps on a fixed global batch, as one process
(``python tests/rank_equivalence_worker.py --out DIR``: micro-batch = the global batch) or as
ranks (``torchrun --nproc_per_node 2 tests/rank_equivalence_worker.py --out DIR``: each rank its
half, micro-batch = half).

Everything random is fixed per *row*, so both layouts see the same global batch: SFT's mask ratio
and masks are drawn per row from (step, the row's tokens) over the row's own length; GRPO's
rollouts are drawn per (step, prompt, generation) with EOS at varying positions (so the ranks'
completion lengths differ), and its mean-field estimate masks no prompt token (p_mask_prompt 0).
Writes per layout ``DIR/<trainer>-<stage>.json`` (rank-reduced losses of each step) and, from
rank 0, ``DIR/<trainer>-<stage>.pt`` (full fp32 gradients of each step before the optimizer
applied them, ``deepspeed.utils.safe_get_full_grad``, and the full weights after each step).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLOBAL_ROWS, GEN, G, STEPS = 8, 8, 4, 2  # SFT rows / GRPO completions per step (global), gen length, group size


def tiny_llada():
    """A 2-layer LLaDA-architecture policy (our implementation, the tiny tokenizer), seed 0."""
    from rollout import PolicyAdapter
    from rollout.models import LLaDAConfig, LLaDAForMaskedLM
    from rollout.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LLaDAConfig(d_model=64, n_heads=2, n_layers=2, mlp_hidden_size=96, activation_type="silu",
                         block_type="llama", rope=True, layer_norm_type="rms", vocab_size=len(tok),
                         embedding_size=len(tok), weight_tying=False, max_sequence_length=128,
                         attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id)
    torch.manual_seed(0)
    return PolicyAdapter(LLaDAForMaskedLM(config), tok)


def row_generator(step: int, key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((step, key)).encode()))


def sft_trainer(stage: str, out: Path, world: int):
    from rl.config import SFTConfig
    from rl.sft import SFTTrainer

    rows = [{"prompt": f"q{i}?", "response": "7" * (3 + 2 * i)} for i in range(GLOBAL_ROWS)]  # lengths differ
    per = GLOBAL_ROWS // world
    cfg = SFTConfig(run_dir=str(out / "run"), max_steps=STEPS, lr=1e-2, per_device_batch_size=per, micro_batch_size=per,
                    deepspeed=stage, export_hf=False, wandb_mode="disabled", max_grad_norm=1.0, warmup_steps=0)
    trainer = SFTTrainer(cfg, tiny_llada(), rows)

    def draw_noise(batch):  # per row: t and masks from (step, the row's tokens), over the row's own length
        ts, masks = [], []
        for ids, resp, attn in zip(batch["input_ids"], batch["response_mask"], batch["attention_mask"]):
            n = int(attn.sum())
            g = row_generator(trainer.step, ids[:n].tolist())
            t = 1e-3 + (1 - 1e-3) * torch.rand((1,), generator=g)
            m = torch.zeros_like(resp, dtype=torch.bool)
            m[:n] = (torch.rand((n,), generator=g) < t) & resp[:n].bool()
            ts.append(t)
            masks.append(m)
        return torch.stack(ts), torch.stack(masks)

    trainer.draw_noise = draw_noise
    return trainer


def grpo_trainer(stage: str, out: Path, world: int):
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer
    from rollout.prompts import left_pad
    from rollout.types import Rollout, completion_mask_from_eos

    prompts = GLOBAL_ROWS // G  # prompts per global step
    rows = [{"prompt": f"{i:03d}"} for i in range(prompts)]  # equal token lengths

    def reward(prompts, completions, **_):
        return [sum(c == "7" for c in s) / max(len(s), 1) for s in completions]

    cfg = DiffuGRPOConfig(run_dir=str(out / "run"), max_steps=STEPS, lr=1e-2, per_device_prompts=prompts // world,
                          num_generations=G, micro_batch_size=GLOBAL_ROWS // world, num_iterations=2, beta=0.04,
                          epsilon=0.2, estimator="mean_field", estimator_options={"p_mask_prompt": 0.0},
                          deepspeed=stage, export_hf=False, wandb_mode="disabled", sample_table_every=0,
                          warmup_steps=0, rollout=RolloutOptions(gen_length=GEN, block_length=GEN, steps=GEN))
    trainer = DiffuGRPOTrainer(cfg, tiny_llada(), rows, reward_funcs=[reward])
    tok = trainer.tokenizer
    digits = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))

    def rollout(batch_rows):  # per (step, prompt, generation): digits, EOS at a row-dependent place
        ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in batch_rows]
        prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
        comp = []
        for r in batch_rows:
            for j in range(G):
                g = row_generator(trainer.step, (r["prompt"], j))
                c = digits[torch.randint(0, 10, (GEN,), generator=g)]
                c[int(torch.randint(2, GEN, (1,), generator=g)):] = tok.eos_token_id
                comp.append(c)
        comp = torch.stack(comp)
        return Rollout(sequences=torch.cat([prompt_ids, comp], 1), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=comp, completion_mask=completion_mask_from_eos(comp, tok.eos_token_id),
                       unmask_step=torch.zeros_like(comp), num_forward_passes=0)

    trainer.rollout = rollout
    return trainer


def run(kind: str, stage: str, out: Path) -> None:
    from deepspeed.utils import safe_get_full_grad

    from rl import distributed as D
    from rl.engine import consolidated_state_dict

    world = D.get_world_size()
    trainer = (sft_trainer if kind == "sft" else grpo_trainer)(stage, out, world)
    engine = trainer.engine
    grads: list[dict] = []
    step = engine.step

    def recording_step(*a, **k):  # the full (rank-averaged) gradients the optimizer is about to apply
        if engine.is_gradient_accumulation_boundary():
            grads.append({n: safe_get_full_grad(p).detach().float().clone() for n, p in engine.module.named_parameters()
                          if p.requires_grad})
        return step(*a, **k)

    engine.step = recording_step
    losses, weights = [], []
    for _ in range(STEPS):
        rows = [trainer.train_dataset[i] for i in trainer.data.next_indices()]
        metrics = trainer.training_step(rows)
        losses.append(trainer.reduce_metrics({"loss": metrics["loss"]})["loss"])
        trainer.step += 1
        weights.append({k: v.float() for k, v in consolidated_state_dict(engine, rank0_only=False).items()})
    name = f"{kind}-{stage}"
    if D.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps({"world": world, "losses": losses,
                                                     "micro_batch": trainer.micro_batch_size}))
        torch.save({"grads": grads, "weights": weights}, out / f"{name}.pt")
    trainer.close()
    D.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args, _ = ap.parse_known_args()
    torch.set_num_threads(1)
    from rl.engine import init_distributed

    init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("sft", "grpo"):
        for stage in ("zero2", "zero3"):
            run(kind, stage, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
