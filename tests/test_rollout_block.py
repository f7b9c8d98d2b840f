"""Block-diffusion rollouts (SDAR / TraDo, rollout/block_sampler.py) against SDAR's published sampler
(``block_diffusion_generate`` of ../shared/models/sdar/generate.py driving the published model):
token-exact on left-padded batches (greedy, static and dynamic commits), the same commit order,
the exact cache of finished blocks equal to recomputing everything, the Rollout record, the engine,
and the options refused in one line."""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from helpers.published import published_model, sdar_generate
from rollout import PolicyAdapter, RolloutEngine, generate
from rollout.block_sampler import block_generate, block_schedule
from test_rollout_sampler import left_pad, random_prompts

MASK, EOS = 1, 2


@pytest.fixture(scope="module")
def sdar(published_folder):
    """Ours and the published model on one tiny random checkpoint; the mask token's output row is
    zeroed, so it is never the published argmax (ours never proposes it)."""
    folder = published_folder("sdar", init_std=0.3, mute_mask=True)
    return PolicyAdapter.from_pretrained(str(folder)).eval(), published_model("sdar", folder)


class Recorder(torch.nn.Module):
    """The published model, recording every call's ``(input_ids, position_ids, store_kv)``."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, position_ids=None, store_kv=False, **kw):
        self.calls.append((input_ids.clone(), position_ids.clone(), bool(store_kv)))
        return self.model(input_ids, position_ids=position_ids, store_kv=store_kv, **kw)


def published_commit_steps(calls) -> dict[int, int]:
    """``{position: denoising step}`` from SDAR's calls: a position masked in a denoising call's
    input and filled in the next call's was committed by that call (steps count denoising calls
    only, not prefill / store calls)."""
    committed, pending, step = {}, set(), -1
    for ids, pos, store in calls:
        for p, t in zip(pos[0].tolist(), ids[0].tolist()):
            if p in pending and t != MASK:
                committed[p] = step
                pending.discard(p)
        if not store:
            step += 1
            pending |= {p for p, t in zip(pos[0].tolist(), ids[0].tolist()) if t == MASK}
    return committed


def run_published(ref, row, *, gen_length, block_length, steps_per_block, threshold, record=False):
    kw = dict(mask_id=MASK, gen_length=gen_length, block_length=block_length, denoising_steps=steps_per_block,
              remasking_strategy="low_confidence_static" if threshold is None else "low_confidence_dynamic")
    if threshold is not None:
        kw["confidence_threshold"] = threshold
    model = Recorder(ref) if record else ref
    x = sdar_generate(model, row[None], **kw)
    return (x, model.calls) if record else x


# (prompt lengths, gen_length, block_length, steps per block, threshold). Static with fewer steps than
# block positions only where every partial prompt block leaves an even number of masks (see
# test_published_static_schedule_rewrites_committed_tokens for the others).
CASES = [
    ([3, 8, 6, 5], 12, 4, 4, None),
    ([4, 6, 10, 2], 12, 4, 2, None),
    ([3, 8, 6, 5], 12, 4, 4, 0.3),
    ([7, 2, 9], 16, 4, 4, 0.9),
    ([5, 13, 16], 16, 8, 8, None),
    ([5, 13, 16], 16, 8, 8, 0.5),
]


@pytest.mark.parametrize("lengths,gen_length,block_length,spb,threshold", CASES)
def test_token_exact_with_published_block_diffusion_generate(sdar, lengths, gen_length, block_length, spb, threshold):
    """A left-padded batch of ours = SDAR's sampler on each row alone (the published model)."""
    pol, ref = sdar
    rows = random_prompts(lengths, seed=len(lengths) + spb)
    ids, mask = left_pad(rows)
    # the sampler's block length rules, as in SDAR's sampler; another than the model's is warned about
    warns = pytest.warns(UserWarning, match="config.block_length is 4") if block_length != 4 else nullcontext()
    with warns:
        out = generate(pol, ids, attention_mask=mask, steps=spb * gen_length // block_length, gen_length=gen_length,
                       block_length=block_length, mask_id=MASK, threshold=threshold)
    assert out.extras["block_causal"]
    for b, row in enumerate(rows):
        x = run_published(ref, row, gen_length=gen_length, block_length=block_length, steps_per_block=spb,
                          threshold=threshold)
        assert torch.equal(x[0, :len(row)], row)
        assert out.completion_ids[b].tolist() == x[0, len(row):len(row) + gen_length].tolist(), b
        assert torch.equal(out.sequences[b, -gen_length - len(row):-gen_length], row)


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_commit_steps_equal_published_ones(sdar, threshold):
    """Each completion token's ``unmask_step`` is the denoising step at which SDAR's sampler commits
    it (one row at a time: a batch shares its step counter)."""
    pol, ref = sdar
    for row in random_prompts([3, 8, 5], seed=11):
        out = generate(pol, row[None], steps=12, gen_length=12, block_length=4, mask_id=MASK, threshold=threshold)
        x, calls = run_published(ref, row, gen_length=12, block_length=4, steps_per_block=4, threshold=threshold,
                                 record=True)
        assert out.completion_ids[0].tolist() == x[0, len(row):len(row) + 12].tolist()
        steps = published_commit_steps(calls)
        assert out.unmask_step[0].tolist() == [steps[len(row) + j] for j in range(12)]
        assert out.num_steps == max(steps.values()) + 1


def test_published_static_schedule_rewrites_committed_tokens(sdar):
    """The documented difference: SDAR's ``topk`` over a partial first block with more tokens per
    step than masks also picks non-masked positions and overwrites them (here a prompt token); ours
    commits the remaining masks and keeps the prompt."""
    pol, ref = sdar
    row = random_prompts([7], seed=3)[0]  # 3 prompt tokens + 1 mask in its second block; 2 tokens per step
    x = run_published(ref, row, gen_length=8, block_length=4, steps_per_block=2, threshold=None)
    assert not torch.equal(x[0, :7], row)
    out = generate(pol, row[None], steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert torch.equal(out.sequences[0, :7], row) and (out.completion_ids != MASK).all()


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_exact_cache_equals_recomputing_every_block(sdar, threshold):
    """Same tokens and trajectories with the cache of finished blocks as with full recomputation,
    sampling at temperature 1 from one seed (the cache changes no draw)."""
    pol, _ = sdar
    ids, mask = left_pad(random_prompts([3, 9, 6], seed=5))
    runs = [block_generate(pol, ids, attention_mask=mask, steps=8, gen_length=16, block_length=4, mask_id=MASK,
                           temperature=1.0, threshold=threshold, generator=torch.Generator().manual_seed(0),
                           exact_cache=cache) for cache in (True, False)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].unmask_step, runs[1].unmask_step)
    assert runs[0].num_forward_passes == runs[1].num_forward_passes


def test_rollout_record(sdar):
    """Shapes and invariants of the record: prompt kept, completion mask up to the first EOS, every
    token's step in range and blocks in order, per-step scores on the candidates exactly."""
    pol, _ = sdar
    rows = random_prompts([3, 8, 6], seed=2)
    ids, mask = left_pad(rows)
    out = generate(pol, ids, attention_mask=mask, steps=8, gen_length=16, block_length=4, mask_id=MASK, eos_id=EOS,
                   record_scores=True)
    B, P, L = ids.shape[0], ids.shape[1], 16
    assert out.sequences.shape == (B, P + L) and out.completion_ids.shape == out.unmask_step.shape == (B, L)
    assert torch.equal(out.sequences[:, :P], ids) and torch.equal(out.prompt_mask, mask)
    assert (out.completion_ids != MASK).all()
    assert ((out.unmask_step >= 0) & (out.unmask_step < out.num_steps)).all()
    for b, row in enumerate(rows):  # blocks by position: each block's steps come after the previous block's
        block = (len(row) + torch.arange(L)) // 4
        steps = out.unmask_step[b]
        for k in block.unique()[:-1]:
            assert steps[block == k].max() < steps[block == k + 1].min()
    assert out.step_scores.shape == (B, out.num_steps, L)
    for s in range(out.num_steps):
        live = torch.zeros(B, L, dtype=torch.bool)
        for b, row in enumerate(rows):  # candidates: still masked at step s, in the block being decoded
            block = (len(row) + torch.arange(L)) // 4
            decoding = block[(out.unmask_step[b] == s)]
            if len(decoding):
                live[b] = (block == decoding[0]) & (out.unmask_step[b] >= s)
        assert torch.equal(~out.step_scores[:, s].isnan() & live, live)


def test_forward_passes_and_schedule():
    """SDAR's schedule; one forward per denoising step (the finished block is stored by the next
    block's first step, so SDAR's extra store pass per block is not needed)."""
    assert block_schedule(4, 4) == [1, 1, 1, 1] and block_schedule(8, 3) == [3, 3, 2]
    assert block_schedule(4, 8) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_forward_pass_count(sdar):
    pol, _ = sdar
    ids = torch.stack(random_prompts([8, 8], seed=4))  # whole prompt blocks: 4 blocks of 2 steps
    out = generate(pol, ids, steps=8, gen_length=16, block_length=4, mask_id=MASK)
    assert out.num_forward_passes == out.num_steps == 8
    ids = torch.stack(random_prompts([6, 6], seed=4))  # a partial prompt block: 5 blocks, the first has 2 masks
    out = generate(pol, ids, steps=16, gen_length=16, block_length=4, mask_id=MASK)
    assert out.num_forward_passes == 2 + 4 * 4


def test_fill_after_eos_stops_decoding(published_folder):
    folder = published_folder("sdar", init_std=0.3, mute_mask=True)
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    with torch.no_grad():  # make EOS likely, so every row ends early
        pol.model.lm_head.weight[EOS] *= 8
    rows = random_prompts([3, 8, 6], seed=1)
    ids, mask = left_pad([rows[0], rows[2]])  # two rows that reach EOS early
    kw = dict(attention_mask=mask, steps=32, gen_length=32, block_length=4, mask_id=MASK, eos_id=EOS)
    full, filled = generate(pol, ids, **kw), generate(pol, ids, fill_after_eos=True, **kw)
    assert (full.completion_ids == EOS).any(1).all()
    assert filled.num_forward_passes < full.num_forward_passes
    c = filled.completion_ids
    first = (c == EOS).long().argmax(1)
    for b in range(c.shape[0]):
        assert (c[b, first[b]:] == EOS).all() and (filled.unmask_step[b] >= 0).all()


@pytest.mark.parametrize("option,match", [
    ({"cfg_scale": 1.0}, "cfg_scale=1.0: classifier-free guidance"),
    ({"kv_cache": "dual"}, "kv_cache='dual': block-diffusion models always decode with the exact cache"),
    ({"early_commit": 0.5}, "early_commit=0.5"),
    ({"order_policy": lambda state: state.confidence}, "order_policy"),
])
def test_unsupported_options_refused_in_one_line(sdar, option, match):
    pol, _ = sdar
    with pytest.raises(ValueError, match=match):
        generate(pol, torch.stack(random_prompts([4])), steps=4, gen_length=4, block_length=4, mask_id=MASK, **option)


def test_engine_decodes_block_models(sdar):
    """The rollout engine hides the model family: the same call, block decoding underneath."""
    pol, _ = sdar
    options = SimpleNamespace(gen_length=8, block_length=4, steps=8, temperature=0.0, cfg_scale=0.0,
                              remasking="low_confidence", threshold=None, early_commit=None, fill_after_eos=False,
                              kv_cache=None, cache_lookahead=0, backend="torch")
    ids, mask = left_pad(random_prompts([3, 6], seed=9))
    out = RolloutEngine(options, pol).generate(ids, mask)
    direct = block_generate(pol, ids, attention_mask=mask, steps=8, gen_length=8, block_length=4, mask_id=MASK,
                            eos_id=pol.eos_token_id)
    assert out.extras["block_causal"] and torch.equal(out.completion_ids, direct.completion_ids)


def test_vllm_backend_refuses_block_models_in_one_line(published_folder):
    from rollout.models import SDARConfig
    from rollout.vllm_backend.engine import check_model, check_not_block_causal

    message = "rollout.backend=vllm: model_type='sdar' is a block-diffusion model"
    with pytest.raises(ValueError, match=message):
        check_model(SDARConfig())
    check_not_block_causal("llada")
    if importlib.util.find_spec("vllm") is None:
        return
    from recipes.config import load_config
    from recipes.preflight import check_rollout_engine
    from recipes.schema import ConfigError

    cfg = load_config(["rollout.backend=vllm", f"model.path={published_folder('sdar', init_std=0.3, mute_mask=True)}"])
    with pytest.raises(ConfigError, match=message):
        check_rollout_engine(cfg, 1)


def test_each_step_runs_the_block_alone_on_the_cache(sdar):
    """The cache protocol: the first forward covers the prompt's whole blocks plus the first block; a
    block's first step covers [finished block, block] (storing the finished one), later steps the
    block alone."""
    pol, _ = sdar
    widths = []

    class Widths(torch.nn.Module):
        def forward(self, input_ids, **kw):
            widths.append((input_ids.shape[1], kw["past_key_values"].start))
            return pol(input_ids, **kw)

    ids = torch.stack(random_prompts([8, 8], seed=4))
    block_generate(Widths(), ids, steps=6, gen_length=12, block_length=4, mask_id=MASK)
    assert widths == [(12, 0), (4, 8), (8, 8), (4, 12), (8, 12), (4, 16)]


def test_lora_wrapped_policy_decodes_the_same(published_folder):
    """A peft-wrapped SDAR (LoRA B = 0 at init) is still recognised as block-causal and decodes the same."""
    from peft import LoraConfig, get_peft_model

    folder = published_folder("sdar", init_std=0.3, mute_mask=True)
    plain = PolicyAdapter.from_pretrained(str(folder)).eval()
    lora = PolicyAdapter.from_pretrained(str(folder))
    lora.model = get_peft_model(lora.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = left_pad(random_prompts([3, 9], seed=6))
    kw = dict(attention_mask=mask, steps=8, gen_length=8, block_length=4, mask_id=MASK)
    a, b = generate(plain, ids, **kw), generate(lora, ids, **kw)
    assert b.extras["block_causal"] and torch.equal(a.completion_ids, b.completion_ids)
    assert lora.training  # the train/eval flags are restored


def test_bench_script_runs(capsys):
    """scripts/bench_block_rollout.py end to end at a toy size (the numbers: docs/benchmarks.md)."""
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_block_rollout.py"
    spec = iu.spec_from_file_location("bench_block_rollout", path)
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--gen-length", "8", "--batch", "2", "--prompt-length", "6", "--llada-block", "8", "--hidden", "64",
                "--layers", "1", "--heads", "2", "--mlp", "64", "--threads", "0"])
    out = capsys.readouterr().out
    assert "SDAR, exact cache (block 4)" in out and "SDAR tokens with and without the cache: equal" in out
