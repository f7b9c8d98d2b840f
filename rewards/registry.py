"""Reward registry: names -> factories, user registration, and dotted-path lookup.

A reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``.
Built-ins register a *factory* (``options -> fn``) so that stateful rewards (worker pools,
sandboxes) are configured by `get_reward` options; plain functions get options bound as keywords.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

RewardFn = Callable[..., list]
_REGISTRY: dict[str, tuple[Callable, bool]] = {}


def register_reward(name: str, *, factory: bool = False):
    """Decorator: register a reward function (or, with ``factory=True``, a ``(**options) -> fn``)
    under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def deco(obj):
        if name in _REGISTRY and _REGISTRY[name][0] is not obj:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = (obj, factory)
        return obj

    return deco


def require_columns(reward: str, columns: dict, keys: tuple[str, ...], n: int) -> None:
    """One clear error naming the reward and the column that is missing or has the wrong length."""
    for key in keys:
        if key not in columns:
            raise KeyError(f"{reward} reward needs column {key!r} (got {sorted(columns)})")
        if len(columns[key]) != n:
            raise ValueError(f"column {key!r} has {len(columns[key])} rows for {n} completions")


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


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
    if name in _REGISTRY:
        obj, is_factory = _REGISTRY[name]
    else:
        obj, is_factory = _import_path(name), False
    if not callable(obj):
        raise TypeError(f"reward {name!r} resolves to a non-callable {type(obj).__name__}")
    if is_factory:
        return obj(**options)
    if not options:
        return obj
    fn = functools.partial(obj, **options)
    functools.update_wrapper(fn, obj)
    return fn
