"""Code reward: HumanEval canonical solutions (real data), MBPP-style assert tests, and bad input
(programmer errors raise one ValueError naming the argument; a malformed sample scores 0 with one
log line)."""

import json

import pytest

from helpers.sandbox import MODES, code_reward
from rewards import get_reward
from rewards.code import check_code_rows, extract_code

GOOD = "```python\ndef is_even(n):\n    return n % 2 == 0\n```"
TESTS = ["assert is_even(2) == True", "assert is_even(3) == False"]


def _humaneval(shared_data):
    rows = [json.loads(line) for line in (shared_data / "humaneval" / "HumanEval.jsonl").read_text().splitlines() if line]
    assert len(rows) == 164
    return rows


def _check_humaneval(fn, rows, with_prompt: bool):
    cols = {"test": [r["test"] for r in rows], "entry_point": [r["entry_point"] for r in rows]}
    if with_prompt:
        cols["code_prompt"] = [r["prompt"] for r in rows]
    solved = ["```python\n" + r["prompt"] + r["canonical_solution"] + "\n```" for r in rows]
    bare = ["```python\n" + r["prompt"] + "\n```" for r in rows]
    scores = fn([r["prompt"] for r in rows], solved, **cols)
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 1.0] == []
    scores = fn([r["prompt"] for r in rows], bare, **cols)
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 0.0] == []


def test_humaneval_all_164_default_sandbox(shared_data):
    _check_humaneval(get_reward("code", pool_size=2, timeout_s=10.0), _humaneval(shared_data), with_prompt=True)


@pytest.mark.parametrize("mode", MODES)
def test_humaneval_subset_each_backend(shared_data, mode):
    _check_humaneval(code_reward(mode, pool_size=2, timeout_s=10.0), _humaneval(shared_data)[3::8], with_prompt=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_humaneval_all_164_each_backend(shared_data, mode):
    _check_humaneval(code_reward(mode, pool_size=2, timeout_s=10.0), _humaneval(shared_data), with_prompt=True)


def test_dataset_helpers_win_over_the_candidates(shared_data):
    """HumanEval/32's test checks ``poly(coeffs, candidate(coeffs))``: a candidate that redefines
    ``poly`` to return 0 passes only when the reward is not given the dataset's prompt."""
    row = _humaneval(shared_data)[32]
    cheat = "```python\n" + row["prompt"] + "    return 0.0\n\ndef poly(xs, x):\n    return 0.0\n```"
    fn = get_reward("code", pool_size=2, timeout_s=10.0)
    cols = {"test": [row["test"]], "entry_point": [row["entry_point"]]}
    assert fn([""], [cheat], **cols) == [1.0]  # without the prompt the test can only use the candidate's poly
    assert fn([""], [cheat], code_prompt=[row["prompt"]], **cols) == [0.0]


def test_extract_code_takes_last_python_block():
    text = "```python\na = 1\n```\ntext\n```py\nb = 2\n```\n```\nplain\n```"
    assert extract_code(text) == "b = 2\n"
    assert extract_code("```\nonly plain\n```") == "only plain\n"
    assert extract_code("no code") is None


@pytest.mark.parametrize("text, code", [
    # inline backticks before the block (they used to swallow it)
    ("Wrap code in ``` fences, e.g. ```x```.\n```python\ndef f():\n    return 1\n```\n", "def f():\n    return 1\n"),
    ("Use `x` and ```python``` tags:\n```python\ny = 2\n```", "y = 2\n"),
    # a fence at the end of a prose line; a block closed on its last code line
    ("Here it is: ```python\nz = 3\n```", "z = 3\n"),
    ("```python\nw = 4```", "w = 4"),
    # longer fences hold shorter ones; tilde fences; indented fences; language tags and info strings
    ('````python\ns = """\n```\n"""\n````', 's = """\n```\n"""\n'),
    ("~~~python\nt = 5\n~~~", "t = 5\n"),
    ("1. Step one:\n   ```python\n   u = 6\n   ```", "u = 6\n"),
    ("```Python title=sol.py\nv = 7\n```", "v = 7\n"),
    # other languages are skipped; an unclosed block is not code
    ("```python\na = 1\n```\n```bash\nls\n```", "a = 1\n"),
    ("```python\na = 1\n```\n```python\nunfinished = (", "a = 1\n"),
])
def test_extract_code_line_by_line(text, code):
    assert extract_code(text) == code


def test_extract_code_is_linear():
    """Long backtick runs and many fences: one pass over the lines (the old regex needed seconds
    for 90 kB); these inputs would take hours if any step were quadratic."""
    for text in ("`" * 2_000_000, ("```" + " " * 50) * 40_000, "```python\n" + "x\n" * 500_000,
                 ("```python\nx = 1\n```\n" + "`" * 97 + "\n") * 20_000, "a ```" * 300_000):
        extract_code(text)
    assert extract_code("```python\nx = 1\n```\n" * 100_000) == "x = 1\n"


def test_mbpp_style_fraction_mutation_and_setup():
    fn = get_reward("code", pool_size=2, timeout_s=5.0)
    tests = ["assert is_even(2) == True", "assert is_even(3) == False", "x = [3, 1]\nassert sorted_copy(x) == [1, 3]\nassert x == [3, 1]",
             "assert is_even(10) is True"]
    good = "```python\ndef is_even(n):\n    return n % 2 == 0\n\ndef sorted_copy(x):\n    return sorted(x)\n```"
    half = "```python\ndef is_even(n):\n    return True\n\ndef sorted_copy(x):\n    x.sort()\n    return x\n```"
    assert fn(["", ""], [good, half], tests=[tests, tests]) == [1.0, 0.5]
    # in-place changes to arguments are seen by the tests; setup code runs with the tests
    inplace = "```python\ndef sort_in_place(x):\n    x.sort()\n\ndef add_key(d):\n    d['k'] = 1\n```"
    t2 = ["v = [2, 1]\nsort_in_place(v)\nassert v == [1, 2]", "d = {}\nadd_key(d)\nassert d == {'k': 1}",
          "assert math.isclose(SCALE * 2, 5.0)"]
    assert fn([""], [inplace], tests=[t2], test_setup_code=["import math\nSCALE = 2.5"]) == [1.0]


def test_classes_generators_and_callbacks():
    """Candidate objects stay in the candidate's process: the tests call their methods, iterate
    generators and pass their own functions in."""
    code = ("```python\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
            "    def push(self, x):\n        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n"
            "def evens(n):\n    for i in range(n):\n        if i % 2 == 0:\n            yield i\n"
            "def apply_all(fn, xs):\n    return [fn(x) for x in xs]\n"
            "def raises(x):\n    raise ValueError('bad ' + str(x))\n```")
    tests = ["s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and s.items == [1]",
             "assert list(evens(7)) == [0, 2, 4, 6]",
             "assert apply_all(lambda v: v * 10, [1, 2]) == [10, 20]",
             "try:\n    raises(3)\n    assert False\nexcept ValueError as e:\n    assert 'bad 3' in str(e)"]
    fn = get_reward("code", pool_size=2, timeout_s=5.0)
    assert fn([""], [code], tests=[tests]) == [1.0]


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward():
    return code_reward("bwrap", pool_size=2, timeout_s=5.0)


@pytest.mark.parametrize("call, name", [
    (lambda fn: fn([""], GOOD, tests=[TESTS]), "completions"),
    (lambda fn: fn("", [GOOD], tests=[TESTS]), "prompts"),
    (lambda fn: fn(["", ""], [GOOD], tests=[TESTS]), "prompts"),
    (lambda fn: fn(["", ""], [GOOD, GOOD], tests=[TESTS]), "'tests'"),
    (lambda fn: fn([""], [GOOD], tests="assert True"), "'tests'"),
    (lambda fn: fn([""], [GOOD], tests=[TESTS], test_setup_code="x = 1"), "'test_setup_code'"),
    (lambda fn: fn([""], [GOOD], inputs=[["1"]], outputs=[["1"], ["2"]]), "'outputs'"),
    (lambda fn: fn([""], [GOOD]), "needs column"),
    (lambda fn: fn([""], [GOOD], answer=["4"]), "needs column"),
])
def test_programmer_errors_raise_one_value_error(reward, call, name):
    with pytest.raises(ValueError, match=name):
        call(reward)


@pytest.mark.parametrize("option, value", [("timeout_s", 0), ("timeout_s", -1.0), ("timeout_s", float("inf")),
                                           ("memory_mb", 0), ("pool_size", 0), ("pool_size", 1.5)])
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        get_reward("code", **{option: value})


def test_malformed_samples_score_zero_with_one_log_line(reward, caplog):
    comps = [None, 7, b"```python\nx = 1\n```", GOOD, GOOD, GOOD, GOOD, "```python\nprint(1)\n```",
             "```python\nprint(1)\n```", "```python\nprint(1)\n```", GOOD]
    cols = {
        "tests": [TESTS, TESTS, TESTS, TESTS, 5, [1, 2], None, None, None, None, None],
        "test": [None] * 6 + ["def check(c):\n    assert c(2)\n", None, None, None, None],
        "entry_point": [None] * 6 + [None, None, None, None, None],
        "inputs": [None] * 7 + [["\ud800"], ["1"], "1", None],
        "outputs": [None] * 7 + [["1"], ["\udfff"], ["1"], None],
    }
    with caplog.at_level("WARNING", logger="rewards"):
        scores = reward([""] * len(comps), comps, **cols)
    assert scores == [0.0, 0.0, 0.0, 1.0] + [0.0] * 7
    lines = [r.getMessage() for r in caplog.records if r.name == "rewards" and "scored 0" in r.getMessage()]
    bad = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert sorted(int(m.split("sample ")[1].split(" ")[0].rstrip(":")) for m in lines) == bad
    assert all("Traceback" not in m for m in lines)


def test_malformed_completions_through_the_registry_score_zero(caplog):
    """``get_reward`` wraps built-ins to receive text; a None/int/bytes completion must still reach
    the reward (0 and one log line), not raise in the wrapper."""
    fn = get_reward("code", mode="bwrap", pool_size=1, timeout_s=5.0)
    with caplog.at_level("WARNING", logger="rewards"):
        scores = fn(["", "", ""], [None, 7, GOOD], tests=[TESTS] * 3)
    assert scores == [0.0, 0.0, 1.0]
    assert sum("scored 0" in r.getMessage() for r in caplog.records if r.name == "rewards") == 2


# -- setup code, preflight ---------------------------------------------------------------------------


def test_failing_setup_fails_every_test_and_logs_once_per_row(caplog):
    """Setup code that raises is a failure of every test of its row (never a fallback to the
    candidate's names), logged once per row however many completions it has."""
    fn = code_reward("bwrap", pool_size=2, timeout_s=5.0)
    good = "```python\ndef f(x):\n    return 2 * x\nnp = None\n```"
    rows = {"broken": "import numpy_is_not_installed as np", "raises": "raise RuntimeError('dataset bug')"}
    setups = [rows["broken"]] * 3 + [rows["raises"]] * 2 + ["K = 2"]
    with caplog.at_level("WARNING", logger="rewards"):
        scores = fn([""] * 6, [good] * 6, tests=[["assert f(2) == 4", "assert f(1) == K"]] * 6, test_setup_code=setups)
    assert scores == [0.0] * 5 + [1.0]
    lines = [r.getMessage() for r in caplog.records if "setup code failed" in r.getMessage()]
    assert len(lines) == 2 and any("ModuleNotFoundError" in m for m in lines) and any("dataset bug" in m for m in lines)


@pytest.mark.parametrize("row, column", [
    ({"tests": "assert f(1) == 2"}, "tests"), ({"tests": 7}, "tests"), ({"tests": b"assert f(1)"}, "tests"),
    ({"tests": []}, "tests"), ({"tests": ["assert True", 3]}, "tests"),
    ({"tests": ["assert True"], "test_setup_code": ["x = 1"]}, "test_setup_code"),
    ({"test": "def check(c):\n    pass\n"}, "entry_point"),
    ({"test": "def check(c):\n    pass\n", "entry_point": "f(x)"}, "entry_point"),
    ({"test": 5, "entry_point": "f"}, "test"),
    ({"test": "def check(c):\n    pass\n", "entry_point": "f", "code_prompt": 1}, "code_prompt"),
    ({"inputs": ["1\n"]}, "outputs"), ({"outputs": ["1\n"]}, "inputs"), ({"inputs": "1", "outputs": ["1"]}, "inputs"),
    ({"inputs": ["1", "2"], "outputs": ["1"]}, "outputs"), ({"inputs": ["1"], "outputs": [1]}, "outputs"),
    ({"inputs": ["\ud800"], "outputs": ["1"]}, "inputs"),
])
def test_check_code_rows_names_row_and_column(row, column):
    rows = [{"tests": ["assert True"]}, {"test": "def check(c):\n    pass\n", "entry_point": "Solution().twoSum"},
            {"inputs": [b"1"], "outputs": ["1"]}, row]
    check_code_rows(rows[:3])
    with pytest.raises(ValueError, match=rf"row 3, column '{column}'") as err:
        check_code_rows(rows)
    assert "\n" not in str(err.value)


def test_check_code_rows_without_test_columns():
    with pytest.raises(ValueError, match="row 1 has no test column"):
        check_code_rows([{"tests": ["assert True"]}, {"prompt": "x", "answer": "y"}])
    with pytest.raises(ValueError, match="row 0 is a str"):
        check_code_rows(["tests"])
