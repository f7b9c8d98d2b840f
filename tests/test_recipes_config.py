"""The Hydra app's config layer: composition, typed overrides, one-line errors, real-model configs.
No weights, no torch model: these run in seconds."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.__main__ import main
from recipes.config import group_options, load_config
from recipes.schema import ConfigError, RunConfig
from rl.config import DiffuGRPOConfig, RolloutOptions, SelfDistillConfig, SFTConfig

ROOT = Path(__file__).resolve().parents[1]


def test_default_composition_is_the_sudoku_sft_grpo_distill_recipe():
    cfg = load_config([])
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe.name == "sft_grpo_distill" and cfg.task.name == "sudoku4" and cfg.model.path is None
    assert isinstance(cfg.sft, SFTConfig) and isinstance(cfg.rl, DiffuGRPOConfig)
    assert isinstance(cfg.distill, SelfDistillConfig)
    # the speed-aware default shortens RL; d1's two stages keep the trainer's 300 steps
    d1 = load_config(["recipe=sft_then_grpo"])
    assert (cfg.rl.max_steps, cfg.rl.num_iterations, cfg.rl.eval_steps) == (100, 1, 50)
    assert (d1.rl.max_steps, d1.rl.num_iterations, d1.rl.eval_steps) == (300, 2, 25)
    assert (cfg.sft.eval_steps, d1.sft.eval_steps) == (100, 50)
    # the default's distill stage is shorter than the stage alone
    assert (cfg.distill.max_steps, load_config(["recipe=distill"]).distill.max_steps) == (400, 600)
    assert load_config(["distill.max_steps=9"]).distill.max_steps == 9
    assert load_config(["rl.max_steps=7"]).rl.max_steps == 7
    assert isinstance(cfg.rl.rollout, RolloutOptions)
    # run-level keys flow into both trainers
    assert cfg.sft.seed == cfg.rl.seed == 0
    assert cfg.sft.wandb_mode == cfg.rl.wandb_mode == "offline"
    # RL samples at temperature 1.5 with the task's reward; evaluation is greedy with the same lengths
    assert cfg.rl.rewards == cfg.task.rewards
    assert cfg.rl.rollout.temperature == 1.5 and cfg.rollout.temperature == 0.0
    assert cfg.rl.rollout.gen_length == cfg.rollout.gen_length
    assert cfg.task.num_test == 256


def test_top_level_overrides_reach_every_stage():
    cfg = load_config(["seed=3", "resume=true", "logger.wandb.mode=disabled", "sft.max_steps=7",
                       "rl.max_steps=5", "run_dir=/tmp/x"])
    assert (cfg.seed, cfg.sft.seed, cfg.rl.seed) == (3, 3, 3)
    assert cfg.sft.resume and cfg.rl.resume
    assert cfg.sft.wandb_mode == cfg.rl.wandb_mode == "disabled"
    assert (cfg.sft.max_steps, cfg.rl.max_steps) == (7, 5)
    assert cfg.run_dir == "/tmp/x"


BAD_OVERRIDES = [
    ("rl.lr=abc", "rl.lr=abc"),
    ("trainer.lr=abc", "did you mean sft.lr or rl.lr"),
    ("recipe=nope", "recipe is one of: distill, dpo, eval, grpo, sft, sft_grpo_distill, sft_then_grpo, unmask_order"),
    ("sft.max_stepz=3", "sft.max_stepz: unknown key; did you mean sft.max_steps"),
    ("seed=x", "could not be converted to Integer"),
    ("+rl.bogus=1", "rl.bogus: unknown key"),
    ("task.name=foo", "task.name='foo': not allowed; expected one of"),
    ("rl.rollout.remasking=lowconf", "rl.rollout.remasking='lowconf': not allowed; expected one of: low_confidence,"),
    ("rl.deepspeed=zero9", "rl.deepspeed='zero9': not allowed"),
    ("rl.num_generations=1", "rl.num_generations=1: must be >= 2"),
    ("rollout.block_length=5", "must be a positive multiple of block_length=5"),
    ("rl.beta=-0.5", "rl.beta=-0.5: must be >= 0"),
    ("rl.epsilon=-1", "rl.epsilon=-1.0: must be >= 0"),
    ("sft.lr=0", "sft.lr=0.0: must be > 0"),
    ("rl.max_steps=0", "rl.max_steps=0: must be >= 1"),
    ("rl.estimator=nope", "rl.estimator='nope': unknown estimator 'nope' (registered: block_d2_stepmerge, block_mc_elbo, "
                          "block_mean_field, block_tracerl, coupled, d2_stepmerge, espo, mc_elbo, mc_elbo_ll, mean_field"),
    ("rl.estimator_options={foo: 1}", "estimator 'mean_field': unknown option(s) ['foo']"),
    ("rl.objective=difu_grpo", "rl.objective='difu_grpo': unknown objective 'difu_grpo'; did you mean 'diffu_grpo'?"),
    ("rl.objective_options={foo: 1}", "objective 'diffu_grpo': unknown option(s) ['foo']"),
    ("rl.loss_type=dapoo", "rl.loss_type='dapoo': unknown loss_type 'dapoo'; did you mean 'dapo'?"),
    ("rl.advantage=grup", "rl.advantage='grup': unknown advantage estimator 'grup'; did you mean 'group'?"),
    ("rl.scale_rewards=groups", "rl.scale_rewards='groups': expected one of group, batch, none (or true/false)"),
    ("rl.epsilon_high=0", "rl.epsilon_high=0.0: must be > 0"),
    ("task.rewards={sudok: 1.0}", "task.rewards: unknown reward 'sudok'"),
    ("task.rewards={sudoku: abc}", "task.rewards.sudoku='abc': must be a finite number"),
    ("task.accuracy_reward=nope", "task.accuracy_reward: unknown reward 'nope'"),
    ("task.num_val=-1", "task.num_val=-1: must be >= 0"),
    ("trainer@rl=sft", "rl: recipe sft_grpo_distill runs DiffuGRPOConfig at this stage but got a SFTConfig; "
                       "select trainer@rl=<diffu_grpo or diffu_grpo_d1>"),
    ("recipe=dpo rl.optimal_allocation=false rl.estimator=coupled", "needs estimator mc_elbo or mc_elbo_ll"),
    ("task.rewards={sudoku: 1.0", "bad override syntax"),
    ("task.rewards=sudoku", "task.rewards='sudoku': expected a dict"),
    ("eval.tasks=[sudoku4,nope]", "eval.tasks[]='nope': not allowed"),
    ("eval.modes={fast: {treshold: 0.9}}", "eval.modes.fast: unknown rollout option(s) ['treshold']"),
    ("model.family=llada", "model.path: required for family='llada'"),
    ("logger.wandb.mode=on", "logger.wandb.mode='on': not allowed"),
    ("eval.protocol=d2", "eval.protocol='d2': not allowed; expected one of: ours, d1"),
    ("eval.protocol=d1 task=humaneval", "eval.protocol=d1: evaluates d1's tasks only"),
    ("task@sft_task=nope", "task@sft_task=nope: no such option; task is one of:"),
    ("sft.example_format=d2", "sft.example_format='d2': not allowed; expected one of: d1, generation_prompt"),
    ("rl.max_prompt_length=0", "rl.max_prompt_length=0: must be >= 1"),
    ("rl.per_device_batch_size=4", "rl.per_device_batch_size: unknown key"),  # GRPO counts prompts: per_device_prompts
    ("recipe=unmask_order rl.rollout.threshold=0.9", "rl.rollout.threshold=0.9: the order learner needs"),
    ("recipe=unmask_order rl.lora.enabled=true", "rl.lora.enabled: LoRA adapts the dLLM, which the order learner "
                                                 "trains only with train_dllm=true"),
    ("rl.reward_weights=[1.0]", "rl.reward_weights: weighs a Python trainer's reward_funcs"),
    ("rl.rewards={format_soft: 1.0}", "rl.rewards={'format_soft': 1.0}: recipes score with the task's rewards"),
]


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES)
def test_bad_overrides_raise_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides.split(" ") if "{" not in overrides else [overrides])
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg and "None" not in msg.split(":")[-1]


def test_python_api_configs_validate_in_post_init():
    """No Hydra needed: the dataclasses themselves reject bad values."""
    from recipes.schema import RecipeConfig, TaskConfig

    for make, expected in [(lambda: DiffuGRPOConfig(beta=-1.0), "beta=-1.0: must be >= 0"),
                           (lambda: DiffuGRPOConfig(estimator="nope"), "estimator='nope'"),
                           (lambda: DiffuGRPOConfig(rewards={"sudok": 1.0}), "unknown reward 'sudok'"),
                           (lambda: SFTConfig(eps=0.0), "eps=0.0: must be > 0"),
                           (lambda: RolloutOptions(gen_length=10, block_length=4), "multiple of block_length=4"),
                           (lambda: RolloutOptions(kv_cache="prefix", cache_lookahead=16), "cache_lookahead=16: only"),
                           (lambda: RolloutOptions(kv_cache="dual", cache_lookahead=-1), "cache_lookahead=-1: must"),
                           (lambda: TaskConfig(name="nope"), "name='nope': not allowed"),
                           (lambda: RunConfig(recipe=RecipeConfig(name="grpo"), rl=SFTConfig()),
                            "rl: recipe grpo runs DiffuGRPOConfig")]:
        with pytest.raises(ConfigError) as err:
            make()
        assert expected in str(err.value)


def test_every_task_composes_exactly_its_yaml_rewards():
    """The schema default never merges into a task file's rewards (task=gsm8k is gsm8k alone)."""
    from omegaconf import OmegaConf

    from rl.tasks import TASKS

    for option in group_options("task"):
        spec = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "task" / f"{option}.yaml"))
        cfg = load_config([f"task={option}"] + (["task.path=data.jsonl"] if option == "local" else []))
        assert cfg.task.rewards == spec["rewards"], option
        assert cfg.task.accuracy_reward == spec["accuracy_reward"], option
        assert cfg.rl.rewards == spec["rewards"], option  # the GRPO stage gets the same spec
        variant = option != spec["name"]  # <task>_d1: d1's rewards for that task, our accuracy check
        if option != "local" and not variant:  # the registered defaults say the same as the file
            assert TASKS[option].rewards == spec["rewards"] and TASKS[option].accuracy_reward == spec["accuracy_reward"]
        if variant:
            assert option == f"{spec['name']}_d1" and spec["prompt_style"] == "d1" and all(name.startswith("d1_") for name in spec["rewards"])
            assert spec["accuracy_reward"] == TASKS[spec["name"]].accuracy_reward


def test_registries_and_config_groups_agree():
    """Recipes, tasks and trainer options are derived from registries; the YAML groups match them."""
    from recipes.pipeline import PIPELINES
    from recipes.schema import RECIPES, TRAINER_SCHEMAS, trainer_options
    from rl.tasks import TASKS

    assert sorted(RECIPES) == group_options("recipe")
    # every registered task has its file; <task>_d1 files are d1's variants of registered tasks
    assert sorted(TASKS) == [o for o in group_options("task") if not o.endswith("_d1")]
    assert all(o[:-3] in TASKS for o in group_options("task") if o.endswith("_d1"))
    assert set(PIPELINES) == {name for name, stages in RECIPES.items() if stages}
    assert sorted(trainer_options(list(TRAINER_SCHEMAS))) == group_options("trainer")
    from rollout.remasking import REMASKING

    assert RolloutOptions().remasking in REMASKING  # the one value RolloutOptions does not look up


def test_main_exits_2_with_one_line_on_stderr(capsys):
    assert main(["trainer.lr=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dllm-rl: config error: trainer.lr")
    assert main(["recipe=nope"]) == 2
    assert "recipe=nope: no such option" in capsys.readouterr().err
    assert main(["task.rewards={sudoku: 1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "None" not in err and "bad override syntax" in err


def test_malformed_code_rows_stop_at_preflight(tmp_path, capsys):
    """A code task whose `tests` column is a string (not a list of asserts) stops before any model
    is built, with one line naming the split, row and column (rewards.code.check_code_rows)."""
    import json

    data = tmp_path / "code.jsonl"
    rows = [{"prompt": f"def f{i}(x):", "tests": ["assert f(1) == 1"]} for i in range(3)]
    rows[2]["tests"] = "assert f(1) == 1"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["recipe=eval", "task=local", f"task.path={data}", "task.rewards={code: 1.0}",
                 "task.accuracy_reward=code", "task.num_test=3", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "test split" in err and "column 'tests'" in err and "row" in err, err


def test_cli_error_path_does_not_import_torch():
    """The config error path stays light (the < 5 s promise): no torch/deepspeed import."""
    code = ("import sys; from recipes.__main__ import main; rc = main(['rl.lr=abc']); "
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr


def test_cfg_flag_prints_the_composed_config(capsys):
    assert main(["--cfg", "rl.max_steps=11"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 11" in out and "recipe:" in out


def test_recipe_groups_select_their_trainer():
    assert load_config(["recipe=dpo"]).rl.__class__.__name__ in ("DPOConfig", "TrainerConfig")
    assert not isinstance(load_config(["recipe=dpo"]).rl, DiffuGRPOConfig)
    assert load_config(["recipe=sft"]).recipe.name == "sft"
    ev = load_config(["recipe=eval", "eval.tasks=[sudoku4,countdown]", "eval.gen_lengths=[128,256]"])
    assert ev.eval.tasks == ["sudoku4", "countdown"] and ev.eval.gen_lengths == [128, 256]


def test_every_group_option_composes():
    for group, key in (("model", "model"), ("task", "task"), ("rollout", "rollout"), ("recipe", "recipe")):
        for option in group_options(group):
            overrides = [f"{group}={option}"]
            if option == "local":
                overrides.append("task.path=data.jsonl")
            if group == "model" and option != "tiny":  # bf16 weights train with DeepSpeed's bf16 (fp32 master)
                overrides += ["sft.bf16=true", "rl.bf16=true", "distill.bf16=true"]
            cfg = load_config(overrides)
            assert getattr(cfg, key) is not None
    for option in group_options("trainer"):
        if option.startswith("sft"):
            assert isinstance(load_config([f"trainer@sft={option}"]).sft, SFTConfig)


def test_trado_math_carries_dllm_rl_settings():
    """Config drift guard for experiment=trado_math against Gen-Verse/dLLM-RL's configs/rl_trado.yaml
    (commit 10b4fd1): its rollout, TraceRL and optimizer values, as that file writes them."""
    cfg = load_config(["experiment=trado_math"])
    assert (cfg.model.name, cfg.model.path, cfg.model.family, cfg.model.mask_token_id) == (
        "trado_8b_instruct", "Gen-Verse/TraDo-8B-Instruct", "auto", 151669)
    assert cfg.recipe.name == "grpo" and cfg.task.name == "math500" and cfg.task.prompt_style == "boxed"
    ro = cfg.rl.rollout  # rollout: block_size 4, denoising_steps_per_block 4, max_token 2000, dynamic 0.9, T 1.0
    assert (ro.block_length, ro.gen_length, ro.steps // (ro.gen_length // ro.block_length)) == (4, 2000, 4)
    assert (ro.threshold, ro.temperature, cfg.rollout.temperature) == (0.9, 1.0, 0.0)
    rl = cfg.rl  # training: TraceRL, shrink 1, eps 0.2, beta 0.01 (k3), lr 1e-6, 64 tasks x 16 on 8 GPUs, 80 steps
    assert rl.objective == "tracerl" and dict(rl.objective_options) == {"shrink": 1, "beta_old": 0.01,
                                                                         "use_kl_estimator_k3": True}
    assert (rl.epsilon, rl.beta, rl.lr, rl.weight_decay, tuple(rl.adam_betas), rl.max_grad_norm) == (
        0.2, 0.0, 1e-6, 0.0, (0.9, 0.999), 1.0)
    assert (rl.per_device_prompts * 8, rl.num_generations, rl.num_iterations, rl.max_steps) == (64, 16, 1, 80)
    assert (rl.max_prompt_length, rl.deepspeed, rl.bf16, rl.gradient_checkpointing) == (784, "zero3", True, True)
    assert not rl.lora.enabled
    assert load_config(["experiment=trado_math", "model=sdar_8b_chat"]).model.path == "JetLM/SDAR-8B-Chat"


D1 = dict(lr=3e-6, num_generations=6, epsilon=0.5, beta=0.04, bf16=True, deepspeed="zero2")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")
                                               if not p.stem.startswith("trado")))
def test_real_model_experiments_carry_d1_settings(experiment):
    """Config drift guard for the GPU recipes (instantiated without weights)."""
    cfg = load_config([f"experiment={experiment}"])
    model, task = experiment.split("_", 1)
    assert cfg.model.family == model and cfg.model.path
    assert cfg.model.trust_remote_code == (model == "dream")  # Dream's tokenizer class; both models are ours
    assert cfg.model.dtype == "bfloat16"
    assert cfg.task.name == task and cfg.task.prompt_style == "d1"
    assert cfg.sft_task.name == "s1k" and cfg.recipe.name == "sft_then_grpo" and cfg.recipe.final_eval
    assert cfg.eval.protocol == "d1" and cfg.eval.tasks == [task]
    assert cfg.sft.example_format == "d1" and cfg.sft.max_length == 4096
    assert cfg.sft.lora.enabled and (cfg.sft.lora.r, cfg.sft.lora.alpha) == (128, 256)
    assert cfg.sft.lora.target_modules == ["q_proj", "k_proj", "v_proj"] and cfg.sft.weight_decay == 0.1
    rl = cfg.rl
    assert rl.lora.load_in_4bit and rl.max_prompt_length == 200
    assert isinstance(rl, DiffuGRPOConfig)
    for k, v in D1.items():
        assert getattr(rl, k) == v, (experiment, k)
    assert rl.lora.enabled and (rl.lora.r, rl.lora.alpha) == (128, 64)
    assert rl.estimator == "mean_field" and rl.estimator_options == {"p_mask_prompt": 0.15}
    assert rl.num_iterations == (12 if task in ("gsm8k", "math500") else 8)
    ro = rl.rollout
    assert (ro.gen_length, ro.block_length, ro.steps) == (256, 32, 128)
    assert (cfg.rollout.gen_length, cfg.rollout.block_length, cfg.rollout.steps) == (256, 32, 128)
    assert rl.rewards == cfg.task.rewards
    # the trainer config round-trips as a plain dataclass (what the trainer receives)
    assert dataclasses.replace(rl, run_dir="x").lora.r == 128
