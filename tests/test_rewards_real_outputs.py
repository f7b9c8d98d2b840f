"""Verifiers on completions shaped like a real instruct model's (LLaDA-8B-Instruct as published by
d1; see scripts/check_d1_verifiers.py and docs/verifiers.md). Every completion here is written for
this file: same shapes as the real generations (boxes inside answer tags, tags left open, grids
with separators, rows cut short...), not their text. Each fixed class has its new score asserted,
next to regressions showing that wrong answers still score as wrong."""

import random
import re
import string

import pytest

from rewards import get_reward
from rewards.countdown import answer_expression, score_countdown
from rewards.gsm8k import extract_answer as gsm8k_extract
from rewards.math import extract_answer as math_extract
from rewards.math import strip_percent
from rewards.sudoku import parse_grid, sudoku_score, sudoku_solved

REASONING = ("<reasoning>\nWe try a few combinations of the numbers and check each one against the target.\n"
             "</reasoning>\n")


# ------------------------------------------------------------------------------------------------
# Countdown
# ------------------------------------------------------------------------------------------------
NUMS, TARGET = [87, 85, 60], 62  # 87 - 85 + 60


@pytest.mark.parametrize("completion", [
    REASONING + "<answer>\n\\boxed{87 - 85 + 60}\n</answer>",  # d1's own answer format
    REASONING + "<answer>\n\\boxed{(87 - 85) + 60}\n</answer>",
    REASONING + "<answer>\n\\[ \\boxed{60 + 87 - 85} \\]\n</answer>",
    REASONING + "<answer>\n\\boxed{87 - 85 + 60 = 62}\n</answer>",  # "= target" inside the box
    REASONING + "<answer>\n\\boxed{87 - 85 + 60}",  # the answer tag is never closed
    "Trying 87 - 85 = 2 and 2 + 60 = 62.\n\nSo the expression is \\(\\boxed{87 - 85 + 60}\\).",  # no answer tag
    "<reasoning>\n87 - 85 + 60 = 62\n</reasoning>\n<>\n\\boxed{87 - 85 + 60}\n</>",  # garbled tags
    REASONING + "<answer>\n87 - 85 + 60\n</answer>",  # a bare expression still works
])
def test_countdown_boxed_expressions_in_real_shapes_score_one(completion):
    assert score_countdown(completion, NUMS, TARGET) == 1.0


@pytest.mark.parametrize("expr,nums,target", [
    (r"(9 \times 6) \div 3", [9, 6, 3], 18),
    (r"9 \cdot 6 \div 3", [9, 6, 3], 18),
    (r"\frac{96}{4} - 5", [96, 4, 5], 19),
    (r"\dfrac{96 - 6}{5}", [96, 6, 5], 18),
    (r"\left( 12 + 3 \right) \times 2", [12, 3, 2], 30),
    (r"$12 \times 2 + 3$", [12, 3, 2], 27),
    (r"{12 + 3} * 2", [12, 3, 2], 30),
    ("12 × 2 − 3", [12, 3, 2], 21),
    ("12 * 2 + 3.", [12, 3, 2], 27),  # a sentence's full stop
])
def test_countdown_latex_operators_are_arithmetic(expr, nums, target):
    assert score_countdown(f"<answer>\n\\boxed{{{expr}}}\n</answer>", nums, target) == 1.0


@pytest.mark.parametrize("completion,score", [
    ("<answer>\n\\boxed{87 + 85 - 60}\n</answer>", 0.1),  # right numbers, wrong value
    ("<answer>\n\\boxed{87 - 85 + 60 + 0}\n</answer>", 0.1),  # an extra number
    ("<answer>\n\\boxed{87 - 25 }\n</answer>", 0.1),  # right value, numbers not used
    ("<answer>\n\\boxed{60 + 2}\n</answer>", 0.1),
    ("<answer>\n\\boxed{62}\n</answer>", 0.1),  # just the target
    ("<answer>\n\\boxed{87 - 85 + 60 + 60 - 60}\n</answer>", 0.1),  # a number used twice
    ("<answer>\n\\boxed{\\frac{87}{85} \\times 60}\n</answer>", 0.1),  # exact: 87/85*60 != 62
    ("<answer>\n\\boxed{87 ** 1 - 85 + 60}\n</answer>", 0.0),  # not + - * /
    ("<answer>\n\\boxed{__import__('os').getpid()}\n</answer>", 0.0),
    ("<answer>\n\\boxed{}\n</answer>", 0.0),
    ("<answer>\n\\boxed{...}\n</answer>", 0.0),
    ("<answer>\n\\boxed{the difference of 87 and 85, plus 60}\n</answer>", 0.0),
    ("We get 87 - 85 + 60 = 62.", 0.0),  # no answer tag and no box: no answer
    # the answer tag is the answer, whatever the reasoning boxed before it
    ("Maybe \\boxed{87 - 85 + 60}.\n<answer>\n\\boxed{87 + 85 + 60}\n</answer>", 0.1),
    ("Maybe \\boxed{87 - 85 + 60}.\n<answer>\n87 + 85\n</answer>", 0.1),
    # a box left open is not read (ambiguous; see docs/verifiers.md)
    ("<answer>\n\\boxed{87 - 85 + 60", 0.0),
])
def test_countdown_wrong_or_unreadable_answers_stay_wrong(completion, score):
    assert score_countdown(REASONING + completion, NUMS, TARGET) == score


def test_countdown_answer_expression_and_reward_columns():
    assert answer_expression("<answer>\n\\boxed{1 + 2}\n</answer>") == "1 + 2"
    assert answer_expression("no tags \\boxed{3 * 4} then \\boxed{5 - 1}") == "5 - 1"
    assert answer_expression("no tags, no box") is None
    fn = get_reward("countdown")
    comps = ["<answer>\\boxed{87 - 85 + 60}</answer>", "<answer>\\boxed{87 + 85 + 60}</answer>", "x"]
    assert fn(["p"] * 3, comps, nums=[NUMS] * 3, target=[TARGET] * 3) == [1.0, 0.1, 0.0]


# ------------------------------------------------------------------------------------------------
# Sudoku
# ------------------------------------------------------------------------------------------------
SOLUTION = "1234341221434321"
EMPTY = [1, 2, 4, 7, 9, 10, 13, 15]
PUZZLE = "".join("0" if i in EMPTY else ch for i, ch in enumerate(SOLUTION))  # 1004300220004301
ROWS = [SOLUTION[i:i + 4] for i in range(0, 16, 4)]
SUDOKU_REASONING = ("<reasoning>\nThe first row is 1004, so it misses 2 and 3. The second row is 3002. "
                    "Checking the 2x2 boxes and the columns 1-4 we fill the grid.\n</reasoning>\n")


def spaced(row: str, sep: str = " ") -> str:
    return sep.join(row)


@pytest.mark.parametrize("answer", [
    f"<answer>\n{SOLUTION}\n</answer>",
    # rows on separate lines, with separators
    "<answer>\n" + "\n".join(ROWS) + "\n</answer>",
    "<answer>\n" + "\n".join(spaced(r) for r in ROWS) + "\n</answer>",
    "<answer>\n" + "\n".join(spaced(r, ", ") for r in ROWS) + "\n</answer>",
    "<answer>\n" + "\n".join(f"[{spaced(r, ', ')}]," for r in ROWS) + "\n</answer>",
    "<answer>\n" + "\n".join(f"{r[0]} {r[1]} | {r[2]} {r[3]}" for r in ROWS[:2]) + "\n------+------\n"
    + "\n".join(f"{r[0]} {r[1]} | {r[2]} {r[3]}" for r in ROWS[2:]) + "\n</answer>",
    # a markdown table, a fenced block, row labels, a list
    "<answer>\n| " + " | ".join(ROWS[0]) + " |\n|---|---|---|---|\n"
    + "\n".join("| " + " | ".join(r) + " |" for r in ROWS[1:]) + "\n</answer>",
    "<answer>\n```\n" + "\n".join(ROWS) + "\n```\n</answer>",
    "<answer>\n" + "\n".join(f"Row {k + 1}: {spaced(r)}" for k, r in enumerate(ROWS)) + "\n</answer>",
    "<answer>\n" + "\n".join(f"R{k + 1}: {r}" for k, r in enumerate(ROWS)) + "\n</answer>",
    "<answer>\n" + "\n".join(f"{k + 1}. {spaced(r, ', ')}" for k, r in enumerate(ROWS)) + "\n</answer>",
    "<answer>\n" + "\n".join(f"- {r}" for r in ROWS) + "\n</answer>",
    f"<answer>\nThe solved 4x4 grid is:\n{SOLUTION}\n</answer>",
    # where the tags go wrong
    f"<answer>\n{SOLUTION}",  # never closed
    f"<answer>\n</answer>\n{SOLUTION}",  # grid after an empty answer tag
    f"<answer></answer>\n```\n{SOLUTION}\n```",
    f"</answer>\n{SOLUTION}",  # the opening tag is missing
    "<>answer>\n" + "\n".join(ROWS) + "\n</answer>",  # the opening tag is garbled
])
def test_sudoku_solution_in_real_layouts_is_read_cell_by_cell(answer):
    completion = SUDOKU_REASONING + answer
    assert parse_grid(completion) == SOLUTION
    assert sudoku_score(completion, PUZZLE, SOLUTION) == 1.0
    assert sudoku_solved(completion, PUZZLE, SOLUTION)


def _cells_right(grid: str) -> float:
    return sum(grid[i] == SOLUTION[i] for i in EMPTY) / len(EMPTY)


@pytest.mark.parametrize("answer,grid", [
    # rows identified by lines: the rows written are credited in place, the rest are empty
    ("<answer>\n" + "\n".join(ROWS[:3]) + "\n</answer>", SOLUTION[:12] + "0000"),
    ("<answer>\n" + "\n".join(ROWS[:2]) + "\n</answer>", SOLUTION[:8] + "0" * 8),
    ("<answer>\n" + "\n".join(ROWS[:3]) + "\n43\n</answer>", SOLUTION[:14] + "00"),  # last row cut short
    # placeholders for cells left empty
    ("<answer>\n1 _ 3 4\n3 4 1 2\n2 1 . 3\n4 3 2 ?\n</answer>", "1034341221034320"),
    ("<answer>\n| 1 | _ | 3 | 4 |\n| 3 | 4 | 1 | 2 |\n| 2 | 1 | * | 3 |\n| 4 | 3 | 2 | 1 |\n</answer>",
     "1034341221034321"),
])
def test_sudoku_partial_grids_get_partial_credit_but_never_solve(answer, grid):
    completion = SUDOKU_REASONING + answer
    assert parse_grid(completion) == grid
    assert sudoku_score(completion, PUZZLE, SOLUTION) == pytest.approx(_cells_right(grid))
    assert 0 < sudoku_score(completion, PUZZLE, SOLUTION) < 1
    assert not sudoku_solved(completion, PUZZLE, SOLUTION)


@pytest.mark.parametrize("answer", [
    f"<answer>\n{SOLUTION[:15]}\n</answer>",  # one digit missing: which cell is unknown
    f"<answer>\n{SOLUTION[:11]}\n</answer>",
    "<answer>\n12341\n34122\n14343\n</answer>",  # rows of five digits are not a 4x4 grid
    "<answer>\n1234\n341\n2143\n432\n</answer>",  # rows missing a cell: which one is unknown
    "<answer>\n1 2 3\n</answer>",
    f"<answer>\n{SOLUTION[:4]}\n</answer>",  # a single line of 4 is just 4 digits
    "<answer>\nThe puzzle has no solution.\n</answer>",
    f"<answer>\n{SOLUTION[:15]}",
])
def test_sudoku_unplaceable_digits_score_zero(answer):
    completion = SUDOKU_REASONING + answer
    assert parse_grid(completion) is None
    assert sudoku_score(completion, PUZZLE, SOLUTION) == 0.0
    assert not sudoku_solved(completion, PUZZLE, SOLUTION)


def test_sudoku_wrong_grids_still_score_as_wrong():
    wrong = list(SOLUTION)
    wrong[EMPTY[0]], wrong[EMPTY[1]] = SOLUTION[EMPTY[1]], SOLUTION[EMPTY[0]]  # swap two filled cells
    wrong = "".join(wrong)
    for layout in (wrong, "\n".join(spaced(wrong[i:i + 4]) for i in range(0, 16, 4))):
        c = f"<answer>\n{layout}\n</answer>"
        assert sudoku_score(c, PUZZLE, SOLUTION) == pytest.approx(6 / 8)
        assert not sudoku_solved(c, PUZZLE, SOLUTION)
    # the puzzle copied back: givens right, every empty cell wrong
    assert sudoku_score(f"<answer>\n{PUZZLE}\n</answer>", PUZZLE, SOLUTION) == 0.0
    # a grid with a given changed is not a solve, even if every empty cell is right
    changed = "4" + SOLUTION[1:]
    assert sudoku_score(f"<answer>{changed}</answer>", PUZZLE, SOLUTION) == 1.0
    assert not sudoku_solved(f"<answer>{changed}</answer>", PUZZLE, SOLUTION)
    # the last answer tag counts
    assert sudoku_score(f"<answer>{SOLUTION}</answer> <answer>{PUZZLE}</answer>", PUZZLE, SOLUTION) == 0.0


def _old_untagged_rule(completion: str) -> str | None:
    """The grid rule for untagged completions before this change: the first 16 digits."""
    digits = re.findall(r"\d", completion)
    return "".join(digits[:16]) if len(digits) >= 16 else None


def test_sudoku_untagged_completions_keep_their_scores():
    """The default recipe's tiny model answers with bare digits and no tags: unchanged, down to
    short and garbled strings."""
    assert parse_grid(SOLUTION) == SOLUTION and sudoku_solved(SOLUTION, PUZZLE, SOLUTION)
    assert sudoku_score(SOLUTION[:15], PUZZLE, SOLUTION) == 0.0 and parse_grid(SOLUTION[:15]) is None
    assert parse_grid(SOLUTION + "3") == SOLUTION
    assert parse_grid("12 34\n34 12\n21 43\n4321") == SOLUTION
    assert parse_grid("1234\n3412\n2143") is None  # rows, but no tags: no partial grid
    rng = random.Random(0)
    alphabet = string.digits * 4 + string.ascii_letters + " \n|,._-*?"
    for _ in range(3000):
        c = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert parse_grid(c) == _old_untagged_rule(c), c


def test_sudoku_reward_columns_on_real_shapes():
    comps = [SUDOKU_REASONING + f"<answer>\n{SOLUTION}", SUDOKU_REASONING + f"<answer>\n{SOLUTION[:15]}\n</answer>",
             SUDOKU_REASONING + "<answer>\n" + "\n".join(ROWS[:2]) + "\n</answer>"]
    out = get_reward("sudoku")([""] * 3, comps, puzzle=[PUZZLE] * 3, solution=[SOLUTION] * 3)
    assert out == [1.0, 0.0, pytest.approx(_cells_right(SOLUTION[:8] + "0" * 8))]


# ------------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    # a box inside an answer tag that goes on talking: the box is the answer
    ("<reasoning>\nMaya is 12 now.\n</reasoning>\n<answer>\nIn 5 years she will be \\boxed{17} years old, "
     "5 years from now.", "17"),
    ("<answer>\n\\boxed{17}\n(that is 12 + 5)\n</answer>", "17"),
    # an empty answer tag defers to a box after it
    ("Divide: 600 / 120 = 5.\n<answer>\n</answer>\n\n\\boxed{5}", "5"),
    ("She buys \\boxed{6} pears.\n</<answer>", "6"),
    # LaTeX fractions are numbers
    ("<answer>\n\\boxed{\\frac{3}{4}}\n</answer>", "0.75"),
    ("<answer>\n\\boxed{\\dfrac{45}{3}}\n</answer>", "15"),
    ("<answer>\n\\boxed{-\\frac{1}{2}}\n</answer>", "-0.5"),
    # kept: commas, boxes left unbalanced or spread over lines
    ("<answer>\n\\boxed{12,300}\n</answer>", "12300"),
    ("<answer>\n\\boxed{\\$7,250}\n</answer>", "7250"),
    ("<answer>\n\\boxed{615\n}", "615"),
    ("<answer>\n\\boxed{42>", "42"),
    ("The total is 9 + 4 = 13 dollars.\n</reasoning>", "13"),  # no markup: the last number
])
def test_gsm8k_real_answer_shapes(text, expected):
    assert gsm8k_extract(text) == expected


@pytest.mark.parametrize("text,gold", [
    # the template's placeholder or an empty answer: no answer, whatever the reasoning ends with
    ("So the total is 34.\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>", "34"),
    ("So the total is 34.\n</reasoning>\n<answer>\n\\boxed{}\n</answer>", "34"),
    ("So the total is 34.\n</reasoning>\n<answer>\n</answer>", "34"),
    ("So the total is 34.\n</reasoning>\n<answer>\n", "34"),
    # the answer tag beats a box in the reasoning
    ("Total visitors: \\[ \\boxed{25000} \\]\n</reasoning>\n<answer>\n\\boxed{2500}\n</answer>", "25000"),
    # a box holding 3/4 is not 3
    ("Cost per hour is \\boxed{\\frac{3}{4}} dollars.\n</answer>", "3"),
    ("<answer>\n\\boxed{\\frac{3}{4}}\n</answer>", "4"),
])
def test_gsm8k_wrong_or_missing_answers_stay_wrong(text, gold):
    assert get_reward("gsm8k")([""], [text], answer=[gold]) == [0.0]


def test_gsm8k_right_answers_in_real_shapes_score_one():
    comps = ["<answer>\nIn 5 years she is \\boxed{17} years old, 5 years on.", "<answer>\n</answer>\n\\boxed{17}",
             "<answer>\n\\boxed{\\frac{34}{2}}\n</answer>", "#### 17"]
    assert get_reward("gsm8k")([""] * 4, comps, answer=["17"] * 4) == [1.0] * 4


# ------------------------------------------------------------------------------------------------
# MATH
# ------------------------------------------------------------------------------------------------
def test_math_extraction_of_empty_answers():
    assert math_extract("<answer>\n</answer>") == ""
    assert math_extract("<answer>\n\\boxed{}\n</answer>") == ""
    assert math_extract("so c = \\boxed{\\pi}.\n<answer>\n\\boxed{}\n</answer>") == "\\pi"
    assert math_extract("<answer>\n\\frac{2}{5}\n</answer>") == "\\frac{2}{5}"  # no box: the tag's text
    assert math_extract("no tag, no box") is None  # math-verify reads the whole text
    assert strip_percent("10\\%") == "10" and strip_percent("25 %") == "25"
    assert strip_percent("10\\% of x") == "10\\% of x"  # only a trailing sign


def test_math_real_answer_shapes():
    fn = get_reward("math")
    comps = [
        "The share drops by \\boxed{20\\%}.\n</reasoning>\n<answer>\n\\boxed{20\\%}\n</answer>",  # percent, gold 20
        "<answer>\n\\boxed{20}\n</answer>",  # gold 20\%
        "<answer>\n\\boxed{25\\%}\n</answer>",  # wrong percent
        # an empty answer: no answer, even when the reasoning ends with the right expression
        "So the simplified expression is \\(9x + 4\\).\n</reasoning>\n<answer>\n</answer>",
        "Thus c is \\( \\pi \\).\n</reasoning>\n<answer>\n\\boxed{}\n</answer>",
        # ... unless a box elsewhere holds it
        "Thus c = \\boxed{\\pi}.\n</reasoning>\n<answer>\n\\boxed{}\n</answer>",
        # kept: an unsimplified but equal answer
        "<answer>\n\\boxed{\\frac{2}{16}}\n</answer>",
    ]
    gold = ["20", "20\\%", "20", "9x + 4", "\\pi", "\\pi", "\\frac{1}{8}"]
    assert fn([""] * len(comps), comps, answer=gold) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_math_workers_are_warm_before_their_first_item():
    import rewards.math as m

    assert m._warm_verify_item is m._verify_item  # math-verify imported and run once on load
    with pytest.raises(AttributeError):
        m.no_such_attribute  # noqa: B018
    pool = m._pool(1, 5.0)
    assert pool.fn_path == "rewards.math:_warm_verify_item"
