"""Countdown: combine the given numbers with + - * / to reach a target (TinyZero / d1 task).

Reward (columns ``nums``, ``target``). The answer is the last ``<answer>...</answer>`` (a last
``<answer>`` left open runs to the end of the completion); inside it, its last ``\\boxed{...}`` if
it holds one (d1's prompt asks for ``<answer>\\boxed{expr}</answer>``). A completion without any
``<answer>`` tag answers with its last ``\\boxed{...}``, if any. An optional ``= target`` suffix is
ignored; LaTeX math delimiters (``$``, ``\\(``, ``\\[``), ``\\left``/``\\right``, braces and the
operators ``\\times``, ``\\cdot``, ``\\div``, ``\\frac{a}{b}`` (and ``×``, ``÷``, ``−``) are read
as arithmetic. The expression is parsed with `ast` and evaluated by walking the tree over exact
fractions (no ``eval``). 1.0 if it uses every given number exactly once and equals the target;
0.1 if it is a well-formed arithmetic expression that does not; 0.0 if there is no answer or it
is not arithmetic.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from rewards.math import last_boxed
from rewards.registry import require_columns

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")  # innermost \frac{a}{b}
# LaTeX spellings of the four operations and of grouping, as plain arithmetic
_LATEX = [(r"\times", "*"), (r"\cdot", "*"), (r"\ast", "*"), (r"\div", "/"), (r"\left", ""), (r"\right", ""),
          (r"\(", ""), (r"\)", ""), (r"\[", ""), (r"\]", ""), (r"\,", " "), (r"\;", " "), (r"\!", ""),
          (r"\ ", " "), ("$", ""), ("{", "("), ("}", ")"), ("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"),
          ("–", "-")]
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
MAX_EXPR_CHARS = 200


class _NotArithmetic(ValueError):
    pass


def _walk(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _walk(node.left, used), _walk(node.right, used)
        return _OPS[type(node.op)](a, b)  # ZeroDivisionError handled by the caller
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _walk(node.operand, used)
        return -v if isinstance(node.op, ast.USub) else v
    raise _NotArithmetic(type(node).__name__)


def evaluate(expr: str) -> tuple[Fraction | None, list[int]]:
    """Value (None on division by zero) and the integer literals of an arithmetic expression;
    raises ValueError if `expr` is not made of integers, + - * /, and parentheses."""
    if len(expr) > 8 * MAX_EXPR_CHARS:  # too long to be an answer even in LaTeX
        raise _NotArithmetic("length")
    expr = latex_to_arithmetic(expr)
    if len(expr) > MAX_EXPR_CHARS or not expr:
        raise _NotArithmetic("length")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _NotArithmetic(str(e)) from None
    used: list[int] = []
    try:
        return _walk(tree, used), used
    except ZeroDivisionError:
        return None, used


def latex_to_arithmetic(expr: str) -> str:
    """``\\frac{a}{b}`` -> ``(a)/(b)``, LaTeX operators/delimiters -> Python arithmetic (see module doc)."""
    for _ in range(MAX_EXPR_CHARS):
        expr, n = _FRAC.subn(r"((\1)/(\2))", expr)
        if not n:
            break
    for latex, plain in _LATEX:
        expr = expr.replace(latex, plain)
    return expr.strip().rstrip(".").strip()


def answer_expression(completion: str) -> str | None:
    """The expression a completion answers with (see module doc), or None."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        span = tags[-1]
    elif "<answer>" in completion:  # the last answer tag was never closed
        span = completion.rsplit("<answer>", 1)[1]
    else:
        return last_boxed(completion)
    boxed = last_boxed(span)
    return boxed if boxed is not None else span


def score_countdown(completion: str, nums: list[int], target: int) -> float:
    expr = answer_expression(completion)
    if expr is None:
        return 0.0
    if "=" in expr:
        expr = expr.split("=")[0]
    try:
        value, used = evaluate(expr)
    except _NotArithmetic:
        return 0.0
    if value is not None and value == target and Counter(used) == Counter(int(n) for n in nums):
        return 1.0
    return 0.1


def countdown_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Countdown reward over columns ``nums`` (list of ints) and ``target`` (int); see module doc."""
    require_columns("countdown", columns, ("nums", "target"), len(completions))
    return [None if n is None or t is None else score_countdown(c, n, int(t))
            for c, n, t in zip(completions, columns["nums"], columns["target"])]


STALL_DRAWS = 50_000  # draws in a row without a new problem before make_countdown_dataset gives up


def make_countdown_dataset(n: int, seed: int, num_count: int = 3, max_num: int = 20, *, min_num: int = 1,
                           max_target: int = 100) -> list[dict]:
    """`n` distinct Countdown problems ``{"nums": [...], "target": int}``, solvable by construction:
    the target is the value of a random expression tree over the numbers (integer, 1..max_target).
    Also stores the construction as ``"solution"``. Deterministic in `seed` (local RNG)."""
    if num_count < 2 or min_num < 1 or max_num < min_num:
        raise ValueError(f"need num_count >= 2 and 1 <= min_num <= max_num, got {num_count}, {min_num}, {max_num}")
    rng = random.Random(seed)
    rows, seen = [], set()
    attempts = since_new = 0
    while len(rows) < n:
        attempts += 1
        since_new += 1
        # the settings allow only so many distinct problems (3 of 1-20, target <= 100: about 16,300);
        # past them no draw is new: stop instead of drawing up to 1000 n times (the longest run of
        # old draws while 16,000 were made was 4,393)
        if attempts > 1000 * n + 10_000 or since_new > STALL_DRAWS:
            raise RuntimeError(f"could not generate {n} distinct countdown problems with these settings "
                               f"({len(rows)} made, none new in the last {since_new} draws)")
        nums = [rng.randint(min_num, max_num) for _ in range(num_count)]
        terms = [(Fraction(v), str(v)) for v in nums]
        while len(terms) > 1:
            i, j = rng.sample(range(len(terms)), 2)
            (a, ea), (b, eb) = terms[i], terms[j]
            op = rng.choice("+-*/")
            if op == "/" and b == 0:
                op = "+"
            val = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
            terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [(val, f"({ea} {op} {eb})")]
        value, expr = terms[0]
        if value.denominator != 1 or not 1 <= value <= max_target:
            continue
        key = (tuple(sorted(nums)), int(value))
        if key in seen:
            continue
        seen.add(key)
        since_new = 0
        rows.append({"nums": nums, "target": int(value), "solution": expr[1:-1] if expr.startswith("(") else expr})
    return rows
