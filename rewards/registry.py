"""Reward registry: names -> factories, user registration, and dotted-path lookup.

A reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``
and is called with keywords, as TRL's GRPOTrainer calls it (see :mod:`rewards.compose`).
Built-ins register a *factory* (``options -> fn``) so that stateful rewards (worker pools,
sandboxes) are configured by `get_reward` options; plain functions get options bound as keywords.
Built-ins work on text: registered with ``plain_text=True`` they receive chat completions
(``[{"role": "assistant", "content": ...}]``) and chat prompts as their text.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

RewardFn = Callable[..., list]
_REGISTRY: dict[str, tuple[Callable, bool, bool]] = {}


def register_reward(name: str, *, factory: bool = False, plain_text: bool = False):
    """Decorator: register a reward function (or, with ``factory=True``, a ``(**options) -> fn``)
    under `name`; ``plain_text=True``: it is handed text prompts and completions (see module doc)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def deco(obj):
        if name in _REGISTRY and _REGISTRY[name][0] is not obj:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = (obj, factory, plain_text)
        return obj

    return deco


def prompt_text(prompt) -> str:
    """Plain text of a prompt: a string as is; a chat (list of ``{"role", "content"}`` messages):
    its last user message. The one helper for this (rl.data re-exports it)."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def completion_text(completion):
    """Plain text of a completion: TRL's chat form ``[{"role": "assistant", "content": ...}]``:
    the content of its last message; anything else as is (a string, or a malformed value the
    reward itself scores 0 and logs)."""
    if not isinstance(completion, (list, tuple)):
        return completion
    last = completion[-1] if completion else {}
    return str(last.get("content", "")) if isinstance(last, dict) else completion


def plain_text(fn: RewardFn) -> RewardFn:
    """``fn`` called with the text of chat prompts / completions (strings pass through)."""
    def wrapped(prompts, completions, **columns):
        return fn([prompt_text(p) for p in prompts], [completion_text(c) for c in completions], **columns)

    functools.update_wrapper(wrapped, fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    wrapped.handles_timeouts = getattr(fn, "handles_timeouts", False)
    return wrapped


def require_columns(reward: str, columns: dict, keys: tuple[str, ...], n: int) -> None:
    """One clear error naming the reward and the column that is missing or has the wrong length."""
    for key in keys:
        if key not in columns:
            raise KeyError(f"{reward} reward needs column {key!r} (got {sorted(columns)})")
        if len(columns[key]) != n:
            raise ValueError(f"column {key!r} has {len(columns[key])} rows for {n} completions")


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def check_reward_name(name: str) -> None:
    """KeyError (one line) unless `name` is registered or an importable ``pkg.module:fn``; builds nothing."""
    if not isinstance(name, str) or not name:
        raise KeyError(f"reward names must be non-empty strings, got {name!r}")
    if name not in _REGISTRY:
        obj = _import_path(name)
        if not callable(obj):
            raise KeyError(f"reward {name!r} resolves to a non-callable {type(obj).__name__}")


def _import_path(path: str):
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise KeyError(f"unknown reward {path!r}: not registered ({', '.join(registered_rewards())}) "
                       "and not a dotted path 'pkg.module:fn'")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise KeyError(f"unknown reward {path!r}: cannot import module {mod!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KeyError(f"unknown reward {path!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def get_reward(name: str, **options) -> RewardFn:
    """The reward function registered as `name` (or importable as ``pkg.module:fn`` /
    ``pkg.module.fn``), configured with `options`."""
    obj, is_factory, text = _REGISTRY[name] if name in _REGISTRY else (_import_path(name), False, False)
    if not callable(obj):
        raise TypeError(f"reward {name!r} resolves to a non-callable {type(obj).__name__}")
    if is_factory:
        fn = obj(**options)
    elif not options:
        fn = obj
    else:
        fn = functools.partial(obj, **options)
        functools.update_wrapper(fn, obj)
    return plain_text(fn) if text else fn
