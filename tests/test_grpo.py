"""diffu-GRPO: the pure pieces, then short real runs on the built-in model."""

import json

import pytest
import torch

from rl.grpo import clipped_surrogate, group_advantages, k3_kl


def test_group_advantages_center_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, std = group_advantages(r, 4)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.allclose(std, torch.tensor([0.5, 0.0]))
    scaled, _ = group_advantages(r, 4, scale=True)
    assert torch.allclose(scaled[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(scaled[4:], torch.zeros(4))  # zero-std groups stay 0, no NaN


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.randn(1000)
    ref = logp + 0.3 * torch.randn(1000)
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    # k3 is an unbiased KL(pi||ref) estimator for samples from pi: check on a categorical
    p = torch.tensor([0.5, 0.3, 0.2]); q = torch.tensor([0.2, 0.4, 0.4])
    exact = (p * (p / q).log()).sum()
    via_k3 = (p * k3_kl(p.log(), q.log())).sum()
    assert torch.allclose(exact, via_k3, atol=1e-6)


def test_clipped_surrogate_matches_ppo_cases():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.0, 2.0, 0.2, 2.0]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, eps=0.5)
    # ratio 1 -> -A; ratio 2, A>0 -> clipped at 1.5; ratio .2, A<0 -> clipped at .5; ratio 2, A<0 -> 2
    assert torch.allclose(loss, torch.tensor([-1.0, -1.5, 0.5, 2.0]), atol=1e-6)
    assert clipped.tolist() == [False, True, True, False]


def test_mu_distinct_masks_and_reward_climbs(tmp_path):
    from tests.helpers.toy_grpo import make_trainer

    trainer = make_trainer(str(tmp_path / "run"), max_steps=30, num_iterations=2)
    drawn = []
    draw = trainer.estimator.draw

    def spy(*a, **k):
        s = draw(*a, **k)
        drawn.append(s.masked.clone())
        return s

    trainer.estimator.draw = spy
    trainer.train()
    # every iteration of every batch had its own mask (d1 reused masks across iterations)
    flat = [m.flatten().tolist() for m in drawn]
    assert len({tuple(f) for f in flat}) == len(flat) == 2 * 30
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (first, last)
    for key in ("reward_std", "frac_reward_zero_std", "kl", "clip_ratio/region_mean", "completions/mean_length",
                "timing/rollout", "timing/reward", "timing/update", "loss", "grad_norm", "lr",
                "rewards/target_char_reward/mean"):
        assert key in rows[-1], key
    # the merged HF checkpoint loads with from_pretrained
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "final") is not None


def test_beta_and_lora_reference_is_adapter_disabled(tmp_path):
    from tests.helpers.toy_grpo import make_trainer

    trainer = make_trainer(str(tmp_path / "run"), max_steps=3, beta=0.04, lora=True, lr=1e-2)
    assert trainer.ref is None  # LoRA: the reference is the same network with adapters disabled
    last = trainer.train()
    assert last["kl"] > 0  # the adapters moved the policy away from the base model
    no_ref = make_trainer(str(tmp_path / "run2"), max_steps=1, beta=0.0)
    assert no_ref.ref is None and not no_ref.needs_reference


@pytest.mark.parametrize("estimator", ["mc_elbo", "coupled"])
def test_sequence_level_estimators_train(tmp_path, estimator):
    from tests.helpers.toy_grpo import make_trainer

    last = make_trainer(str(tmp_path / "run"), max_steps=2, estimator=estimator).train()
    assert torch.isfinite(torch.tensor(last["loss"]))
