"""rl/tasks.py: split sizes, disjointness and determinism, prompt formats, file loading with a
column mapping, and that accuracy agrees with the verifiers (reference answers are correct)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from recipes.schema import TaskConfig
from rl.tasks import TASKS, build_task, gsm8k_answer, read_rows


def small_sudoku(**kw) -> TaskConfig:
    return replace(TaskConfig(), **{"num_sft": 16, "num_rl": 64, "num_val": 16, "num_test": 32, **kw})


def test_sudoku4_splits_are_disjoint_sized_and_fixed_by_split_seed():
    task = build_task(small_sudoku())
    sizes = {s: len(task.rows(s)) for s in ("sft", "rl", "val", "test")}
    assert sizes == {"sft": 16, "rl": 64, "val": 16, "test": 32}
    puzzles = {s: {r["puzzle"] for r in task.rows(s)} for s in sizes}
    for a in sizes:
        assert len(puzzles[a]) == sizes[a]  # no duplicates inside a split
        for b in sizes:
            if a < b:
                assert not puzzles[a] & puzzles[b], (a, b)
    again = build_task(small_sudoku())
    assert again.rows("test") == task.rows("test")
    # more RL prompts never change the held-out test set
    assert build_task(small_sudoku(num_rl=128)).rows("test") == task.rows("test")
    assert build_task(small_sudoku(split_seed=7)).rows("test") != task.rows("test")


def test_sudoku4_minimal_format_and_reward_columns():
    task = build_task(small_sudoku())
    row = task.rows("sft")[0]
    assert row["prompt"] == row["puzzle"] and len(row["prompt"]) == 16
    assert row["response"] == row["solution"] and len(row["response"]) == 16
    assert "response" not in task.rows("rl")[0]  # RL never sees the labels
    assert task.rewards == {"sudoku": 1.0}


def test_accuracy_is_exact_solve():
    task = build_task(small_sudoku())
    rows = task.rows("test")[:4]
    solutions = [r["solution"] for r in rows]
    assert task.correct(rows, solutions) == [True] * 4
    wrong = list(solutions)
    i = next(i for i, c in enumerate(rows[0]["puzzle"]) if c not in "1234")  # an empty cell
    wrong[0] = wrong[0][:i] + str(int(wrong[0][i]) % 4 + 1) + wrong[0][i + 1:]
    assert task.correct(rows, wrong) == [False, True, True, True]
    assert task.accuracy(rows, wrong) == 0.75


def test_countdown_task_builds():
    task = build_task(replace(TaskConfig(), name="countdown", rewards={"countdown": 1.0},
                              accuracy_reward="countdown", num_sft=0, num_rl=32, num_val=8, num_test=8))
    assert len(task.rows("rl")) == 32 and len(task.rows("test")) == 8
    assert all("target" in r and "nums" in r for r in task.rows("test"))
    rows = task.rows("test")[:4]
    assert task.correct(rows, [r["response"] for r in rows]) == [True] * 4


def test_gsm8k_local_copy(shared_data):
    cfg = replace(TaskConfig(), name="gsm8k", path=str(shared_data / "gsm8k"), prompt_style="instruct",
                  rewards={"gsm8k": 1.0}, accuracy_reward="gsm8k", num_sft=0, num_rl=0, num_val=32, num_test=0)
    task = build_task(cfg)
    assert len(task.rows("test")) == 1319
    assert len(task.rows("val")) == 32 and len(task.rows("rl")) == 7473 - 32
    val_q = {r["prompt"] for r in task.rows("val")}
    assert not val_q & {r["prompt"] for r in task.rows("rl")}
    row = task.rows("test")[0]
    assert "<answer>" in row["prompt"] and row["answer"] == gsm8k_answer(read_rows(shared_data / "gsm8k" / "test.jsonl")[0]["answer"])
    # the reference response is judged correct by the verifier
    rows = task.rows("sft")[:3]
    assert task.correct(rows, [r["response"] for r in rows]) == [True] * 3


def test_math500_and_humaneval_local(shared_data):
    m = build_task(replace(TaskConfig(), name="math500", path=str(shared_data / "math500"), rewards={"math": 1.0},
                           accuracy_reward="math", num_sft=0, num_rl=0, num_val=10, num_test=0))
    assert len(m.rows("test")) == 500 and {"prompt", "answer"} <= set(m.rows("test")[0])
    h = build_task(replace(TaskConfig(), name="humaneval", path=str(shared_data / "humaneval"),
                           rewards={"code": 1.0}, accuracy_reward="code", num_sft=0, num_rl=0, num_val=4,
                           num_test=0))
    assert len(h.rows("test")) == 164
    assert {"test", "entry_point", "prompt"} <= set(h.rows("test")[0])


def test_local_jsonl_and_parquet_with_column_mapping(tmp_path):
    rows = [{"q": f"what is {i}+{i}?", "a": str(2 * i), "extra": i} for i in range(40)]
    jl = tmp_path / "data.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = replace(TaskConfig(), name="local", path=str(jl), columns={"prompt": "q", "answer": "a"},
                  prompt_style="minimal", rewards={"gsm8k": 1.0}, accuracy_reward="gsm8k",
                  num_sft=0, num_rl=0, num_val=5, num_test=10)
    task = build_task(cfg)
    assert len(task.rows("test")) == 10 and len(task.rows("val")) == 5 and len(task.rows("rl")) == 25
    r = task.rows("rl")[0]
    assert set(r) == {"prompt", "answer", "extra"} and r["prompt"].startswith("what is")
    all_prompts = [x["prompt"] for s in ("test", "val", "rl") for x in task.rows(s)]
    assert len(set(all_prompts)) == 40

    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    assert build_task(replace(cfg, path=str(pqf))).rows("test") == task.rows("test")

    with pytest.raises(KeyError, match="row 0 has no column 'question'"):
        build_task(replace(cfg, columns={"prompt": "question"}))


def test_unknown_task_and_bad_file_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="task.name='nope'"):
        build_task(replace(TaskConfig(), name="nope"))
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(ValueError, match="x.txt: unsupported file type"):
        build_task(replace(TaskConfig(), name="local", path=str(bad)))
    assert {"sudoku4", "countdown", "gsm8k", "math500", "humaneval", "local"} <= set(TASKS)
