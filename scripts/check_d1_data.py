"""Cross-check our d1 data path against d1's own code (github.com/dllm-reasoning/d1, not vendored):

- the s1K SFT examples: ``SFT/sft_trainer.py:preprocess_dataset`` (input ids and prompt lengths) vs
  ``rl/sft_format.py``'s ``d1`` format on the rows of ``tests/fixtures/s1k`` (s1K's schema), with the
  built-in tokenizer (chat template) and with the tiny LLaDA fixture's;
- the GRPO training prompts: ``diffu-grpo/data_utils.py`` (``get_gsm8k_questions``,
  ``get_math_questions``, ``get_countdown_questions``, ``get_sudoku_questions``; their hub loaders
  fed our local rows) vs our tasks with ``prompt_style=d1``, and their answer columns;
- the evaluation prompts: ``eval/{gsm8k,math500,countdown,sudoku}.py`` ``create_prompt`` /
  ``__getitem__`` vs ``prompt_style=d1_eval`` rendered with the same chat template;
- with ``--generations DIR`` (``<run_dir>/eval/generations`` or ``<run_dir>/generations`` of an
  ``eval.protocol=d1`` run): d1's own ``parse_and_get_acc`` reads our files, and its accuracy per
  file equals ours (``rewards.d1.d1_eval_accuracy``, the ``d1_accuracy`` of results.json).

    git clone https://github.com/dllm-reasoning/d1 /path/to/d1
    .venv/bin/python scripts/check_d1_data.py --d1-repo /path/to/d1 [--write-fixture tests/fixtures/d1_data.json]

``--write-fixture`` records d1's outputs on our fixture rows (ids, prompt lengths, prompt texts) for
tests/test_d1.py, which checks our code against them in CI without d1's code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
S1K = ROOT / "tests" / "fixtures" / "s1k" / "train.jsonl"
SFT_MAX_LENGTH = 320


def load(path: Path, name: str, extra_path: Path | None = None):
    """Import one of d1's files as a module (its folder on sys.path for its sibling imports)."""
    if extra_path is not None and str(extra_path) not in sys.path:
        sys.path.insert(0, str(extra_path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    return module


class FakeDataset(list):
    """What d1's data functions call on a ``datasets.Dataset``: ``map``, ``filter``, item access."""

    def map(self, fn):
        return FakeDataset({**row, **fn(row)} for row in self)

    def filter(self, fn):
        return FakeDataset(row for row in self if fn(row))


def s1k_rows() -> list[dict]:
    return [json.loads(line) for line in S1K.read_text().splitlines()]


def task_rows(name: str, style: str, **options) -> list[dict]:
    from dataclasses import replace

    from recipes.schema import TaskConfig
    from rl.tasks import build_task

    cfg = replace(TaskConfig(), name=name, prompt_style=style, num_val=0, num_test=options.pop("num_test", 8),
                  rewards={"math": 1.0}, accuracy_reward="math", **options)
    task = build_task(cfg)
    return task.rows("test")


def check_sft(d1: Path, tokenizers: dict) -> tuple[dict, int]:
    from rl.sft_format import encode_d1_example
    from rl.tasks.d1 import s1k_row

    trainer = load(d1 / "SFT" / "sft_trainer.py", "d1_sft_trainer")
    rows = s1k_rows()
    record, failures = {}, 0
    for label, tok in tokenizers.items():
        tok.padding_side = "right"  # d1 loads its tokenizer with padding_side="right"
        with contextlib.redirect_stderr(io.StringIO()):
            train, test = trainer.preprocess_dataset(rows, tok, SFT_MAX_LENGTH, test_split=0.0)
        # preprocess_dataset shuffles with the global RNG: match its examples to ours by their ids
        theirs = {tuple(ex["input_ids"].tolist()): int(ex["prompt_lengths"]) for ex in train + test}
        ours = []
        for i, r in enumerate(rows):
            row = s1k_row(r, "fixture", i)
            ids, mask = encode_d1_example(tok, row["prompt"], row["response"], max_length=SFT_MAX_LENGTH)
            ours.append((ids, mask.index(1) if 1 in mask else len(mask)))
            if theirs.get(tuple(ids)) != ours[-1][1]:
                failures += 1
                print(f"  sft {label} row {i}: ids equal={tuple(ids) in theirs}, prompt length ours {ours[-1][1]} "
                      f"d1 {theirs.get(tuple(ids))}")
        print(f"sft examples ({label} tokenizer): {len(rows)} rows, "
              f"{len(rows) - sum(theirs.get(tuple(i)) != n for i, n in ours)} equal to preprocess_dataset")
        record[label] = [{"input_ids": ids, "prompt_length": n} for ids, n in ours]
    return record, failures


def check_train_prompts(d1: Path) -> tuple[dict, int]:
    """d1's get_*_questions on our rows vs our tasks' d1 prompts (and their answer columns)."""
    grpo = d1 / "diffu-grpo"
    sys.modules.setdefault("math500_utils", load(grpo / "math500_utils.py", "math500_utils", grpo))
    data_utils = load(grpo / "data_utils.py", "d1_data_utils", grpo)
    record, failures = {}, 0

    def compare(kind: str, ours: list[dict], raw: list[dict], fn, key_pairs):
        nonlocal failures
        data_utils.load_dataset = lambda *a, **k: FakeDataset(raw) if "split" in k else {"train": FakeDataset(raw),
                                                                                           "test": FakeDataset(raw)}
        theirs = fn("train") if kind != "sudoku" else None
        equal = 0
        for mine, th in zip(ours, theirs):
            same = mine["prompt"] == th["prompt"] and all(mine[a] == th[b] for a, b in key_pairs)
            equal += same
            if not same:
                failures += 1
                print(f"  {kind}: ours {mine['prompt']!r}\n  d1   {th['prompt']!r}")
        print(f"train prompts {kind}: {len(ours)} rows, {equal} equal to d1's data_utils")
        record[kind] = [m["prompt"] for m in ours]

    from rl.tasks.loading import read_file
    from tests_data import SHARED_DATA  # noqa: F401  (set below)

    gsm = read_file(SHARED_DATA / "gsm8k" / "test.jsonl")[:8]
    compare("gsm8k", task_rows("gsm8k", "d1"), gsm, data_utils.get_gsm8k_questions, [("answer", "answer")])
    math = read_file(SHARED_DATA / "math500" / "test.jsonl")[:8]
    ours_math = task_rows("math500", "d1", path=str(SHARED_DATA / "math500"))
    compare("math500", ours_math, math, data_utils.get_math_questions, [("solution", "answer")])
    cd = [{"nums": [3, 5, 7], "target": 22}, {"nums": [10, 2, 4], "target": 9}, {"nums": [1, 2, 3], "target": 6}]
    ours_cd = [{"prompt": __import__("rl.tasks.d1", fromlist=["x"]).countdown_prompt(r["nums"], r["target"], "d1"),
                "nums": r["nums"], "target": r["target"]} for r in cd]
    compare("countdown", ours_cd, cd, data_utils.get_countdown_questions, [("nums", "numbers"), ("target", "target")])
    # sudoku: d1 reads its CSV; the prompt function is the same for any puzzle
    from rl.tasks.d1 import sudoku_prompt

    puzzle = "3102200002100320"
    expected = [{"role": "user", "content": f"{data_utils.SUDOKU_SYSTEM_PROMPT}\n\nSolve the following Sudoku puzzle: "
                                             f"{puzzle}\n"}]
    same = sudoku_prompt(puzzle, "d1") == expected
    failures += not same
    print(f"train prompts sudoku: 1 puzzle, {int(same)} equal to d1's get_sudoku_questions template")
    record["sudoku"] = [sudoku_prompt(puzzle, "d1")]
    return record, failures


def check_eval_prompts(d1: Path, tok) -> tuple[dict, int]:
    """d1's evaluation datasets' prompt text vs ours (prompt_style=d1_eval, rendered by the template)."""
    from rollout.prompts import encode_prompt
    from rl.tasks import d1 as ours

    ev = d1 / "eval"
    for name in ("parsers", "generate", "gsm8k"):
        sys.modules.setdefault(name, load(ev / f"{name}.py", name, ev))
    mods = {k: load(ev / f"{f}.py", f"d1_eval_{f}", ev) for k, f in
            (("gsm8k", "gsm8k"), ("math500", "math500"), ("countdown", "countdown"), ("sudoku", "sudoku"))}
    classes = {"gsm8k": mods["gsm8k"].GSM8KDataset, "math500": mods["math500"].MATH500Dataset,
               "countdown": mods["countdown"].CTDDataset, "sudoku": mods["sudoku"].SudokuDataset}
    prompts = {"gsm8k": mods["gsm8k"].GSM_SYSTEM_PROMPT, "math500": mods["math500"].MATH500_SYSTEM_PROMPT,
               "countdown": mods["countdown"].CTD_SYSTEM_PROMPT, "sudoku": mods["sudoku"].SUDOKU_SYSTEM_PROMPT}
    questions = {"gsm8k": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                 "math500": "What is $\\frac{1}{2} + \\frac{1}{3}$?",
                 "countdown": ours.eval_question("countdown", {"nums": [3, 5, 7], "target": 22}),
                 "sudoku": ours.eval_question("sudoku", {"puzzle": "3102200002100320"})}
    record, failures = {}, 0
    for kind, cls in classes.items():
        ds = cls.__new__(cls)  # no data loading: only the prompt path
        ds.tokenizer, ds.num_examples, ds.add_reasoning, ds.system_prompt = tok, 0, True, prompts[kind]
        theirs = ds.create_prompt(questions[kind])
        mine = ours.eval_prompt(kind, questions[kind])
        text = tok.decode(encode_prompt(tok, mine), skip_special_tokens=False)
        same = text == theirs and tok(theirs)["input_ids"] == encode_prompt(tok, mine, add_special_tokens=True)
        failures += not same
        print(f"eval prompt {kind}: {'equal' if same else 'DIFFERENT'} to d1's {cls.__name__}.create_prompt")
        if not same:
            print(f"  ours {text!r}\n  d1   {theirs!r}")
        record[kind] = {"question": questions[kind], "text": theirs}
    return record, failures


def check_generation_files(d1: Path, folder: Path) -> int:
    """d1's parser on our generation files (d1 layout) vs our d1_accuracy of the same items."""
    from rewards.d1 import d1_eval_accuracy

    tk = types.ModuleType("tiktoken")  # d1 counts tokens with tiktoken (offline here): not compared
    tk.get_encoding = lambda name: types.SimpleNamespace(encode=lambda text: text.split())
    sys.modules.setdefault("tiktoken", tk)
    parser = load(d1 / "eval" / "parse_and_get_acc.py", "d1_parse_and_get_acc", d1 / "eval")
    failures, files = 0, sorted(folder.glob("*_generations.json"))
    for path in files:
        kind = next(k for k in ("gsm", "math", "countdown", "sudoku") if k in path.name)
        fn = {"gsm": parser.parse_gsm_answers, "math": parser.parse_math_answers,
              "countdown": parser.parse_countdown_answers, "sudoku": parser.parse_sudoku_answers}[kind]
        with contextlib.redirect_stdout(io.StringIO()):
            correct, total, _, _ = fn(json_path=str(path))
        items = json.loads(path.read_text())["generations"]
        ours = d1_eval_accuracy({"gsm": "gsm8k"}.get(kind, kind), items)
        same = abs(correct / max(total, 1) - ours) < 1e-12
        failures += not same
        print(f"generations {path.name}: d1's parser {100 * correct / max(total, 1):.2f}%, ours {100 * ours:.2f}% "
              f"({'equal' if same else 'DIFFERENT'})")
    if not files:
        print(f"no *_generations.json in {folder}")
        return 1
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d1-repo", type=Path, required=True, help="a checkout of github.com/dllm-reasoning/d1")
    ap.add_argument("--write-fixture", type=Path, help="record d1's outputs on our fixture rows (JSON)")
    ap.add_argument("--generations", type=Path, help="also read an eval.protocol=d1 run's generation files with "
                                                     "d1's parser")
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    shared = Path(os.environ.get("DLLM_RL_SHARED_DATA", ROOT.parent / "shared" / "data"))
    os.environ.setdefault("DLLM_RL_DATA", str(shared))
    sys.modules["tests_data"] = types.SimpleNamespace(SHARED_DATA=shared)

    import tempfile

    from helpers.published import build_published_folder
    from rollout.tiny import build_tiny_tokenizer
    from transformers import AutoTokenizer

    folder = build_published_folder("llada", Path(tempfile.mkdtemp()) / "llada")
    tokenizers = {"tiny": build_tiny_tokenizer(), "llada_fixture": AutoTokenizer.from_pretrained(str(folder))}
    sft, f1 = check_sft(args.d1_repo, tokenizers)
    train, f2 = check_train_prompts(args.d1_repo)
    evals, f3 = check_eval_prompts(args.d1_repo, tokenizers["tiny"])
    failures = f1 + f2 + f3
    if args.generations:
        failures += check_generation_files(args.d1_repo, args.generations)
    if args.write_fixture:
        args.write_fixture.write_text(json.dumps({"sft_max_length": SFT_MAX_LENGTH, "sft": sft["tiny"],
                                                  "train_prompts": train, "eval_prompts": evals}, indent=1) + "\n")
        print(f"wrote {args.write_fixture}")
    print("all equal" if not failures else f"{failures} differences")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
