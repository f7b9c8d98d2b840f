"""Cross-check our task verifiers against d1's scorer on LLaDA-8B-Instruct's published generations.

d1 (github.com/dllm-reasoning/d1) ships LLaDA-8B-Instruct's generations for GSM8K, MATH500,
Countdown and Sudoku (``eval/eval_baselines/*_generations.json``) and the scorer that produced its
reported numbers (``eval/parse_and_get_acc.py``). For every item this script computes d1's verdict
(its own parse functions) and ours (the registered rewards ``gsm8k``, ``math``, ``countdown``,
``sudoku`` and ``sudoku_solved``), then prints per task the agreement, both accuracies and the
disagreements sorted into classes (heuristics below; see docs/verifiers.md for a verdict on each).

    git clone https://github.com/dllm-reasoning/d1 /path/to/d1      # not vendored here
    .venv/bin/python scripts/check_d1_verifiers.py --d1-repo /path/to/d1
    .venv/bin/python scripts/check_d1_verifiers.py --d1-repo /path/to/d1 --task sudoku --show short-digit-string -n 5

Our verifiers see a completion as our rollout hands it over (``--text decoded``, the default:
cut at the first ``<|eot_id|>``/``<|endoftext|>``, LLaDA's end-of-turn / end-of-text tokens);
``--text raw`` gives them the stored text. d1's scorer always reads the stored text. ``--ours-root``
imports our verifiers from another checkout (e.g. ``git archive HEAD rewards | tar -x -C /tmp/old``)
to compare versions. Agreement: same correct/incorrect verdict (Sudoku: same cell accuracy).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import sys
import types
from collections import Counter, defaultdict
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("gsm8k", "math500", "countdown", "sudoku")
_END = re.compile(r"<\|eot_id\|>|<\|endoftext\|>")


def load_d1(repo: Path):
    """d1's ``eval/parse_and_get_acc.py`` as a module. It uses tiktoken only to count tokens, which
    we do not report: tiktoken is stubbed if missing and the count is replaced by 0 (tiktoken would
    download its encoding otherwise)."""
    eval_dir = repo / "eval"
    if not (eval_dir / "parse_and_get_acc.py").is_file():
        raise SystemExit(f"{eval_dir / 'parse_and_get_acc.py'} not found: pass a checkout of dllm-reasoning/d1")
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        enc = types.SimpleNamespace(encode=lambda text: text.split())
        sys.modules["tiktoken"] = types.SimpleNamespace(get_encoding=lambda name: enc)
    sys.path.append(str(eval_dir))  # it imports parser_helper by name
    spec = importlib.util.spec_from_file_location("d1_parse_and_get_acc", eval_dir / "parse_and_get_acc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.count_effective_tokens = lambda text: 0
    return mod


def load_items(repo: Path, task: str, d1) -> list[dict]:
    """Every item of every ``{task}_*_generations.json`` with d1's verdict attached."""
    parse = {"gsm8k": d1.parse_gsm_answers, "math500": d1.parse_math_answers,
             "countdown": d1.parse_countdown_answers, "sudoku": d1.parse_sudoku_answers}[task]
    items = []
    for path in sorted((repo / "eval" / "eval_baselines").glob(f"{task}_*_generations.json")):
        data = json.loads(path.read_text())
        with redirect_stdout(io.StringIO()):  # d1's is_equiv prints warnings
            processed = parse(json_data=data)[2]
        for k, (raw, res) in enumerate(zip(data["generations"], processed)):
            item = {"file": path.name, "index": k, "question": raw["question"], "raw": raw["generations"],
                    "ground_truth": raw["ground_truth"], "d1_extracted": res.get("extracted_answer")}
            if task == "sudoku":
                item["d1_score"] = res["accuracy"]
                item["d1_solved"] = res["extracted_answer"] == raw["ground_truth"]
            else:
                item["d1_score"] = float(bool(res["is_correct"]))
            items.append(item)
    return items


def puzzle_of(question: str) -> str:
    m = re.search(r"([0-9]{16})", question)
    if not m:
        raise ValueError(f"no 16-digit puzzle in {question[:80]!r}")
    return m.group(1)


def score_ours(task: str, items: list[dict], text_mode: str, workers: int, math_timeout: float) -> None:
    """Adds ``ours`` (score) and ``ours_ok`` (accuracy) to every item."""
    from rewards import get_reward
    from rewards.sudoku import sudoku_solved

    comps = [it["raw"] if text_mode == "raw" else _END.split(it["raw"], 1)[0] for it in items]
    for it, c in zip(items, comps):
        it["text"] = c
    prompts = [it["question"] for it in items]
    if task == "gsm8k":  # gold: d1's float ground truth (None where d1 could not parse it)
        gold = [None if it["ground_truth"] is None else repr(float(it["ground_truth"])) for it in items]
        scores = get_reward("gsm8k")(prompts, comps, answer=gold)
    elif task == "math500":
        math = get_reward("math", workers=workers, timeout_s=math_timeout)
        scores = math(prompts, comps, answer=[it["ground_truth"] for it in items])
    elif task == "countdown":
        scores = get_reward("countdown")(prompts, comps, nums=[it["ground_truth"][0] for it in items],
                                         target=[it["ground_truth"][1] for it in items])
    else:
        puzzles = [puzzle_of(it["question"]) for it in items]
        scores = get_reward("sudoku")(prompts, comps, puzzle=puzzles, solution=[it["ground_truth"] for it in items])
        for it, c, p in zip(items, comps, puzzles):
            it["puzzle"] = p
            it["ours_solved"] = sudoku_solved(c, p, it["ground_truth"])
    for it, s in zip(items, scores):
        it["ours"] = 0.0 if s is None else float(s)
        it["ours_ok"] = it["ours"] if task == "sudoku" else float(it["ours"] == 1.0)


def agree(task: str, it: dict) -> bool:
    return abs(it["d1_score"] - it["ours_ok"]) < 1e-9


# ------------------------------------------------------------------------------------------------
# disagreement classes (heuristics over the text; the class names are explained in docs/verifiers.md)
# ------------------------------------------------------------------------------------------------
_BOX = re.compile(r"\\boxed\s*\{")
_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def classify_gsm8k(it: dict) -> str:
    from rewards.gsm8k import answer_span, last_number
    from rewards.math import last_boxed

    text, raw = it["text"], it["raw"]
    d1 = it["d1_extracted"]
    ours = last_number(answer_span(text))
    boxes = re.findall(r"\\boxed{(.*?)}", raw)
    d1_won = it["d1_score"] > it["ours_ok"]
    if it["ground_truth"] is None:
        return "gold-missing"
    if not d1_won and d1 is not None and any(re.search(r"\d,\d{3}", b) for b in boxes):
        return "d1-thousands-comma"
    if not d1_won and d1 is None and _BOX.search(raw):
        return "d1-unbalanced-or-multiline-box"
    if not d1_won and d1 is None and "<answer>" not in raw and "####" not in raw:
        return "no-answer-markup"
    if not d1_won and d1 is None:
        return "d1-no-number-in-answer"
    tags = _TAG.findall(text)
    if d1_won and tags and not re.search(r"\d", tags[-1]):
        return "empty-answer-tag"
    if d1_won and tags and last_boxed(tags[-1]) is not None and ours is not None \
            and last_number(last_boxed(tags[-1]) or "") != ours:
        return "box-inside-answer-not-preferred"
    if len(set(b.strip() for b in boxes)) > 1 or (it["raw"] != text and _BOX.search(raw[len(text):])):
        return "first-box-vs-final-answer"
    if boxes and not re.fullmatch(r"\s*-?[\d.]+\s*", boxes[0]):
        return "d1-first-number-of-box"
    return "other"


def classify_math(it: dict) -> str:
    text, raw, d1 = it["text"], it["raw"], it["d1_extracted"]
    tags = _TAG.findall(text)
    empty_tag = bool(tags) and not re.sub(r"\\boxed\s*\{\s*\}", "", tags[-1]).strip()
    if it["d1_score"] > it["ours_ok"]:
        if re.search(r"\\?%\s*\}?\s*$", str(d1)):
            return "percent-sign"
        return "empty-answer-tag" if empty_tag else "other"
    if empty_tag:
        return "empty-answer-tag"
    if d1 is None or "\\boxed" not in raw or len(str(d1)) > 200:
        return "d1-no-box-reads-whole-text"
    if "\\boxed{" in str(d1):
        return "unbalanced-box"
    return "d1-string-match-too-strict"


def classify_countdown(it: dict) -> str:
    text, raw, d1 = it["text"], it["raw"], str(it["d1_extracted"])
    closed = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    d1_won = it["d1_score"] > it["ours_ok"]
    if d1_won:
        if re.search(r"\\(times|cdot|div|frac)", d1):
            return "latex-operators"
        if re.search(r"\\boxed\s*\{[^{}]*$", text) and "\\boxed" not in d1 and len(d1) < 60:
            return "unbalanced-box"
        if closed and "\\boxed" in closed[-1]:
            return "box-inside-answer"
        if not closed and "<answer>" in text:
            return "answer-tag-left-open"
        if not closed and "\\boxed" in text:
            return "box-without-answer-tag"
        return "other"
    if "\\boxed" not in raw and closed:
        return "d1-no-box-reads-whole-text"
    return "other"


def _sudoku_span(text: str) -> str | None:
    """Where a grid is expected: the last closed answer tag, else an open one, else after/before a
    stray closing tag (a feature for the classes only; rewards.sudoku.answer_span is the rule)."""
    closed = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if closed:
        return closed[-1]
    if "<answer>" in text:
        return text.rsplit("<answer>", 1)[1]
    if "</answer>" in text:
        return text.rsplit("</answer>", 1)[1]
    return None


def classify_sudoku(it: dict) -> str:
    text = it["text"]
    d1 = str(it["d1_extracted"] or "")
    span = _sudoku_span(text)
    if span is None:
        return "no-answer-tag"
    if re.search(r"[^0-9]", d1):
        return "d1-reads-non-digits-as-cells"
    if "<answer>" not in text:
        return "garbled-opening-tag"
    lines = [ln for ln in span.splitlines() if re.search(r"\d", ln)]
    if len(re.findall(r"\d", span)) < 16:
        if len(lines) >= 2 and (any(len(re.findall(r"\d", ln)) != 4 for ln in lines[:-1])
                               or len(re.findall(r"\d", lines[-1])) > 4):
            return "rows-not-four-cells"
        return "rows-last-cut-short" if len(lines) >= 2 else "short-digit-string"
    if not re.search(r"<answer>(.*?)</answer>", text, re.DOTALL):
        return "answer-tag-left-open"
    if re.search(r"[A-Za-z]", span):
        return "labels-in-grid"
    return "other"


CLASSIFY = {"gsm8k": classify_gsm8k, "math500": classify_math, "countdown": classify_countdown,
            "sudoku": classify_sudoku}


def report(task: str, items: list[dict]) -> dict[str, list[dict]]:
    n = len(items)
    dis = [it for it in items if not agree(task, it)]
    classes: dict[str, list[dict]] = defaultdict(list)
    for it in dis:
        side = "d1>ours" if it["d1_score"] > it["ours_ok"] else "ours>d1"
        classes[CLASSIFY[task](it)].append({**it, "side": side})
    d1_acc = sum(it["d1_score"] for it in items) / n
    our_acc = sum(it["ours_ok"] for it in items) / n
    line = f"{task:<10} items {n:>5}  agree {1 - len(dis) / n:6.1%}  d1 {d1_acc:6.1%}  ours {our_acc:6.1%}"
    if task == "sudoku":
        d1_solved = sum(it["d1_solved"] for it in items) / n
        our_solved = sum(it["ours_solved"] for it in items) / n
        same = sum(it["d1_solved"] == it["ours_solved"] for it in items) / n
        line += f"   (cell accuracy; solved: d1 {d1_solved:.1%} ours {our_solved:.1%} agree {same:.1%})"
    print(line)
    for name, rows in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        sides = Counter(r["side"] for r in rows)
        print(f"    {name:<34} {len(rows):>4}   " + ", ".join(f"{k} {v}" for k, v in sorted(sides.items())))
    return classes


def show(task: str, rows: list[dict], limit: int, chars: int) -> None:
    for it in rows[:limit]:
        gt = it["ground_truth"]
        extra = f" puzzle {it['puzzle']}" if task == "sudoku" else ""
        print(f"--- {it['file']} #{it['index']}  gold {gt!r}{extra}  d1 {it['d1_score']:.3f} (read "
              f"{str(it['d1_extracted'])[-60:]!r})  ours {it['ours_ok']:.3f}  [{it['side']}]")
        print(it["question"][-200:].strip())
        print("...." + it["text"][-chars:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d1-repo", type=Path, required=True, help="a checkout of github.com/dllm-reasoning/d1")
    ap.add_argument("--task", choices=TASKS, action="append", help="task(s) to check (default: all)")
    ap.add_argument("--text", choices=("decoded", "raw"), default="decoded",
                    help="what our verifiers see: the text up to the first end-of-turn token, or the stored text")
    ap.add_argument("--ours-root", type=Path, default=ROOT, help="import our `rewards` package from this folder")
    ap.add_argument("--show", metavar="CLASS", action="append", default=[],
                    help="print examples of this disagreement class ('all' for every class)")
    ap.add_argument("-n", type=int, default=3, help="examples per class shown")
    ap.add_argument("--chars", type=int, default=600, help="characters of each completion's end shown")
    ap.add_argument("--save", type=Path, help="write every item's verdicts here (JSON lines) to diff two runs")
    ap.add_argument("--math-timeout", type=float, default=15.0,
                    help="math reward's per-item deadline (s; its parse timeout is a third): verdicts, not speed, "
                         "are measured here, so longer than training's 5 s to keep a loaded machine from scoring 0")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2), help="math-verify worker processes")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.ours_root.resolve()))
    d1 = load_d1(args.d1_repo)
    print(f"d1: {args.d1_repo}   ours: {args.ours_root}   our verifiers read the {args.text} text")
    saved = []
    for task in args.task or TASKS:
        items = load_items(args.d1_repo, task, d1)
        score_ours(task, items, args.text, args.workers, args.math_timeout)
        classes = report(task, items)
        where = {(r["file"], r["index"]): name for name, rows in classes.items() for r in rows}
        saved += [{"task": task, "file": it["file"], "index": it["index"], "d1": it["d1_score"], "ours": it["ours_ok"],
                   "class": where.get((it["file"], it["index"]))} for it in items]
        for name in classes:
            if name in args.show or "all" in args.show:
                print(f"== {task}: {name}")
                show(task, classes[name], args.n, args.chars)
    if args.save:
        args.save.write_text("".join(json.dumps(r) + "\n" for r in saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
