"""Reference check of TraceRL (rl/objectives/trajectory.py) against the authors' code (Gen-Verse/dLLM-RL).

The authors' functions are read from train/rl_llada.py at runtime (``ast``): ``collapse_k_unique``,
``prepare_inputs_and_labels_for_text`` (method "TraceRL"), ``compute_logp_old_tok_parallel``,
``simple_collate`` and ``forward_process`` (nested in their ``main``) and the ``TrainDataset`` class;
they run with a stub ``config`` (configs/rl_llada.yaml's training values), a stub ``uni_prompting``
that hands back our token ids (prompt then response, no padding) and the same fp64 tiny model as ours
(mask token never predicted, EOS favoured). Their step map is our rollout's ``unmask_step``.

Two traces: (a) our sampler's (more steps than tokens per block, so each block has idle steps;
every completion without EOS: every row has the same number of trace steps) and (b) random traces
(uneven trace steps per row, EOS-terminated completions). Their response padding token is our EOS
with ``post_num = 1`` and every token after the first EOS is EOS: their scored tokens are then
exactly our completion mask.

Their old log-probs are stored in float32 (``TrainDataset.logp_old_tok``); our loss rows are fed
our old terms rounded the same way, and one row shows what the rounding changes.

    .venv/bin/python scripts/check_objectives_reference.py --refs /tmp/refs --only tracerl [--write-fixtures]
"""

from __future__ import annotations

import pathlib
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ._authors import checkout_path, main_functions, write_fixture

SOURCE = "train/rl_llada.py"
NESTED = ("collapse_k_unique", "prepare_inputs_and_labels_for_text", "compute_logp_old_tok_parallel",
          "simple_collate", "forward_process")

MODEL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
SEEDS = {"policy": 0, "old": 1}  # the policy and the rollout policy (their logp_old_tok)
EOS_BIAS = 2.5
B, PROMPT_LEN, GEN_LENGTH, BLOCK_LENGTH, STEPS = 4, 5, 12, 4, 24
ADVANTAGES = [1.0, -0.5, 0.25, -0.75]
EPS, BETA = 0.20, 0.01  # configs/rl_llada.yaml training.eps / training.beta (use_kl_estimator_k3: True)
BATCH_SIZE_LM = 2  # configs/rl_llada.yaml training.batch_size_lm (their old-log-prob pass)
SCENARIOS = (("a", 1), ("a", 5), ("b", 3))  # (trace, shrink)
RECORD = ("b", 3)
FIXTURE_PARAMS = 6


def authors_namespace(repo: pathlib.Path, *, shrink: int, mask_id: int, pad_id: int) -> dict:
    """The authors' functions exec'd into one namespace: ``config`` / ``uni_prompting`` / ``model`` stubs
    stand for what their ``main`` closes over (set ``ns["model"]`` before calling)."""
    path = checkout_path(repo, SOURCE, "dLLM-RL")
    training = types.SimpleNamespace(method="TraceRL", shrink=shrink, post_num=1, max_gen_length=GEN_LENGTH,
                                     lower_p=0.1, upper_p=0.9, mask_times_per_sample=35, eps=EPS, beta=BETA,
                                     use_kl_estimator_k3=True)

    def uni_prompting(pair):  # their UniversalPrompting on already-tokenised, unpadded rows
        prompt, response = pair
        ids = torch.cat([prompt, response], dim=1)
        return ids, ids.clone(), prompt.shape[1], 0

    ns = {"torch": torch, "F": F, "np": np, "Dataset": Dataset, "config": types.SimpleNamespace(training=training),
          "uni_prompting": uni_prompting, "mask_id": mask_id, "pad_id": pad_id, "model": None}
    return main_functions(path, NESTED, ns)


# ---- the shared model --------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    """The tiny model with the mask token's logit at -1e4 (never sampled) and ``eos_bias`` on EOS."""

    def __init__(self, inner, mask_id: int, eos_id: int, eos_bias: float):
        super().__init__()
        self.inner = inner
        bias = torch.zeros(inner.config.vocab_size, dtype=torch.float64)
        bias[mask_id], bias[eos_id] = -1e4, eos_bias
        self.register_buffer("bias", bias)

    def forward(self, input_ids, attention_mask=None, **_):
        logits = self.inner(input_ids, attention_mask=attention_mask).logits
        return types.SimpleNamespace(logits=logits + self.bias.to(logits.dtype))


def build_models() -> tuple[object, dict[str, TinyLM]]:
    from rollout.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    models = {k: TinyLM(build_tiny_model(tok, seed=s, **MODEL), tok.mask_token_id, tok.eos_token_id,
                        EOS_BIAS).double().eval() for k, s in SEEDS.items()}
    return tok, models


def build_inputs(tok, models: dict, which: str) -> dict[str, torch.Tensor]:
    """Prompt + completion ids, the trace and the completion mask of scenario ``which``."""
    from rollout import generate
    from rollout.types import completion_mask_from_eos

    g = torch.Generator().manual_seed(1234)
    lo = len(tok.all_special_tokens) + 1
    prompt = torch.randint(lo, len(tok), (B, PROMPT_LEN), generator=g)
    ro = generate(models["old"], prompt, steps=STEPS, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH,
                  temperature=1.0, mask_id=tok.mask_token_id, eos_id=tok.eos_token_id,
                  generator=torch.Generator().manual_seed(3))
    comp, trace = ro.completion_ids.clone(), ro.unmask_step.clone()
    eos = tok.eos_token_id
    if which == "a":  # no EOS: every row has all its trace steps scored
        comp[comp == eos] = lo
    else:  # EOS-terminated, EOS after; random traces with uneven numbers of distinct steps
        lengths = [3, 12, 7, 1]
        for i, n in enumerate(lengths):
            comp[i, n - 1:] = eos if n < GEN_LENGTH else comp[i, n - 1:]
        comp[completion_mask_from_eos(comp, eos) == 0] = eos  # EOS after the first EOS (their padding)
        trace = torch.randint(0, 40, (B, GEN_LENGTH), generator=g)
        trace[1] = torch.randint(0, 6, (GEN_LENGTH,), generator=g)  # many tokens per step
    cmask = completion_mask_from_eos(comp, eos)
    return {"ids": torch.cat([prompt, comp], 1), "trace": trace, "completion_mask": cmask}


# ---- the authors' side ---------------------------------------------------------------------------------
def authors_run(ns: dict, models: dict, inp: dict, adv: list[float]) -> dict:
    """Their rows (prepare_inputs_and_labels_for_text), old log-probs (compute_logp_old_tok_parallel
    with the rollout policy, float32 storage), the loss of their forward_process on all rows at once
    (= one optimizer step over these rows) with its gradient, and each row's loss alone."""
    ids, P = inp["ids"], PROMPT_LEN
    with torch.no_grad():  # their @torch.no_grad()
        noisy, labels, p_mask, rewards, start_pos, _ = ns["prepare_inputs_and_labels_for_text"](
            ids[:, :P], ids[:, P:], inp["trace"].tolist(), adv)
    assert start_pos == P
    dataset = ns["TrainDataset"](noisy, labels, p_mask, rewards)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE_LM, collate_fn=ns["simple_collate"])
    accel = types.SimpleNamespace(device=torch.device("cpu"), wait_for_everyone=lambda: None)

    def logps_under(model) -> torch.Tensor:
        ns["model"] = model
        with torch.no_grad():  # their @torch.no_grad() (decorators are not exec'd)
            ns["compute_logp_old_tok_parallel"](accel, dataset, loader, start_pos=P, pad_id=ns["pad_id"],
                                                batch_size=BATCH_SIZE_LM)
        model.eval()
        out = dataset.logp_old_tok.clone()
        dataset.logp_old_tok.fill_(float("-inf"))
        return out

    policy_lp = logps_under(models["policy"])
    old = logps_under(models["old"])
    dataset.logp_old_tok.copy_(old)
    policy = models["policy"]
    ns["model"] = policy
    policy.zero_grad(set_to_none=True)
    loss = ns["forward_process"](noisy, labels, p_mask, rewards, dataset.logp_old_tok)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    with torch.no_grad():
        per_row = torch.stack([ns["forward_process"](noisy[r:r + 1], labels[r:r + 1], p_mask[r:r + 1], rewards[r:r + 1],
                                                     dataset.logp_old_tok[r:r + 1]) for r in range(noisy.shape[0])])
    return {"noisy": noisy, "p_mask": p_mask, "old": old, "policy": policy_lp, "loss": loss.detach(),
            "grads": grads, "per_row": per_row}


# ---- our side ---------------------------------------------------------------------------------------------
def our_run(models: dict, inp: dict, adv: list[float], shrink: int, mask_id: int, *, old_float32: bool = True) -> dict:
    """Our tracerl estimator and objective as rl/grpo.py runs them (one micro-batch, a rollout policy
    that differs from the policy): returns the sample, per-token terms, per-token loss and two
    aggregates of it with their gradients: the trainer's (``seq_mean_token_sum``) and the authors'
    (their rows = our (completion, trace step) passes: sum over passes / number of passes)."""
    from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
    from rl.objectives.base import PolicyLossInputs
    from rl.objectives.trajectory import TraceRL, TraceRLTrace

    ids, cmask = inp["ids"], inp["completion_mask"]
    est, obj = TraceRLTrace(shrink=shrink), TraceRL(shrink=shrink, beta_old=BETA, use_kl_estimator_k3=True)
    sample = est.draw(None, cmask, PROMPT_LEN, None, trace=inp["trace"])
    with torch.no_grad():
        old = obj.terms(est, sample, est.score(models["old"], ids, None, PROMPT_LEN, sample, mask_id), cmask, {})
    old_in = old.float().double() if old_float32 else old
    m = cmask.double()
    nonempty = (sample.weights != 0).any(-1)  # [K, n]: the authors' rows are our non-empty passes
    n_passes, rows_of = nonempty.sum(), nonempty.sum(0).double()  # R, P_i
    out = {"sample": sample, "old": old}
    for agg in ("trainer", "authors"):
        policy = models["policy"]
        policy.zero_grad(set_to_none=True)
        logp = obj.terms(est, sample, est.score(policy, ids, None, PROMPT_LEN, sample, mask_id), cmask, {})
        res = obj.loss(PolicyLossInputs(logp=logp, old_logp=old_in, ref_logp=None, advantages=torch.tensor(adv,
                       dtype=torch.float64), mask=m, epsilon=EPS, beta=0.0, sample=sample))
        if agg == "trainer":
            w = LOSS_TYPES[obj.default_loss_type("token")](m, BatchCounts(tokens=float(m.sum()), rows=float(B),
                                                                          max_len=GEN_LENGTH, num_micro=1))
            loss = (per_token(res.loss, w) * w).sum()
        else:
            loss = (res.loss * m * rows_of.unsqueeze(-1)).sum() / n_passes
        loss.backward()
        out[agg] = (loss.detach(), {n: p.grad.detach().clone() for n, p in policy.named_parameters()
                                    if p.grad is not None})
        out["policy"], out["loss_el"] = logp.detach(), res.loss.detach()
    out["rows_of"], out["n_passes"] = rows_of, n_passes
    return out


def pass_list(sample) -> list[tuple[int, int]]:
    """Our (row, pass) pairs that score something, in the authors' row order (row-major, steps ascending)."""
    scored = (sample.weights != 0).any(-1)  # [K, n]
    return [(b, k) for b in range(scored.shape[1]) for k in range(scored.shape[0]) if bool(scored[k, b])]


def to_rows(values: torch.Tensor, sample, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Our per-token ``[n, L]`` values laid out as the authors' rows ``[R, L]`` (0 off each row's scored tokens)."""
    return torch.stack([values[b] * (sample.weights[k, b] != 0) for b, k in pairs])


def _grad_diff(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a), max(float(a[k].abs().max()) for k in a)


def run(repo: pathlib.Path) -> tuple[list[tuple[str, float, bool]], dict]:
    from rl.masking import apply_mask

    tok, models = build_models()
    mask_id, eos_id = tok.mask_token_id, tok.eos_token_id
    rows: list[tuple[str, float, bool]] = []
    record: dict = {}
    for which, shrink in SCENARIOS:
        tag = f"trace ({which}) shrink={shrink}"
        inp = build_inputs(tok, models, which)
        ns = authors_namespace(repo, shrink=shrink, mask_id=mask_id, pad_id=eos_id)
        theirs = authors_run(ns, models, inp, ADVANTAGES)
        ours = our_run(models, inp, ADVANTAGES, shrink, mask_id)
        sample, P = ours["sample"], PROMPT_LEN
        pairs = pass_list(sample)
        # the passes: same rows, same masked inputs, same scored tokens
        same_n = len(pairs) == theirs["noisy"].shape[0]
        bad = 0 if same_n else 10 ** 6
        if same_n:
            ours_noisy = torch.stack([apply_mask(inp["ids"][b], sample.masked[k, b], mask_id) for b, k in pairs])
            ours_pm = torch.stack([torch.cat([torch.zeros(P, dtype=torch.bool), sample.weights[k, b] != 0])
                                   for b, k in pairs])
            bad = int((ours_noisy != theirs["noisy"]).sum() + (ours_pm != theirs["p_mask"]).sum())
        rows.append((f"{tag}: {len(pairs)} passes, masked inputs and scored sets (mismatches)", float(bad), bad == 0))
        pm = theirs["p_mask"][:, P:]
        for what, key in (("old", "old"), ("policy", "policy")):
            d = float((to_rows(ours[key], sample, pairs) - theirs[key][:, P:].double())[pm].abs().max())
            rows.append((f"{tag}: {what} per-token log-probs (theirs stored in float32)", d, d <= 1e-6))
        # each row's loss: ours per token times P_i (undoing the per-completion mean), summed over the pass
        ours_rows = to_rows(ours["loss_el"] * ours["rows_of"].unsqueeze(-1), sample, pairs).sum(-1)
        d = float((ours_rows - theirs["per_row"]).abs().max())
        rows.append((f"{tag}: per-pass loss (token-mean surrogate + beta * token-sum k3 to old)", d, d <= 1e-12))
        a_loss, a_grads = theirs["loss"], theirs["grads"]
        o_loss, o_grads = ours["authors"]
        d = abs(float(a_loss - o_loss))
        rows.append((f"{tag}: loss, their normalisation (mean over passes)", d,
                     d <= 1e-12 * max(1.0, abs(float(a_loss)))))
        gd, gs = _grad_diff(a_grads, o_grads)
        rows.append((f"{tag}: gradient, their normalisation (max |grad| {gs:.2e})", gd, gd <= 1e-12 * max(1.0, gs)))
        t_loss, t_grads = ours["trainer"]
        equal_steps = bool((ours["rows_of"] == ours["rows_of"][0]).all())
        d = abs(float(a_loss - t_loss))
        gd, gs = _grad_diff(a_grads, t_grads)
        if equal_steps:
            rows.append((f"{tag}: loss, trainer's seq_mean_token_sum (every row {int(ours['rows_of'][0])} steps)", d,
                         d <= 1e-12 * max(1.0, abs(float(a_loss)))))
            rows.append((f"{tag}: gradient, trainer's seq_mean_token_sum", gd, gd <= 1e-12 * max(1.0, gs)))
        else:
            steps = [int(v) for v in ours["rows_of"]]
            rows.append((f"{tag}: loss, trainer's per-completion mean vs theirs (steps per row {steps}; "
                         f"theirs {float(a_loss):.6f}, ours {float(t_loss):.6f}) [documented difference]", d, True))
        fp64_old = our_run(models, inp, ADVANTAGES, shrink, mask_id, old_float32=False)["authors"][0]
        d = abs(float(a_loss - fp64_old))
        rows.append((f"{tag}: loss with our float64 old log-probs vs their float32 storage [shown]", d, True))
        if (which, shrink) == RECORD:
            names = sorted(a_grads)[:FIXTURE_PARAMS]
            record = {
                "about": "TraceRL reference numbers (scripts/objective_refs/tracerl.py): the authors' code on "
                         "these inputs",
                "model": {**MODEL, "seeds": SEEDS, "eos_bias": EOS_BIAS},
                "shrink": shrink, "epsilon": EPS, "beta_old": BETA, "prompt_len": P,
                "sequences": inp["ids"].tolist(), "unmask_step": inp["trace"].tolist(),
                "completion_mask": inp["completion_mask"].tolist(), "advantages": ADVANTAGES,
                "authors": {
                    "passes": [list(p) for p in pairs],
                    "old_float32": [[float(v) for v in r] for r in theirs["old"][:, P:] * pm],
                    "per_pass_loss": theirs["per_row"].tolist(), "loss": float(a_loss),
                    "grad_sums": {k: float(a_grads[k].sum()) for k in names},
                    "grad_norm": float(torch.sqrt(sum((g ** 2).sum() for g in a_grads.values()))),
                },
            }
    return rows, record


def check(repo: pathlib.Path) -> list[tuple[str, float, bool]]:
    """(what was compared, max abs diff, ok) rows; ``repo``: the dLLM-RL checkout or a folder holding ``dLLM-RL/``."""
    return run(pathlib.Path(repo))[0]


def record(repo: pathlib.Path, out_path: pathlib.Path) -> None:
    """Write the authors' numbers on the RECORD scenario to ``out_path`` (the test's fixture)."""
    write_fixture(out_path, run(pathlib.Path(repo))[1])
