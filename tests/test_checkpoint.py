"""Atomic checkpoints (exact resume, crash safety, pruning) and the merged HF export."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rl.checkpoint as ckpt
from rl.checkpoint import export_hf, latest_step, load_checkpoint, save_checkpoint
from rl.engine import build_engine, consolidated_state_dict, unwrap
from rollout.tiny import build_tiny_model
from tests.test_engine import sft_batch, train

ROOT = Path(__file__).resolve().parents[1]


def make_engine(tok, stage: str, *, seed: int = 0, lora: bool = False):
    model = build_tiny_model(tok, seed=seed)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return build_engine(model, stage, lr=1e-2, warmup_steps=3, total_steps=20, micro_batch_size=4)


def draws(gen: torch.Generator) -> list:
    return [torch.rand(3, generator=gen).tolist(), random.random(), float(np.random.rand()), torch.rand(2).tolist()]


@pytest.mark.parametrize("stage,lora", [("zero0", False), ("zero2", True), ("zero3", False)])
def test_roundtrip_restores_everything(tiny_tokenizer, tmp_path, stage, lora):
    """Save at step 2, continue 2 steps; a fresh engine (other init) loaded from the checkpoint
    and continued the same way ends with bit-identical weights, LR and RNG draws."""
    batch = sft_batch(tiny_tokenizer)
    a = make_engine(tiny_tokenizer, stage, lora=lora)
    train(a, tiny_tokenizer, 2, batch)
    gen = torch.Generator().manual_seed(7)
    torch.rand(5, generator=gen)
    save_checkpoint(a, tmp_path, 2, {"step": 2, "data": {"epoch": 0, "pos": 5}, "generators": {"mask": gen}})
    saved_weights = consolidated_state_dict(a)
    expect_draws = draws(gen)
    train(a, tiny_tokenizer, 2, batch)
    expect_weights, expect_lr = consolidated_state_dict(a), a.get_lr()

    # LoRA checkpoints skip the frozen base (it comes from the pretrained model on resume):
    # same base, scrambled adapters; full fine-tuning: a different init altogether.
    b = make_engine(tiny_tokenizer, stage, seed=0 if lora else 1, lora=lora)
    if lora:
        with torch.no_grad():
            noise = torch.Generator().manual_seed(5)
            for p in unwrap(b).parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=noise))
    gen_b = torch.Generator().manual_seed(999)
    state = load_checkpoint(b, tmp_path, generators={"mask": gen_b})
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "pos": 5} and "generators" not in state
    assert b.global_steps == 2
    got = consolidated_state_dict(b)
    for k in saved_weights:
        assert torch.equal(got[k], saved_weights[k]), k
    assert draws(gen_b) == expect_draws
    train(b, tiny_tokenizer, 2, batch)
    assert b.get_lr() == expect_lr
    got = consolidated_state_dict(b)
    for k in expect_weights:
        assert torch.equal(got[k], expect_weights[k]), k  # optimizer moments + scheduler restored


def test_no_checkpoint_and_missing_generator(tiny_tokenizer, tmp_path):
    engine = make_engine(tiny_tokenizer, "zero0")
    assert latest_step(tmp_path) is None and load_checkpoint(engine, tmp_path) is None
    save_checkpoint(engine, tmp_path, 1, {"generators": {"a": torch.Generator()}})
    with pytest.raises(KeyError, match="'b'"):
        load_checkpoint(engine, tmp_path, generators={"b": torch.Generator()})


def test_crash_mid_save_keeps_previous_latest(tiny_tokenizer, tmp_path, monkeypatch):
    engine = make_engine(tiny_tokenizer, "zero2")
    save_checkpoint(engine, tmp_path, 1, {"tag": "one"})
    good = consolidated_state_dict(engine)
    train(engine, tiny_tokenizer, 1, sft_batch(tiny_tokenizer))

    def crash(_path):
        raise RuntimeError("simulated crash after the temp dir was written")

    monkeypatch.setattr(ckpt, "_fsync_tree", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(engine, tmp_path, 2, {"tag": "two"})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-2" / "ds").is_dir() and not (root / "step-2").exists()
    assert (root / "latest").read_text().strip() == "step-1" and latest_step(tmp_path) == 1
    state = load_checkpoint(engine, tmp_path)
    assert state["tag"] == "one"
    got = consolidated_state_dict(engine)
    assert all(torch.equal(got[k], good[k]) for k in good)
    save_checkpoint(engine, tmp_path, 3, {"tag": "three"})  # the next save cleans the leftover
    assert not (root / ".tmp-step-2").exists() and latest_step(tmp_path) == 3


def test_keep_last_prunes_and_latest_fallback(tiny_tokenizer, tmp_path):
    engine = make_engine(tiny_tokenizer, "zero0")
    for step in range(1, 5):
        save_checkpoint(engine, tmp_path, step, {}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-3", "step-4"]
    save_checkpoint(engine, tmp_path, 4, {"again": True}, keep_last=2)  # re-saving a step replaces it
    assert load_checkpoint(engine, tmp_path)["again"] is True
    (root / "latest").unlink()
    assert latest_step(tmp_path) == 4
    (root / "latest").write_text("step-9\n")  # names a missing dir: fall back to the newest
    assert latest_step(tmp_path) == 4


SAVE_LOOP = r"""
import sys, torch
from rl.checkpoint import save_checkpoint
from rl.engine import build_engine
from rollout.tiny import build_tiny_model, build_tiny_tokenizer
run = sys.argv[1]
model = build_tiny_model(build_tiny_tokenizer(), seed=0, hidden_size=32, num_hidden_layers=1, intermediate_size=64)
engine = build_engine(model, "zero0", lr=1e-3, total_steps=10**6, micro_batch_size=1)
for step in range(1, 10**6):
    with torch.no_grad():
        for p in engine.module.parameters():
            p.fill_(float(step))
    save_checkpoint(engine, run, step, {"value": float(step)}, keep_last=2)
    print("saved", step, flush=True)
"""


def test_sigkill_during_save_loop_leaves_loadable_latest(tiny_tokenizer, tmp_path):
    """A real process saving in a tight loop is SIGKILLed at an arbitrary moment: ``latest``
    names a complete checkpoint whose weights match its own trainer state."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("saved 3"):
                break
        else:
            pytest.fail("save loop died before its third checkpoint")
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))  # lands inside some save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    step = latest_step(tmp_path)
    assert step is not None and step >= 3
    model = build_tiny_model(tiny_tokenizer, seed=0, hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    engine = build_engine(model, "zero0", lr=1e-3, total_steps=10, micro_batch_size=1)
    state = load_checkpoint(engine, tmp_path)
    assert state["step"] == step and state["value"] == float(step)
    assert all(torch.all(p == float(step)) for p in engine.module.parameters())


class Wrapper(torch.nn.Module):
    """Stands in for rollout.PolicyAdapter: the HF model lives in ``.model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask=attention_mask)


def test_export_hf_merges_lora(tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    base = build_tiny_model(tiny_tokenizer, seed=0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    engine = build_engine(Wrapper(peft_model), "zero0", lr=1e-2, total_steps=5, micro_batch_size=4)
    train(engine, tiny_tokenizer, 3, sft_batch(tiny_tokenizer))  # lora_B leaves zero: merging matters
    ids, _ = sft_batch(tiny_tokenizer, seed=1)
    with torch.no_grad():
        expect = engine(ids).logits
        with peft_model.disable_adapter():
            base_logits = engine(ids).logits
    assert not torch.allclose(expect, base_logits, atol=1e-4)

    out = export_hf(engine, tiny_tokenizer, tmp_path / "final")
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expect, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).mask_token_id == tiny_tokenizer.mask_token_id
    assert not any("lora" in k for k in loaded.state_dict())
    # the live model is untouched (still a LoRA model producing the same logits), and a second
    # export over the first replaces it atomically
    assert any("lora_A" in n for n, _ in unwrap(engine).named_parameters())
    export_hf(unwrap(engine), None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForMaskedLM.from_pretrained(out)(ids).logits, expect,
                                   atol=1e-5, rtol=1e-5)
