"""Where a count-up checkpoint's errors come from (docs/benchmarks.md, "The LLaDA-architecture rows").

Two teacher-forced probes over held-out problems of ``scripts/count_up.py``, then two samplers:

- ``next line``: the prompt and worked lines ``1 .. j-1`` given, line ``j`` and everything after it
  masked, one forward pass; the argmax at line ``j``'s characters. This is the state a
  left-to-right decode is in, and the rule the task teaches (counter minus one, value plus one).
- ``one line``: only line ``j`` (and its newline) masked, the lines after it given as well.
- ``reference`` (LLaDA's low-confidence remasking, blocks of ``--block-length``, one token per
  step) vs ``left-to-right`` (blocks of one position: the same sampler, strictly in order).

Each probe's accuracy is split by character: the counter's tens digit where the counter borrows
(``10`` -> ``09``, ``20`` -> ``19``) and where it does not, the counter's ones digit, the value's
ones digit, its other digits where a carry reaches them and where none does, and the line's
separators (``:`` and the newline: where the model thinks it is in the line), and the digits of
the closing sum line ``=SSSS`` (a copy of the last value without its leading zero). The samplers
report the stated sum, the whole solution and the worked lines alone (the sum line aside).

    .venv/bin/python scripts/count_up_probe.py runs/frontier/llada --n 128
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import count_up as task  # noqa: E402
from bench_rollout import encode_prompts, make_batch  # noqa: E402
from rollout import PolicyAdapter, generate  # noqa: E402

KINDS = ("counter tens, borrow", "counter tens, no borrow", "counter ones", "value ones", "value digit, carry",
         "value digit, no carry", "':' and newline", "sum line digit")


def char_kinds(example: task.Example, j: int) -> list[tuple[int, str]]:
    """(offset in the completion, kind) of line ``j``'s characters (``j`` >= 1; ``CC:VVVVV`` then a newline;
    ``j = count + 1`` is the sum line ``=SSSS``, its digits a copy of the last value without its leading zero)."""
    width = len(str(example.number)) + 1
    start = (j - 1) * (width + 4)
    if j == example.count + 1:
        return [(start + 1 + i, KINDS[7]) for i in range(len(example.answer))]
    counter, value, prev = example.count - j, example.number + j, example.number + j - 1
    out = [(start, KINDS[0] if counter % 10 == 9 else KINDS[1]), (start + 1, KINDS[2]), (start + 2, KINDS[6]),
           (start + width + 3, KINDS[6])]
    new, old = f"{value:0{width}d}", f"{prev:0{width}d}"
    out += [(start + 3 + i, KINDS[4] if new[i] != old[i] else KINDS[5]) for i in range(width - 1)]
    return out + [(start + 2 + width, KINDS[3])]


def probe(policy: PolicyAdapter, examples: list[task.Example], gen_length: int, mode: str) -> dict[str, list[bool]]:
    """Per-kind correctness of the argmax at line ``j``'s characters, over every problem and line (the
    sum line included), with line ``j`` masked and (``mode="next"``) everything after it masked too, or
    (``"one"``) only it."""
    tok, mask_id = policy.tokenizer, policy.mask_token_id
    for e in examples:
        if len(e.completion) >= gen_length:  # one token per character; EOS must follow
            raise ValueError(f"count-up probe: the completion of {e.prompt!r} has {len(e.completion)} tokens, "
                             f"gen_length {gen_length} leaves no room for EOS")
    full, mask, resp = make_batch(tok, [(e.prompt, e.completion) for e in examples], gen_length)
    p = int((~resp.bool()).sum(1)[0])
    res: dict[str, list[bool]] = defaultdict(list)
    line_len = len(str(examples[0].number)) + 5
    for j in range(1, max(e.count for e in examples) + 2):
        rows = [i for i, e in enumerate(examples) if e.count + 1 >= j]
        x = full[rows].clone()
        start = p + (j - 1) * line_len
        if mode == "next":
            x[:, start:] = mask_id
        else:
            for r, i in enumerate(rows):  # the sum line is "=" and the answer, then EOS
                x[r, start:start + (line_len if j <= examples[i].count else 1 + len(examples[i].answer))] = mask_id
        with torch.no_grad():
            pred = policy(x, attention_mask=mask[rows]).logits.argmax(-1)
        for r, i in enumerate(rows):
            for off, kind in char_kinds(examples[i], j):
                res[kind].append(bool(pred[r, p + off] == full[i, p + off]))
    return res


def decode_accuracy(policy: PolicyAdapter, examples: list[task.Example], gen_length: int, block_length: int,
                    batch: int) -> tuple[float, float, float]:
    """(stated sum right, whole worked solution right, worked lines right whatever the sum line) of
    one-token-per-step decoding in blocks of ``block_length``."""
    right, exact, lines = 0, 0, 0
    for k in range(0, len(examples), batch):
        chunk = examples[k:k + batch]
        ids, mask = encode_prompts(policy.tokenizer, [e.prompt for e in chunk])
        out = generate(policy, ids, attention_mask=mask, steps=gen_length, gen_length=gen_length,
                       block_length=block_length, mask_id=policy.mask_token_id, eos_id=policy.eos_token_id)
        texts = out.decode(policy.tokenizer)
        right += sum(task.is_correct(s, e) for s, e in zip(texts, chunk))
        exact += sum(task.steps_consistent(s, e) for s, e in zip(texts, chunk))
        lines += sum(s.strip().startswith(e.completion.rsplit("\n", 1)[0] + "\n") for s, e in zip(texts, chunk))
    return right / len(examples), exact / len(examples), lines / len(examples)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder of scripts/bench_frontier.py --save")
    ap.add_argument("--n", type=int, default=128, help="held-out problems")
    ap.add_argument("--test-seed", type=int, default=0, help="bench_frontier.py's --test-seed (its held-out set)")
    ap.add_argument("--digits", type=int, default=4, help="as bench_frontier.py's")
    ap.add_argument("--counts", default="8-24", help="as bench_frontier.py's")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-decode", action="store_true", help="the probes only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    examples = task.held_out(args.test_seed + 1000, args.n, args.digits, task.parse_counts(args.counts))
    policy = PolicyAdapter.from_pretrained(args.model).eval()
    print(f"{args.model}: {type(policy.model).__name__}; {len(examples)} held-out problems (test seed {args.test_seed})")
    print(f"{'digit':<26} {'next line':>10} {'one line':>10} {'n':>6}")
    probes = {m: probe(policy, examples, args.gen_length, m) for m in ("next", "one")}
    for kind in KINDS:
        n = len(probes["next"][kind])
        cells = [f"{sum(probes[m][kind]) / n:.1%}" if n else "n/a" for m in ("next", "one")]
        print(f"{kind:<26} {cells[0]:>10} {cells[1]:>10} {n:>6}")
    if args.no_decode:
        return
    for name, block in (("reference (low confidence)", args.block_length), ("left-to-right", 1)):
        acc, exact, lines = decode_accuracy(policy, examples, args.gen_length, block, args.batch)
        print(f"{name:<26} sum right {acc:.1%}, every line right {exact:.1%}, worked lines right {lines:.1%}")


if __name__ == "__main__":
    main()
