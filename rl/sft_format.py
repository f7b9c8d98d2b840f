"""How an SFT row (``prompt``, ``response``) becomes token ids and a trainable-position mask.

A registry (``sft.example_format``), so configs, validation and the preflight read one list:

- ``generation_prompt`` (default): the prompt as the sampler encodes it (chat template with the
  assistant header, :func:`rollout.prompts.encode_prompt`), then the response and EOS; with
  ``pad_response_to`` the response is padded with EOS (LLaDA's SFT). The model is trained on
  exactly the canvas it later denoises.
- ``d1``: d1's ``preprocess_dataset`` (SFT/sft_trainer.py, Zhao et al. 2025): the user turn and the
  assistant turn rendered together by the chat template, tokenized with the tokenizer's own special
  tokens, truncated and right-padded with the pad token to ``max_length``; the trainable part
  starts after the tokens of ``template(user turn) + "\\n"``. So on LLaDA the rest of the assistant
  header is trained, and the padding is too (every row is ``max_length`` tokens: the model learns
  to fill the canvas with padding after its answer).

Torch-free: the trainer (rl/sft.py) and the preflight (recipes/preflight.py) both use it.
"""

from __future__ import annotations

from collections.abc import Callable

Encoded = tuple[list[int], list[int]]
SFT_FORMATS: dict[str, Callable[..., Encoded]] = {}


def register_sft_format(name: str):
    """Decorator: ``fn(tokenizer, prompt, response, *, max_length, pad_response_to) -> (ids, mask)``."""
    def deco(fn):
        SFT_FORMATS[name] = fn
        return fn
    return deco


def get_sft_format(name: str) -> Callable[..., Encoded]:
    if name not in SFT_FORMATS:
        import difflib

        close = difflib.get_close_matches(name, SFT_FORMATS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown SFT example format {name!r} (known: {', '.join(sorted(SFT_FORMATS))}){hint}")
    return SFT_FORMATS[name]


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@register_sft_format("generation_prompt")
def encode_sft_example(tokenizer, prompt, response: str, *, max_length: int, pad_response_to: int = 0,
                       use_chat_template: bool = True) -> Encoded:
    """Token ids of prompt + response + EOS and the matching response mask (1 = trainable).

    With ``pad_response_to`` the response is padded with EOS up to that length (LLaDA SFT), so the
    model learns to fill the tail of a fixed-length generation with EOS."""
    from rollout.prompts import encode_prompt

    p = encode_prompt(tokenizer, prompt, use_chat_template=use_chat_template)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if pad_response_to and len(r) < pad_response_to:
        r = r + [tokenizer.eos_token_id] * (pad_response_to - len(r))
    ids = (p + r)[:max_length]
    mask = ([0] * len(p) + [1] * len(r))[:max_length]
    return ids, mask


@register_sft_format("d1")
def encode_d1_example(tokenizer, prompt, response: str, *, max_length: int, pad_response_to: int = 0) -> Encoded:
    """d1's SFT example (module docstring): ``(input_ids, mask)``, both ``max_length`` long; the mask
    is 0 on the first ``len(tokenizer(template(user turn) + "\\n"))`` positions, 1 after."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("sft.example_format=d1 renders the prompt with the tokenizer's chat template, "
                         "but this tokenizer has none")
    user = _messages(prompt)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    head = tokenizer.apply_chat_template(user, tokenize=False) + "\n"
    ids = tokenizer(full, truncation=True, max_length=max_length, padding="max_length",
                    padding_side="right")["input_ids"]
    n_prompt = sum(tokenizer(head, truncation=True, max_length=max_length)["attention_mask"])
    n_prompt = min(n_prompt, len(ids))
    return list(ids), [0] * n_prompt + [1] * (len(ids) - n_prompt)
