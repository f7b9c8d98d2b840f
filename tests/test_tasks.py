"""rl/tasks: split sizes, disjointness (by construction and asserted), determinism, prompt formats,
data sources (local copies via DLLM_RL_DATA, task.path, saved datasets, the hub default without
network), bad data as one DataError line, and accuracy through the isolated reward path."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from recipes.schema import TaskConfig
from rl.tasks import TASKS, DataError, build_task, gsm8k_answer, read_file, register_task
from rl.tasks.registry import Splits


def small_sudoku(**kw) -> TaskConfig:
    return replace(TaskConfig(), **{"num_sft": 16, "num_rl": 64, "num_val": 16, "num_test": 32, **kw})


def real(name: str, **kw) -> TaskConfig:
    return replace(TaskConfig(), **{"name": name, "prompt_style": "instruct", "num_sft": 0, "num_rl": 0,
                                    "num_val": 8, "num_test": 0, **kw})


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


def test_sudoku4_minimal_format_and_registered_rewards():
    task = build_task(small_sudoku())
    row = task.rows("sft")[0]
    assert row["prompt"] == row["puzzle"] and len(row["prompt"]) == 16
    assert row["response"] == row["solution"] and len(row["response"]) == 16
    assert "response" not in task.rows("rl")[0]  # RL never sees the labels
    assert task.rewards == {"sudoku": 1.0} and task.accuracy_reward == "sudoku"  # TaskConfig() leaves them empty


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


def test_a_malformed_sample_scores_wrong_with_one_log_line(caplog):
    """Eval goes through the training reward's per-sample isolation: no exception reaches it."""
    task = build_task(small_sudoku())
    rows = [dict(r) for r in task.rows("test")[:3]]
    rows[1]["puzzle"] = "not a grid"  # malformed: the verifier raises on this sample only
    with caplog.at_level(logging.WARNING, logger="rewards"):
        ok = task.correct(rows, [r["solution"] for r in rows])
    assert ok == [True, False, True]
    failures = [r for r in caplog.records if "failed on samples [1]" in r.getMessage()]
    assert len(failures) == 1


def test_countdown_procedural_task_builds():
    task = build_task(replace(TaskConfig(), name="countdown_procedural", num_sft=0, num_rl=32, num_val=8,
                              num_test=8))
    assert task.rewards == {"countdown": 1.0}
    assert len(task.rows("rl")) == 32 and len(task.rows("test")) == 8
    assert all("target" in r and "nums" in r for r in task.rows("test"))
    rows = task.rows("test")[:4]
    assert task.correct(rows, [r["response"] for r in rows]) == [True] * 4


def test_countdown_generator_stops_when_the_settings_run_out_of_distinct_problems():
    """3 numbers of 1-4 allow a few hundred distinct problems: asking for 1000 fails in a few
    seconds (no new draw for STALL_DRAWS draws), not after 1000 x n draws."""
    from rewards.countdown import make_countdown_dataset

    with pytest.raises(RuntimeError, match=r"could not generate 1000 distinct countdown problems .*\d+ made, none new"):
        make_countdown_dataset(1000, 0, max_num=4)


def test_procedural_splits_fall_back_to_the_need_when_twice_it_does_not_exist():
    """``disjoint_procedural`` asks the generator for twice the rows it needs; when that many distinct
    instances do not exist it asks for the need (sizes that fit keep their splits), and when even that
    fails it says so in one line."""
    from types import SimpleNamespace

    from rl.tasks.procedural import disjoint_procedural

    def make(space):
        def gen(n, seed):
            if n > space:
                raise RuntimeError("too many")
            return [{"k": f"{seed}-{i}"} for i in range(n)]
        return gen

    cfg = SimpleNamespace(name="toy", split_seed=0)
    sizes = {"test": 100, "val": 50, "sft": 100, "rl": 150}
    out = disjoint_procedural(make(450), lambda r: r["k"], cfg, sizes)  # 800 asked first: too many
    assert {s: len(r) for s, r in out.items()} == sizes and out["test"][0]["k"] == "0-0"
    assert disjoint_procedural(make(10_000), lambda r: r["k"], cfg, sizes)["test"] == out["test"]
    with pytest.raises(DataError, match="task toy: fewer than 400 distinct instances exist"):
        disjoint_procedural(make(300), lambda r: r["k"], cfg, sizes)


def test_gsm8k_reads_the_local_copy_named_by_DLLM_RL_DATA(shared_data, monkeypatch):
    monkeypatch.setenv("DLLM_RL_DATA", str(shared_data))
    task = build_task(real("gsm8k", num_val=32))  # task.path unset: $DLLM_RL_DATA/gsm8k
    assert task.source == str(shared_data / "gsm8k")
    assert len(task.rows("test")) == 1319
    assert len(task.rows("val")) == 32 and len(task.rows("rl")) == 7473 - 32
    row = task.rows("test")[0]
    first = read_file(shared_data / "gsm8k" / "test.jsonl")[0]
    assert "<answer>" in row["prompt"] and row["answer"] == gsm8k_answer(first["answer"])
    rows = task.rows("sft")[:3]
    assert task.correct(rows, [r["response"] for r in rows]) == [True] * 3  # references are judged correct


def test_math500_without_a_train_split_evaluates_but_cannot_train(shared_data, monkeypatch):
    monkeypatch.setenv("DLLM_RL_DATA", str(shared_data))
    m = build_task(real("math500"))
    assert len(m.rows("test")) == 500 and {"prompt", "answer"} <= set(m.rows("test")[0])
    assert not m.has_train and m.rows("val") == m.rows("rl") == []  # never trains or selects on test rows
    assert "task.path=" in m.missing_train_message() and "\n" not in m.missing_train_message()
    h = build_task(real("humaneval", path=str(shared_data / "humaneval")))
    assert len(h.rows("test")) == 164 and not h.has_train
    assert {"test", "entry_point", "prompt"} <= set(h.rows("test")[0])


def test_hub_default_offline_without_a_local_copy_says_both_ways_out(monkeypatch):
    monkeypatch.delenv("DLLM_RL_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        build_task(real("gsm8k"))
    msg = str(err.value)
    assert "openai/gsm8k" in msg and "DLLM_RL_DATA=" in msg and "task.path=" in msg and "\n" not in msg


def test_hub_defaults_are_the_public_datasets(monkeypatch):
    """The hub code path without network: ``datasets.load_dataset`` answers from local rows."""
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, **_):
        calls.append((name, config, split))
        if name == "Jiayi-Pan/Countdown-Tasks-3to4":
            rows = [{"nums": [i, i + 1, i + 2][: 3 + (i % 2)] + [1] * (i % 2), "target": i} for i in range(1, 41)]
        elif name.endswith("MATH-500") or name.endswith("math-500"):
            rows = [{"problem": f"{name} {split} {i}?", "solution": f"\\boxed{{{i}}}", "answer": str(i)}
                    for i in range(12)]
        elif name == "someone/prompts":
            if split != "train":
                raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
            rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)]
        else:
            rows = [{"question": f"{split} q{i}", "answer": f"so #### {i}"} for i in range(12)]
        return datasets.Dataset.from_list(rows)

    monkeypatch.delenv("DLLM_RL_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    g = build_task(real("gsm8k", num_val=2))
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert len(g.rows("test")) == 12 and len(g.rows("rl")) == 10
    calls.clear()
    m = build_task(real("math500", num_val=2))
    assert calls == [("ankner/math-500", None, "train"), ("HuggingFaceH4/MATH-500", None, "test")] and m.has_train
    calls.clear()
    c = build_task(real("countdown", num_val=4, num_test=6))
    assert calls == [("Jiayi-Pan/Countdown-Tasks-3to4", None, "train")]  # no test split: held out of train
    assert all(len(r["nums"]) == 3 for s in ("rl", "val", "test") for r in c.rows(s))  # d1: 3-number problems
    assert (len(c.rows("test")), len(c.rows("val")), len(c.rows("rl"))) == (6, 4, 20 - 10)
    own = build_task(real("local", path="someone/prompts", num_val=2, num_test=3, rewards={"gsm8k": 1.0},
                          accuracy_reward="gsm8k"))
    assert calls[-2:] == [("someone/prompts", None, "train"), ("someone/prompts", None, "test")]
    assert (len(own.rows("test")), len(own.rows("val")), len(own.rows("rl"))) == (3, 2, 15)


def test_a_saved_dataset_folder_is_a_local_copy(tmp_path):
    import datasets

    rows = {s: [{"question": f"{s} {i}?", "answer": f"x #### {i}"} for i in range(n)] for s, n in (("train", 20),
                                                                                                    ("test", 5))}
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(tmp_path / "gsm")
    task = build_task(real("gsm8k", path=str(tmp_path / "gsm"), num_val=4))
    assert (len(task.rows("test")), len(task.rows("val")), len(task.rows("rl"))) == (5, 4, 16)


def test_file_task_splits_are_disjoint_by_construction(tmp_path):
    """Repeated prompts and train rows that repeat a test prompt never straddle splits."""
    folder = tmp_path / "d"
    folder.mkdir()
    train = [{"question": f"q{i % 30}", "answer": f"#### {i}"} for i in range(60)] + [{"question": "t1", "answer": "#### 1"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "test.jsonl").write_text(json.dumps({"question": "t1", "answer": "#### 1"}) + "\n")
    task = build_task(real("gsm8k", path=str(folder), num_val=5, prompt_style="minimal"))
    assert len(task.rows("val")) + len(task.rows("rl")) == 30  # 30 distinct training prompts, t1 dropped
    assert "t1" not in {r["prompt"] for r in task.rows("rl")}


def test_build_task_asserts_disjoint_splits():
    @register_task("leaky_test_task", rewards={"gsm8k": 1.0}, accuracy_reward="gsm8k")
    def leaky(cfg):
        row = {"prompt": "same", "answer": "1"}
        return Splits({"rl": [row], "test": [row]})

    try:
        with pytest.raises(DataError, match="train and test splits share 1 prompt"):
            build_task(replace(TaskConfig(), name="leaky_test_task"))
    finally:
        TASKS.pop("leaky_test_task")


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


def test_chat_prompts_pass_through_and_score_as_text(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"what is {i}+{i}?"}], "answer": str(2 * i)} for i in range(12)]
    jl = tmp_path / "chat.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task(replace(TaskConfig(), name="local", path=str(jl), prompt_style="instruct", num_sft=0,
                              num_rl=0, num_val=2, num_test=4, rewards={"gsm8k": 1.0}, accuracy_reward="gsm8k"))
    test = task.rows("test")
    assert isinstance(test[0]["prompt"], list)
    assert task.correct(test, [f"<answer>{r['answer']}</answer>" for r in test]) == [True] * 4


def _write(path, text: str):
    path.write_text(text)
    return path


BAD_DATA = {
    "truncated jsonl": (lambda d: _write(d / "t.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "ans'),
                        "cannot read rows"),
    "missing column": (lambda d: _write(d / "m.jsonl", '{"question": "a", "answer": "1"}\n'), "has no column 'prompt'"),
    "wrong type": (lambda d: _write(d / "w.jsonl", '{"prompt": {"x": 1}, "answer": "1"}\n'), "expected text"),
    "nonexistent path": (lambda d: d / "nope.jsonl", "no such file or folder"),
    "empty file": (lambda d: _write(d / "e.jsonl", ""), "no rows (the file is empty)"),
    "empty folder": (lambda d: (d / "empty").mkdir() or d / "empty", "no data files"),
    "unsupported type": (lambda d: _write(d / "x.txt", "hi"), "unsupported file type"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_naming_the_problem(tmp_path, case):
    make, expected = BAD_DATA[case]
    cfg = replace(TaskConfig(), name="local", path=str(make(tmp_path)), rewards={"gsm8k": 1.0},
                  accuracy_reward="gsm8k", num_val=1, num_test=1)
    with pytest.raises(DataError) as err:
        build_task(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_every_task_is_registered_with_default_scoring():
    assert {"sudoku4", "countdown", "countdown_procedural", "gsm8k", "math500", "humaneval", "local"} <= set(TASKS)
    assert all(spec.rewards and spec.accuracy_reward for name, spec in TASKS.items() if name != "local")
