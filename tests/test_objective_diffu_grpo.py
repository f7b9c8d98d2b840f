"""diffu-GRPO (d1, Zhao et al. 2025, Eq. 3): our objective against d1's recorded numbers
(tests/fixtures/objectives/diffu_grpo.json, written by scripts/objective_refs/diffu_grpo.py from d1's
own code), its properties, and short runs through rl.grpo.DiffuGRPOTrainer. No checkout needed."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch

import rl.objectives.diffu_grpo  # noqa: F401  (registers the objective before the package does)
from rl.advantages import STD_EPS, group_advantages
from rl.aggregation import LOSS_TYPES
from rl.estimators import MaskSample, MeanField
from rl.objectives import PolicyLossInputs, get_objective

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "objectives" / "diffu_grpo.json").read_text())
RTOL = 1e-5  # d1's token log-probs are float32


def _load_scenario():
    """The check's scenario builders (our side only; d1 is loaded there only inside check())."""
    spec = importlib.util.spec_from_file_location("objective_ref_diffu_grpo",
                                                  ROOT / "scripts" / "objective_refs" / "diffu_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load_scenario()


def _close(ours, theirs, rtol: float = RTOL) -> None:
    a, b = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert a.shape == b.shape
    tol = rtol * max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= tol, (a, b)


def _grads_close(grads: list[torch.Tensor], recorded: dict) -> None:
    summary = S.grad_summary(grads)
    _close(summary["norm"], recorded["norm"])
    _close(summary["proj"], recorded["proj"])


@pytest.fixture(scope="module")
def scene():
    model = S.build_model(torch.float64)
    ids = torch.tensor(FIXTURE["input_ids"])
    cmask = torch.tensor(FIXTURE["completion_mask"])
    assert torch.equal(ids, torch.cat([S.scenario_batch()["prompt_ids"], S.scenario_batch()["completion_ids"]], 1))
    return {"model": model, "ids": ids, "attn": torch.ones_like(ids), "cmask": cmask,
            "masks": [S.from_bits(m) for m in FIXTURE["masks"]], "micro_masks": S.from_bits(FIXTURE["micro_masks"]),
            "adv": torch.tensor(FIXTURE["d1_advantages"]), "params": list(model.parameters()),
            "off_old": torch.tensor(FIXTURE["old_offset"]), "off_ref": torch.tensor(FIXTURE["ref_offset"])}


# ---------------------------------------------------------------------------- equality with d1 (fixture)


def test_token_logprobs_match_d1(scene):
    """MeanField.score/combine on d1's masks == d1's _get_per_token_logps (one pass per mask seed)."""
    d1 = torch.tensor(FIXTURE["d1_logps"])
    valid = scene["cmask"].bool()
    for k, masked in enumerate(scene["masks"]):
        ours = S.our_logps(scene["model"], scene["ids"], scene["attn"], masked, scene["cmask"],
                           scene["model"].mask_token_id).detach()
        _close(ours[valid], d1[k][valid])
        assert (ours[~valid] == 0).all()  # not scored after the first EOS (d1 scores them, then masks them out)


def test_loss_grad_and_kl_one_micro_batch_match_d1(scene):
    """d1's compute_loss (its mask seed index 1, the same old / reference log-probs) == DiffuGRPO.loss
    with bnpo (and with dapo: one micro-batch is the whole batch), gradient w.r.t. every weight too."""
    d1 = torch.tensor(FIXTURE["d1_logps"])
    old, ref = (d1[1] + scene["off_old"]).float(), (d1[1] + scene["off_ref"]).float()
    logp = S.our_logps(scene["model"], scene["ids"], scene["attn"], scene["masks"][1], scene["cmask"],
                       scene["model"].mask_token_id)
    one = S.counts_of(scene["cmask"], 1)
    loss, metrics = S.our_loss(logp, old, ref, scene["adv"], scene["cmask"], "bnpo", one)
    _close(loss.detach(), FIXTURE["d1_loss_one"])
    _close(metrics["kl"], FIXTURE["d1_kl_one"])
    _grads_close(torch.autograd.grad(loss, scene["params"], retain_graph=True), FIXTURE["d1_grad_one"])
    dapo, _ = S.our_loss(logp, old, ref, scene["adv"], scene["cmask"], "dapo", one)
    _close(dapo.detach(), FIXTURE["d1_loss_one"])
    # the clip metric is not d1's: d1 counts ratio*A < clip(ratio)*A (the *unclipped* branch wins,
    # TRL 0.16's definition); ours counts where the clipped branch is the active one
    assert abs(float(metrics["clip"]) - FIXTURE["d1_clip_ratio_one"]) > 1e-3


def test_two_unequal_micro_batches_bnpo_matches_d1_dapo_does_not(scene):
    """d1 normalises each micro-batch by its own token count (TRL 0.16): bnpo reproduces its loss
    and gradient; our default dapo (global token mean) differs when the micro-batches' lengths differ."""
    cmask, adv = scene["cmask"], scene["adv"]
    d1_lp = torch.tensor(FIXTURE["d1_logps_micro"])
    halves = [slice(0, 4), slice(4, 8)]
    two = S.counts_of(cmask, 2)
    for loss_type in ("bnpo", "dapo"):
        total, grads = 0.0, None
        for sl in halves:
            logp = S.our_logps(scene["model"], scene["ids"][sl], scene["attn"][sl], scene["micro_masks"][sl],
                               cmask[sl], scene["model"].mask_token_id)
            old, ref = (d1_lp[sl] + scene["off_old"][sl]).float(), (d1_lp[sl] + scene["off_ref"][sl]).float()
            loss, _ = S.our_loss(logp, old, ref, adv[sl], cmask[sl], loss_type, two)
            g = torch.autograd.grad(loss, scene["params"])
            total = total + loss.detach()
            grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
        if loss_type == "bnpo":
            _close(total, FIXTURE["d1_loss_two"])
            _grads_close(grads, FIXTURE["d1_grad_two"])
        else:
            _close(total, FIXTURE["dapo_loss_two"])
            assert abs(float(total) - FIXTURE["d1_loss_two"]) > 1e-3


def test_advantages_match_d1():
    """d1's code centres the rewards per group and does NOT divide by the std (its
    _generate_and_score_completions computes the std for logging only): scale_rewards="none"."""
    adv, _ = group_advantages(torch.tensor(FIXTURE["rewards"]), 4)
    _close(adv, FIXTURE["d1_advantages"])
    r6 = torch.tensor(FIXTURE["rewards_g6"])
    adv6, std = group_advantages(r6, 6, scale_rewards="none")
    _close(adv6, FIXTURE["d1_advantages_g6"])
    # reward_std: torch's unbiased std, as d1 logs it
    d1_std = torch.tensor(FIXTURE["d1_std_g6"]).view(-1, 6)[:, 0]
    _close(std, d1_std)
    # scale_rewards="group" divides by that std + 1e-4 (TRL 0.16's form, which d1 dropped)
    scaled, _ = group_advantages(r6, 6, scale_rewards="group")
    _close(scaled * (std.repeat_interleave(6) + STD_EPS), adv6)


def test_trainer_policy_update_first_gradient_matches_d1():
    """rl.grpo.DiffuGRPOTrainer.policy_update with loss_type=bnpo, micro-batch = half the batch, beta
    0.04 against a shifted reference, on d1's masks: the gradient of its first optimizer step ==
    the sum of d1's two compute_loss gradients, each / gradient_accumulation_steps."""
    cmask = torch.tensor(FIXTURE["completion_mask"])
    sample = MaskSample(S.from_bits(FIXTURE["micro_masks"])[None], cmask.float()[None])
    adv = torch.tensor(FIXTURE["d1_advantages"])
    with tempfile.TemporaryDirectory() as tmp:
        grads, metrics, moved = S.trainer_first_gradient([sample] * S.MU, adv, S.REF_SHIFT, tmp)
    _grads_close(grads, FIXTURE["d1_trainer_grad"])
    assert float(moved) > 0  # the optimizer stepped
    for key in ("loss", "kl", "clip_ratio/region_mean", "grad_norm"):
        assert torch.isfinite(torch.as_tensor(metrics[key])).all(), key
    assert float(metrics["kl"]) > 0


# ---------------------------------------------------------------------------- properties


def test_mean_field_masks_the_whole_completion_and_never_padding():
    """d1's estimator: every completion position masked, prompt tokens masked w.p. p_mask_prompt,
    left padding never masked (d1 masks padding too: the quirk is not copied), global RNG untouched."""
    b, p, l = 64, 20, 5
    attn = torch.ones(b, p + l, dtype=torch.long)
    attn[:, :4] = 0
    cmask = torch.ones(b, l, dtype=torch.long)
    cmask[:, 3:] = 0
    state = torch.get_rng_state()
    s = MeanField(p_mask_prompt=0.15).draw(attn, cmask, p, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert s.masked[..., p:].all() and not s.masked[..., :4].any()
    rate = s.masked[..., 4:p].float().mean()
    assert 0.11 < float(rate) < 0.19
    assert torch.equal(s.weights[0], cmask.float())


def test_first_iteration_loss_is_minus_advantage_and_clipped_tokens_pass_no_gradient():
    """Eq. 3 at rho = 1: loss = -A per token (+ beta k3); with rho > 1 + eps and A > 0 the clipped
    branch is active (no gradient); with rho < 1 - eps and A > 0 the unclipped branch wins (gradient A rho)."""
    obj = get_objective("diffu_grpo")
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([0.7])
    out = obj.loss(PolicyLossInputs(logp=logp, old_logp=logp.detach(), ref_logp=None, advantages=adv,
                                    mask=torch.ones(1, 3), epsilon=0.5))
    assert torch.allclose(out.loss, torch.full((1, 3), -0.7))
    old = logp.detach() - torch.tensor([[0.0, 1.0, -1.0]])  # rho = 1, e, 1/e
    out = obj.loss(PolicyLossInputs(logp=logp, old_logp=old, ref_logp=logp.detach() + 0.1, advantages=adv,
                                    mask=torch.ones(1, 3), epsilon=0.5, beta=0.0))
    (g,) = torch.autograd.grad(out.loss.sum(), logp)
    assert g[0, 1] == 0 and out.clipped[0, 1]
    assert torch.allclose(g[0, [0, 2]], -0.7 * torch.exp(torch.tensor([0.0, -1.0])))


def test_bnpo_equals_dapo_on_one_micro_batch_only():
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    one = S.counts_of(mask, 1)
    assert torch.equal(LOSS_TYPES["bnpo"](mask, one), LOSS_TYPES["dapo"](mask, one))
    two = S.counts_of(mask, 2)
    w_bnpo = torch.cat([LOSS_TYPES["bnpo"](mask[:2], two), LOSS_TYPES["bnpo"](mask[2:], two)])
    assert torch.allclose(w_bnpo.sum(), torch.tensor(1.0))  # each half weighs 1/2 whatever its length
    assert not torch.allclose(w_bnpo, LOSS_TYPES["dapo"](mask, two))


def test_short_training_run(tmp_path):
    """One step (mu = 2, beta > 0) of the default objective through DiffuGRPOTrainer.train on the tiny
    model: the weights move, the loss and the metrics are finite."""
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer

    def alternate(completions, **_):  # 1, 0, 1, 0 ...: every group has a non-zero advantage
        return [float(i % 2 == 0) for i in range(len(completions))]

    cfg = DiffuGRPOConfig(run_dir=str(tmp_path / "run"), max_steps=1, lr=1e-2, per_device_prompts=2, num_generations=2,
                          num_iterations=2, beta=0.04, micro_batch_size=2, sample_table_every=0, export_hf=False,
                          wandb_mode="disabled",
                          rollout=RolloutOptions(gen_length=4, block_length=4, steps=4, temperature=1.0))
    trainer = DiffuGRPOTrainer(cfg, S.build_model(torch.float32), [{"prompt": f"{i:02d}"} for i in range(4)],
                               reward_funcs=[alternate])
    assert trainer.config.objective == "diffu_grpo" and trainer.config.loss_type == "dapo"
    assert trainer.config.estimator == "mean_field" and trainer.config.estimator_options == {"p_mask_prompt": 0.15}
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    last = trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    for key in ("loss", "kl", "clip_ratio/region_mean", "grad_norm", "reward", "reward_std"):
        assert key in last and torch.isfinite(torch.as_tensor(last[key])), key
    assert last["reward"] == pytest.approx(0.5) and last["grad_norm"] > 0
    trainer.close()
