"""GSM8K reward: exact numeric match of the final answer (Cobbe et al. 2021, ``#### N`` format).

The completion's final answer is taken from, in order: the last ``<answer>...</answer>`` (a last
``<answer>`` left open runs to the end; its last ``\\boxed{}`` if that holds a number, else its
text), the text after the last ``####``, the last ``\\boxed{}``, else the whole completion;
within the chosen span the *last* number counts. An answer tag without a number (empty, or the
template's ``\\boxed{...}``) defers to a ``####`` or ``\\boxed{}`` with a number elsewhere, and
otherwise answers nothing (it never falls back to the last number of the reasoning).
Commas, ``$``, units, ``\\frac{a}{b}`` and trailing ``.00`` are handled by comparing numbers as
exact fractions ("1,234.00 dollars" == "1234").
"""

from __future__ import annotations

import re
from fractions import Fraction

from rewards.math import last_boxed

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
# a number: optional sign, digits with optional thousands commas, optional decimals, or a fraction a/b
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_NUMBER = re.compile(r"(?<![\w.])[-−]?\s?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?|(?<![\w.])[-−]?\.\d+")


def _to_fraction(tok: str) -> Fraction | None:
    t = tok.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in t:
            num, den = t.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number in `text` as an exact fraction (commas, ``$``, ``-``, ``a/b`` and
    ``\\frac{a}{b}`` understood)."""
    text = _FRAC.sub(lambda m: f" {m[1].replace(',', '')}/{m[2].replace(',', '')} ", text)
    for tok in reversed(_NUMBER.findall(text)):
        f = _to_fraction(tok)
        if f is not None:
            return f
    return None


def _last_numbered_box(text: str) -> str | None:
    """Content of the last ``\\boxed{}`` of `text` that holds a number."""
    while True:
        boxed = last_boxed(text)
        if boxed is None:
            return None
        if last_number(boxed) is not None:
            return boxed
        cut = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
        if cut < 0:
            return None
        text = text[:cut]


def answer_span(text: str) -> str:
    """The span of a completion that holds its final answer (see module doc for the order)."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        span = tags[-1]
        boxed = last_boxed(span)
        if boxed is not None and last_number(boxed) is not None:
            return boxed
        if last_number(span) is not None:
            return span
        # an answer tag without a number (empty, or the template's "\boxed{...}"): only an explicit
        # final answer elsewhere counts, never the last number of the reasoning
        if "####" in text and last_number(text.rsplit("####", 1)[1]) is not None:
            return text.rsplit("####", 1)[1]
        boxed = _last_numbered_box(text)
        return boxed if boxed is not None else span
    if "####" in text:
        return text.rsplit("####", 1)[1]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return text


def extract_answer(text: str) -> str | None:
    """The final numeric answer of `text` normalized to a canonical string ("1234", "-2.5", "3/4"),
    or None if it holds no number."""
    f = last_number(answer_span(text))
    if f is None:
        return None
    if f.denominator == 1:
        return str(f.numerator)
    dec = f.numerator / f.denominator
    return str(f) if Fraction(repr(dec)) != f else repr(dec)


def gold_number(answer: str) -> Fraction | None:
    """The gold number of a GSM8K ``answer`` (full solution ending ``#### N``) or a bare number."""
    span = answer.rsplit("####", 1)[1] if "####" in answer else answer
    return last_number(span)


def gsm8k_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """1.0 if the completion's final number equals the gold (column ``answer``), else 0.0."""
    if "answer" not in columns:
        raise KeyError("gsm8k reward needs column 'answer'")
    answers = columns["answer"]
    if len(answers) != len(completions):
        raise ValueError(f"column 'answer' has {len(answers)} rows for {len(completions)} completions")
    out: list[float | None] = []
    for i, (c, a) in enumerate(zip(completions, answers)):
        if a is None:
            out.append(None)
            continue
        gold = gold_number(str(a))
        if gold is None:
            raise ValueError(f"column 'answer' row {i}: no number in {str(a)[-80:]!r}")
        pred = last_number(answer_span(c))
        out.append(1.0 if pred is not None and pred == gold else 0.0)
    return out
