"""Tracker: metrics.jsonl, offline W&B inside the run dir, samples table, resume, rank gating."""

from __future__ import annotations

import json

import torch

from rl.tracking import Tracker


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tr = Tracker(tmp_path, name="t", config={"lr": 1e-3}, total_steps=3, sample_table_every=2)
    tr.log({"reward": torch.tensor(0.5), "loss": torch.tensor([1.0, 3.0]), "lr": 1e-3, "n": 4}, step=1)
    assert len(rows(tmp_path / "metrics.jsonl")) == 1  # flushed per line, before close
    tr.log({"reward": 0.75, "kl": float("nan")}, step=2)
    assert "reward=0.750" in str(tr._bar)
    tr.log_samples(1, ["p"], ["c"], [1.0])  # not a multiple of 2: skipped
    tr.log_samples(2, ["p1", "p2"], ["c1", "c2"], torch.tensor([0.0, 1.0]))
    tr.close()
    assert rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "reward": 0.5, "loss": 2.0, "lr": 1e-3, "n": 4},
        {"step": 2, "reward": 0.75, "kl": "nan"},
    ]
    assert rows(tmp_path / "samples.jsonl") == [
        {"step": 2, "prompt": "p1", "completion": "c1", "reward": 0.0},
        {"step": 2, "prompt": "p2", "completion": "c2", "reward": 1.0},
    ]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert runs[0].name.endswith(run_id)


def test_resume_truncates_and_appends(tmp_path):
    tr = Tracker(tmp_path, wandb_mode="disabled", progress=False)
    for s in range(1, 6):
        tr.log({"loss": float(s)}, step=s)
    tr.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a kill mid-write
    tr = Tracker(tmp_path, wandb_mode="disabled", progress=False, resume_step=3)
    tr.log({"loss": 40.0}, step=4)
    tr.close()
    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                                   (4, 40.0)]
    assert not (tmp_path / "wandb").exists()


def test_non_main_rank_writes_nothing(tmp_path):
    tr = Tracker(tmp_path / "run", is_main=False)
    tr.log({"loss": 1.0}, step=1)
    tr.log_samples(1, ["p"], ["c"], [0.0])
    tr.close()
    assert not (tmp_path / "run").exists()


def test_run_context_names_groups_and_logs_the_full_config(tmp_path, monkeypatch):
    """Recipes wrap each stage in run_context: W&B run name, pipeline group, stage as job type and
    progress-bar label, the composed config with the trainer's under ``trainer``."""
    from rl.tracking import run_context

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    composed = {"recipe": {"name": "sft_then_grpo"}, "task": {"name": "gsm8k"}, "seed": 3}
    with run_context(name="sft_then_grpo-gsm8k-tiny-seed3", group="sft_then_grpo-gsm8k-tiny-seed3-20250101-000000",
                     job_type="rl", config=composed):
        tr = Tracker(tmp_path, config={"lr": 1e-3}, wandb_mode="offline", total_steps=2)
    try:
        run = tr._wandb
        assert run.name == "sft_then_grpo-gsm8k-tiny-seed3" and run.job_type == "rl"
        assert run.group == "sft_then_grpo-gsm8k-tiny-seed3-20250101-000000"
        assert run.config["task"] == {"name": "gsm8k"} and run.config["trainer"] == {"lr": 1e-3}
        assert tr._bar.desc.startswith("rl")
    finally:
        tr.close()
    outside = Tracker(tmp_path / "plain", wandb_mode="disabled", total_steps=1)  # the context is gone
    assert outside._bar.desc.startswith("train")
    outside.close()
