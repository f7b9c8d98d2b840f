"""Check every registered objective against its authors' code on identical inputs.

    # the authors' repositories, not vendored here (read, never imported by the package):
    git clone https://github.com/dllm-reasoning/d1            REFS/d1
    git clone https://github.com/facebookresearch/SPG         REFS/SPG
    git clone https://github.com/xiaohangt/wd1                REFS/wd1
    git clone https://github.com/kuleshov-group/d2            REFS/d2
    git clone https://github.com/Gen-Verse/dLLM-RL            REFS/dLLM-RL
    git clone https://github.com/ML-GSAI/ESPO                 REFS/ESPO
    .venv/bin/python scripts/check_objectives_reference.py --refs REFS
    .venv/bin/python scripts/check_objectives_reference.py --refs REFS --only spg wd1 --write-fixtures

Each objective's check lives in ``scripts/objective_refs/<name>.py`` (``check(repo)`` returns rows
``(what was compared, max abs difference, ok)``; ``record(repo, path)`` writes the fixture that
``tests/test_objective_<name>.py`` compares against without the checkout). The authors' functions
are loaded from the checkout at run time and called on the same model, masks and advantages as
ours: per-sequence / per-token likelihood terms, the loss and its gradient. Prints one table;
exits 1 on any mismatch or missing checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

# objective -> (check module in scripts/objective_refs, authors' repository folder under --refs, fixture)
CHECKS = {
    "diffu_grpo": ("diffu_grpo", "d1", "diffu_grpo.json"),
    "spg": ("spg", "SPG", "spg.json"),
    "wd1": ("wd1", "wd1", "wd1.json"),
    "d2_stepmerge": ("d2", "d2", "d2_stepmerge.json"),
    "tracerl": ("tracerl", "dLLM-RL", "tracerl.json"),
    "espo": ("espo", "ESPO", "espo.json"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", type=Path, required=True, help="folder holding the authors' checkouts")
    ap.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="objectives to check (default: all)")
    ap.add_argument("--write-fixtures", action="store_true", help="also rewrite tests/fixtures/objectives/*.json")
    args = ap.parse_args(argv)
    failed = 0
    print(f"{'objective':<14} {'compared':<72} {'max |diff|':>11}  ok")
    for name in args.only or sorted(CHECKS):
        module, folder, fixture = CHECKS[name]
        repo = args.refs / folder
        if not repo.is_dir():
            print(f"{name:<14} {'authors checkout missing: ' + str(repo):<72} {'-':>11}  NO")
            failed += 1
            continue
        mod = importlib.import_module(f"objective_refs.{module}")
        for what, diff, ok in mod.check(repo):
            print(f"{name:<14} {what:<72} {diff:>11.3e}  {'yes' if ok else 'NO'}")
            failed += not ok
        if args.write_fixtures:
            mod.record(repo, ROOT / "tests" / "fixtures" / "objectives" / fixture)
    print("all equal" if not failed else f"{failed} mismatch(es)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
