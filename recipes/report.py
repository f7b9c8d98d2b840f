"""Run-level outputs: one ``metrics.jsonl`` over all stages, ``reward_curve.png`` and the
closing message that says where everything is."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge_metrics(run_dir: Path, stages: list[str]) -> Path:
    """``run_dir/metrics.jsonl``: every stage's rows in order, tagged with ``stage`` and a
    ``global_step`` that continues across stages (SFT steps, then RL steps)."""
    out, offset = [], 0
    for stage in stages:
        rows = read_jsonl(run_dir / stage / "metrics.jsonl")
        for row in rows:
            out.append({"stage": stage, "global_step": offset + row.get("step", 0), **row})
        offset += max((r.get("step", 0) for r in rows), default=0)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["global_step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run_dir: Path) -> Path | None:
    """``reward_curve.png``: RL reward per step (top) and validation accuracy of every stage with
    the test accuracy of each selected checkpoint (bottom), against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        return None
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    fig, (ax_r, ax_a) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    colors = {"sft": "tab:blue", "rl": "tab:orange", "distill": "tab:green"}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        srows = [r for r in rows if r["stage"] == stage]
        x, y = _series(srows, "reward")
        if x:
            ax_r.plot(x, y, lw=0.8, color=colors.get(stage), alpha=0.5, label=f"{stage} reward (per step)")
            k = max(1, len(y) // 20)
            smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
            ax_r.plot(x, smooth, lw=2, color=colors.get(stage), label=f"{stage} reward (moving mean {k})")
        x, y = _series(srows, "eval/val_accuracy")
        if x:
            ax_a.plot(x, [100 * v for v in y], "o-", color=colors.get(stage), label=f"{stage}: validation accuracy")
        test = summary.get(stage, {}).get("eval/accuracy")
        if test is not None and srows:
            lo, hi = min(r["global_step"] for r in srows), max(r["global_step"] for r in srows)
            ax_a.hlines(100 * test, lo, hi, ls="--", color=colors.get(stage),
                        label=f"{stage}: test accuracy of selected checkpoint ({100 * test:.1f}%)")
    ax_r.set_ylabel("reward")
    if ax_r.get_legend_handles_labels()[0]:
        ax_r.legend(loc="lower right", fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_a.set_ylabel("exact-solve accuracy (%)")
    ax_a.set_ylim(0, 100)
    stages = [s.upper() if s in ("sft", "rl") else s for s in dict.fromkeys(r["stage"] for r in rows)]
    ax_a.set_xlabel(f"step ({', then '.join(stages)} steps)")
    if ax_a.get_legend_handles_labels()[0]:
        ax_a.legend(loc="lower right", fontsize=8)
    ax_a.grid(alpha=0.3)
    title = f"{summary.get('recipe', '')} on {summary.get('task', '')} ({summary.get('model', '')}, seed {summary.get('seed', '')})"
    fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / "reward_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def json_safe(obj):
    """NaN / inf -> None, recursively (summary.json stays strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def print_outputs(run_dir: Path, summary: dict) -> None:
    """The closing lines: accuracies and where each output is."""
    lines = ["", f"[dllm-rl] done in {summary.get('wall_time_s', 0):.0f}s. Outputs in {run_dir}/:"]
    stages = [k for k, v in summary.items() if isinstance(v, dict) and "eval/accuracy" in v]  # in run order
    for stage in stages:
        s = summary[stage]
        lines.append(f"  {stage:>3}: test eval/accuracy {100 * s['eval/accuracy']:.1f}% "
                     f"(mean reward {s.get('eval/reward', float('nan')):.3f}) checkpoint {s['checkpoint']}")
        if "eval/accuracy_low_confidence_order" in s:
            lines.append(f"       low-confidence order at the same steps: "
                         f"{100 * s['eval/accuracy_low_confidence_order']:.1f}%")
    if "lift" in summary:
        lines.append(f"  lift ({stages[-1]} - sft): {100 * summary['lift']:+.1f} points")
    for name, what in (("summary.json", "accuracies"), ("metrics.jsonl", "all metrics, every stage"),
                       ("reward_curve.png", "reward and accuracy curves"), ("final", "final HF checkpoint")):
        if (run_dir / name).exists():
            lines.append(f"  {name:<17} {what}")
    wandb_dirs = sorted(str(p) for p in run_dir.glob("*/wandb"))
    if wandb_dirs:
        lines.append(f"  W&B offline runs: {', '.join(wandb_dirs)} (upload: wandb sync <dir>/offline-run-*)")
    print("\n".join(lines), flush=True)
