"""d1's rewards and evaluation parse rules (rewards/d1.py) against d1's own results.

tests/fixtures/d1_rewards.json was recorded from d1's code (github.com/dllm-reasoning/d1) by
``scripts/check_d1_rewards.py --d1-repo <checkout> --write-fixture tests/fixtures/d1_rewards.json``,
on completions and items written in that script (none of d1's generation texts): every score and
parse result here is what d1's own functions returned, so these tests hold the equality without
d1's code. The script itself also compares on d1's published generations.
"""

import json
import math
import random
import time
from pathlib import Path

import pytest

import rewards
from rewards import compose, get_reward
from rewards.d1 import (D1_EVAL_TASKS, d1_boxed_answer, d1_eval_accuracy, d1_eval_item, d1_eval_record, d1_gsm8k_gold,
                        d1_is_equiv)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "d1_rewards.json").read_text())
COMPLETIONS = FIXTURE["completions"]
D1_NAMES = ["d1_xmlcount", "d1_soft_format", "d1_strict_format", "d1_int", "d1_gsm8k", "d1_math", "d1_math_format",
            "d1_countdown", "d1_sudoku"]
PROMPT = [{"role": "user", "content": "question"}]


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def call(name: str, texts: list[str], **columns) -> list:
    """A TRL-style keyword call through the registry, with chat prompts and completions."""
    return get_reward(name)(prompts=[PROMPT] * len(texts), completions=[chat(t) for t in texts], **columns)


@pytest.mark.parametrize("name", [n for n in D1_NAMES if isinstance(FIXTURE["rewards"][n][0], (int, float))])
def test_rewards_without_columns_equal_d1(name):
    recorded = FIXTURE["rewards"][name]
    assert len(recorded) == len(COMPLETIONS) > 1000
    ours = call(name, COMPLETIONS)
    bad = [(COMPLETIONS[i], o, d) for i, (o, d) in enumerate(zip(ours, recorded)) if o != d]
    assert not bad, f"{len(bad)} differ from d1, first: {bad[0]!r}"


@pytest.mark.parametrize("name", ["d1_gsm8k", "d1_math", "d1_countdown", "d1_sudoku"])
def test_rewards_with_columns_equal_d1(name):
    cases = FIXTURE["rewards"][name]
    assert len(cases) > 90
    for case in cases:
        text, columns = COMPLETIONS[case["c"]], {k: [v] for k, v in case["columns"].items()}
        if isinstance(case["d1"], dict):  # d1 raises on this row; ours raises one clear error
            with pytest.raises((ValueError, KeyError, TypeError), match="column"):
                call(name, [text], **columns)
        else:
            assert call(name, [text], **columns) == [case["d1"]], (text, case["columns"])


def _same(ours, recorded) -> bool:
    if isinstance(ours, float) and isinstance(recorded, float) and math.isnan(ours) and math.isnan(recorded):
        return True
    return type(ours) is type(recorded) and ours == recorded


@pytest.mark.parametrize("task", ["gsm8k", "math", "countdown", "sudoku"])
def test_eval_parse_rules_equal_d1(task):
    spec = FIXTURE["eval"][task]
    usable = []
    for item, recorded in zip(spec["items"], spec["d1"]):
        if "raises" in recorded:  # d1's parser raises on this item (its whole file run stops); so does ours
            with pytest.raises((ValueError, TypeError)):
                d1_eval_item(task, item)
            continue
        usable.append(item)
        ours = d1_eval_item(task, item)
        for key, value in recorded.items():
            got = repr(ours[key]) if key == "evaluation_result" else ours[key]
            assert _same(got, value), (item, key, got, value)
    assert d1_eval_accuracy(task, usable) == spec["d1_accuracy"]
    if task == "math":
        assert d1_eval_accuracy("math500", usable) == spec["d1_accuracy"]


def test_gsm8k_gold_equals_d1_parser():
    for case in FIXTURE["gsm8k_gold"]:
        assert _same(d1_gsm8k_gold(case["solution"]), case["d1"]) or (case["d1"] is None and
                                                                      d1_gsm8k_gold(case["solution"]) is None), case


def test_registered_and_composed_trl_style():
    assert set(rewards.registered_rewards()) >= set(D1_NAMES)
    strict = "<reasoning>\nAdd them.\n</reasoning>\n<answer>\n72\n</answer>\n"
    multi = "<reasoning>\nFirst add.\nThen check.\n</reasoning>\n<answer>\n72\n</answer>\n"
    one_line = "<reasoning>Add them.</reasoning> <answer>72</answer>"
    comp = compose({"d1_xmlcount": 1.0, "d1_soft_format": 1.0, "d1_strict_format": 1.0, "d1_int": 1.0,
                    "d1_gsm8k": 1.0})
    out = comp(prompts=[PROMPT] * 3, completions=[chat(strict), chat(multi), chat(one_line)], answer=["72"] * 3,
               completion_ids=[[1], [2], [3]])
    # d1's format regexes have no DOTALL ('.' stops at a newline): multi-line reasoning fails both, and the
    # soft one fails even d1's own layout (a newline right after <reasoning>); only one-line tag pairs pass it
    assert out.per_function == {"d1_xmlcount": [0.5, 0.5, 0.0], "d1_soft_format": [0.0, 0.0, 0.5],
                                "d1_strict_format": [0.5, 0.0, 0.0], "d1_int": [0.5, 0.5, 0.5],
                                "d1_gsm8k": [2.0, 2.0, 2.0]}
    assert out.total == [3.5, 3.0, 3.0]
    # d1's "\boxed" is a backspace + "oxed": the boxed half of d1_math_format never fires on real text
    assert call("d1_math_format", ["<answer>\\boxed{5}</answer>", "\\boxed{5}", "<answer>\boxed{5}</answer>"]) \
        == [0.75, 0.25, 1.0]
    # a bare answer (our math rows) is used whole as d1's gold; a full solution gives its last \boxed{}
    assert call("d1_math", ["<answer>\\boxed{\\dfrac12}</answer>"] * 2,
                answer=["\\frac{1}{2}", "So $x = \\boxed{0.5}$."]) == [2.0, 2.0]
    # our countdown rows name the numbers 'nums', d1's 'numbers': both are read
    text = "<answer>87 - 85 + 60</answer>"
    assert call("d1_countdown", [text], nums=[[60, 85, 87]], target=[62]) == [1.0]
    assert call("d1_countdown", [text], numbers=[[60, 85, 87]], target=[62]) == [1.0]
    # d1_gsm8k compares strings: commas and the full GSM8K solution as d1's extract_hash_answer reads it
    assert call("d1_gsm8k", ["<answer>1,000</answer>"] * 3, answer=["1,000", "1000", "He earns $1,000.\n#### 1,000"]) \
        == [2.0, 0.0, 2.0]
    assert call("d1_sudoku", ["<answer>\n4132 2314\n3421 1243\n</answer>"], puzzle=["0032000434000040"],
                solution=["4132231434211243"]) == [1.0]


def test_none_rows_are_not_scored():
    assert call("d1_gsm8k", ["<answer>5</answer>"], answer=[None]) == [None]
    assert call("d1_countdown", ["<answer>1+2</answer>"], nums=[None], target=[3]) == [None]
    assert call("d1_sudoku", ["<answer>1</answer>"], puzzle=[None], solution=["1" * 16]) == [None]


def test_bad_columns_give_one_clear_error():
    with pytest.raises(KeyError, match="d1_gsm8k reward needs column 'answer'"):
        call("d1_gsm8k", ["x"])
    with pytest.raises(ValueError, match="column 'answer' has 2 rows for 1 completions"):
        call("d1_math", ["x"], answer=["1", "2"])
    with pytest.raises(KeyError, match="'nums' \\(or d1's 'numbers'\\)"):
        call("d1_countdown", ["x"], target=[3])
    with pytest.raises(ValueError, match="d1_countdown reward: column 'nums' row 1: expected a non-empty list of ints"):
        call("d1_countdown", ["x", "y"], nums=[[1, 2], "1,2"], target=[3, 3])
    with pytest.raises(ValueError, match="column 'target' row 0: expected a number"):
        call("d1_countdown", ["x"], nums=[[1, 2]], target=["3"])
    with pytest.raises(ValueError, match="d1_sudoku reward: column 'solution' row 0: expected a 16-character string"):
        call("d1_sudoku", ["x"], puzzle=["0" * 16], solution=["123"])
    with pytest.raises(ValueError, match="d1_math reward: column 'answer' row 0: expected a solution whose last"):
        call("d1_math", ["x"], answer=["\\boxed{5"])
    with pytest.raises(ValueError, match="d1_gsm8k reward: column 'answer' row 0: expected a string"):
        call("d1_gsm8k", ["x"], answer=[72])


def test_no_printing_and_no_global_rng(capsys):
    import numpy as np

    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    for name in D1_NAMES:
        columns = {"d1_gsm8k": {"answer": ["5"]}, "d1_math": {"answer": ["\\boxed{5}"]},
                   "d1_countdown": {"nums": [[2, 3]], "target": [5]},
                   "d1_sudoku": {"puzzle": ["0" * 16], "solution": ["1" * 16]}}.get(name, {})
        call(name, ["<reasoning>\nx\n</reasoning>\n<answer>\n2+3\n</answer>\n"], **columns)
    d1_eval_accuracy("countdown", [d1_eval_record("countdown", None, "\\boxed{2+3}", ([2, 3], 5))])
    assert (np.random.get_state()[1] == np_state).all() and random.getstate() == py_state
    assert capsys.readouterr() == ("", "")


def test_countdown_power_towers_do_not_hang():
    start = time.perf_counter()
    # d1's eval would compute 9 ** 387420489 here (hours); ours gives up past 2**20 bits and scores 0.1
    assert call("d1_countdown", ["<answer>9 ** 9 ** 9</answer>"], nums=[[9, 9, 9]], target=[1]) == [0.1]
    assert call("d1_countdown", ["<answer>1 ** 99 ** 99</answer>"], nums=[[1, 99, 99]], target=[1]) == [1.0]
    item = d1_eval_record("countdown", None, "\\boxed{9 ** 9 ** 9}", ([9, 9, 9], 1))
    assert d1_eval_item("countdown", item)["evaluation_result"] == math.inf
    assert time.perf_counter() - start < 2.0


def test_eval_tasks_records_and_unknown_names():
    assert set(D1_EVAL_TASKS) == {"gsm8k", "math", "math500", "countdown", "sudoku"}
    with pytest.raises(KeyError, match="did you mean 'sudoku'"):
        d1_eval_item("sudokus", {})
    with pytest.raises(KeyError, match="did you mean 'countdown'"):
        d1_eval_accuracy("count_down", [])
    assert d1_eval_accuracy("gsm8k", []) == 0.0
    # the layout and types d1 stores
    assert d1_eval_record("gsm8k", "Q?", "\\boxed{72}", "She makes $72.\n#### 72") == \
        {"question": "Q?", "generations": "\\boxed{72}", "ground_truth": 72.0}
    assert d1_eval_record("gsm8k", "Q?", "g", "1,000")["ground_truth"] == 1000.0
    assert d1_eval_record("gsm8k", "Q?", "g", "-3")["ground_truth"] is None  # as d1's parser: negatives are lost
    assert d1_eval_record("gsm8k", "Q?", "g", 18)["ground_truth"] == 18.0
    assert d1_eval_record("math500", "P", "g", "\\frac{3}{4}")["ground_truth"] == "\\frac{3}{4}"
    assert d1_eval_record("countdown", None, "g", ([48, 56, 52], 60)) == \
        {"question": "Numbers: [48, 56, 52]\nTarget: 60", "generations": "g", "ground_truth": [[48, 56, 52], 60]}
    assert d1_eval_record("countdown", None, "g", {"nums": [1, 2], "target": 3})["ground_truth"] == [[1, 2], 3]
    assert d1_eval_record("sudoku", "0032000434000040", "g", "4132231434211243")["question"] == \
        "Solve the following Sudoku puzzle: 0032000434000040\n"
    with pytest.raises(ValueError, match="ground_truth must be the 16-character solution"):
        d1_eval_record("sudoku", "0032000434000040", "g", "4321")
    with pytest.raises(ValueError, match="no 16-digit puzzle"):
        d1_eval_record("sudoku", "no puzzle", "g", "4132231434211243")
    with pytest.raises(ValueError, match="\\(numbers, target\\)"):
        d1_eval_record("countdown", None, "g", ([1, 2], "3"))
    # sudoku accuracy is cells, over all items
    items = [d1_eval_record("sudoku", "0032000434000040", g, "4132231434211243")
             for g in ("<answer>4132231434211243</answer>", "<answer>0032000434000040</answer>")]
    assert [d1_eval_item("sudoku", it)["correct_cells"] for it in items] == [10, 0]
    assert d1_eval_accuracy("sudoku", items) == 0.5


def test_math_helpers_keep_d1s_quirks():
    assert d1_boxed_answer("no box here") == "no box here"  # d1 compares the whole text then
    assert d1_boxed_answer("\\boxed 5$ and \\boxed{6}") == "5"  # "\boxed " wins over a later \boxed{}
    assert d1_boxed_answer("\\fbox{5}") == "\\fbox{5}"
    assert d1_boxed_answer("\\boxed{5") is None
    assert d1_is_equiv("\\dfrac12", "0.5") and d1_is_equiv("k = 5", "5") and d1_is_equiv("3/4", "\\frac{3}{4}")
    assert not d1_is_equiv("x/y", " x/y")  # int("x") raises inside d1's normaliser: raw strings compared
