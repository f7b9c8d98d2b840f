"""Reward throughput (samples/s) for gsm8k, math and code, each against a baseline in the same run.

  gsm8k  : ours (regex + exact fractions)         vs math-verify parse+verify in-process
  math   : ours (2 killable worker processes)     vs math-verify in-process, one sample at a time
  code   : ours (sandbox, pool of `workers` runs) vs bare `python -c` subprocess per sample, no sandbox
           (HumanEval canonical solutions; a test job runs two sandboxes: candidate and tests)
  channel: what crossing the candidate/tests channel costs inside one run (not in the default
           sections): call round trips, large and deep arguments and results, a lazily pulled
           generator, a LeetCode linked list; times measured in the tests' sandbox
  corpus : the code-fidelity corpus (tests/fixtures/code_fidelity) batched through CodeReward

Usage: python scripts/bench_rewards.py [--data ../shared/data] [--n 200] [--workers 2]
                                       [--only gsm8k,math,code,channel,corpus] [--sandbox auto,bwrap,unshare,unsafe]
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
    if "channel" in only:
        for mode in args.sandbox.split(","):
            _bench_channel(mode)
    if "corpus" in only:
        for mode in args.sandbox.split(","):
            _bench_corpus(args, mode)


# Each test times one operation inside the tests' sandbox and reports the seconds as its error
# text (the only thing a test sends back besides its verdict).
_CHANNEL_SETUP = """import time
class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next
"""
_CHANNEL_CODE = """def ident(x):
    return x
def noop():
    return None
def total(xs):
    return sum(xs)
def count(n):
    return list(range(n))
def squares(n):
    for i in range(n):
        yield i * i
def reverse(head):
    prev = None
    while head:
        head.next, prev, head = prev, head, head.next
    return prev
"""
_CHANNEL_OPS = {
    "call round trip (1000 calls of a no-op)": "for _ in range(1000):\n    noop()",
    "1.2M-int list argument (sum)": "x = list(range(1_200_000))\nt0 = time.perf_counter()\nassert total(x) == 719999400000",
    "1.2M-int list result": "assert len(count(1_200_000)) == 1_200_000",
    "100k (int, int) tuples, there and back": "x = [(i, i) for i in range(100_000)]\nt0 = time.perf_counter()\nassert ident(x) == x",
    "150-deep nested list, there and back": "x = []\nfor _ in range(150):\n    x = [x]\nt0 = time.perf_counter()\nassert ident(x) == x",
    "5000-node linked list (setup class), reversed": (
        "head = None\nfor v in range(5000):\n    head = ListNode(v, head)\nt0 = time.perf_counter()\n"
        "assert reverse(head).val == 0"),
    "generator pulled to the end (200k items)": "assert sum(squares(200_000)) == 2666646666700000",
}


def _bench_channel(mode: str) -> None:
    from rewards.sandbox import Sandbox

    sb = Sandbox(mode=mode, unsafe=mode == "unsafe", timeout_s=60.0)
    tests = [f"t0 = time.perf_counter()\n{src}\nraise AssertionError(repr(time.perf_counter() - t0))"
             for src in _CHANNEL_OPS.values()]
    res = sb.run({"mode": "asserts", "code": _CHANNEL_CODE, "tests": tests, "setup": _CHANNEL_SETUP})
    print(f"channel ({sb.mode}):")
    for name, err in zip(_CHANNEL_OPS, res.errors):
        took = err.split(": ", 1)[1] if err and err.startswith("AssertionError: ") else f"failed ({err})"
        print(f"  {name:48s} {float(took) * 1000:9.1f} ms" if took[0].isdigit() else f"  {name:48s} {took}")


def _bench_corpus(args, mode: str) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "code_fidelity"))
    from cases import CASES

    from rewards.code import COLUMNS

    code = CodeReward(mode=mode, unsafe=mode == "unsafe", cgroups=not args.no_cgroups, pool_size=args.workers,
                      timeout_s=20.0)
    cols = {k: [c.get(k) for c in CASES] for k in COLUMNS if any(c.get(k) is not None for c in CASES)}
    rate, scores = _rate(len(CASES), lambda: code([""] * len(CASES), [c["completion"] for c in CASES], **cols))
    print(f"corpus: ours {rate:10.1f} samples/s ({len(CASES)} cases, {sum(s == 1.0 for s in scores)} at 1.0, "
          f"sandbox={code.sandbox.mode}, pool={args.workers})")


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
