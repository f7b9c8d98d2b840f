"""Accuracy-speed frontier of the rollout engine's fast modes (issue #16), on a task with long completions.

A checkpoint that LLaDA's reference sampler (``rollout.generate`` with default options: one token
per step) actually solves is needed before fast modes can be charged for accuracy. The script
trains one (masked-diffusion SFT, ``scripts/bench_rollout.py``'s loop) on addition by counting
up with a worked line per step (``scripts/count_up.py``: the prompt is the first worked line, the
completion the other lines and the sum, 77-221 characters, then EOS to
``gen_length``), checking the reference sampler's accuracy on a validation set as it goes, or
loads ``--model PATH``. Then, on one held-out set and in one run, it decodes with every mode and
combination (confidence threshold sweep, prefix / dual block KV cache, the dual cache with a
lookahead, early commit, EOS fill; the vLLM backend with ``--vllm``) and prints per mode:
accuracy, its change from the reference with the paired standard error, forward passes, tokens/s
and the ratios to the reference. Modes
run interleaved batch by batch, so load drift on a shared machine hits all of them alike.

    .venv/bin/python scripts/bench_frontier.py --save runs/frontier/tiny --plot docs/frontier_tiny.png
    .venv/bin/python scripts/bench_frontier.py --model runs/frontier/tiny --plot docs/frontier_tiny.png
    .venv/bin/python scripts/bench_frontier.py --arch llada --sizes d_model=256,n_layers=4 --save runs/frontier/llada
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import count_up as task  # noqa: E402
from bench_rollout import build_policy, encode_prompts, train  # noqa: E402
from rollout import PolicyAdapter, generate  # noqa: E402

BASELINE = "reference (1 token/step)"


@dataclass(frozen=True)
class Mode:
    """One decoding setting: the sampler's keyword arguments (empty = LLaDA's reference loop)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    backend: str = "torch"


def cache_kwargs(cache: str | None) -> dict:
    """The sampler's cache arguments for ``None``, ``"prefix"``, ``"dual"`` or ``"dual+L"`` (the dual cache
    recomputing ``L`` positions after the block: ``cache_lookahead``)."""
    if cache is None:
        return {}
    name, _, look = cache.partition("+")
    return {"kv_cache": name, **({"cache_lookahead": int(look)} if look else {})}


def mode_name(threshold: float | None, cache: str | None, early: float | None, eos: bool, backend: str = "torch") -> str:
    cache_part = cache.replace("+", " cache, lookahead ") if cache and "+" in cache else f"{cache} cache"
    parts = ([f"tau={threshold:g}"] if threshold is not None else []) + ([cache_part] if cache else []) \
        + ([f"early>={early:g}"] if early is not None else []) + (["EOS fill"] if eos else [])
    name = " + ".join(parts) if parts else BASELINE
    return name if backend == "torch" else f"{backend}: {name}"


def build_modes(thresholds: list[float], earlies: list[float], which: str, kv_cache: bool,
                lookaheads: tuple[int, ...] = ()) -> list[Mode]:
    """The modes to run, the reference first. ``all``: every combination of threshold (or none) x
    cache (none / prefix / dual / dual with each lookahead) x early commit (or none) x EOS fill (off /
    on); ``core``: the reference, each fast mode alone, every threshold alone, with each cache, with
    EOS fill, with each cache + EOS fill, with early commit + EOS fill, and with all three (dual cache)."""
    caches = [None, "prefix", "dual", *(f"dual+{n}" for n in lookaheads)] if kv_cache else [None]
    combos: list[tuple] = []
    if which == "all":
        combos = list(itertools.product([None, *thresholds], caches, [None, *earlies], [False, True]))
    else:
        e0 = earlies[0] if earlies else None
        combos = [(None, None, None, False)] + [(None, c, None, False) for c in caches[1:]]
        combos += [(None, None, e, False) for e in earlies] + [(None, None, None, True)]
        combos += [(None, None, e, True) for e in earlies]
        for t in thresholds:
            combos += [(t, c, None, f) for f in (False, True) for c in caches] + [(t, None, e0, True)]
            combos += [(t, "dual", e0, True)] if kv_cache else []
    seen, modes = set(), []
    for t, c, e, f in combos:
        kw = {k: v for k, v in dict(threshold=t, early_commit=e, fill_after_eos=f).items() if v} | cache_kwargs(c)
        key = tuple(sorted(kw.items()))
        if key not in seen:
            seen.add(key)
            modes.append(Mode(mode_name(t, c, e, f), kw))
    return modes


def vllm_modes(thresholds: list[float], earlies: list[float]) -> list[Mode]:
    """The vLLM backend's rows (``rollout.backend=vllm``, no KV cache): its reference loop, and each
    threshold alone, with EOS fill, and with early commit + EOS fill."""
    e0 = earlies[0] if earlies else None
    combos = [(None, None, False)] + [c for t in thresholds for c in ((t, None, False), (t, None, True), (t, e0, True))]
    return [Mode(mode_name(t, None, e, f, "vllm"), {k: v for k, v in dict(threshold=t, early_commit=e,
                                                                          fill_after_eos=f).items() if v}, "vllm")
            for t, e, f in dict.fromkeys(combos)]


class Decoder:
    """Runs a mode on a batch: ``rollout.generate`` (torch), or the vLLM rollout engine (started
    here, before any timing, when ``vllm``; ``startup`` = its start and first weight sync, seconds)."""

    def __init__(self, policy: PolicyAdapter, args, vllm: bool = False):
        self.policy, self.args, self.engine, self.startup = policy, args, None, 0.0
        if vllm:
            from rollout.engine import build_rollout_engine

            t0 = time.perf_counter()
            self.engine = build_rollout_engine(self.options(Mode("", backend="vllm")), policy)
            self.startup = time.perf_counter() - t0

    def options(self, mode: Mode):
        from rl.config import RolloutOptions

        a = self.args
        return RolloutOptions(gen_length=a.gen_length, block_length=a.block_length, steps=a.steps,
                              backend=mode.backend, **mode.kwargs)

    def __call__(self, mode: Mode, ids: torch.Tensor, mask: torch.Tensor):
        a, p = self.args, self.policy
        if mode.backend == "torch":
            return generate(p, ids, attention_mask=mask, steps=a.steps, gen_length=a.gen_length,
                            block_length=a.block_length, mask_id=p.mask_token_id, eos_id=p.eos_token_id,
                            **mode.kwargs)
        return self.engine.generate(ids, mask, options=self.options(mode))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


@dataclass
class Tally:
    """What one mode accumulated over the held-out set."""

    correct: list[bool] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    nfe: int = 0
    batches: int = 0
    wall: float = 0.0
    cpu: float = 0.0


def run_all(decode: Decoder, modes: list[Mode], examples: list[task.Example], batch: int) -> dict[str, Tally]:
    """Every mode on every batch of ``examples``, modes interleaved within each batch."""
    tok = decode.policy.tokenizer
    tallies = {m.name: Tally() for m in modes}
    batches = [examples[i:i + batch] for i in range(0, len(examples), batch)]
    bar = tqdm(total=len(batches) * len(modes), desc="frontier", file=sys.stdout, mininterval=5)
    for chunk in batches:
        ids, mask = encode_prompts(tok, [e.prompt for e in chunk])
        for m in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            out = decode(m, ids, mask)
            t = tallies[m.name]
            t.wall += time.perf_counter() - t0
            t.cpu += time.process_time() - c0
            t.nfe, t.batches = t.nfe + out.num_forward_passes, t.batches + 1
            texts = out.decode(tok)
            t.correct += [task.is_correct(s, e) for s, e in zip(texts, chunk)]
            t.exact += [s == e.completion for s, e in zip(texts, chunk)]
            t.tokens.append(out.completion_ids.cpu())
            bar.update()
    bar.close()
    return tallies


def summarize(tallies: dict[str, Tally], gen_length: int) -> list[dict]:
    """Rows of the table; ratios and paired differences are to the reference (the first mode)."""
    names = list(tallies)
    base = tallies[names[0]]
    base_c = torch.tensor(base.correct, dtype=torch.float64)
    base_tok = torch.cat(base.tokens)
    n = len(base.correct)
    rows = []
    for name in names:
        t = tallies[name]
        c = torch.tensor(t.correct, dtype=torch.float64)
        d = c - base_c
        tps = n * gen_length / t.wall
        rows.append(dict(
            mode=name, n=n, acc=c.mean().item(), se=math.sqrt(c.mean().item() * (1 - c.mean().item()) / n),
            delta=d.mean().item(), se_delta=(d.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
            exact=sum(t.exact) / n, nfe=t.nfe / t.batches, x_nfe=base.nfe / t.nfe, tps=tps,
            x_tps=base.wall / t.wall, x_cpu=base.cpu / t.cpu, wall=t.wall, cpu=t.cpu,
            agree=(torch.cat(t.tokens) == base_tok).double().mean().item()))
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'mode':<48} {'acc':>6} {'d pts':>6} {'+-se':>5} {'exact':>6} {'NFE':>6} {'x NFE':>6} "
            f"{'tok/s':>7} {'x tok/s':>7} {'x CPU':>6} {'agree':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<48} {r['acc']:>6.1%} {100 * r['delta']:>+6.1f} {100 * r['se_delta']:>5.1f} "
              f"{r['exact']:>6.1%} {r['nfe']:>6.1f} {r['x_nfe']:>6.1f} {r['tps']:>7.0f} {r['x_tps']:>7.2f} "
              f"{r['x_cpu']:>6.2f} {r['agree']:>6.1%}")


def goal_verdict(rows: list[dict], speed: float = 10.0, loss_pts: float = 1.0) -> str:
    """Whether some mode reaches ``speed`` x the reference's tokens/s at <= ``loss_pts`` accuracy loss."""
    ok = [r for r in rows[1:] if r["delta"] >= -loss_pts / 100]
    fast = [r for r in rows[1:] if r["x_tps"] >= speed]
    best_ok = max(ok, key=lambda r: r["x_tps"], default=None)
    best_fast = max(fast, key=lambda r: r["delta"], default=None)
    hits = [r for r in ok if r["x_tps"] >= speed]
    desc = lambda r: f"{r['mode']} (x{r['x_tps']:.1f} tokens/s, x{r['x_cpu']:.1f} CPU, {100 * r['delta']:+.1f} pts " \
                     f"+- {100 * r['se_delta']:.1f})"  # noqa: E731
    if hits:
        best = max(hits, key=lambda r: r["x_tps"])
        return (f"goal (>= {speed:g}x tokens/s at <= {loss_pts:g} point loss): MET by {len(hits)} "
                f"mode{'s' * (len(hits) > 1)}; fastest: {desc(best)}")
    out = f"goal (>= {speed:g}x tokens/s at <= {loss_pts:g} point loss): NOT met."
    out += f" Fastest within {loss_pts:g} point: {desc(best_ok)}." if best_ok else ""
    out += f" Most accurate at >= {speed:g}x: {desc(best_fast)}." if best_fast else f" No mode reaches {speed:g}x."
    return out


def pareto(rows: list[dict]) -> list[dict]:
    """The frontier: rows no other row beats on both accuracy and tokens/s, fastest last."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (-r["tps"], -r["acc"])):
        if r["acc"] > best:
            front.append(r)
            best = r["acc"]
    return front[::-1]


def plot(rows: list[dict], path: str, title: str) -> None:
    """Accuracy vs tokens/s, one point per mode (log x; top axis: ratio to the reference), colour =
    KV cache, marker = EOS fill / early commit; the frontier's points are labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"none": "tab:blue", "prefix": "tab:orange", "dual": "tab:green", "dual + lookahead": "tab:red",
               "vllm": "tab:purple"}
    markers = {(False, False): "o", (True, False): "s", (False, True): "^", (True, True): "D"}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    base = rows[0]["tps"]
    front = pareto(rows)
    for r in rows:
        kind = "dual + lookahead" if "lookahead" in r["mode"] else \
            next((k for k in ("vllm", "dual", "prefix") if k in r["mode"]), "none")
        mk = markers[("EOS fill" in r["mode"], "early" in r["mode"])]
        ax.errorbar(r["tps"], 100 * r["acc"], yerr=100 * r["se_delta"], fmt=mk, color=colours[kind], ms=6,
                    mfc="none" if "tau" not in r["mode"] and r is not rows[0] else colours[kind], alpha=0.85,
                    elinewidth=0.7, capsize=2)
    for i, r in enumerate(front):
        ax.annotate(r["mode"], (r["tps"], 100 * r["acc"]), fontsize=6.5, xytext=(-4, 6 + 7 * (i % 3)),
                    textcoords="offset points", ha="right",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="grey"))
    ax.plot([r["tps"] for r in front], [100 * r["acc"] for r in front], color="grey", lw=0.6, zorder=0)
    ax.set_xscale("log")
    ax.axvline(10 * base, color="grey", ls="--", lw=0.8, label="10x the reference's tokens/s")
    ax.axhline(100 * rows[0]["acc"] - 1, color="grey", ls=":", lw=0.8, label="reference accuracy - 1 point")
    top = ax.secondary_xaxis("top", functions=(lambda x: x / base, lambda x: x * base))
    top.set_xlabel("x the reference's tokens/s")
    ax.set_xlabel("tokens/s (gen_length x problems / wall time)")
    ax.set_ylabel("held-out accuracy (%); bars: paired s.e. of the change")
    ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f"cache: {k}" if k != "vllm" else "vLLM backend")
               for k, c in colours.items()]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", mfc="none" if m != "o" else "k", label=lbl)
                for m, lbl in [("o", "threshold (filled) / none"), ("s", "+ EOS fill"), ("^", "+ early commit"),
                               ("D", "+ early commit + EOS fill")]]
    handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def block_state_noise(fraction: float, block_length: int, eps: float = 1e-3):
    """A ``noise`` for :func:`bench_rollout.train`: LLaDA's i.i.d. masking (``t ~ U(eps, 1)``) on each
    row, except on a ``fraction`` of rows (drawn per row), which get a state the semi-autoregressive
    sampler decodes from, as block diffusion trains (BD3-LM, Arriola et al. 2025, Eq. 7): the
    completion's first ``k`` blocks given (``k`` uniform), the next block's positions masked i.i.d. with
    probability ``t``, every position after that block masked. Those rows' loss weight is 1 (``t = 1``:
    the mean cross-entropy over the completion), not ``1/t``."""
    from rl.losses import draw_sft_noise

    def draw(resp: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t, masked = draw_sft_noise(resp, g, eps)
        resp = resp.bool()
        pos = resp.long().cumsum(1) - 1  # index within the completion (-1 on the prompt)
        blocks = -(-resp.sum(1) // block_length)
        start = (torch.rand(resp.shape[0], generator=g) * blocks).long() * block_length
        start, pick = start[:, None], (torch.rand(resp.shape[0], generator=g) < fraction)[:, None]
        in_block = (pos >= start) & (pos < start + block_length) & (torch.rand(resp.shape, generator=g) < t)
        state = resp & (in_block | (pos >= start + block_length))
        return torch.where(pick, torch.ones_like(t), t), torch.where(pick, state, masked)

    return draw


def floats(spec: str, name: str) -> list[float]:
    try:
        vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{name}={spec!r}: expected comma-separated numbers, e.g. 0.5,0.9") from None
    if any(not 0 < v <= 1 for v in vals):
        raise SystemExit(f"--{name}={spec!r}: values must be in (0, 1]")
    return vals


def sizes(spec: str | None) -> dict:
    """``"d_model=256,n_layers=4"`` -> {"d_model": 256, "n_layers": 4} (ints or floats)."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        key, _, val = item.partition("=")
        try:
            out[key.strip()] = float(val) if "." in val else int(val)
        except ValueError:
            raise SystemExit(f"--sizes item {item!r}: expected key=number") from None
    return out


SEEN_SET = 1024  # problems of an earlier test seed's held-out and validation sets that --exclude-test-seeds skips
DRAW_MARGIN = 1.05  # draws replayed per trained problem: covers the problems training skipped


def excluded_prompts(trained: list[str], test_seeds: str, batch: int, shape: tuple[int, tuple[int, int]]) -> set[str]:
    """The prompts ``--exclude-trained`` (``SEED:STEPS[:BATCH]`` each) and ``--exclude-test-seeds`` name.

    A training run's prompts: the first ``DRAW_MARGIN * STEPS * BATCH`` of its seed's stream
    (:func:`count_up.drawn`; training skips only the held-out and validation prompts, ~0.4% of draws)."""
    out: set[str] = set()
    for spec in trained:
        try:
            seed, steps, *rest = (int(v) for v in spec.split(":"))
            if len(rest) > 1 or steps < 1 or (rest and rest[0] < 1):
                raise ValueError
        except ValueError:
            raise SystemExit(f"--exclude-trained={spec!r}: expected SEED:STEPS or SEED:STEPS:BATCH, "
                             "e.g. 0:3000") from None
        out |= task.drawn(seed, math.ceil(DRAW_MARGIN * steps * (rest[0] if rest else batch)), *shape)
    try:
        seeds = [int(v) for v in test_seeds.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--exclude-test-seeds={test_seeds!r}: expected comma-separated seeds, e.g. 0,1") from None
    for s in seeds:
        n = min(SEEN_SET, task.n_problems(*shape))
        out |= {e.prompt for off in (1000, 2000) for e in task.held_out(s + off, n, *shape)}
    return out


def accuracy_of(policy: PolicyAdapter, examples: list[task.Example], args, batch: int) -> float:
    """The reference sampler's accuracy on ``examples``."""
    tallies = run_all(Decoder(policy, args), [Mode(BASELINE)], examples, batch)
    return sum(tallies[BASELINE].correct) / len(examples)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a trained checkpoint folder (skips training)")
    ap.add_argument("--arch", choices=("tiny", "tiny-bert", "llada"), default="tiny",
                    help="model to train without --model: the tiny model (EuroBERT blocks, RoPE), its BERT "
                         "variant (absolute positions) or LLaDA's architecture; all three have the block KV cache")
    ap.add_argument("--sizes", help="model size overrides, e.g. d_model=256,n_layers=4 (llada) or hidden_size=... (tiny)")
    ap.add_argument("--init", help="train from this checkpoint folder instead of a fresh --arch model (fresh "
                    "optimizer and schedule)")
    ap.add_argument("--save", help="save the trained checkpoint here (runs/...; reload with --model)")
    ap.add_argument("--train-only", action="store_true", help="stop after training (with --save)")
    ap.add_argument("--digits", type=int, default=4, help="digits of the number counted up from")
    ap.add_argument("--counts", default="8-24", help="steps to count: N or MIN-MAX (2-digit counters: <= 99)")
    ap.add_argument("--train-steps", type=int, default=3000, help="most SFT steps")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--decay-to", type=float, default=0.1, help="final lr as a fraction of --lr (linear decay)")
    ap.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps (LLaDA's "
                    "pre-training: 2000)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (LLaDA's: 0.1)")
    ap.add_argument("--block-noise", type=float, default=0.0, help="fraction of training rows in the sampler's "
                    "block states (given blocks, a partly masked block, the rest masked; block_state_noise) "
                    "instead of LLaDA's i.i.d. masking")
    ap.add_argument("--target", type=float, default=0.6, help="stop training once the reference sampler solves "
                    "this share of the validation set")
    ap.add_argument("--check-every", type=int, default=500, help="SFT steps between validation checks")
    ap.add_argument("--n-val", type=int, default=32, help="validation problems (disjoint from the test set)")
    ap.add_argument("--n-test", type=int, default=512, help="held-out test problems")
    ap.add_argument("--batch", type=int, default=64, help="prompts per decoding batch")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="reference denoising steps (default: gen_length)")
    ap.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--early-commit", default="0.9", help="early-commit top-2 gaps (comma-separated)")
    ap.add_argument("--lookahead", default="16", help="dual-cache lookaheads (comma-separated positions after the "
                    "block recomputed each step: cache_lookahead); empty: none")
    ap.add_argument("--modes", choices=("core", "all"), default="core")
    ap.add_argument("--match", help="keep only the modes whose name matches this regex (the reference always "
                    "runs), e.g. to confirm a few modes on a fresh --seed")
    ap.add_argument("--vllm", action="store_true", help="add the vLLM backend's rows (rollout.backend=vllm)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the model's initialisation and training data")
    ap.add_argument("--test-seed", type=int, default=None, help="the held-out and validation sets (default: "
                    "--seed); training never samples their prompts, so a new value gives fresh problems")
    ap.add_argument("--exclude-trained", action="append", default=[], metavar="SEED:STEPS[:BATCH]",
                    help="leave out of the held-out and validation sets every prompt a training run with this "
                    "--seed can have drawn in STEPS steps of BATCH (default --train-batch) problems; repeat it "
                    "for a checkpoint trained in several runs (fresh problems for a checkpoint trained before "
                    "--test-seed existed)")
    ap.add_argument("--exclude-test-seeds", default="", help="comma-separated test seeds whose held-out and "
                    "validation problems (the first %d of each) are left out too: sets modes were chosen on" % SEEN_SET)
    ap.add_argument("--plot", help="write the accuracy-vs-tokens/s PNG here")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    args.steps = args.steps or args.gen_length
    if args.init and args.model:
        raise SystemExit("--init (train from a checkpoint) and --model (evaluate one, no training): pass one of them")
    try:
        shape = (args.digits, task.parse_counts(args.counts))
        task.check_shape(*shape)
    except ValueError as exc:
        raise SystemExit(f"--digits/--counts: {exc}") from None
    desc = f"count-up addition ({args.digits}-digit number + {args.counts} steps)"
    thresholds, earlies = floats(args.thresholds, "thresholds"), floats(args.early_commit, "early-commit")
    try:
        lookaheads = tuple(int(v) for v in args.lookahead.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"--lookahead={args.lookahead!r}: expected comma-separated positions, e.g. 16,32") from None
    if any(n < 1 for n in lookaheads):
        raise SystemExit(f"--lookahead={args.lookahead!r}: positions must be >= 1")
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    test_seed = args.seed if args.test_seed is None else args.test_seed
    exclude = excluded_prompts(args.exclude_trained, args.exclude_test_seeds, args.train_batch, shape)
    try:
        test = task.held_out(test_seed + 1000, args.n_test, *shape, exclude=exclude)
        val = [e for e in task.held_out(test_seed + 2000, args.n_val + args.n_test, *shape, exclude=exclude)
               if e.prompt not in {t.prompt for t in test}][:args.n_val]
    except ValueError as exc:
        raise SystemExit(f"--n-test / --n-val after --exclude-trained / --exclude-test-seeds: {exc}") from None
    if args.model:
        policy = PolicyAdapter.from_pretrained(args.model).eval()
        note = f"model {args.model}"
    else:
        if args.init:
            policy = PolicyAdapter.from_pretrained(args.init)
        else:
            arch, extra = ("tiny", {"arch": "bert"}) if args.arch == "tiny-bert" else (args.arch, {})
            policy = build_policy(arch, args.seed, sizes={**extra, **sizes(args.sizes)})
        unseen = {e.prompt for e in test + val}

        def sample(rng: random.Random, n: int) -> list[tuple[str, str]]:
            out = []
            while len(out) < n:
                out += [(e.prompt, e.completion) for e in task.sample(rng, n - len(out), *shape) if e.prompt not in unseen]
            return out

        checks: list[str] = []

        def check(step: int) -> bool:
            acc = accuracy_of(policy, val, args, args.batch)
            checks.append(f"step {step}: {acc:.0%}")
            print(f"validation after {step} steps: reference sampler solves {acc:.1%} of {len(val)}", flush=True)
            if args.save:
                policy.save_pretrained(args.save)
            return acc >= args.target

        t0, c0 = time.perf_counter(), time.process_time()
        if not 0.0 <= args.block_noise <= 1.0:
            raise SystemExit(f"--block-noise={args.block_noise}: a fraction of rows, in [0, 1]")
        noise = block_state_noise(args.block_noise, args.block_length) if args.block_noise else None
        loss = train(policy, args, sample, decay_to=args.decay_to, check=check, check_every=args.check_every,
                     noise=noise, warmup=args.warmup, weight_decay=args.weight_decay)
        note = (f"{args.init or args.arch} model trained on {desc}, {args.train_batch} per step, "
                f"{time.perf_counter() - t0:.0f} s wall / {time.process_time() - c0:.0f} s CPU incl. validation "
                f"(final loss {loss:.3f}; validation {', '.join(checks) or 'none'})")
        if args.save:
            policy.save_pretrained(args.save)
    n_params = sum(p.numel() for p in policy.parameters())
    note += f"; {type(policy.model).__name__}, {n_params / 1e6:.2f}M parameters"
    if args.train_only:
        print(note)
        return

    modes = build_modes(thresholds, earlies, args.modes, policy.supports_kv_cache, lookaheads)
    if args.vllm:
        modes += vllm_modes(thresholds, earlies)
    if args.match:
        modes = [m for m in modes if m.name == BASELINE or re.search(args.match, m.name)]
    decode = Decoder(policy, args, vllm=args.vllm)
    ids, mask = encode_prompts(policy.tokenizer, [e.prompt for e in test[:4]])
    generate(policy, ids, attention_mask=mask, steps=8, gen_length=2 * args.block_length,
             block_length=args.block_length, mask_id=policy.mask_token_id)  # warm-up
    try:
        tallies = run_all(decode, modes, test, args.batch)
    finally:
        decode.close()
    rows = summarize(tallies, args.gen_length)

    print(f"\n{note}")
    print(f"held-out: {len(test)} problems ({desc}) of test seed {test_seed}, batch {args.batch}, gen_length "
          f"{args.gen_length}, block_length {args.block_length}, reference steps {args.steps}, temperature 0, "
          f"threads {args.threads}")
    if exclude:
        print(f"excluded from the held-out and validation sets: {len(exclude)} prompts (--exclude-trained "
              f"{' '.join(args.exclude_trained) or '-'}, --exclude-test-seeds {args.exclude_test_seeds or '-'})")
    print("acc: stated sum correct; d pts: change from the reference in points, +-se its paired standard error; "
          "exact: whole completion as the worked solution; NFE: forward passes per batch; x: reference's over "
          "this mode's (tokens/s from wall time, CPU from process time); agree: tokens equal to the reference's\n")
    print_table(rows)
    b = rows[0]
    if args.vllm:
        print(f"\nvLLM engine startup + first weight sync: {decode.startup:.1f} s (not in the vllm rows' times)")
    print(f"\nreference accuracy {b['acc']:.1%} +- {b['se']:.1%} (standard error, n={b['n']})")
    print(goal_verdict(rows))
    if args.plot:
        plot(rows, args.plot, f"{type(policy.model).__name__} ({n_params / 1e6:.1f}M), {desc}, n={b['n']}, "
             f"gen_length {args.gen_length}, block {args.block_length}")
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(note=note, args=vars(args), rows=rows), indent=1))
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU "
          f"(wall exceeds CPU when other processes share the cores)")


if __name__ == "__main__":
    main()
