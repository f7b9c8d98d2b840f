"""Reference check of rl/objectives/wd1.py against the authors' code (xiaohangt/wd1).

The authors' methods are read from their checkout at runtime (``ast``: ``compute_loss``,
``_get_per_token_logps``, ``forward_process``, ``get_logits`` of RevDiffuGRPOTrainer,
RevPSRDiffuGRPOTrainer and RevDiffuRefPolGRPOTrainer; the advantage statements of
``_generate_and_score_completions``) and run on a stub ``self`` (``trl`` is not installed).
Both sides see the same fp64 tiny model, the same inputs, the same advantages and the same masks:
the authors' ``forward_process`` draws each mask (their ``set_seed(seed)``, global RNG, restored
afterwards) and that mask is handed to our estimator as a ``MaskSample``.

Their ``_get_per_token_logps`` casts the log-probs to float32; the fp64 rows run their code with
``torch.float32`` read as float64 (a namespace shim, nothing else changes), one row keeps the cast.

    .venv/bin/python scripts/check_objectives_reference.py --refs /tmp/refs --only wd1 [--write-fixtures]
"""

from __future__ import annotations

import ast
import pathlib
import types

import torch
import torch.nn.functional as F

from ._authors import checkout_path, class_methods, class_nodes, write_fixture

TRAINERS = "wd1/trainers"
MAIN = ("rev_grpo_trainer.py", "RevDiffuGRPOTrainer")  # trainer_type=wll_d1_neg (run/wll_NP_*.sh)
PSR = ("rev_grpo_trainer_psr.py", "RevPSRDiffuGRPOTrainer")  # trainer_type=wll_d1_pos_only (run/wll_P_*.sh)
REF_POL = ("rev_grpo_ref_pol_trainer.py", "RevDiffuRefPolGRPOTrainer")  # wll_d1_neg_ref (no run script)
METHODS = ("compute_loss", "_get_per_token_logps", "forward_process", "get_logits")

G = 3  # completions per prompt
PROMPT_LEN, COMP_LEN = 5, 7
MODEL = dict(seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, 0.25]  # two groups of G
COMP_LENGTHS = [7, 4, 6, 2, 7, 5]  # valid completion tokens (completion_mask)
SEEDS = [11, 23]  # the authors' mask seed of each group's micro-batch
P_MASK_PROMPT = 0.15  # wd1/train.yaml
GRAD_SLICE = 6  # recorded gradient entries per parameter (fixture)


class _Torch64:
    """``torch`` with ``float32`` read as ``float64`` (the authors' final cast kept in fp64)."""

    float32 = torch.float64

    def __getattr__(self, key):
        return getattr(torch, key)


def _set_seed(seed) -> None:
    """What accelerate's set_seed does to torch's CPU generator (the only RNG the masks use)."""
    torch.manual_seed(int(seed))


def authors_trainer(repo: pathlib.Path, which: tuple[str, str], *, fp64: bool = True, mask_id: int,
                    beta: float = 0.0):
    """A stub trainer object carrying the authors' methods of ``which`` = (file, class)."""
    ns = {"torch": _Torch64() if fp64 else torch, "F": F, "set_seed": _set_seed}
    methods = class_methods(checkout_path(repo, f"{TRAINERS}/{which[0]}", "wd1"), which[1], METHODS, ns)
    stub_cls = type(f"Authors{which[1]}", (), methods)
    obj = stub_cls()
    obj.args = types.SimpleNamespace(p_mask_prompt=P_MASK_PROMPT, mask_id=mask_id, cfg_scale=0.0, num_iterations=1)
    obj._step, obj.beta = 0, beta
    return obj


def authors_advantages(repo: pathlib.Path, rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """The advantage statements of the authors' ``_generate_and_score_completions`` (r - group mean, no std)."""
    path = checkout_path(repo, f"{TRAINERS}/{MAIN[0]}", "wd1")
    fn = class_nodes(path, MAIN[1], ("_generate_and_score_completions",))["_generate_and_score_completions"]
    wanted = {"mean_grouped_rewards", "std_grouped_rewards", "advantages"}
    body = []
    for stmt in fn.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id in wanted for t in stmt.targets):
            body.append(stmt)
            if any(isinstance(t, ast.Name) and t.id == "advantages" for t in stmt.targets):
                break
    ns = {"torch": torch, "rewards": rewards, "self": types.SimpleNamespace(num_generations=num_generations)}
    exec(compile(ast.Module(body=body, type_ignores=[]), f"{path}:advantages", "exec"), ns)  # noqa: S102
    return ns["advantages"]


# ---- shared inputs -------------------------------------------------------------------------------
def build_model():
    from rollout.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, **MODEL).double().eval()
    return tok, model


def build_inputs(tok) -> dict[str, torch.Tensor]:
    """Token ids drawn from the printable characters (never the mask id), EOS after the valid tokens."""
    g = torch.Generator().manual_seed(1234)
    n = len(REWARDS)
    lo = len(tok.all_special_tokens) + 1
    ids = torch.randint(lo, len(tok), (n, PROMPT_LEN + COMP_LEN), generator=g)
    cmask = torch.zeros(n, COMP_LEN, dtype=torch.long)
    for i, k in enumerate(COMP_LENGTHS):
        cmask[i, :k] = 1
        ids[i, PROMPT_LEN + k - 1:] = tok.eos_token_id  # the valid span ends with EOS, EOS padding after
    return {"input_ids": ids, "completion_mask": cmask, "rewards": torch.tensor(REWARDS, dtype=torch.float64)}


def authors_masks(trainer, input_ids: torch.Tensor, seeds: list[int], rows_per_seed: int, mask_id: int) -> torch.Tensor:
    """``[1, N, T]`` masks drawn by the authors' ``forward_process`` (one seed per micro-batch)."""
    t = input_ids.shape[1]
    prompt_index = torch.zeros(t, dtype=torch.bool)
    prompt_index[:PROMPT_LEN] = True
    out = []
    with torch.random.fork_rng(devices=[]):
        for k, seed in enumerate(seeds):
            rows = input_ids[k * rows_per_seed:(k + 1) * rows_per_seed]
            noisy, _ = trainer.forward_process(rows, prompt_index, mask_id, seed=seed)
            out.append(noisy == mask_id)
    return torch.cat(out)[None]


def authors_loss(trainer, model, inp: dict, adv: torch.Tensor, seeds: list[int], rows_per_call: int):
    """The authors' step: ``compute_loss`` on each micro-batch of ``rows_per_call`` rows, averaged
    (gradient accumulation / ranks), backward. Returns (loss, seq terms [N], grads)."""
    ids, cmask = inp["input_ids"], inp["completion_mask"]
    n_calls = ids.shape[0] // rows_per_call
    model.zero_grad(set_to_none=True)
    total, seq = 0.0, []
    with torch.random.fork_rng(devices=[]):
        for k in range(n_calls):
            sl = slice(k * rows_per_call, (k + 1) * rows_per_call)
            batch = {"prompt_ids": ids[sl, :PROMPT_LEN], "prompt_mask": torch.ones_like(ids[sl, :PROMPT_LEN]),
                     "completion_ids": ids[sl, PROMPT_LEN:], "completion_mask": cmask[sl], "advantages": adv[sl],
                     "mask_seeds": [seeds[k]]}
            loss = trainer.compute_loss(model, batch)
            (loss / n_calls).backward()
            total += float(loss.detach()) / n_calls
            with torch.no_grad():
                lp = trainer._get_per_token_logps(model, ids[sl][None], COMP_LEN, [seeds[k]])
                seq.append((lp[0] * cmask[sl]).sum(-1))
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, torch.cat(seq), grads


def our_loss(model, inp: dict, adv: torch.Tensor, masked: torch.Tensor, mask_id: int, *, micro_batch: int,
             **options):
    """Ours, the path of rl.grpo.policy_update: prepare -> estimator.score -> terms -> loss ->
    aggregation weights; micro-batches of ``micro_batch`` rows. Returns (loss, seq terms [N], grads)."""
    from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
    from rl.estimators import MaskSample, get_estimator
    from rl.objectives.base import PolicyLossInputs
    from rl.objectives.wd1 import WD1

    obj = WD1(**options)
    est = get_estimator(obj.estimator, **obj.estimator_options)
    ids, cmask = inp["input_ids"], inp["completion_mask"]
    n = ids.shape[0]
    sample = MaskSample(masked, cmask.to(torch.float32)[None].expand(masked.shape[0], -1, -1))
    extra = obj.prepare(adv, inp["rewards"], G)
    chunks = [slice(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]
    counts = BatchCounts(tokens=float(cmask.sum()), rows=float(n), max_len=COMP_LEN, num_micro=len(chunks))
    aggregate = LOSS_TYPES.lookup(obj.default_loss_type(est.level))
    model.zero_grad(set_to_none=True)
    total, seq = 0.0, []
    for sl in chunks:
        sub = MaskSample(sample.masked[:, sl], sample.weights[:, sl])
        logps = est.score(model, ids[sl], None, PROMPT_LEN, sub, mask_id)
        rows = {k: v[sl] for k, v in extra.items()}
        logp = obj.terms(est, sub, logps, cmask[sl], rows)
        out = obj.loss(PolicyLossInputs(logp=logp, old_logp=logp.detach(), ref_logp=None, advantages=adv[sl],
                                        mask=cmask[sl].to(logp.dtype), rows=rows))
        w = aggregate(cmask[sl].to(logp.dtype), counts)
        loss = (per_token(out.loss, w) * w).sum()
        loss.backward()
        total += float(loss.detach())
        seq.append(logp.detach())
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, torch.cat(seq), grads


def _grad_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max abs diff, max abs entry) over every parameter."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    return diff, scale


def _grad_record(grads: dict) -> dict:
    names = sorted(grads)
    norm = float(torch.sqrt(sum((grads[k] ** 2).sum() for k in names)))
    picks = [k for k in names if grads[k].numel() >= GRAD_SLICE][:: max(1, len(names) // 4)][:4]
    return {"norm": norm, "slices": {k: grads[k].flatten()[:GRAD_SLICE].tolist() for k in picks}}


def run(repo: pathlib.Path) -> tuple[list[tuple[str, float, bool]], dict]:
    """Every comparison; returns (rows, fixture record)."""
    tok, model = build_model()
    mask_id = tok.mask_token_id
    inp = build_inputs(tok)
    rows: list[tuple[str, float, bool]] = []
    rel = 1e-9  # fp64 both sides

    def close(x: float, y: float, tol: float = rel) -> tuple[float, bool]:
        d = abs(x - y)
        return d, d <= tol * max(1.0, abs(y))

    # advantages: the authors' statements vs rl.advantages.group (scale_rewards="none")
    from rl.advantages import group_advantages

    adv_a = authors_advantages(repo, inp["rewards"], G)
    adv, _ = group_advantages(inp["rewards"], G, scale_rewards="none")
    d = float((adv - adv_a).abs().max())
    rows.append(("advantages: authors' r - group mean vs rl.advantages.group(none)", d, d <= 1e-12))

    main = authors_trainer(repo, MAIN, mask_id=mask_id)
    record: dict = {"model": MODEL, "prompt_len": PROMPT_LEN, "group_size": G, "input_ids": inp["input_ids"].tolist(),
                    "completion_mask": inp["completion_mask"].tolist(), "rewards": REWARDS,
                    "advantages": adv.tolist(), "seeds": SEEDS, "cases": {}}

    # (1) the authors' configuration: one group per micro-batch (train.yaml: per_device 6 = num_generations 6)
    masked = authors_masks(main, inp["input_ids"], SEEDS, G, mask_id)
    record["masked"] = masked[0].int().tolist()
    psr = authors_trainer(repo, PSR, mask_id=mask_id)
    cases = [  # (fixture key, label, authors' trainer, rows per compute_loss call, seeds, our options, micro-batch)
        ("group", "wll_d1_neg, micro-batch = 1 group vs ours group", main, G, SEEDS,
         dict(softmax_over="group"), G),
        ("micro_batch", "wll_d1_neg, micro-batch = 2 groups vs ours micro_batch", main, 2 * G,
         SEEDS[:1], dict(softmax_over="micro_batch"), 2 * G),
        ("positive_only", "wll_d1_pos_only, micro-batch = 1 group vs ours negative=False", psr, G, SEEDS,
         dict(softmax_over="group", negative=False), G),
    ]
    for key, label, trainer, per_call, seeds, options, micro in cases:
        m = authors_masks(main, inp["input_ids"], seeds, per_call, mask_id)
        a_loss, a_seq, a_grads = authors_loss(trainer, model, inp, adv, seeds, per_call)
        o_loss, o_seq, o_grads = our_loss(model, inp, adv, m, mask_id, micro_batch=micro, **options)
        d_seq = float((a_seq - o_seq).abs().max())
        rows.append((f"{label}: seq terms", d_seq, d_seq <= rel * max(1.0, float(a_seq.abs().max()))))
        rows.append((f"{label}: loss", *close(o_loss, a_loss)))
        gd, gs = _grad_diff(a_grads, o_grads)
        rows.append((f"{label}: grad (|g|<={gs:.2f})", gd, gd <= rel * max(1.0, gs)))
        record["cases"][key] = {"options": options, "micro_batch": micro, "masked": m[0].int().tolist(),
                                "authors_loss": a_loss, "authors_seq": a_seq.tolist(),
                                "authors_grad": _grad_record(a_grads)}

    # (2) the variant with a reference policy: the same loss at beta = 0; at train.yaml's beta = 0.04 it
    #     reads inputs["ref_per_token_logps"], which its _generate_and_score_completions never sets
    ref0 = authors_trainer(repo, REF_POL, mask_id=mask_id, beta=0.0)
    r_loss, _, r_grads = authors_loss(ref0, model, inp, adv, SEEDS, G)
    m_loss, _, m_grads = authors_loss(main, model, inp, adv, SEEDS, G)
    rows.append(("wll_d1_neg_ref beta=0: loss == wll_d1_neg loss (no ref term)",
                 *close(r_loss, m_loss, 0.0)))
    gd, _ = _grad_diff(r_grads, m_grads)
    rows.append(("wll_d1_neg_ref beta=0: grad == wll_d1_neg grad", gd, gd == 0.0))
    ref4 = authors_trainer(repo, REF_POL, mask_id=mask_id, beta=0.04)
    try:
        authors_loss(ref4, model, inp, adv, SEEDS, G)
        raised = False
    except KeyError:
        raised = True
    rows.append(("wll_d1_neg_ref beta=0.04 (train.yaml): KeyError, no ref logps", 0.0, raised))

    # (3) the authors' float32 cast of the log-probs kept (fp64 model): float32 rounding only
    main32 = authors_trainer(repo, MAIN, mask_id=mask_id, fp64=False)
    a_loss32, _, _ = authors_loss(main32, model, inp, adv, SEEDS, G)
    o_loss, _, _ = our_loss(model, inp, adv, masked, mask_id, micro_batch=G)
    rows.append(("loss vs the authors' float32 cast of log-probs kept (rounding)",
                 *close(o_loss, a_loss32, 1e-6)))

    # (4) information: paper grouping vs the authors' code when one micro-batch holds two groups
    a_two, _, a_two_g = authors_loss(main, model, inp, adv, SEEDS[:1], 2 * G)
    m_two = authors_masks(main, inp["input_ids"], SEEDS[:1], 2 * G, mask_id)
    o_grp, _, o_grp_g = our_loss(model, inp, adv, m_two, mask_id, micro_batch=2 * G, softmax_over="group")
    gd, gs = _grad_diff(a_two_g, o_grp_g)
    rows.append((f"info: micro-batch = 2 groups: loss authors {a_two:.4f} paper {o_grp:.4f}", abs(a_two - o_grp), True))
    rows.append((f"info: micro-batch = 2 groups: grad authors vs paper (|g|<={gs:.2f})", gd, True))
    record["info_two_groups"] = {"authors_loss": a_two, "group_loss": o_grp}
    return rows, record


def check(repo: pathlib.Path) -> list[tuple[str, float, bool]]:
    """(what was compared, max abs diff, ok) rows; ``repo``: the wd1 checkout or a folder holding ``wd1/``."""
    return run(pathlib.Path(repo))[0]


def record(repo: pathlib.Path, out_path: pathlib.Path) -> None:
    """Write the fixture (inputs, masks, the authors' losses, seq terms and gradient slices)."""
    rows, rec = run(pathlib.Path(repo))
    bad = [r for r in rows if not r[2]]
    if bad:
        raise SystemExit(f"not recording: failing rows {bad}")
    write_fixture(out_path, rec)

