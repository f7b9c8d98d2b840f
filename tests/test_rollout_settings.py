"""Item 8 of issue #23: one rule for rollout settings. A stage's ``rollout`` (GRPO's samples, the
order learner's) takes every key of the run's ``rollout`` except the ones its trainer sets on
purpose, and a command-line ``rollout.<key>`` that such a key shadows is reported in one line."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from recipes.config import load_config
from recipes.schema import CONFIG_DIR, TRAINER_SCHEMAS
from rl.config import RolloutOptions, VLLMOptions

ROLLOUT_STAGES = [p for p in sorted((CONFIG_DIR / "trainer").glob("*.yaml"))
                  if any(f"- {s}_schema" in p.read_text() for s, cls in TRAINER_SCHEMAS.items()
                         if "rollout" in {f.name for f in dataclasses.fields(cls)})]


def test_the_trainers_with_rollouts_are_found():
    assert {p.stem for p in ROLLOUT_STAGES} == {"diffu_grpo", "diffu_grpo_d1", "self_distill", "unmask_order"}


@pytest.mark.parametrize("path", ROLLOUT_STAGES, ids=lambda p: p.stem)
def test_stage_rollout_lists_every_key_and_interpolates_all_but_its_own(path):
    node = OmegaConf.load(path).rollout
    fields = [f.name for f in dataclasses.fields(RolloutOptions)]
    assert list(node.keys()) == fields, f"{path.name}: rollout must list every RolloutOptions field, in order"
    own = [k for k in fields if k != "vllm" and not OmegaConf.is_interpolation(node, k)]
    for k in fields:
        if k not in own and k != "vllm":
            assert node._get_node(k)._value() == f"${{rollout.{k}}}", (path.name, k)
    vllm = [f.name for f in dataclasses.fields(VLLMOptions)]
    assert list(node.vllm.keys()) == vllm
    assert all(node.vllm._get_node(k)._value() == f"${{rollout.vllm.{k}}}" for k in vllm)
    assert set(own) <= {"temperature", "threshold", "steps"}  # the documented choices (YAML comments)
    text = path.read_text()
    assert all(f"  {k}: " in text and "# own:" in text.split(f"  {k}: ", 1)[1].split("\n", 1)[0] for k in own)


@pytest.mark.parametrize("override, key, value", [
    ("rollout.kv_cache=dual", "kv_cache", "dual"),
    ("rollout.remasking=margin", "remasking", "margin"),
    ("rollout.fill_after_eos=true", "fill_after_eos", True),
    ("rollout.early_commit=0.5", "early_commit", 0.5),
    ("rollout.cache_lookahead=4", "cache_lookahead", 4),
    ("rollout.prompt_special_tokens=true", "prompt_special_tokens", True),
])
def test_command_line_rollout_keys_reach_grpo_rollouts(override, key, value):
    extra = ["rollout.kv_cache=dual"] if key == "cache_lookahead" else []
    cfg = load_config([override, *extra])
    assert getattr(cfg.rollout, key) == value and getattr(cfg.rl.rollout, key) == value


def test_vllm_settings_reach_grpo_rollouts():
    cfg = load_config(["rollout.vllm.max_model_len=99", "rollout.vllm.tensor_parallel_size=2"])
    assert cfg.rl.rollout.vllm == cfg.rollout.vllm
    assert (cfg.rl.rollout.vllm.max_model_len, cfg.rl.rollout.vllm.tensor_parallel_size) == (99, 2)


def test_a_shadowed_override_is_reported_in_one_line_at_start(capsys):
    from recipes.__main__ import main

    assert main(["--cfg", "rollout.temperature=0.7", "rollout.threshold=0.5", "rollout.kv_cache=dual"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dllm-rl] note:")]
    assert len(notes) == 1
    assert "rollout.temperature=0.7 does not reach rl.rollout.temperature (its trainer sets 1.5" in notes[0]
    assert "rollout.threshold=0.5 does not reach rl.rollout.threshold (its trainer sets 0.9" in notes[0]
    assert "kv_cache" not in notes[0]  # it reaches rl.rollout


@pytest.mark.parametrize("overrides", [
    ["rollout.kv_cache=dual"],
    ["rollout.temperature=0.7", "rl.rollout.temperature=0.7"],  # the stage's key set too: nothing shadowed
    ["recipe=sft", "rollout.temperature=0.7"],  # no stage with its own rollout
])
def test_nothing_is_reported_when_nothing_is_shadowed(overrides):
    notes: list[str] = []
    load_config(overrides, notes=notes)
    assert notes == []


def test_group_option_and_experiment_are_reported_per_key():
    notes: list[str] = []
    load_config(["rollout=d1_fast"], notes=notes)
    assert "rollout=d1_fast does not reach rl.rollout.threshold" in notes[0]
    notes = []
    load_config(["experiment=llada_gsm8k", "model.path=/nonexistent", "rollout.temperature=0.5"], notes=notes)
    assert "does not reach rl.rollout.temperature (its trainer sets 0.9" in notes[0]
