"""The vLLM rollout backend against the torch backend (our sampler on our models) and against the
published checkpoints: token-exact at temperature 0 on the tiny default, EuroBERT, LLaDA and Dream
(batched, left padding, every fast mode the backend runs); the same proposal distribution at
temperature > 0; new weights served after an update (ZeRO-3 gathered per tensor, LoRA merged); a
trainer and the default recipe end to end. One engine per model for the whole module.

vLLM is an optional extra (``pip install -e .[vllm]``): without it these tests skip, except under
CI (``CI=true``), where they fail."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import rollout.vllm_backend  # noqa: F401  (its environment defaults come before vLLM's import)

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("vLLM not installed (pip install -e .[vllm])", allow_module_level=True)

from rl.config import ConfigError, RolloutOptions
from rollout import PolicyAdapter, build_tiny_policy
from rollout.engine import RolloutEngine, build_rollout_engine
from rollout.remasking import needed_stats
from rollout.sampler import TorchDenoiser
from rollout.vllm_backend.engine import VLLMDenoiser, VLLMEngine, check_model, live_engines

TORCH = RolloutOptions(gen_length=16, block_length=8, steps=8)
VLLM = dataclasses.replace(TORCH, backend="vllm")
PROMPTS = ["hello world", "7", "a much longer prompt, padded on the left of the others"]
MODES = {"baseline": {}, "threshold": {"threshold": 0.02}, "early_commit": {"early_commit": 0.002},
         "margin": {"remasking": "margin"}, "entropy": {"remasking": "entropy"}, "random": {"remasking": "random"},
         "fill_after_eos": {"fill_after_eos": True}, "one_block": {"gen_length": 12, "block_length": 12, "steps": 6}}


def _policy(family: str, published_folder):
    if family == "bert":  # the tiny default (configs/model/tiny.yaml)
        return build_tiny_policy(seed=0, arch="bert"), None
    if family == "eurobert":
        return build_tiny_policy(seed=0, arch="eurobert"), None
    folder = published_folder(family, init_std=0.5)  # sharper logits than the default init
    return PolicyAdapter.from_pretrained(str(folder)), str(folder)


def close_live_engines() -> None:
    """Close this process's running vLLM engines (one runs at a time: VLLMEngine refuses a second)."""
    for engine in live_engines():
        engine.close()


class _Engines:
    """``(policy, torch engine, vllm engine)`` of one model. The vLLM engine is (re)started when
    used, so a test that builds its own engine can close this one first."""

    def __init__(self, family: str, published_folder):
        self.policy, self.folder = _policy(family, published_folder)
        self.torch = RolloutEngine(TORCH, self.policy)
        self._vllm: VLLMEngine | None = None

    @property
    def vllm(self) -> VLLMEngine:
        if self._vllm is None or self._vllm.llm is None:
            close_live_engines()
            self._vllm = VLLMEngine(VLLM, self.policy, checkpoint=self.folder)
        return self._vllm

    def __iter__(self):
        return iter((self.policy, self.torch, self.vllm))


@pytest.fixture(scope="module", params=["bert", "eurobert", "llada", "dream"])
def engines(request, published_folder):
    """``(policy, torch engine, vllm engine)``; LLaDA and Dream start from the published folder
    (vLLM's loader reads the published tensor names), the others from the policy's tensors."""
    pair = _Engines(request.param, published_folder)
    yield pair
    close_live_engines()


def _same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.unmask_step, b.unmask_step)
    assert (a.num_steps, a.num_forward_passes) == (b.num_steps, b.num_forward_passes)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_tokens_equal_torch_backend(engines, mode):
    _, torch_engine, vllm_engine = engines
    options = dataclasses.replace(TORCH, **MODES[mode])
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]  # random remasking draws from it
    a = torch_engine.generate(PROMPTS, options=options, generator=gens[0], record_scores=True)
    b = vllm_engine.generate(PROMPTS, options=options, generator=gens[1], record_scores=True)
    _same(a, b)
    assert torch.allclose(a.step_scores.nan_to_num(-1), b.step_scores.nan_to_num(-1), atol=1e-4)
    assert a.prompt_mask.eq(0).any()  # batched with left padding


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (cells expected < 5 pooled)."""
    n = counts.sum()
    expected = n * probs.double()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_proposal_distribution_matches_softmax_at_temperature(engines):
    """Per position, the engine's proposals at T > 0 follow softmax(logits / T) without the mask
    token, as the torch backend's Gumbel-max does (both tested against the exact distribution)."""
    policy, _, vllm_engine = engines
    T, rows = 0.7, 3000
    ids, mask = vllm_engine.encode(["hello"])
    P, N = ids.shape[1], ids.shape[1] + 8
    x = torch.full((rows, N), policy.mask_token_id)
    x[:, :P] = ids
    x[:, P + 2] = ids[0, -1]  # one committed completion token
    stats = needed_stats("low_confidence", None, None)
    with torch.no_grad():
        logits = policy(x[:1]).logits[0, P:N].double()
    logits[:, policy.mask_token_id] = -math.inf
    exact = torch.softmax(logits / T, -1)
    vllm_den = VLLMDenoiser(vllm_engine.llm, attention_mask=None, batch=rows, mask_id=policy.mask_token_id,
                            shift=int(policy.logits_shifted), temperature=T,
                            generator=torch.Generator().manual_seed(0), stats=stats)
    torch_den = TorchDenoiser(policy, prompt_len=P, full_mask=None, mask_id=policy.mask_token_id, cfg_scale=0.0,
                              kv_cache=None, want_hidden=False, dtype=torch.float32, temperature=T,
                              generator=torch.Generator().manual_seed(0), stats=stats)
    with torch.no_grad():
        proposals = {"vllm": vllm_den(x, P, N, N, True).x0, "torch": torch_den(x, P, N, N, True).x0}
    for name, x0 in proposals.items():
        for j in (0, 2, 7):
            counts = torch.bincount(x0[:, j], minlength=exact.shape[-1])
            assert _chi2_pvalue(counts, exact[j]) > 1e-4, (name, j)
    assert not torch.equal(proposals["vllm"][:, 0], proposals["vllm"][0, 0].expand(rows))


def test_sampling_is_reproducible_from_the_generator(engines):
    _, _, vllm_engine = engines
    options = dataclasses.replace(VLLM, temperature=1.0)
    a, b = (vllm_engine.generate(PROMPTS, options=options, generator=torch.Generator().manual_seed(1))
            for _ in range(2))
    _same(a, b)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.std() if p.numel() > 1 else 1.0))


def test_update_weights_serves_the_new_weights(engines):
    """After the policy changes, generation equals the torch backend on the new weights (streamed
    in our tensor names; before the update the engine still serves the old ones)."""
    policy, torch_engine, vllm_engine = engines
    before = vllm_engine.generate(PROMPTS)
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    try:
        _perturb(policy.model)
        stale = vllm_engine.generate(PROMPTS)
        _same(before, stale)
        assert vllm_engine.update_weights() > 0
        after = vllm_engine.generate(PROMPTS)
        _same(torch_engine.generate(PROMPTS), after)
        assert not torch.equal(after.sequences, before.sequences)
    finally:
        policy.load_state_dict(saved)
        vllm_engine.update_weights()


def test_zero3_engine_and_lora_are_served_after_optimizer_steps():
    """A ZeRO-3 DeepSpeed engine (weights gathered one tensor at a time) with LoRA adapters
    (merged on the fly): after two optimizer steps the vLLM engine serves the trained weights."""
    from rl.config import LoraOptions
    from rl.engine import build_engine
    from rl.losses import diffusion_sft_loss
    from rl.trainer import apply_lora

    close_live_engines()
    policy = build_tiny_policy(seed=0, arch="bert")
    apply_lora(policy, LoraOptions(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["query", "value"]))
    engine = build_engine(policy, "zero3", lr=0.05, total_steps=2, micro_batch_size=2)
    with VLLMEngine(VLLM, engine) as vllm_engine:
        torch_engine = RolloutEngine(TORCH, engine)
        before = vllm_engine.generate(PROMPTS)
        ids = torch.randint(10, 90, (2, 12), generator=torch.Generator().manual_seed(0))
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[:, 4:] = True
        for step in range(2):
            loss = diffusion_sft_loss(engine, ids, response, mask_id=policy.mask_token_id,
                                      generator=torch.Generator().manual_seed(step))
            engine.backward(loss)
            engine.step()
        vllm_engine.update_weights()
        after = vllm_engine.generate(PROMPTS)
        _same(torch_engine.generate(PROMPTS), after)
        assert not torch.equal(after.sequences, before.sequences)


def test_grpo_trainer_on_vllm_logs_weight_sync_and_serves_trained_weights(tmp_path):
    from helpers.toy_grpo import make_trainer

    close_live_engines()
    with VLLMEngine(VLLM) as vllm_engine:
        trainer = make_trainer(str(tmp_path / "run"), max_steps=2, lr=3e-2, backend="vllm", rollouts=vllm_engine)
        last = trainer.train()
        assert last["timing/weight_sync"] > 0
        greedy = dataclasses.replace(trainer.config.rollout, temperature=0.0)
        ids, mask = vllm_engine.encode(PROMPTS)
        _same(RolloutEngine(greedy, trainer.engine).generate(ids, mask, options=greedy),
              vllm_engine.generate(ids, mask, options=greedy))


def test_trajectory_objective_trains_on_vllm_rollouts(tmp_path):
    """TraceRL reads each token's unmasking step: the vLLM backend's loop records it as the torch
    sampler does, and the objective trains on it (one pass per trace group, at least two groups)."""
    from helpers.toy_grpo import make_trainer

    close_live_engines()
    with VLLMEngine(VLLM) as vllm_engine:
        trainer = make_trainer(str(tmp_path / "run"), max_steps=1, lr=3e-2, backend="vllm", rollouts=vllm_engine,
                               objective="tracerl", objective_options={"shrink": 2})
        assert trainer.config.estimator == "tracerl"
        ro = vllm_engine.generate(PROMPTS, options=trainer.config.rollout)
        valid = ro.completion_mask.bool()
        assert (ro.unmask_step[valid] >= 0).all() and int(ro.unmask_step.max()) >= 2 * trainer.objective.shrink
        last = trainer.train()
        assert math.isfinite(last["loss"]) and last["grad_norm"] > 0


def test_default_recipe_runs_on_vllm(tmp_path, monkeypatch):
    """``dllm-rl rollout.backend=vllm`` at test sizes: both stages train, validate and test on vLLM,
    then the final checkpoint's eval table; at most one engine runs at any time (each stage's is
    closed before its test evaluation starts another), each sized to the run's longest prompt +
    generation (max_model_len, set at preflight)."""
    import json

    import rollout.vllm_backend.engine as vllm_engine_module
    from recipes.__main__ import main
    from test_recipes import SMALL

    close_live_engines()
    started = []
    start = vllm_engine_module.start_llm

    def recording_start(*args, **kwargs):
        started.append((len(live_engines()), kwargs.get("max_model_len")))
        return start(*args, **kwargs)

    monkeypatch.setattr(vllm_engine_module, "start_llm", recording_start)
    run_dir = tmp_path / "run"
    assert main([*SMALL, "recipe=sft_then_grpo", "model.tiny.num_attention_heads=2", "rollout.backend=vllm",
                 f"run_dir={run_dir}", "logger.wandb.mode=disabled", "recipe.final_eval=true"]) == 0
    assert len(started) == 5 and all(running == 0 for running, _ in started)  # 2 stages, 2 tests, final eval
    assert all(0 < length < 512 for _, length in started)  # prompt + gen_length, not the model's 512 positions
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"sft", "rl", "final_eval"} <= set(summary)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("timing/weight_sync" in r for r in rows if r.get("stage") == "rl")


class _TwoRankGroup:
    """Rank ``me`` of a 2-rank vLLM group coordinator whose other rank contributes ``other``'s
    tensors, in call order (all_gather along dim 0, as vLLM's GroupCoordinator)."""

    world_size, device = 2, torch.device("cpu")

    def __init__(self, me: int, other: list[torch.Tensor]):
        self.rank_in_group, self.other = me, list(other)

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        assert t.is_floating_point(), "vLLM's CPU shared-memory all-gather is not implemented for integer tensors"
        theirs = self.other.pop(0)
        return torch.cat([t, theirs] if self.rank_in_group == 0 else [theirs, t], dim)


def test_tensor_parallel_group_batch_is_split_back_per_rank():
    """Tensor parallelism across training ranks: the group's engines run every rank's prompts as
    one batch (wider prompts pad the others), seeded alike; each rank's rows, cut back to its own
    prompt width, equal what it would have generated alone."""
    from rollout.vllm_backend.engine import gather_rows, take_rows

    policy = build_tiny_policy(seed=0, arch="bert")
    engine = RolloutEngine(TORCH, policy)
    (ids_a, mask_a), (ids_b, mask_b) = engine.encode(PROMPTS[:2]), engine.encode(PROMPTS[2:])
    seed_b = torch.randint(0, 2**24, (1,), generator=torch.Generator().manual_seed(9))
    width = ids_b.shape[1]  # what rank 1 sends: its sizes and seed, then ids and mask padded to 2 rows
    rank1 = [torch.tensor([1.0, width, int(seed_b)]), torch.nn.functional.pad(ids_b, (0, 0, 0, 1)).float(),
             torch.nn.functional.pad(mask_b, (0, 0, 0, 1)).float()]  # as float32: vLLM's CPU shm gathers no Long
    ids, mask, shared, local = gather_rows(ids_a, mask_a, torch.Generator().manual_seed(0),
                                           _TwoRankGroup(0, rank1), policy.pad_token_id)
    assert ids.shape == (3, width) and local == (0, 2, ids_a.shape[1])
    assert torch.equal(ids[2], ids_b[0]) and torch.equal(mask[:2, -ids_a.shape[1]:], mask_a)
    both = engine.generate(ids, mask)
    for first, (ids_r, mask_r) in ((0, (ids_a, mask_a)), (2, (ids_b, mask_b))):
        mine = take_rows(both, first, ids_r.shape[0], ids_r.shape[1])
        _same(engine.generate(ids_r, mask_r), mine)
        assert torch.equal(mine.prompt_ids, ids_r) and torch.equal(mine.prompt_mask, mask_r)
    first_seed = torch.randint(0, 2**24, (1,), generator=torch.Generator().manual_seed(0))
    expected = torch.Generator().manual_seed(int(first_seed))
    assert torch.equal(torch.rand(3, generator=shared), torch.rand(3, generator=expected))


@pytest.mark.distributed
def test_two_ranks_zero3_grpo_on_vllm_serve_the_trained_weights(tmp_path):
    """2 gloo ranks, ZeRO-3, one vLLM engine per rank (external launcher): both finish with equal
    weights, and each rank's engine generates what the torch sampler does on the gathered weights."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from rl.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.helpers.toy_grpo", str(tmp_path / "run"), "--max-steps", "2", "--deepspeed", "zero3",
           "--backend", "vllm", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert all(r["backend_equals_torch"] and r["metrics"]["timing/weight_sync"] > 0 for r in ranks)


@pytest.mark.parametrize("override, message", [
    ({"cfg_scale": 1.0}, "cfg_scale=1.0: backend=vllm"),
    ({"kv_cache": "dual"}, "kv_cache='dual': backend=vllm"),
    ({"backend": "sglang"}, "backend='sglang': not allowed"),
])
def test_options_the_backend_cannot_do_fail_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message):
        RolloutOptions(**{"backend": "vllm", **override})


def test_unsupported_models_and_order_policies_fail_with_one_line():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type='gpt2' is not served"):
        check_model(GPT2Config())
    small_heads = build_tiny_policy(seed=0, arch="bert", hidden_size=64).model.config  # head size 16
    with pytest.raises(ValueError, match="head size 16"):
        check_model(small_heads)
    with pytest.raises(ConfigError, match="rollout.backend=vllm: the order learner"):
        from rl.config import UnmaskOrderConfig

        UnmaskOrderConfig(rollout=RolloutOptions(gen_length=8, block_length=8, steps=8, backend="vllm"))
    assert isinstance(build_rollout_engine(TORCH), RolloutEngine)
