"""Reference check of rl/objectives/espo.py against the ESPO authors' code (github.com/ML-GSAI/ESPO).

The authors' ``forward_process``, ``compute_approx_kl`` and ``ESPOTrainer`` methods ``compute_loss``,
``get_logits``, ``_get_elbo``, ``_get_elbo_mc`` and ``_get_elbo_by_chunk`` are read from the local
checkout (``ast``; ``trl`` is not needed) and run on a stub ``self``, in float64 (the default dtype
is float64 while their code runs, so their ``p_mask`` and ELBO buffers are float64). Their masks
come from their own seeded ``forward_process`` (recorded as it runs) and are handed to ours as a
``MaskSample`` (rl.objectives.espo.espo_sample), so randomness does not enter the comparison.

Compared, on a float64 toy denoiser (3 rows of 3 prompt + 6 completion tokens, EOS padding in two
rows, num_mc = 2, 2 iterations, the 2nd one checked so the old terms come from their buffer):
the ELBO of the current, old and reference models (their ``_get_elbo_mc`` / ``_get_elbo_by_chunk``),
the ELBO without the complementary pass (``reduce_var=False``), the loss of ``compute_loss``
(clipping with epsilon_low != epsilon_high, k2 KL, beta > 0) against ours aggregated with
``loss_type="grpo"``, its gradient w.r.t. every model parameter, and ``compute_approx_kl``'s
k1 / k2 / k3 values and gradients.

    .venv/bin/python scripts/check_objectives_reference.py --refs /tmp/refs --only espo [--write-fixtures]
"""

from __future__ import annotations

import ast
import contextlib
import json
import pathlib
import random
import sys
import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "objectives" / "espo.json"
V, MASK, EOS = 8, 7, 6  # toy vocabulary: 0..6 (6 = EOS), 7 = mask
P, L, B = 3, 6, 3
NUM_MC, NUM_ITER, ITR = 2, 2, 1
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.05
RTOL = 1e-6  # relative, float64 (our MaskSample weights are float32: ~1e-8)


class ToyDenoiser(torch.nn.Module):
    """A bidirectional masked-token predictor small enough to record: every position mixes every
    other position's (token + position) embedding, ``logits = tanh(mix @ h) @ out + bias``.
    ``attention_mask`` (if given) zeroes the masked-out keys."""

    def __init__(self, seed: int = 0, vocab: int = V, width: int = P + L, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=f64))
        self.pos = torch.nn.Parameter(torch.randn(width, dim, generator=g, dtype=f64))
        self.mix = torch.nn.Parameter(0.7 * torch.randn(width, width, generator=g, dtype=f64))
        self.out = torch.nn.Parameter(1.5 * torch.randn(dim, vocab, generator=g, dtype=f64))
        self.bias = torch.nn.Parameter(0.3 * torch.randn(vocab, generator=g, dtype=f64))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        t = ids.shape[1]
        h = self.emb[ids] + self.pos[:t]
        mix = self.mix[:t, :t].expand(ids.shape[0], t, t)
        if attention_mask is not None:
            mix = mix * attention_mask[:, None, :t].to(mix.dtype)
        return SimpleNamespace(logits=torch.tanh(torch.einsum("nts,nsd->ntd", mix, h)) @ self.out + self.bias)

    def flat(self) -> dict[str, list[float]]:
        return {k: v.detach().reshape(-1).tolist() for k, v in self.named_parameters()}

    def load_flat(self, flat: dict[str, list[float]]) -> "ToyDenoiser":
        with torch.no_grad():
            for k, v in self.named_parameters():
                v.copy_(torch.tensor(flat[k], dtype=v.dtype).view_as(v))
        return self


def perturbed(model: ToyDenoiser, seed: int, scale: float) -> ToyDenoiser:
    g = torch.Generator().manual_seed(seed)
    other = ToyDenoiser()
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
            b.copy_(a + scale * torch.randn(a.shape, generator=g, dtype=a.dtype))
    return other


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, P+L]`` (no prompt padding: the authors' forward passes no attention mask)
    and ``completion_mask [B, L]`` (rows 1 and 2 end early, EOS padding after)."""
    prompt = torch.tensor([[1, 2, 0], [3, 0, 1], [2, 2, 4]])
    completion = torch.tensor([[1, 2, 3, 1, 5, 0], [2, 1, EOS, EOS, EOS, EOS], [3, 4, 0, EOS, EOS, EOS]])
    is_eos = completion == EOS
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((B,), L))
    completion_mask = (torch.arange(L)[None] <= first[:, None]).long()
    return torch.cat([prompt, completion], 1), completion_mask


# ------------------------------------------------------------------ the authors' code, loaded

METHODS = ("compute_loss", "get_logits", "_get_elbo", "_get_elbo_mc", "_get_elbo_by_chunk")
FUNCTIONS = ("forward_process", "compute_approx_kl")


def trainer_file(repo: pathlib.Path) -> pathlib.Path:
    """``repo`` may be the ESPO checkout or the folder holding it (``--refs /tmp/refs``)."""
    for cand in (repo / "espo" / "espo_trainer.py", repo / "ESPO" / "espo" / "espo_trainer.py"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"espo/espo_trainer.py not found under {repo} (the ML-GSAI/ESPO checkout)")


def _nanmin(t: torch.Tensor) -> torch.Tensor:  # trl.trainer.grpo_trainer.nanmin
    return torch.min(t[~torch.isnan(t)]) if (~torch.isnan(t)).any() else torch.tensor(float("nan"))


def _nanmax(t: torch.Tensor) -> torch.Tensor:
    return torch.max(t[~torch.isnan(t)]) if (~torch.isnan(t)).any() else torch.tensor(float("nan"))


def load_authors(repo: pathlib.Path) -> dict:
    """Their functions and methods (decorators stripped), exec'd in one namespace."""
    from accelerate.utils import set_seed

    tree = ast.parse(trainer_file(repo).read_text())
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in FUNCTIONS]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ESPOTrainer")
    nodes += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in METHODS]
    for n in nodes:
        n.decorator_list = []
    missing = set(FUNCTIONS + METHODS) - {n.name for n in nodes}
    if missing:
        raise RuntimeError(f"authors' code lacks {sorted(missing)}")
    ns = {"torch": torch, "F": torch.nn.functional, "set_seed": set_seed, "nanmin": _nanmin, "nanmax": _nanmax,
          "np": __import__("numpy")}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(trainer_file(repo)), "exec"), ns)
    ns["Trainer"] = type("AuthorsESPOTrainer", (), {m: ns[m] for m in METHODS})
    return ns


def authors_self(ns: dict, step: int):
    """A stub ``self`` with what their methods read (TRL's ``epsilon_low``/``epsilon_high``)."""
    me = ns["Trainer"]()
    me.args = SimpleNamespace(num_iterations=NUM_ITER, gradient_accumulation_steps=1, fp16=False)
    me.num_iterations, me.num_mc, me.beta = NUM_ITER, NUM_MC, BETA
    me.epsilon_low, me.epsilon_high = EPS_LOW, EPS_HIGH
    me.processing_class = SimpleNamespace(mask_token_id=MASK)
    me.model = SimpleNamespace(config=SimpleNamespace(name_or_path="GSAI-ML/LLaDA-toy"))
    me.control = SimpleNamespace(should_evaluate=False)
    me.accelerator = SimpleNamespace(gather_for_metrics=lambda x: x)
    me._metrics = defaultdict(lambda: defaultdict(list))
    me._step = step
    return me


@contextlib.contextmanager
def authors_env():
    """float64 default dtype, warnings quiet, and the global RNGs their ``set_seed`` reseeds restored."""
    import numpy as np

    py, npy, dtype = random.getstate(), np.random.get_state(), torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)
            random.setstate(py)
            np.random.set_state(npy)


def run_authors(repo: pathlib.Path) -> dict:
    """Everything the comparison needs, from the authors' code."""
    ns = load_authors(repo)
    calls: list[torch.Tensor] = []
    original = ns["forward_process"]

    def recording(batch, prompt_index, mask_id, seed=None):
        noisy, p_mask = original(batch, prompt_index, mask_id, seed=seed)
        calls.append((noisy[:, -L:] == mask_id).clone())
        return noisy, p_mask

    ns["forward_process"] = recording
    model = ToyDenoiser(seed=0)
    old, ref = perturbed(model, 1, 0.15), perturbed(model, 2, 0.1)
    input_ids, completion_mask = toy_batch()
    seeds = torch.tensor([[[11, 12], [21, 22]]])  # [grad_accum=1, num_iterations, num_mc]
    adv = torch.tensor([-1.0, 0.5, 1.25], dtype=torch.float64)  # ratios ~.48, 1.10, 1.32: clip, not, clip
    out: dict = {}
    with authors_env():
        me = authors_self(ns, step=ITR + 1)  # this_itr_idx = ITR
        expanded = input_ids.unsqueeze(0).expand(NUM_ITER, -1, -1)
        with torch.no_grad():
            calls.clear()
            old_elbo = me._get_elbo_by_chunk(old, expanded, L, seeds, "cpu")  # [B, num_iterations]
            old_masks = [c for c in calls]
            calls.clear()
            ref_elbo = me._get_elbo_by_chunk(ref, expanded, L, seeds, "cpu")
        inputs = {"prompt_ids": input_ids[:, :P], "completion_ids": input_ids[:, P:], "mask_seeds": seeds,
                  "advantages": adv, "old_per_token_logps": old_elbo, "ref_per_token_logps": ref_elbo}
        elbo_seen = []
        mc = me._get_elbo_mc
        me._get_elbo_mc = lambda *a, **k: elbo_seen.append(mc(*a, **k)) or elbo_seen[-1]
        calls.clear()
        loss = me.compute_loss(model, inputs)
        masks = torch.stack([c for c in calls])  # [num_mc, B, L], iteration ITR
        loss.backward()
        grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            no_rv = mc(model, input_ids.unsqueeze(0), L, seeds[0][ITR:ITR + 1], reduce_var=False, num_mc=NUM_MC)
        # their masks of iteration ITR for old/ref were the same seeds: check they coincide
        same = all(torch.equal(old_masks[NUM_MC * ITR + k], masks[k]) for k in range(NUM_MC))
        kl_in = (torch.tensor([-20.0, -14.5, -31.0, -9.0], dtype=torch.float64),
                 torch.tensor([-18.5, -15.0, -28.0, -9.0], dtype=torch.float64))
        kl = {}
        for name in ("k1", "k2", "k3"):
            lp = kl_in[0].clone().requires_grad_(True)
            val = ns["compute_approx_kl"](lp, kl_in[1], name)
            val.sum().backward()
            kl[name] = {"value": val.detach().tolist(), "grad": lp.grad.tolist()}
    out.update(
        model=model.flat(), old_model=old.flat(), ref_model=ref.flat(),
        input_ids=input_ids.tolist(), completion_mask=completion_mask.tolist(), advantages=adv.tolist(),
        masks=masks.long().tolist(), masks_same_for_old_and_ref=bool(same),
        elbo=elbo_seen[0][:, 0].tolist(), old_elbo=old_elbo[:, ITR].tolist(), ref_elbo=ref_elbo[:, ITR].tolist(),
        elbo_no_reduce_var=no_rv[:, 0].tolist(), loss=float(loss.detach()),
        grad={k: v.reshape(-1).tolist() for k, v in grads.items()},
        metrics={k: v[-1] for k, v in me._metrics["train"].items()},
        kl_inputs=[t.tolist() for t in kl_in], kl=kl,
        config=dict(V=V, MASK=MASK, EOS=EOS, P=P, L=L, B=B, num_mc=NUM_MC, num_iterations=NUM_ITER, itr=ITR,
                    epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA, seeds=seeds.tolist()),
    )
    return out


# ------------------------------------------------------------------ ours, on the recorded inputs

def run_ours(rec: dict) -> dict:
    """Our estimator terms, loss (aggregated as the trainer does) and gradient on ``rec``'s inputs."""
    from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
    from rl.estimators import get_estimator
    from rl.objectives.base import PolicyLossInputs, get_objective
    from rl.objectives.espo import approx_kl, espo_sample

    c = rec["config"]
    input_ids = torch.tensor(rec["input_ids"])
    cmask = torch.tensor(rec["completion_mask"])
    first = torch.tensor(rec["masks"]).bool()  # [num_mc, B, L]
    attn = torch.ones_like(input_ids)
    # the old/reference ELBOs: ours on the old/reference models when the record has them (check()),
    # else the authors' recorded ones, which their compute_loss also reads from its inputs (fixture)
    models = {k: ToyDenoiser().load_flat(rec[k]) for k in ("model", "old_model", "ref_model") if k in rec}
    scope = torch.ones_like(cmask).bool()  # full_width: the authors score every completion position
    out: dict = {}
    for reduce_var in (True, False):
        est = get_estimator("espo", n_samples=c["num_mc"], reduce_var=reduce_var)
        sample = espo_sample(first, scope, c["P"], reduce_var)
        obj = get_objective("espo")
        terms = {}
        for k, m in models.items():
            with torch.set_grad_enabled(k == "model" and reduce_var):
                per_pass = est.score(m, input_ids, attn, c["P"], sample, c["MASK"])
                terms[k] = obj.terms(est, sample, per_pass, cmask, {})
        if not reduce_var:
            out["elbo_no_reduce_var"] = terms["model"].detach()
            continue
        out["elbo"] = terms["model"].detach()
        for k in ("old", "ref"):
            out[f"{k}_elbo"] = terms.get(f"{k}_model", torch.tensor(rec[f"{k}_elbo"], dtype=torch.float64))
        res = obj.loss(PolicyLossInputs(
            logp=terms["model"], old_logp=out["old_elbo"], ref_logp=out["ref_elbo"],
            advantages=torch.tensor(rec["advantages"], dtype=torch.float64), mask=cmask.float(),
            epsilon=c["epsilon_low"], epsilon_high=c["epsilon_high"], beta=c["beta"]))
        counts = BatchCounts(tokens=float(cmask.sum()), rows=float(cmask.shape[0]), max_len=cmask.shape[1],
                             num_micro=1)
        w = LOSS_TYPES["grpo"](cmask.float(), counts).to(torch.float64)
        loss = (per_token(res.loss, w) * w).sum()
        loss.backward()
        out["loss"] = loss.detach()
        out["clipped"] = res.clipped
        out["kl_metric"] = (per_token(res.kl, w) * w).sum().detach()
        out["grad"] = {k: v.grad.detach().reshape(-1) for k, v in models["model"].named_parameters()}
    lp, rp = (torch.tensor(t, dtype=torch.float64) for t in rec["kl_inputs"])
    out["kl"] = {}
    for name in ("k1", "k2", "k3"):
        x = lp.clone().requires_grad_(True)
        val = approx_kl(x, rp, name)
        val.sum().backward()
        out["kl"][name] = {"value": val.detach(), "grad": x.grad}
    return out


def compare(rec: dict, ours: dict) -> list[tuple[str, float, bool]]:
    """Rows (what, max abs diff, ok) for ours vs the recorded authors' numbers."""
    rows = []

    def row(what: str, a, b) -> None:
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
        b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
        rows.append((what, diff, a.shape == b.shape and diff <= RTOL * scale))

    row("ELBO current model (_get_elbo_mc, reduce_var, num_mc=2)", ours["elbo"], rec["elbo"])
    if "old_model" in rec:
        row("ELBO old model (_get_elbo_by_chunk, same masks)", ours["old_elbo"], rec["old_elbo"])
        row("ELBO reference model (_get_elbo_by_chunk)", ours["ref_elbo"], rec["ref_elbo"])
    row("ELBO reduce_var=False (_get_elbo_mc)", ours["elbo_no_reduce_var"], rec["elbo_no_reduce_var"])
    row("loss (compute_loss: clip 0.2/0.28, k2 KL, beta=0.05)", ours["loss"], rec["loss"])
    grad_ours = torch.cat([ours["grad"][k] for k in sorted(rec["grad"])])
    grad_ref = torch.cat([torch.tensor(rec["grad"][k], dtype=torch.float64) for k in sorted(rec["grad"])])
    row(f"loss gradient w.r.t. {grad_ref.numel()} model parameters", grad_ours, grad_ref)
    row("kl metric (their mean_kl)", ours["kl_metric"], rec["metrics"]["kl"])
    row("clip fraction (their clip_ratio/region_mean)", ours["clipped"].double().mean(),
        rec["metrics"]["clip_ratio/region_mean"])
    for name in ("k1", "k2", "k3"):
        row(f"compute_approx_kl {name}: value", ours["kl"][name]["value"], rec["kl"][name]["value"])
        row(f"compute_approx_kl {name}: gradient", ours["kl"][name]["grad"], rec["kl"][name]["grad"])
    rows.append(("their old/ref masks equal their current masks (same seeds)", 0.0,
                 bool(rec["masks_same_for_old_and_ref"])))
    return rows


def check(repo: pathlib.Path) -> list[tuple[str, float, bool]]:
    rec = run_authors(pathlib.Path(repo))
    rows = compare(rec, run_ours(rec))
    clip = rec["metrics"]["clip_ratio/region_mean"]
    rows.append(("the case clips some rows and not others (clip fraction in (0, 1))", 0.0, 0.0 < clip < 1.0))
    return rows


def record(repo: pathlib.Path, out_path: pathlib.Path = FIXTURE) -> None:
    rec = run_authors(pathlib.Path(repo))
    for k in ("old_model", "ref_model"):  # the fixture keeps their ELBOs (compute_loss's inputs), not the models
        rec.pop(k)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rec, separators=(",", ":")) + "\n")


# ------------------------------------------------------------------ quirks, measured (for the report)

def quirks(repo: pathlib.Path) -> list[tuple[str, float]]:
    """Numbers for the differences from the authors' code that do not enter ``check``."""
    import itertools

    out = []
    # 1. their stratified count: round-half-to-even at exact .5 offsets makes a row's count non-uniform
    for b, width in ((2, 4), (2, 256), (3, 256)):
        counts = torch.zeros(b, width + 1)
        for k in range(width + 1):
            x = torch.round(torch.linspace(float(k), k + (b - 1) * ((width + 1) / b), steps=b)).long() % (width + 1)
            counts[torch.arange(b), x] += 1
        tv = float((counts / (width + 1) - 1 / (width + 1)).abs().sum(-1).max() / 2)
        out.append((f"authors' count law, B={b} rows, N={width}: max total-variation distance from U{{0..N}}", tv))
    # 2. the resulting bias of their row-1 estimate on the toy model (B=2, N=4), exact by enumeration
    model = ToyDenoiser(seed=0, width=2 + 4)
    ids = torch.tensor([[1, 2, 3, 1, 2, 0]])
    subsets = [frozenset(c) for r in range(5) for c in itertools.combinations(range(4), r)]
    noisy = ids.repeat(len(subsets), 1)
    for i, m in enumerate(subsets):
        noisy[i, [2 + j for j in m]] = MASK
    with torch.no_grad():
        lp = torch.log_softmax(model(noisy).logits, -1)[:, 2:].gather(-1, ids[:, 2:].expand(len(subsets), 4)[..., None])
    s = {m: float(sum(lp[i, j, 0] for j in m)) for i, m in enumerate(subsets)}
    full = frozenset(range(4))

    def pair(x: int) -> float:  # E over masks of size x of (A + A') / 2
        ms = [m for m in subsets if len(m) == x]
        a = sum(s[m] for m in ms) / len(ms) * (5 / x) if x else 0.0
        ac = sum(s[full - m] for m in ms) / len(ms) * (5 / (4 - x)) if x < 4 else 0.0
        return (a + ac) / 2

    def single(x: int) -> float:  # E over masks of size x of A (reduce_var=False)
        ms = [m for m in subsets if len(m) == x]
        return sum(s[m] for m in ms) / len(ms) * (5 / x) if x else 0.0

    theirs = [int(torch.round(torch.tensor(k + 2.5)).item()) % 5 for k in range(5)]
    elbo = sum(pair(x) for x in range(5)) / 5
    out.append(("toy ELBO (N=4), exact", elbo))
    out.append((f"authors' row-1 law at B=2, N=4 (counts {theirs}), reduce_var=True: bias (nats)",
                sum(pair(x) for x in theirs) / 5 - elbo))
    out.append(("  same, reduce_var=False (their flag is never read, so never run): bias (nats)",
                sum(single(x) for x in theirs) / 5 - elbo))
    # 3. their forward passes carry no attention mask: the ELBO of a left-padded prompt differs
    ids = torch.tensor([[0, 0, 2, 1, 2, 3, 1, 5, 0, 4]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    model = ToyDenoiser(seed=0, width=10)
    m = torch.zeros_like(ids).bool()
    m[0, 5:8] = True
    noisy = torch.where(m, MASK, ids)
    with torch.no_grad():
        a = torch.log_softmax(model(noisy).logits, -1)[0, 5:8].gather(-1, ids[0, 5:8, None]).sum()
        b = torch.log_softmax(model(noisy, attn).logits, -1)[0, 5:8].gather(-1, ids[0, 5:8, None]).sum()
    out.append(("padded prompt: |sum log p without - with attention mask| (one pass, 3 masked)", abs(float(a - b))))
    return out

