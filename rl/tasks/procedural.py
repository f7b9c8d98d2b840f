"""Procedurally generated tasks (offline, fixed seed): ``sudoku4`` and ``countdown_procedural``.

Instances are generated until every split is filled with instances no other split contains,
so the splits are disjoint by construction."""

from __future__ import annotations

from collections.abc import Callable

from rl.tasks.registry import DataError, format_prompt, register_task


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
        fresh = make(batch, cfg.split_seed + 7919 * attempt)
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


def sudoku_prompt(puzzle: str, style: str) -> str:
    """Minimal: the 16 cells row by row ('0' = empty), nothing else (the tiny model's format)."""
    if style == "minimal":
        return puzzle
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


@register_task("sudoku4", rewards={"sudoku": 1.0}, accuracy_reward="sudoku", exact=sudoku_exact)
def sudoku4(cfg) -> dict[str, list[dict]]:
    from rewards.sudoku import make_sudoku_dataset

    splits = disjoint_procedural(make_sudoku_dataset, lambda r: r["puzzle"], cfg, _sizes(cfg))
    for split, rows in splits.items():
        splits[split] = [{**r, "prompt": sudoku_prompt(r["puzzle"], cfg.prompt_style), "response": r["solution"]}
                         for r in rows]
    return splits


def countdown_prompt(row: dict, style: str) -> str:
    """Minimal: ``"3,5,7->22"``; instruct: d1's Countdown prompt."""
    nums = ",".join(str(n) for n in row["nums"])
    if style == "minimal":
        return f"{nums}->{row['target']}"
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
