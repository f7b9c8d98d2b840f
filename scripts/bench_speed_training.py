"""Speed-aware training: does the policy decode in parallel at no accuracy cost?

Per seed: one ``recipe=sft_grpo_distill`` run (the default recipe: SFT, diffu-GRPO, then
self-distillation for parallel decoding; ``-- rl.max_steps=300 rl.num_iterations=2 rl.eval_steps=25
sft.eval_steps=50`` gives ``recipe=sft_then_grpo``'s two stages, whose ``rl/best`` is that recipe's
final checkpoint), then the eval recipe on the RL and the distilled checkpoints with two rollout
modes: ``reference`` (the run's rollout, one token per step) and ``fast`` (``rollout=fast``'s
steps: several tokens per forward pass). Prints per-seed rows and the mean over seeds with
standard errors of the paired differences (fast - reference, distilled - RL).

    .venv/bin/python scripts/bench_speed_training.py --seeds 0 1 2 --runs runs/speed
    .venv/bin/python scripts/bench_speed_training.py --seeds 0 1 2 --runs runs/speed --table-only
    # another distill setting from the same RL checkpoints (recipe=distill model.path=<rl/best>):
    .venv/bin/python scripts/bench_speed_training.py --rl-from runs/speed --runs runs/speed_d600 -- distill.max_steps=600

With ``--rl-from DIR`` the SFT and RL stages are not rerun: each seed's distill stage starts from
``DIR/seed<k>``'s RL checkpoint (``recipe=distill``: the same stage, seed and data as in the
three-stage run, so the result equals ``recipe=sft_grpo_distill`` with those overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logger.wandb.mode=disabled"]
STAGES = {"rl": "RL", "distill": "RL + self-distillation"}


def fast_steps() -> int:
    """``steps`` of configs/rollout/fast.yaml (the fast mode, read from the config, not restated here)."""
    sys.path.insert(0, str(ROOT))
    from recipes.config import load_config

    return load_config(["rollout=fast"]).rollout.steps


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "recipes", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    return time.perf_counter() - t0


def stage_summaries(run_dir: Path, rl_from: Path | None) -> dict:
    """{"sft", "rl", "distill"} stage results of a seed (SFT and RL from ``rl_from`` when given)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if rl_from is None:
        return summary
    src = json.loads((rl_from / run_dir.name / "summary.json").read_text())
    return {"sft": src["sft"], "rl": src["rl"], "distill": summary["distill"]}


def ensure(run_dir: Path, seed: int, overrides: list[str], rl_from: Path | None = None) -> None:
    if not (run_dir / "summary.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        if rl_from is None:
            cmd = ["recipe=sft_grpo_distill"]
        else:
            rl = json.loads((rl_from / run_dir.name / "summary.json").read_text())["rl"]["checkpoint"]
            cmd = ["recipe=distill", f"model.path={rl}"]
        print(f"+ {' '.join(cmd)} seed={seed}", flush=True)
        wall = run([*cmd, f"seed={seed}", f"run_dir={run_dir}", *COMMON, *overrides], run_dir.with_suffix(".log"))
        (run_dir / "wall_time.json").write_text(json.dumps({"wall_time_s": wall}))
    summary = stage_summaries(run_dir, rl_from)
    steps = fast_steps()
    for stage in STAGES:
        out = run_dir / f"eval_{stage}"
        if not (out / "results.json").exists():
            print(f"+ recipe=eval {stage} seed={seed}", flush=True)
            run(["recipe=eval", f"seed={seed}", f"run_dir={out}", f"eval.checkpoint={summary[stage]['checkpoint']}",
                 f"eval.modes={{reference: {{}}, fast: {{steps: {steps}}}}}", *COMMON, *overrides],
                out.with_suffix(".log"))


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def table(runs: Path, seeds: list[int], rl_from: Path | None = None) -> str:
    res = {}
    for s in seeds:
        for stage in STAGES:
            rows = json.loads((runs / f"seed{s}" / f"eval_{stage}" / "results.json").read_text())
            rows = rows["results"] if isinstance(rows, dict) else rows
            res[s, stage] = {r["mode"]: (100 * r["accuracy"], r["forward_passes"]) for r in rows}
    lines = ["| seed | checkpoint | one token per step: acc (passes) | fast: acc (passes) | fast - reference | pass ratio |",
             "|---|---|---|---|---|---|"]
    for s in seeds:
        for stage, label in STAGES.items():
            (ra, rp), (fa, fp) = res[s, stage]["reference"], res[s, stage]["fast"]
            lines.append(f"| {s} | {label} | {ra:.1f}% ({rp:.0f}) | {fa:.1f}% ({fp:.0f}) | {fa - ra:+.1f} | {rp / fp:.1f}x |")
    for stage, label in STAGES.items():
        ref = [res[s, stage]["reference"][0] for s in seeds]
        fast = [res[s, stage]["fast"][0] for s in seeds]
        (rm, rse), (fm, fse) = mean_se(ref), mean_se(fast)
        dm, dse = mean_se([f - r for f, r in zip(fast, ref)])
        lines.append(f"| mean of {len(seeds)} | {label} | {rm:.1f} +- {rse:.1f}% | {fm:.1f} +- {fse:.1f}% | "
                     f"{dm:+.1f} +- {dse:.1f} | |")
    ref_gain = mean_se([res[s, "distill"]["reference"][0] - res[s, "rl"]["reference"][0] for s in seeds])
    lines.append("")
    lines.append(f"one-token-per-step accuracy, distilled - RL (paired): {ref_gain[0]:+.1f} +- {ref_gain[1]:.1f} points")
    walls = []
    for s in seeds:
        summ = stage_summaries(runs / f"seed{s}", rl_from)
        if rl_from is not None:
            summ["wall_time_s"] = float("nan")
        walls.append(f"seed {s}: pipeline {summ['wall_time_s']:.0f} s (SFT {summ['sft']['train_wall_time_s']:.0f}, "
                     f"RL {summ['rl']['train_wall_time_s']:.0f}, distill {summ['distill']['train_wall_time_s']:.0f} "
                     f"of which data {summ['distill']['data']['seconds']:.0f}; kept {summ['distill']['data']['kept']} "
                     f"of {summ['distill']['data']['samples']})")
    return "\n".join(lines + walls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "speed")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--rl-from", type=Path, default=None, help="reuse these runs' RL checkpoints (see above)")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = ap.parse_args()
    if not args.table_only:
        for s in args.seeds:
            ensure(args.runs / f"seed{s}", s, args.overrides, args.rl_from)
    text = table(args.runs, args.seeds, args.rl_from)
    print(text)
    (args.runs / "speed.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
