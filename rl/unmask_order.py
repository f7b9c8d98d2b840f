"""The unmasking-order policy learner (DCoLT's unmasking policy module, Huang et al. 2025,
"Reinforcing the Diffusion Chain of Lateral Thought with Diffusion Language Models", Sec. 3.2).

A dLLM decides *what* token goes in a position; this module learns *which* positions to commit
at each denoising step. A small head (one ``nn.TransformerEncoderLayer`` with adaptive
layer-norm on the step fraction) reads the dLLM's last hidden states of the current block, its
top-1 confidence there, a mask-state embedding and an in-block position embedding, and gives one
score per position. At each step the K positions the schedule commits are drawn without
replacement from a Plackett-Luce distribution over the scores of the block's still-masked
positions (top-K at evaluation); see :mod:`rl.plackett_luce`.

Trajectory log-prob (the last step of a block is forced and has no policy term):

    log pi = sum_s sum_j [h_s(s_j) - logsumexp_{c not yet drawn at step s} h_s(c)]
             (+ sum_s sum_{i committed at s} log p_theta(x_0^i | x_s)   when co-training the dLLM)

Training (GRPO-style): G rollouts per prompt, group-relative advantages from outcome rewards, a
clipped ratio against the old policy for every denoising step, plus ``block_kl`` x KL(pi || pi_conf),
the policy's distance from its confidence-only part (:func:`block_kl`). The rollout records what training
needs, so the sampler is never re-run: ``unmask_step`` gives every step's candidate and chosen
sets; the hook records the draw order inside each step.

Forward passes. The head's input at step s is the dLLM's view of the state x_s. With a frozen
dLLM (default) the sampler computes exactly these hidden states during the rollout, so the hook
caches them (``cache_features=True``) and training needs only head forwards: one batched head
forward over all (row, step) states per iteration, no extra dLLM pass at all. Caching costs
``B * S * block_length * H`` floats (3 MB for the Sudoku default; for an 8B model set
``cache_features=False``). Otherwise (and always when co-training, whose token log-probs must
carry gradients) every x_s is rebuilt from ``sequences`` + ``unmask_step`` and all steps go
through the dLLM as one batch per micro-batch of rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from rl.config import RolloutOptions, UnmaskOrderConfig  # noqa: F401  (re-exported)
from rl.advantages import group_advantages
from rl.objectives import clipped_surrogate, k3_kl
from rl.plackett_luce import plackett_luce_logprob, sample_plackett_luce
from rl.trainer import Trainer

# ------------------------------------------------------------------------------------------------
# The policy module
# ------------------------------------------------------------------------------------------------


def sinusoidal(frac: torch.Tensor, dim: int) -> torch.Tensor:
    """``[...] -> [..., dim]`` sinusoidal embedding of a fraction in [0, 1] (DiT's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=frac.device, dtype=torch.float32) / half)
    args = frac.float()[..., None] * 1000.0 * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V] -> [..., 2]``: the dLLM's top-1 probability and its log / 10 (clamped at -10).

    The quantity low-confidence remasking ranks by, handed to the head as an input."""
    logits = logits.float()
    logp_max = logits.amax(-1) - torch.logsumexp(logits, dim=-1)
    return torch.stack([logp_max.exp(), logp_max.clamp(min=-10.0) / 10.0], dim=-1)


class UnmaskPolicyHead(nn.Module):
    """Scores ``[M, blk]`` from ``hidden [M, blk, H]``, ``feats [M, blk, 2]``, ``masked [M, blk]``
    and the step fraction ``frac [M]`` (adaLN: DiT, Peebles & Xie 2023).

    score = r * tanh(block(x) / r) + conf_scale * g * log p_max

    The gated skip path (g a learned scalar) is one parameter away from low-confidence remasking,
    so RL can find that known-good order fast; ``conf_scale`` multiplies g's effective learning
    rate (the trainer's lr is the block's). The block's output is bounded to (-r, r)
    (``residual_bound``; 0 = unbounded): as g grows, the block can reorder positions whose
    confidences are close but cannot override a clear confidence gap. The trainer's ``block_kl``
    penalty (:func:`block_kl`) keeps it near zero unless rewards pay for moving it. On the Sudoku
    benchmark (docs/history.md, "Unmasking-order learner") an unpenalised block drifted under noisy policy gradients and
    cost up to 8 points against low-confidence on one seed. The output layer and g start at
    zero, so every score starts at exactly 0 and the initial Plackett-Luce policy is uniform."""

    def __init__(self, in_dim: int, *, d_model: int = 128, n_heads: int = 4, ff_dim: int = 256,
                 feat_dim: int = 2, freq_dim: int = 64, conf_scale: float = 500.0, residual_bound: float = 1.0):
        super().__init__()
        if residual_bound < 0:
            raise ValueError(f"UnmaskPolicyHead: residual_bound={residual_bound} must be >= 0 (0 = unbounded)")
        self.freq_dim, self.conf_scale, self.residual_bound = freq_dim, conf_scale, residual_bound
        self.proj = nn.Linear(in_dim + feat_dim, d_model)
        self.mask_emb = nn.Embedding(2, d_model)
        self.pos_proj = nn.Linear(freq_dim, d_model)  # position inside the current block, as a fraction
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, 4 * d_model))
        self.norm_in = nn.LayerNorm(d_model, elementwise_affine=False)
        self.block = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm_out = nn.LayerNorm(d_model, elementwise_affine=False)
        self.out = nn.Linear(d_model, 1)
        self.conf_gate = nn.Parameter(torch.zeros(1))  # 1-D: DeepSpeed cannot broadcast 0-dim params
        for layer in (self.time_mlp[-1], self.out):  # identity modulation, all-zero scores
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor, feats: torch.Tensor, masked: torch.Tensor,
                frac: torch.Tensor) -> torch.Tensor:
        block, conf = self.terms(hidden, feats, masked, frac)
        return block + conf

    def terms(self, hidden: torch.Tensor, feats: torch.Tensor, masked: torch.Tensor,
              frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The score's two terms ``[M, blk]``: the bounded block term and ``conf_scale * g * log p_max``."""
        blk = masked.shape[-1]
        pos = torch.arange(blk, device=masked.device, dtype=torch.float32) / blk
        x = self.proj(torch.cat([hidden.float(), feats.float()], dim=-1))
        x = x + self.mask_emb(masked.long()) + self.pos_proj(sinusoidal(pos, self.freq_dim))
        shift1, scale1, shift2, scale2 = self.time_mlp(sinusoidal(frac, self.freq_dim))[:, None].chunk(4, dim=-1)
        x = self.block(self.norm_in(x) * (1 + scale1) + shift1)
        x = self.norm_out(x) * (1 + scale2) + shift2
        r = self.out(x).squeeze(-1)
        if self.residual_bound > 0:
            r = self.residual_bound * torch.tanh(r / self.residual_bound)
        return r, self.conf_scale * self.conf_gate * 10.0 * feats[..., 1].float()  # feats[..., 1] = log p_max / 10


class OrderPolicy(nn.Module):
    """The dLLM (a ``rollout.PolicyAdapter``) and its unmasking head, trained as one module.

    ``train_dllm=False`` (default) freezes the dLLM: only the head is optimised. The head's weights
    are drawn from ``seed`` under a forked RNG (the global RNG is left as it was)."""

    def __init__(self, dllm: nn.Module, *, train_dllm: bool = False, d_model: int = 128, n_heads: int = 4,
                 ff_dim: int = 256, conf_scale: float = 500.0, residual_bound: float = 1.0, seed: int = 0):
        super().__init__()
        self.dllm = dllm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = UnmaskPolicyHead(int(dllm.model.config.hidden_size), d_model=d_model, n_heads=n_heads,
                                         ff_dim=ff_dim, conf_scale=conf_scale, residual_bound=residual_bound)
        self.train_dllm = train_dllm
        dllm.requires_grad_(train_dllm)

    @property
    def tokenizer(self):
        return self.dllm.tokenizer

    @property
    def mask_token_id(self) -> int:
        return self.dllm.mask_token_id

    @property
    def eos_token_id(self) -> int:
        return self.dllm.eos_token_id

    def forward(self, masked: torch.Tensor, frac: torch.Tensor, *, hidden: torch.Tensor | None = None,
                feats: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, window: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The head's score terms (block, confidence; scores = their sum, each ``[M, blk]``) from
        cached ``hidden``/``feats``, or from one dLLM forward on ``input_ids [M, T]`` gathered at
        ``window [M, blk]`` (sequence positions of each state's block); in that case the window
        logits ``[M, blk, V]`` are returned as the third element (else ``None``)."""
        logits = None
        if input_ids is not None:
            out = self.dllm(input_ids, attention_mask=attention_mask, output_hidden_states=True)
            h = out.hidden_states[-1]
            hidden = h.gather(1, window[..., None].expand(-1, -1, h.shape[-1]))
            logits = out.logits.gather(1, window[..., None].expand(-1, -1, out.logits.shape[-1]))
            feats = confidence_features(logits)
            if not self.train_dllm:
                hidden, feats, logits = hidden.detach(), feats.detach(), logits.detach()
        return (*self.head.terms(hidden, feats, masked, frac), logits)

    def head_options(self) -> dict:
        blk = self.head.block
        return {"d_model": self.head.proj.out_features, "n_heads": blk.self_attn.num_heads,
                "ff_dim": blk.linear1.out_features, "conf_scale": self.head.conf_scale,
                "residual_bound": self.head.residual_bound}


def load_order_policy(path, *, train_dllm: bool = False) -> OrderPolicy:
    """Load what :meth:`UnmaskOrderTrainer.export_final` wrote: the HF dLLM + ``order_head.pt``."""
    from pathlib import Path

    from rollout import PolicyAdapter

    saved = torch.load(Path(path) / "order_head.pt", map_location="cpu")
    policy = OrderPolicy(PolicyAdapter.from_pretrained(str(path)), train_dllm=train_dllm, **saved["options"])
    policy.head.load_state_dict(saved["state_dict"])
    return policy


# ------------------------------------------------------------------------------------------------
# The rollout hook
# ------------------------------------------------------------------------------------------------


class PlackettLuceOrder:
    """``order_policy`` for ``rollout.generate``: Plackett-Luce draws (Gumbel-top-k with its own
    generator) of the schedule's ``num_transfer`` positions, or top-k when ``greedy``.

    Records, per completion position, its draw order inside its commit step (``rank_in_step``
    ``[B, L]``), the log-prob of every step's draw (``step_logps``, S tensors ``[B]``) and, with ``cache=True``, every step's head inputs (``hidden`` ``[S, B, blk, H]``,
    ``feats`` ``[S, B, blk, 2]``) so that training needs no second dLLM pass."""

    def __init__(self, head: nn.Module, *, gen_length: int, generator: torch.Generator | None = None,
                 greedy: bool = False, cache: bool = False):
        self.head, self.gen_length, self.generator = head, gen_length, generator
        self.greedy, self.cache = greedy, cache
        self.rank_in_step: torch.Tensor | None = None
        self.step_logps: list[torch.Tensor] = []  # [B] log-prob of each step's draw (0 when forced)
        self._hidden: list[torch.Tensor] = []
        self._feats: list[torch.Tensor] = []

    def __call__(self, state) -> torch.Tensor:
        if state.hidden_states is None:
            raise ValueError("PlackettLuceOrder: the sampler passed no hidden states (the model must return "
                             "`hidden_states` when called with output_hidden_states=True)")
        b, blk = state.masked.shape
        if self.rank_in_step is None:
            self.rank_in_step = torch.full((b, self.gen_length), -1, dtype=torch.long, device=state.masked.device)
        feats = confidence_features(state.logits)
        frac = torch.full((b,), float(state.step_fraction), device=state.masked.device)
        scores = self.head(state.hidden_states, feats, state.masked, frac)
        rank = sample_plackett_luce(scores, state.masked, state.num_transfer, generator=self.generator,
                                    greedy=self.greedy)
        forced = (rank >= 0).sum(-1) == state.masked.sum(-1)
        logp = plackett_luce_logprob(scores, state.masked, rank, validate=False)  # no host sync in the loop
        self.step_logps.append(logp.masked_fill(forced, 0.0))
        c0 = state.block_start - state.prompt_length
        window = self.rank_in_step[:, c0:c0 + blk]
        self.rank_in_step[:, c0:c0 + blk] = torch.where(rank >= 0, rank, window)
        if self.cache:
            self._hidden.append(state.hidden_states.float())
            self._feats.append(feats)
        return rank >= 0

    @cached_property
    def hidden(self) -> torch.Tensor:
        """``[S, B, blk, H]`` (read after the rollout)."""
        return torch.stack(self._hidden)

    @cached_property
    def feats(self) -> torch.Tensor:
        """``[S, B, blk, 2]`` (read after the rollout)."""
        return torch.stack(self._feats)


# ------------------------------------------------------------------------------------------------
# Trajectories: what a rollout tells about every denoising step
# ------------------------------------------------------------------------------------------------


@dataclass
class StepStates:
    """Every (row, step) state of a batch of trajectories that commits at least one token, in
    block-window coordinates (column j = completion position ``start + j``).

    ``row [M]``, ``step [M]`` (global), ``frac [M]`` = step / steps, ``start [M]`` (first
    completion position of the step's block), ``masked [M, blk]`` (the candidates: still masked
    in x_s, i.e. ``unmask_step >= s``), ``rank [M, blk]`` (draw order inside the step, -1 = not
    committed at s), ``has_policy_term [M]`` (False when every candidate is committed: the
    forced last step of a block)."""

    row: torch.Tensor
    step: torch.Tensor
    frac: torch.Tensor
    start: torch.Tensor
    masked: torch.Tensor
    rank: torch.Tensor
    has_policy_term: torch.Tensor

    def select(self, idx: torch.Tensor) -> "StepStates":
        return StepStates(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def trajectory_states(unmask_step: torch.Tensor, rank_in_step: torch.Tensor, *, steps: int,
                      block_length: int) -> StepStates:
    """Rebuild every step's candidate set, chosen set and draw order from ``unmask_step [B, L]``
    (LLaDA's schedule: ``steps / num_blocks`` steps per block, blocks left to right).

    Candidates at global step s of block b = positions of block b with ``unmask_step >= s``;
    chosen = ``unmask_step == s``. One host sync (``nonzero``) per batch, none per step."""
    b, gen_length = unmask_step.shape
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"trajectory_states: gen_length={gen_length}, block_length={block_length}, steps={steps} "
                         "do not form LLaDA's block schedule")
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    dev = unmask_step.device
    s = torch.arange(steps, device=dev)
    start = (s // per_block) * block_length  # [S]
    cols = start[:, None] + torch.arange(block_length, device=dev)[None]  # [S, blk]
    us = unmask_step[:, cols]  # [B, S, blk]: unmask step of each position of each step's block
    masked = us >= s[None, :, None]
    chosen = us == s[None, :, None]
    if bool(((unmask_step < 0) | (unmask_step >= steps)).any()) or bool((chosen.sum((1, 2)) != gen_length).any()):
        raise ValueError("trajectory_states: unmask_step must commit every completion position exactly once, "
                         f"at a step in [0, {steps}) of its own block (got fast modes or a different schedule?)")
    rank = torch.where(chosen, rank_in_step[:, cols], torch.full_like(us, -1))
    row, step = chosen.any(-1).nonzero(as_tuple=True)
    return StepStates(row=row, step=step, frac=step.float() / steps, start=start[step], masked=masked[row, step],
                      rank=rank[row, step], has_policy_term=(chosen.sum(-1) < masked.sum(-1))[row, step])


def block_kl(block: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """``[M]`` k3 estimate (Schulman 2020, :func:`rl.grpo.k3_kl`) of KL(pi || pi_conf) on the drawn
    selections ``rank``: pi scores positions by ``block + conf``, pi_conf by the confidence term
    alone (the head without its block). The confidence term is detached, so the gradient reaches
    the block only (and, when co-training, the dLLM through the block's inputs): as a penalty (``UnmaskOrderConfig.block_kl``) it keeps the block near zero
    unless rewards pay for moving it, and leaves the gate to the reward signal."""
    conf = conf.detach()
    return k3_kl(plackett_luce_logprob(block + conf, masked, rank, validate=False),
                 plackett_luce_logprob(conf, masked, rank, validate=False))


def rebuild_states(sequences: torch.Tensor, unmask_step: torch.Tensor, states: StepStates, prompt_len: int,
                   mask_id: int) -> torch.Tensor:
    """``[M, T]`` input ids of every state x_s: completion positions with ``unmask_step >= s`` masked."""
    x = sequences[states.row]
    still = unmask_step[states.row] >= states.step[:, None]
    x[:, prompt_len:] = x[:, prompt_len:].masked_fill(still, mask_id)
    return x


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


def generate_with_order(dllm, hook, prompt_ids, prompt_mask, ro: RolloutOptions, *, generator=None):
    """The rollout engine's ``generate`` with the order hook under LLaDA's schedule; ``dllm`` is a
    rollout engine (torch backend) or a policy adapter (mask / EOS ids from it)."""
    from rollout.engine import engine_for

    with engine_for(dllm, ro) as engine:
        return engine.generate(prompt_ids, prompt_mask, options=ro, generator=generator, order_policy=hook)


class UnmaskOrderTrainer(Trainer):
    """Rows are dicts with ``prompt`` plus the reward functions' columns. ``policy`` is an
    :class:`OrderPolicy` or a ``PolicyAdapter`` (wrapped in a fresh, uniform head)."""

    config: UnmaskOrderConfig

    def __init__(self, config: UnmaskOrderConfig, policy: nn.Module, train_dataset, *, tokenizer=None,
                 eval_fn=None, reward_fn=None):
        from rl.data import check_columns

        check_columns(train_dataset, ("prompt",), "unmasking-order train data")
        if not isinstance(policy, OrderPolicy):
            policy = OrderPolicy(policy, train_dllm=config.train_dllm, d_model=config.d_model,
                                 n_heads=config.n_heads, ff_dim=config.ff_dim, conf_scale=config.conf_scale,
                                 residual_bound=config.residual_bound, seed=config.seed)
        elif policy.train_dllm != config.train_dllm:
            raise ValueError(f"UnmaskOrderConfig.train_dllm={config.train_dllm} but the OrderPolicy was built with "
                             f"train_dllm={policy.train_dllm}")
        super().__init__(config, policy, train_dataset, tokenizer=tokenizer or policy.tokenizer, eval_fn=eval_fn)
        if reward_fn is None:
            from rewards import compose

            reward_fn = compose(dict(config.rewards), timeout_s=config.reward_timeout_s)
        self.reward_fn = reward_fn
        self.mask_id = policy.mask_token_id

    def adapter(self) -> nn.Module:
        return self.policy.dllm

    def rollout_adapter(self, module: nn.Module) -> nn.Module:
        return module.dllm

    def generator_names(self) -> tuple[str, ...]:
        return ("rollout", "order")

    def rows_per_step(self) -> int:
        return self.config.per_device_prompts * self.config.num_generations

    def optimizer_steps_per_step(self) -> int:
        return self.config.num_iterations

    def export_final(self) -> None:
        """run_dir/final: the dLLM as an HF checkpoint (LoRA merged) plus ``order_head.pt`` (see
        :func:`load_order_policy`)."""
        from rl.checkpoint import export_hf
        from rl.engine import unwrap

        def head(sd: dict) -> dict:
            head_sd = {k[len("head."):]: v.cpu() for k, v in sd.items() if k.startswith("head.")}
            return {"order_head.pt": {"options": unwrap(self.engine).head_options(), "state_dict": head_sd}}

        export_hf(self.engine, self.tokenizer, self.run_dir / "final", extra_files=head)

    # ---- phases ----------------------------------------------------------------------------------
    def rollout(self, rows: list[dict]):
        from rl.data import encode_prompt, left_pad
        from rl.engine import gathered_for_generation

        cfg = self.config
        prompts = [encode_prompt(self.tokenizer, r["prompt"]) for r in rows]
        prompt_ids, prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        prompt_ids = prompt_ids.repeat_interleave(cfg.num_generations, 0).to(self.device)
        prompt_mask = prompt_mask.repeat_interleave(cfg.num_generations, 0).to(self.device)
        cache = cfg.cache_features and not cfg.train_dllm
        with gathered_for_generation(self.engine) as module:  # the head's weights too
            hook = PlackettLuceOrder(module.head, gen_length=cfg.rollout.gen_length,
                                     generator=self.generators["order"], cache=cache)
            ro = generate_with_order(self.rollouts, hook, prompt_ids, prompt_mask, cfg.rollout,
                                     generator=self.generators["rollout"])
        return ro, hook

    def score(self, rows: list[dict], completions: list[str]):
        """Rewards of the G completions of each row, called with TRL's keywords (rewards.reward_inputs)."""
        from rewards import reward_inputs

        g = self.config.num_generations
        return self.reward_fn(**reward_inputs([r for r in rows for _ in range(g)], completions))

    def state_logps(self, ro, hook, st: StepStates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-state ``[M]`` trajectory log-prob terms (order + committed tokens when co-training),
        the order term alone, and the block-KL estimate, from one forward of the engine.

        Block KL: see :func:`block_kl`."""
        if hook.cache and not self.config.train_dllm:
            block, conf, _ = self.model(st.masked, st.frac, hidden=hook.hidden[st.step, st.row],
                                        feats=hook.feats[st.step, st.row])
            logits = None
        else:
            p = ro.prompt_ids.shape[1]
            x = rebuild_states(ro.sequences, ro.unmask_step, st, p, self.mask_id)
            window = p + st.start[:, None] + torch.arange(st.masked.shape[1], device=x.device)[None]
            block, conf, logits = self.model(st.masked, st.frac, input_ids=x,
                                             attention_mask=ro.attention_mask[st.row], window=window)
        order = plackett_luce_logprob(block + conf, st.masked, st.rank) * st.has_policy_term
        kl = block_kl(block, conf, st.masked, st.rank) * st.has_policy_term
        if not self.config.train_dllm:
            return order, order, kl
        chosen = st.rank >= 0  # token log-probs of what was committed, at those positions only
        target = ro.sequences[st.row].gather(1, window)[chosen]
        tok = torch.log_softmax(logits[chosen].float(), -1).gather(-1, target[:, None]).squeeze(-1)
        per_state = torch.zeros_like(order).index_add(0, chosen.nonzero()[:, 0], tok)
        return order + per_state, order, kl

    # ---- one training step -----------------------------------------------------------------------
    def training_step(self, rows: list[dict]) -> dict[str, float | torch.Tensor]:
        cfg, ro_cfg = self.config, self.config.rollout
        t0 = time.perf_counter()
        ro, hook = self.rollout(rows)
        t1 = time.perf_counter()
        rew = self.score(rows, ro.decode(self.tokenizer))
        t2 = time.perf_counter()
        rewards = torch.tensor(rew.total, dtype=torch.float32, device=self.device)
        adv, group_std = group_advantages(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)
        states = trajectory_states(ro.unmask_step, hook.rank_in_step, steps=ro_cfg.steps,
                                   block_length=ro_cfg.block_length)
        if not cfg.train_dllm:  # forced steps carry no term at all: drop them
            states = states.select(states.has_policy_term.nonzero()[:, 0])
        n_rows = rewards.shape[0]
        chunks = self.micro_batches(n_rows)
        parts = [((states.row >= sl.start) & (states.row < sl.stop)).nonzero()[:, 0] for sl in chunks]
        n_terms = max(states.row.shape[0], 1)
        old: list[torch.Tensor] = []
        sums = {k: torch.zeros((), device=self.device) for k in ("loss", "clip", "logp", "block_kl")}
        grad_norms = []
        for it in range(cfg.num_iterations):
            for c, idx in enumerate(parts):
                st = states.select(idx)
                logp, order, kl = self.state_logps(ro, hook, st)
                if it == 0:  # the rollout policy: parameters are unchanged until the first step
                    old.append(logp.detach())
                per_state, clipped = clipped_surrogate(logp, old[c], adv[st.row], cfg.epsilon)
                loss = per_state.sum() / n_terms
                if cfg.block_kl:  # (not 0 * kl: an unbounded block can make k3 overflow to inf)
                    loss = loss + cfg.block_kl * kl.sum() / n_terms
                self.backward_and_step(loss * len(chunks))  # DeepSpeed divides by grad_accum
                sums["loss"] += loss.detach()
                sums["clip"] += clipped.float().sum().detach() / n_terms
                if it == 0:
                    sums["logp"] += order.detach().sum() / n_terms
                    sums["block_kl"] += kl.detach().sum() / n_terms
            grad_norms.append(self.grad_norm())
        t3 = time.perf_counter()
        mu = cfg.num_iterations
        metrics: dict[str, float | torch.Tensor] = {
            "reward": rewards.mean(), "reward_std": group_std.mean(),
            "frac_reward_zero_std": (group_std < 1e-6).float().mean(),
            "loss": sums["loss"] / mu, "clip_ratio/region_mean": sums["clip"] / mu,
            "order/logp_per_step": sums["logp"], "order/block_kl": sums["block_kl"],
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "completions/mean_length": ro.completion_mask.sum(1).float().mean(),
            "timing/rollout": t1 - t0, "timing/reward": t2 - t1, "timing/update": t3 - t2,
        }
        for name, values in rew.per_function.items():
            vals = [v for v in values if v is not None]
            metrics[f"rewards/{name}/mean"] = sum(vals) / len(vals) if vals else float("nan")
        return metrics
