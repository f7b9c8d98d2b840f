"""Run the default recipe (``dllm-rl``) for several seeds, one after another, and print a markdown
table of held-out accuracy before (SFT) and after (RL) and wall time per run.

    .venv/bin/python scripts/default_seeds.py --seeds 0 1 2 [-- extra overrides]
    .venv/bin/python scripts/default_seeds.py --seeds 0 1 2 --table-only   # re-print from existing runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        wall = None
        if not args.table_only:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "recipes", f"seed={seed}", f"run_dir={run_dir}", *args.overrides]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            wall = time.perf_counter() - t0
            (run_dir / "wall_time.json").write_text(json.dumps({"wall_time_s": wall}))
        elif (run_dir / "wall_time.json").exists():
            wall = json.loads((run_dir / "wall_time.json").read_text())["wall_time_s"]
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append((seed, s["sft"]["eval/accuracy"], s["rl"]["eval/accuracy"], s["sft"]["eval/reward"],
                     s["rl"]["eval/reward"], s["sft"]["train_wall_time_s"], s["rl"]["train_wall_time_s"], wall))
    print("\n| seed | SFT test acc | RL test acc | lift | SFT / RL cell acc | SFT time | RL time | total wall |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, a0, a1, c0, c1, t_sft, t_rl, wall in rows:
        total = f"{wall / 60:.1f} min" if wall else "n/a"
        print(f"| {seed} | {100 * a0:.1f}% | {100 * a1:.1f}% | {100 * (a1 - a0):+.1f} | {100 * c0:.1f}% / {100 * c1:.1f}% "
              f"| {t_sft:.0f} s | {t_rl:.0f} s | {total} |")
    lifts = [100 * (r[2] - r[1]) for r in rows]
    print(f"\nmean lift {sum(lifts) / len(lifts):+.1f} points, min {min(lifts):+.1f} (n={len(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
