"""Run the default recipe (``dllm-rl``) for several seeds, one after another, and print a markdown
table of held-out accuracy before (SFT) and after the last stage (RL, or distill in
``recipe=sft_grpo_distill``), each stage's training time and the wall time per run.

    .venv/bin/python scripts/default_seeds.py --seeds 0 1 2 [-- extra overrides]
    .venv/bin/python scripts/default_seeds.py --seeds 0 1 2 --table-only   # re-print from existing runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes: with ``threads=1`` a run's CPU time
    is about the wall time it would take alone on the machine (wall time also counts waiting for
    the cores when other jobs share them)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu_model() -> str:
    """The CPU the runs were timed on (``model name`` in /proc/cpuinfo), for the README table."""
    with contextlib.suppress(OSError):  # no /proc (not Linux): say so in the table
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/seeds", help="parent folder of the run directories")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        run_dir = ROOT / args.runs / f"seed{seed}"
        wall = cpu = None
        if not args.table_only:
            t0, c0 = time.perf_counter(), _children_cpu()
            cmd = [sys.executable, "-m", "recipes", f"seed={seed}", f"run_dir={run_dir}", *args.overrides]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
            (run_dir / "wall_time.json").write_text(json.dumps({"wall_time_s": wall, "cpu_time_s": cpu}))
        elif (run_dir / "wall_time.json").exists():
            times = json.loads((run_dir / "wall_time.json").read_text())
            wall, cpu = times["wall_time_s"], times.get("cpu_time_s")
        s = json.loads((run_dir / "summary.json").read_text())
        last = "distill" if "distill" in s else "rl"
        rows.append((seed, s["sft"]["eval/accuracy"], s[last]["eval/accuracy"],
                     [s[k]["train_wall_time_s"] for k in ("sft", "rl", "distill") if k in s], s["wall_time_s"], wall, cpu))
    stages = "SFT / RL / distill" if len(rows[0][3]) == 3 else "SFT / RL"
    print(f"\n| seed | SFT test acc | final test acc | lift | {stages} train time | pipeline | total wall | total CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, a0, a1, times, pipeline, wall, cpu in rows:
        total = f"{wall / 60:.1f} min" if wall else "n/a"
        total_cpu = f"{cpu / 60:.1f} min" if cpu else "n/a"
        print(f"| {seed} | {100 * a0:.1f}% | {100 * a1:.1f}% | {100 * (a1 - a0):+.1f} | "
              f"{' / '.join(f'{t:.0f} s' for t in times)} | {pipeline / 60:.1f} min | {total} | {total_cpu} |")
    lifts = [100 * (r[2] - r[1]) for r in rows]
    pipes = [r[4] / 60 for r in rows]
    print(f"\nmean lift {sum(lifts) / len(lifts):+.1f} points, min {min(lifts):+.1f}; "
          f"pipeline max {max(pipes):.1f} min (n={len(rows)}); CPU: {_cpu_model()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
