"""Reference check of rl/objectives/spg.py against the SPG authors' code (facebookresearch/SPG,
``spg/spg_trainer.py``), loaded from a local checkout at run time.

    .venv/bin/python scripts/check_objectives_reference.py --refs /tmp/refs --only spg [--write-fixtures]

The authors' ``compute_loss``, ``forward_process``, ``get_logits`` and ``_get_per_seq_logps`` are
taken from ``SPGTrainer`` with ``ast`` (decorators dropped; ``trl`` is not needed) and run as
methods of a stub holding their ``args``. Their ``forward_process`` reseeds the global RNG
(``set_seed(mask_seed)``): it runs here inside ``torch.random.fork_rng``, and the masks it draws
are captured and handed to ours as a ``MaskSample``, so randomness does not enter the comparison.

Inputs: a toy bidirectional model in float64 whose logits depend on every unmasked position
(:class:`ToySPGModel`), 4 left-padded prompts with completions of 5, 8, 3 and 7 valid tokens
(EOS-padded), dyadic advantages with both signs and a zero. Compared for every forward_type x
logp_estimation: the per-sequence likelihood terms, the loss and the gradient w.r.t. every model
parameter. Their code casts to float32 (``.to(torch.float32)``); the "fp64" rows run it with
``torch.float32`` read as float64 (and float64 as the default dtype), the "as-is" rows unchanged.
Also checked: our draw's mask distribution against theirs (many seeds), and that
``loss_type=bnpo`` over micro-batches equals their gradient-accumulated loss.
"""

from __future__ import annotations

import ast
import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rl.aggregation import BatchCounts, LOSS_TYPES, per_token  # noqa: E402
from rl.estimators import MaskSample  # noqa: E402
from rl.objectives.base import PolicyLossInputs  # noqa: E402
from rl.objectives.spg import FORWARD_TYPES, LOGP_ESTIMATIONS, SPG, SPGMasks  # noqa: E402

PAD, EOS, MASK, V = 0, 4, 5, 6  # toy vocabulary: 1..3 words, 4 EOS, 5 mask
P, L, BLOCK = 3, 8, 2
SEED = 1234
AUTHOR_METHODS = ("compute_loss", "forward_process", "get_logits", "_get_per_seq_logps")
FP64_TOL, FP32_TOL = 1e-10, 1e-5  # relative to max(1, |value|)


class ToySPGModel(torch.nn.Module):
    """logits[t] = bias + sum_s rel[t - s] * emb[x_s]: bidirectional, every position's prediction
    depends on which positions are masked; padded positions (attention_mask 0) contribute nothing."""

    def __init__(self, seed: int = 0, scale: float = 1.0, t: int = P + L):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rel = torch.nn.Parameter(0.7 * torch.randn(2 * t - 1, generator=g, dtype=torch.float64))
        self.emb = torch.nn.Parameter(scale * torch.randn(V, V, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(V, generator=g, dtype=torch.float64))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        onehot = torch.nn.functional.one_hot(ids, V).to(self.emb.dtype)
        if attention_mask is not None:
            onehot = onehot * attention_mask[..., None].to(onehot.dtype)
        t = ids.shape[-1]
        pos = torch.arange(t)
        mix = self.rel[pos[:, None] - pos[None, :] + t - 1]  # [T, T]
        return SimpleNamespace(logits=self.bias + torch.einsum("ts,nsv,vw->ntw", mix, onehot, self.emb))

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in (self.rel, self.emb, self.bias)])

    def load_flat(self, values: list[float]) -> "ToySPGModel":
        flat = torch.tensor(values, dtype=torch.float64)
        with torch.no_grad():
            for p in (self.rel, self.emb, self.bias):
                p.copy_(flat[:p.numel()].view_as(p))
                flat = flat[p.numel():]
        return self

    def flat_params(self) -> list[float]:
        return torch.cat([p.detach().reshape(-1) for p in (self.rel, self.emb, self.bias)]).tolist()


def toy_batch() -> dict[str, torch.Tensor]:
    """4 rows: left-padded prompts, completions with 5, 8, 3, 7 valid tokens (EOS-padded)."""
    prompt = torch.tensor([[PAD, 1, 2], [3, 1, 2], [PAD, PAD, 3], [2, 2, 1]])
    prompt_mask = (prompt != PAD).long()
    completion = torch.tensor([[1, 2, 3, 1, EOS, EOS, EOS, EOS],
                               [2, 1, 3, 3, 1, 2, 2, 1],
                               [3, 1, EOS, EOS, EOS, EOS, EOS, EOS],
                               [1, 1, 2, 3, 2, 1, EOS, EOS]])
    is_eos = (completion == EOS).long()
    completion_mask = ((torch.cumsum(is_eos, 1) - is_eos) == 0).long()
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
            "completion_mask": completion_mask, "advantages": torch.tensor([0.75, -0.5, 0.0, -0.25])}


def case_options(forward_type: str) -> dict:
    return {"forward_type": forward_type, "num_t": 1 if forward_type == "all" else 2, "min_t": 0.0, "max_t": 1.0,
            "block_length": BLOCK, "use_mask_prompt": True, "p_mask_prompt": 0.15}


# ------------------------------------------------------------------ the authors' code

def trainer_path(repo: Path) -> Path:
    for cand in (repo / "spg" / "spg_trainer.py", repo / "SPG" / "spg" / "spg_trainer.py"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no spg/spg_trainer.py under {repo} (pass the SPG checkout or its parent)")


class _Torch64(types.ModuleType):
    """``torch`` with ``torch.float32`` read as float64 (their explicit casts), all else torch's."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def load_authors(repo: Path, fp64: bool) -> dict:
    """The authors' SPGTrainer methods, compiled from their source (decorators dropped)."""
    path = trainer_path(repo)
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SPGTrainer")
    fns = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in AUTHOR_METHODS]
    missing = set(AUTHOR_METHODS) - {f.name for f in fns}
    if missing:
        raise RuntimeError(f"SPGTrainer in {path} lacks {sorted(missing)}")
    for f in fns:
        f.decorator_list = []
    import numpy as np

    ns = {"torch": _Torch64("torch") if fp64 else torch, "F": torch.nn.functional, "np": np,
          "set_seed": lambda seed: torch.manual_seed(int(seed))}
    exec(compile(ast.fix_missing_locations(ast.Module(body=fns, type_ignores=[])), str(path), "exec"), ns)
    return {name: ns[name] for name in AUTHOR_METHODS}


def authors_stub(fns: dict, opts: dict, logp_estimation: str, eubo_beta: float, mix_weight: float):
    """A stand-in for ``self``: their ``args`` and the four methods, ``forward_process`` recorded."""
    stub = SimpleNamespace()
    stub.args = SimpleNamespace(**opts, mask_id=MASK, cfg_scale=0.0, num_iterations=1,
                                logp_estimation=logp_estimation, eubo_beta=eubo_beta, mix_weight=mix_weight)
    stub._step, stub.beta, stub.control = 0, 0.0, SimpleNamespace(should_evaluate=False)
    for name, fn in fns.items():
        setattr(stub, name, types.MethodType(fn, stub))
    stub.captured, stub.per_seq = [], []
    fp, seq = stub.forward_process, stub._get_per_seq_logps

    def forward_process(*a, **k):
        out = fp(*a, **k)
        stub.captured.append(out)
        return out

    def get_per_seq_logps(*a, **k):
        out = seq(*a, **k)
        stub.per_seq.append(out)
        return out

    stub.forward_process, stub._get_per_seq_logps = forward_process, get_per_seq_logps
    return stub


def run_authors(fns: dict, model: ToySPGModel, batch: dict, opts: dict, est: str, beta: float, weight: float,
                seed: int, fp64: bool) -> dict:
    """Their ``compute_loss`` on ``batch`` (one mask seed): per-seq terms, loss, gradient, masks."""
    stub = authors_stub(fns, opts, est, beta, weight)
    adv = batch["advantages"].to(torch.float64 if fp64 else torch.float32)
    inputs = {**batch, "advantages": adv, "mask_seeds": [seed], "reward_mask": adv > 0}
    model.zero_grad()
    with torch.random.fork_rng(devices=[]):
        old = torch.get_default_dtype()
        if fp64:
            torch.set_default_dtype(torch.float64)
        try:
            loss = stub.compute_loss(model, inputs)
        finally:
            torch.set_default_dtype(old)
    loss.backward()
    noisy, block_mask = stub.captured[0]
    return {"terms": stub.per_seq[0][0].detach().double(), "loss": loss.detach().double(),
            "grad": model.flat_grad().clone(), "masked": (noisy == MASK).permute(1, 0, 2).contiguous(),
            "block_mask": block_mask.permute(1, 0, 2)[..., P:].contiguous()}


# ------------------------------------------------------------------ ours

def sample_from_masks(masked: torch.Tensor, completion_mask: torch.Tensor, keep: torch.Tensor | None = None
                      ) -> MaskSample:
    """A MaskSample holding exactly ``masked [K, B, T]``; scored = masked valid completion tokens
    (times ``keep [K, B, L]`` if given), weight n / |S_k| as SPGMasks.draw gives it."""
    valid = completion_mask.bool()
    scored = masked[..., P:] & valid
    if keep is not None:
        scored = scored & keep
    n = valid.sum(-1).float()
    weights = scored.float() * (n / scored.sum(-1).clamp(min=1).float()).unsqueeze(-1)
    return MaskSample(masked.clone(), weights)


def run_ours(model: ToySPGModel, batch: dict, sample: MaskSample, est: str, beta: float, weight: float,
             loss_type: str = "dapo", micro: list[slice] | None = None) -> dict:
    """Our estimator.score -> SPG.terms -> SPG.loss -> aggregation (as rl/grpo.py's policy_update)."""
    obj = SPG(logp_estimation=est, eubo_beta=beta, mix_weight=weight)
    scorer = SPGMasks()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], torch.ones_like(batch["completion_ids"])], 1)
    cmask = batch["completion_mask"]
    adv = batch["advantages"].double()
    rows = obj.prepare(adv, adv, 4)
    n = input_ids.shape[0]
    micro = micro or [slice(0, n)]
    counts = BatchCounts(tokens=float(cmask.sum()), rows=float(n), max_len=cmask.shape[1], num_micro=len(micro))
    model.zero_grad()
    terms, total = [], torch.zeros((), dtype=torch.float64)
    for sl in micro:
        sub = MaskSample(sample.masked[:, sl], sample.weights[:, sl])
        logps = scorer.score(model, input_ids[sl], attention_mask[sl], P, sub, MASK)
        logp = obj.terms(scorer, sub, logps, cmask[sl], {k: v[sl] for k, v in rows.items()})
        out = obj.loss(PolicyLossInputs(logp=logp, old_logp=logp.detach(), ref_logp=None, advantages=adv[sl],
                                        mask=cmask[sl].double(), rows={k: v[sl] for k, v in rows.items()}))
        w = LOSS_TYPES[loss_type](cmask[sl].double(), counts)
        loss = (per_token(out.loss, w) * w).sum()
        loss.backward()
        terms.append(logp.detach())
        total = total + loss.detach()
    return {"terms": torch.cat(terms), "loss": total, "grad": model.flat_grad().clone()}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, max abs diff / max(1, |b|))."""
    d = (a.double() - b.double()).abs()
    return float(d.max()), float((d / b.double().abs().clamp(min=1.0)).max())


# ------------------------------------------------------------------ checks

def _equality_rows(fns: dict, fp64: bool, cases: list[tuple[str, str]], tag: str) -> list[tuple[str, float, bool]]:
    rows = []
    batch = toy_batch()
    tol = FP64_TOL if fp64 else FP32_TOL
    for ft, est in cases:
        beta, weight = 1.5, 0.5
        model = ToySPGModel(seed=0)
        theirs = run_authors(fns, model, batch, case_options(ft), est, beta, weight, SEED, fp64)
        ours = run_ours(model, batch, sample_from_masks(theirs["masked"], batch["completion_mask"]), est, beta, weight)
        for what in ("terms", "loss", "grad"):
            absd, reld = rel_diff(ours[what], theirs[what])
            rows.append((f"{tag} {ft}/{est}: {what}", absd, reld <= tol))
    return rows


def _padding_row(fns: dict) -> tuple[str, float, bool]:
    """Their masks hit prompt padding; ours never do. Clearing it changes nothing (attention mask)."""
    batch = toy_batch()
    model = ToySPGModel(seed=0)
    theirs = run_authors(fns, model, batch, case_options("block_random"), "mix", 1.5, 0.5, SEED, True)
    masked = theirs["masked"].clone()
    masked[..., :P] &= batch["prompt_mask"].bool()
    ours = run_ours(model, batch, sample_from_masks(masked, batch["completion_mask"]), "mix", 1.5, 0.5)
    padded_hits = int((theirs["masked"][..., :P] & ~batch["prompt_mask"].bool()).sum())
    d = max(rel_diff(ours["grad"], theirs["grad"])[0], rel_diff(ours["terms"], theirs["terms"])[0])
    return (f"fp64 pad un-masked ({padded_hits} pad hits in theirs): terms, grad", d, d <= FP64_TOL)


def _bnpo_row(fns: dict) -> tuple[str, float, bool]:
    """Their loss is per compute_loss call (micro-batch), divided by gradient_accumulation_steps:
    our ``bnpo`` over the same micro-batches equals it."""
    batch = toy_batch()
    model = ToySPGModel(seed=0)
    halves = [slice(0, 2), slice(2, 4)]
    grads, loss, masks = [], 0.0, []
    for sl in halves:
        sub = {k: v[sl] for k, v in batch.items()}
        r = run_authors(fns, model, sub, case_options("block_random"), "mix", 1.5, 0.5, SEED, True)
        grads.append(r["grad"] / len(halves))
        loss = loss + r["loss"] / len(halves)
        masks.append(r["masked"])
    sample = sample_from_masks(torch.cat(masks, 1), batch["completion_mask"])
    ours = run_ours(model, batch, sample, "mix", 1.5, 0.5, loss_type="bnpo", micro=halves)
    d = max(rel_diff(ours["grad"], sum(grads))[0], abs(float(ours["loss"] - loss)))
    return ("fp64 bnpo over 2 micro-batches = their grad accumulation", d, d <= FP64_TOL)


def mask_stats(masked: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position frequencies of masked / scored ``[B, T]`` and the law of the scored count per
    (row, pass) ``[B, L + 1]``."""
    k, b, t = masked.shape
    scored = weights != 0
    cnt = scored.sum(-1)  # [K, B]
    law = torch.stack([torch.bincount(cnt[:, i], minlength=t - P + 1)[:t - P + 1] for i in range(b)])
    return {"masked": masked.float().mean(0), "scored": scored.float().mean(0), "count": law.float() / k}


def draw_authors(fns: dict, opts: dict, n_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = toy_batch()
    stub = authors_stub(fns, opts, "mix", 1.5, 0.5)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    prompt_index = torch.zeros(P + L, dtype=torch.bool)
    prompt_index[:P] = True
    masks = []
    with torch.random.fork_rng(devices=[]):
        for s in range(n_draws):
            noisy, _ = stub.forward_process(input_ids, prompt_index, MASK, seed=10_000 + s,
                                            completion_mask=batch["completion_mask"])
            masks.append((noisy == MASK).permute(1, 0, 2))
    masked = torch.cat(masks, 0)
    return masked, sample_from_masks(masked, batch["completion_mask"]).weights


def _distribution_rows(fns: dict, n_draws: int = 2000) -> list[tuple[str, float, bool]]:
    """Our draw vs theirs over many seeds: per-position mask / score frequencies (real tokens;
    their pad hits are a documented difference) and the mask-count law, within 6 standard errors."""
    batch = toy_batch()
    attention_mask = torch.cat([batch["prompt_mask"], torch.ones_like(batch["completion_ids"])], 1)
    real = attention_mask.bool()
    rows = []
    for ft in FORWARD_TYPES:
        opts = case_options(ft)
        tm, tw = draw_authors(fns, opts, n_draws)
        est = SPGMasks(**opts, n_samples=n_draws)
        s = est.draw(attention_mask, batch["completion_mask"], P, torch.Generator().manual_seed(7))
        a, o = mask_stats(tm, tw), mask_stats(s.masked, s.weights)
        tol = 6 * math.sqrt(2 * 0.25 / (n_draws * opts["num_t"]))
        d = max(float((a["masked"] - o["masked"])[real].abs().max()), float((a["scored"] - o["scored"]).abs().max()),
                float((a["count"] - o["count"]).abs().max()))
        rows.append((f"mask law {ft}, {n_draws} draws: |freq diff| (tol {tol:.3f})", d, d <= tol))
    # the chosen-block pair of a draw (no light mask, so the first masked block is the chosen one)
    for ft in ("block_all", "block_random"):
        opts = {**case_options(ft), "use_mask_prompt": False}
        tm, _ = draw_authors(fns, opts, n_draws)
        s = SPGMasks(**opts, n_samples=n_draws).draw(attention_mask, batch["completion_mask"], P,
                                                      torch.Generator().manual_seed(8))
        d = float((_pair_law(tm) - _pair_law(s.masked)).abs().max())
        tol = 6 * math.sqrt(0.25 / n_draws) * math.sqrt(2)
        rows.append((f"block pair law {ft}: |P(c0,c1) diff| (tol {tol:.3f})", d, d <= tol))
    return rows


def _pair_law(masked: torch.Tensor) -> torch.Tensor:
    """Joint frequency of (chosen block of pass 0, of pass 1) per row, ``[B, nb, nb]``."""
    comp = masked[..., P:].view(-1, 2, masked.shape[1], L // BLOCK, BLOCK).any(-1)  # [draws, 2, B, nb]
    chosen = comp.float().argmax(-1)  # first masked block
    nb = L // BLOCK
    idx = chosen[:, 0] * nb + chosen[:, 1]  # [draws, B]
    law = torch.stack([torch.bincount(idx[:, i], minlength=nb * nb) for i in range(idx.shape[1])])
    return law.float() / idx.shape[0]


def check(repo: Path) -> list[tuple[str, float, bool]]:
    """Rows (what was compared, max abs diff, ok) against the authors' code in ``repo``."""
    repo = Path(repo)
    torch.set_num_threads(1)
    f64, f32 = load_authors(repo, fp64=True), load_authors(repo, fp64=False)
    cases = [(ft, est) for ft in FORWARD_TYPES for est in LOGP_ESTIMATIONS]
    rows = _equality_rows(f64, True, cases, "fp64")
    rows += _equality_rows(f32, False, [("block_random", "mix"), ("block_random", "eubo"), ("random", "eubo")],
                           "as-is (their fp32)")
    rows.append(_padding_row(f64))
    rows.append(_bnpo_row(f64))
    rows += _distribution_rows(f32)
    return rows


def differences(repo: Path) -> list[tuple[str, float]]:
    """Numbers for every place where our default or an option departs from the authors' code."""
    repo = Path(repo)
    f64, f32 = load_authors(repo, fp64=True), load_authors(repo, fp64=False)
    batch = toy_batch()
    out = []
    for ft in ("block_all", "block_random"):
        model = ToySPGModel(seed=0)
        theirs = run_authors(f64, model, batch, case_options(ft), "mix", 1.5, 0.5, SEED, True)
        keep = theirs["block_mask"]
        ours = run_ours(model, batch, sample_from_masks(theirs["masked"], batch["completion_mask"], keep),
                        "mix", 1.5, 0.5)
        out.append((f"score_later_blocks=False (their unused block_mask applied), {ft}/mix: max |terms diff|",
                    rel_diff(ours["terms"], theirs["terms"])[0]))
        out.append((f"  same: |loss diff| (theirs {float(theirs['loss']):.4f})",
                    abs(float(ours["loss"] - theirs["loss"]))))
    # share of scored tokens that are light-masked clean-block tokens (mask_clean_blocks=True, theirs)
    opts = case_options("block_random")
    tm, tw = draw_authors(f32, opts, 1000)
    s = SPGMasks(**opts, n_samples=1000).draw(None, batch["completion_mask"], P, torch.Generator().manual_seed(3))
    s2 = SPGMasks(**opts, n_samples=1000, mask_clean_blocks=False).draw(None, batch["completion_mask"], P,
                                                                        torch.Generator().manual_seed(3))
    out.append(("mean scored tokens / pass, block_random, toy: their draws", float((tw != 0).sum(-1).float().mean())))
    out.append(("  ours, mask_clean_blocks=True (default)", float((s.weights != 0).sum(-1).float().mean())))
    out.append(("  ours, mask_clean_blocks=False", float((s2.weights != 0).sum(-1).float().mean())))
    # EUBO when p^beta underflows float32 in theirs: a sharp model
    model = ToySPGModel(seed=0, scale=40.0)
    theirs = run_authors(f32, model, batch, case_options("block_random"), "eubo", 1.5, 0.5, SEED, False)
    ours = run_ours(model, batch, sample_from_masks(theirs["masked"], batch["completion_mask"]), "eubo", 1.5, 0.5)
    out.append(("EUBO with p^1.5 underflowing fp32 (sharp toy, scale 40): max |terms diff| (log-space ours)",
                rel_diff(ours["terms"], theirs["terms"])[0]))
    out.append(("  same: max |grad diff| / max |grad|",
                rel_diff(ours["grad"], theirs["grad"])[0] / float(theirs["grad"].abs().max())))
    # our dapo (global token mean) vs their per-micro-batch normalisation
    model = ToySPGModel(seed=0)
    halves = [slice(0, 2), slice(2, 4)]
    theirs_loss = 0.0
    masks = []
    for sl in halves:
        r = run_authors(f64, model, {k: v[sl] for k, v in batch.items()}, case_options("block_random"), "mix",
                        1.5, 0.5, SEED, True)
        theirs_loss += float(r["loss"]) / 2
        masks.append(r["masked"])
    ours = run_ours(model, batch, sample_from_masks(torch.cat(masks, 1), batch["completion_mask"]), "mix", 1.5, 0.5,
                    micro=halves)
    out.append((f"dapo (global token mean) vs their per-micro-batch mean, 2 micro-batches: |loss diff| "
                f"(theirs {theirs_loss:.4f})", abs(float(ours["loss"]) - theirs_loss)))
    return out


def grad_sketch(grad: torch.Tensor, k: int = 6) -> torch.Tensor:
    """``k`` fixed projections of a flat gradient (directions cos(0.7 i j + j), no RNG): keeps the
    fixture small while any gradient difference still shows."""
    i = torch.arange(grad.numel(), dtype=torch.float64)
    dirs = torch.stack([torch.cos(0.7 * i * j + j) for j in range(1, k + 1)])
    return dirs @ grad.double()


def record(repo: Path, out_path: Path) -> None:
    """Write the fp64 comparison inputs and the authors' outputs (tests/fixtures/objectives/spg.json)."""
    fns = load_authors(Path(repo), fp64=True)
    batch = toy_batch()
    model = ToySPGModel(seed=0)
    fx = {"about": "SPG authors' _get_per_seq_logps + compute_loss (facebookresearch/SPG spg/spg_trainer.py) in "
                   "float64 on scripts/objective_refs/spg.py's toy; masks[ft][k][b] = masked positions of pass k, "
                   "row b ('1' = masked) over prompt + completion; grad_sketch = grad_sketch(grad) of the script",
          "P": P, "L": L, "mask_id": MASK, "eubo_beta": 1.5, "mix_weight": 0.5,
          "params": [float(f"{v:.17g}") for v in model.flat_params()],
          "batch": {k: v.tolist() for k, v in batch.items()}, "masks": {}, "cases": {}}
    for ft in FORWARD_TYPES:
        for est in LOGP_ESTIMATIONS:
            r = run_authors(fns, model, batch, case_options(ft), est, 1.5, 0.5, SEED, True)
            fx["masks"][ft] = [["".join(str(int(x)) for x in row) for row in kb] for kb in r["masked"].tolist()]
            case = {"terms": [float(f"{v:.15g}") for v in r["terms"].tolist()],
                    "loss": float(f"{float(r['loss']):.15g}"),
                    "grad_sketch": [float(f"{v:.13g}") for v in grad_sketch(r["grad"]).tolist()]}
            if (ft, est) == ("block_random", "mix"):  # the published configuration: the whole gradient
                case["grad"] = [float(f"{v:.13g}") for v in r["grad"].tolist()]
            fx["cases"][f"{ft}/{est}"] = case
    Path(out_path).write_text(json.dumps(fx, separators=(",", ":")) + "\n")

