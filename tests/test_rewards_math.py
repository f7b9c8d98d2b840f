"""GSM8K and MATH rewards on real data (../shared/data), extraction rules, and timeouts."""

import json
import threading

import pytest

from rewards import get_reward
from rewards._pool import TimeoutPool
from rewards.gsm8k import extract_answer, gold_number
from rewards.math import extract_answer as math_extract
from rewards.math import is_equivalent, is_pathological, last_boxed, score_math


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gsm8k_every_test_solution_scores_one_and_perturbed_zero(shared_data):
    rows = _rows(shared_data / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    fn = get_reward("gsm8k")
    answers = [r["answer"] for r in rows]
    assert fn([r["question"] for r in rows], answers, answer=answers) == [1.0] * len(rows)
    perturbed = [a.rsplit("####", 1)[0] + f"#### {gold_number(a) + 1}" for a in answers]
    assert fn([""] * len(rows), perturbed, answer=answers) == [0.0] * len(rows)
    bare = [a.rsplit("####", 1)[1].strip() for a in answers]  # gold given as a bare number
    assert fn([""] * len(rows), answers, answer=bare) == [1.0] * len(rows)


@pytest.mark.parametrize("text,expected", [
    ("<reasoning>\nSo 3+4=7\n</reasoning>\n<answer>\nThe total is $1,234.00 dollars.\n</answer>", "1234"),
    ("work... #### 72", "72"),
    ("so 5 - 3 = 2 apples", "2"),
    ("The answer is \\boxed{18} eggs, not 20", "18"),
    ("It costs $18.50.", "18.5"),
    ("The temperature fell to -7 degrees.", "-7"),
    ("<answer>3/4</answer> then 9", "0.75"),
    ("no number here", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_answer(text) == expected


def test_math_extraction_rules():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed 5 and more") == "5"
    assert math_extract("<answer>\nso \\boxed{3}\n</answer> \\boxed{4}") == "3"
    assert math_extract("<answer> x = 2 </answer>") == "x = 2"
    assert math_extract("no box") is None


def _math_subset(shared_data, every):
    rows = _rows(shared_data / "math500" / "test.jsonl")
    assert len(rows) == 500
    return rows[::every]


def _check_math_rows(rows):
    scores = score_math([r["solution"] for r in rows], [r["answer"] for r in rows], workers=2)
    bad = [(r["unique_id"], r["answer"]) for r, s in zip(rows, scores) if s != 1.0]
    assert bad == []
    # a wrong answer scores 0 (swap each row's answer with its neighbour's, when they differ)
    wrong = [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    idx = [i for i, r in enumerate(rows) if not is_equivalent("\\boxed{%s}" % wrong[i], r["answer"])]
    assert len(idx) >= 0.95 * len(rows)


def test_math500_solutions_fast_subset(shared_data):
    _check_math_rows(_math_subset(shared_data, 10))


@pytest.mark.slow
def test_math500_every_solution(shared_data):
    _check_math_rows(_math_subset(shared_data, 1))


def test_math_reward_equivalences_and_answer_tags():
    fn = get_reward("math")
    comps = ["The answer is \\boxed{\\frac{1}{2}}.", "<answer>\n0.5\n</answer>", "\\boxed{2} wait no \\boxed{1/2}",
             "\\boxed{3}", "I don't know"]
    assert fn([""] * 5, comps, answer=["\\frac12"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert fn([""], ["\\boxed{(1,2)}"], answer=[None]) == [None]


@pytest.mark.parametrize("answer", [r"2^{2^{2^{2^{2}}}}", r"10^{10^{10}}", r"9^{9^{9}}", r"2^{1000000000}", "10**10**10",
                                    r"(10^{100})!", "(" * 200 + "1" + ")" * 200, "{" * 500 + "1" + "}" * 500])
def test_pathological_answers_score_zero_without_parsing(answer):
    assert is_pathological(answer)
    assert score_math(["\\boxed{%s}" % answer], ["5"]) == [0.0]


def test_math_reward_works_off_the_main_thread():
    """verl's bug: a SIGALRM timeout off the main thread scored everything 0."""
    out = {}
    t = threading.Thread(target=lambda: out.update(s=get_reward("math")(["", ""], ["\\boxed{\\sqrt{4}}", "\\boxed{3}"],
                                                                        answer=["2", "2"])))
    t.start()
    t.join()
    assert out["s"] == [1.0, 0.0]


def test_pool_kills_an_overrunning_item_only():
    pool = TimeoutPool("time:sleep", workers=2, timeout_s=0.5)
    try:
        assert pool.map([0, 30, 0.01, 0]) == [("ok", None), ("timeout", None), ("ok", None), ("ok", None)]
        assert pool.map(["x"])[0][0] == "err"
        # a pathological input that bypasses the pre-filter is killed by the hard deadline
        hard = TimeoutPool("rewards.math:_verify_item", workers=1, timeout_s=2.0)
        try:
            assert hard.map([("10^{10^{10}}", "", "5", 60)]) == [("timeout", None)]
            assert hard.map([("5", "", "5", 1)]) == [("ok", 1.0)]
        finally:
            hard.close()
    finally:
        pool.close()
