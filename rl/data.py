"""Data plumbing shared by the trainers: prompt encoding, padding, a resumable shuffled iterator."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from rewards.registry import prompt_text  # noqa: F401  (re-exported: the one prompt-text helper)


def encode_prompt(tokenizer, prompt, *, use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: a string (wrapped as one user turn) or a list of chat messages.

    With a chat template the generation prompt (assistant header) is appended."""
    if isinstance(prompt, str) and not (use_chat_template and tokenizer.chat_template):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not tokenizer.chat_template:
        raise ValueError("prompt is a list of messages but the tokenizer has no chat_template")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to one width: returns ``ids [B, P]`` and ``mask [B, P]`` (1 = real)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def check_columns(rows: Sequence[dict], required: Sequence[str], where: str) -> None:
    """One clear error naming the first row and key that is missing."""
    for i, row in enumerate(rows):
        for key in required:
            if key not in row:
                raise KeyError(f"{where}: row {i} has no column {key!r} (columns: {sorted(row)})")


class ShuffledIterator:
    """Endless iterator over dataset indices: a fresh seeded permutation each epoch, every rank
    taking its own slice of each global batch. Its position is part of the checkpoint."""

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if size < batch_size * world_size:
            raise ValueError(f"dataset has {size} rows, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        perm = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(perm)
        return perm

    def next_indices(self) -> list[int]:
        global_bs = self.batch_size * self.world_size
        if self.offset + global_bs > self.size:  # drop the ragged tail, start a new epoch
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation()
        start = self.offset + self.rank * self.batch_size
        self.offset += global_bs
        return self._perm[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation()
