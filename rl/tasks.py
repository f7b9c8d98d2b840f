"""Task registry: rows for SFT / RL / validation / test, a reward spec and an accuracy function.

A task turns a :class:`recipes.schema.TaskConfig`-like object (any object with the same fields)
into a :class:`Task` with four row lists:

- ``sft``: labelled rows ``{"prompt", "response", ...}`` (the response is the SFT target);
- ``rl``: rows ``{"prompt", <reward columns>}`` for GRPO (responses are never shown to RL);
- ``val``: model selection during training; ``test``: held-out evaluation (``eval/accuracy``).

Reward columns (``solution``, ``answer``, ``test`` ...) arrive at reward functions as keyword
lists (TRL convention). Accuracy = the fraction of rows whose ``accuracy_reward`` is 1.0 (exact
solve), so eval reuses the verifiers of :mod:`rewards`.

Built-in: ``sudoku4`` and ``countdown`` (procedural, fixed-seed disjoint splits), ``gsm8k``,
``math500``, ``humaneval`` (local copies or hub names), ``local`` (your JSONL/JSON/parquet/CSV
with a column mapping). Add one with :func:`register_task`.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# d1's answer format for the instruct models (Zhao et al. 2025, App. "prompts").
REASONING_FORMAT = ("Respond in the following format:\n<reasoning>\n...\n</reasoning>\n"
                    "<answer>\n...\n</answer>")
ROOT = Path(__file__).resolve().parents[1]

SPLITS = ("sft", "rl", "val", "test")


@dataclass
class Task:
    """Rows per split plus how to score them."""

    name: str
    splits: dict[str, list[dict]]
    rewards: dict[str, float]
    accuracy_reward: str
    exact: Callable[[dict, str], bool] | None = None  # task-specific exact check (overrides accuracy_reward)

    def rows(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {split!r} (splits: {sorted(self.splits)})")
        return self.splits[split]

    def reward_fn(self):
        """The composed RL reward (``rewards.compose``) of this task."""
        from rewards import compose

        return compose(dict(self.rewards))

    def correct(self, rows: Sequence[dict], completions: Sequence[str]) -> list[bool]:
        """Per row: does the completion score 1.0 on ``accuracy_reward`` (the exact verifier)?"""
        from rewards import get_reward

        if len(rows) != len(completions):
            raise ValueError(f"task {self.name!r}: {len(rows)} rows but {len(completions)} completions")
        if not rows:
            return []
        if self.exact is not None:
            return [bool(self.exact(r, c)) for r, c in zip(rows, completions)]
        fn = get_reward(self.accuracy_reward)
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "response")}
        scores = fn([_prompt_text(r["prompt"]) for r in rows], list(completions), **columns)
        return [s is not None and s >= 1.0 - 1e-6 for s in scores]

    def accuracy(self, rows: Sequence[dict], completions: Sequence[str]) -> float:
        ok = self.correct(rows, completions)
        return sum(ok) / max(len(ok), 1)


TaskBuilder = Callable[[object], dict[str, list[dict]]]
TASKS: dict[str, TaskBuilder] = {}


def _sudoku_exact(row: dict, completion: str) -> bool:
    from rewards.sudoku import sudoku_solved

    return sudoku_solved(completion, row["puzzle"], row["solution"])


# Exact checks stricter than "reward == 1" (Sudoku: the givens must be kept, too), used when
# the task's accuracy_reward is its default one.
EXACT: dict[str, Callable[[dict, str], bool]] = {"sudoku4": _sudoku_exact}
DEFAULT_ACCURACY = {"sudoku4": "sudoku"}


def register_task(name: str):
    """Decorator: ``@register_task("mytask") def build(cfg) -> {"sft": [...], "rl": [...], ...}``."""
    def deco(fn: TaskBuilder) -> TaskBuilder:
        TASKS[name] = fn
        return fn
    return deco


def build_task(cfg) -> Task:
    """The task named ``cfg.name`` with its splits built (deterministic in ``cfg.split_seed``)."""
    if cfg.name not in TASKS:
        raise KeyError(f"task.name={cfg.name!r} is not a registered task; known: {', '.join(sorted(TASKS))}")
    splits = TASKS[cfg.name](cfg)
    exact = EXACT.get(cfg.name) if cfg.accuracy_reward == DEFAULT_ACCURACY.get(cfg.name) else None
    for split in SPLITS:
        splits.setdefault(split, [])
    # RL learns from rewards only: its rows never carry the reference response.
    splits["rl"] = [{k: v for k, v in r.items() if k != "response"} for r in splits["rl"]]
    return Task(cfg.name, splits, dict(cfg.rewards), cfg.accuracy_reward, exact)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def _take(rows: list[dict], n: int) -> list[dict]:
    """First ``n`` rows (``n <= 0``: all of them)."""
    return rows if n <= 0 else rows[:n]


# ---- procedural tasks ----------------------------------------------------------------------------

def _disjoint_procedural(make: Callable[[int, int], list[dict]], key: Callable[[dict], str], cfg,
                         sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Generate until every split is filled with instances no other split contains (by ``key``).

    Splits are filled in the order test, val, sft, rl, so a bigger ``num_rl`` never changes the
    test set."""
    need = sum(sizes.values())
    seen: set[str] = set()
    pool: list[dict] = []
    batch, attempt = max(need * 2, 256), 0
    while len(pool) < need:
        fresh = make(batch, cfg.split_seed + 7919 * attempt)
        for row in fresh:
            k = key(row)
            if k not in seen:
                seen.add(k)
                pool.append(row)
        attempt += 1
        if attempt > 50:
            raise ValueError(f"task {cfg.name}: only {len(pool)} distinct instances exist, {need} requested "
                             f"({', '.join(f'num_{s}={n}' for s, n in sizes.items())})")
    out, start = {}, 0
    for split in ("test", "val", "sft", "rl"):
        out[split] = pool[start:start + sizes[split]]
        start += sizes[split]
    return out


def sudoku_prompt(puzzle: str, style: str) -> str:
    """Minimal: the 16 cells row by row ('0' = empty), nothing else (the tiny model's format)."""
    if style == "minimal":
        return puzzle
    rows = "\n".join(puzzle[i:i + 4] for i in range(0, 16, 4))
    return (f"Solve this 4x4 Sudoku. Each row, column and 2x2 box must contain the digits 1-4 once; "
            f"0 marks an empty cell.\n{rows}\nGive the completed grid as 16 digits, row by row.\n"
            f"{REASONING_FORMAT}")


@register_task("sudoku4")
def sudoku4(cfg) -> dict[str, list[dict]]:
    from rewards.sudoku import make_sudoku_dataset

    sizes = {"test": cfg.num_test, "val": cfg.num_val, "sft": cfg.num_sft, "rl": cfg.num_rl}
    splits = _disjoint_procedural(make_sudoku_dataset, lambda r: r["puzzle"], cfg, sizes)
    for split, rows in splits.items():
        splits[split] = [{**r, "prompt": sudoku_prompt(r["puzzle"], cfg.prompt_style), "response": r["solution"]}
                         for r in rows]
    return splits


def countdown_prompt(row: dict, style: str) -> str:
    nums = ",".join(str(n) for n in row["nums"])
    if style == "minimal":
        return f"{nums}->{row['target']}"
    return (f"Using the numbers [{nums}], create an equation that equals {row['target']}. You can use "
            f"basic arithmetic operations (+, -, *, /) and each number can only be used once.\n{REASONING_FORMAT}")


@register_task("countdown")
def countdown(cfg) -> dict[str, list[dict]]:
    from rewards.countdown import make_countdown_dataset

    sizes = {"test": cfg.num_test, "val": cfg.num_val, "sft": cfg.num_sft, "rl": cfg.num_rl}
    splits = _disjoint_procedural(make_countdown_dataset, lambda r: f"{sorted(r['nums'])}={r['target']}", cfg, sizes)
    for split, rows in splits.items():
        # the generator's construction is a reference equation: the SFT target (answer tags: the verifier's format)
        splits[split] = [{**r, "prompt": countdown_prompt(r, cfg.prompt_style),
                          "response": f"<answer>{r['solution']}</answer>"} for r in rows]
    return splits


# ---- file / hub data -----------------------------------------------------------------------------

def resolve_path(path: str) -> Path | None:
    """A local path (as given, or relative to the repository root), or None for a hub name."""
    for cand in (Path(path).expanduser(), ROOT / path):
        if cand.exists():
            return cand
    return None


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json / .parquet / .csv file; one clear error naming the file."""
    suffix = "".join(path.suffixes[-1:]).lower()
    try:
        if suffix == ".jsonl":
            with path.open() as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, list) else data.get("data", data.get("rows", []))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with path.open(newline="") as f:
                return list(csv.DictReader(f))
    except (json.JSONDecodeError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read rows ({e})") from e
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")


def _find_split_file(folder: Path, split: str) -> Path | None:
    for ext in (".jsonl", ".json", ".parquet", ".csv"):
        hits = sorted(folder.glob(f"{split}*{ext}")) or sorted(folder.glob(f"*{split}*{ext}"))
        if hits:
            return hits[0]
    return None


def load_split(path: str, split: str, hub_config: str | None = None) -> list[dict]:
    """Rows of ``split`` from a local file/folder or, if ``path`` is not local, the HF hub
    (``datasets.load_dataset(path, hub_config, split=split)``). Returns [] if the split is absent
    locally; a local single file is every split."""
    local = resolve_path(path)
    if local is None:
        import datasets  # hub code path: needs network or a populated HF cache

        try:
            return list(datasets.load_dataset(path, hub_config, split=split))
        except ValueError:  # "Unknown split"
            return []
    if local.is_file():
        return read_rows(local)
    found = _find_split_file(local, split)
    if found is None and split == "test":
        found = next((f for f in sorted(local.iterdir()) if f.suffix in (".jsonl", ".json", ".parquet", ".csv")), None)
    return read_rows(found) if found is not None else []


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _train_val_test(cfg, train: list[dict], test: list[dict]) -> dict[str, list[dict]]:
    """val = the first ``num_val`` of the shuffled training rows (kept out of SFT and RL); when
    there is no training split, train/val come from the test rows (smoke use only)."""
    if not train:
        train = test
    train = _shuffled(train, cfg.split_seed)
    val, rest = train[:cfg.num_val], train[cfg.num_val:] or train
    return {"sft": _take(rest, cfg.num_sft), "rl": _take(rest, cfg.num_rl), "val": val,
            "test": _take(test, cfg.num_test)}


def gsm8k_answer(solution: str) -> str:
    """GSM8K's final answer: the text after ``####`` (commas dropped)."""
    return solution.split("####")[-1].strip().replace(",", "")


@register_task("gsm8k")
def gsm8k(cfg) -> dict[str, list[dict]]:
    path = cfg.path or "openai/gsm8k"
    conf = cfg.hub_config or ("main" if resolve_path(path) is None else None)

    def convert(r: dict) -> dict:
        answer = gsm8k_answer(r["answer"])
        reasoning = r["answer"].split("####")[0].strip()
        prompt = r["question"] if cfg.prompt_style == "minimal" else f"{r['question']}\n{REASONING_FORMAT}"
        return {"prompt": prompt, "answer": answer,
                "response": f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"}

    return _train_val_test(cfg, [convert(r) for r in load_split(path, "train", conf)],
                           [convert(r) for r in load_split(path, "test", conf)])


@register_task("math500")
def math500(cfg) -> dict[str, list[dict]]:
    path = cfg.path or "HuggingFaceH4/MATH-500"

    def convert(r: dict) -> dict:
        prompt = r["problem"] if cfg.prompt_style == "minimal" else f"{r['problem']}\n{REASONING_FORMAT}"
        return {"prompt": prompt, "answer": str(r["answer"]), "solution": r.get("solution", ""),
                "response": f"<reasoning>\n{r.get('solution', '')}\n</reasoning>\n<answer>\n"
                            f"\\boxed{{{r['answer']}}}\n</answer>"}

    return _train_val_test(cfg, [], [convert(r) for r in load_split(path, "test", cfg.hub_config)])


@register_task("humaneval")
def humaneval(cfg) -> dict[str, list[dict]]:
    path = cfg.path or "openai/openai_humaneval"

    def convert(r: dict) -> dict:
        instr = "Complete the following Python function. Answer with the full function in a ```python block.\n"
        return {"prompt": r["prompt"] if cfg.prompt_style == "minimal" else instr + r["prompt"],
                "test": r["test"], "entry_point": r["entry_point"], "task_id": r["task_id"],
                "code_prompt": r["prompt"],
                "response": f"```python\n{r['prompt']}{r['canonical_solution']}```"}

    return _train_val_test(cfg, [], [convert(r) for r in load_split(path, "test", cfg.hub_config)])


@register_task("local")
def local(cfg) -> dict[str, list[dict]]:
    """Your file(s): ``cfg.columns`` maps task names (prompt, response, answer, ...) to file columns.

    A folder with ``train*`` / ``test*`` files gives those splits; a single file is shuffled with
    ``split_seed`` and ``num_test`` rows (10% if 0) are held out as the test split."""
    if not cfg.path:
        raise ValueError("task=local needs task.path=<file or folder>")
    mapping = dict(cfg.columns) or {"prompt": "prompt"}
    mapping.setdefault("prompt", "prompt")

    def convert(rows: list[dict], where: str) -> list[dict]:
        out = []
        for i, r in enumerate(rows):
            missing = [src for src in mapping.values() if src not in r]
            if missing:
                raise KeyError(f"{where}: row {i} has no column {missing[0]!r} (task.columns={mapping}; "
                               f"columns in the file: {sorted(r)})")
            renamed = {dst: r[src] for dst, src in mapping.items()}
            sources = set(mapping.values())
            renamed.update({k: v for k, v in r.items() if k not in sources and k not in renamed})
            if cfg.prompt_style == "instruct" and isinstance(renamed["prompt"], str):
                renamed["prompt"] = f"{renamed['prompt']}\n{REASONING_FORMAT}"
            out.append(renamed)
        return out

    local_path = resolve_path(cfg.path)
    if local_path is not None and local_path.is_file():
        rows = _shuffled(convert(read_rows(local_path), str(local_path)), cfg.split_seed)
        n_test = cfg.num_test or max(1, len(rows) // 10)
        test, train = rows[:n_test], rows[n_test:]
    else:
        train = convert(load_split(cfg.path, "train", cfg.hub_config), f"{cfg.path} (train)")
        test = convert(load_split(cfg.path, "test", cfg.hub_config), f"{cfg.path} (test)")
    splits = _train_val_test(cfg, train, test)
    if splits["sft"] and "response" not in splits["sft"][0]:
        splits["sft"] = []
    return splits
