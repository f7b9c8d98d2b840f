"""d1's rewards and evaluation parse rules (Zhao et al. 2025, github.com/dllm-reasoning/d1), rewritten.

Each ``d1_*`` function gives what the d1 function named in its docstring gives on the same input,
quirks included (docs/d1.md lists every quirk kept and why): use them to reproduce d1's numbers.
Our own verifiers (`gsm8k`, `math`, `countdown`, `sudoku`) are separate and do not share the quirks.
``scripts/check_d1_rewards.py --d1-repo <checkout>`` compares every function here with d1's code;
``tests/fixtures/d1_rewards.json`` holds d1's scores recorded by it, which the CI tests check.

Training rewards (registered in `rewards` with ``plain_text=True``; TRL keyword call, dataset
columns as keyword lists): `d1_xmlcount`, `d1_soft_format`, `d1_strict_format`, `d1_int`,
`d1_gsm8k` (column ``answer``), `d1_math` (``answer``), `d1_math_format`, `d1_countdown`
(``nums`` or d1's ``numbers``, and ``target``), `d1_sudoku` (``puzzle``, ``solution``).
A row whose needed column value is None is not scored (None, which `compose` counts as 0, as d1's
0.0 would be); a malformed row raises one error naming the reward, column and row.

Evaluation (d1's ``eval/parse_and_get_acc.py`` on its JSON layout ``{"generations": [{"question",
"generations", "ground_truth"}, ...]}``): `d1_eval_item`, `d1_eval_accuracy`, `d1_eval_record`,
the task table `D1_EVAL_TASKS` and `d1_gsm8k_gold`.

Nothing here prints or draws from a global random generator (d1's countdown and sudoku rewards
draw ``np.random.rand()`` only to decide whether to print).
"""

from __future__ import annotations

import ast
import difflib
import math
import numbers as _numbers
import operator
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from rewards.format import count_xml
from rewards.registry import require_columns

# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------

# d1's format patterns have no DOTALL, so their '.' never crosses a line: spelled [^\n] here.
# Both are anchored at the start (re.match); the strict one's final '$' also accepts one extra
# newline at the very end, hence '\n?\Z'.
_STRICT = re.compile(r"<reasoning>\n[^\n]*\n</reasoning>\n<answer>\n[^\n]*\n</answer>\n\n?\Z")
_SOFT = re.compile(r"<reasoning>[^\n]*</reasoning>\s*<answer>[^\n]*</answer>")
_ANSWER_SPANS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # all tag pairs, across lines
_ARITH_CHARS = re.compile(r"[\d+\-*/().\s]+")  # what d1 lets reach eval (\d and \s are Unicode)
_DIGIT_RUNS = re.compile(r"\d+")
_BACKSPACE_OXED = "\boxed"  # what d1's "\boxed" literal is: a backspace character, then "oxed"
_MAX_POW_BITS = 1 << 20


def _texts(reward: str, completions: Sequence[Any]) -> Sequence[str]:
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"{reward} reward: completion {i} is a {type(c).__name__}, not text")
    return completions


def _bad_row(reward: str, column: str, row: int, expected: str, value: Any) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ValueError(f"{reward} reward: column {column!r} row {row}: expected {expected}, got {shown}")


def _tag_answer(text: str) -> str:
    """d1's ``extract_xml_answer``: after the last ``<answer>``, up to the next ``</answer>``, stripped
    (the whole text when there is no tag)."""
    return text.rpartition("<answer>")[2].partition("</answer>")[0].strip()


def _last_answer_span(text: str) -> str | None:
    """The stripped inside of the last complete ``<answer>...</answer>`` pair, or None."""
    spans = _ANSWER_SPANS.findall(text)
    return spans[-1].strip() if spans else None


def _first_answer_span(text: str) -> str | None:
    m = _ANSWER_SPANS.search(text)
    return m.group(1).strip() if m else None


# ------------------------------------------------------------------------------------------------
# boxed answers and MATH string normalisation (d1's math500_utils / parser_helper, Hendrycks MATH)
# ------------------------------------------------------------------------------------------------


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the brace that brings the count of '{' minus '}' from `start` back to zero."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def d1_boxed_answer(text: str) -> str | None:
    """What d1's ``remove_boxed(last_boxed_only_string(text))`` returns, with None where that raises.

    - ``\\boxed `` (with a space) anywhere: the text after its last occurrence, up to the next ``$``;
    - else the last ``\\boxed`` (or, if none, ``\\fbox``) with its braces counted from there: the
      inside of ``\\boxed{...}``; a ``\\fbox{...}`` or ``\\boxedX{...}`` comes back whole; None if the
      braces never close (d1 raises TypeError there);
    - no box at all: the whole text (so d1 compares the whole generation).
    """
    if "\\boxed " in text:
        return text.rsplit("\\boxed ", 1)[1].split("$", 1)[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    end = _closing_brace(text, start)
    if end is None:
        return None
    boxed = text[start:end + 1]
    return boxed[len("\\boxed{"):-1] if boxed.startswith("\\boxed{") else boxed


class _NotNormalisable(Exception):
    """A step of the MATH normalisation that raises in d1 (d1 then compares the raw strings)."""


def _units_cut(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _NotNormalisable("several '\\text{ '")
    return parts[0]


def _braced_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (one character)."""
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    out = [head]
    for piece in rest:
        if not piece:
            raise _NotNormalisable("'\\sqrt' at the end")
        out.append("\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _braced_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; `s` unchanged if a
    ``\\frac`` is followed by a single character."""
    head, *rest = s.split("\\frac")
    out = [head]
    for piece in rest:
        if not piece:
            raise _NotNormalisable("'\\frac' at the end")
        if piece[0] == "{":
            out.append("\\frac" + piece)
            continue
        if len(piece) < 2:
            return s
        a, b, tail = piece[0], piece[1], piece[2:]
        out.append("\\frac{" + a + "}" + (b if b == "{" else "{" + b + "}") + tail)
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides read back as the same integers."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError as e:  # d1 lets this escape its normaliser
        raise _NotNormalisable(str(e)) from None
    return f"\\frac{{{num}}}{{{den}}}" if s == f"{num}/{den}" else s


# (old, new) replacements, in d1's order
_MATH_REPLACEMENTS = (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                      ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""))


def d1_normalise_math(s: str) -> str:
    """d1's ``strip_string`` (the Hendrycks MATH normalisation); raises where d1's raises
    (`_NotNormalisable`, or AttributeError for a non-string)."""
    for old, new in _MATH_REPLACEMENTS:
        s = s.replace(old, new)
    # d1 removes backslash-percent twice: one pass turns  \\%%  into  \%
    s = _units_cut(s).replace("\\%", "").replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs) <= 2:  # "k = 5", "x=3"
            s = rhs
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def d1_is_equiv(a: str | None, b: str | None) -> bool:
    """d1's ``is_equiv`` for strings: equal after `d1_normalise_math`; if normalising either side
    fails, the raw strings are compared instead. Two Nones are equal, one None is not."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return d1_normalise_math(a) == d1_normalise_math(b)
    except Exception:  # noqa: BLE001 - d1 falls back to raw equality on any error
        return a == b


# ------------------------------------------------------------------------------------------------
# countdown arithmetic: Python's own semantics without eval
# ------------------------------------------------------------------------------------------------


class _Unevaluable(Exception):
    pass


def _pow(a, b):
    if type(a) is int and type(b) is int and b > 0 and abs(a) > 1 and b * math.log2(abs(a)) > _MAX_POW_BITS:
        raise _Unevaluable("power too large")  # d1's eval would grind on it for minutes to years
    return a ** b


_BINARY: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                 ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: _pow}
_UNARY: dict[type, Callable] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith_value(expr: str):
    """The value Python's ``eval`` gives `expr`, computed by walking its syntax tree with Python's
    own operators (so ints, floats, complex results and rounding are eval's); raises
    `_Unevaluable` where eval raises (syntax, division by zero, calls, ...) and for integer powers
    beyond 2**20 bits. Iterative, so deep unary chains evaluate as eval's would."""
    if not _ARITH_CHARS.fullmatch(expr):
        raise _Unevaluable("not arithmetic")
    try:  # eval itself skips leading spaces and tabs
        tree = ast.parse(expr.lstrip(" \t"), mode="eval")
    except Exception as e:  # noqa: BLE001 - SyntaxError, RecursionError, MemoryError, ...
        raise _Unevaluable(type(e).__name__) from None
    todo: list[tuple[ast.AST, bool]] = [(tree.body, False)]
    values: list[Any] = []
    try:
        while todo:
            node, operands_done = todo.pop()
            if isinstance(node, ast.Constant):  # int, float, or ... (Ellipsis)
                values.append(node.value)
            elif isinstance(node, ast.Tuple) and not node.elts:  # "()"
                values.append(())
            elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
                if operands_done:
                    right = values.pop()
                    values.append(_BINARY[type(node.op)](values.pop(), right))
                else:
                    todo += [(node, True), (node.right, False), (node.left, False)]
            elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
                if operands_done:
                    values.append(_UNARY[type(node.op)](values.pop()))
                else:
                    todo += [(node, True), (node.operand, False)]
            else:  # a call such as "(1)(2)": eval raises TypeError
                raise _Unevaluable(type(node).__name__)
    except _Unevaluable:
        raise
    except Exception as e:  # noqa: BLE001 - ZeroDivisionError, OverflowError, TypeError, ...
        raise _Unevaluable(type(e).__name__) from None
    return values[0]


def _uses_numbers(equation: str, numbers) -> bool:
    """d1's ``validate_equation``: the digit runs of `equation` are exactly `numbers` (as a multiset)."""
    try:
        return sorted(int(n) for n in _DIGIT_RUNS.findall(equation)) == sorted(numbers)
    except Exception:  # noqa: BLE001 - d1 answers False on any error
        return False


def _within(value, target) -> bool | None:
    """``abs(value - target) < 1e-5``; None where that raises."""
    try:
        return bool(abs(value - target) < 1e-5)
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------
# training rewards (d1's diffu-grpo/reward_func.py)
# ------------------------------------------------------------------------------------------------


def d1_xmlcount(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``xmlcount_reward_func``: 0.125 per tag line (``<reasoning>\\n``, ``\\n</reasoning>\\n``,
    ``\\n<answer>\\n``, ``\\n</answer>``) present exactly once, minus 0.001 per character after the
    answer (`rewards.format.count_xml`)."""
    return [count_xml(c) for c in _texts("d1_xmlcount", completions)]


def d1_soft_format(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``soft_format_reward_func``: 0.5 if the text starts with ``<reasoning>...</reasoning>``,
    whitespace, ``<answer>...</answer>``, each tag pair on one line (no DOTALL), else 0.0."""
    return [0.5 if _SOFT.match(c) else 0.0 for c in _texts("d1_soft_format", completions)]


def d1_strict_format(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``strict_format_reward_func``: 0.5 if the text is exactly ``<reasoning>\\n<one line>\\n
    </reasoning>\\n<answer>\\n<one line>\\n</answer>\\n`` (one more final newline allowed), else 0.0."""
    return [0.5 if _STRICT.match(c) else 0.0 for c in _texts("d1_strict_format", completions)]


def d1_int(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``int_reward_func``: 0.5 if the answer text (after the last ``<answer>``, before the
    next ``</answer>``, stripped; the whole text without tags) is all digits (``str.isdigit``)."""
    return [0.5 if _tag_answer(c).isdigit() else 0.0 for c in _texts("d1_int", completions)]


def d1_gsm8k(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``correctness_reward_func``: 2.0 if the answer text (as in `d1_int`) equals the gold
    string exactly, else 0.0. Column ``answer``: d1's ``extract_hash_answer`` output (the text
    after ``####``, stripped, commas kept: "72", "1,000"); a full GSM8K solution containing
    ``####`` is reduced to that first."""
    texts = _texts("d1_gsm8k", completions)
    require_columns("d1_gsm8k", columns, ("answer",), len(texts))
    out: list[float | None] = []
    for i, (c, gold) in enumerate(zip(texts, columns["answer"])):
        if gold is None:
            out.append(None)
            continue
        if not isinstance(gold, str):
            raise _bad_row("d1_gsm8k", "answer", i, "a string", gold)
        if "####" in gold:
            gold = gold.split("####")[1].strip()
        out.append(2.0 if _tag_answer(c) == gold else 0.0)
    return out


def d1_math(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``correctness_reward_func_math``: 2.0 if the completion's boxed answer
    (`d1_boxed_answer`; the whole completion if its braces never close) and the gold's are
    `d1_is_equiv`, else 0.0. Column ``answer``: the MATH solution holding ``\\boxed{...}`` (d1
    passes ``solution``); a bare answer without ``\\boxed`` is used whole, as d1 would."""
    texts = _texts("d1_math", completions)
    require_columns("d1_math", columns, ("answer",), len(texts))
    out: list[float | None] = []
    for i, (c, gold) in enumerate(zip(texts, columns["answer"])):
        if gold is None:
            out.append(None)
            continue
        if not isinstance(gold, str):
            raise _bad_row("d1_math", "answer", i, "a string", gold)
        gold_answer = d1_boxed_answer(gold)
        if gold_answer is None:  # d1 raises TypeError on the whole batch here
            raise _bad_row("d1_math", "answer", i, "a solution whose last \\boxed{ closes", gold)
        pred = d1_boxed_answer(c)
        out.append(2.0 if d1_is_equiv(c if pred is None else pred, gold_answer) else 0.0)
    return out


def d1_math_format(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``boxed_and_answer_tags_format_reward`` (half of ``boxed_in_answer``): 0.5 x (1.0 if
    the text has ``<answer>``, + 1.0 if the span after the first ``<answer>`` (the whole text
    without one) contains d1's ``"\\boxed"`` literal, else 0.5). That literal is a backspace
    character then "oxed", which real text never contains: in practice 0.75 with an answer tag,
    0.25 without."""
    out: list[float | None] = []
    for c in _texts("d1_math_format", completions):
        tagged = "<answer>" in c
        span = c.split("<answer>", 2)[1].partition("</answer>")[0] if tagged else c
        out.append(0.5 * ((1.0 if tagged else 0.0) + (1.0 if _BACKSPACE_OXED in span else 0.5)))
    return out


def _countdown_score(text: str, nums: list[int], target) -> float:
    equation = _last_answer_span(text)
    if equation is None:
        return 0.0
    if not _uses_numbers(equation, nums):
        return 0.1
    try:
        value = _arith_value(equation)
    except _Unevaluable:
        return 0.1
    return 1.0 if _within(value, target) else 0.1


def d1_countdown(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``countdown_reward_func`` / ``compute_score``: 0.0 without a complete
    ``<answer>...</answer>``; else for the last one's stripped text: 0.1 unless its digit runs
    (``\\d+``) are exactly the given numbers, and 0.1 unless it is made of digits, ``+-*/().`` and
    whitespace and evaluates as Python (floats, ``//`` and ``**`` included) to within 1e-5 of the
    target, where it scores 1.0. Columns ``nums`` (ours; d1's ``numbers`` also accepted), a list of
    ints, and ``target``, a number. Evaluated without eval: see `_arith_value`."""
    texts = _texts("d1_countdown", completions)
    key = "nums" if "nums" in columns else "numbers" if "numbers" in columns else None
    if key is None:
        raise KeyError(f"d1_countdown reward needs column 'nums' (or d1's 'numbers') (got {sorted(columns)})")
    require_columns("d1_countdown", columns, (key, "target"), len(texts))
    out: list[float | None] = []
    for i, (c, nums, target) in enumerate(zip(texts, columns[key], columns["target"])):
        if nums is None or target is None:
            out.append(None)
            continue
        if (isinstance(nums, (str, bytes)) or not isinstance(nums, Sequence) or not nums
                or not all(isinstance(n, _numbers.Integral) and not isinstance(n, bool) for n in nums)):
            raise _bad_row("d1_countdown", key, i, "a non-empty list of ints", nums)
        if not isinstance(target, _numbers.Real) or isinstance(target, bool):
            raise _bad_row("d1_countdown", "target", i, "a number", target)
        out.append(_countdown_score(c, [int(n) for n in nums], target))
    return out


def _sudoku_cells(grid: str, puzzle: str, solution: str) -> tuple[int, int]:
    """(correct, empty): `grid` padded with '0' or cut to 16 characters, compared with `solution`
    on the cells that are '0' in `puzzle`."""
    grid = grid[:16].ljust(16, "0")
    empty = [i for i in range(16) if puzzle[i] == "0"]
    return sum(grid[i] == solution[i] for i in empty), len(empty)


def _check_grid(reward: str, column: str, row: int, value: Any) -> str:
    if not isinstance(value, str) or len(value) != 16:
        raise _bad_row(reward, column, row, "a 16-character string", value)
    return value


def d1_sudoku(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """= d1's ``sudoku_reward_func``: the digits (``str.isdigit``, so also e.g. superscripts) of the
    last complete ``<answer>...</answer>``, padded with '0' or cut to 16, scored as the fraction of
    the puzzle's empty cells that equal the solution; 0.0 without an answer, without digits, or
    for a puzzle without empty cells. Columns ``puzzle`` and ``solution``: 16-character strings."""
    texts = _texts("d1_sudoku", completions)
    require_columns("d1_sudoku", columns, ("puzzle", "solution"), len(texts))
    out: list[float | None] = []
    for i, (c, puzzle, solution) in enumerate(zip(texts, columns["puzzle"], columns["solution"])):
        if puzzle is None or solution is None:
            out.append(None)
            continue
        puzzle = _check_grid("d1_sudoku", "puzzle", i, puzzle)
        solution = _check_grid("d1_sudoku", "solution", i, solution)
        span = _last_answer_span(c)
        digits = "".join(ch for ch in span if ch.isdigit()) if span is not None else ""
        if not digits:
            out.append(0.0)
            continue
        correct, empty = _sudoku_cells(digits, puzzle, solution)
        out.append(correct / empty if empty else 0.0)
    return out


D1_REWARDS: dict[str, Callable] = {
    "d1_xmlcount": d1_xmlcount, "d1_soft_format": d1_soft_format, "d1_strict_format": d1_strict_format,
    "d1_int": d1_int, "d1_gsm8k": d1_gsm8k, "d1_math": d1_math, "d1_math_format": d1_math_format,
    "d1_countdown": d1_countdown, "d1_sudoku": d1_sudoku,
}

# ------------------------------------------------------------------------------------------------
# evaluation parse rules (d1's eval/parse_and_get_acc.py)
# ------------------------------------------------------------------------------------------------

_GSM_GOLD = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")
_FLAT_BOXED = re.compile(r"\\boxed\{([^\n]*?)\}")  # up to the first '}', on one line
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?")
_DOTS = re.compile(r"\.+")
_CTD_NUMBERS = re.compile(r"Numbers: \[([\d, ]+)\]", re.IGNORECASE)
_CTD_TARGET = re.compile(r"Target: (\d+)", re.IGNORECASE)
_CTD_LHS = re.compile(r"([0-9+\-*/() ]+)=[0-9. ]+")  # "<expression> = <number>": keep the expression
_CTD_LATEX = (("\\div", "/"), ("\\times", "*"), ("\\cdot", "*"))
_SUDOKU_QUESTION = re.compile(r"Sudoku puzzle: ([0-9]{16})")
_STOP = r"(?:<\|eot_id\|>|<\|endoftext\|>"  # LLaDA's end tokens (d1 decodes with them)
_SUDOKU_GRIDS = tuple(re.compile(p, re.DOTALL) for p in (
    r"<answer>.*?```\s*([\d\s]+)```",       # a fenced block after <answer>
    r"<answer>(.*?)" + _STOP + r"|</answer>)",  # the first answer, up to its end
    r"</answer>\s*(.*?)" + _STOP + r"|$)",      # text after a closing tag
    r"(\d{16})\s*</answer>",                # 16 digits right before </answer>
    r"\b(\d{16})\b",                        # any 16-digit word
))


def d1_gsm8k_gold(solution: str) -> float | None:
    """d1's GSM8K ground truth (``eval/parsers.Parser.extract_answer_gsm8k``): the first
    ``#### [$]digits-and-commas[.digits]`` as a float, commas dropped; None if there is none (so
    negative gold answers such as ``#### -3`` become None and never count as correct)."""
    m = _GSM_GOLD.search(solution)
    if not m:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:  # "#### ," (d1 prints an error and returns None)
        return None


def _gsm8k_number(content: str, *, last: bool) -> float | None:
    try:
        return float(content)
    except ValueError:
        found = _NUMBER.findall(content)
        if not found:
            return None
        try:
            return float(found[-1] if last else found[0])
        except ValueError:
            return None


def _eval_gsm8k(item: Mapping) -> dict:
    generation, truth = item.get("generations", ""), item.get("ground_truth")
    answer = None
    for content in _FLAT_BOXED.findall(generation):
        content = content.strip()
        if content and not _DOTS.fullmatch(content):
            answer = _gsm8k_number(content, last=False)
            if answer is not None:
                break
    if answer is None:
        span = _first_answer_span(generation)
        if span:
            answer = _gsm8k_number(span, last=True)
    return {"extracted_answer": answer, "ground_truth": truth,
            "is_correct": answer is not None and answer == truth}


def _eval_math(item: Mapping) -> dict:
    generation, truth = item.get("generations", ""), item.get("ground_truth", "")
    answer = d1_boxed_answer(generation)
    if not answer:
        span = _first_answer_span(generation)
        if span is not None:
            answer = span
    return {"extracted_answer": answer, "ground_truth": truth,
            "is_correct": answer is not None and d1_is_equiv(answer, truth)}


def _countdown_problem(item: Mapping) -> tuple[Any, Any]:
    truth, question = item.get("ground_truth", []), item.get("question", "")
    if isinstance(truth, list) and len(truth) == 2:
        return truth[0], truth[1]
    numbers, target = [], None
    m = _CTD_NUMBERS.search(question)
    if m:
        try:
            numbers = [int(n.strip()) for n in m.group(1).split(",")]
        except ValueError:
            raise ValueError(f"d1 countdown item: unreadable numbers in question {question[:80]!r}") from None
    m = _CTD_TARGET.search(question)
    if m:
        target = int(m.group(1))
    return numbers, target


def _eval_countdown(item: Mapping) -> dict:
    generation = item.get("generations", "")
    numbers, target = _countdown_problem(item)
    equation = d1_boxed_answer(generation)
    if equation is None:  # braces never close: the first answer tag, else the whole generation
        span = _first_answer_span(generation)
        equation = generation if span is None else span
    for latex, op in _CTD_LATEX:
        equation = equation.replace(latex, op)
    m = _CTD_LHS.search(equation)
    if m:
        equation = m.group(1).strip()
    result, correct = None, False
    if _uses_numbers(equation, numbers):
        try:
            result = _arith_value(equation.strip())
        except _Unevaluable:
            result = float("inf")
        if target is not None:
            correct = _within(result, target)
            if correct is None:  # d1's parser raises TypeError here, ending its whole run
                raise TypeError(f"d1 countdown item: abs(result - target) fails for result {result!r}, "
                                f"target {target!r} (d1's parser raises here too)")
    return {"extracted_answer": equation, "evaluation_result": result, "ground_truth": item.get("ground_truth", []),
            "is_correct": correct}


def _sudoku_puzzle(question: str) -> str:
    if len(question) >= 16 and all(ch.isdigit() for ch in question[:16]):
        return question[:16]
    m = _SUDOKU_QUESTION.search(question)
    if not m:
        raise ValueError(f"d1 sudoku item: no 16-digit puzzle in question {question[:80]!r}")
    return m.group(1)


def _eval_sudoku(item: Mapping) -> dict:
    question, truth, generation = item.get("question", ""), item.get("ground_truth", ""), item.get("generations", "")
    puzzle = _sudoku_puzzle(question)
    grid = ""
    for pattern in _SUDOKU_GRIDS:
        m = pattern.search(generation)
        if m and m.group(1).strip():
            grid = m.group(1).strip()
            break
    grid = re.sub(r"\s", "", grid)  # only whitespace goes: separators such as '|' or ',' stay
    empty = puzzle.count("0")
    correct = 0
    if grid:  # d1 reads ground_truth only here
        grid = grid[:16].ljust(16, "0")
        try:
            correct = _sudoku_cells(grid, puzzle, truth)[0]
        except (IndexError, KeyError, TypeError):
            raise ValueError(f"d1 sudoku item: ground_truth must be the 16-character solution, got {truth!r}") from None
    return {"extracted_answer": grid, "ground_truth": truth, "correct_cells": correct, "empty_cells": empty,
            "accuracy": correct / empty if empty else 0.0}


class D1EvalTask(NamedTuple):
    parse: Callable[[Mapping], dict]
    by_cells: bool  # accuracy = correct cells / empty cells (sudoku), else correct items / items


D1_EVAL_TASKS: dict[str, D1EvalTask] = {
    "gsm8k": D1EvalTask(_eval_gsm8k, False),
    "math": D1EvalTask(_eval_math, False),
    "math500": D1EvalTask(_eval_math, False),  # d1's file names say math500
    "countdown": D1EvalTask(_eval_countdown, False),
    "sudoku": D1EvalTask(_eval_sudoku, True),
}


def _task(task: str) -> D1EvalTask:
    if task not in D1_EVAL_TASKS:
        close = difflib.get_close_matches(str(task), list(D1_EVAL_TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown d1 eval task {task!r} (known: {', '.join(D1_EVAL_TASKS)}){hint}")
    return D1_EVAL_TASKS[task]


def d1_eval_item(task: str, item: Mapping) -> dict:
    """d1's ``parse_<task>_answers`` for one item ``{"question", "generations", "ground_truth"}``.

    Returns ``extracted_answer`` and ``is_correct`` (sudoku: ``extracted_answer``,
    ``correct_cells``, ``empty_cells``, ``accuracy``; d1 has no per-item correctness there), plus
    ``ground_truth`` and, for countdown, ``evaluation_result`` (None if the numbers do not match,
    inf if it does not evaluate).

    - gsm8k: the first ``\\boxed{...}`` (up to its first ``}``, one line) that is not empty or dots
      and reads as a float, or whose first ``-?\\d+(.\\d*)?`` does; else the first
      ``<answer>...</answer>`` as a float or its *last* number; correct if equal to
      ``ground_truth``, the float from `d1_gsm8k_gold`.
    - math (alias math500): `d1_boxed_answer` (the whole generation if it has no box); if that is
      None or empty, the first ``<answer>...</answer>``; correct if `d1_is_equiv` to
      ``ground_truth``, MATH-500's ``answer`` string.
    - countdown: `d1_boxed_answer` (if None: the first answer tag, else the whole generation),
      ``\\div``/``\\times``/``\\cdot`` turned into ``/ * *``, then the expression left of the first
      ``expr = number``; correct if it uses exactly the numbers and evaluates to within 1e-5 of the
      target. ``ground_truth`` is ``[numbers, target]`` (else both are read from a question
      ``"Numbers: [a, b, c]\\nTarget: t"``).
    - sudoku: the puzzle is the question's first 16 characters if they are digits, else the 16
      digits after ``"Sudoku puzzle: "`` (d1 writes ``"Solve the following Sudoku puzzle:
      <16 digits>\\n"``); the grid is the first of d1's five patterns that finds non-blank text,
      whitespace removed (other separators kept), padded with '0' or cut to 16; ``ground_truth``
      is the 16-character solution string.
    """
    return _task(task).parse(item)


def d1_eval_accuracy(task: str, items: Sequence[Mapping]) -> float:
    """The accuracy d1's ``aggregate_results`` prints for these items, as a fraction (d1 prints 100
    times it, ``%.2f``): correct items / items, or for sudoku correct cells / empty cells over all
    items; 0.0 for no items."""
    spec = _task(task)
    results = [spec.parse(item) for item in items]
    if spec.by_cells:
        correct, total = sum(r["correct_cells"] for r in results), sum(r["empty_cells"] for r in results)
    else:
        correct, total = sum(bool(r["is_correct"]) for r in results), len(results)
    return correct / total if total > 0 else 0.0


def d1_eval_record(task: str, question: str | None, generation: str, ground_truth: Any) -> dict:
    """One item in d1's generation-file layout, ``{"question", "generations", "ground_truth"}``,
    with the types d1 stores:

    - gsm8k: ``question`` the GSM8K question; ``ground_truth`` a float or None, from a GSM8K
      answer/solution string through `d1_gsm8k_gold` (a bare "72" or "1,000" is read as if after
      ``####``; "-3" gives None, as d1's parser would) or a number.
    - math / math500: ``question`` the problem; ``ground_truth`` MATH-500's ``answer`` string.
    - countdown: ``ground_truth`` ``[numbers, target]`` (ints) from a ``(numbers, target)`` pair or a
      mapping with ``nums``/``numbers`` and ``target``; ``question`` (None: built)
      ``"Numbers: [a, b, c]\\nTarget: t"``.
    - sudoku: ``ground_truth`` the 16-character solution; ``question`` d1's
      ``"Solve the following Sudoku puzzle: <16 digits>\\n"``, built when given the bare puzzle.
    """
    _task(task)
    if not isinstance(generation, str):
        raise TypeError(f"d1 {task} record: generation must be text, got {type(generation).__name__}")
    if task == "gsm8k":
        if isinstance(ground_truth, str):
            truth = d1_gsm8k_gold(ground_truth if "####" in ground_truth else "#### " + ground_truth)
        elif ground_truth is None or (isinstance(ground_truth, _numbers.Real) and not isinstance(ground_truth, bool)):
            truth = None if ground_truth is None else float(ground_truth)
        else:
            raise ValueError(f"d1 gsm8k record: ground_truth must be a GSM8K answer string or a number, "
                             f"got {ground_truth!r}")
    elif task in ("math", "math500"):
        if not isinstance(ground_truth, str):
            raise ValueError(f"d1 {task} record: ground_truth must be MATH-500's answer string, got {ground_truth!r}")
        truth = ground_truth
    elif task == "countdown":
        if isinstance(ground_truth, Mapping):
            nums = ground_truth.get("nums", ground_truth.get("numbers"))
            pair = (nums, ground_truth.get("target"))
        else:
            pair = ground_truth
        if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
                or isinstance(pair[0], (str, bytes)) or not isinstance(pair[0], Sequence)
                or not all(isinstance(n, _numbers.Integral) and not isinstance(n, bool) for n in pair[0])
                or not isinstance(pair[1], _numbers.Integral) or isinstance(pair[1], bool)):
            raise ValueError(f"d1 countdown record: ground_truth must be (numbers, target) ints, got {ground_truth!r}")
        truth = [[int(n) for n in pair[0]], int(pair[1])]
        if question is None:
            question = f"Numbers: {truth[0]}\nTarget: {truth[1]}"
    else:  # sudoku
        if not isinstance(ground_truth, str) or len(ground_truth) != 16:
            raise ValueError(f"d1 sudoku record: ground_truth must be the 16-character solution, got {ground_truth!r}")
        truth = ground_truth
        if isinstance(question, str) and len(question) == 16 and question.isdigit():
            question = f"Solve the following Sudoku puzzle: {question}\n"
        _sudoku_puzzle(question if isinstance(question, str) else "")
    if not isinstance(question, str):
        raise ValueError(f"d1 {task} record: question must be text, got {question!r}")
    return {"question": question, "generations": generation, "ground_truth": truth}


__all__ = ["D1_EVAL_TASKS", "D1_REWARDS", "D1EvalTask", "d1_boxed_answer", "d1_countdown", "d1_eval_accuracy",
           "d1_eval_item", "d1_eval_record", "d1_gsm8k", "d1_gsm8k_gold", "d1_int", "d1_is_equiv", "d1_math",
           "d1_math_format", "d1_normalise_math", "d1_soft_format", "d1_strict_format", "d1_sudoku",
           "d1_xmlcount"]
