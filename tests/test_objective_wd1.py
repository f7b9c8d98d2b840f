"""wd1 (rl/objectives/wd1.py): equality with the authors' recorded numbers, the weights' properties,
the paper's grouping vs the authors' micro-batch softmax, and short runs through DiffuGRPOTrainer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import rl.objectives.wd1  # noqa: F401  (registers "wd1" until rl/objectives/__init__.py imports it)
from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
from rl.objectives import PolicyLossInputs, get_objective
from rl.objectives.wd1 import WD1, softmax_weights

FIXTURE = Path(__file__).parent / "fixtures" / "objectives" / "wd1.json"


def _loss(obj: WD1, logp: torch.Tensor, adv: torch.Tensor, g: int, micro: int | None = None) -> torch.Tensor:
    """The trainer's path on precomputed sequence terms: prepare on the batch, loss per micro-batch,
    the objective's aggregation over the batch."""
    n = logp.shape[0]
    mask = torch.ones(n, 3, dtype=logp.dtype)
    extra = obj.prepare(adv, adv, g)
    counts = BatchCounts(tokens=float(mask.sum()), rows=float(n), max_len=3, num_micro=1)
    agg = LOSS_TYPES.lookup(obj.default_loss_type("token"))
    total = logp.new_zeros(())
    for s in range(0, n, micro or n):
        sl = slice(s, s + (micro or n))
        out = obj.loss(PolicyLossInputs(logp=logp[sl], old_logp=logp[sl].detach(), ref_logp=None,
                                        advantages=adv[sl], mask=mask[sl], rows={k: v[sl] for k, v in extra.items()}))
        w = agg(mask[sl], counts)
        total = total + (per_token(out.loss, w) * w).sum()
    return total


def _authors_formula(logp: torch.Tensor, adv: torch.Tensor, per_call: int, negative: bool = True) -> torch.Tensor:
    """The authors' compute_loss written out (sum over a call's rows), averaged over calls."""
    losses = []
    for s in range(0, logp.shape[0], per_call):
        a, lp = adv[s:s + per_call], logp[s:s + per_call]
        loss = -(lp * torch.softmax(a, 0)).sum()
        if negative:
            loss = loss + (lp * torch.softmax(-a, 0)).sum()
        losses.append(loss)
    return torch.stack(losses).mean()


# ---- recorded authors' numbers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def ref_model():
    from scripts.objective_refs.wd1 import build_model

    return build_model()


@pytest.mark.parametrize("case", ["group", "micro_batch", "positive_only"])
def test_matches_the_authors_compute_loss(recorded, ref_model, case):
    """Loss, per-sequence terms and gradients of the authors' compute_loss (recorded by
    scripts/objective_refs/wd1.py from their checkout) on the same model, masks and advantages."""
    from scripts.objective_refs import wd1 as ref

    tok, model = ref_model
    c = recorded["cases"][case]
    inp = {"input_ids": torch.tensor(recorded["input_ids"]),
           "completion_mask": torch.tensor(recorded["completion_mask"]),
           "rewards": torch.tensor(recorded["rewards"], dtype=torch.float64)}
    built = ref.build_inputs(tok)
    assert torch.equal(built["input_ids"], inp["input_ids"])  # the script's inputs are the recorded ones
    adv = torch.tensor(recorded["advantages"], dtype=torch.float64)
    masked = torch.tensor(c["masked"], dtype=torch.bool)[None]
    loss, seq, grads = ref.our_loss(model, inp, adv, masked, tok.mask_token_id, micro_batch=c["micro_batch"],
                                    **c["options"])
    assert loss == pytest.approx(c["authors_loss"], rel=1e-9, abs=1e-12)
    assert torch.allclose(seq, torch.tensor(c["authors_seq"], dtype=seq.dtype), rtol=1e-10, atol=1e-12)
    g = c["authors_grad"]
    norm = float(torch.sqrt(sum((v ** 2).sum() for v in grads.values())))
    assert norm == pytest.approx(g["norm"], rel=1e-9)
    for name, values in g["slices"].items():
        got = grads[name].flatten()[:len(values)]
        assert torch.allclose(got, torch.tensor(values, dtype=got.dtype), rtol=1e-8, atol=1e-12), name


def test_recorded_grouping_difference(recorded):
    """Two groups in one micro-batch: the authors' softmax over both differs from the paper's."""
    info = recorded["info_two_groups"]
    assert abs(info["authors_loss"] - info["group_loss"]) > 0.1


# ---- weights and loss ----------------------------------------------------------------------------
def test_weights_are_group_softmaxes_scaled_to_mean_one():
    adv = torch.tensor([0.5, -0.5, 0.0, 1.0, 1.0, 1.0])
    w_pos, w_neg = softmax_weights(adv, 3)
    assert torch.allclose(w_pos[:3], 3 * torch.softmax(adv[:3], 0))
    assert torch.allclose(w_neg[:3], 3 * torch.softmax(-adv[:3], 0))
    assert torch.allclose(w_pos.view(2, 3).mean(1), torch.ones(2))
    assert torch.equal(w_pos[3:], torch.ones(3)) and torch.equal(w_neg[3:], torch.ones(3))  # equal A: uniform
    with pytest.raises(ValueError, match="groups of 4"):
        softmax_weights(adv, 4)


def test_group_softmax_of_centred_advantages_is_that_of_rewards():
    """softmax is shift-invariant: the weights of r - mean(r) are those of r (group-wise only)."""
    from rl.advantages import group_advantages

    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.25])
    adv, _ = group_advantages(r, 3)
    assert torch.allclose(softmax_weights(adv, 3)[0], softmax_weights(r, 3)[0])
    assert not torch.allclose(softmax_weights(adv)[0], softmax_weights(r)[0])  # across groups it is not


def test_loss_is_the_authors_weighted_sum_averaged_over_groups():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(12, generator=g, dtype=torch.float64) * 20
    adv = torch.randn(12, generator=g, dtype=torch.float64)
    for negative in (True, False):
        obj = WD1(negative=negative)
        expect = _authors_formula(logp, adv, 6, negative)
        assert float(_loss(obj, logp, adv, 6)) == pytest.approx(float(expect), rel=1e-12)
        for micro in (2, 4, 12):  # the paper's grouping does not depend on the micro-batch size
            assert float(_loss(obj, logp, adv, 6, micro)) == pytest.approx(float(expect), rel=1e-12)


def test_micro_batch_option_is_the_authors_softmax_over_the_rows_handed_in():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(12, generator=g, dtype=torch.float64) * 20
    adv = torch.randn(12, generator=g, dtype=torch.float64)
    obj = WD1(softmax_over="micro_batch")
    for micro in (6, 12, 4):
        assert float(_loss(obj, logp, adv, 6, micro)) == pytest.approx(float(_authors_formula(logp, adv, micro)),
                                                                       rel=1e-12)
    # micro-batch = group: the two groupings agree; two groups per micro-batch: they do not
    assert float(_loss(obj, logp, adv, 6, 6)) == pytest.approx(float(_loss(WD1(), logp, adv, 6)), rel=1e-12)
    assert abs(float(_loss(obj, logp, adv, 6, 12)) - float(_loss(WD1(), logp, adv, 6))) > 1e-3


def test_gradient_raises_the_best_and_lowers_the_worst_completion():
    logp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    _loss(WD1(), logp, adv, 4).backward()
    grad = logp.grad
    assert grad[0] < 0 < grad[2]  # descent raises log pi of A > 0, lowers it for A < 0
    assert grad[1] == pytest.approx(0.0, abs=1e-12) and grad[3] == pytest.approx(0.0, abs=1e-12)  # w+ = w- at A = 0
    logp.grad = None
    _loss(WD1(), logp, torch.zeros(4, dtype=torch.float64), 4).backward()  # zero-variance group: no signal
    assert torch.equal(logp.grad, torch.zeros(4, dtype=torch.float64))


def test_group_mode_needs_prepare():
    obj = WD1()
    inp = PolicyLossInputs(logp=torch.zeros(3), old_logp=torch.zeros(3), ref_logp=None, advantages=torch.zeros(3),
                           mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="prepare"):
        obj.loss(inp)


def test_options_and_config():
    from rl.config import ConfigError, DiffuGRPOConfig

    obj = get_objective("wd1")
    assert (obj.softmax_over, obj.negative, obj.uses_old, obj.supports_kl) == ("group", True, False, False)
    with pytest.raises(ValueError, match="softmax_over"):
        get_objective("wd1", softmax_over="batch")
    cfg = DiffuGRPOConfig(run_dir="/tmp/unused", objective="wd1", beta=0.0)
    assert (cfg.estimator, cfg.estimator_options, cfg.loss_type) == ("mean_field", {"p_mask_prompt": 0.15}, "grpo")
    with pytest.raises(ConfigError, match="beta"):
        DiffuGRPOConfig(run_dir="/tmp/unused", objective="wd1", beta=0.04)
    with pytest.raises(ConfigError, match="softmax_over"):
        DiffuGRPOConfig(run_dir="/tmp/unused", objective="wd1", beta=0.0, objective_options={"softmax_over": "x"})


# ---- through the trainer -------------------------------------------------------------------------
def _trainer(run_dir: str, *, micro_batch_size: int = 8, objective_options: dict | None = None,
             estimator: str | None = None, max_steps: int = 3, lr: float = 3e-3):
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer
    from rollout import build_tiny_policy
    from tests.helpers.toy_grpo import target_char_reward

    policy = build_tiny_policy(seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128)
    cfg = DiffuGRPOConfig(
        run_dir=run_dir, seed=0, max_steps=max_steps, lr=lr, per_device_prompts=4, num_generations=4,
        num_iterations=2, beta=0.0, objective="wd1", objective_options=objective_options or {}, estimator=estimator,
        rollout=RolloutOptions(gen_length=8, block_length=8, steps=8, temperature=1.0), sample_table_every=0,
        export_hf=False, micro_batch_size=micro_batch_size, max_grad_norm=1.0,
    )
    rows = [{"prompt": f"{i:03d}"} for i in range(16)]
    return DiffuGRPOTrainer(cfg, policy, rows, reward_funcs=[target_char_reward])


def test_short_training_run_updates_the_weights(tmp_path):
    trainer = _trainer(str(tmp_path / "run"))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    last = trainer.train()
    assert trainer.objective.name == "wd1" and trainer.config.loss_type == "grpo"
    for key in ("loss", "grad_norm", "reward", "reward_std"):
        assert key in last, key
    assert torch.isfinite(torch.tensor(float(last["loss"]))) and float(last["grad_norm"]) > 0
    assert float(last["kl"]) == 0.0 and float(last["clip_ratio/region_mean"]) == 0.0  # no KL, no ratio
    moved = sum(float((v.detach() - before[k]).abs().max()) for k, v in trainer.model.named_parameters())
    assert moved > 0


def test_trainer_loss_matches_the_authors_formula_and_ignores_micro_batch_size(tmp_path):
    """policy_update on one rollout: the group weights give the same loss and gradient for any
    micro-batch size; the authors' micro-batch softmax changes when a micro-batch holds 2 groups."""
    first = _trainer(str(tmp_path / "ro"), micro_batch_size=16, max_steps=1)
    ro = first.rollout(first.train_dataset[:4])
    mask = torch.zeros_like(ro.completion_mask)
    mask[:, :3], mask[::3, :] = 1, 1  # unequal completion lengths
    ro = dataclasses.replace(ro, completion_mask=mask)
    adv = torch.tensor([1.0, 0.0, -0.5, -0.5, 0.2, 0.2, -0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, -1.0, 0.0])
    out = {}
    for opt in ("group", "micro_batch"):
        for micro in (16, 8, 4):
            t = _trainer(str(tmp_path / f"{opt}{micro}"), micro_batch_size=micro, max_steps=1,
                         objective_options={"softmax_over": opt})
            m = t.policy_update(ro, adv)
            out[opt, micro] = (float(m["loss"]), float(m["grad_norm"]))
    for micro in (8, 4):
        assert out["group", micro] == pytest.approx(out["group", 16], rel=1e-4)
    assert out["micro_batch", 4] == pytest.approx(out["group", 4], rel=1e-4)  # micro-batch = group
    assert abs(out["micro_batch", 16][0] - out["group", 16][0]) > 1e-3  # 4 groups in one softmax


def test_sequence_level_estimator_runs(tmp_path):
    trainer = _trainer(str(tmp_path / "elbo"), estimator="mc_elbo", max_steps=1)
    assert trainer.config.loss_type == "grpo"
    last = trainer.train()
    assert torch.isfinite(torch.tensor(float(last["loss"])))
