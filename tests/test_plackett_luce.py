"""Plackett-Luce math of the unmasking-order learner, checked against brute-force enumeration."""

import itertools
import math

import pytest
import torch

from rl.plackett_luce import plackett_luce_logprob, sample_plackett_luce

# 0.999 quantile of chi-square with 23 degrees of freedom (24 outcomes); scipy is not a dependency.
CHI2_23_Q999 = 49.728


def full_order_prob(h: list[float], order: tuple[int, ...]) -> float:
    """PL probability of a complete ordering: prod_j exp(h_j) / sum_{l >= j} exp(h_l)."""
    p, rest = 1.0, list(order)
    for i in order:
        p *= math.exp(h[i]) / sum(math.exp(h[r]) for r in rest)
        rest.remove(i)
    return p


def brute_force_prefix_prob(h: list[float], cand: list[int], prefix: tuple[int, ...]) -> float:
    """Marginal probability that a complete PL ordering of ``cand`` starts with ``prefix``."""
    return sum(full_order_prob(h, perm) for perm in itertools.permutations(cand) if perm[:len(prefix)] == prefix)


def as_rank(n: int, prefix: tuple[int, ...]) -> torch.Tensor:
    rank = torch.full((n,), -1, dtype=torch.long)
    for j, i in enumerate(prefix):
        rank[i] = j
    return rank


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, generator=g) * 1.5
    candidates = torch.tensor([True, False, True, True, False, True])  # 4 candidates among 6
    return scores, candidates


def test_logprob_matches_brute_force_enumeration(case):
    scores, candidates = case
    cand = candidates.nonzero().flatten().tolist()
    h = scores.tolist()
    for k in (1, 2, 3):
        prefixes = list(itertools.permutations(cand, k))
        ranks = torch.stack([as_rank(6, p) for p in prefixes])
        got = plackett_luce_logprob(scores.expand(len(prefixes), 6), candidates.expand(len(prefixes), 6), ranks)
        want = torch.tensor([math.log(brute_force_prefix_prob(h, cand, p)) for p in prefixes])
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
        # the ordered selections of size k are a distribution
        assert abs(got.exp().sum().item() - 1.0) < 1e-5


def test_uniform_scores_give_uniform_ordered_selections(case):
    _, candidates = case
    rank = as_rank(6, (3, 0))
    lp = plackett_luce_logprob(torch.zeros(6), candidates, rank)
    assert lp.item() == pytest.approx(-math.log(4 * 3))


def test_gradient_is_finite_with_non_candidates_and_empty_selection(case):
    scores, candidates = case
    s = scores.clone().requires_grad_(True)
    ranks = torch.stack([as_rank(6, (2, 5)), torch.full((6,), -1)])
    lp = plackett_luce_logprob(s.expand(2, 6), candidates.expand(2, 6), ranks)
    assert lp[1].item() == 0.0  # nothing drawn: log 1
    lp.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[~candidates] == 0).all()  # non-candidates do not influence the probability
    # d/dh of log-softmax terms sums to zero over the candidates
    assert abs(s.grad.sum().item()) < 1e-5


def test_sampling_frequencies_match_probabilities(case):
    scores, candidates = case
    cand = candidates.nonzero().flatten().tolist()
    n_draws, k = 24_000, 3
    rank = sample_plackett_luce(scores.expand(n_draws, 6), candidates.expand(n_draws, 6), k,
                                generator=torch.Generator().manual_seed(0))
    assert ((rank >= 0).sum(-1) == k).all() and (rank[:, ~candidates] == -1).all()
    order = rank.masked_fill(rank < 0, 99).argsort(-1)[:, :k]  # positions in draw order
    counts: dict[tuple, int] = {}
    for row in order.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    prefixes = list(itertools.permutations(cand, k))
    assert set(counts) <= set(prefixes)
    h = scores.tolist()
    chi2 = 0.0
    for p in prefixes:
        expected = n_draws * brute_force_prefix_prob(h, cand, p)
        chi2 += (counts.get(p, 0) - expected) ** 2 / expected
    print(f"chi-square over {len(prefixes)} ordered selections: {chi2:.2f} (0.999 quantile {CHI2_23_Q999})")
    assert chi2 < CHI2_23_Q999


def test_greedy_takes_top_k_in_order_and_k_per_row(case):
    scores, candidates = case
    rank = sample_plackett_luce(scores.expand(2, 6), candidates.expand(2, 6), torch.tensor([2, 9]), greedy=True)
    cand_scores = scores.masked_fill(~candidates, float("-inf"))
    top = cand_scores.argsort(descending=True)
    assert rank[0, top[0]] == 0 and rank[0, top[1]] == 1 and (rank[0] >= 0).sum() == 2
    assert (rank[1] >= 0).sum() == int(candidates.sum())  # k clipped to the candidate count


def test_bad_input_raises(case):
    scores, candidates = case
    with pytest.raises(ValueError, match="not a candidate"):
        plackett_luce_logprob(scores, candidates, as_rank(6, (1,)))
    with pytest.raises(ValueError, match="same shape"):
        sample_plackett_luce(scores, candidates[:5], 1)
