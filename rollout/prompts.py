"""Prompts as the rollout engine takes them: text or chat messages, tokenised and left-padded."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
