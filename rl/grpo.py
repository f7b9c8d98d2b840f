"""The online RL trainer of diffu-GRPO and every registered objective (d1: Zhao et al. 2025,
"d1: Scaling Reasoning in Diffusion LLMs via RL", Sec. 3.2).

Per batch of prompts: G completions each from the rollout engine, rewards from the reward layer,
advantages from a registered advantage estimator (rl/advantages.py), then mu gradient steps on
the registered objective (``rl.objective``, rl/objectives/; default d1's clipped surrogate),
each with its own mask from a dedicated generator. Likelihood terms come from a named estimator
(the objective's by default; diffu-GRPO: d1's one-step mean-field estimate with random prompt
masking); the per-element losses are aggregated by a registered ``loss_type`` (rl/aggregation.py).

Rewards are called as TRL's GRPOTrainer calls them (keywords: prompts, completions,
completion_ids, the dataset's columns, trainer_state); pass ``reward_funcs`` (callables or
registered names) with ``config.reward_weights`` as in TRL, or name them in ``config.rewards``.

Block-diffusion policies (SDAR, TraDo: ``policy.block_causal``): the estimator is replaced by its
block-causal form (:func:`rl.block_diffusion.block_estimator`: ``mean_field`` -> ``block_mean_field``,
``tracerl`` -> ``block_tracerl``, ...), which predicts each block from the clean blocks before it;
the objectives are unchanged (docs/block_diffusion.md).

Loss normalisation (d1 Eq. 3's 1/|o_i| token mean; ``loss_type=dapo``, diffu-GRPO's default):
token-level terms are summed over every valid completion token of the step's whole batch, all
ranks together, and divided by that batch's token count (sequence-level estimators: the mean over
sequences, ``grpo``), so the loss and its gradient depend neither on ``micro_batch_size`` nor on
how the batch is split over ranks. d1 (TRL 0.16's GRPOTrainer) divides per micro-batch instead:
with its 12 completions per step in micro-batches of 6, each half is normalised by its own token
count (``loss_type=bnpo`` reproduces it). The two agree when micro-batch = local batch.
"""

from __future__ import annotations

import time

import torch

from rewards import compose, compose_funcs, reward_inputs
from rl import distributed as D
from rl.advantages import ADVANTAGES, group_advantages  # noqa: F401  (group_advantages: re-exported)
from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
from rl.block_diffusion import block_form
from rl.config import ConfigError, DiffuGRPOConfig
from rl.data import check_columns, encode_prompt, left_pad, prompt_text
from rl.estimators import MaskSample, get_estimator
from rl.objectives import PolicyLossInputs, clipped_surrogate, get_objective, k3_kl  # noqa: F401  (re-exported)
from rl.trainer import Trainer


class DiffuGRPOTrainer(Trainer):
    """Rows are dicts with ``prompt`` (text or chat messages) plus the reward functions' columns.

    Rewards, one of: ``reward_funcs`` (TRL: a callable or registered name, or a list of them,
    weighted by ``config.reward_weights``), ``reward_fn`` (a composed reward, ``rewards.compose``),
    or neither: ``config.rewards`` ({name: weight}). ``rollouts``: the rollout engine to sample with
    (shared with the caller's evaluation), by default one built from ``config.rollout``."""

    config: DiffuGRPOConfig

    def __init__(self, config: DiffuGRPOConfig, policy, train_dataset, *, tokenizer=None, eval_fn=None,
                 reward_fn=None, reward_funcs=None, rollouts=None):
        check_columns(train_dataset, ("prompt",), "GRPO train data")
        if reward_fn is not None and reward_funcs is not None:
            raise ValueError("pass reward_funcs (TRL style) or reward_fn (a composed reward), not both")
        if config.reward_weights is not None and reward_funcs is None:
            raise ValueError("config.reward_weights weighs the trainer's reward_funcs; with config.rewards put the "
                             "weights in that dict")
        self.needs_reference = config.beta > 0  # no reference model at all when beta = 0
        estimator = get_estimator(config.estimator, **dict(config.estimator_options))
        if getattr(policy, "block_causal", False):
            # a block-diffusion policy (SDAR / TraDo): the estimator's block-causal form, each block
            # predicted from the clean blocks before it (rl/block_diffusion.py; diffu_grpo: block_mean_field,
            # tracerl: block_tracerl); checked before the engine is built
            estimator = block_form(estimator, policy.model_block_length)
            if config.rollout.block_length != policy.model_block_length:
                raise ConfigError(f"rollout.block_length={config.rollout.block_length}: a block-diffusion policy is "
                                  f"decoded and scored with its own blocks; set it to {policy.model_block_length}")
        super().__init__(config, policy, train_dataset, tokenizer=tokenizer, eval_fn=eval_fn, rollouts=rollouts)
        if reward_funcs is not None:
            reward_fn = compose_funcs(reward_funcs, config.reward_weights, timeout_s=config.reward_timeout_s)
        self.reward_fn = reward_fn or compose(dict(config.rewards), timeout_s=config.reward_timeout_s)
        self.objective = get_objective(config.objective, **dict(config.objective_options))
        self.estimator = estimator
        self.advantage_fn = ADVANTAGES.lookup(config.advantage)
        self.aggregate = LOSS_TYPES.lookup(config.loss_type)
        self.mask_id = policy.mask_token_id
        self.eos_id = policy.eos_token_id

    def generator_names(self) -> tuple[str, ...]:
        return ("rollout", "mask")

    def rows_per_step(self) -> int:
        return self.config.per_device_prompts * self.config.num_generations

    def optimizer_steps_per_step(self) -> int:
        return self.config.num_iterations

    # ---- phases ----------------------------------------------------------------------------------
    def rollout(self, rows: list[dict]):
        """G completions of each row's prompt from the rollout engine (rows repeated G times); prompts
        longer than ``max_prompt_length`` keep their last tokens (TRL's truncation)."""
        cfg = self.config
        prompts = [encode_prompt(self.tokenizer, r["prompt"], add_special_tokens=cfg.rollout.prompt_special_tokens)
                   for r in rows]
        if cfg.max_prompt_length is not None:
            prompts = [p[-cfg.max_prompt_length:] for p in prompts]
        prompt_ids, prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        g = cfg.num_generations
        out = self.rollouts.generate(prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0),
                                     options=cfg.rollout, generator=self.generators["rollout"])
        self.rollouts.sleep()  # vLLM's sleep mode: the update gets the engine's memory back
        return out

    def score(self, rows: list[dict], completions: list[str], completion_ids: list[list[int]] | None = None):
        """Rewards of the G completions of each row, called with TRL's keywords (rewards.reward_inputs)."""
        from transformers import TrainerState

        g = self.config.num_generations
        state = TrainerState(global_step=self.step, max_steps=self.config.max_steps)
        return self.reward_fn(**reward_inputs([r for r in rows for _ in range(g)], completions, completion_ids),
                              trainer_state=state)

    def logps(self, model, input_ids, attention_mask, prompt_len, sample, rows: slice, completion_mask,
              extra: dict) -> torch.Tensor:
        """The objective's likelihood terms of ``rows``: ``[n, L]`` (token level) or ``[n]``."""
        sub = MaskSample(sample.masked[:, rows], sample.weights[:, rows])
        per_pass = self.estimator.score(model, input_ids[rows], attention_mask[rows], prompt_len, sub, self.mask_id)
        return self.objective.terms(self.estimator, sub, per_pass, completion_mask[rows],
                                    {k: v[rows] for k, v in extra.items()})

    # ---- one training step -----------------------------------------------------------------------
    def training_step(self, rows: list[dict]) -> dict[str, float | torch.Tensor]:
        cfg = self.config
        t0 = time.perf_counter()
        ro = self.rollout(rows)
        t1 = time.perf_counter()
        completions = ro.decode(self.tokenizer)
        ids = [row[m].tolist() for row, m in zip(ro.completion_ids.cpu(), ro.completion_mask.bool().cpu())]
        rew = self.score(rows, completions, ids)
        t2 = time.perf_counter()
        rewards = torch.tensor(rew.total, dtype=torch.float32, device=self.device)
        adv, group_std = self.advantage_fn(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)
        metrics = self.policy_update(ro, adv, rewards)
        metrics.update({
            "reward": rewards.mean(),
            "reward_std": group_std.mean(),
            "frac_reward_zero_std": (group_std < 1e-6).float().mean(),
            "completions/mean_length": ro.completion_mask.sum(1).float().mean(),
            "timing/rollout": t1 - t0,
            "timing/reward": t2 - t1,
            "timing/update": time.perf_counter() - t2,
            "rollout/forward_passes": float(ro.num_forward_passes),
        })
        for name, values in rew.per_function.items():
            vals = [v for v in values if v is not None]
            metrics[f"rewards/{name}/mean"] = sum(vals) / len(vals) if vals else float("nan")
        if cfg.sample_table_every and self.tracker is not None and (self.step + 1) % cfg.sample_table_every == 0:
            g = cfg.num_generations
            self.tracker.log_samples(self.step + 1, [prompt_text(r["prompt"]) for r in rows for _ in range(g)][:8],
                                     completions[:8], rew.total[:8])
        return metrics

    def policy_update(self, ro, adv: torch.Tensor,
                      rewards: torch.Tensor | None = None) -> dict[str, float | torch.Tensor]:
        """mu gradient steps on the objective (d1 Eq. 3 for diffu-GRPO), one mask draw each."""
        cfg, obj = self.config, self.objective
        input_ids, attention_mask = ro.sequences, ro.attention_mask
        prompt_len = ro.prompt_ids.shape[1]
        cmask = ro.completion_mask.float()
        n = input_ids.shape[0]
        chunks = self.micro_batches(n)
        extra = obj.prepare(adv, adv if rewards is None else rewards, cfg.num_generations)
        trace = {"trace": ro.unmask_step, "num_steps": ro.num_steps} if self.estimator.needs_trace else {}
        # mu distinct masks per batch, all from the dedicated generator (never reseeded)
        samples = [self.estimator.draw(attention_mask, ro.completion_mask, prompt_len, self.generators["mask"], **trace)
                   for _ in range(cfg.num_iterations)]

        def terms_all(model, sample):
            return torch.cat([self.logps(model, input_ids, attention_mask, prompt_len, sample, sl, ro.completion_mask,
                                         extra) for sl in chunks])

        # Old-policy terms for iterations 1..mu-1 (ratio objectives) and reference terms for every
        # mask, computed once before any update (iteration 0 reuses its own forward, detached).
        with torch.no_grad():
            old = [None] * len(samples)
            if obj.uses_old:
                old = [None] + [terms_all(self.model, s) for s in samples[1:]]
            ref = None
            if cfg.beta > 0:
                with self.reference() as ref_model:
                    ref = [terms_all(ref_model, s) for s in samples]

        # Normalisers over the *global* batch: DeepSpeed averages gradients over ranks, so each rank
        # divides its sums by (all ranks' count / world size); with one process these are the local
        # counts. Two ranks x b rows then give the loss and gradients of one process with 2b rows
        # even when the ranks' completions have different lengths (tests/test_rank_equivalence.py).
        local = torch.stack([cmask.sum(), torch.full((), float(n), device=cmask.device)])
        totals = D.all_reduce_sum(local)  # [tokens, rows] over all ranks (float64, CPU: one sync per step)
        world = D.get_world_size()
        counts = BatchCounts(tokens=float(totals[0]) / world, rows=float(totals[1]) / world,
                             max_len=cmask.shape[1], num_micro=len(chunks))
        sums = torch.zeros(3, device=self.device)  # loss, kl, clipped fraction
        grad_norms = []
        for k, sample in enumerate(samples):
            for sl in chunks:
                logp = self.logps(self.model, input_ids, attention_mask, prompt_len, sample, sl, ro.completion_mask,
                                  extra)
                out = obj.loss(PolicyLossInputs(
                    logp=logp, old_logp=logp.detach() if old[k] is None else old[k][sl],
                    ref_logp=None if ref is None else ref[k][sl], advantages=adv[sl], mask=cmask[sl],
                    epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                    rows={key: v[sl] for key, v in extra.items()},
                    sample=MaskSample(sample.masked[:, sl], sample.weights[:, sl])))
                w = self.aggregate(cmask[sl], counts)
                loss = (per_token(out.loss, w) * w).sum()
                self.backward_and_step(loss * len(chunks))  # DeepSpeed divides by grad_accum
                kl = torch.zeros((), device=self.device) if out.kl is None else (per_token(out.kl, w) * w).sum()
                clip = (torch.zeros((), device=self.device) if out.clipped is None
                        else (per_token(out.clipped.float(), w) * w).sum())
                sums += torch.stack([loss.detach(), kl.detach(), clip.detach()])
            grad_norms.append(self.grad_norm())
        sums /= cfg.num_iterations
        return {"loss": sums[0], "kl": sums[1], "clip_ratio/region_mean": sums[2],
                "grad_norm": sum(grad_norms) / len(grad_norms)}
