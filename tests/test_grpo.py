"""diffu-GRPO: the pure pieces, then short real runs on the built-in model."""

import json

import pytest
import torch

from rl.grpo import clipped_surrogate, group_advantages, k3_kl  # the trainer module re-exports them


def test_group_advantages_center_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, std = group_advantages(r, 4)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.allclose(std, torch.tensor([(1 / 3) ** 0.5, 0.0]))  # unbiased, as TRL and d1
    scaled, _ = group_advantages(r, 4, scale_rewards="group")
    assert torch.allclose(scaled[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (1 / 3) ** 0.5, atol=1e-3)
    assert torch.equal(scaled[4:], torch.zeros(4))  # zero-std groups stay 0, no NaN


def test_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(100_000, generator=g)
    ref = logp + torch.randn(100_000, generator=g) * torch.logspace(-9, 0, 100_000)  # many tiny differences
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
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


def test_log_ratio_is_clamped_so_a_log_ratio_of_100_stays_finite():
    """Sequence-level estimates can differ by hundreds of nats; exp(100) is inf in float32."""
    from rl.estimators import MAX_LOG_RATIO

    assert torch.isinf(torch.exp(torch.tensor(100.0)))
    logp = torch.tensor([100.0, -100.0, 100.0, 0.5], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, eps=0.5)
    kl = k3_kl(logp, old)
    (loss.sum() + kl.sum()).backward()
    assert torch.isfinite(loss).all() and torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()
    bound = torch.exp(torch.tensor(MAX_LOG_RATIO))
    assert torch.allclose(loss[:3], torch.stack([bound, -torch.exp(-torch.tensor(MAX_LOG_RATIO)), -torch.tensor(1.5)]))
    assert logp.grad[0] == 0  # beyond the bound the estimate moves nothing
    assert logp.grad[3] != 0  # inside it the gradient is untouched


@pytest.mark.parametrize("estimator", ["mean_field", "mc_elbo"])
def test_grpo_loss_and_gradients_do_not_depend_on_micro_batch_size(tmp_path, estimator):
    """Token-level terms are normalised by the local batch's token count, not per micro-batch (d1):
    micro-batches of 16, 8 and 4 rows (with very unequal token counts) give the same loss and
    gradient norms."""
    import dataclasses

    from tests.helpers.toy_grpo import make_trainer

    first = make_trainer(str(tmp_path / "ro"), max_steps=1, estimator=estimator, micro_batch_size=16)
    ro = first.rollout(first.train_dataset[:4])
    mask = torch.zeros_like(ro.completion_mask)
    mask[:8], mask[8:, :2] = 1, 1  # first half 8 tokens per row, second half 2
    ro = dataclasses.replace(ro, completion_mask=mask)
    adv = torch.linspace(-1.0, 1.0, 16)
    out = {}
    for micro in (16, 8, 4):
        trainer = make_trainer(str(tmp_path / f"m{micro}"), max_steps=1, estimator=estimator, micro_batch_size=micro)
        m = trainer.policy_update(ro, adv)
        out[micro] = (float(m["loss"]), float(m["grad_norm"]))
    for micro in (8, 4):
        assert out[micro] == pytest.approx(out[16], rel=1e-4), out


def test_trl_reward_functions_run_unchanged(tmp_path):
    """Reward functions written for TRL's GRPOTrainer (keywords, dataset columns, chat completions)."""
    import re

    from tests.helpers.toy_grpo import make_trainer

    def reward_len(completions, **kwargs):  # TRL's documentation example
        return [-abs(20 - len(completion)) for completion in completions]

    def reward_func(completions, ground_truth, **kwargs):  # TRL's "dataset column" example
        matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
        contents = [match.group(1) if match else "" for match in matches]
        return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]

    rows = [{"prompt": f"{i:03d}", "ground_truth": str(i % 3)} for i in range(8)]
    trainer = make_trainer(str(tmp_path / "plain"), rows=rows, reward_funcs=[reward_len, reward_func, "format_soft"],
                           reward_weights=[1.0, 2.0, 0.5])
    metrics = trainer.training_step(rows[:4])
    assert -20 <= float(metrics["rewards/reward_len/mean"]) <= 0
    assert 0 <= float(metrics["rewards/reward_func/mean"]) <= 1 and "rewards/format_soft/mean" in metrics

    seen = {}

    def format_reward_func(completions, **kwargs):  # TRL's conversational example
        seen.update(kwargs, completions=completions)
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    chat = [{"prompt": [{"role": "user", "content": f"{i:03d}"}], "answer": str(i)} for i in range(8)]
    trainer = make_trainer(str(tmp_path / "chat"), rows=chat, reward_funcs=[format_reward_func, "gsm8k"])
    metrics = trainer.training_step(chat[:4])
    assert float(metrics["rewards/format_reward_func/mean"]) == 0.0 and "rewards/gsm8k/mean" in metrics
    n = 4 * trainer.config.num_generations
    assert seen["prompts"][0] == chat[0]["prompt"] and len(seen["prompts"]) == n  # as stored, one per completion
    assert seen["completions"][0][0]["role"] == "assistant" and len(seen["completions"]) == n
    assert seen["answer"] == [r["answer"] for r in chat[:4] for _ in range(trainer.config.num_generations)]
    assert all(isinstance(t, int) for t in seen["completion_ids"][0])
    assert seen["trainer_state"].global_step == 0
