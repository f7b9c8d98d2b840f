"""Math answer reward: equivalence via math-verify, run in killable worker processes.

Answer extraction (completion): inside the last ``<answer>...</answer>`` if present (its last
``\\boxed{}`` if it holds one, else its text), else the last ``\\boxed{}``/``\\fbox{}`` of the
completion, else math-verify's own extraction over the whole completion. An empty answer tag
(or ``\\boxed{}``) answers with a non-empty ``\\boxed{}`` elsewhere if any, else nothing (0).
Gold (column ``answer``): a bare LaTeX answer, or a solution whose last ``\\boxed{}`` is the
answer; it is parsed first, as math-verify expects (``verify(gold, pred)``). A trailing percent
sign is dropped from both (``10\\%`` == ``10``, as in MATH's own normalizer; math-verify alone
says no).

math-verify's own timeout uses SIGALRM, which only works on a main thread (verl once scored
everything 0 because of this). Here each item runs on the main thread of a `TimeoutPool`
worker (so the soft SIGALRM timeout works) and the parent SIGKILLs a worker that overruns the
hard deadline. Inputs that are known to blow up sympy (exponent towers, huge literal
exponents or factorials, deep nesting, very long answers) score 0 without being parsed.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Sequence

from rewards._pool import TimeoutPool

log = logging.getLogger("rewards")

MAX_ANSWER_CHARS = 400
MAX_NESTING = 12

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``), braces matched."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for s in reversed(starts):
        if s < len(text) and text[s] == "{":
            depth = 0
            for j in range(s, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[s + 1:j]
            continue  # unbalanced: try an earlier one
        m = re.match(r"[^\s$]+", text[s:])
        if m:
            return m.group(0)
    return None


def extract_answer(completion: str) -> str | None:
    """The answer string of a completion; ``""`` if it answers nothing (an empty answer tag or
    box); None if it has neither tag nor box (then math-verify searches the whole text)."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        inner = tags[-1]
        boxed = last_boxed(inner)
        inner = (boxed if boxed is not None else inner).strip()
        if inner:
            return inner
        # an empty answer tag (or the template's empty box): a non-empty box elsewhere answers,
        # never math-verify's pick from the reasoning
        text = completion
        while (boxed := last_boxed(text)) is not None:
            if boxed.strip():
                return boxed
            text = text[:max(text.rfind("\\boxed"), text.rfind("\\fbox"))]
        return ""
    return last_boxed(completion)


def gold_answer(answer: str) -> str:
    """A bare gold answer from the ``answer`` column (a solution's last ``\\boxed{}`` if any)."""
    boxed = last_boxed(answer)
    text = boxed if boxed is not None else answer
    return text.strip().strip("$").strip()


def is_pathological(s: str) -> bool:
    """True for strings sympy cannot evaluate quickly: towers of exponents (a^b^c), literal
    exponents/factorials beyond a few digits, nesting deeper than MAX_NESTING, or length."""
    if len(s) > MAX_ANSWER_CHARS:
        return True
    depth = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif ch in ")]}":
            depth -= 1
    t = s.replace("**", "^").replace(" ", "")
    for m in re.finditer(r"\^", t):  # exponent of this power: a braced group, or one token
        rest = t[m.end():]
        if rest.startswith("{"):
            d, j = 0, 0
            for j, ch in enumerate(rest):
                d += (ch == "{") - (ch == "}")
                if d == 0:
                    break
            expo = rest[1:j]
        elif rest.startswith("("):
            d, j = 0, 0
            for j, ch in enumerate(rest):
                d += (ch == "(") - (ch == ")")
                if d == 0:
                    break
            expo = rest[1:j]
        else:
            mm = re.match(r"[\w.\\]+(?:\^[\w.{}()]+)*", rest)
            expo = mm.group(0) if mm else ""
        if "^" in expo or re.search(r"\d{7,}", expo):
            return True
    if re.search(r"\d{5,}\s*!|\)\s*!|\}\s*!", t):
        return True
    return False


_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\text\{\s*percent\s*\})\s*$")


def strip_percent(s: str) -> str:
    """`s` without a trailing percent sign (``10\\%`` -> ``10``), as MATH's normalizer compares
    answers: a question that asks "what percent" has a bare gold such as ``10``."""
    return _PERCENT.sub("", s)


def _verify_item(item: tuple[str | None, str, str, int]) -> float:
    """Worker side: 1.0 if the completion's answer is equivalent to the gold, else 0.0."""
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    pred_text, completion, gold, soft = item
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse("\\boxed{" + gold + "}", extraction_config=cfg, parsing_timeout=soft)
    if not g:
        g = parse(gold, extraction_config=cfg, parsing_timeout=soft)
    if not g:
        return 0.0
    if pred_text is not None:
        p = parse("\\boxed{" + pred_text + "}", extraction_config=cfg, parsing_timeout=soft)
    else:
        p = parse(completion, parsing_timeout=soft)
    if not p:
        return 0.0
    return 1.0 if verify(g, p, timeout_seconds=soft) else 0.0


def __getattr__(name: str):
    """``_warm_verify_item``: `_verify_item` after importing math-verify and scoring one item. The
    worker pool loads its function by this name before it reports ready, so a fresh worker's
    imports and parser set-up never count against the deadline of a real item."""
    if name == "_warm_verify_item":
        try:
            _verify_item(("1", "", "1", 5))
        except Exception:  # noqa: BLE001 - best effort: a real item reports the error as before
            pass
        return _verify_item
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_POOLS: dict[tuple[int, float], TimeoutPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int, timeout_s: float) -> TimeoutPool:
    with _POOLS_LOCK:
        key = (workers, timeout_s)
        if key not in _POOLS:
            _POOLS[key] = TimeoutPool("rewards.math:_warm_verify_item", workers=workers, timeout_s=timeout_s)
        return _POOLS[key]


class MathReward:
    """`get_reward("math", workers=2, timeout_s=5.0)`: 1.0 if the completion's answer equals
    column ``answer`` (math-verify equivalence), else 0.0. ``None`` for rows whose answer is None."""

    __name__ = "math"
    handles_timeouts = True  # per-sample deadlines in worker processes

    def __init__(self, *, workers: int = 2, timeout_s: float = 5.0):
        self.workers, self.timeout_s = int(workers), float(timeout_s)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        if "answer" not in columns:
            raise KeyError("math reward needs column 'answer'")
        answers = columns["answer"]
        if len(answers) != len(completions):
            raise ValueError(f"column 'answer' has {len(answers)} rows for {len(completions)} completions")
        return score_math(completions, answers, workers=self.workers, timeout_s=self.timeout_s)


def score_math(completions: Sequence[str], answers: Sequence[str | None], *, workers: int = 2,
               timeout_s: float = 5.0) -> list[float | None]:
    out: list[float | None] = [None] * len(completions)
    items, idx = [], []
    soft = max(1, int(timeout_s / 3))
    for i, (c, a) in enumerate(zip(completions, answers)):
        if a is None:
            continue
        pred = extract_answer(c)
        gold = strip_percent(gold_answer(str(a)))
        pred = None if pred is None else strip_percent(pred)
        if pred is not None and not pred.strip():  # answers nothing
            out[i] = 0.0
            continue
        if (pred is not None and is_pathological(pred)) or is_pathological(gold) or (pred is None and len(c) > 20_000):
            out[i] = 0.0
            continue
        items.append((pred, c if pred is None else "", gold, soft))
        idx.append(i)
    if items:
        for i, (status, val) in zip(idx, _pool(workers, timeout_s).map(items)):
            if status != "ok":
                log.warning("math reward: sample %d %s (%s); scored 0", i, status, val)
            out[i] = float(val) if status == "ok" else 0.0
    return out


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether the answer in `pred` (a completion or a bare answer) equals `gold` (see module doc)."""
    return score_math([pred], [gold], workers=1, timeout_s=timeout_s)[0] == 1.0
