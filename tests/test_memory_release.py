"""Item 3 of issue #23: SFT scores through the fused path (no [B, T, V] logits, no gradient of
that size), no full-parameter float64 copy, and a stage's trainer, DeepSpeed engine, optimizer and
policy are gone before the test evaluation loads the checkpoint again."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rl.losses import diffusion_sft_loss, draw_sft_noise, masked_token_logprobs


class LargestTensors(TorchDispatchMode):
    """Records the largest floating-point tensor (numel) every op creates, per dtype."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def _policy(kind: str, published_folder):
    from rollout import PolicyAdapter, build_tiny_policy

    if kind == "bert":
        return build_tiny_policy(seed=0, arch="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)
    return PolicyAdapter.from_pretrained(str(published_folder(kind)), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["llada", "dream", "bert"])
def test_sft_log_probs_through_the_fused_path_equal_the_logits_path(kind, published_folder):
    policy = _policy(kind, published_folder)
    assert policy.fused_scoring
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 60, (3, 20), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 5:] = True
    attn = torch.ones_like(ids)
    attn[2, 15:] = 0  # right padding (SFT's collate)
    resp[2, 15:] = False
    _, masked = draw_sft_noise(resp, g)
    fused = masked_token_logprobs(policy, ids, masked, policy.mask_token_id, attn)
    fused.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    from rl.logprobs import token_logprobs
    from rl.masking import apply_mask

    logits = policy(apply_mask(ids, masked, policy.mask_token_id), attention_mask=attn).logits
    plain = token_logprobs(logits, ids, masked)
    plain.sum().backward()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert bool((fused[~masked] == 0).all()) and bool((fused[masked] < 0).all())
    for n, p in policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_sft_step_never_builds_batch_by_vocab_logits(published_folder):
    """A forward + backward of the SFT loss on [4, 160] rows of the LLaDA fixture (MLP width 96,
    vocabulary 128): the largest float tensor is the MLP's activation or one chunk of 256 scored
    positions' logits, far below B x T x V (the logits path builds two of that size)."""
    from rollout import PolicyAdapter

    policy = PolicyAdapter.from_pretrained(str(published_folder("llada", intermediate=96)), dtype=torch.float32)
    V = policy.model.config.embedding_rows
    ids = torch.randint(10, 60, (4, 160), generator=torch.Generator().manual_seed(0))
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 8:] = True
    with LargestTensors() as seen:
        loss = diffusion_sft_loss(policy, ids, resp, mask_id=policy.mask_token_id,
                                  generator=torch.Generator().manual_seed(1))
        loss.backward()
    assert V == 128 and max(seen.largest.values()) <= max(4 * 160 * 96, 256 * V) < 4 * 160 * V


def test_param_checksum_makes_no_full_float64_copy():
    from rl.checkpoint import param_checksum

    module = torch.nn.Linear(3000, 1000)  # 3M-element weight
    with LargestTensors() as seen:
        value = param_checksum(module, chunk=1 << 16)
    assert seen.largest[torch.float64] <= 1 << 16
    expected = sum(p.detach().double().sum() for p in module.parameters())
    assert value == pytest.approx(float(expected), rel=1e-12, abs=1e-9)


def test_stage_is_freed_before_the_test_evaluation(tmp_path, monkeypatch):
    """Each stage's DeepSpeed engine, optimizer and policy are collected by the time
    ``test_eval`` loads the stage's checkpoint (the pipeline collects; the test does not)."""
    import recipes.pipeline as pipeline
    import rl.trainer
    from recipes.__main__ import main
    from test_recipes import SMALL

    alive: list[weakref.ref] = []
    build = rl.trainer.build_engine

    def recording_build(model, *args, **kwargs):
        engine = build(model, *args, **kwargs)
        alive.extend(weakref.ref(x) for x in (engine, engine.optimizer, model))
        return engine

    checked = []
    real_test_eval = pipeline.test_eval

    def checking_test_eval(cfg, task, checkpoint):
        checked.append([r() is None for r in alive])
        return real_test_eval(cfg, task, checkpoint)

    monkeypatch.setattr(rl.trainer, "build_engine", recording_build)
    monkeypatch.setattr(pipeline, "test_eval", checking_test_eval)
    assert main([*SMALL, "recipe=sft_then_grpo", f"run_dir={tmp_path / 'run'}", "logger.wandb.mode=disabled",
                 "recipe.plot=false"]) == 0
    assert len(checked) == 2 and len(alive) == 6  # SFT and GRPO: engine, optimizer, policy each
    assert checked[0][:3] == [True, True, True] and checked[1] == [True] * 6
    gc.collect()
