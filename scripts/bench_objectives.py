"""Objective leaderboard: every registered objective from the same SFT checkpoints, with the same
rollouts per step and the same number of gradient steps; held-out test accuracy (mean and
standard error over seeds, and each objective's paired difference from diffu_grpo).

    .venv/bin/python scripts/bench_objectives.py                        # sudoku4 + countdown_procedural, seeds 0 1 2
    .venv/bin/python scripts/bench_objectives.py --tasks sudoku4 --seeds 0 --rl-steps 50 --jobs 2
    .venv/bin/python scripts/bench_objectives.py --table-only           # re-print from existing runs

Per (task, seed): one SFT run (``recipe=sft``, the task's default SFT), then per objective one
``recipe=grpo model.path=<that SFT run>/sft/best rl.objective=<name>`` with everything else at the
default recipe's RL settings (16 prompts x G=8 per step, mu=2, ``--rl-steps`` steps, validation
every 25 steps keeping the best checkpoint, test accuracy of that checkpoint; ``summary.json``).
Each objective uses its own likelihood estimator and aggregation (the authors'); objective options
can be added with ``--set <objective> key=value ...``. Runs go to ``--runs/<task>/seed<k>/<name>``;
finished runs are reused. Writes ``<runs>/leaderboard.md`` and ``<runs>/curves.png`` (validation
accuracy against RL step, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["logger.wandb.mode=disabled", "recipe.plot=false"]


def objectives() -> list[str]:
    from rl.objectives import OBJECTIVES

    names = OBJECTIVES.names()
    return ["diffu_grpo"] + [n for n in names if n != "diffu_grpo"]


def run(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "recipes", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; log {log}")
    return time.perf_counter() - t0


def sft_dir(runs: Path, task: str, seed: int) -> Path:
    return runs / task / f"seed{seed}" / "sft"


def ensure_sft(runs: Path, task: str, seed: int, extra: list[str]) -> None:
    out = sft_dir(runs, task, seed)
    if not (out / "summary.json").exists():
        print(f"+ sft {task} seed {seed}", flush=True)
        run(["recipe=sft", f"task={task}", f"seed={seed}", f"run_dir={out}", *COMMON, *extra], out.with_suffix(".log"))


def ensure_rl(runs: Path, task: str, seed: int, name: str, steps: int, options: list[str], extra: list[str]) -> None:
    out = runs / task / f"seed{seed}" / name
    if (out / "summary.json").exists():
        return
    print(f"+ {name} {task} seed {seed}", flush=True)
    wall = run(["recipe=grpo", f"task={task}", f"seed={seed}", f"run_dir={out}",
                f"model.path={sft_dir(runs, task, seed) / 'sft' / 'best'}", f"rl.objective={name}",
                f"rl.max_steps={steps}", *[f"rl.objective_options.{o}" for o in options], *COMMON, *extra],
               out.with_suffix(".log"))
    (out / "wall_time.json").write_text(json.dumps({"wall_time_s": wall}))


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def curve(run_dir: Path) -> dict[int, float]:
    """Validation accuracy by RL step from the run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "rl" and "eval/val_accuracy" in rec:
            out[int(rec["step"])] = float(rec["eval/val_accuracy"])
    return out


def table(runs: Path, tasks: list[str], seeds: list[int], names: list[str]) -> str:
    lines = ["| objective | " + " | ".join(f"{t}: test acc (mean +- SE) | vs diffu_grpo (paired)" for t in tasks)
             + " | RL wall per run |",
             "|---|" + "---|---|" * len(tasks) + "---|"]
    def acc(path: Path, stage: str) -> float | None:
        return json.loads(path.read_text())[stage]["eval/accuracy"] if path.exists() else None

    base = {t: {s: a for s in seeds if (a := acc(runs / t / f"seed{s}" / "diffu_grpo" / "summary.json", "rl"))
                is not None} for t in tasks if "diffu_grpo" in names}
    sft = {t: [a for s in seeds if (a := acc(sft_dir(runs, t, s) / "summary.json", "sft")) is not None] for t in tasks}
    sft_cells = [c for t in tasks for c in (f"{100 * mean_se(sft[t])[0]:.1f} +- {100 * mean_se(sft[t])[1]:.1f}", "-")]
    lines.insert(2, "| SFT checkpoint | " + " | ".join(sft_cells) + " | - |")
    for name in names:
        cells, walls = [], []
        for t in tasks:
            accs = {}
            for s in seeds:
                d = runs / t / f"seed{s}" / name
                if (d / "summary.json").exists():
                    accs[s] = json.loads((d / "summary.json").read_text())["rl"]["eval/accuracy"]
                    if (d / "wall_time.json").exists():
                        walls.append(json.loads((d / "wall_time.json").read_text())["wall_time_s"])
            if not accs:
                cells += ["-", "-"]
                continue
            m, se = mean_se([100 * a for a in accs.values()])
            cells.append(f"{m:.1f} +- {se:.1f} (n={len(accs)})")
            paired = [s for s in accs if s in base.get(t, {})]
            if name == "diffu_grpo" or not paired:
                cells.append("-")
            else:
                dm, dse = mean_se([100 * (accs[s] - base[t][s]) for s in paired])
                cells.append(f"{dm:+.1f} +- {dse:.1f}")
        wall = f"{sum(walls) / len(walls):.0f} s" if walls else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def plot(runs: Path, tasks: list[str], seeds: list[int], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for name in names:
            curves = [curve(runs / t / f"seed{s}" / name) for s in seeds
                      if (runs / t / f"seed{s}" / name / "metrics.jsonl").exists()]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, [100 * sum(c[k] for c in curves) / len(curves) for k in steps], marker="o", label=name)
        ax.set_title(f"{t}: validation accuracy (mean of {len(seeds)} seeds)")
        ax.set_xlabel("RL step")
        ax.set_ylabel("exact accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sudoku4", "countdown_procedural"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--objectives", nargs="+", default=None, help="default: every registered objective")
    ap.add_argument("--rl-steps", type=int, default=300)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "objectives")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each single-threaded)")
    ap.add_argument("--set", nargs="+", action="append", default=[], metavar="OBJECTIVE KEY=VALUE",
                    help="objective options, e.g. --set spg logp_estimation=mix")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = ap.parse_args()
    names = args.objectives or objectives()
    options = {}
    for name, *kv in args.set:
        options.setdefault(name, []).extend(kv)
    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda ts: ensure_sft(args.runs, *ts, args.overrides),
                          [(t, s) for t in args.tasks for s in args.seeds]))
            jobs = [(t, s, n) for s in args.seeds for t in args.tasks for n in names]
            list(pool.map(lambda j: ensure_rl(args.runs, *j, args.rl_steps, options.get(j[2], []), args.overrides),
                          jobs))
    text = table(args.runs, args.tasks, args.seeds, names)
    print(text)
    (args.runs / "leaderboard.md").write_text(text + "\n")
    plot(args.runs, args.tasks, args.seeds, names, args.runs / "curves.png")
    print(f"\nwrote {args.runs / 'leaderboard.md'} and {args.runs / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
