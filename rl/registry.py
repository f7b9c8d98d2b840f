"""The one registry type: a named list of implementations, filled by a decorator.

Objectives, likelihood estimators, advantage estimators and loss aggregations are each one
:class:`Registry`; configs, ``dllm-rl --help`` and validation read it, so a new entry appears
everywhere by being registered::

    @OBJECTIVES.register
    class MyObjective(Objective):
        name = "mine"
"""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name that is not registered; the message lists the choices and the closest names.
    (A ``ValueError`` too, so config code that catches ``ValueError`` reports it as a bad value.)"""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict):
    """``name -> entry``. ``kind`` names what is registered (in errors and help)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, obj: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (default: its ``name`` attribute, else its
        ``__name__``). Usable bare (``@R.register``) or with a name (``@R.register(name="x")``)."""
        def deco(o: T) -> T:
            key = name or getattr(o, "name", None) or getattr(o, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind}: cannot register {o!r} without a name")
            if key in self and self[key] is not o:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self[key] = o
            return o

        return deco if obj is None else deco(obj)

    def lookup(self, key: str):
        """The entry registered as ``key``, or :class:`UnknownName` with a "did you mean"."""
        if key in self:
            return self[key]
        raise UnknownName(self.unknown(key))

    def unknown(self, key) -> str:
        """The one-line error text for an unregistered ``key``."""
        close = difflib.get_close_matches(str(key), list(self), n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {key!r}{hint} (registered: {', '.join(sorted(self))})"

    def names(self) -> list[str]:
        return sorted(self)
