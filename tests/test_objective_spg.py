"""SPG (rl/objectives/spg.py): the mask draw's law and conventions, the ELBO/EUBO sandwich on a
model small enough to enumerate, equality with the authors' numbers recorded in
tests/fixtures/objectives/spg.json (scripts/objective_refs/spg.py), and a short training run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import rl.objectives.spg  # noqa: F401  (registers "spg" until rl/objectives/__init__.py imports it)
from rl.estimators import ESTIMATORS, get_estimator
from rl.objectives import OBJECTIVES, PolicyLossInputs, get_objective
from rl.objectives.spg import FORWARD_TYPES, SPG, SPGMasks, spg_elbo, spg_eubo

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "objectives" / "spg.json"


def _ref_module():
    spec = importlib.util.spec_from_file_location("spg_reference", ROOT / "scripts" / "objective_refs" / "spg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = _ref_module()
P, L, MASK = REF.P, REF.L, REF.MASK


def _batch():
    b = REF.toy_batch()
    input_ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attention_mask = torch.cat([b["prompt_mask"], torch.ones_like(b["completion_ids"])], 1)
    return b, input_ids, attention_mask


# ---------------------------------------------------------------- registration and defaults

def test_registered_with_the_published_defaults():
    assert ESTIMATORS["spg"] is SPGMasks and OBJECTIVES["spg"] is SPG
    est = get_estimator("spg")  # spg/slurm_scripts/spg_{eubo,mix}/*.sbatch + train.yaml
    assert (est.forward_type, est.num_t, est.min_t, est.max_t) == ("block_random", 2, 0.0, 1.0)
    assert (est.block_length, est.use_mask_prompt, est.p_mask_prompt) == (32, True, 0.15)
    obj = get_objective("spg")
    assert (obj.logp_estimation, obj.eubo_beta, obj.mix_weight) == ("mix", 1.5, 0.5)
    assert obj.estimator == "spg" and not obj.uses_old and not obj.supports_kl
    assert obj.default_loss_type("sequence") == "dapo"
    with pytest.raises(ValueError, match="logp_estimation"):
        get_objective("spg", logp_estimation="iwae")
    with pytest.raises(ValueError, match="forward_type"):
        get_estimator("spg", forward_type="blocks")


def test_config_picks_the_spg_estimator_and_refuses_a_kl():
    from rl.config import ConfigError, DiffuGRPOConfig

    cfg = DiffuGRPOConfig(objective="spg", beta=0.0, objective_options={"logp_estimation": "eubo"})
    assert (cfg.estimator, cfg.loss_type) == ("spg", "dapo")
    with pytest.raises(ConfigError, match="no KL"):
        DiffuGRPOConfig(objective="spg", beta=0.04)


# ---------------------------------------------------------------- the mask draw

def test_draw_uses_only_the_passed_generator():
    b, _, am = _batch()
    est = get_estimator("spg", block_length=2)
    state = torch.random.get_rng_state()
    s1 = est.draw(am, b["completion_mask"], P, torch.Generator().manual_seed(3))
    s2 = est.draw(am, b["completion_mask"], P, torch.Generator().manual_seed(3))
    s3 = est.draw(am, b["completion_mask"], P, torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(s1.masked, s2.masked) and torch.equal(s1.weights, s2.weights)
    assert not torch.equal(s1.masked, s3.masked)


@pytest.mark.parametrize("forward_type", FORWARD_TYPES)
@pytest.mark.parametrize("light", [False, True])
def test_draw_conventions(forward_type, light):
    """Padding never masked; after the first EOS always masked, never scored; weights n / |S_k|;
    block semantics of semi-AR decoding (earlier clean, chosen partially/fully, later fully masked)."""
    b, _, am = _batch()
    est = SPGMasks(forward_type=forward_type, num_t=1 if forward_type == "all" else 2, block_length=2,
                   use_mask_prompt=light, p_mask_prompt=0.3, n_samples=200)
    s = est.draw(am, b["completion_mask"], P, torch.Generator().manual_seed(0))
    valid = b["completion_mask"].bool()
    n = valid.sum(-1)
    comp, scored = s.masked[..., P:], s.weights != 0
    assert not (s.masked[..., :P] & ~b["prompt_mask"].bool()).any()  # padding
    assert s.masked[..., :P].any() == light
    assert (comp | valid).all() and not (scored & ~valid).any()  # after EOS: masked, not scored
    assert torch.equal(scored, comp & valid)  # every masked valid token scored (the authors' code)
    cnt = scored.sum(-1)
    assert (cnt >= 1).all()
    assert torch.allclose(s.weights.sum(-1), n.float().expand_as(cnt))  # |S_k| * n / |S_k|
    if forward_type == "all":
        assert comp.all()
    if light or not forward_type.startswith("block"):
        return
    blocks = comp.view(*comp.shape[:2], L // 2, 2)  # [K, B, block, 2]
    vblocks = valid.view(-1, L // 2, 2)
    for k, i in itertools.product(range(comp.shape[0]), range(comp.shape[1])):
        c = int(blocks[k, i].any(-1).float().argmax())  # the chosen block: the first one touched
        assert blocks[k, i, c + 1:].all(), "blocks after the chosen one are fully masked"
        assert vblocks[i, c].any(), "the chosen block holds valid tokens"
        hit = int((blocks[k, i, c] & vblocks[i, c]).sum())
        assert 1 <= hit <= int(vblocks[i, c].sum())
        if forward_type == "block_all":
            assert blocks[k, i, c].all()


def test_light_mask_reaches_clean_blocks_and_later_blocks_can_be_left_unscored():
    b, _, am = _batch()
    kw = dict(forward_type="block_random", block_length=2, p_mask_prompt=0.5, n_samples=100)
    theirs = SPGMasks(**kw).draw(am, b["completion_mask"], P, torch.Generator().manual_seed(1))
    prompt_only = SPGMasks(**kw, mask_clean_blocks=False).draw(am, b["completion_mask"], P,
                                                               torch.Generator().manual_seed(1))
    block_only = SPGMasks(**kw, score_later_blocks=False).draw(am, b["completion_mask"], P,
                                                               torch.Generator().manual_seed(1))
    assert (theirs.weights != 0).sum() > (prompt_only.weights != 0).sum()
    # same masks, fewer scored tokens: only the chosen block (and earlier light hits)
    assert torch.equal(theirs.masked, block_only.masked)
    assert ((block_only.weights != 0) <= (theirs.weights != 0)).all()
    assert (block_only.weights != 0).sum() < (theirs.weights != 0).sum()


def _exact_block_pair_law(num_blocks: int, valid_blocks: int, num_t: int = 2) -> dict[tuple, float]:
    """The authors' choice: the first num_t entries of a uniform permutation, modulo valid_blocks."""
    law: dict[tuple, float] = {}
    perms = list(itertools.permutations(range(num_blocks)))
    for p in perms:
        key = tuple(x % valid_blocks for x in p[:num_t])
        law[key] = law.get(key, 0.0) + 1 / len(perms)
    return law


def test_block_choice_and_count_follow_the_authors_law():
    """4 blocks of 2; rows with 3 (2 valid blocks) and 5 (3 valid blocks) valid tokens."""
    cm = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    n = 20000
    s = SPGMasks(forward_type="block_random", block_length=2, use_mask_prompt=False, n_samples=n).draw(
        None, cm, 1, torch.Generator().manual_seed(0))
    comp = s.masked[..., 1:].view(n, 2, 2, 4, 2).any(-1)  # [draws, pass, row, block]
    chosen = comp.float().argmax(-1)  # first masked block = chosen (no light mask)
    for row, vb in ((0, 2), (1, 3)):
        law = _exact_block_pair_law(4, vb)
        for (c0, c1), p in law.items():
            freq = ((chosen[:, 0, row] == c0) & (chosen[:, 1, row] == c1)).float().mean()
            assert abs(float(freq) - p) < 0.015, (row, c0, c1, float(freq), p)
    # P(block 0) = 3/8 != 1/3 for 3 valid blocks out of 4: the authors' permutation-mod scheme
    assert abs(float((chosen[:, 0, 1] == 0).float().mean()) - 0.5) < 0.015
    # count in the chosen block: uniform on {1, ..., m}; row 1, block 2 has m = 1 valid token
    scored = (s.weights != 0).view(n, 2, 2, 4, 2)
    in_block0 = scored[:, 0, 1, 0].sum(-1)[chosen[:, 0, 1] == 0]
    assert abs(float((in_block0 == 1).float().mean()) - 0.5) < 0.02  # m = 2: c in {1, 2}


def test_block_forms_beyond_the_authors_asserts():
    """Width not a multiple of block_length (a shorter last block) and num_t > blocks."""
    cm = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    for ft in ("block_all", "block_random"):
        s = SPGMasks(forward_type=ft, num_t=5, block_length=3, use_mask_prompt=False).draw(
            None, cm, 2, torch.Generator().manual_seed(0))
        assert s.masked.shape == (5, 2, 9) and ((s.weights != 0).sum(-1) >= 1).all()
        assert (s.masked[..., 2:] | cm.bool()).all()
        # passes 0-2 use one permutation of the 3 blocks: distinct blocks for the 7-token row
        first = s.masked[:3, 1, 2:].float().argmax(-1) // 3
        assert sorted(first.tolist()) == [0, 1, 2]


def test_random_count_range_matches_min_t_max_t():
    cm = torch.ones(1, 10, dtype=torch.long)
    s = SPGMasks(forward_type="random", num_t=4, min_t=0.3, max_t=0.7, use_mask_prompt=False, n_samples=500).draw(
        None, cm, 2, torch.Generator().manual_seed(0))
    counts = (s.weights != 0).sum(-1).flatten()
    assert set(counts.tolist()) == {3, 4, 5, 6, 7}  # floor(10 * 0.3) .. floor(10 * 0.7)


# ---------------------------------------------------------------- the bounds

def _subset_passes(n: int, extra_masked: torch.Tensor, width: int) -> torch.Tensor:
    """The 'random' (min_t 0, max_t 1) mask law over n valid tokens as equally likely passes:
    count c ~ U{1..n}, subset uniform, i.e. P(m) = 1 / (n C(n, |m|)), each mask replicated
    lcm / (n C(n, |m|)) times. ``extra_masked`` (the after-EOS positions) is masked in all."""
    lcm = math.lcm(*[n * math.comb(n, c) for c in range(1, n + 1)])
    passes = []
    for c in range(1, n + 1):
        for sub in itertools.combinations(range(n), c):
            m = extra_masked.clone()
            m[list(sub)] = True
            passes += [m] * (lcm // (n * math.comb(n, c)))
    return torch.stack(passes)[:, :width]


def _exact_logp(model, ids: torch.Tensor, am: torch.Tensor, n: int) -> float:
    """log pi(y | x) of the any-order unmasking process (one token per step, uniform order),
    enumerating the n! orders; positions after the first EOS stay masked."""
    total = 0.0
    for order in itertools.permutations(range(n)):
        lp = 0.0
        revealed: list[int] = []
        for pos in order:
            masked = torch.ones(L, dtype=torch.bool)
            masked[revealed] = False
            x = ids.clone()
            x[P:] = torch.where(masked, torch.full_like(x[P:], MASK), x[P:])
            logits = model(x[None], attention_mask=am[None]).logits[0, P + pos]
            lp += float(torch.log_softmax(logits, -1)[ids[P + pos]])
            revealed.append(pos)
        total += math.exp(lp)
    return math.log(total / math.factorial(n))


@pytest.mark.parametrize("row", [0, 2])  # 5 and 3 valid tokens
def test_exact_elbo_and_eubo_sandwich_the_enumerated_likelihood(row):
    """Taken exactly over the 'random' mask law, SPG's per-token ELBO <= log pi / n <= its EUBO at
    beta = n (Hoelder: E[prod_l q_l] <= prod_l E[q_l^n]^(1/n); E_mask[(n/c) 1{l masked} f] is
    E over unmasking orders of f at l's reveal step), and ELBO <= EUBO for every beta > 0."""
    b, ids, am = _batch()
    model = REF.ToySPGModel(seed=1, scale=1.5)
    cm = b["completion_mask"][row:row + 1]
    n = int(cm.sum())
    after_eos = ~cm[0].bool()
    comp = _subset_passes(n, after_eos, L)  # [K, L]
    masked = torch.cat([torch.zeros(comp.shape[0], P, dtype=torch.bool), comp], 1)[:, None]  # [K, 1, T]
    sample = REF.sample_from_masks(masked, cm)
    with torch.no_grad():
        logps = SPGMasks().score(model, ids[row:row + 1], am[row:row + 1], P, sample, MASK)
        scored = sample.weights != 0
        elbo = float(spg_elbo(logps, scored))
        exact = _exact_logp(model, ids[row], am[row], n) / n
        eubo_n = float(spg_eubo(logps, scored, cm, float(n)))
        assert elbo < exact < eubo_n, (elbo, exact, eubo_n)
        for beta in (0.5, 1.0, 1.5, 2.0):
            assert elbo <= float(spg_eubo(logps, scored, cm, beta)) + 1e-12
        # ... and the EUBO grows with beta (power means)
        betas = [float(spg_eubo(logps, scored, cm, beta)) for beta in (1.0, 2.0, 4.0, 8.0)]
        assert betas == sorted(betas)


def test_one_pass_eubo_minus_elbo_is_the_mask_ratio_term():
    """With K = 1 the sandwich holds for every mask: EUBO - ELBO = -(1/beta) log t >= 0."""
    b, ids, am = _batch()
    model = REF.ToySPGModel(seed=2)
    est = SPGMasks(forward_type="random", num_t=1)
    for seed in range(5):
        s = est.draw(am, b["completion_mask"], P, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logps = est.score(model, ids, am, P, s, MASK)
        scored = s.weights != 0
        t = scored.sum(-1)[0].double() / b["completion_mask"].sum(-1)
        gap = spg_eubo(logps, scored, b["completion_mask"], 1.5) - spg_elbo(logps, scored)
        assert torch.allclose(gap, -t.log() / 1.5, atol=1e-12)


# ---------------------------------------------------------------- terms and loss

def test_terms_choose_the_bound_by_advantage_sign():
    b, ids, am = _batch()
    model = REF.ToySPGModel(seed=0)
    est = get_estimator("spg", block_length=2)
    s = est.draw(am, b["completion_mask"], P, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logps = est.score(model, ids, am, P, s, MASK)
    scored = s.weights != 0
    elbo, eubo = spg_elbo(logps, scored), spg_eubo(logps, scored, b["completion_mask"], 1.5)
    adv = b["advantages"]
    pos = adv > 0
    expect = {"elbo": elbo, "eubo": torch.where(pos, elbo, eubo), "zero": torch.where(pos, elbo, 0.0),
              "mix": torch.where(pos, elbo, 0.3 * eubo + 0.7 * elbo)}
    for name, want in expect.items():
        obj = SPG(logp_estimation=name, mix_weight=0.3)
        rows = obj.prepare(adv, adv, 4)
        assert rows["positive"].tolist() == [True, False, False, False]  # 0 takes the negative branch
        got = obj.terms(est, s, logps, b["completion_mask"], rows)
        assert torch.allclose(got, want, atol=1e-12), name
        out = obj.loss(PolicyLossInputs(logp=got, old_logp=got, ref_logp=None, advantages=adv,
                                        mask=b["completion_mask"].float()))
        assert torch.allclose(out.loss, -adv.double() * got) and out.kl is None and out.clipped is None


def test_eubo_gradient_is_finite_with_never_scored_tokens():
    logps = torch.tensor([[[-1.0, -2.0, 0.0, 0.0]], [[-0.5, 0.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    scored = torch.tensor([[[True, True, False, False]], [[True, False, False, False]]])
    cm = torch.tensor([[1, 1, 1, 0]])
    v = spg_eubo(logps, scored, cm, 1.5)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(logps.grad).all()
    assert (logps.grad[~scored] == 0).all()
    # by hand: t = (2/3, 1/3); token 0 in both passes, token 1 in pass 0 only
    t0 = math.log(0.5 * (math.exp(-1.5) * 1.5 + math.exp(-0.75) * 3)) / 1.5
    t1 = math.log(0.5 * math.exp(-3.0) * 1.5) / 1.5
    assert abs(float(v.detach()) - (t0 + t1) / 2) < 1e-12


# ---------------------------------------------------------------- the authors' numbers

def test_matches_the_recorded_authors_numbers():
    fx = json.loads(FIXTURE.read_text())
    model = REF.ToySPGModel(seed=0).load_flat(fx["params"])
    batch = {k: torch.tensor(v) for k, v in fx["batch"].items()}
    assert len(fx["cases"]) == 16
    for key, case in fx["cases"].items():
        ft, est = key.split("/")
        masked = torch.tensor([[[c == "1" for c in row] for row in kb] for kb in fx["masks"][ft]])
        ours = REF.run_ours(model, batch, REF.sample_from_masks(masked, batch["completion_mask"]), est,
                            fx["eubo_beta"], fx["mix_weight"])
        assert torch.allclose(ours["terms"], torch.tensor(case["terms"], dtype=torch.float64), rtol=1e-11,
                              atol=1e-12), key
        assert abs(float(ours["loss"]) - case["loss"]) < 1e-12, key
        assert torch.allclose(REF.grad_sketch(ours["grad"]), torch.tensor(case["grad_sketch"], dtype=torch.float64),
                              rtol=1e-10, atol=1e-12), key
        if "grad" in case:
            assert torch.allclose(ours["grad"], torch.tensor(case["grad"], dtype=torch.float64), rtol=1e-10,
                                  atol=1e-12), key


# ---------------------------------------------------------------- a short training run

def test_short_training_run_with_spg(tmp_path):
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer
    from rollout import build_tiny_policy
    from tests.helpers.toy_grpo import target_char_reward

    policy = build_tiny_policy(seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)
    cfg = DiffuGRPOConfig(
        run_dir=str(tmp_path / "run"), seed=0, max_steps=3, lr=3e-3, per_device_prompts=2, num_generations=4,
        num_iterations=2, beta=0.0, objective="spg", objective_options={"logp_estimation": "mix"},
        estimator_options={"block_length": 4}, deepspeed="zero0", save_steps=0, sample_table_every=0,
        rollout=RolloutOptions(gen_length=8, block_length=4, steps=8, temperature=1.0), micro_batch_size=4,
        max_grad_norm=1.0, export_hf=False, wandb_mode="disabled")
    trainer = DiffuGRPOTrainer(cfg, policy, [{"prompt": f"{i:03d}"} for i in range(16)],
                               reward_funcs=[target_char_reward])
    assert trainer.estimator.name == "spg" and trainer.objective.name == "spg"
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    drawn = []
    draw = trainer.estimator.draw

    def spy(*a, **k):
        s = draw(*a, **k)
        drawn.append(s)
        return s

    trainer.estimator.draw = spy
    trainer.train()
    assert len(drawn) == 3 * 2 and all(s.num_passes == 2 for s in drawn)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    for key in ("loss", "grad_norm", "reward", "kl"):
        assert key in last and math.isfinite(last[key]), key
    changed = sum(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert changed > 0
