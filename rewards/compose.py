"""Weighted composition of reward functions with per-sample failure isolation.

``compose({"gsm8k": 1.0, "format_soft": 0.5})(prompts, completions, **columns)`` returns
``RewardOutput(total, per_function)``: `total` is the weighted sum (``None`` components count 0,
every value finite) and `per_function` keeps each component's raw list for the
``rewards/<name>/mean`` metrics. ``compose_funcs(reward_funcs, reward_weights)`` is the same from
TRL's two lists (callables or registered names).

Every function is called with keywords exactly as TRL's GRPOTrainer calls it::

    fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, trainer_state=state)

(``completion_ids`` / ``trainer_state`` only when the caller has them); columns are the dataset's
other columns as one list entry per completion; for chat prompts (lists of messages) each
completion is ``[{"role": "assistant", "content": text}]``. :func:`reward_inputs` builds these
keywords from dataset rows, so training and evaluation score through the same call.

Each function is first called on the whole batch, in its own thread, with a wall-clock budget
of `timeout_s` (functions with ``handles_timeouts = True``, such as the math and code rewards,
enforce per-sample budgets themselves and get no batch deadline). If the batch call raises,
overruns, or returns something malformed (wrong length, non-numbers, NaN/inf), the function is
re-run sample by sample with the same budget each; samples that still fail score `on_error`
and are logged (logger ``rewards``) with the function name and sample indices. A thread that
never returns cannot be killed; it is abandoned (daemon) and never blocks the run.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from rewards.registry import get_reward

log = logging.getLogger("rewards")


@dataclass
class RewardOutput:
    total: list[float]
    per_function: dict[str, list[float | None]]


class _Timeout(Exception):
    pass


def _call(fn: Callable, kwargs: dict, timeout: float | None) -> Any:
    """Call `fn` in a daemon thread; raise `_Timeout` after `timeout` seconds (None = no limit)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(**kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"reward-{getattr(fn, '__name__', 'fn')}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _Timeout(f"exceeded {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _clean(values: Any, n: int) -> list[float | None]:
    """Validate a reward function's output: a length-n sequence of finite numbers or None."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n:
        raise ValueError(f"expected a list of {n} scores, got {type(values).__name__}"
                         f"{' of length ' + str(len(values)) if hasattr(values, '__len__') else ''}")
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"non-finite score {v!r}")
        out.append(f)
    return out


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class ComposedReward:
    """Callable ``(prompts, completions, **columns) -> RewardOutput``; see module doc."""

    def __init__(self, components: Sequence[tuple[str, Callable, float]], *, timeout_s: float = 60.0,
                 on_error: float | None = 0.0, max_workers: int | None = None):
        names = [c[0] for c in components]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate reward names {sorted(dup)}: give each component a distinct name")
        if not components:
            raise ValueError("compose needs at least one reward function")
        self.components = list(components)
        self.timeout_s, self.on_error = float(timeout_s), on_error
        self._slots = threading.BoundedSemaphore(max(1, max_workers or len(components)))

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.components]

    @property
    def weights(self) -> dict[str, float]:
        return {n: w for n, _, w in self.components}

    def _run_one(self, name: str, fn: Callable, kwargs: dict[str, Any], n: int) -> list[float | None]:
        budget = None if getattr(fn, "handles_timeouts", False) else self.timeout_s
        try:
            return _clean(_call(fn, kwargs, budget), n)
        except BaseException as e:  # noqa: BLE001
            batch_error = e
        out: list[float | None] = []
        failed: dict[str, list[int]] = {}
        for i in range(n):
            one = {k: v if k == "trainer_state" else [v[i]] for k, v in kwargs.items()}
            try:
                out.append(_clean(_call(fn, one, self.timeout_s), 1)[0])
            except BaseException as e:  # noqa: BLE001
                failed.setdefault(f"{type(e).__name__}: {e}"[:300], []).append(i)
                out.append(self.on_error)
        for err, idx in failed.items():
            log.warning("reward %r failed on samples %s (%s); scored %r", name, idx, err, self.on_error)
        if not failed:
            log.warning("reward %r failed on the batch (%s: %s) but not per sample", name, type(batch_error).__name__,
                        str(batch_error)[:300])
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence | None = None,
                 trainer_state: Any = None, **columns) -> RewardOutput:
        """Score a batch; every argument is passed on by keyword (see module doc)."""
        prompts, completions = list(prompts), list(completions)
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions")
        kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions}
        lists = dict(columns) if completion_ids is None else {"completion_ids": completion_ids, **columns}
        for k, v in lists.items():
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != n:
                raise ValueError(f"column {k!r} must be a list with one entry per completion ({n})")
            kwargs[k] = list(v)
        if trainer_state is not None:
            kwargs["trainer_state"] = trainer_state
        results: dict[str, list[float | None]] = {}

        def work(name: str, fn: Callable) -> None:
            with self._slots:
                results[name] = self._run_one(name, fn, kwargs, n)

        threads = [threading.Thread(target=work, args=(name, fn), daemon=True) for name, fn, _ in self.components]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        per_function = {name: results[name] for name in self.names}
        total = [0.0] * n
        for name, _, w in self.components:
            for i, v in enumerate(per_function[name]):
                if v is not None:
                    total[i] += w * v
        total = [t if math.isfinite(t) else 0.0 for t in total]
        return RewardOutput(total=total, per_function=per_function)


def is_conversational(prompt: Any) -> bool:
    """A chat prompt: a list of ``{"role", "content"}`` messages (TRL's conversational format)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], Mapping) \
        and "role" in prompt[0]


def reward_inputs(rows: Sequence[Mapping], completions: Sequence[str], completion_ids: Sequence | None = None,
                  *, exclude: tuple[str, ...] = ("response",)) -> dict[str, Any]:
    """The keywords TRL's GRPOTrainer passes to reward functions, built from one dataset row per
    completion: ``prompts`` (as stored), ``completions`` (message lists for chat prompts),
    ``completion_ids`` when given, and every other column as a list (``prompt``/``completion``
    columns and `exclude` left out; ``response`` is the SFT label, never a reward input)."""
    rows = list(rows)
    if len(rows) != len(completions):
        raise ValueError(f"got {len(rows)} rows for {len(completions)} completions")
    prompts = [r["prompt"] for r in rows]
    if prompts and is_conversational(prompts[0]):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    skip = {"prompt", "completion", "completion_ids", *exclude}
    keys = [k for k in (rows[0] if rows else {}) if k not in skip]
    out: dict[str, Any] = {"prompts": prompts, "completions": list(completions)}
    if completion_ids is not None:
        out["completion_ids"] = [list(c) for c in completion_ids]
    out.update({k: [r.get(k) for r in rows] for k in keys})
    return out


def compose(spec: Mapping[str, Any] | Sequence[Any], *, timeout_s: float = 60.0, on_error: float | None = 0.0,
            max_workers: int | None = None) -> ComposedReward:
    """Build a `ComposedReward` from ``{name: weight}``, ``{name: {"weight": w, **options}}`` or a
    list of ``(name_or_callable, weight)`` / ``(name_or_callable, weight, options)``."""
    items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    components: list[tuple[str, Callable, float]] = []
    for k, entry in enumerate(items):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) not in (2, 3):
            raise ValueError(f"reward spec entry {k}: expected (name_or_callable, weight[, options]), got {entry!r}")
        ref, weight = entry[0], entry[1]
        options = dict(entry[2]) if len(entry) == 3 else {}
        if isinstance(weight, Mapping):
            options = {**{o: v for o, v in weight.items() if o != "weight"}, **options}
            weight = weight.get("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward spec entry {k} ({ref!r}): weight must be a number, got {weight!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"reward spec entry {k} ({ref!r}): weight must be finite")
        if isinstance(ref, str):
            name, fn = ref, get_reward(ref, **options)
        elif callable(ref):
            if options:
                raise ValueError(f"reward spec entry {k}: options only apply to registered names")
            name, fn = _fn_name(ref), ref
        else:
            raise ValueError(f"reward spec entry {k}: {ref!r} is neither a name nor a callable")
        components.append((name, fn, weight))
    return ComposedReward(components, timeout_s=timeout_s, on_error=on_error, max_workers=max_workers)


def compose_funcs(reward_funcs: Any, reward_weights: Sequence[float] | None = None, **options) -> ComposedReward:
    """TRL's pair: ``reward_funcs`` (a callable, a registered name, or a list of them) and
    ``reward_weights`` (one weight each; default 1.0 each)."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    weights = [1.0] * len(funcs) if reward_weights is None else list(reward_weights)
    if len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(funcs)} reward_funcs")
    return compose(list(zip(funcs, weights)), **options)
