"""Real data sets: ``gsm8k``, ``math500`` (trains on a MATH train split), ``humaneval``,
``countdown`` and ``local`` (your files). Rows come through :mod:`rl.tasks.loading`.

Splits are disjoint by construction: training rows are de-duplicated by prompt and any that
repeat a test prompt are dropped; validation is carved from the shuffled training rows; a data
set without a test split has its test rows held out of the training rows the same way.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from rl.tasks.loading import HubSource, describe, load_split, resolve_source
from rl.tasks import d1
from rl.tasks.registry import D1_STYLES, DataError, Splits, format_prompt, prompt_key, register_task

log = logging.getLogger(__name__)

GSM8K_HUB = {"train": HubSource("openai/gsm8k", "main", "train"), "test": HubSource("openai/gsm8k", "main", "test")}
# MATH-500 (Lightman et al. 2023) is a subset of MATH's test problems; d1 trains on the other 12,000
# MATH problems, published with it as ankner/math-500's train split.
MATH500_HUB = {"train": HubSource("ankner/math-500", None, "train"),
               "test": HubSource("HuggingFaceH4/MATH-500", None, "test")}
HUMANEVAL_HUB = {"test": HubSource("openai/openai_humaneval", None, "test")}
# d1's Countdown: the 3-number problems of Countdown-Tasks-3to4 (train split only; our test rows are held out of it).
COUNTDOWN_HUB = {"train": HubSource("Jiayi-Pan/Countdown-Tasks-3to4", None, "train")}


def text(row: dict, key: str, where: str, i: int) -> str:
    """``row[key]`` as text (numbers are converted); one DataError line otherwise."""
    if key not in row:
        raise DataError(f"{where}: row {i} has no column {key!r} (columns: {sorted(row)})")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: row {i}, column {key!r} is {type(value).__name__}, expected text")
    return str(value)


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _take(rows: list[dict], n: int) -> list[dict]:
    """First ``n`` rows (``n <= 0``: all of them)."""
    return rows if n <= 0 else rows[:n]


def train_val_test(cfg, train: list[dict] | None, test: list[dict] | None, where: str) -> dict[str, list[dict]]:
    """``sft`` / ``rl`` / ``val`` / ``test`` from the data set's train and test rows (None = absent).

    val = the first ``num_val`` of the shuffled training rows (kept out of SFT and RL); without a
    test split, ``num_test`` rows (10% if 0) of the shuffled training rows are held out as test."""
    if not train and not test:
        raise DataError(f"{where}: no rows")
    seen: set[str] = set()
    pool = []
    for r in train or []:  # de-duplicate by prompt
        k = prompt_key(r["prompt"])
        if k not in seen:
            seen.add(k)
            pool.append(r)
    pool = _shuffled(pool, cfg.split_seed)
    if test is None:
        n_test = cfg.num_test or max(1, len(pool) // 10)
        test, pool = pool[:n_test], pool[n_test:]
    else:
        test = _take(test, cfg.num_test)
    test_keys = {prompt_key(r["prompt"]) for r in test}
    kept = [r for r in pool if prompt_key(r["prompt"]) not in test_keys]
    if len(kept) < len(pool):
        log.warning("%s: dropped %d training rows whose prompt is also a test prompt", where, len(pool) - len(kept))
    val, rest = kept[:cfg.num_val], kept[cfg.num_val:]
    return {"sft": _take([r for r in rest if "response" in r], cfg.num_sft), "rl": _take(rest, cfg.num_rl),
            "val": val, "test": test}


def real_task(cfg, folder: str, hub: dict[str, HubSource], convert: Callable[[dict, str, int], dict | None]) -> Splits:
    """Load train/test (see loading.resolve_source), convert each row (None = skip), split."""
    source = resolve_source(cfg, folder)
    where = describe(source, hub)
    rows = {}
    for split in ("train", "test"):
        raw = load_split(source, split, task=cfg.name, folder=folder, hub=hub, hub_config=cfg.hub_config)
        if raw is not None:
            loc = f"{where} ({split})"
            rows[split] = [c for i, r in enumerate(raw) if (c := convert(r, loc, i)) is not None]
    return Splits(train_val_test(cfg, rows.get("train"), rows.get("test"), where), where)


def gsm8k_answer(solution: str) -> str:
    """GSM8K's final answer: the text after ``####`` (commas dropped)."""
    return solution.split("####")[-1].strip().replace(",", "")


@register_task("gsm8k", rewards={"gsm8k": 1.0}, accuracy_reward="gsm8k")
def gsm8k(cfg) -> Splits:
    def convert(r: dict, where: str, i: int) -> dict:
        question, solution = text(r, "question", where, i), text(r, "answer", where, i)
        answer, reasoning = gsm8k_answer(solution), solution.split("####")[0].strip()
        if cfg.prompt_style in D1_STYLES:  # d1's answer column: the text after ####, as is (d1_gsm8k compares strings)
            answer = solution.split("####")[1].strip() if "####" in solution else answer
            prompt = d1.gsm8k_prompt(question, cfg.prompt_style)
        else:
            prompt = format_prompt(question, cfg.prompt_style)
        return {"prompt": prompt, "answer": answer, "question": question,
                "response": f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"}

    return real_task(cfg, "gsm8k", GSM8K_HUB, convert)


@register_task("math500", rewards={"math": 1.0}, accuracy_reward="math")
def math500(cfg) -> Splits:
    from rewards.math import last_boxed

    def convert(r: dict, where: str, i: int) -> dict:
        problem, solution = text(r, "problem", where, i), text(r, "solution", where, i)
        answer = text(r, "answer", where, i) if r.get("answer") is not None else last_boxed(solution)
        if answer is None:
            raise DataError(f"{where}: row {i} has no 'answer' column and no \\boxed{{}} answer in its solution")
        gold = answer
        if cfg.prompt_style in D1_STYLES:
            prompt = d1.math_prompt(problem, cfg.prompt_style)
            if cfg.prompt_style == "d1":  # d1's training rows carry the whole solution as `answer` (d1_math reads it)
                gold = solution
        else:
            prompt = format_prompt(problem, cfg.prompt_style)
        return {"prompt": prompt, "answer": gold, "solution": solution, "question": problem,
                "response": f"<reasoning>\n{solution}\n</reasoning>\n<answer>\n\\boxed{{{answer}}}\n</answer>"}

    return real_task(cfg, "math500", MATH500_HUB, convert)


@register_task("humaneval", rewards={"code": 1.0}, accuracy_reward="code")
def humaneval(cfg) -> Splits:
    instr = "Complete the following Python function. Answer with the full function in a ```python block.\n"

    if cfg.prompt_style in D1_STYLES:
        raise DataError(f"task humaneval: prompt_style={cfg.prompt_style} is not defined (d1 has no code task)")

    def convert(r: dict, where: str, i: int) -> dict:
        code = text(r, "prompt", where, i)
        return {"prompt": code if cfg.prompt_style == "minimal" else instr + code,
                "test": text(r, "test", where, i), "entry_point": text(r, "entry_point", where, i),
                "task_id": text(r, "task_id", where, i), "code_prompt": code,
                "response": f"```python\n{code}{text(r, 'canonical_solution', where, i)}```"}

    return real_task(cfg, "humaneval", HUMANEVAL_HUB, convert)


@register_task("countdown", rewards={"countdown": 1.0}, accuracy_reward="countdown")
def countdown(cfg) -> Splits:
    from rl.tasks.procedural import countdown_prompt

    def convert(r: dict, where: str, i: int) -> dict | None:
        nums, target = r.get("nums"), r.get("target")
        if nums is None and "input" in r and "output" in r:  # d1's test file (countdown_cd3_test.jsonl): "a,b,c" -> "t"
            try:
                nums, target = [int(x) for x in str(r["input"]).split(",")], int(r["output"])
            except ValueError:
                raise DataError(f"{where}: row {i}: 'input' must be comma-separated integers and 'output' an "
                                f"integer, got {r['input']!r} and {r['output']!r}") from None
        if not isinstance(nums, list) or not all(isinstance(n, int) for n in nums) or not isinstance(target, int):
            raise DataError(f"{where}: row {i} needs 'nums' (a list of integers) and 'target' (an integer), "
                            f"got {nums!r} and {target!r}")
        if len(nums) != 3:
            return None
        return {"prompt": countdown_prompt(r, cfg.prompt_style), "nums": nums, "target": target}

    return real_task(cfg, "countdown", COUNTDOWN_HUB, convert)


@register_task("local")
def local(cfg) -> Splits:
    """Your file(s): ``cfg.columns`` maps task names (prompt, response, answer, ...) to file columns.

    A folder with ``train*`` / ``test*`` files gives those splits; a single file is shuffled with
    ``split_seed`` and ``num_test`` rows (10% if 0) are held out as the test split. Unmapped columns
    pass through to the reward functions."""
    from rewards.compose import is_conversational

    if not cfg.path:
        raise DataError("task=local needs task.path=<file, folder or hub name>")
    mapping = {"prompt": "prompt", **dict(cfg.columns)}
    sources = set(mapping.values())

    def convert(r: dict, where: str, i: int) -> dict:
        missing = [src for src in mapping.values() if src not in r]
        if missing:
            raise DataError(f"{where}: row {i} has no column {missing[0]!r} (task.columns={mapping}; "
                            f"columns in the data: {sorted(r)})")
        out = {dst: r[src] for dst, src in mapping.items()}
        out.update({k: v for k, v in r.items() if k not in sources and k not in out})
        if not is_conversational(out["prompt"]):  # chat prompts are used as they are
            out["prompt"] = format_prompt(text(out, "prompt", where, i), cfg.prompt_style)
        if "response" in out:
            out["response"] = text(out, "response", where, i)
        return out

    return real_task(cfg, "local", {}, convert)
