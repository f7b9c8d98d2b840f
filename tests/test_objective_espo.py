"""ESPO (rl/objectives/espo.py): equality with the authors' recorded numbers, the ELBO estimate's
exact expectation and its bound on a model small enough to enumerate, the mask draws, the loss,
and a short training run. No checkout needed: the authors' numbers are in
tests/fixtures/objectives/espo.json (scripts/check_objectives_reference.py --only espo --write-fixtures writes it)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import pathlib

import pytest
import torch

import rl.objectives.espo  # noqa: F401  (registers "espo" until rl/objectives/__init__ imports it)
from rl.estimators import get_estimator
from rl.objectives.base import PolicyLossInputs, get_objective, k3_kl
from rl.objectives.espo import approx_kl, espo_sample

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "objectives" / "espo.json"


def _ref():
    spec = importlib.util.spec_from_file_location("espo_objective_ref", ROOT / "scripts" / "objective_refs" / "espo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = _ref()
MASK, EOS = REF.MASK, REF.EOS


# ------------------------------------------------------------------ the authors' numbers

def test_matches_authors_recorded_elbo_loss_gradient_and_kl():
    rec = json.loads(FIXTURE.read_text())
    rows = REF.compare(rec, REF.run_ours(rec))
    for what, diff, ok in rows:
        print(f"{what:<60} {diff:.3e} {'ok' if ok else 'FAIL'}")
    assert len(rows) >= 13 and all(ok for _, _, ok in rows), [r for r in rows if not r[2]]
    # the recorded case exercises both branches of the clip
    assert 0 < rec["metrics"]["clip_ratio/region_mean"] < 1


# ------------------------------------------------------------------ exact values by enumeration

P, N = 2, 4  # prompt, completion width of the enumerable setup


def _enum_model(seed: int = 3):
    model = REF.ToyDenoiser(seed=seed, width=P + N)
    with torch.no_grad():
        model.bias[MASK] = -1e4  # the mask token is never predicted: the sampler's law is over tokens 0..6
    return model


def _subset_logps(model, ids: torch.Tensor, positions: list[int]) -> dict[frozenset, dict[int, float]]:
    """For every subset M of ``positions`` (completion indices): log p(y_i | y with M masked), i in M."""
    subsets = [frozenset(c) for r in range(1, len(positions) + 1) for c in itertools.combinations(positions, r)]
    noisy = ids.repeat(len(subsets), 1)
    for k, m in enumerate(subsets):
        noisy[k, [P + i for i in m]] = MASK
    with torch.no_grad():
        lp = torch.log_softmax(model(noisy).logits[:, P:], -1).gather(-1, ids[P:].expand(len(subsets), -1)[..., None])
    return {m: {i: float(lp[k, i, 0]) for i in m} for k, m in enumerate(subsets)}


def _exact_elbo(lps: dict[frozenset, dict[int, float]], positions: list[int]) -> float:
    """ELBO = sum_l (1/l) E_{|M| = l} sum_{i in M} log p(y_i | y_{~M}) (LLaDA's L/l form)."""
    n = len(positions)
    return sum(sum(sum(v.values()) for m, v in lps.items() if len(m) == l) / math.comb(n, l) / l
               for l in range(1, n + 1))


def test_sampler_law_is_normalised_and_elbo_is_below_exact_loglik():
    """Every completion y in {0..6}^4: the random-order sampler (a uniformly random order, one token
    at a time, the not-yet-generated tokens masked) has the exact log-likelihood
    log p(y) = log E_sigma prod_j p(y_sigma_j | y_sigma_<j); its law sums to 1 over y; the mean over
    orders of the log-product is the ELBO (LLaDA's L/l form) and, by Jensen, <= log p(y)."""
    model = _enum_model()
    ys = torch.tensor(list(itertools.product(range(EOS + 1), repeat=N)))  # [Y, N]
    ids = torch.cat([torch.tensor([1, 2]).expand(len(ys), P), ys], 1)
    subsets = [frozenset(c) for r in range(1, N + 1) for c in itertools.combinations(range(N), r)]
    index = {m: k for k, m in enumerate(subsets)}
    noisy = ids[:, None].repeat(1, len(subsets), 1)
    for k, m in enumerate(subsets):
        noisy[:, k, [P + i for i in m]] = MASK
    with torch.no_grad():
        logits = model(noisy.view(-1, P + N)).logits[:, P:].view(len(ys), len(subsets), N, -1)
    lp = torch.log_softmax(logits, -1).gather(-1, ys[:, None, :, None].expand(-1, len(subsets), -1, 1))[..., 0]
    orders = list(itertools.permutations(range(N)))
    per_order = torch.stack([sum(lp[:, index[frozenset(o[j:])], o[j]] for j in range(N)) for o in orders], 1)
    loglik = torch.logsumexp(per_order, 1) - math.log(len(orders))
    in_m = torch.tensor([[i in m for i in range(N)] for m in subsets], dtype=lp.dtype)  # [S, N]
    size = torch.tensor([len(m) for m in subsets])
    scores = (lp * in_m).sum(-1)  # [Y, S]: sum over the masked tokens
    elbo = sum(scores[:, size == l].mean(-1) / l for l in range(1, N + 1))
    assert torch.allclose(per_order.mean(1), elbo, atol=1e-10)  # the L/l form = the any-order mean
    assert abs(float(loglik.exp().sum()) - 1.0) < 1e-9  # a proper distribution over completions
    gap = loglik - elbo
    assert float(gap.min()) >= 0 and float(gap.max()) > 1e-3
    k = 123  # the per-row enumeration the other tests use agrees
    assert abs(_exact_elbo(_subset_logps(model, ids[k], list(range(N))), list(range(N))) - float(elbo[k])) < 1e-10


def _draw_estimate(model, ids: torch.Tensor, first: torch.Tensor, scope: torch.Tensor,
                   reduce_var: bool) -> torch.Tensor:
    """Our estimate for each first-pass mask in ``first [n, 1, N]`` (ours: espo_sample + score + combine)."""
    est = get_estimator("espo", n_samples=1, reduce_var=reduce_var)
    out = []
    for k in range(first.shape[0]):
        sample = espo_sample(first[k:k + 1], scope, P, reduce_var)
        with torch.no_grad():
            logps = est.score(model, ids[None], None, P, sample, MASK)
        out.append(est.combine(sample, logps).seq[0])
    return torch.stack(out)


@pytest.mark.parametrize("reduce_var", [True, False])
@pytest.mark.parametrize("full_width", [True, False])
def test_exact_expectation_of_our_estimate_is_the_elbo(reduce_var, full_width):
    """E over x ~ U{0..N_b} and |m| = x of our estimate (weights (N+1)/x, complement (N+1)/(N-x))
    equals the ELBO by enumeration, for the whole width or the valid tokens only."""
    model = _enum_model()
    ids = torch.tensor([1, 2, 3, 0, EOS, EOS])  # 3 valid tokens, then EOS padding
    valid = [0, 1, 2]
    positions = list(range(N)) if full_width else valid
    scope = torch.zeros(1, N, dtype=torch.bool)
    scope[0, positions] = True
    subsets = [frozenset(c) for r in range(len(positions) + 1) for c in itertools.combinations(positions, r)]
    first = torch.zeros(len(subsets), 1, N, dtype=torch.bool)
    for k, m in enumerate(subsets):
        first[k, 0, list(m)] = True
    est = _draw_estimate(model, ids, first, scope, reduce_var)
    n = len(positions)
    mean = sum(float(est[k]) / math.comb(n, len(m)) for k, m in enumerate(subsets)) / (n + 1)
    exact = _exact_elbo(_subset_logps(model, ids, positions), positions)
    assert abs(mean - exact) < 1e-6 * abs(exact), (mean, exact)


@pytest.mark.parametrize("stratified", [True, False])
def test_monte_carlo_draws_are_unbiased(stratified):
    model = _enum_model()
    ids = torch.tensor([[1, 2, 3, 0, 1, 2], [2, 1, 3, EOS, EOS, EOS], [0, 0, 1, 1, EOS, EOS]])
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    draws = 3000  # independent draws (each its own uniform), each followed by its complement
    est = get_estimator("espo", n_samples=draws, stratified=stratified)
    sample = est.draw(None, cmask, P, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logps = est.score(model, ids, None, P, sample, MASK)
    x = (sample.weights * logps).sum(-1).view(draws, 2, 3).mean(1)  # one estimate per draw and row
    for b in range(3):
        exact = _exact_elbo(_subset_logps(model, ids[b], list(range(N))), list(range(N)))
        se = float(x[:, b].std()) / math.sqrt(draws)
        assert abs(float(x[:, b].mean()) - exact) < 4 * se, (b, float(x[:, b].mean()), exact, se)


# ------------------------------------------------------------------ the draws

def test_draw_masks_counts_complements_and_scope():
    l, b, n = 10, 5, 3
    cmask = torch.zeros(b, l, dtype=torch.long)
    for r, k in enumerate([10, 7, 3, 1, 5]):
        cmask[r, :k] = 1
    attn = torch.ones(b, 4 + l, dtype=torch.long)
    attn[1, :2] = 0
    state = torch.random.get_rng_state()
    s = get_estimator("espo", n_samples=n).draw(attn, cmask, 4, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never used
    assert s.masked.shape == (2 * n, b, 4 + l) and not s.masked[..., :4].any()  # prompt never masked
    first, comp = s.masked[0::2, :, 4:], s.masked[1::2, :, 4:]
    assert not (first & comp).any() and (first | comp).all()  # full width: every position, EOS padding too
    x = first.sum(-1)  # [n, b]
    assert torch.allclose(s.weights[0::2], first.float() * (l + 1) / x.clamp(min=1).unsqueeze(-1))
    assert torch.allclose(s.weights[1::2], comp.float() * (l + 1) / (l - x).clamp(min=1).unsqueeze(-1))
    # stratified: the rows' counts sit at offsets b (N+1)/B of one uniform draw (mod N+1)
    off = (x - x[:, :1]) % (l + 1)
    expect = torch.arange(b) * (l + 1) / b
    assert ((off - expect).abs() <= 1.0).all()  # floor or ceil of b (N+1)/B
    # valid tokens only
    s = get_estimator("espo", n_samples=n, full_width=False).draw(attn, cmask, 4, torch.Generator().manual_seed(1))
    first, comp = s.masked[0::2, :, 4:], s.masked[1::2, :, 4:]
    assert torch.equal(first | comp, cmask.bool().expand_as(first)) and not (first & comp).any()
    nv = cmask.sum(-1)
    assert torch.allclose(s.weights[0::2], first.float() * ((nv + 1) / first.sum(-1).clamp(min=1)).unsqueeze(-1))
    # reduce_var=False: the n draws alone
    s = get_estimator("espo", n_samples=n, reduce_var=False).draw(attn, cmask, 4, torch.Generator().manual_seed(1))
    assert s.masked.shape[0] == n


@pytest.mark.parametrize("stratified", [True, False])
def test_each_rows_count_is_uniform(stratified):
    l, b, draws = 6, 4, 7000
    est = get_estimator("espo", n_samples=draws, reduce_var=False, stratified=stratified)
    s = est.draw(None, torch.ones(b, l, dtype=torch.long), 2, torch.Generator().manual_seed(0))
    x = s.masked[..., 2:].sum(-1)  # [draws, b]
    for r in range(b):
        freq = torch.bincount(x[:, r], minlength=l + 1).double() / draws
        assert (freq - 1 / (l + 1)).abs().max() < 0.02, (r, freq)


# ------------------------------------------------------------------ the loss

def _inputs(logp, old, adv, mask, ref=None, beta=0.0, eps=0.2, eps_high=None):
    return PolicyLossInputs(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, mask=mask, epsilon=eps,
                            epsilon_high=eps_high, beta=beta)


def test_first_iteration_loss_and_gradient_are_normalised_by_the_width():
    obj = get_objective("espo")
    logp = torch.tensor([-30.0, -12.0, -50.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]).double()
    out = obj.loss(_inputs(logp, logp.detach(), adv, mask))
    assert torch.allclose(out.loss, -adv) and not out.clipped.any()
    out.loss.sum().backward()
    assert torch.allclose(logp.grad, -adv / 8)  # d rho / d logp = 1 / L at rho = 1 (L = width, not |o_i|)
    for norm, z in (("length", mask.sum(-1)), ("none", torch.ones(3, dtype=torch.float64))):
        x = logp.detach().clone().requires_grad_(True)
        get_objective("espo", normalize=norm).loss(_inputs(x, x.detach(), adv, mask)).loss.sum().backward()
        assert torch.allclose(x.grad, -adv / z)


def test_clip_uses_epsilon_and_epsilon_high_on_the_normalised_ratio():
    obj = get_objective("espo")
    mask = torch.ones(4, 10, dtype=torch.float64)
    old = torch.zeros(4, dtype=torch.float64)
    logp = 10 * torch.log(torch.tensor([1.5, 1.25, 0.7, 0.5], dtype=torch.float64))  # ratio^(1/10) -> 1.5, ...
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    out = obj.loss(_inputs(logp, old, adv, mask, eps=0.2, eps_high=0.3))
    assert torch.allclose(out.loss, torch.tensor([-1.3, -1.25, 0.8, -0.5], dtype=torch.float64))
    assert out.clipped.tolist() == [True, False, True, False]


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_variants(name):
    d = torch.tensor([-3.0, -0.5, 0.0, 0.4, 2.0], dtype=torch.float64)
    ref = torch.tensor([-20.0, -10.0, -5.0, -1.0, -30.0], dtype=torch.float64)
    logp = (ref + d).requires_grad_(True)
    val = approx_kl(logp, ref, name)
    val.sum().backward()
    value, grad = {"k1": (d, 1 + d), "k2": (d * d / 2, d), "k3": (torch.exp(-d) + d - 1, 1 - torch.exp(-d))}[name]
    assert torch.allclose(val, value) and torch.allclose(logp.grad, grad)
    if name == "k3":
        assert torch.allclose(val, k3_kl(logp, ref))
    # in the loss: beta * KL / L, added per sequence
    mask = torch.ones(5, 4, dtype=torch.float64)
    obj = get_objective("espo", kl_estimator=name)
    x = logp.detach()
    out = obj.loss(_inputs(x, x, torch.zeros(5, dtype=torch.float64), mask, ref=ref, beta=0.1))
    assert torch.allclose(out.loss, 0.1 * value / 4) and torch.allclose(out.kl, value / 4)


def test_options_and_errors():
    with pytest.raises(ValueError, match="kl_estimator"):
        get_objective("espo", kl_estimator="k4")
    with pytest.raises(ValueError, match="normalize"):
        get_objective("espo", normalize="mean")
    with pytest.raises(ValueError, match="unknown option"):
        get_objective("espo", num_mc=2)
    with pytest.raises(ValueError, match="sequence-level"):
        get_objective("espo").loss(_inputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)))
    # a token-level estimator's terms are summed to one per sequence
    mf = get_estimator("mean_field")
    sample = mf.draw(None, torch.ones(2, 3, dtype=torch.long), 2, torch.Generator().manual_seed(0))
    logps = torch.randn(1, 2, 3)
    assert torch.allclose(get_objective("espo").terms(mf, sample, logps, torch.ones(2, 3), {}), logps[0].sum(-1))
    from rl.config import DiffuGRPOConfig

    cfg = DiffuGRPOConfig(objective="espo")
    assert (cfg.estimator, cfg.estimator_options, cfg.loss_type) == ("espo", {"n_samples": 2, "reduce_var": True},
                                                                     "grpo")


# ------------------------------------------------------------------ a short real run

def test_short_training_run(tmp_path):
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer
    from rollout import build_tiny_policy
    from tests.helpers.toy_grpo import target_char_reward

    policy = build_tiny_policy(seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128)
    cfg = DiffuGRPOConfig(
        run_dir=str(tmp_path / "run"), seed=0, max_steps=2, lr=3e-3, per_device_prompts=2, num_generations=4,
        num_iterations=2, beta=0.02, epsilon=0.2, objective="espo", advantage="rloo",
        rollout=RolloutOptions(gen_length=8, block_length=8, steps=8, temperature=1.0),
        sample_table_every=0, micro_batch_size=4, max_grad_norm=1.0, export_hf=False,
    )
    trainer = DiffuGRPOTrainer(cfg, policy, [{"prompt": f"{i:03d}"} for i in range(16)],
                               reward_funcs=[target_char_reward])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    drawn = []
    draw = trainer.estimator.draw

    def spy(*a, **k):
        drawn.append(draw(*a, **k))
        return drawn[-1]

    trainer.estimator.draw = spy
    trainer.train()
    assert len(drawn) == 2 * 2 and all(s.masked.shape[0] == 4 for s in drawn)  # 2 pairs per draw
    for s in drawn:  # the complementary pair covers the whole completion width
        assert (s.masked[0::2, :, -8:] | s.masked[1::2, :, -8:]).all()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        for key in ("loss", "kl", "clip_ratio/region_mean", "grad_norm", "reward"):
            assert math.isfinite(r[key]), (key, r)
    assert any(r["kl"] > 0 for r in rows)  # the policy moved away from the reference
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
