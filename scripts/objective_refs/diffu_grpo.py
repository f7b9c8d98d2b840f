"""diffu-GRPO (d1: Zhao et al. 2025, Eq. 3) against d1's own code, on identical inputs.

    .venv/bin/python scripts/check_objectives_reference.py --refs /tmp/refs --only diffu_grpo [--write-fixtures]

d1's ``DiffuGRPOTrainer`` methods (``compute_loss``, ``_get_per_token_logps``, ``forward_process``,
``get_logits``) and the advantage statements of ``_generate_and_score_completions`` are read from
``<repo>/diffu-grpo/diffu_grpo_trainer.py`` with ``ast`` and executed with a stub ``self`` (``trl``
is not installed); nothing of d1 is imported by the package. Both sides get the same tiny model,
the same prompt masks (d1's ``forward_process`` with its seeds, handed to ours as a
``MaskSample``), the same advantages and the same old / reference log-probs. d1 reseeds every
global RNG in ``forward_process`` (``set_seed``); each call to it here runs inside a saved and
restored RNG state.

Rows of :func:`check`: ``(what, max |diff|, ok)``. Rows marked ``[info]`` measure a *difference*
(d1's quirks, the ``dapo`` vs ``bnpo`` aggregation, the std conventions); they are always ok and
their numbers go into the report. :func:`record` writes ``tests/fixtures/objectives/diffu_grpo.json``
(inputs and d1's outputs) for ``tests/test_objective_diffu_grpo.py``.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import math
import random
import tempfile
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from rl.advantages import group_advantages
from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
from rl.estimators import MaskSample, MeanField
from rl.objectives.base import PolicyLossInputs
from rl.objectives.diffu_grpo import DiffuGRPO

TRAINER_FILE = "diffu-grpo/diffu_grpo_trainer.py"
D1_METHODS = ("compute_loss", "_get_per_token_logps", "forward_process", "get_logits")

# Scenario. d1's published settings (slurm_scripts/train.yaml): epsilon 0.5, beta 0.04, p_mask_prompt
# 0.15, num_generations 6, per_device_train_batch_size 6 with gradient_accumulation_steps 2.
MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MODEL_SEED = 0
P, L = 6, 8  # prompt width, completion width
G = 4  # completions per prompt
B = 8  # rows: 2 prompts x G; two micro-batches of 4 (d1's per_device_train_batch_size = half the step)
LENGTHS = [8, 7, 8, 6, 3, 2, 4, 1]  # valid completion tokens: the second micro-batch is much shorter
EPSILON, BETA, P_MASK = 0.5, 0.04, 0.15
MU = 2  # num_iterations
MASK_SEEDS = [1234, 2087]  # d1 draws torch.randint(0, 2**12, (num_iterations,)); these are two such draws
REWARDS = [1.0, 0.0, 0.5, 0.25, 0.0, 0.0, 1.0, 0.75]  # G = 4 per group
ADV_REWARDS_G6 = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.2, 0.9, 0.4, 0.4, 0.1, 0.7]  # two groups of d1's G = 6
REF_SHIFT = 0.02  # the trainer run's reference = the policy + 0.02 x a fixed direction (a KL with a gradient)
VOCAB, FIRST_CHAR = 105, 8  # the tiny tokenizer: 7 special tokens and <unk>, then characters
RTOL = 1e-5  # d1 casts its token log-probs to float32: agreement is to float32 precision


# ----------------------------------------------------------------------------- d1's code, loaded


def _set_seed(seed: int) -> None:
    """accelerate.utils.set_seed (what d1 imports), without needing accelerate."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _rng_restored():
    """d1's forward_process reseeds python, numpy and torch globally: put every state back after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _class_methods(repo: Path) -> tuple[dict[str, ast.FunctionDef], Path]:
    path = Path(repo) / TRAINER_FILE
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiffuGRPOTrainer")
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}, path


def _assigns(stmt: ast.stmt, name: str) -> bool:
    return isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)


class D1:
    """A stub ``self`` carrying d1's methods, exec'd from the checkout. ``_step`` is the counter
    TRL 0.16 increments once per micro-batch in ``_prepare_inputs`` (before ``compute_loss``)."""

    def __init__(self, repo: Path, *, num_iterations: int, epsilon: float, beta: float, p_mask_prompt: float,
                 mask_id: int, num_generations: int):
        methods, path = _class_methods(repo)
        nodes = []
        for name in D1_METHODS:
            node = copy.deepcopy(methods[name])
            node.decorator_list = []  # profiling_decorator (trl)
            nodes.append(node)
        ns = {"torch": torch, "F": F, "nn": torch.nn, "set_seed": _set_seed}
        exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), ns)
        for name in D1_METHODS:
            setattr(self, name, types.MethodType(ns[name], self))
        # the advantage statements of _generate_and_score_completions: from the group mean to the
        # per-process slice (exclusive)
        body = methods["_generate_and_score_completions"].body
        start = next(i for i, s in enumerate(body) if _assigns(s, "mean_grouped_rewards"))
        stop = next(i for i, s in enumerate(body) if _assigns(s, "process_slice"))
        self._adv_code = compile(ast.Module(body=copy.deepcopy(body[start:stop]), type_ignores=[]), str(path), "exec")
        self.args = SimpleNamespace(num_iterations=num_iterations, p_mask_prompt=p_mask_prompt, mask_id=mask_id,
                                    cfg_scale=0.0)
        self.num_iterations, self.epsilon, self.beta = num_iterations, epsilon, beta
        self.num_generations = num_generations
        self._step = 0
        self.control = SimpleNamespace(should_evaluate=False)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.accelerator = SimpleNamespace(gather_for_metrics=lambda x: x)

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, per-row group std) as d1's _generate_and_score_completions computes them."""
        ns = {"torch": torch, "self": self, "rewards": rewards}
        exec(self._adv_code, ns)
        return ns["advantages"], ns["std_grouped_rewards"]

    def masks(self, input_ids: torch.Tensor, completion_len: int, seed: int) -> torch.Tensor:
        """The positions d1's forward_process masks for ``input_ids [b, T]`` under ``seed``."""
        t = input_ids.shape[1]
        prompt_index = torch.zeros(t, dtype=torch.bool)
        prompt_index[:t - completion_len] = True
        with _rng_restored():
            noisy, _ = self.forward_process(input_ids, prompt_index, self.args.mask_id, seed=seed)
        return noisy == self.args.mask_id

    def logps(self, model, input_ids: torch.Tensor, completion_len: int, seeds: list[int]) -> torch.Tensor:
        """d1's _get_per_token_logps for ``input_ids [B, T]`` repeated once per seed: ``[len(seeds), B, L]``."""
        with _rng_restored():
            return self._get_per_token_logps(model, input_ids.unsqueeze(0).expand(len(seeds), -1, -1),
                                             completion_len, seeds)

    def loss(self, model, inputs: dict, step: int) -> torch.Tensor:
        """d1's compute_loss with ``self._step = step`` (it uses mask seed ``step % num_iterations``)."""
        self._step = step
        with _rng_restored():
            return self.compute_loss(model, inputs)


# ----------------------------------------------------------------------------- the shared scenario


def build_model(dtype: torch.dtype = torch.float64):
    from rollout import build_tiny_policy

    return build_tiny_policy(seed=MODEL_SEED, **MODEL).to(dtype)


def scenario_batch() -> dict[str, torch.Tensor]:
    """Prompt + completion ids ``[B, P+L]`` (one prompt per group, no padding), completion mask
    with LENGTHS valid tokens (EOS last; tokens after it are junk d1 scores but masks out)."""
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(FIRST_CHAR, VOCAB, (B // G, P), generator=g).repeat_interleave(G, 0)
    completions = torch.randint(FIRST_CHAR, VOCAB, (B, L), generator=g)
    cmask = (torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return {"prompt_ids": prompts, "completion_ids": completions, "completion_mask": cmask}


def old_ref_offsets() -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets added to the policy's log-probs to make the old / reference log-probs: ratios spread
    over both sides of [1 - eps, 1 + eps] and a non-zero KL (rounded: they are inputs)."""
    g = torch.Generator().manual_seed(11)
    return ((torch.randn(B, L, generator=g) * 0.5).round(decimals=4),
            (torch.randn(B, L, generator=g) * 0.3).round(decimals=4))


def our_logps(model, input_ids, attention_mask, masked: torch.Tensor, cmask: torch.Tensor, mask_id: int,
              rows: slice = slice(None)) -> torch.Tensor:
    """Our token log-probs ``[n, L]`` (MeanField.score + DiffuGRPO.terms) on the given masks."""
    est, obj = MeanField(p_mask_prompt=P_MASK), DiffuGRPO()
    sample = MaskSample(masked[None, rows], cmask[rows].float()[None])
    logps = est.score(model, input_ids[rows], attention_mask[rows], P, sample, mask_id)
    return obj.terms(est, sample, logps, cmask[rows], {})


def our_loss(logp, old, ref, adv, cmask, loss_type: str, counts: BatchCounts) -> tuple[torch.Tensor, dict]:
    """DiffuGRPO.loss aggregated with ``loss_type``'s weights: the micro-batch's share of the loss."""
    out = DiffuGRPO().loss(PolicyLossInputs(logp=logp, old_logp=old, ref_logp=ref, advantages=adv,
                                            mask=cmask.float(), epsilon=EPSILON, beta=BETA))
    w = LOSS_TYPES[loss_type](cmask.float(), counts)
    metrics = {"kl": (per_token(out.kl, w) * w).sum().detach(), "clip": (out.clipped.float() * w).sum()}
    return (per_token(out.loss, w) * w).sum(), metrics


def counts_of(cmask: torch.Tensor, num_micro: int) -> BatchCounts:
    return BatchCounts(tokens=float(cmask.sum()), rows=float(cmask.shape[0]), max_len=cmask.shape[1],
                       num_micro=num_micro)


def grad_summary(grads: list[torch.Tensor]) -> dict[str, list[float]]:
    """Per parameter tensor: the norm and the projection on a fixed random direction (sign-sensitive)."""
    g = torch.Generator().manual_seed(3)
    norms, proj = [], []
    for t in grads:
        u = torch.randn(t.shape, generator=g, dtype=torch.float64)
        norms.append(float(t.double().norm()))
        proj.append(float((t.double() * u).sum()))
    return {"norm": _r(norms), "proj": _r(proj)}


def _r(x):
    """Numbers (a tensor, a list, a float) rounded to 10 significant digits, for the fixture."""
    if isinstance(x, torch.Tensor):
        x = x.detach().double().tolist()
    if isinstance(x, list):
        return [_r(v) for v in x]
    return float(f"{float(x):.10g}")


def _bits(mask: torch.Tensor) -> list[str]:
    return ["".join("1" if v else "0" for v in row) for row in mask.tolist()]


def from_bits(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().reshape(-1) for g in grads])


def _row(what: str, ours, theirs, rtol: float = RTOL) -> tuple[str, float, bool]:
    """(what, max |ours - theirs|, within ``rtol`` of the largest |theirs|)."""
    a, b = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    diff = float((a - b).abs().max())
    return what, diff, math.isfinite(diff) and diff <= rtol * max(float(b.abs().max()), 1e-6)


# ----------------------------------------------------------------------------- the trainer run


def make_rollout(batch: dict[str, torch.Tensor]):
    from rollout.types import Rollout

    prompt, comp = batch["prompt_ids"], batch["completion_ids"]
    return Rollout(sequences=torch.cat([prompt, comp], 1), prompt_ids=prompt, prompt_mask=torch.ones_like(prompt),
                   completion_ids=comp, completion_mask=batch["completion_mask"], unmask_step=torch.zeros_like(comp),
                   num_forward_passes=0)


def trainer_first_gradient(samples: list[MaskSample], adv: torch.Tensor, ref_shift: float,
                           run_dir: str) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
    """``DiffuGRPOTrainer.policy_update`` (loss_type bnpo, micro-batch = half the batch, mu = MU,
    beta = BETA) on the fp32 tiny model fed ``samples`` as its mask draws, the reference's weights
    moved by :func:`shift_reference` (``ref_shift``). Returns (the gradient accumulated for the first
    optimizer step, before clipping, per parameter; policy_update's metrics; how far the weights moved)."""
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.engine import unwrap
    from rl.grpo import DiffuGRPOTrainer

    policy = build_model(torch.float32)
    cfg = DiffuGRPOConfig(run_dir=run_dir, seed=0, max_steps=1, lr=1e-3, per_device_prompts=B // G,
                          num_generations=G, num_iterations=MU, beta=BETA, epsilon=EPSILON, loss_type="bnpo",
                          micro_batch_size=B // 2, deepspeed="zero0", max_grad_norm=1.0, sample_table_every=0,
                          rollout=RolloutOptions(gen_length=L, block_length=L, steps=L))
    trainer = DiffuGRPOTrainer(cfg, policy, [{"prompt": str(i)} for i in range(B // G)],
                               reward_funcs=[lambda completions, **_: [0.0] * len(completions)])
    try:
        shift_reference(unwrap(trainer.ref), ref_shift)
        draws = iter(samples)
        trainer.estimator.draw = lambda *a, **k: next(draws)
        params = [p for p in unwrap(trainer.engine).parameters() if p.requires_grad]
        before = _flat([p.detach().clone() for p in params])
        captured: list[list[torch.Tensor]] = []
        step = trainer.engine.step

        def capture_then_step(*a, **k):
            if not captured and trainer.engine.is_gradient_accumulation_boundary():
                captured.append([p.grad.detach().clone() for p in params])
            return step(*a, **k)

        trainer.engine.step = capture_then_step
        metrics = trainer.policy_update(make_rollout(scenario_batch()), adv)
        moved = (_flat([p.detach() for p in params]) - before).abs().max()
        return captured[0], metrics, moved
    finally:
        trainer.close()


def shift_reference(model: torch.nn.Module, scale: float) -> None:
    """Move a reference copy off the policy (so that the KL term has a gradient) along a fixed direction."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


# ----------------------------------------------------------------------------- the check


def _compute(repo: Path) -> tuple[list[tuple[str, float, bool]], dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions; restored below
    try:
        return _compare(repo)
    finally:
        torch.set_num_threads(threads)


def _compare(repo: Path) -> tuple[list[tuple[str, float, bool]], dict]:
    rows: list[tuple[str, float, bool]] = []
    model = build_model(torch.float64)
    mask_id = model.mask_token_id
    d1 = D1(repo, num_iterations=MU, epsilon=EPSILON, beta=BETA, p_mask_prompt=P_MASK, mask_id=mask_id,
            num_generations=G)
    batch = scenario_batch()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.ones_like(ids)
    cmask = batch["completion_mask"]
    valid = cmask.bool()
    params = [p for p in model.parameters()]

    # (4) advantages: d1's statements vs rl.advantages.group_advantages
    rewards = torch.tensor(REWARDS)
    adv_d1, std_d1 = d1.advantages(rewards)
    adv_ours, _ = group_advantages(rewards, G, scale_rewards="none")
    rows.append(_row("advantages: d1 vs group_advantages(scale_rewards=none)", adv_ours, adv_d1))
    r6 = torch.tensor(ADV_REWARDS_G6)
    d1_g6 = D1(repo, num_iterations=MU, epsilon=EPSILON, beta=BETA, p_mask_prompt=P_MASK, mask_id=mask_id,
               num_generations=6)
    adv6_d1, std6_d1 = d1_g6.advantages(r6)
    adv6_group, std6_ours = group_advantages(r6, 6, scale_rewards="group")
    trl_form = adv6_d1 / (std6_d1 + 1e-4)  # TRL 0.16's GRPOTrainer: unbiased std (d1 dropped this division)
    rows.append(_row("advantages, G=6: d1 vs ours scale_rewards=none", group_advantages(r6, 6)[0], adv6_d1))
    rows.append(("[info] advantages, G=6: d1 vs ours scale_rewards=group",
                 float((adv6_group - adv6_d1).abs().max()), True))
    rows.append(_row("adv G=6: TRL 0.16 (unbiased std + 1e-4) vs ours scale_rewards=group", adv6_group, trl_form))
    rows.append(_row("reward_std metric: d1 (unbiased std) vs ours", std6_ours, std6_d1.view(-1, 6)[:, 0]))
    adv = adv_d1.float()

    # (1) token log-probs: d1's _get_per_token_logps vs MeanField.score / combine on d1's masks
    masked = {s: d1.masks(ids, L, s) for s in MASK_SEEDS}
    d1_lp = d1.logps(model, ids, L, MASK_SEEDS).detach()  # [MU, B, L], d1's seeds in order
    worst = None
    for k, s in enumerate(MASK_SEEDS):
        ours = our_logps(model, ids, attn, masked[s], cmask, mask_id).detach()
        r = _row("", ours[valid], d1_lp[k][valid])
        worst = r if worst is None or r[1] > worst[1] else worst
    rows.append(("token log-probs: d1 _get_per_token_logps vs MeanField", worst[1], worst[2]))
    off_old, off_ref = old_ref_offsets()
    old_all = (d1_lp + off_old).float()  # the same old / ref log-probs fed to both
    ref_all = (d1_lp + off_ref).float()

    # (2)+(3) one micro-batch = the whole batch; d1's compute_loss at _step = 1 (mask seed index 1)
    inputs = {"prompt_ids": batch["prompt_ids"], "prompt_mask": torch.ones_like(batch["prompt_ids"]),
              "completion_ids": batch["completion_ids"], "completion_mask": cmask, "mask_seeds": MASK_SEEDS,
              "old_per_token_logps": old_all, "ref_per_token_logps": ref_all, "advantages": adv}
    loss_d1 = d1.loss(model, inputs, step=1)
    grad_d1 = torch.autograd.grad(loss_d1, params)
    kl_d1, clip_d1 = d1._metrics["train"]["kl"][-1], d1._metrics["train"]["clip_ratio"][-1]
    idx = 1 % MU
    logp = our_logps(model, ids, attn, masked[MASK_SEEDS[idx]], cmask, mask_id)
    one = counts_of(cmask, 1)
    loss_bnpo, m_bnpo = our_loss(logp, old_all[idx], ref_all[idx], adv, cmask, "bnpo", one)
    rows.append(_row("loss, 1 micro-batch: d1 compute_loss vs ours bnpo", loss_bnpo.detach(), loss_d1.detach()))
    grad_bnpo = torch.autograd.grad(loss_bnpo, params, retain_graph=True)
    rows.append(_row("grad, 1 micro-batch: d1 vs ours bnpo", _flat(grad_bnpo), _flat(grad_d1)))
    loss_dapo, _ = our_loss(logp, old_all[idx], ref_all[idx], adv, cmask, "dapo", one)
    rows.append(_row("loss, 1 micro-batch: d1 vs ours dapo (default)", loss_dapo.detach(), loss_d1.detach()))
    rows.append(_row("kl metric: d1 vs ours", m_bnpo["kl"], kl_d1))
    rows.append(("[info] clip metric: d1 clip_ratio vs ours clip_ratio/region_mean",
                 abs(float(m_bnpo["clip"]) - clip_d1), True))

    # two micro-batches of unequal lengths, as d1 runs them: micro-batch m at _step = m + 1, each
    # with its own masks (d1's seed index (m + 1) % MU on its own rows), loss / grad_accum
    halves = [slice(0, B // 2), slice(B // 2, B)]
    loss2_d1, grad2_d1, micro_inputs, micro_lp, micro_masks = 0.0, None, [], [], []
    for m, sl in enumerate(halves):
        mb = {k: (v[sl] if isinstance(v, torch.Tensor) and k not in ("old_per_token_logps", "ref_per_token_logps")
                  else v) for k, v in inputs.items()}
        ids_mb = ids[sl]
        lp_mb = d1.logps(model, ids_mb, L, MASK_SEEDS).detach()  # d1's old/ref pass for this micro-batch
        mb["old_per_token_logps"] = (lp_mb + off_old[sl]).float()
        mb["ref_per_token_logps"] = (lp_mb + off_ref[sl]).float()
        micro_inputs.append(mb)
        micro_lp.append(lp_mb[(m + 1) % MU])
        micro_masks.append(d1.masks(ids_mb, L, MASK_SEEDS[(m + 1) % MU]))
        lm = d1.loss(model, mb, step=m + 1) / len(halves)
        gm = torch.autograd.grad(lm, params)
        loss2_d1 = loss2_d1 + lm.detach()
        grad2_d1 = list(gm) if grad2_d1 is None else [a + b for a, b in zip(grad2_d1, gm)]
    two = counts_of(cmask, len(halves))
    loss2 = {"bnpo": 0.0, "dapo": 0.0}
    grad2 = {"bnpo": None, "dapo": None}
    for m, sl in enumerate(halves):
        k = (m + 1) % MU
        lp = our_logps(model, ids[sl], attn[sl], micro_masks[m], cmask[sl], mask_id)
        for lt in ("bnpo", "dapo"):
            lm, _ = our_loss(lp, micro_inputs[m]["old_per_token_logps"][k], micro_inputs[m]["ref_per_token_logps"][k],
                             adv[sl], cmask[sl], lt, two)
            gm = torch.autograd.grad(lm, params, retain_graph=True)
            loss2[lt] = loss2[lt] + lm.detach()
            grad2[lt] = list(gm) if grad2[lt] is None else [a + b for a, b in zip(grad2[lt], gm)]
    rows.append(_row("loss, 2 unequal micro-batches: d1 vs ours bnpo", loss2["bnpo"], loss2_d1))
    rows.append(_row("grad, 2 unequal micro-batches: d1 vs ours bnpo", _flat(grad2["bnpo"]), _flat(grad2_d1)))
    rows.append(("[info] loss, 2 unequal micro-batches: d1 vs ours dapo", float(abs(loss2["dapo"] - loss2_d1)), True))
    gdiff = float((_flat(grad2["dapo"]) - _flat(grad2_d1)).norm() / _flat(grad2_d1).norm())
    rows.append(("[info] grad, 2 unequal micro-batches: |dapo - d1| / |d1|", gdiff, True))

    # d1 quirk: left-padded prompts. d1 masks pad positions like prompt tokens and calls the model
    # without an attention mask; ours never masks padding and excludes it from attention.
    pad_ids, pad_attn = ids.clone(), attn.clone()
    pad_ids[::2, :2] = model.pad_token_id
    pad_attn[::2, :2] = 0
    d1_pad = d1.logps(model, pad_ids, L, [MASK_SEEDS[0]])[0].detach()
    ours_pad = our_logps(model, pad_ids, pad_attn, d1.masks(pad_ids, L, MASK_SEEDS[0]) & pad_attn.bool(), cmask,
                         mask_id).detach()
    rows.append(("[info] token log-probs, left-padded prompts: d1 vs ours",
                 float((ours_pad[valid] - d1_pad[valid]).abs().max()), True))

    # the trainer: DiffuGRPOTrainer.policy_update vs d1's two compute_loss calls of its first step
    model32 = build_model(torch.float32)
    ref32 = build_model(torch.float32)
    shift_reference(ref32, REF_SHIFT)
    p32 = [p for p in model32.parameters()]
    t_loss, t_grad = 0.0, None
    for m, sl in enumerate(halves):
        ids_mb = ids[sl]
        with torch.no_grad():  # d1's _generate_and_score_completions: old and ref for every mask seed
            old_mb = d1.logps(model32, ids_mb, L, MASK_SEEDS)
            ref_mb = d1.logps(ref32, ids_mb, L, MASK_SEEDS)
        mb = {"prompt_ids": batch["prompt_ids"][sl], "prompt_mask": torch.ones_like(batch["prompt_ids"][sl]),
              "completion_ids": batch["completion_ids"][sl], "completion_mask": cmask[sl], "mask_seeds": MASK_SEEDS,
              "old_per_token_logps": old_mb, "ref_per_token_logps": ref_mb, "advantages": adv[sl]}
        lm = d1.loss(model32, mb, step=m + 1) / len(halves)  # HF Trainer: loss / gradient_accumulation_steps
        gm = torch.autograd.grad(lm, p32)
        t_loss = t_loss + lm.detach()
        t_grad = list(gm) if t_grad is None else [a + b for a, b in zip(t_grad, gm)]
    sample = MaskSample(torch.cat(micro_masks)[None], cmask.float()[None])  # the masks d1 used in its step
    with tempfile.TemporaryDirectory() as tmp:
        captured, _, _ = trainer_first_gradient([sample] * MU, adv, REF_SHIFT, tmp)
    rows.append(_row("trainer policy_update grad (bnpo, 2 micro) vs d1 step 1", _flat(captured), _flat(t_grad)))

    fixture = {
        "about": "d1's diffu-GRPO outputs on the scenario of scripts/objective_refs/diffu_grpo.py",
        "model": {"seed": MODEL_SEED, **MODEL},
        "P": P, "L": L, "G": G, "epsilon": EPSILON, "beta": BETA, "p_mask_prompt": P_MASK, "mask_seeds": MASK_SEEDS,
        "input_ids": ids.tolist(), "completion_mask": cmask.tolist(),
        "masks": [_bits(masked[s]) for s in MASK_SEEDS],  # d1's forward_process, whole batch, one per seed
        "micro_masks": _bits(sample.masked[0]),  # micro-batch m's rows with seed index (m + 1) % MU (d1's step 1)
        "old_offset": off_old.tolist(), "ref_offset": off_ref.tolist(),
        "rewards": REWARDS, "d1_advantages": adv_d1.tolist(),
        "rewards_g6": ADV_REWARDS_G6, "d1_advantages_g6": _r(adv6_d1), "d1_std_g6": _r(std6_d1),
        "d1_logps": _r(d1_lp),  # [MU, B, L] on "masks"
        "d1_logps_micro": _r(torch.cat(micro_lp)),  # [B, L] on "micro_masks"
        "d1_loss_one": _r(loss_d1), "d1_kl_one": _r(kl_d1), "d1_clip_ratio_one": _r(clip_d1),
        "d1_grad_one": grad_summary(grad_d1),
        "d1_loss_two": _r(loss2_d1), "d1_grad_two": grad_summary(grad2_d1), "dapo_loss_two": _r(loss2["dapo"]),
        "d1_trainer_loss": _r(t_loss), "d1_trainer_grad": grad_summary(t_grad),
    }
    return rows, fixture


def check(repo: Path) -> list[tuple[str, float, bool]]:
    return _compute(Path(repo))[0]


def record(repo: Path, out_path: Path) -> None:
    _, fixture = _compute(Path(repo))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(fixture, separators=(",", ":")) + "\n")

