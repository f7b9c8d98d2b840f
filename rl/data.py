"""Data plumbing shared by the trainers: prompt encoding, padding, a resumable shuffled iterator."""

from __future__ import annotations

import random
from collections.abc import Sequence

from rewards.registry import prompt_text  # noqa: F401  (re-exported: the one prompt-text helper)
from rollout.prompts import encode_prompt, left_pad  # noqa: F401  (re-exported)


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
