"""Code reward: HumanEval canonical solutions (real data) and MBPP-style assert tests."""

import json

import pytest

from rewards import get_reward
from rewards.code import extract_code


def _humaneval(shared_data):
    rows = [json.loads(line) for line in (shared_data / "humaneval" / "HumanEval.jsonl").read_text().splitlines() if line]
    assert len(rows) == 164
    return rows


def _check_humaneval(rows):
    fn = get_reward("code", pool_size=2, timeout_s=10.0)
    cols = {"test": [r["test"] for r in rows], "entry_point": [r["entry_point"] for r in rows]}
    solved = ["```python\n" + r["prompt"] + r["canonical_solution"] + "\n```" for r in rows]
    bare = ["```python\n" + r["prompt"] + "\n```" for r in rows]
    scores = fn([r["prompt"] for r in rows], solved, **cols)
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 1.0] == []
    scores = fn([r["prompt"] for r in rows], bare, **cols)
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 0.0] == []


def test_humaneval_fast_subset(shared_data):
    _check_humaneval(_humaneval(shared_data)[::8])


@pytest.mark.slow
def test_humaneval_all_164(shared_data):
    _check_humaneval(_humaneval(shared_data))


def test_extract_code_takes_last_python_block():
    text = "```python\na = 1\n```\ntext\n```py\nb = 2\n```\n```\nplain\n```"
    assert extract_code(text) == "b = 2\n"
    assert extract_code("```\nonly plain\n```") == "only plain\n"
    assert extract_code("no code") is None


def test_mbpp_style_fraction_and_column_errors():
    fn = get_reward("code", pool_size=2, timeout_s=5.0)
    tests = ["assert is_even(2) == True", "assert is_even(3) == False", "x = [3, 1]\nassert sorted_copy(x) == [1, 3]\nassert x == [3, 1]",
             "assert is_even(10) is True"]
    good = "```python\ndef is_even(n):\n    return n % 2 == 0\n\ndef sorted_copy(x):\n    return sorted(x)\n```"
    half = "```python\ndef is_even(n):\n    return True\n\ndef sorted_copy(x):\n    x.sort()\n    return x\n```"
    assert fn(["", ""], [good, half], tests=[tests, tests]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="row 0"):
        fn([""], [good])
    with pytest.raises(ValueError, match="'tests' row 0"):
        fn([""], [good], tests=["assert True"])
