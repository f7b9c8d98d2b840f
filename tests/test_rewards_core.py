"""Registry, composition, format, Countdown and Sudoku rewards."""

import logging
import math
import sys
import time

import pytest

import rewards
from rewards import compose, get_reward, register_reward
from rewards.countdown import evaluate, make_countdown_dataset, score_countdown
from rewards.format import count_xml
from rewards.sudoku import (all_solutions, count_solutions, is_valid_sudoku, make_sudoku_dataset, parse_grid,
                            split_disjoint, sudoku_solved)


def test_package_does_not_import_torch():
    import subprocess

    code = "import sys, rewards, rewards.code, rewards.math, rewards.sandbox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_builtins_user_and_dotted():
    assert set(rewards.registered_rewards()) >= {"math", "gsm8k", "format_strict", "format_soft", "xml_count",
                                                 "countdown", "sudoku", "code"}

    @register_reward("test_len_reward")
    def length_reward(prompts, completions, *, scale=1.0, **columns):
        return [scale * len(c) for c in completions]

    assert get_reward("test_len_reward")(["p"], ["abc"]) == [3]
    assert get_reward("test_len_reward", scale=2.0)(["p"], ["abc"]) == [6.0]
    assert get_reward("rewards.format:xml_count") is rewards.xml_count
    assert get_reward("rewards.format.format_soft") is rewards.format_soft
    with pytest.raises(KeyError, match="no_such_reward"):
        get_reward("no_such_reward")
    with pytest.raises(KeyError, match="nope"):
        get_reward("rewards.format:nope")


def _boom(prompts, completions, **columns):
    out = []
    for c in completions:
        if c == "boom":
            raise RuntimeError("kaboom")
        out.append(1.0)
    return out


def _hang(prompts, completions, **columns):
    if "hang" in completions:
        time.sleep(30)
    return [0.5] * len(completions)


def _nan(prompts, completions, **columns):
    return [float("nan") if c == "nan" else None for c in completions]


def test_compose_weights_none_and_names():
    comp = compose({"format_soft": 2.0, "xml_count": 1.0})
    good = "<reasoning>\nline one\nline two\n</reasoning>\n<answer>\n42\n</answer>\n"
    out = comp(["p", "p"], [good, "no tags"])
    assert comp.names == ["format_soft", "xml_count"]
    assert out.per_function["format_soft"] == [0.5, 0.0]
    assert out.per_function["xml_count"] == [pytest.approx(0.5), 0.0]
    assert out.total == [pytest.approx(2 * 0.5 + 0.5), 0.0]

    comp = compose([(lambda prompts, completions, **k: [None, 1.0], 3.0), ("format_strict", 1.0, {"score": 1.0})])
    out = comp(["p", "p"], [good, "x"])
    assert out.per_function["<lambda>"] == [None, 1.0]
    assert out.total == [1.0, 3.0]


def test_compose_isolates_errors_timeouts_and_nan(caplog):
    comp = compose([(_boom, 1.0), (_hang, 1.0), (_nan, 1.0)], timeout_s=0.5, on_error=0.0)
    with caplog.at_level(logging.WARNING, logger="rewards"):
        out = comp(["p"] * 4, ["ok", "boom", "hang", "nan"])
    assert out.per_function["_boom"] == [1.0, 0.0, 1.0, 1.0]
    assert out.per_function["_hang"] == [0.5, 0.5, 0.0, 0.5]
    assert out.per_function["_nan"] == [None, None, None, 0.0]
    assert all(math.isfinite(t) for t in out.total)
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "'_boom' failed on samples [1]" in msgs and "kaboom" in msgs
    assert "'_hang' failed on samples [2]" in msgs
    assert "'_nan' failed on samples [3]" in msgs

    comp = compose([(_boom, 1.0)], on_error=None)
    out = comp(["p", "p"], ["boom", "ok"])
    assert out.per_function["_boom"] == [None, 1.0] and out.total == [0.0, 1.0]


def test_compose_rejects_bad_specs():
    with pytest.raises(ValueError, match="weight"):
        compose({"gsm8k": "heavy"})
    with pytest.raises(ValueError, match="duplicate"):
        compose([("gsm8k", 1.0), ("gsm8k", 2.0)])
    with pytest.raises(ValueError, match="column 'answer'"):
        compose({"gsm8k": 1.0})(["p"], ["c"], answer=["1", "2"])


def test_format_rewards_multiline():
    strict = "<reasoning>\nStep 1: think.\n\nStep 2: more.\n</reasoning>\n<answer>\n7\n</answer>\n"
    soft = "  <reasoning>multi\nline</reasoning> <answer>7</answer> trailing"
    fs, fso = rewards.format_strict, rewards.format_soft
    assert fs([""] * 3, [strict, soft, strict.rstrip("\n")]) == [0.5, 0.0, 0.5]
    assert fso([""] * 3, [strict, soft, "<answer>7</answer>"]) == [0.5, 0.5, 0.0]
    assert count_xml(strict) == pytest.approx(0.5)
    assert count_xml(strict + "extra") == pytest.approx(0.5 - 5 * 0.001 - 5 * 0.001)
    assert count_xml("nothing") == 0.0


def test_countdown_reward_and_ast_evaluation():
    nums, target = [3, 5, 7], 22
    ok = "<reasoning>\n3*5=15, +7\n</reasoning>\n<answer>3 * 5 + 7</answer>"
    assert score_countdown(ok, nums, target) == 1.0
    assert score_countdown("<answer>(7 + 5) * 3 - 14 = 22</answer>", nums, target) == 0.1  # extra number
    assert score_countdown("<answer>3 * 5 + 6</answer>", nums, target) == 0.1  # wrong value/numbers
    assert score_countdown("<answer>3 / (5 - 5)</answer>", nums, target) == 0.1  # division by zero
    assert score_countdown("<answer>__import__('os').system('true')</answer>", nums, target) == 0.0
    assert score_countdown("<answer>3 ** 5</answer>", nums, target) == 0.0
    assert score_countdown("3 * 5 + 7", nums, target) == 0.0  # no answer tag
    assert score_countdown("<answer>1</answer><answer>3*5+7</answer>", nums, target) == 1.0  # last tag
    assert evaluate("7 / 2 * 2")[0] == 7  # exact fractions
    out = get_reward("countdown")(["", ""], [ok, "x"], nums=[nums, nums], target=[target, None])
    assert out == [1.0, None]


def test_countdown_dataset_is_solvable_and_deterministic():
    rows = make_countdown_dataset(200, seed=3, num_count=4, max_num=30)
    assert rows == make_countdown_dataset(200, seed=3, num_count=4, max_num=30)
    assert rows != make_countdown_dataset(200, seed=4, num_count=4, max_num=30)
    assert len({(tuple(sorted(r["nums"])), r["target"]) for r in rows}) == 200
    for r in rows:
        assert len(r["nums"]) == 4 and all(1 <= n <= 30 for n in r["nums"]) and 1 <= r["target"] <= 100
        assert score_countdown(f"<answer>{r['solution']}</answer>", r["nums"], r["target"]) == 1.0


def test_sudoku_reward_and_checks():
    row = make_sudoku_dataset(1, seed=7)[0]
    puzzle, solution = row["puzzle"], row["solution"]
    assert is_valid_sudoku(solution) and not is_valid_sudoku(puzzle)
    assert is_valid_sudoku(puzzle, allow_empty=True)
    assert not is_valid_sudoku("1134341221434321") and is_valid_sudoku("1234341221434321")
    assert count_solutions(puzzle) == 1
    empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
    wrong_one = list(solution)
    wrong_one[empty[0]] = "4" if solution[empty[0]] != "4" else "3"
    comps = [f"<reasoning>\nrow by row\n</reasoning>\n<answer>\n{solution[:4]}\n{solution[4:8]}\n{solution[8:12]}\n{solution[12:]}\n</answer>",
             "<answer>" + "".join(wrong_one) + "</answer>", "<answer>1234</answer>", solution, puzzle]
    out = get_reward("sudoku")([""] * 5, comps, puzzle=[puzzle] * 5, solution=[solution] * 5)
    assert out == [1.0, (len(empty) - 1) / len(empty), 0.0, 1.0, 0.0]
    assert sudoku_solved(comps[0], puzzle, solution) and not sudoku_solved(comps[1], puzzle, solution)
    assert parse_grid("<answer>1 2 3</answer>") is None
    with pytest.raises(ValueError, match="'puzzle' row 0"):
        get_reward("sudoku")([""], ["x"], puzzle=["123"], solution=[solution])


def test_sudoku_dataset_unique_deterministic_and_split():
    assert len(all_solutions()) == 288 and all(is_valid_sudoku(s) for s in all_solutions())
    rows = make_sudoku_dataset(300, seed=0)
    assert rows == make_sudoku_dataset(300, seed=0)
    assert rows != make_sudoku_dataset(300, seed=1)
    assert len({r["puzzle"] for r in rows}) == 300
    for r in rows:
        p, s = r["puzzle"], r["solution"]
        assert 8 <= p.count("0") <= 11 and is_valid_sudoku(s)
        assert all(a in ("0", b) for a, b in zip(p, s))
        assert count_solutions(p) == 1
    train, val, test = split_disjoint(rows, val_frac=0.1, test_frac=0.2, seed=0)
    assert (len(train), len(val), len(test)) == (210, 30, 60)
    keys = [{r["puzzle"] for r in part} for part in (train, val, test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
