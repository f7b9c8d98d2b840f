"""Addition by counting up, with a worked line per step: the task of scripts/bench_frontier.py.

A problem is "count ``C`` up from ``N``" (``N`` with ``W`` digits, ``C`` two digits), stated as
the first line of its worked solution: the prompt ``"11:03914"`` (steps to go, then the value
zero-padded to ``W + 1`` digits) has the completion

    10:03915
    09:03916
    ...
    00:03925
    =3925

one line per step, counting the steps down to ``00`` and the value up by one, then ``=`` and the
sum; the trainer fills the rest of ``gen_length`` with EOS, as LLaDA's SFT does. A completion is
``C * (W + 5) + 1 + len(sum)`` characters, so its length, and where EOS starts, vary with ``C``
(4 digits, C in 8..24: 77 to 221). One wrong digit anywhere propagates to the answer, which
counts as correct when the last line states the true sum (:func:`is_correct`).

Why this shape: every line is computed from the line above (counter minus one, value plus one,
with carries), which is the sequential dependence parallel decoding can break. Stating the
problem as ``"N+C"`` instead (the first completion line copying the prompt's numbers) left the
0.9M-parameter tiny model at 0% after 3000 SFT steps: it learned the line-to-line step but not
the copy from the prompt; richer worked arithmetic (a line per column pair, running sums of a
column of numbers) also stayed at 0% within 1500 steps on 2 CPU cores.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass

LINE = re.compile(r"(\d\d):(\d+)")


@dataclass(frozen=True)
class Example:
    """One problem: ``prompt`` (the first worked line), the rest of the worked ``completion`` and
    the ``answer`` (``number + count``)."""

    number: int
    count: int
    prompt: str
    completion: str
    answer: str


def check_shape(digits: int, counts: tuple[int, int]) -> None:
    """One ``ValueError`` unless ``digits`` >= 1 and 1 <= min count <= max count <= 99 (two-digit counters)."""
    lo, hi = counts
    if digits < 1 or not 1 <= lo <= hi <= 99:
        raise ValueError(f"count-up task: digits={digits}, counts={lo}-{hi}: need digits >= 1 and "
                         "1 <= min <= max <= 99")


def make_example(number: int, count: int, digits: int) -> Example:
    """The :class:`Example` of ``number + count`` (``number`` has ``digits`` digits)."""
    check_shape(digits, (count, count))
    if len(str(number)) != digits:
        raise ValueError(f"count-up task: {number} does not have {digits} digits")
    lines = [f"{count - j:02d}:{number + j:0{digits + 1}d}" for j in range(count + 1)]
    total = str(number + count)
    return Example(number, count, prompt=lines[0], completion="\n".join(lines[1:] + [f"={total}"]), answer=total)


def sample(rng: random.Random, n: int, digits: int, counts: tuple[int, int]) -> list[Example]:
    """``n`` random problems: ``digits``-digit numbers, counts uniform in ``counts``."""
    check_shape(digits, counts)
    return [make_example(rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randint(*counts), digits)
            for _ in range(n)]


def n_problems(digits: int, counts: tuple[int, int]) -> int:
    """How many distinct problems (prompts) the shape has."""
    check_shape(digits, counts)
    return 9 * 10 ** (digits - 1) * (counts[1] - counts[0] + 1)


def held_out(seed: int, n: int, digits: int, counts: tuple[int, int],
             exclude: Collection[str] = ()) -> list[Example]:
    """``n`` problems with distinct prompts from ``seed`` (the benchmark's test set), none of them in
    ``exclude`` (skipping a problem never changes the ones after it). One ``ValueError`` when fewer
    than ``n`` problems of this shape are left."""
    seen, total = set(exclude), n_problems(digits, counts)
    if n > total - len(seen):
        raise ValueError(f"count-up task: {n} distinct problems asked, {total} of {digits} digits and counts "
                         f"{counts[0]}-{counts[1]} exist, {len(seen)} excluded")
    rng, out = random.Random(seed), []
    while len(out) < n:
        ex = sample(rng, 1, digits, counts)[0]
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def drawn(seed: int, n: int, digits: int, counts: tuple[int, int]) -> set[str]:
    """The prompts of the first ``n`` problems :func:`sample` draws from ``random.Random(seed)``.

    A training run seeded with ``seed`` that draws its batches with :func:`sample` (in any chunk
    sizes) and skips some problems has seen a subset of these once ``n`` covers its draws, the
    skipped ones included."""
    return {ex.prompt for ex in sample(random.Random(seed), n, digits, counts)}


def parse_counts(spec: str) -> tuple[int, int]:
    """``"8-24"`` or ``"16"`` -> (min, max); one ``ValueError`` otherwise."""
    lo, _, hi = spec.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"counts={spec!r}: expected N or MIN-MAX, e.g. 8-24") from None


def final_answer(text: str) -> str | None:
    """The sum a completion states: the digits after ``=`` on its last non-empty line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines or not re.fullmatch(r"=\d+", lines[-1]):
        return None
    return lines[-1][1:]


def is_correct(text: str, example: Example) -> bool:
    """The completion's stated sum equals the true sum (the benchmark's accuracy)."""
    return final_answer(text) == example.answer


def steps_consistent(text: str, example: Example) -> bool:
    """Every worked line is right: counters from ``C - 1`` down to ``00``, values from ``N + 1`` up
    by one, zero-padded to one digit more than ``N``, then the sum."""
    number, count = example.number, example.count
    width = len(str(number)) + 1
    lines = text.strip().splitlines()
    if len(lines) != count + 1:
        return False
    for j, line in enumerate(lines[:-1], start=1):
        m = LINE.fullmatch(line)
        if not m or int(m[1]) != count - j or m[2] != f"{number + j:0{width}d}":
            return False
    return lines[-1] == f"={number + count}" == f"={example.answer}"
