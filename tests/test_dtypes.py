"""Item 2 of issue #23: the requested dtype is the loaded dtype, and 16-bit weights train with fp32
master weights (DeepSpeed's bf16 section) or the run refuses with one line."""

from __future__ import annotations

import pytest
import torch

from recipes.config import load_config
from recipes.schema import ConfigError


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_requested_dtype_is_the_loaded_dtype(published_folder, family, dtype):
    """The fixtures are saved in float32: a bfloat16 request must not come back as the checkpoint's
    own dtype, nor a float32 request as transformers' default for the checkpoint."""
    from recipes.pipeline import build_policy

    folder = published_folder(family)
    cfg = load_config([f"model.path={folder}", f"model.family={family}", f"model.dtype={dtype}", "device=cpu",
                       "sft.bf16=true", "rl.bf16=true"])
    policy = build_policy(cfg)
    assert {p.dtype for p in policy.parameters()} == {getattr(torch, dtype)}


def test_tiny_model_is_cast_to_the_requested_dtype():
    from recipes.pipeline import build_policy

    cfg = load_config(["model.dtype=bfloat16", "device=cpu", "sft.bf16=true", "rl.bf16=true"])
    assert {p.dtype for p in build_policy(cfg).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("overrides, message", [
    (["model.dtype=bfloat16"], "sft.bf16=false: model.dtype=bfloat16 weights would be updated by AdamW with no fp32"),
    (["model.dtype=bfloat16", "sft.bf16=true"], "rl.bf16=false: model.dtype=bfloat16"),
    (["model.dtype=float16", "recipe=grpo"], "rl.bf16=false: model.dtype=float16"),
])
def test_16bit_weights_without_deepspeed_bf16_refuse_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides)
    assert "\n" not in str(e.value)


def test_16bit_weights_with_bf16_or_fp32_adapters_are_allowed():
    load_config(["model.dtype=bfloat16", "sft.bf16=true", "rl.bf16=true"])
    # LoRA: peft keeps the adapters (the only trained weights) in float32 on a bf16 base
    load_config(["model.dtype=bfloat16", "sft.lora.enabled=true", "rl.lora.enabled=true"])


def test_trainer_refuses_16bit_trainable_weights_without_bf16():
    """The same rule on the actual tensors (Python API: no config in between)."""
    from rl.trainer import check_master_weights
    from rollout import build_tiny_policy

    policy = build_tiny_policy(seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="bf16=false: the trainable weights are bfloat16"):
        check_master_weights(policy, bf16=False)
    check_master_weights(policy, bf16=True)
    policy.requires_grad_(False)
    check_master_weights(policy, bf16=False)  # frozen 16-bit weights are fine


def _changed_fraction(stage: str | None) -> float:
    """Fraction of the (|w| > 0.01) bf16 weights that moved after 10 AdamW steps of lr 2e-5, through
    DeepSpeed's bf16 section (``stage``) or, for None, torch's AdamW on the bf16 tensors themselves.
    One step moves a weight by ~lr, below half a bf16 ulp at |w| > 0.01 (>= 3e-5): only an fp32
    master copy accumulates the steps until they show in the bf16 weight."""
    from rl.engine import build_engine
    from rl.losses import diffusion_sft_loss
    from rollout import build_tiny_policy

    policy = build_tiny_policy(seed=0, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=128).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = torch.randint(10, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 6:] = True
    if stage is None:
        model, opt = policy, torch.optim.AdamW(policy.parameters(), lr=2e-5, weight_decay=0.0)
    else:
        model = build_engine(policy, stage, lr=2e-5, total_steps=20, micro_batch_size=4, bf16=True, grad_clip=None)
    for s in range(10):
        loss = diffusion_sft_loss(model, ids, resp, mask_id=policy.mask_token_id,
                                  generator=torch.Generator().manual_seed(s))
        if stage is None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            model.backward(loss)
            model.step()
    changed = total = 0
    for n, p in policy.named_parameters():
        big = before[n].float().abs() > 0.01
        changed += int((p.detach().to(torch.bfloat16) != before[n])[big].sum())
        total += int(big.sum())
    return changed / total


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_bf16_weights_train_with_fp32_master_weights(stage):
    assert _changed_fraction(stage) > 0.4  # measured: 0.64 (ZeRO-0), 0.67 (ZeRO-2)
    assert _changed_fraction(None) < 0.02  # measured: 0.0: the steps are rounded away
