"""The recipes end to end on the tiny model with tiny sizes (seconds, not the real schedule):
the default pipeline (SFT, GRPO, self-distillation) writes every promised output, and the eval recipe
writes its table. The full-size default (the >= 15-point lift) is measured in the README and
checked by the slow test at the bottom."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.__main__ import main

TINY = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.intermediate_size=128"]
SMALL = [
    "task.num_sft=16", "task.num_rl=32", "task.num_val=8", "task.num_test=16",
    "sft.max_steps=4", "sft.per_device_batch_size=8", "sft.eval_steps=2", "sft.warmup_steps=0",
    "rl.max_steps=3", "rl.per_device_prompts=4", "rl.num_generations=4", "rl.eval_steps=2", "rl.warmup_steps=0",
    "distill.max_steps=3", "distill.per_device_batch_size=2", "distill.eval_steps=2",
    *TINY,
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("default") / "run"
    assert main([*SMALL, f"run_dir={run_dir}", "seed=1", "logger.wandb.mode=offline"]) == 0
    return run_dir


def test_default_pipeline_writes_every_output(default_run: Path, capsys):
    run_dir = default_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["recipe"] == "sft_grpo_distill"
    for stage in ("sft", "rl"):
        acc = summary[stage]["eval/accuracy"]
        assert 0.0 <= acc <= 1.0
        assert summary[stage]["eval/num_examples"] == 16
        # the handed-on checkpoint is the validation-selected one
        assert summary[stage]["checkpoint"].endswith(f"{stage}/best")
        assert summary[stage]["selected"]["val_accuracy"] >= 0
    # the distill stage trains on the policy's solved RL prompts, or hands the RL checkpoint on when it
    # solved fewer than one batch (this 4-step SFT model); either way it is evaluated on the test set
    distill = summary["distill"]
    assert distill["data"]["samples"] == 32 and 0 <= distill["eval/accuracy"] <= 1
    handed_on = summary["rl"]["checkpoint"] if "skipped" in distill else str(run_dir / "distill" / "best")
    assert distill["checkpoint"] == handed_on
    assert summary["lift"] == pytest.approx(distill["eval/accuracy"] - summary["sft"]["eval/accuracy"])
    assert summary["seed"] == 1

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft_rows = [r for r in rows if r["stage"] == "sft"]
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows if "reward" in r] == [1, 2, 3]
    assert any("eval/val_accuracy" in r for r in sft_rows) and any("eval/val_accuracy" in r for r in rl_rows)
    assert min(r["global_step"] for r in rl_rows) > max(r["step"] for r in sft_rows) - 1  # RL continues after SFT

    png = (run_dir / "reward_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    final = run_dir / "final"
    assert (final / "config.json").exists() and final.resolve() == Path(handed_on).resolve()
    assert list((run_dir / "rl" / "wandb").glob("offline-run-*"))


def test_final_checkpoint_reloads_and_scores_like_summary(default_run: Path):
    """The exported checkpoint is what was evaluated: re-evaluating it gives the same accuracy."""
    from recipes.config import load_config
    from recipes.pipeline import test_eval
    from rl.tasks import build_task

    cfg = load_config([*SMALL, f"run_dir={default_run}", "seed=1"])
    summary = json.loads((default_run / "summary.json").read_text())
    again = test_eval(cfg, build_task(cfg.task), default_run / "final")
    assert again["eval/accuracy"] == summary["distill"]["eval/accuracy"]


def test_eval_recipe_writes_markdown_and_json(default_run: Path, tmp_path):
    out = tmp_path / "eval"
    assert main(["recipe=eval", f"eval.checkpoint={default_run / 'final'}", f"run_dir={out}", "task.num_test=8",
                 "task.num_rl=8", "task.num_sft=0", "task.num_val=0",
                 "eval.modes={baseline: {}, parallel: {threshold: 0.5}}", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["mode"] for r in results] == ["baseline", "parallel"]
    assert all(r["task"] == "sudoku4" and r["num_examples"] == 8 for r in results)
    # parallel decoding never needs more forward passes than one-token-per-step
    assert results[1]["forward_passes"] <= results[0]["forward_passes"]
    md = (out / "results.md").read_text()
    assert "| sudoku4 | 17 |" in md and "parallel" in md


@pytest.mark.slow
def test_default_recipe_full_size_lifts_accuracy(tmp_path):
    """The README's main command at full size: the final checkpoint is >= 15 points above SFT's."""
    run_dir = tmp_path / "run"
    assert main([f"run_dir={run_dir}", "logger.wandb.mode=disabled"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lift"] >= 0.15, summary


def test_unmask_order_recipe_compares_with_low_confidence_order(tmp_path):
    run_dir = tmp_path / "uo"
    assert main(["recipe=unmask_order", f"run_dir={run_dir}", "task.num_sft=0", "task.num_rl=8", "task.num_val=4",
                 "task.num_test=8", "rl.max_steps=2", "rl.per_device_prompts=2", "logger.wandb.mode=disabled",
                 "recipe.plot=false", *TINY]) == 0
    rl = json.loads((run_dir / "summary.json").read_text())["rl"]
    assert 0 <= rl["eval/accuracy"] <= 1 and 0 <= rl["eval/accuracy_low_confidence_order"] <= 1
    assert rl["train"]["lr"] > 0
    assert (run_dir / "rl" / "final" / "order_head.pt").exists()


def test_dpo_recipe_names_the_fix_when_every_group_ties(tmp_path):
    """An untrained model never writes a full grid: every sample scores 0, no pairs, one clear error."""
    with pytest.raises(ValueError, match="no preference pairs from 4 prompts.*recipe.pair_samples"):
        main(["recipe=dpo", f"run_dir={tmp_path / 'dpo'}", "task.num_sft=0", "task.num_rl=4", "task.num_val=4",
              "task.num_test=4", "recipe.pair_prompts=4", "recipe.pair_samples=2", "logger.wandb.mode=disabled", *TINY])


def test_resume_continues_rl_without_redoing_sft(default_run: Path, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(default_run, run_dir, symlinks=True)
    sft_rows_before = (run_dir / "sft" / "metrics.jsonl").read_text()
    assert main([*[o for o in SMALL if not o.startswith("rl.max_steps")], "rl.max_steps=4", f"run_dir={run_dir}",
                 "seed=1", "resume=true", "logger.wandb.mode=disabled"]) == 0
    rl_steps = [json.loads(x)["step"] for x in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()
                if "reward" in json.loads(x)]
    assert rl_steps == [1, 2, 3, 4]  # continued from step 3, no step logged twice
    sft_train_rows = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] <= 4 for r in sft_train_rows)
    assert (run_dir / "sft" / "metrics.jsonl").read_text().startswith(sft_rows_before)


GSM8K_SMALL = ["recipe=sft_then_grpo", "task=gsm8k", "rl.max_steps=2", "model.tiny.max_position_embeddings=1280", *TINY,
               "task.num_val=4", "task.num_test=4", "sft.max_steps=2", "sft.per_device_batch_size=2",
               "sft.eval_steps=0", "rl.per_device_prompts=2", "rl.num_generations=2", "rl.eval_steps=0",
               "recipe.plot=false"]


def test_gsm8k_runs_sft_then_grpo_with_the_gsm8k_reward_alone(tmp_path):
    """The done-when run: ``dllm-rl task=gsm8k rl.max_steps=2`` on the local copy ($DLLM_RL_DATA),
    a tiny model with positions for GSM8K prompts plus gen_length, tiny sizes otherwise."""
    run_dir = tmp_path / "gsm8k"
    assert main([*GSM8K_SMALL, f"run_dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["sft"]["eval/num_examples"] == 4
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reward_keys = {k for r in rows for k in r if k.startswith("rewards/")}
    assert reward_keys == {"rewards/gsm8k/mean"}  # no sudoku term composed in
    assert [r["step"] for r in rows if r["stage"] == "rl" and "reward" in r] == [1, 2]
    group = (run_dir / "wandb_group.txt").read_text()
    assert group.startswith("sft_then_grpo-gsm8k-tiny-seed0-")
    for stage in ("sft", "rl"):  # the offline run's record log holds name, group, job type and config
        record = next((run_dir / stage / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
        assert b"sft_then_grpo-gsm8k-tiny-seed0" in record and group.encode() in record
        assert b'"max_position_embeddings":1280' in record  # the full composed config, not only the trainer's


def _jsonl(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, expected", [
    ("truncated", "cannot read rows"),
    ("missing_column", "has no column 'prompt'"),
    ("empty_folder", "no data files"),
])
def test_bad_data_exits_2_with_one_line(tmp_path, capsys, case, expected):
    paths = {"truncated": lambda: _jsonl(tmp_path / "t.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "b'),
             "missing_column": lambda: _jsonl(tmp_path / "m.jsonl", '{"q": "a", "answer": "1"}\n'),
             "empty_folder": lambda: (tmp_path / "e").mkdir() or tmp_path / "e"}
    assert main(["task=local", f"task.path={paths[case]()}", f"run_dir={tmp_path / 'run'}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dllm-rl: data error:") and expected in err and err.count("\n") == 0


def test_training_without_a_train_split_stops_and_eval_still_works(tmp_path, capsys):
    """MATH-500's local copy is a test set: training says how to give a train split; eval runs
    (with positions for its prompts) and a model too short for them is a one-line config error."""
    assert main(["recipe=grpo", "task=math500", f"run_dir={tmp_path / 'grpo'}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no training split" in err and "task.path=" in err and err.count("\n") == 0
    ev = ["recipe=eval", "task=math500", "eval.tasks=[math500]", f"run_dir={tmp_path / 'ev'}", *TINY]
    assert main(ev) == 2  # the whole test split: its longest prompt does not fit 512 positions
    err = capsys.readouterr().err.strip()
    assert "positions" in err and "model.tiny.max_position_embeddings" in err and err.count("\n") == 0
    assert main([*ev, "eval.num_examples=2", "model.tiny.max_position_embeddings=2048"]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [(r["task"], r["num_examples"]) for r in results] == [("math500", 2)]
