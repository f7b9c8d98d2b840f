"""The registries the RL trainer is built from: objectives, advantage estimators, loss
aggregation (TRL's loss_type names), clipping with epsilon_high, and the config checks that read
them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from rl.advantages import ADVANTAGES, group_advantages, rloo_advantages, scale_rewards_mode
from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
from rl.config import ConfigError, DiffuGRPOConfig
from rl.estimators import ESTIMATORS
from rl.objectives import OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput, clipped_surrogate
from rl.registry import Registry, UnknownName


def test_registry_suggests_close_names_and_refuses_duplicates():
    reg = Registry("thing")
    reg.register(lambda: 1, name="alpha")
    with pytest.raises(UnknownName, match=r"unknown thing 'alpah'; did you mean 'alpha'\? \(registered: alpha\)"):
        reg.lookup("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(lambda: 2, name="alpha")
    assert "did you mean" not in reg.unknown("zzz")


def test_every_estimator_declares_its_level():
    assert {name: cls.level for name, cls in ESTIMATORS.items() if name in ("mean_field", "mc_elbo", "coupled")} == \
        {"mean_field": "token", "mc_elbo": "sequence", "coupled": "sequence"}
    assert all(cls.level in ("token", "sequence") for cls in ESTIMATORS.values())


def test_group_advantages_scale_rewards_modes():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    adv, std = group_advantages(r, 4, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.25, -0.25]))
    torch.testing.assert_close(std, torch.tensor([0.5, 0.2886751]))  # unbiased, as TRL and d1
    grouped, _ = group_advantages(r, 4, scale_rewards="group")
    torch.testing.assert_close(grouped, adv / (std.repeat_interleave(4) + 1e-4))
    batch, _ = group_advantages(r, 4, scale_rewards="batch")
    torch.testing.assert_close(batch, adv / (r.std() + 1e-4))
    assert scale_rewards_mode(True) == "group" and scale_rewards_mode(False) == "none"  # TRL's booleans
    with pytest.raises(ValueError, match="scale_rewards='grp'"):
        scale_rewards_mode("grp")


def test_rloo_is_reward_minus_the_mean_of_the_others():
    r = torch.tensor([1.0, 0.0, 0.5, 2.0])
    adv, _ = rloo_advantages(r, 4)
    loo = torch.stack([r[i] - torch.cat([r[:i], r[i + 1:]]).mean() for i in range(4)])
    torch.testing.assert_close(adv, loo)
    assert set(ADVANTAGES) == {"group", "rloo"}


MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)


@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_loss_types_match_their_definitions(name):
    """Each aggregation on one micro-batch = the whole batch (TRL's formulas)."""
    loss = torch.arange(12, dtype=torch.float32).view(3, 4)
    counts = BatchCounts(tokens=float(MASK.sum()), rows=3.0, max_len=4, num_micro=1)
    got = (loss * LOSS_TYPES[name](MASK, counts)).sum()
    masked = loss * MASK
    expected = {
        "dapo": masked.sum() / MASK.sum(),
        "bnpo": masked.sum() / MASK.sum(),
        "grpo": (masked.sum(1) / MASK.sum(1)).mean(),
        "dr_grpo": masked.sum() / (3 * 4),
        "seq_mean_token_sum": masked.sum(1).mean(),
    }[name]
    torch.testing.assert_close(got, expected)


def test_bnpo_normalises_each_micro_batch_and_dapo_the_whole_batch():
    """Two micro-batches of unequal token counts: bnpo (d1 / TRL 0.16) averages the two
    micro-batch token means; dapo is the token mean of the whole batch."""
    loss = torch.arange(12, dtype=torch.float32).view(3, 4) ** 2
    counts = BatchCounts(tokens=float(MASK.sum()), rows=3.0, max_len=4, num_micro=2)
    parts = [slice(0, 1), slice(1, 3)]  # 3 and 5 tokens
    bnpo = sum((loss[p] * LOSS_TYPES["bnpo"](MASK[p], counts)).sum() for p in parts)
    d1 = sum((loss[p] * MASK[p]).sum() / MASK[p].sum() for p in parts) / 2
    torch.testing.assert_close(bnpo, d1)
    dapo = sum((loss[p] * LOSS_TYPES["dapo"](MASK[p], counts)).sum() for p in parts)
    torch.testing.assert_close(dapo, (loss * MASK).sum() / MASK.sum())
    assert not torch.isclose(bnpo, dapo)


def test_sequence_losses_spread_over_tokens():
    seq = torch.tensor([1.0, 2.0, 3.0])
    counts = BatchCounts(tokens=float(MASK.sum()), rows=3.0, max_len=4, num_micro=1)
    w = LOSS_TYPES["grpo"](MASK, counts)
    torch.testing.assert_close((per_token(seq, w) * w).sum(), seq.mean())  # mean over sequences
    w = LOSS_TYPES["dapo"](MASK, counts)  # weighted by completion length (SPG's aggregation)
    torch.testing.assert_close((per_token(seq, w) * w).sum(), (seq * MASK.sum(1)).sum() / MASK.sum())


def test_epsilon_high_clips_the_upper_side_only():
    logp, old = torch.log(torch.tensor([1.5, 1.5, 0.5])), torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.5, 0.8]))
    assert clipped.tolist() == [True, False, True]
    sym, _ = clipped_surrogate(logp, old, adv, 0.2)
    torch.testing.assert_close(sym, torch.tensor([-1.2, 1.5, 0.8]))


def test_config_resolves_the_objectives_estimator_and_aggregation():
    cfg = DiffuGRPOConfig()
    assert (cfg.objective, cfg.estimator, cfg.estimator_options, cfg.loss_type) == \
        ("diffu_grpo", "mean_field", {"p_mask_prompt": 0.15}, "dapo")
    cfg = DiffuGRPOConfig(estimator="mc_elbo")  # a sequence-level estimate: mean over sequences
    assert (cfg.estimator_options, cfg.loss_type, cfg.advantage) == ({}, "grpo", "group")
    cfg = DiffuGRPOConfig(estimator_options={"p_mask_prompt": 0.3})  # over the objective's own estimator
    assert (cfg.estimator, cfg.estimator_options) == ("mean_field", {"p_mask_prompt": 0.3})
    assert DiffuGRPOConfig(loss_type="bnpo", scale_rewards=True).scale_rewards == "group"


@dataclass
class _NoKL(Objective):
    name: ClassVar[str] = "test_no_kl"
    estimators: ClassVar[tuple[str, ...]] = ("mean_field",)
    supports_kl: ClassVar[bool] = False
    scale: float = 1.0

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        return PolicyLossOutput(-self.scale * inp.adv() * inp.logp)


def test_config_checks_what_an_objective_accepts():
    OBJECTIVES.register(_NoKL)
    try:
        cfg = DiffuGRPOConfig(objective="test_no_kl", beta=0.0, objective_options={"scale": 2.0})
        assert cfg.estimator == "mean_field"
        with pytest.raises(ConfigError, match="beta=0.04: objective 'test_no_kl' has no KL term"):
            DiffuGRPOConfig(objective="test_no_kl", beta=0.04)
        with pytest.raises(ConfigError, match="estimator='mc_elbo': objective 'test_no_kl' takes mean_field"):
            DiffuGRPOConfig(objective="test_no_kl", beta=0.0, estimator="mc_elbo")
        with pytest.raises(ConfigError, match=r"unknown option\(s\) \['scael'\]; it takes \['scale'\]"):
            DiffuGRPOConfig(objective="test_no_kl", beta=0.0, objective_options={"scael": 2.0})
    finally:
        del OBJECTIVES["test_no_kl"]
    # a trajectory estimator set apart from its objective's options: refused when the config is built
    with pytest.raises(ConfigError, match="the objective has N=8.*the estimator N=4.*rl.objective_options only"):
        DiffuGRPOConfig(objective="d2_stepmerge", estimator_options={"N": 4})
    assert DiffuGRPOConfig(objective="d2_stepmerge", objective_options={"N": 4}).estimator_options["N"] == 4


def test_help_lists_the_registries(capsys):
    from recipes.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key, registry in (("objective", OBJECTIVES), ("estimator", ESTIMATORS), ("loss_type", LOSS_TYPES),
                          ("advantage", ADVANTAGES)):
        line = next(line for line in out.splitlines() if line.strip().startswith(key + " "))
        assert all(name in line for name in registry), line


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_runs_the_default_recipe(tmp_path, objective):
    """``dllm-rl rl.objective=<name>``: the default SFT-then-RL recipe (tiny model, Sudoku) with each
    registered objective and its own estimator, aggregation and advantage, scaled down."""
    import json

    from recipes.__main__ import main
    from test_recipes import SMALL

    run_dir = tmp_path / objective
    assert main([*SMALL, f"run_dir={run_dir}", f"rl.objective={objective}", "rl.num_iterations=2",
                 "logger.wandb.mode=disabled", "recipe.plot=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    train = summary["rl"]["train"]
    assert all(torch.isfinite(torch.tensor(train[k])) for k in ("loss", "grad_norm")), train
    assert 0 <= summary["rl"]["eval/accuracy"] <= 1
    steps = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in s for s in steps) == 3  # every RL step logged its loss


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_passes_per_draw_bounds_the_draws_passes(name):
    """What the memory plan sizes by: the K of a draw (equal for mask estimators, an upper bound for
    the trajectory ones, whose K depends on the trace)."""
    from rl.estimators import get_estimator

    b, p, l, steps = 3, 4, 8, 8
    attn = torch.ones(b, p + l, dtype=torch.long)
    cmask = torch.ones(b, l, dtype=torch.long)
    est = get_estimator(name, **({"block_length": 4} if name == "spg" else
                                 {"model_block_length": 4} if name.startswith("block_") else {}))
    trace = {"trace": torch.arange(l).expand(b, l), "num_steps": steps} if est.needs_trace else {}
    k = est.draw(attn, cmask, p, torch.Generator().manual_seed(0), **trace).num_passes
    bound = est.passes_per_draw(steps)
    assert k == bound if not est.needs_trace else 1 <= k <= bound


def test_every_objective_has_a_reference_check():
    """scripts/check_objectives_reference.py names each objective's check module and authors'
    repository; a newly registered objective without one fails here."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_objectives_reference.py"
    spec = importlib.util.spec_from_file_location("check_objectives_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.CHECKS) == set(OBJECTIVES)
    for module, _, fixture in mod.CHECKS.values():
        assert (path.parent / "objective_refs" / f"{module}.py").is_file()
        assert (path.parents[1] / "tests" / "fixtures" / "objectives" / fixture).is_file()
