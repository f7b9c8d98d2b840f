"""Masked-diffusion SFT trainer (LLaDA's SFT objective; the first stage of d1's recipe).

A block-diffusion policy (SDAR / TraDo, ``policy.block_causal``) is trained with the block-diffusion
loss instead (:func:`rl.block_diffusion.block_diffusion_sft_loss`: masked diffusion inside each block,
the clean blocks before it as context; ``block_*`` options of :class:`rl.config.SFTConfig`)."""

from __future__ import annotations

import torch

from rl.block_diffusion import block_diffusion_sft_loss, draw_block_sft_noise, split_prompt_response
from rl.config import ConfigError, SFTConfig
from rl.data import check_columns
from rl.losses import diffusion_sft_loss, draw_sft_noise
from rl.sft_format import encode_sft_example, get_sft_format  # noqa: F401  (re-exported)
from rl.trainer import Trainer


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to one width; padding is excluded by the attention mask and never trained."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        response_mask[i, :len(ids)] = torch.tensor(mask)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "response_mask": response_mask, "attention_mask": attention_mask}


class SFTTrainer(Trainer):
    """Rows are dicts with ``prompt`` (text or chat messages) and ``response`` (text), encoded by
    ``config.example_format`` (rl/sft_format.py)."""

    config: SFTConfig

    def __init__(self, config: SFTConfig, policy, train_dataset, *, eval_dataset=None, tokenizer=None,
                 eval_fn=None, rollouts=None):
        check_columns(train_dataset, ("prompt", "response"), "SFT train data")
        # a block-diffusion policy (SDAR / TraDo) trains with the block-diffusion loss (block_training_step)
        self.block_length = int(policy.model_block_length) if getattr(policy, "block_causal", False) else None
        if self.block_length is not None and config.certainty_weight > 0:
            raise ConfigError(f"certainty_weight={config.certainty_weight}: certainty forcing is not implemented for "
                              "block-diffusion models; set it to 0")
        super().__init__(config, policy, train_dataset, tokenizer=tokenizer, eval_fn=eval_fn, rollouts=rollouts)
        self.eval_dataset = list(eval_dataset or [])
        if self.eval_dataset:
            check_columns(self.eval_dataset, ("prompt", "response"), "SFT eval data")
        self.mask_id = policy.mask_token_id

    def generator_names(self) -> tuple[str, ...]:
        return ("mask", "eval_mask")

    def batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        cfg = self.config
        encode = get_sft_format(cfg.example_format)
        enc = [encode(self.tokenizer, r["prompt"], r["response"], max_length=cfg.max_length,
                      pad_response_to=cfg.pad_response_to) for r in rows]
        return {k: v.to(self.device) for k, v in collate_sft(enc, self.tokenizer.pad_token_id).items()}

    def draw_noise(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t [B, 1], masked [B, T])`` of the step's whole local batch, drawn once (so the masks do
        not depend on ``micro_batch_size``) from the trainer's mask generator."""
        return draw_sft_noise(batch["response_mask"], self.generators["mask"], self.config.eps)

    def block_loss(self, batch: dict[str, torch.Tensor], noise: tuple[torch.Tensor, torch.Tensor] | None = None,
                   generator: torch.Generator | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The block-diffusion SFT loss (mean over ``rows``) of a :meth:`block_batch`, with ``noise``
        ``(p, masked)`` of the whole batch, else noise drawn here from ``generator``."""
        cfg = self.config
        lay = batch["layout"]
        p, masked = noise if noise is not None else draw_block_sft_noise(
            lay.response_mask.shape, generator, lower_p=cfg.block_lower_p, upper_p=cfg.block_upper_p,
            device=self.device)
        return block_diffusion_sft_loss(self.model, lay.input_ids[rows], lay.response_mask[rows], mask_id=self.mask_id,
                                        prompt_len=lay.prompt_len, block_length=self.block_length,
                                        attention_mask=lay.attention_mask[rows], align=cfg.block_align,
                                        noise=(p[rows], masked[rows]), weighting=cfg.block_weighting,
                                        normalize=cfg.block_normalize)

    def block_batch(self, rows: list[dict]) -> dict:
        batch = self.batch(rows)
        batch["layout"] = split_prompt_response(batch["input_ids"], batch["response_mask"], batch["attention_mask"],
                                                self.tokenizer.pad_token_id)
        return batch

    def block_training_step(self, rows: list[dict]) -> dict[str, float | torch.Tensor]:
        """One step of block-diffusion SFT: the noise of the whole local batch drawn once (so it does not
        depend on ``micro_batch_size``), then one forward per micro-batch on ``[x_0, x_t]``."""
        batch = self.block_batch(rows)
        lay = batch["layout"]
        n = lay.input_ids.shape[0]
        cfg = self.config
        noise = draw_block_sft_noise(lay.response_mask.shape, self.generators["mask"], lower_p=cfg.block_lower_p,
                                     upper_p=cfg.block_upper_p, device=self.device)
        chunks = self.micro_batches(n)
        total = torch.zeros((), device=self.device)
        for sl in chunks:
            loss = self.block_loss(batch, noise, rows=sl)
            self.backward_and_step(loss * (sl.stop - sl.start) / n * len(chunks))
            total += loss.detach() * (sl.stop - sl.start) / n
        return {"loss": total, "grad_norm": self.grad_norm()}

    def training_step(self, rows: list[dict]) -> dict[str, float | torch.Tensor]:
        cfg = self.config
        if self.block_length is not None:
            return self.block_training_step(rows)
        batch = self.batch(rows)
        n = batch["input_ids"].shape[0]
        t, masked = self.draw_noise(batch)
        total = torch.zeros((), device=self.device)
        terms = {"ce": torch.zeros((), device=self.device), "certainty": torch.zeros((), device=self.device)}
        chunks = self.micro_batches(n)
        for sl in chunks:
            parts: dict = {}
            loss = diffusion_sft_loss(self.model, batch["input_ids"][sl], batch["response_mask"][sl],
                                      mask_id=self.mask_id, attention_mask=batch["attention_mask"][sl],
                                      noise=(t[sl], masked[sl]), certainty_weight=cfg.certainty_weight,
                                      certainty_temperature=cfg.certainty_temperature, parts=parts)
            for k, v in parts.items():
                terms[k] += v * (sl.stop - sl.start) / n
            # each micro-batch is a mean over its rows; weight it by its share of the batch
            # (DeepSpeed divides by the accumulation steps, len(chunks))
            self.backward_and_step(loss * (sl.stop - sl.start) / n * len(chunks))
            total += loss.detach() * (sl.stop - sl.start) / n
        out = {"loss": total, "grad_norm": self.grad_norm()}
        if cfg.certainty_weight > 0:
            out.update({"loss/ce": terms["ce"], "loss/certainty": terms["certainty"]})
        return out

    @torch.no_grad()
    def eval_loss(self) -> dict[str, float]:
        """Mean SFT loss on up to ``eval_batches`` batches of the held-out split (fixed masks)."""
        if not self.eval_dataset:
            return {}
        g = self.generators["eval_mask"]
        state = g.get_state()
        bs = self.config.per_device_batch_size
        losses = []
        self.engine.eval()
        for i in range(0, min(len(self.eval_dataset), bs * self.config.eval_batches), bs):
            if self.block_length is not None:
                losses.append(self.block_loss(self.block_batch(self.eval_dataset[i:i + bs]), generator=g))
                continue
            batch = self.batch(self.eval_dataset[i:i + bs])
            losses.append(diffusion_sft_loss(self.model, batch["input_ids"], batch["response_mask"],
                                             mask_id=self.mask_id, attention_mask=batch["attention_mask"],
                                             generator=g, eps=self.config.eps))
        self.engine.train()
        g.set_state(state)  # the same masks at every evaluation: curves are comparable
        return {"eval/loss": torch.stack(losses).mean()}

    def evaluate(self) -> dict[str, float]:
        metrics = self.reduce_metrics(self.eval_loss())
        metrics.update(super().evaluate())
        return metrics
