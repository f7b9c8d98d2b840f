"""Sudoku 4x4: reward, validity/solve checks, and a seeded generator of unique-solution puzzles.

Grids are 16-character strings, row-major, ``'0'`` = empty. Boxes are 2x2.

Reading a completion's grid (`parse_grid`):

- No answer tag at all (the tiny model's format, e.g. 16 bare digits): the digits of the whole
  completion are read in order and the first 16 form the grid; fewer than 16 digits: no grid.
- Otherwise the answer span is the last ``<answer>...</answer>``; a last ``<answer>`` left open
  runs to the end of the completion; a span without digits is replaced by the text after its
  ``</answer>`` when that has digits (a grid written after the tags); a ``</answer>`` without any
  ``<answer>`` (the opening tag garbled) answers with the text after it if that has digits, else
  with the block of digit-only lines just before it.
- In an answer span, row/column labels (``Row 1:``, ``C2``), list markers (``1.``, ``-``) and
  ``4x4`` are not cells. A grid written as 2 to 4 lines of four cells each (digits, or ``_ . * ?``
  for a cell left empty; the last line may stop short and is read from the left) is read cell by
  cell, rows top-down; missing rows/cells and placeholders are empty (``'0'``), so a partial grid
  earns partial credit. Otherwise the span's digits are read in order as above (first 16; fewer:
  no grid, since which cell a digit belongs to is then unknown).

The reward credits the puzzle's empty cells filled correctly; ``sudoku_solved`` needs the exact
solution (a grid with an empty cell never solves).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Sequence
from rewards.registry import require_columns

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_DIGIT = re.compile(r"\d")
# not cells: row/column labels, list markers, "4x4"
_LABELS = re.compile(r"(?im)\b(?:row|col(?:umn)?|box|r|c)\s*#?\d\b\s*[:=.)-]?"  # Row 1:  col 2  R3  C4
                     r"|^\s*(?:\d[.)]|[-\u2022])\s+"  # list markers "1." "2)" "-" at a line start
                     r"|\b\d\s*[x\u00d7]\s*\d\b")  # 4x4
_PLACEHOLDER = "_.*?"
_CELL = re.compile(r"\d|[_?]|(?<![^\s|,;\[(])[.*](?![^\s|,;\])])")  # a digit, _ or ?, or a standalone . or *
_UNITS = ([[r * 4 + c for c in range(4)] for r in range(4)]
          + [[r * 4 + c for r in range(4)] for c in range(4)]
          + [[(br + r) * 4 + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)])
_PEERS = [sorted({j for u in _UNITS if i in u for j in u} - {i}) for i in range(16)]


def _first16(text: str) -> str | None:
    digits = _DIGIT.findall(text)
    return "".join(digits[:16]) if len(digits) >= 16 else None


def _trailing_grid_block(text: str) -> str:
    """The consecutive lines at the end of `text` that hold digits and no letters."""
    block: list[str] = []
    for line in reversed(text.splitlines()):
        if not line.strip() and not block:
            continue
        if not _DIGIT.search(line) or re.search(r"[A-Za-z]", line):
            break
        block.append(line)
    return "\n".join(reversed(block))


def answer_span(completion: str) -> str | None:
    """The part of a tagged completion that holds its grid (see module doc); None without tags."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        span = tags[-1]
        if not _DIGIT.search(span):
            after = completion.rsplit("</answer>", 1)[1]
            return after if _DIGIT.search(after) else span
        return span
    if "<answer>" in completion:  # the last answer tag was never closed
        return completion.rsplit("<answer>", 1)[1]
    if "</answer>" in completion:  # closed but never (recognizably) opened
        before, after = completion.rsplit("</answer>", 1)
        return after if _DIGIT.search(after) else _trailing_grid_block(before)
    return None


def _rows_grid(span: str) -> str | None:
    """The grid of a span written as 2-4 lines of four cells each (the last line may stop short),
    else None."""
    rows = []
    for line in span.splitlines():
        if re.search(r"[A-Za-z]", line):
            return None
        cells = _CELL.findall(line)
        if not any(ch.isdigit() for ch in cells):
            continue  # a blank line, a fence, a |---|---| rule
        if len(cells) > 4 or (rows and len(rows[-1]) < 4):
            return None
        rows.append("".join("0" if ch in _PLACEHOLDER else ch for ch in cells))
    if not 2 <= len(rows) <= 4:
        return None
    return "".join(r.ljust(4, "0") for r in rows).ljust(16, "0")


def parse_grid(completion: str) -> str | None:
    """The 16-cell grid of a completion (``'0'`` where it leaves a cell empty), or None if it
    writes no grid (see module doc)."""
    span = answer_span(completion)
    if span is None:
        return _first16(completion)
    span = _LABELS.sub(" ", span)
    grid = _rows_grid(span)
    return grid if grid is not None else _first16(span)


def _check_grid(name: str, grid: str, row: int | None = None) -> None:
    if not isinstance(grid, str) or len(grid) != 16 or any(ch not in "01234" for ch in grid):
        where = f" row {row}" if row is not None else ""
        raise ValueError(f"column {name!r}{where}: expected a 16-char string of digits 0-4, got {grid!r}")


def is_valid_sudoku(grid: str, *, allow_empty: bool = False) -> bool:
    """True if `grid` is a complete valid 4x4 sudoku (or, with `allow_empty`, has no conflicts
    among its filled cells)."""
    if len(grid) != 16 or any(ch not in "01234" for ch in grid):
        return False
    if not allow_empty and "0" in grid:
        return False
    for unit in _UNITS:
        vals = [grid[i] for i in unit if grid[i] != "0"]
        if len(vals) != len(set(vals)):
            return False
    return True


def sudoku_score(completion: str, puzzle: str, solution: str) -> float:
    """Fraction of the puzzle's empty cells that the completion's grid fills correctly."""
    grid = parse_grid(completion)
    empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
    if grid is None or not empty:
        return 0.0
    return sum(grid[i] == solution[i] for i in empty) / len(empty)


def sudoku_solved(completion: str, puzzle: str, solution: str) -> bool:
    """Exact solve: the completion's grid equals the solution (givens included)."""
    return parse_grid(completion) == solution


def sudoku_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Sudoku reward over columns ``puzzle`` and ``solution`` (see `sudoku_score`)."""
    require_columns("sudoku", columns, ("puzzle", "solution"), len(completions))
    out: list[float | None] = []
    for i, (c, p, s) in enumerate(zip(completions, columns["puzzle"], columns["solution"])):
        if p is None or s is None:
            out.append(None)
            continue
        _check_grid("puzzle", p, i)
        _check_grid("solution", s, i)
        out.append(sudoku_score(c, p, s))
    return out


# ------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------


def count_solutions(grid: str, limit: int = 2) -> int:
    """Number of completions of `grid` (stops counting at `limit`)."""
    cells = list(grid)
    found = 0

    def solve() -> bool:
        nonlocal found
        best, best_opts = -1, None
        for i in range(16):
            if cells[i] == "0":
                opts = set("1234") - {cells[j] for j in _PEERS[i]}
                if best_opts is None or len(opts) < len(best_opts):
                    best, best_opts = i, opts
                    if not opts:
                        return False
        if best_opts is None:
            found += 1
            return found >= limit
        for d in sorted(best_opts):
            cells[best] = d
            if solve():
                return True
        cells[best] = "0"
        return False

    solve()
    return found


@lru_cache(maxsize=1)
def all_solutions() -> tuple[str, ...]:
    """All 288 complete 4x4 sudoku grids, sorted."""
    out: list[str] = []
    cells = ["0"] * 16

    def fill(i: int) -> None:
        if i == 16:
            out.append("".join(cells))
            return
        for d in "1234":
            if all(cells[j] != d for j in _PEERS[i] if j < i):
                cells[i] = d
                fill(i + 1)
        cells[i] = "0"

    fill(0)
    return tuple(out)


def make_sudoku_dataset(n: int, seed: int, min_empty: int = 8, max_empty: int = 11) -> list[dict]:
    """`n` distinct puzzles ``{"puzzle", "solution"}`` with a unique solution and between
    `min_empty` and `max_empty` empty cells; deterministic in `seed` (local RNG)."""
    if not 1 <= min_empty <= max_empty <= 12:
        raise ValueError(f"need 1 <= min_empty <= max_empty <= 12, got {min_empty}, {max_empty}")
    rng = random.Random(seed)
    sols = all_solutions()
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct puzzles with {min_empty}..{max_empty} empty cells")
        solution = rng.choice(sols)
        k = rng.randint(min_empty, max_empty)
        cells = list(solution)
        order = list(range(16))
        rng.shuffle(order)
        removed = 0
        for i in order:  # remove cells one by one while the solution stays unique
            if removed == k:
                break
            keep = cells[i]
            cells[i] = "0"
            if count_solutions("".join(cells)) == 1:
                removed += 1
            else:
                cells[i] = keep
        puzzle = "".join(cells)
        if removed != k or puzzle in seen:
            continue
        seen.add(puzzle)
        rows.append({"puzzle": puzzle, "solution": solution})
    return rows


def split_disjoint(rows: Sequence[dict], *, key: str = "puzzle", val_frac: float = 0.1, test_frac: float = 0.1,
                   seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) with no value of `key` shared between splits (duplicates stay together)."""
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        if key not in r:
            raise KeyError(f"row {i} has no key {key!r}")
        groups.setdefault(str(r[key]), []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test, n_val = round(len(keys) * test_frac), round(len(keys) * val_frac)
    parts = (keys[n_test + n_val:], keys[n_test:n_test + n_val], keys[:n_test])
    return tuple([r for k in part for r in groups[k]] for part in parts)  # type: ignore[return-value]
