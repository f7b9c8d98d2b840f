"""Reward throughput (samples/s) for gsm8k, math and code, each against a baseline in the same run.

  gsm8k: ours (regex + exact fractions)         vs math-verify parse+verify in-process
  math : ours (2 killable worker processes)     vs math-verify in-process, one sample at a time
  code : ours (sandbox, pool of `workers` runs) vs bare `python -c` subprocess per sample, no sandbox
         (HumanEval canonical solutions; a test job runs two sandboxes: candidate and tests)

Usage: python scripts/bench_rewards.py [--data ../shared/data] [--n 200] [--workers 2]
                                       [--only gsm8k,math,code] [--sandbox auto,bwrap,unshare,unsafe]
                                       [--no-cgroups]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards import get_reward  # noqa: E402
from rewards.code import CodeReward  # noqa: E402
from rewards.math import score_math  # noqa: E402


def _rows(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return (rows * (n // len(rows) + 1))[:n]


def _rate(n: int, fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - t), out


def _mv_inprocess(completions, golds) -> list[float]:
    from math_verify import parse, verify

    return [float(verify(parse("\\boxed{%s}" % g, parsing_timeout=None), parse(c, parsing_timeout=None), timeout_seconds=None))
            for c, g in zip(completions, golds)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="gsm8k,math,code", help="comma-separated sections to run")
    ap.add_argument("--sandbox", default="auto",
                    help="comma-separated sandbox modes for the code section (auto, bwrap, unshare, unsafe)")
    ap.add_argument("--no-cgroups", action="store_true", help="code: the no-cgroup fallback (rlimits only)")
    args = ap.parse_args()
    data = Path(args.data)
    only = set(args.only.split(","))
    print(f"python {sys.version.split()[0]}, n={args.n}, workers={args.workers}, load {os.getloadavg()[0]:.2f}")
    if "gsm8k" in only:
        _bench_gsm8k(data, args)
    if "math" in only:
        _bench_math(data, args)
    if "code" in only:
        for mode in args.sandbox.split(","):
            _bench_code(data, args, mode)


def _bench_gsm8k(data: Path, args) -> None:
    g = _rows(data / "gsm8k" / "test.jsonl", args.n)
    comps, answers = [r["answer"] for r in g], [r["answer"] for r in g]
    fn = get_reward("gsm8k")
    ours, s1 = _rate(len(g), lambda: fn([""] * len(g), comps, answer=answers))
    golds = [a.rsplit("####", 1)[1].strip().replace(",", "") for a in answers]
    base, s2 = _rate(len(g), lambda: _mv_inprocess([c.rsplit("####", 1)[1] for c in comps], golds))
    print(f"gsm8k : ours {ours:10.1f} samples/s (mean {sum(s1) / len(s1):.3f}) | math-verify in-process {base:8.1f} "
          f"samples/s (mean {sum(s2) / len(s2):.3f}) | ratio {ours / base:.1f}x")


def _bench_math(data: Path, args) -> None:
    m = _rows(data / "math500" / "test.jsonl", args.n)
    comps, answers = [r["solution"] for r in m], [r["answer"] for r in m]
    score_math(comps[:2], answers[:2], workers=args.workers)  # start the workers (not timed)
    ours, s1 = _rate(len(m), lambda: score_math(comps, answers, workers=args.workers))
    base, s2 = _rate(len(m), lambda: _mv_inprocess(comps, answers))
    print(f"math  : ours {ours:10.1f} samples/s (mean {sum(s1) / len(s1):.3f}) | math-verify in-process {base:8.1f} "
          f"samples/s (mean {sum(s2) / len(s2):.3f}) | ratio {ours / base:.2f}x")


def _bench_code(data: Path, args, mode: str) -> None:
    h = _rows(data / "humaneval" / "HumanEval.jsonl", min(args.n, 164))
    comps = ["```python\n" + r["prompt"] + r["canonical_solution"] + "\n```" for r in h]
    code = CodeReward(mode=mode, unsafe=mode == "unsafe", cgroups=not args.no_cgroups, pool_size=args.workers,
                      timeout_s=10.0)
    sb = code.sandbox
    code([""] * 2, comps[:2], test=[r["test"] for r in h[:2]], entry_point=[r["entry_point"] for r in h[:2]])  # warm-up
    ours, s1 = _rate(len(h), lambda: code([""] * len(h), comps, test=[r["test"] for r in h],
                                          entry_point=[r["entry_point"] for r in h],
                                          code_prompt=[r["prompt"] for r in h]))

    def bare():
        ok = []
        for r in h:
            prog = r["prompt"] + r["canonical_solution"] + "\n" + r["test"] + f"\ncheck({r['entry_point']})\n"
            ok.append(float(subprocess.run([sys.executable, "-c", prog], capture_output=True, timeout=10).returncode == 0))
        return ok

    base, s2 = _rate(len(h), bare)
    cg = f"cgroup v{sb.cgroups.version}" if sb.cgroups.version else "no cgroup"
    print(f"code  : ours {ours:10.1f} samples/s (mean {sum(s1) / len(s1):.3f}, sandbox={sb.mode}, {cg}, pool={args.workers}) | "
          f"bare subprocess, sequential {base:8.1f} samples/s (mean {sum(s2) / len(s2):.3f}) | ratio {ours / base:.2f}x")


if __name__ == "__main__":
    main()
