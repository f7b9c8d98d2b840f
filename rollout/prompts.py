"""Prompts as the rollout engine takes them: text or chat messages, tokenised and left-padded."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_prompt(tokenizer, prompt, *, use_chat_template: bool = True, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a prompt: a string (wrapped as one user turn) or a list of chat messages.

    With a chat template the generation prompt (assistant header) is appended; a chat whose last
    message is the assistant's is continued instead (TRL's convention: the model completes that
    turn, e.g. d1's evaluation opens it with ``<reasoning>``). The rendered text is tokenized
    without the tokenizer's special tokens (the template writes its own), unless
    ``add_special_tokens`` (d1's evaluation tokenizes the rendered prompt with them)."""
    if isinstance(prompt, str) and not (use_chat_template and tokenizer.chat_template):
        return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not tokenizer.chat_template:
        raise ValueError("prompt is a list of messages but the tokenizer has no chat_template")
    cont = bool(messages) and messages[-1].get("role") == "assistant"
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=not cont, continue_final_message=cont,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


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
