"""Reference check of d2-StepMerge (rl/objectives/trajectory.py) against the authors' code (kuleshov-group/d2).

The authors' methods of ``d2StepMergeTrainer`` (diffu-grpo/diffu_grpo_trainer.py: ``generate``,
``compute_loss``, ``_get_per_token_logps``, ``_get_per_token_logps_oldandref``, ``forward_process``,
``get_logits``, ``get_num_transfer_tokens``, ``add_gumbel_noise``, ``token_entropy_from_logits``)
are read from the checkout at runtime (``ast``) and run on a stub ``self`` (``trl`` is not installed).

The rollout is theirs: their ``generate`` samples the completions (global RNG seeded, restored
afterwards) and records ``trajectory`` / ``trajectory_mask``. Run once with N = steps, its
per-segment masks are the per-step commits: that is the ``unmask_step`` our estimator reads. Run
again with each N (same seed, same samples), its trajectory states must be the states our
``d2_stepmerge`` estimator builds from the trace. Prompt masks come from their ``forward_process``
(their ``set_seed(mask_seed)``) and are handed to ours as a ``MaskSample``; both sides score the
same fp64 tiny model (mask token never predicted, EOS favoured so that completions end early).

Their ``_get_per_token_logps*`` cast log-probs to float32; the fp64 rows run their code with
``torch.float32`` read as float64 (a namespace shim), two rows keep the cast.

    .venv/bin/python scripts/check_objectives_reference.py --refs /tmp/refs --only d2_stepmerge [--write-fixtures]
"""

from __future__ import annotations

import math
import pathlib
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ._authors import checkout_path, class_methods, write_fixture

TRAINER = "diffu-grpo/diffu_grpo_trainer.py"
CLASS = "d2StepMergeTrainer"
METHODS = ("generate", "compute_loss", "_get_per_token_logps", "_get_per_token_logps_oldandref", "forward_process",
           "get_logits", "get_num_transfer_tokens", "add_gumbel_noise", "token_entropy_from_logits")

MODEL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
SEEDS = {"policy": 0, "old": 1, "ref": 2}  # the policy, the rollout policy (old), the reference
EOS_BIAS = 2.5  # added to the EOS logit: completions end early, so completion masks vary
B, PROMPT_LEN, GEN_LENGTH, BLOCK_LENGTH, STEPS = 4, 5, 12, 4, 12
GEN_SEED = 7
MASK_SEEDS = [101, 202]  # their mask seed of each of num_iterations = 2 iterations
ADVANTAGES = [1.0, -0.5, 0.25, -0.75]
P_MASK_PROMPT = 0.15  # bash_scripts/train.yaml
EPSILON, BETA = 0.5, 0.04  # train.yaml
NS = (1, 3, 4, 5, 12)  # segment counts checked (12 = every step)
RECORD_N = 4
FIXTURE_PARAMS = 6  # recorded gradient sums: the first parameters (by name order)


class _Torch:
    """``torch`` seen by the authors' methods: ``bfloat16`` read as the model's float64 (their
    ``generate`` keeps a bf16 per-token entropy for logging, filled from the logits' dtype), and with
    ``fp64`` also ``float32`` read as float64 (their final log-prob cast kept in fp64)."""

    def __init__(self, fp64: bool):
        self.bfloat16 = torch.float64
        self.float32 = torch.float64 if fp64 else torch.float32

    def __getattr__(self, key):
        return getattr(torch, key)


def _set_seed(seed) -> None:
    """accelerate's ``set_seed`` as far as these methods use it (torch's CPU generator)."""
    torch.manual_seed(int(seed))


def authors_trainer(repo: pathlib.Path, *, n_segments: int, mask_id: int, fp64: bool = True):
    """A stub ``d2StepMergeTrainer`` carrying the authors' methods, args as their scripts set them
    (gradient_accumulation_steps = N: one generation batch per optimizer step; num_iterations = 2)."""
    ns = {"torch": _Torch(fp64), "F": F, "np": np, "math": math, "set_seed": _set_seed}
    methods = class_methods(checkout_path(repo, TRAINER, "d2"), CLASS, METHODS, ns)
    obj = type(f"Authors{CLASS}", (), methods)()
    obj.args = types.SimpleNamespace(N=n_segments, p_mask_prompt=P_MASK_PROMPT, mask_id=mask_id, cfg_scale=0.0,
                                     fp16=False, gradient_accumulation_steps=n_segments)
    obj.num_iterations, obj.beta, obj.epsilon, obj._step = len(MASK_SEEDS), BETA, EPSILON, 0
    return obj


# ---- the shared model --------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    """The tiny model with the mask token's logit at -1e4 (never sampled) and ``eos_bias`` on EOS."""

    def __init__(self, inner, mask_id: int, eos_id: int, eos_bias: float):
        super().__init__()
        self.inner = inner
        bias = torch.zeros(inner.config.vocab_size, dtype=torch.float64)
        bias[mask_id], bias[eos_id] = -1e4, eos_bias
        self.register_buffer("bias", bias)

    @property
    def device(self) -> torch.device:
        return self.bias.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype

    def forward(self, input_ids, attention_mask=None, **_):
        logits = self.inner(input_ids, attention_mask=attention_mask).logits
        return types.SimpleNamespace(logits=logits + self.bias.to(logits.dtype))


def build_models() -> tuple[object, dict[str, TinyLM]]:
    from rollout.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    models = {k: TinyLM(build_tiny_model(tok, seed=s, **MODEL), tok.mask_token_id, tok.eos_token_id,
                        EOS_BIAS).double().eval() for k, s in SEEDS.items()}
    return tok, models


def build_prompts(tok) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(len(tok.all_special_tokens) + 1, len(tok), (B, PROMPT_LEN), generator=g)


def authors_generate(trainer, model, prompt: torch.Tensor, n_segments: int, mask_id: int):
    """Their ``generate`` (temperature 1, low-confidence remasking) from a fixed seed."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast on CPU
        torch.manual_seed(GEN_SEED)
        x, _, traj, traj_mask = trainer.generate(model, prompt, steps=STEPS, gen_length=GEN_LENGTH,
                                                 block_length=BLOCK_LENGTH, temperature=1.0, cfg_scale=0.0,
                                                 remasking="low_confidence", mask_id=mask_id, N=n_segments)
    return x, traj, traj_mask


def authors_prompt_masks(trainer, ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[I, B, P]``: the prompt positions their ``forward_process`` masks under each iteration's seed."""
    prompt_index = torch.zeros(ids.shape[1], dtype=torch.bool)
    prompt_index[:PROMPT_LEN] = True
    out = []
    with torch.random.fork_rng(devices=[]):
        for seed in MASK_SEEDS:
            noisy, _ = trainer.forward_process(ids, prompt_index, mask_id, seed=seed)
            out.append(noisy[:, :PROMPT_LEN] == mask_id)
    return torch.stack(out)


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS (their ``_generate_and_score_completions``'s rule)."""
    from rollout.types import completion_mask_from_eos

    return completion_mask_from_eos(completion, eos_id)


def _expanded(x: torch.Tensor, traj: list, traj_mask: list):
    """What their ``_generate_and_score_completions`` hands on: ids, trajectory and masks expanded over iterations."""
    n_it = len(MASK_SEEDS)
    return (x.unsqueeze(0).expand(n_it, -1, -1), [t.unsqueeze(0).expand(n_it, -1, -1) for t in traj],
            [m[:, -GEN_LENGTH:].unsqueeze(0) for m in traj_mask])


def authors_terms(trainer, model, x: torch.Tensor, traj: list, traj_mask: list) -> torch.Tensor:
    """``[I, B, L]``: their ``_get_per_token_logps_oldandref`` (each token at its own segment), both iterations."""
    ids, traj_exp, mask_exp = _expanded(x, traj, traj_mask)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return trainer._get_per_token_logps_oldandref(model, ids, GEN_LENGTH, torch.tensor(MASK_SEEDS), traj_exp,
                                                      mask_exp)


def authors_step(trainer, models: dict, x: torch.Tensor, traj: list, traj_mask: list, cmask: torch.Tensor,
                 adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Their old / reference terms (``_get_per_token_logps_oldandref``, both iterations) and their loss of
    iteration 1 (``compute_loss`` once per segment, summed and divided by gradient_accumulation_steps = N,
    as the HF Trainer does), with its gradient. Returns (old [I,B,L], ref [I,B,L], current [I,B,L], loss, grads)."""
    n_seg = trainer.args.N
    _, traj_exp, mask_exp = _expanded(x, traj, traj_mask)
    seeds = torch.tensor(MASK_SEEDS)
    old, ref, cur = (authors_terms(trainer, models[k], x, traj, traj_mask) for k in ("old", "ref", "policy"))
    inputs = {"prompt_ids": x[:, :PROMPT_LEN], "prompt_mask": torch.ones(B, PROMPT_LEN, dtype=torch.long),
              "completion_ids": x[:, PROMPT_LEN:], "completion_mask": cmask, "mask_seeds": seeds,
              "trajectory": traj_exp, "trajectory_mask": mask_exp, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "advantages": adv}
    policy = models["policy"]
    policy.zero_grad(set_to_none=True)
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        for k in range(n_seg):
            trainer._step = n_seg + k + 1  # iteration 1, segment k (their _prepare_inputs increments first)
            total = total + trainer.compute_loss(policy, inputs) / trainer.args.gradient_accumulation_steps
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    return old, ref, cur, total.detach(), grads


def our_sample(unmask_step: torch.Tensor, cmask: torch.Tensor, prompt_masked: torch.Tensor, n_segments: int):
    """Our ``d2_stepmerge`` draw from the trace, with its prompt mask replaced by the authors' ``[B, P]`` one."""
    from rl.estimators import MaskSample
    from rl.objectives.trajectory import D2StepMerge

    est = D2StepMerge(N=n_segments, p_mask_prompt=P_MASK_PROMPT)
    s = est.draw(None, cmask, PROMPT_LEN, torch.Generator().manual_seed(0), trace=unmask_step)
    masked = s.masked.clone()
    masked[:, :, :PROMPT_LEN] = prompt_masked
    return est, MaskSample(masked, s.weights)


def our_terms(model, est, sample, x: torch.Tensor, cmask: torch.Tensor, mask_id: int, n_segments: int) -> torch.Tensor:
    from rl.objectives.trajectory import D2StepMergeObjective

    obj = D2StepMergeObjective(N=n_segments, p_mask_prompt=P_MASK_PROMPT)
    return obj.terms(est, sample, est.score(model, x, None, PROMPT_LEN, sample, mask_id), cmask, {})


def our_step(models: dict, est, samples: list, x: torch.Tensor, cmask: torch.Tensor, adv: torch.Tensor, mask_id: int,
             n_segments: int, old: torch.Tensor | None = None, ref: torch.Tensor | None = None):
    """Ours as rl/grpo.py's policy_update runs it (one micro-batch, iteration 1): old / reference
    terms on the same masks, the objective's loss, the ``dapo`` aggregation, backward."""
    from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
    from rl.objectives.base import PolicyLossInputs
    from rl.objectives.trajectory import D2StepMergeObjective

    obj = D2StepMergeObjective(N=n_segments, p_mask_prompt=P_MASK_PROMPT)
    with torch.no_grad():
        if old is None:
            old = torch.stack([our_terms(models["old"], est, s, x, cmask, mask_id, n_segments) for s in samples])
        if ref is None:
            ref = torch.stack([our_terms(models["ref"], est, s, x, cmask, mask_id, n_segments) for s in samples])
    policy = models["policy"]
    policy.zero_grad(set_to_none=True)
    logp = our_terms(policy, est, samples[1], x, cmask, mask_id, n_segments)
    m = cmask.double()
    out = obj.loss(PolicyLossInputs(logp=logp, old_logp=old[1], ref_logp=ref[1], advantages=adv, mask=m,
                                    epsilon=EPSILON, beta=BETA))
    w = LOSS_TYPES[obj.default_loss_type("token")](m, BatchCounts(tokens=float(m.sum()), rows=float(B),
                                                                  max_len=GEN_LENGTH, num_micro=1))
    loss = (per_token(out.loss, w) * w).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    return old, ref, logp.detach(), loss.detach(), grads


def _max_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    d = (a.double() - b.double()).abs()
    return float(d[where].max()) if where is not None else float(d.max())


def _grad_diff(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    return diff, scale


def run(repo: pathlib.Path) -> tuple[list[tuple[str, float, bool]], dict]:
    tok, models = build_models()
    mask_id, eos_id = tok.mask_token_id, tok.eos_token_id
    prompt = build_prompts(tok)
    adv = torch.tensor(ADVANTAGES, dtype=torch.float64)
    rows: list[tuple[str, float, bool]] = []

    # the trace: their generate with N = steps records one segment per step
    per_step = authors_trainer(repo, n_segments=STEPS, mask_id=mask_id)
    x, _, step_masks = authors_generate(per_step, models["old"], prompt, STEPS, mask_id)
    commits = torch.stack([m[:, PROMPT_LEN:] for m in step_masks])  # [S, B, L]
    once = bool((commits.sum(0) == 1).all())
    rows.append(("trace: every completion token committed at exactly one step", 0.0 if once else 1.0, once))
    unmask_step = (commits * torch.arange(STEPS).view(-1, 1, 1)).sum(0)
    cmask = completion_mask(x[:, PROMPT_LEN:], eos_id)
    valid = cmask.bool()
    record = {}
    for n_seg in NS:
        trainer = authors_trainer(repo, n_segments=n_seg, mask_id=mask_id)
        xn, traj, traj_mask = authors_generate(trainer, models["old"], prompt, n_seg, mask_id)
        assert torch.equal(xn, x), "their generate must sample the same completions for every N (same seed)"
        prompt_masked = authors_prompt_masks(trainer, x, mask_id)
        est, s0 = our_sample(unmask_step, cmask, prompt_masked[0], n_seg)
        samples = [s0, our_sample(unmask_step, cmask, prompt_masked[1], n_seg)[1]]
        # states: pass k shows what their trajectory[k] shows; it scores their trajectory_mask[k] & completion_mask
        theirs_masked = torch.stack([t[:, PROMPT_LEN:] == mask_id for t in traj])
        theirs_scored = torch.stack([m[:, PROMPT_LEN:].bool() for m in traj_mask]) & valid
        bad = int((s0.masked[:, :, PROMPT_LEN:] != theirs_masked).sum() + ((s0.weights != 0) != theirs_scored).sum())
        rows.append((f"N={n_seg}: trajectory states and scored sets (mismatched positions)", float(bad), bad == 0))

        a_old, a_ref, a_cur, a_loss, a_grads = authors_step(trainer, models, x, traj, traj_mask, cmask, adv)
        o_old, o_ref, o_cur, o_loss, o_grads = our_step(models, est, samples, x, cmask, adv, mask_id, n_seg)
        ok_tol = 1e-10
        where = valid.expand(len(MASK_SEEDS), -1, -1)
        for what, a, o, w in (("old", a_old, o_old, where), ("ref", a_ref, o_ref, where),
                              ("policy (iteration 1)", a_cur[1], o_cur, valid)):
            d = _max_diff(a, o, w)
            rows.append((f"N={n_seg}: {what} per-token log-probs (valid tokens)", d, d <= ok_tol))
        d = abs(float(a_loss) - float(o_loss))
        rows.append((f"N={n_seg}: loss (iteration 1, clipped ratio + beta k3, token mean)", d,
                     d <= ok_tol * max(1.0, abs(float(a_loss)))))
        gd, gs = _grad_diff(a_grads, o_grads)
        rows.append((f"N={n_seg}: gradient wrt the policy's parameters (max |grad| {gs:.2e})", gd,
                     gd <= ok_tol * max(1.0, gs)))
        if n_seg == RECORD_N:
            names = sorted(a_grads)[:FIXTURE_PARAMS]
            record = {
                "about": "d2-StepMerge reference numbers (scripts/objective_refs/d2.py): the authors' code on "
                         "these inputs",
                "model": {**MODEL, "seeds": SEEDS, "eos_bias": EOS_BIAS},
                "N": n_seg, "p_mask_prompt": P_MASK_PROMPT, "epsilon": EPSILON, "beta": BETA,
                "prompt_len": PROMPT_LEN, "steps": STEPS, "sequences": x.tolist(), "unmask_step": unmask_step.tolist(),
                "completion_mask": cmask.tolist(), "advantages": ADVANTAGES,
                "prompt_masked": prompt_masked.int().tolist(),
                "authors": {"trajectory_masked": theirs_masked.int().tolist(),
                            "trajectory_scored": theirs_scored.int().tolist(), "old": a_old.tolist(),
                            "ref": a_ref.tolist(), "policy_iteration1": a_cur[1].tolist(),
                            "loss": float(a_loss),
                            "grad_sums": {k: float(a_grads[k].sum()) for k in names},
                            "grad_norm": float(torch.sqrt(sum((g ** 2).sum() for g in a_grads.values())))},
            }

    # their float32 cast kept (the code as published): same numbers to float32 precision
    trainer = authors_trainer(repo, n_segments=RECORD_N, mask_id=mask_id, fp64=False)
    _, traj, traj_mask = authors_generate(trainer, models["old"], prompt, RECORD_N, mask_id)
    prompt_masked = authors_prompt_masks(trainer, x, mask_id)
    est, s0 = our_sample(unmask_step, cmask, prompt_masked[0], RECORD_N)
    samples = [s0, our_sample(unmask_step, cmask, prompt_masked[1], RECORD_N)[1]]
    *_, a_loss, a_grads = authors_step(trainer, models, x, traj, traj_mask, cmask, adv)
    *_, o_loss, o_grads = our_step(models, est, samples, x, cmask, adv, mask_id, RECORD_N)
    d = abs(float(a_loss) - float(o_loss))
    rows.append((f"N={RECORD_N}, their float32 cast kept: loss", d, d <= 1e-5 * max(1.0, abs(float(a_loss)))))
    gd, gs = _grad_diff(a_grads, o_grads)
    rows.append((f"N={RECORD_N}, their float32 cast kept: gradient", gd, gd <= 1e-5 * max(1.0, gs)))

    # quirk shown, not matched: N > steps. Their first cut int(steps / N) = 0 is never reached (the
    # step counter is >= 1 when compared), so the trajectory keeps its first state and every token is
    # scored from the fully masked completion; ours cuts at floor(j * steps / N) (empty segments allowed).
    n_big = 2 * STEPS
    trainer = authors_trainer(repo, n_segments=n_big, mask_id=mask_id)
    _, traj, traj_mask = authors_generate(trainer, models["old"], prompt, n_big, mask_id)
    prompt_masked = authors_prompt_masks(trainer, x, mask_id)
    est, s0 = our_sample(unmask_step, cmask, prompt_masked[0], n_big)
    samples = [s0, our_sample(unmask_step, cmask, prompt_masked[1], n_big)[1]]
    states = sum(bool((m != 0).any()) for m in traj_mask)
    a_old = authors_terms(trainer, models["old"], x, traj, traj_mask)
    with torch.no_grad():
        o_old = torch.stack([our_terms(models["old"], est, s, x, cmask, mask_id, n_big) for s in samples])
    d = abs(float((a_old[1] * cmask).sum() - (o_old[1] * cmask).sum()))
    rows.append((f"quirk N={n_big} > steps={STEPS}: theirs uses {states} state(s); |sum old log-probs theirs - ours|",
                 d, True))
    return rows, record


def check(repo: pathlib.Path) -> list[tuple[str, float, bool]]:
    """(what was compared, max abs diff, ok) rows; ``repo``: the d2 checkout or a folder holding ``d2/``."""
    return run(pathlib.Path(repo))[0]


def record(repo: pathlib.Path, out_path: pathlib.Path) -> None:
    """Write the authors' numbers on the N = RECORD_N inputs to ``out_path`` (the test's fixture)."""
    write_fixture(out_path, run(pathlib.Path(repo))[1])
