"""Diffusion DPO with VRPO's variance reductions (LLaDA 1.5: Zhu et al. 2025, "LLaDA 1.5:
Variance-Reduced Preference Optimization for Large Language Diffusion Models").

DPO (Rafailov et al. 2023, Eq. 7) with the intractable sequence log-likelihoods of a dLLM
replaced by ELBO estimates B (rl/estimators.py):

    L = -log sigmoid(beta * [(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))]).

VRPO's three variance reductions of the score estimate (Zhu et al. 2025, Sec. 3-4):
  - sampling budget ``n_samples = n`` forward passes per ELBO;
  - optimal allocation (Thm. 3): n timesteps with one mask each (n_t = n, n_y = 1), which is how
    the ``mc_elbo`` / ``mc_elbo_ll`` estimators draw; ``optimal_allocation=False`` draws one
    timestep shared by all n masks (n_t = 1, n_y = n), the baseline it improves on;
  - antithetic sampling: B_pi(y) and B_ref(y) use the *same* timesteps and masks on the same
    response, so the mask noise cancels in B_pi - B_ref. Chosen and rejected responses always
    get their own, independent draws.
Works with any estimator of rl/estimators.py, mean-field included (there antithetic means the
same random prompt mask for policy and reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rl.config import DPOConfig  # noqa: F401  (re-exported: the config lives with the others)
from rl.data import check_columns, encode_prompt, left_pad
from rl.estimators import Estimator, MaskSample, MCElbo, MCElboLL, get_estimator
from rl.masking import bernoulli_mask, exact_count_mask, sample_t, uniform
from rl.trainer import Trainer

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


# ---- pure functions ---------------------------------------------------------------------------
def dpo_loss(pi_chosen: torch.Tensor, ref_chosen: torch.Tensor, pi_rejected: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (Rafailov et al. 2023, Eq. 7) on (estimated) log-likelihoods:

        loss = -log sigmoid(r_w - r_l),  r_w = beta (B_pi(y_w) - B_ref(y_w)),  r_l likewise.

    Returns ``(loss [B], r_w [B], r_l [B])``; the implicit rewards are detached."""
    chosen_rewards = beta * (pi_chosen - ref_chosen)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, pi_chosen: torch.Tensor,
                pi_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics (batch means; tensors, converted once per step by the trainer)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pi_chosen.detach().mean(),
        "logps/rejected": pi_rejected.detach().mean(),
    }


def score_std(pi_chosen: torch.Tensor, ref_chosen: torch.Tensor, pi_rejected: torch.Tensor,
              ref_rejected: torch.Tensor) -> torch.Tensor:
    """Measured noise of the score estimate: the std over the K passes of the per-pass score
    difference ``(b_pi(y_w) - b_ref(y_w)) - (b_pi(y_l) - b_ref(y_l))`` (inputs ``[K, B]`` per-pass
    ELBO terms), averaged over pairs. Needs K >= 2."""
    diff = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return diff.std(dim=0).mean()


def per_pass_terms(sample: MaskSample, logps: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` per-pass ELBO terms ``sum_l weights * logps``; their mean over K is ``combine().seq``."""
    return (sample.weights * logps).sum(-1)


def draw_shared_timestep(estimator: Estimator, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                         prompt_len: int, generator: torch.Generator | None) -> MaskSample:
    """The non-optimal allocation (n_t = 1, n_y = n; Zhu et al. 2025, Sec. 4): one timestep per
    sequence shared by all n passes, each pass with its own mask. Same expectation as the
    estimator's own draw (``mc_elbo``: t ~ U(eps, 1), weight 1/t; ``mc_elbo_ll``: l ~ U{1..L},
    weight L/l), higher variance."""
    valid = completion_mask.bool()
    k, (b, l) = estimator.n_samples, valid.shape
    if isinstance(estimator, MCElbo):
        t = sample_t((1, b, 1), generator, valid.device, low=estimator.eps).expand(k, b, 1)
        masked = bernoulli_mask(valid.expand(k, b, l), t, generator)
        weights = masked.float() / t
    elif isinstance(estimator, MCElboLL):
        n_valid = valid.sum(-1)
        count = ((uniform((1, b), generator, valid.device) * n_valid).long() + 1).expand(k, b)
        masked = exact_count_mask(valid.expand(k, b, l), count, generator)
        weights = masked.float() * (n_valid.float() / count.float()).unsqueeze(-1)
    else:
        raise ValueError(f"optimal_allocation=False needs a timestep-based estimator (mc_elbo, mc_elbo_ll), "
                         f"got {estimator.name!r}")
    no_prompt = torch.zeros(k, b, prompt_len, dtype=torch.bool, device=valid.device)
    return MaskSample(torch.cat([no_prompt, masked], dim=-1), weights)


# ---- batches ------------------------------------------------------------------------------------
@dataclass
class ResponseBatch:
    """Prompt (left-padded, width ``prompt_len``) then response + EOS (right-padded), the layout
    of rl/estimators.py. Padding is excluded by ``attention_mask`` and never scored."""

    input_ids: torch.Tensor  # [B, P + L]
    attention_mask: torch.Tensor  # [B, P + L]
    completion_mask: torch.Tensor  # [B, L]
    prompt_len: int

    def rows(self, sl: slice) -> "ResponseBatch":
        return ResponseBatch(self.input_ids[sl], self.attention_mask[sl], self.completion_mask[sl], self.prompt_len)


def encode_responses(tokenizer, prompt_ids: Sequence[Sequence[int]], responses: Sequence[str], *,
                     max_completion_length: int, device: torch.device | str = "cpu") -> ResponseBatch:
    """Token ids of ``prompt + response + EOS`` per row in the estimator layout."""
    ids, pmask = left_pad(prompt_ids, tokenizer.pad_token_id)
    resp = [(tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_completion_length]
            for r in responses]
    width = max(len(r) for r in resp)
    rids = torch.full((len(resp), width), tokenizer.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(resp), width), dtype=torch.long)
    for i, r in enumerate(resp):
        rids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[i, :len(r)] = 1
    return ResponseBatch(torch.cat([ids, rids], 1).to(device), torch.cat([pmask, rmask], 1).to(device),
                         rmask.to(device), ids.shape[1])


# ---- data -----------------------------------------------------------------------------------------
def _response_text(value, where: str):
    """A response column: text, or chat messages (TRL's conversational format: the last
    assistant message is the response)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        for m in reversed(value):
            if m.get("role") == "assistant":
                return m.get("content", "")
    raise ValueError(f"{where}: expected a string or a list of chat messages with an assistant turn, "
                     f"got {type(value).__name__}")


def load_preference_data(path_or_name: str | Path, split: str = "train",
                         columns: Mapping[str, str] | Sequence[str] | None = None) -> list[dict]:
    """Preference rows ``{"prompt", "chosen", "rejected", ...}`` from a local ``.jsonl``/``.json``
    or ``.parquet`` file, a directory saved with ``datasets.save_to_disk``, or an HF dataset
    name/path (``datasets.load_dataset``; cached or local, nothing is downloaded offline).

    ``columns`` maps our names to the source's, e.g. ``{"prompt": "question"}`` (unnamed ones
    keep their name). Chat-format ``chosen``/``rejected`` (message lists) become the text of their
    last assistant turn. Raises one error naming the source, row and missing column."""
    mapping = dict(zip(PREFERENCE_COLUMNS, PREFERENCE_COLUMNS))
    if isinstance(columns, Mapping):
        unknown = sorted(set(columns) - set(PREFERENCE_COLUMNS))
        if unknown:
            raise ValueError(f"load_preference_data: columns keys must be among {PREFERENCE_COLUMNS}, got {unknown}")
        mapping.update(columns)
    elif columns is not None:
        if len(columns) != 3:
            raise ValueError(f"load_preference_data: columns must name (prompt, chosen, rejected), got {list(columns)}")
        mapping = dict(zip(PREFERENCE_COLUMNS, columns))
    src = str(path_or_name)
    raw = _read_rows(src, split)
    if not raw:
        raise ValueError(f"preference data {src!r} (split {split!r}) has no rows")
    rows = []
    for i, row in enumerate(raw):
        out = {k: v for k, v in row.items() if k not in mapping.values()}
        for ours, theirs in mapping.items():
            if theirs not in row or row[theirs] is None:
                raise KeyError(f"preference data {src!r}: row {i} has no column {theirs!r}"
                               f"{'' if ours == theirs else f' (for {ours!r})'} (columns: {sorted(row)})")
            value = row[theirs]
            out[ours] = value if ours == "prompt" else _response_text(value, f"preference data {src!r}: row {i} column {theirs!r}")
        if not isinstance(out["prompt"], (str, list)):
            raise ValueError(f"preference data {src!r}: row {i} column {mapping['prompt']!r} must be text or chat "
                             f"messages, got {type(out['prompt']).__name__}")
        rows.append(out)
    return rows


def _read_rows(src: str, split: str) -> list[dict]:
    """Rows through the tasks' one reader (rl.tasks.loading, on ``datasets``): a .jsonl / .json /
    .parquet / .csv file, a ``save_to_disk`` folder, or a hub dataset name."""
    from rl.tasks.loading import HubSource, read_file, read_hub, read_local, resolve_path

    path = resolve_path(src)
    if path is not None and path.is_file():
        return read_file(path)
    rows = (read_local(path, split) if path is not None else
            read_hub(HubSource(src, None, split), "preference data", "pass a local file or save_to_disk folder"))
    if rows is None:
        raise KeyError(f"{src}: no split {split!r}")
    return rows


# ---- the trainer -------------------------------------------------------------------------------------
class DiffusionDPOTrainer(Trainer):
    """Rows are dicts with ``prompt`` (text or chat messages), ``chosen`` and ``rejected`` (text).

    Per step: each response gets its own mask draw(s); the reference ELBOs are computed first
    (no grad), then per micro-batch the policy ELBOs of chosen and rejected, the DPO loss and
    one backward. Metrics: TRL's ``rewards/*``, ``logps/*`` plus ``score/std`` (see
    :func:`score_std`; only when an ELBO has K >= 2 passes)."""

    config: DPOConfig
    needs_reference = True

    def __init__(self, config: DPOConfig, policy, train_dataset, *, tokenizer=None, eval_fn=None, rollouts=None):
        check_columns(train_dataset, PREFERENCE_COLUMNS, "DPO train data")
        # (DPOConfig checked the estimator, its options and optimal_allocation)
        self.estimator = get_estimator(config.estimator, n_samples=config.n_samples, **dict(config.estimator_options))
        if getattr(policy, "block_causal", False):  # SDAR / TraDo: the ELBO's block-causal form (block_mc_elbo)
            from rl.block_diffusion import block_form

            self.estimator = block_form(self.estimator, policy.model_block_length)
        super().__init__(config, policy, train_dataset, tokenizer=tokenizer, eval_fn=eval_fn, rollouts=rollouts)
        self.mask_id = policy.mask_token_id

    def encode(self, rows: list[dict]) -> tuple[ResponseBatch, ResponseBatch]:
        prompts = [encode_prompt(self.tokenizer, r["prompt"]) for r in rows]
        enc = [encode_responses(self.tokenizer, prompts, [r[key] for r in rows],
                                max_completion_length=self.config.max_completion_length, device=self.device)
               for key in ("chosen", "rejected")]
        return enc[0], enc[1]

    def draw(self, batch: ResponseBatch) -> MaskSample:
        g = self.generators["mask"]
        if self.config.optimal_allocation:
            return self.estimator.draw(batch.attention_mask, batch.completion_mask, batch.prompt_len, g)
        return draw_shared_timestep(self.estimator, batch.attention_mask, batch.completion_mask, batch.prompt_len, g)

    def elbo(self, model, batch: ResponseBatch, sample: MaskSample, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [b], per-pass terms [K, b])`` of the rows ``sl``."""
        sub = MaskSample(sample.masked[:, sl], sample.weights[:, sl])
        rows = batch.rows(sl)
        logps = self.estimator.score(model, rows.input_ids, rows.attention_mask, rows.prompt_len, sub, self.mask_id)
        return self.estimator.combine(sub, logps).seq, per_pass_terms(sub, logps)

    def training_step(self, rows: list[dict]) -> dict[str, float | torch.Tensor]:
        cfg = self.config
        batches = self.encode(rows)
        # chosen and rejected: independent draws; policy and reference: shared iff antithetic
        pi_samples = [self.draw(b) for b in batches]
        ref_samples = pi_samples if cfg.antithetic else [self.draw(b) for b in batches]
        n = len(rows)
        chunks = self.micro_batches(n)

        with torch.no_grad(), self.reference() as ref_model:
            ref = [[self.elbo(ref_model, b, s, sl) for sl in chunks] for b, s in zip(batches, ref_samples)]
        ref_seq = [torch.cat([r[0] for r in per_chunk]) for per_chunk in ref]
        ref_pass = [torch.cat([r[1] for r in per_chunk], dim=1) for per_chunk in ref]

        pi_seq: list[list[torch.Tensor]] = [[], []]
        pi_pass: list[list[torch.Tensor]] = [[], []]
        total = torch.zeros((), device=self.device)
        for sl in chunks:
            (seq_w, pass_w), (seq_l, pass_l) = (self.elbo(self.model, b, s, sl) for b, s in zip(batches, pi_samples))
            loss, _, _ = dpo_loss(seq_w, ref_seq[0][sl], seq_l, ref_seq[1][sl], cfg.beta)
            if cfg.rpo_alpha:  # Pang et al. 2024 (IRPO): keeps the chosen likelihood from sinking
                loss = loss - cfg.rpo_alpha * seq_w / batches[0].completion_mask[sl].sum(1).clamp(min=1)
            loss = loss.sum() / n
            self.backward_and_step(loss * len(chunks))  # DeepSpeed divides by grad_accum
            total += loss.detach()
            for i, (seq, per_pass) in enumerate(((seq_w, pass_w), (seq_l, pass_l))):
                pi_seq[i].append(seq.detach())
                pi_pass[i].append(per_pass.detach())

        pi_w, pi_l = torch.cat(pi_seq[0]), torch.cat(pi_seq[1])
        _, r_w, r_l = dpo_loss(pi_w, ref_seq[0], pi_l, ref_seq[1], cfg.beta)
        metrics: dict[str, float | torch.Tensor] = {"loss": total, "grad_norm": self.grad_norm()}
        metrics.update(dpo_metrics(r_w, r_l, pi_w, pi_l))
        if pi_samples[0].num_passes >= 2:
            metrics["score/std"] = score_std(torch.cat(pi_pass[0], dim=1), ref_pass[0],
                                             torch.cat(pi_pass[1], dim=1), ref_pass[1])
        metrics["completions/mean_length"] = 0.5 * (batches[0].completion_mask.sum(1).float().mean()
                                                    + batches[1].completion_mask.sum(1).float().mean())
        return metrics
