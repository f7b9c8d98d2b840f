"""SFT then GRPO through the recipes on a tiny SDAR (block diffusion): one process, full fine-tuning
with diffu-GRPO (block_mean_field) and LoRA with TraceRL (block_tracerl); 2 gloo ranks under ZeRO-3 in
the distributed suite. The rollouts come from the block sampler (rollout/block_sampler.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.block_recipes import CASES, case_name, overrides, write_tiny_sdar
from recipes.__main__ import main
from rl.distributed import free_port
from rollout import PolicyAdapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_sdar(tmp_path_factory.mktemp("tiny-sdar"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check_case(run_dir: Path, source: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in ("sft", "rl"):
        train = summary[stage]["train"]
        assert all(torch.isfinite(torch.tensor(train[k])) for k in ("loss", "grad_norm")), (stage, train)
        assert 0 <= summary[stage]["eval/accuracy"] <= 1
        final = run_dir / stage / "final"
        assert PolicyAdapter.from_pretrained(str(final)).block_causal  # still an SDAR, published layout
        before, after = weights(source), weights(final)
        assert set(before) == set(after)  # LoRA merged away
        assert any(not torch.equal(before[k], after[k]) for k in before), stage
    steps = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in s for s in steps) == 3
    # the digit reward spreads: some RL step had a signal and a gradient
    assert any(s.get("reward_std", 0) > 0 and s.get("grad_norm", 0) > 0 for s in steps), steps
    return summary


@pytest.mark.parametrize("variant,objective", CASES)
def test_sft_then_grpo_on_a_tiny_sdar_one_process(folder, tmp_path, variant, objective):
    run_dir = tmp_path / case_name(variant, objective)
    assert main(overrides(variant, objective, folder, run_dir)) == 0
    check_case(run_dir, folder)


@pytest.mark.distributed
def test_sft_then_grpo_on_a_tiny_sdar_two_ranks_zero3(folder, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "tests.helpers.block_recipes",
           str(tmp_path), str(folder), "--zero", "zero3"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for variant, objective in CASES:
        run_dir = tmp_path / case_name(variant, objective)
        assert (run_dir / "exit_code").read_text() == "0", run_dir.name
        check_case(run_dir, folder)
        r0, r1 = (json.loads((run_dir / f"rank{r}.done.json").read_text()) for r in (0, 1))
        assert r0["world_size"] == 2 and r0["train"] == r1["train"], run_dir.name
        assert r0["param_checksum"] == pytest.approx(r1["param_checksum"], rel=0, abs=1e-6), run_dir.name


def test_an_objective_without_a_block_form_stops_with_one_line(folder, tmp_path, capsys):
    """SPG's block-wise masks have no block-causal form: exit 2 and one line, before any training."""
    code = main([*overrides("full", "spg", folder, tmp_path / "run"), "recipe=grpo"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dllm-rl:")]
    assert code == 2 and len(err) == 1, err
    assert "estimator='spg'" in err[0] and "no block-causal form" in err[0] and "block_mean_field" in err[0]


def test_default_recipe_on_a_block_model_refuses_certainty_forcing_before_any_stage(folder, tmp_path, capsys):
    """The default recipe's distill stage uses certainty forcing, which the block-diffusion SFT loss does not
    have: one config-error line at preflight (exit 2), nothing trained; with the weight at 0 it composes."""
    run_dir = tmp_path / "default"
    args = [o for o in overrides("full", "diffu_grpo", folder, run_dir) if o != "recipe=sft_then_grpo"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "distill.certainty_weight=2.0" in err and "block-diffusion" in err and "recipe=sft_then_grpo" in err
    assert not (run_dir / "sft").exists()
    from recipes.config import load_config
    from recipes.preflight import check_block_model

    check_block_model(load_config([*args, "distill.certainty_weight=0"]))
