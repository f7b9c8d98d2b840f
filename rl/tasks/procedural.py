"""Procedurally generated tasks (offline, fixed seed): ``sudoku4`` and ``countdown_procedural``.

Instances are generated until every split is filled with instances no other split contains,
so the splits are disjoint by construction."""

from __future__ import annotations

from collections.abc import Callable

from rl.tasks import d1
from rl.tasks.registry import D1_STYLES, DataError, format_prompt, register_task


def disjoint_procedural(make: Callable[[int, int], list[dict]], key: Callable[[dict], str], cfg,
                        sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Generate until every split is filled with instances no other split contains (by ``key``).

    Splits are filled in the order test, val, sft, rl, so a bigger ``num_rl`` never changes the
    test set."""
    need = sum(sizes.values())
    seen: set[str] = set()
    pool: list[dict] = []
    batch, attempt = max(need * 2, 256), 0
    while len(pool) < need:
        try:
            fresh = make(batch, cfg.split_seed + 7919 * attempt)
        except RuntimeError:  # the generator has fewer distinct instances than `batch`
            if batch <= need:
                raise DataError(f"task {cfg.name}: fewer than {need} distinct instances exist "
                                f"({', '.join(f'num_{s}={n}' for s, n in sizes.items())})") from None
            batch = need  # asking for twice the need is what failed; the splits of sizes that fit are unchanged
            continue
        for row in fresh:
            k = key(row)
            if k not in seen:
                seen.add(k)
                pool.append(row)
        attempt += 1
        if attempt > 50:
            raise DataError(f"task {cfg.name}: only {len(pool)} distinct instances exist, {need} requested "
                            f"({', '.join(f'num_{s}={n}' for s, n in sizes.items())})")
    out, start = {}, 0
    for split in ("test", "val", "sft", "rl"):
        out[split] = pool[start:start + sizes[split]]
        start += sizes[split]
    return out


def _sizes(cfg) -> dict[str, int]:
    return {"test": cfg.num_test, "val": cfg.num_val, "sft": cfg.num_sft, "rl": cfg.num_rl}


def sudoku_prompt(puzzle: str, style: str):
    """Minimal: the 16 cells row by row ('0' = empty), nothing else (the tiny model's format);
    d1 / d1_eval: d1's prompts (chat messages)."""
    if style == "minimal":
        return puzzle
    if style in D1_STYLES:
        return d1.sudoku_prompt(puzzle, style)
    rows = "\n".join(puzzle[i:i + 4] for i in range(0, 16, 4))
    return format_prompt(f"Solve this 4x4 Sudoku. Each row, column and 2x2 box must contain the digits 1-4 "
                         f"once; 0 marks an empty cell.\n{rows}\nGive the completed grid as 16 digits, row by row.",
                         style)


def sudoku_exact(prompts, completions, **columns) -> list[float | None]:
    """1.0 where the completion solves the puzzle, givens included (stricter than reward == 1);
    the columns are checked as the sudoku reward checks them."""
    from rewards.sudoku import sudoku_reward, sudoku_solved

    partial = sudoku_reward(prompts, completions, **columns)
    return [None if r is None else float(sudoku_solved(c, p, s))
            for r, c, p, s in zip(partial, completions, columns["puzzle"], columns["solution"])]


def sudoku_file_rows(cfg) -> dict[str, list[dict]]:
    """``task.path``: puzzles from a file or folder (columns ``puzzle``/``solution``, or d1's CSV
    columns ``Puzzle``/``Solution``), split like the other file tasks (rl/tasks/real.py)."""
    from rl.tasks.loading import load_split
    from rl.tasks.real import train_val_test

    def convert(r: dict, where: str, i: int) -> dict:
        puzzle, solution = r.get("puzzle", r.get("Puzzle")), r.get("solution", r.get("Solution"))
        ok = all(isinstance(g, (str, int)) and len(str(g).zfill(16)) == 16 for g in (puzzle, solution))
        if not ok:
            raise DataError(f"{where}: row {i} needs 16-digit 'puzzle' and 'solution' (or d1's 'Puzzle', 'Solution'), "
                            f"got {puzzle!r}, {solution!r}")
        # a CSV reader may have made numbers of them: a leading empty cell ('0') is lost then
        puzzle, solution = str(puzzle).zfill(16), str(solution).zfill(16)
        return {"puzzle": puzzle, "solution": solution, "prompt": puzzle, "response": solution}

    rows = {}
    for split in ("train", "test"):
        raw = load_split(cfg.path, split, task=cfg.name, folder="sudoku4", hub={}, hub_config=cfg.hub_config)
        if raw is not None:
            rows[split] = [convert(r, f"{cfg.path} ({split})", i) for i, r in enumerate(raw)]
    return train_val_test(cfg, rows.get("train"), rows.get("test"), str(cfg.path))


@register_task("sudoku4", rewards={"sudoku": 1.0}, accuracy_reward="sudoku", exact=sudoku_exact)
def sudoku4(cfg) -> dict[str, list[dict]]:
    """Generated puzzles (offline; ``task.path`` = null), or puzzles from ``task.path`` (e.g. d1's
    4x4 Sudoku CSV files)."""
    from rewards.sudoku import make_sudoku_dataset

    if cfg.path:
        splits = sudoku_file_rows(cfg)
    else:
        splits = disjoint_procedural(make_sudoku_dataset, lambda r: r["puzzle"], cfg, _sizes(cfg))
    for split, rows in splits.items():
        splits[split] = [{**r, "prompt": sudoku_prompt(r["puzzle"], cfg.prompt_style), "response": r["solution"]}
                         for r in rows]
    return splits


def countdown_prompt(row: dict, style: str):
    """Minimal: ``"3,5,7->22"``; instruct: an instruction plus d1's answer format; d1 / d1_eval:
    d1's prompts (chat messages)."""
    nums = ",".join(str(n) for n in row["nums"])
    if style == "minimal":
        return f"{nums}->{row['target']}"
    if style in D1_STYLES:
        return d1.countdown_prompt(row["nums"], row["target"], style)
    return format_prompt(f"Using the numbers [{nums}], create an equation that equals {row['target']}. You can "
                         f"use basic arithmetic operations (+, -, *, /) and each number can only be used once.", style)


@register_task("countdown_procedural", rewards={"countdown": 1.0}, accuracy_reward="countdown")
def countdown_procedural(cfg) -> dict[str, list[dict]]:
    """Generated Countdown with 3 numbers; each instance's construction is its SFT target."""
    from rewards.countdown import make_countdown_dataset

    splits = disjoint_procedural(make_countdown_dataset, lambda r: f"{sorted(r['nums'])}={r['target']}", cfg,
                                 _sizes(cfg))
    for split, rows in splits.items():
        # answer tags: the verifier's format
        splits[split] = [{**r, "prompt": countdown_prompt(r, cfg.prompt_style),
                          "response": f"<answer>{r['solution']}</answer>"} for r in rows]
    return splits
