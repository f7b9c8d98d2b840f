"""rl.estimators: exact ELBO by enumerating every mask on a model small enough to enumerate,
unbiasedness of the Monte-Carlo estimators, variance of coupled / antithetic forms, and the
mean-field masks. Run with ``-s`` to see the measured variances."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from rl.estimators import ESTIMATORS, MaskSample, estimate_pair, get_estimator
from rl.losses import diffusion_sft_loss
from rl.masking import apply_mask, sample_t
from rollout.types import completion_mask_from_eos

V, MASK, EOS, PAD = 6, 5, 4, 0  # toy vocabulary: tokens 0..4 (4 = EOS), 5 = mask
P, L = 2, 4
BIG_CHUNK = 1 << 16  # the toy vocabulary is tiny: one log-softmax chunk


class ToyBidirectional(torch.nn.Module):
    """logits[t] = bias[t] + sum_s W[t, s, x_s]: every position sees every other (bidirectional),
    so log p(y_l | masked sequence) depends on which tokens are masked."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(scale * torch.randn(P + L, P + L, V, V, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(P + L, V, generator=g, dtype=torch.float64))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        onehot = torch.nn.functional.one_hot(ids, V).double()
        if attention_mask is not None:
            onehot = onehot * attention_mask[..., None]
        return SimpleNamespace(logits=self.bias + torch.einsum("nsv,tsvw->ntw", onehot, self.w))


def _batch():
    """3 rows: prompt (row 1 left-padded) + completion with 4, 3 and 2 valid tokens."""
    prompt = torch.tensor([[1, 2], [PAD, 3], [2, 2]])
    prompt_mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    completion = torch.tensor([[1, 2, 3, 1], [2, 1, EOS, EOS], [3, EOS, EOS, EOS]])
    completion_mask = completion_mask_from_eos(completion, EOS)
    input_ids = torch.cat([prompt, completion], 1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    return input_ids, attention_mask, completion_mask


# ---------------------------------------------------------------- exact values by enumeration

def _subset_scores(model, input_ids, attention_mask, completion_mask) -> list[dict[frozenset, float]]:
    """Per row: S(m) = sum_{l in m} log p(y_l | y with m masked) for every subset m of the valid
    completion tokens, with a plain float64 log_softmax (independent of rl.logprobs)."""
    out = []
    for b in range(input_ids.shape[0]):
        valid = completion_mask[b].nonzero().squeeze(-1).tolist()
        subsets = [frozenset(c) for r in range(len(valid) + 1) for c in itertools.combinations(valid, r)]
        noisy = input_ids[b].repeat(len(subsets), 1)
        for i, m in enumerate(subsets):
            noisy[i, [P + l for l in m]] = MASK
        with torch.no_grad():
            logp = torch.log_softmax(model(noisy, attention_mask[b].expand_as(noisy)).logits, -1)
        tok = logp[:, P:].gather(-1, input_ids[b, P:].expand(len(subsets), L)[..., None]).squeeze(-1)
        out.append({m: float(sum(tok[i, l] for l in m)) for i, m in enumerate(subsets)})
    return out


def _beta_int(p: int, q: int, a: float, b: float) -> float:
    """int_a^b t^p (1 - t)^q dt for integers p >= -1, q >= 0 (binomial expansion of (1-t)^q);
    infinite for p = -1, a = 0 (the 1/t-form variance diverges without eps)."""
    total = 0.0
    for j in range(q + 1):
        k = p + j
        if k == -1 and a == 0:
            return math.inf
        prim = math.log(b / a) if k == -1 else (b ** (k + 1) - a ** (k + 1)) / (k + 1)
        total += math.comb(q, j) * (-1) ** j * prim
    return total


def _exact_moments(scores: dict[frozenset, float], name: str, a: float) -> tuple[float, float]:
    """(E[X], E[X^2]) of one draw X of the estimator ``name`` (t-range parameter ``a``).

    1/t form, t ~ U(a, 1): X = S(m)/t with P(m | t) = t^|m| (1-t)^(L-|m|), so
        E[X] = sum_m S(m) int_a^1 t^(|m|-1) (1-t)^(L-|m|) dt / (1-a),  E[X^2] likewise with t^(|m|-2).
    L/l form: P(m) = (1/L) / C(L, |m|) for |m| >= 1 and X = (L/|m|) S(m).
    coupled, t ~ U(a, 1-a): X = (S(m)/t + S(m^c)/(1-t)) / 2; its square expands into three
    integrals, the last one mapped by u = 1 - t onto the first form."""
    full = max(scores, key=len)
    n = len(full)
    e1 = e2 = 0.0
    for m, s in scores.items():
        k, sc = len(m), scores[full - m]
        if name == "mc_elbo_ll":
            if k:
                prob = 1 / n / math.comb(n, k)
                e1, e2 = e1 + prob * n / k * s, e2 + prob * (n / k * s) ** 2
        elif name == "mc_elbo":
            if k:
                e1 += s * _beta_int(k - 1, n - k, a, 1) / (1 - a)
                e2 += s * s * _beta_int(k - 2, n - k, a, 1) / (1 - a)
        elif name == "coupled":
            z = 1 - 2 * a
            if k:
                e1 += s * _beta_int(k - 1, n - k, a, 1 - a) / z
                e2 += 0.25 * s * s * _beta_int(k - 2, n - k, a, 1 - a) / z
            if k and n - k:
                e2 += 0.5 * s * sc * _beta_int(k - 1, n - k - 1, a, 1 - a) / z
            if n - k:
                e2 += 0.25 * sc * sc * _beta_int(n - k - 2, k, a, 1 - a) / z
    return e1, e2


def _per_draw(sample: MaskSample, logps: torch.Tensor, pair: bool = False) -> torch.Tensor:
    """One estimate per draw, ``[N, B]``: sum_l weights * logps per pass (mean of the pair for coupled)."""
    x = (sample.weights * logps).sum(-1)
    return x.view(-1, 2, x.shape[-1]).mean(1) if pair else x


# ---------------------------------------------------------------- unbiasedness and variance

def test_exact_elbo_forms_agree():
    """Both ELBO forms give a mask of size l the weight B(l, L-l+1), so their exact values are
    equal (1/t form with eps = 0), and close to it for eps = 1e-3."""
    model = ToyBidirectional()
    for scores in _subset_scores(model, *_batch()):
        ll, _ = _exact_moments(scores, "mc_elbo_ll", 0)
        t0, _ = _exact_moments(scores, "mc_elbo", 0)
        t_eps, _ = _exact_moments(scores, "mc_elbo", 1e-3)
        c_eps, _ = _exact_moments(scores, "coupled", 1e-3)
        assert ll < 0 and abs(ll - t0) < 1e-10 * abs(ll)
        assert abs(t_eps - ll) < 1e-2 * abs(ll) and abs(c_eps - ll) < 1e-2 * abs(ll)
        # the toy model is context dependent: S(m) is not additive over the tokens of m
        full = max(scores, key=len)
        assert abs(scores[full] - sum(scores[frozenset([i])] for i in full)) > 1e-3


@pytest.mark.parametrize("name,options,draws", [
    ("mc_elbo", {"eps": 1e-3}, 20000),
    ("mc_elbo_ll", {}, 20000),
    ("coupled", {"t_min": 1e-3}, 10000),  # 10000 pairs = 20000 passes
])
def test_monte_carlo_mean_within_ci_of_exact_elbo(name, options, draws):
    model = ToyBidirectional()
    input_ids, attention_mask, completion_mask = _batch()
    a = options.get("eps", options.get("t_min", 0.0))
    exact = [_exact_moments(s, name, a) for s in _subset_scores(model, input_ids, attention_mask, completion_mask)]
    est = get_estimator(name, n_samples=draws, chunk_size=BIG_CHUNK, **options)
    sample = est.draw(attention_mask, completion_mask, P, torch.Generator().manual_seed(123))
    with torch.no_grad():
        out = est.estimate(model, input_ids, attention_mask, P, completion_mask, MASK, sample=sample)
    x = _per_draw(sample, out.logps, pair=name == "coupled")
    torch.testing.assert_close(out.seq, x.mean(0), rtol=1e-9, atol=1e-9)  # combine = mean over draws
    for b, (e1, e2) in enumerate(exact):
        se = math.sqrt((e2 - e1 ** 2) / x.shape[0])
        z = (x[:, b].mean().item() - e1) / se
        print(f"{name} row {b}: exact {e1:.4f}  MC {x[:, b].mean().item():.4f}  sd {math.sqrt(e2 - e1**2):.3f}"
              f"  (empirical {x[:, b].std().item():.3f})  z = {z:+.2f}")
        assert abs(z) < 5
    if name == "mc_elbo_ll":  # bounded weights: the empirical variance is a reliable check too
        for b, (e1, e2) in enumerate(exact):
            assert 0.85 < x[:, b].var().item() / (e2 - e1 ** 2) < 1.15


def test_coupled_and_ll_have_lower_variance_than_plain_mc():
    """Exact variances (by enumeration) at equal cost of 2 forward passes per estimate: one
    coupled pair vs two independent 1/t draws vs two L/l draws."""
    model = ToyBidirectional()
    for b, scores in enumerate(_subset_scores(model, *_batch())):
        if len(max(scores, key=len)) < 2:
            continue
        e1, e2 = _exact_moments(scores, "mc_elbo", 1e-3)
        plain = (e2 - e1 ** 2) / 2
        c1, c2 = _exact_moments(scores, "coupled", 1e-3)
        coupled = c2 - c1 ** 2
        l1, l2 = _exact_moments(scores, "mc_elbo_ll", 0)
        ll = (l2 - l1 ** 2) / 2
        d1, d2 = _exact_moments(scores, "coupled", 0.2)  # DiffuCoder's t range
        print(f"row {b}: Var per 2 passes: mc_elbo {plain:.3f}  coupled {coupled:.3f} ({coupled / plain:.2f}x)  "
              f"mc_elbo_ll {ll:.3f} ({ll / plain:.2f}x)  coupled t in [0.2,0.8] {d2 - d1**2:.3f}")
        assert coupled < 0.95 * plain
        assert ll < plain


def test_coupled_masks_are_complementary():
    input_ids, attention_mask, completion_mask = _batch()
    g = torch.Generator().manual_seed(0)
    s = get_estimator("coupled", n_samples=50).draw(attention_mask, completion_mask, P, g)
    m = s.masked[:, :, P:].view(50, 2, 3, L)
    assert s.num_passes == 100
    assert torch.equal(m[:, 0] ^ m[:, 1], completion_mask.bool().expand(50, 3, L))  # each valid token once
    assert not (m.any(1) & ~completion_mask.bool()).any() and not s.masked[:, :, :P].any()
    w = s.weights.view(50, 2, 3, L)
    t = w[:, 0].max(-1).values.reciprocal()  # 1/t on the first pass's masked tokens
    has = m[:, 0].any(-1) & m[:, 1].any(-1)
    torch.testing.assert_close(w[:, 1].max(-1).values[has], (1 / (1 - t))[has], rtol=1e-5, atol=1e-5)


def test_mc_elbo_ll_masks_exactly_l_of_the_valid_tokens():
    input_ids, attention_mask, completion_mask = _batch()
    n = 6000
    s = get_estimator("mc_elbo_ll", n_samples=n).draw(attention_mask, completion_mask, P,
                                                      torch.Generator().manual_seed(0))
    count = s.masked[:, :, P:].sum(-1)
    n_valid = completion_mask.sum(-1)
    assert not (s.masked[:, :, P:] & ~completion_mask.bool()).any() and not s.masked[:, :, :P].any()
    assert ((count >= 1) & (count <= n_valid)).all()
    torch.testing.assert_close(s.weights.max(-1).values, n_valid / count.float())
    for b, lb in enumerate(n_valid.tolist()):  # l ~ U{1..L_b}
        freq = torch.bincount(count[:, b], minlength=lb + 1)[1:].double() / n
        assert (freq - 1 / lb).abs().max() < 5 * math.sqrt((1 / lb) * (1 - 1 / lb) / n)


def test_antithetic_shared_masks_reduce_variance_of_the_difference():
    """VRPO: with reference = policy + small weight noise, Var(B_pi - B_ref) is far smaller when
    both are scored on the same MaskSample than on independent ones."""
    policy = ToyBidirectional(seed=0)
    reference = ToyBidirectional(seed=0)
    with torch.no_grad():
        reference.w.add_(0.02 * torch.randn(reference.w.shape, generator=torch.Generator().manual_seed(9),
                                            dtype=torch.float64))
    input_ids, attention_mask, completion_mask = _batch()
    est = get_estimator("mc_elbo", n_samples=4000, chunk_size=BIG_CHUNK)
    g = torch.Generator().manual_seed(5)
    shared = est.draw(attention_mask, completion_mask, P, g)
    with torch.no_grad():
        pi, ref = estimate_pair(est, policy, reference, input_ids, attention_mask, P, completion_mask, MASK,
                                sample=shared)
        other = est.draw(attention_mask, completion_mask, P, g)
        ref_indep = est.estimate(reference, input_ids, attention_mask, P, completion_mask, MASK, sample=other)
    d_shared = _per_draw(shared, pi.logps) - _per_draw(shared, ref.logps)
    d_indep = _per_draw(shared, pi.logps) - _per_draw(other, ref_indep.logps)
    v_shared, v_indep = d_shared.var(0), d_indep.var(0)
    print(f"Var(B_pi - B_ref): shared masks {v_shared.tolist()}  independent {v_indep.tolist()}")
    assert (v_shared < 0.05 * v_indep).all()


# ---------------------------------------------------------------- mean field

def _padded_prompts(b=8, p=30, l=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 60, (b, p + l), generator=g)
    attn = torch.ones(b, p + l, dtype=torch.long)
    for i in range(b):
        attn[i, : 3 * i] = 0  # left padding of 0, 3, ..., 21 tokens
        ids[i, : 3 * i] = 0
    completion_mask = torch.ones(b, l, dtype=torch.long)
    completion_mask[1, 3:] = 0
    return ids, attn, completion_mask


def test_mean_field_masks():
    ids, attn, completion_mask = _padded_prompts()
    p = ids.shape[1] - completion_mask.shape[1]
    est = get_estimator("mean_field", n_samples=200)
    s = est.draw(attn, completion_mask, p, torch.Generator().manual_seed(0))
    real = attn[:, :p].bool().expand(200, -1, -1)
    assert s.masked[:, :, p:].all()  # completion fully masked
    assert not s.masked[:, :, :p][~real].any()  # padding never masked
    rate, n = s.masked[:, :, :p][real].double().mean().item(), real.sum().item()
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n), rate
    assert torch.equal(s.weights, completion_mask.float().expand(200, -1, -1))
    s2 = get_estimator("mean_field", p_mask_prompt=0.5).draw(attn, completion_mask, p, torch.Generator().manual_seed(0))
    assert abs(s2.masked[0, :, :p][attn[:, :p].bool()].double().mean().item() - 0.5) < 0.1


def test_mean_field_per_token_logps_equal_direct_computation(tiny_model):
    ids, attn, completion_mask = _padded_prompts(b=4, p=12, l=8)
    p = 12
    est = get_estimator("mean_field")
    g = torch.Generator().manual_seed(1)
    sample = est.draw(attn, completion_mask, p, g)
    out = est.estimate(tiny_model, ids, attn, p, completion_mask, mask_id=1, sample=sample)
    with torch.no_grad():
        logits = tiny_model(apply_mask(ids, sample.masked[0], 1), attention_mask=attn).logits
    direct = torch.log_softmax(logits.float(), -1)[:, p:].gather(-1, ids[:, p:, None]).squeeze(-1) * completion_mask
    torch.testing.assert_close(out.per_token, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seq, direct.sum(-1), rtol=1e-5, atol=1e-4)
    out.seq.sum().backward()  # differentiable through the chunked log-probs
    assert tiny_model.get_input_embeddings().weight.grad.abs().sum() > 0


# estimators drawn from masks alone (the trajectory ones read a rollout's trace and are deterministic
# given it: tests/test_objective_trajectory.py covers them; the block-causal forms score a block-diffusion
# model: tests/test_block_diffusion.py)
MASK_ESTIMATORS = sorted(n for n, cls in ESTIMATORS.items() if not cls.needs_trace and not n.startswith("block_"))


@pytest.mark.parametrize("name", MASK_ESTIMATORS)
def test_batched_passes_equal_chunked_forwards(tiny_model, name):
    """K passes concatenated along the batch in one forward == max_batch-row forwards."""
    ids, attn, completion_mask = _padded_prompts(b=3, p=10, l=6)
    sample = get_estimator(name, n_samples=3).draw(attn, completion_mask, 10, torch.Generator().manual_seed(2))
    with torch.no_grad():
        one = get_estimator(name).score(tiny_model, ids, attn, 10, sample, 1)
        chunked = get_estimator(name, max_batch=2, chunk_size=3).score(tiny_model, ids, attn, 10, sample, 1)
    torch.testing.assert_close(one, chunked, rtol=1e-5, atol=1e-5)
    assert one.shape == sample.weights.shape and (one[sample.weights == 0] == 0).all()
    assert (one[sample.weights != 0] < 0).all()


# ---------------------------------------------------------------- generators and registry

@pytest.mark.parametrize("name", MASK_ESTIMATORS)
def test_successive_draws_are_distinct_and_reproducible(name):
    """d1's bug: 12 iterations gave 6 distinct masks. Here mu = 12 draws from one generator are
    all different, the same seed replays them, and the global RNG is untouched."""
    ids, attn, completion_mask = _padded_prompts(b=4, p=16, l=8)
    est = get_estimator(name)
    state = torch.get_rng_state()

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [est.draw(attn, completion_mask, 16, g) for _ in range(12)]

    first, again = draws(0), draws(0)
    keys = {(s.masked.numpy().tobytes(), s.weights.numpy().tobytes()) for s in first}
    assert len(keys) == 12
    assert all(torch.equal(a.masked, b.masked) and torch.equal(a.weights, b.weights) for a, b in zip(first, again))
    assert torch.equal(torch.get_rng_state(), state)


def test_registry_and_errors():
    assert {"mean_field", "mc_elbo", "mc_elbo_ll", "coupled"} <= set(ESTIMATORS)  # + the objectives' own
    assert get_estimator("mc_elbo", n_samples=4, eps=0.01).n_samples == 4
    with pytest.raises(ValueError, match="unknown estimator 'elbo'"):
        get_estimator("elbo")
    with pytest.raises(ValueError, match="p_mask_prompt"):
        get_estimator("mc_elbo", p_mask_prompt=0.1)
    with pytest.raises(ValueError, match="n_samples"):
        get_estimator("coupled", n_samples=0)
    ids, attn, completion_mask = _padded_prompts(b=2, p=5, l=3)
    with pytest.raises(ValueError, match="attention_mask"):
        get_estimator("mean_field").draw(attn[:, :4], completion_mask, 5, None)
    est = get_estimator("mean_field")
    sample = est.draw(attn[:, :5], completion_mask, 5, torch.Generator().manual_seed(0))  # the prompt mask works too
    assert torch.equal(sample.masked, est.draw(attn, completion_mask, 5, torch.Generator().manual_seed(0)).masked)
    with pytest.raises(ValueError, match="attention_mask"):
        est.score(ToyBidirectional(), ids, attn[:, :5], 5, sample, MASK)
    with pytest.raises(ValueError, match="input_ids"):
        est.score(ToyBidirectional(), ids[:, 1:], attn, 5, sample, MASK)


def test_diffusion_sft_loss_masks_response_only_and_weights_by_1_over_t():
    """LLaDA SFT: t ~ U(eps, 1) per row, only response tokens masked, CE on masked tokens / t,
    normalised by the response length. The masks are recorded from the model's input."""
    ids, attn, _ = _padded_prompts(b=4, p=10, l=8)
    response = torch.zeros_like(ids)
    response[:, 10:] = 1
    response[2, 15:] = 0
    seen = []
    toy_logits = torch.randn(4, 18, 64, generator=torch.Generator().manual_seed(3))

    def model(x, attention_mask=None):
        seen.append(x)
        return SimpleNamespace(logits=toy_logits + 0.1 * (x == 1)[..., None])

    loss = diffusion_sft_loss(model, ids, response, mask_id=1, attention_mask=attn,
                              generator=torch.Generator().manual_seed(7))
    masked = seen[0] == 1
    assert masked.any() and not (masked & ~response.bool()).any()
    t = sample_t((4, 1), torch.Generator().manual_seed(7), "cpu")  # the loss's first draw
    logp = torch.log_softmax(model(seen[0]).logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    expect = (-(logp * masked).sum(1) / t.squeeze(1) / response.sum(1)).mean()
    torch.testing.assert_close(loss, expect)
