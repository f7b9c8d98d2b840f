"""Unmasking-order learner: the policy module, what rollouts record, and short training runs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from rl.config import RolloutOptions
from rl.plackett_luce import plackett_luce_logprob
from rl.unmask_order import (OrderPolicy, PlackettLuceOrder, UnmaskOrderConfig, generate_with_order,
                             rebuild_states, trajectory_states)

RO = RolloutOptions(gen_length=8, block_length=4, steps=6, temperature=0.0)  # 2 blocks x 3 steps, k = 2,1,1


@pytest.fixture
def policy():
    from rollout import build_tiny_policy

    return OrderPolicy(build_tiny_policy(seed=0))


def prompts(tok, n):
    from rl.data import encode_prompt, left_pad

    return left_pad([encode_prompt(tok, "x" * (1 + i % 3)) for i in range(n)], tok.pad_token_id)


def randomize_head(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_head_starts_uniform_and_dllm_frozen(policy):
    ids, mask = prompts(policy.tokenizer, 3)
    hook = PlackettLuceOrder(policy.head, gen_length=RO.gen_length, generator=torch.Generator().manual_seed(0))
    generate_with_order(policy.dllm, hook, ids, mask, RO)
    # every draw of k positions among n candidates has probability 1 / (n (n-1) ... (n-k+1))
    want = [-math.log(4 * 3), -math.log(2), 0.0] * 2  # per block: k=2 of 4, k=1 of 2, forced
    got = torch.stack(hook.step_logps, 1)
    torch.testing.assert_close(got, torch.tensor(want).expand(3, 6))
    assert not any(p.requires_grad for p in policy.dllm.parameters())
    assert all(p.requires_grad for p in policy.head.parameters())


def test_head_block_score_is_bounded_and_the_gate_ranks_by_confidence():
    from rl.unmask_order import UnmaskPolicyHead

    torch.manual_seed(0)
    hidden, logp = torch.randn(4, 6, 16), -3 * torch.rand(4, 6)
    feats, masked, frac = torch.stack([logp.exp(), logp / 10], -1), torch.ones(4, 6, dtype=torch.bool), torch.rand(4)

    def head(bound):
        h = UnmaskPolicyHead(16, d_model=32, n_heads=2, ff_dim=64, conf_scale=50.0, residual_bound=bound)
        with torch.no_grad():  # a large trained-looking block output
            h.out.weight.normal_(0, 1.0)
            h.out.bias.fill_(1.0)
        return h

    bounded, unbounded = head(1.0), head(0.0)
    unbounded.load_state_dict(bounded.state_dict())
    s = bounded(hidden, feats, masked, frac)
    raw = unbounded(hidden, feats, masked, frac)  # residual_bound=0: the block's raw output
    assert raw.abs().max() > 3.0
    torch.testing.assert_close(s, torch.tanh(raw))  # gate 0: the block alone, squashed into (-1, 1)
    with torch.no_grad():
        bounded.conf_gate.fill_(0.1)  # score = block + 5 log p_max
    s = bounded(hidden, feats, masked, frac)
    gap = 5 * (logp[:, :, None] - logp[:, None, :])  # [row, i, j]
    clear = gap > 2.0  # more than twice the bound: the block cannot reorder i and j
    assert clear.any() and bool(((s[:, :, None] > s[:, None, :]) | ~clear).all())
    with pytest.raises(ValueError, match="residual_bound"):
        UnmaskPolicyHead(16, residual_bound=-1.0)


def test_head_init_is_seeded_and_leaves_the_global_rng_alone():
    from rollout import build_tiny_policy

    dllm = build_tiny_policy(seed=0)
    state = torch.random.get_rng_state()
    a, b, c = (OrderPolicy(dllm, seed=s).head.state_dict() for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj.weight"], c["proj.weight"])


def test_trajectory_states_candidates_chosen_and_forced_step():
    # one row, L = 8, blocks of 4, 2 steps per block (steps 0,1 -> block 0; 2,3 -> block 1)
    unmask_step = torch.tensor([[1, 0, 0, 1, 3, 2, 3, 3]])
    rank = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 1]])
    st = trajectory_states(unmask_step, rank, steps=4, block_length=4)
    assert st.step.tolist() == [0, 1, 2, 3] and st.row.tolist() == [0, 0, 0, 0]
    assert st.start.tolist() == [0, 0, 4, 4]
    assert st.masked.int().tolist() == [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]]
    assert st.rank.tolist() == [[-1, 1, 0, -1], [0, -1, -1, 0], [-1, 0, -1, -1], [0, -1, 0, 1]]
    assert st.has_policy_term.tolist() == [True, False, True, False]  # last step of a block is forced
    with pytest.raises(ValueError, match="exactly once"):
        trajectory_states(torch.tensor([[1, 0, 0, 1, 0, 2, 3, 3]]), rank, steps=4, block_length=4)


def test_recorded_trajectories_reproduce_rollout_logprobs_cached_and_recomputed(policy):
    """Training never re-runs the sampler: from unmask_step + the recorded draw order it gets the
    rollout's own log-probs, from cached hidden states and from rebuilt states x_s alike."""
    randomize_head(policy)
    ids, mask = prompts(policy.tokenizer, 4)
    hook = PlackettLuceOrder(policy.head, gen_length=RO.gen_length, generator=torch.Generator().manual_seed(0),
                             cache=True)
    ro = generate_with_order(policy.dllm, hook, ids, mask, RO)
    rollout_logp = torch.stack(hook.step_logps)  # [S, B]
    assert (rollout_logp[[0, 1, 3, 4]] < 0).all()
    st = trajectory_states(ro.unmask_step, hook.rank_in_step, steps=RO.steps, block_length=RO.block_length)
    assert len(st.row) == 4 * RO.steps
    with torch.no_grad():
        cached = sum(policy(st.masked, st.frac, hidden=hook.hidden[st.step, st.row],
                            feats=hook.feats[st.step, st.row])[:2])
        p = ro.prompt_ids.shape[1]
        x = rebuild_states(ro.sequences, ro.unmask_step, st, p, policy.mask_token_id)
        window = p + st.start[:, None] + torch.arange(RO.block_length)[None]
        recomputed = sum(policy(st.masked, st.frac, input_ids=x, attention_mask=ro.attention_mask[st.row],
                                window=window)[:2])
    want = rollout_logp[st.step, st.row]
    for scores in (cached, recomputed):
        lp = plackett_luce_logprob(scores, st.masked, st.rank) * st.has_policy_term
        torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)
    # x_s holds exactly the tokens committed before s
    assert ((x[:, p:] == policy.mask_token_id) == (ro.unmask_step[st.row] >= st.step[:, None])).all()


def test_greedy_hook_commits_top_k_scores():
    from rollout import build_tiny_policy

    dllm = build_tiny_policy(seed=0)
    left_first = lambda hidden, feats, masked, frac: -torch.arange(masked.shape[1]).float().expand(masked.shape)
    ids, mask = prompts(dllm.tokenizer, 2)
    hook = PlackettLuceOrder(left_first, gen_length=8, greedy=True)
    ro = generate_with_order(dllm, hook, ids, mask, RO)
    assert ro.unmask_step.tolist() == [[0, 0, 1, 2, 3, 3, 4, 5]] * 2


def toy_trainer(tmp_path, **kw):
    from rollout import build_tiny_policy
    from rl.unmask_order import UnmaskOrderTrainer

    cfg = UnmaskOrderConfig(run_dir=str(tmp_path / "run"), per_device_prompts=2, num_generations=8,
                            wandb_mode="disabled", **{"lr": 3e-3, "max_steps": 12, "rollout": RO, **kw})
    rows = [{"prompt": "x" * (1 + i % 5)} for i in range(10)]
    seen = {}
    # Reward read from the rollout itself: the fraction of position pairs (i < j) of each block
    # committed left to right. Only the order can earn it.
    def reward_fn(prompts, completions, **cols):
        u = seen["ro"].unmask_step.view(len(completions), -1, RO.block_length)
        pairs = (u[..., :, None] <= u[..., None, :]).triu(1).sum((-1, -2, -3)).float()
        r = (pairs / (u.shape[1] * RO.block_length * (RO.block_length - 1) / 2)).tolist()
        return SimpleNamespace(total=r, per_function={"left_first": r})

    trainer = UnmaskOrderTrainer(cfg, build_tiny_policy(seed=0), rows, reward_fn=reward_fn)
    rollout = trainer.rollout

    def spy(rows):
        out = rollout(rows)
        seen["ro"] = out[0]
        return out

    trainer.rollout = spy
    return trainer


def test_training_learns_a_rewarded_order_and_exports(tmp_path):
    from rl.unmask_order import load_order_policy

    # Only the block can learn this order (confidence says nothing about it); block_kl (default 0.2,
    # tuned on Sudoku where the block is mostly noise) would slow it down: see the block-KL tests.
    trainer = toy_trainer(tmp_path, export_hf=True, block_kl=0.0)
    trainer.train()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"left-to-right reward: first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last > first + 0.1, (first, last)
    for key in ("loss", "clip_ratio/region_mean", "order/logp_per_step", "reward_std", "timing/rollout"):
        assert key in rows[-1], key
    # the export loads back with the trained head
    loaded = load_order_policy(tmp_path / "run" / "final")
    trained = trainer.engine.module
    assert loaded.head_options() == trained.head_options()  # sizes, conf_scale, residual_bound
    for a, b in zip(loaded.head.state_dict().values(), trained.head.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not torch.equal(trained.head.out.weight, torch.zeros_like(trained.head.out.weight))


def test_co_training_updates_the_dllm(tmp_path):
    trainer = toy_trainer(tmp_path, train_dllm=True, cache_features=False, max_steps=2,
                          rollout=RolloutOptions(gen_length=8, block_length=4, steps=6, temperature=1.0))
    before = [p.detach().clone() for p in trainer.engine.module.dllm.parameters()]
    metrics = trainer.train()
    assert math.isfinite(metrics["loss"])
    after = list(trainer.engine.module.dllm.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="rollout.threshold"):
        toy_trainer(tmp_path, rollout=RolloutOptions(gen_length=8, block_length=4, steps=6, threshold=0.9))
    with pytest.raises(ValueError, match="block_kl"):
        toy_trainer(tmp_path, block_kl=-1.0)
    with pytest.raises(KeyError, match="prompt"):
        from rl.unmask_order import UnmaskOrderTrainer
        from rollout import build_tiny_policy

        UnmaskOrderTrainer(UnmaskOrderConfig(run_dir=str(tmp_path)), build_tiny_policy(), [{"q": 1}])


def test_block_kl_k3_on_plackett_luce_draws_is_unbiased():
    """The block-KL term: k3 of log pi (block + confidence) vs log pi_conf on draws from pi,
    averaged, matches KL(pi || pi_conf) enumerated over every ordered selection (k=2 of 4)."""
    from itertools import permutations

    from rl.grpo import k3_kl
    from rl.plackett_luce import sample_plackett_luce

    conf, block = torch.tensor([0.0, -0.3, -1.0, -2.0]), torch.tensor([0.8, -0.5, 0.4, 0.0])
    cand = torch.ones(4, dtype=torch.bool)

    def logp(scores, sel):
        rank = torch.full((4,), -1)
        rank[list(sel)] = torch.arange(len(sel))
        return plackett_luce_logprob(scores, cand, rank)

    exact = sum(logp(block + conf, s).exp() * (logp(block + conf, s) - logp(conf, s))
                for s in permutations(range(4), 2))
    n = 200_000
    rank = sample_plackett_luce((block + conf).expand(n, 4), cand.expand(n, 4), 2,
                                generator=torch.Generator().manual_seed(0))
    k3 = k3_kl(plackett_luce_logprob((block + conf).expand(n, 4), cand.expand(n, 4), rank),
               plackett_luce_logprob(conf.expand(n, 4), cand.expand(n, 4), rank))
    est, se = k3.mean(), k3.std() / n ** 0.5
    print(f"KL(pi || pi_conf): enumerated {exact:.5f}, k3 mean over {n} draws {est:.5f} +- {se:.5f}")
    assert (k3 >= 0).all() and exact > 0.05
    assert abs(est - exact) < 4 * se


def test_block_kl_gradient_reaches_the_block_only(policy):
    from rl.unmask_order import block_kl

    ids, mask = prompts(policy.tokenizer, 2)
    hook = PlackettLuceOrder(policy.head, gen_length=RO.gen_length, generator=torch.Generator().manual_seed(0),
                             cache=True)
    ro = generate_with_order(policy.dllm, hook, ids, mask, RO)
    st = trajectory_states(ro.unmask_step, hook.rank_in_step, steps=RO.steps, block_length=RO.block_length)
    args = (st.masked, st.frac)
    feats = dict(hidden=hook.hidden[st.step, st.row], feats=hook.feats[st.step, st.row])
    block, conf, _ = policy(*args, **feats)
    assert float(block_kl(block, conf, st.masked, st.rank).detach().abs().max()) == 0.0  # fresh head: block 0
    randomize_head(policy)
    with torch.no_grad():
        policy.head.conf_gate.fill_(0.05)
    block, conf, _ = policy(*args, **feats)
    kl = block_kl(block, conf, st.masked, st.rank)
    assert float(kl.detach().sum()) > 0
    kl.sum().backward()
    assert policy.head.conf_gate.grad is None or float(policy.head.conf_gate.grad.abs().max()) == 0.0
    assert float(policy.head.out.weight.grad.abs().max()) > 0


def test_block_kl_holds_the_block_back(tmp_path):
    """On the toy reward only the block can earn (left-to-right order), a large block-KL
    coefficient keeps the learned policy close to the confidence-only one."""
    def run(beta, name):
        trainer = toy_trainer(tmp_path / name, block_kl=beta, max_steps=8)
        trainer.train()
        rows = [json.loads(l) for l in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r["order/block_kl"] for r in rows if "order/block_kl" in r]

    free, held = run(0.0, "free"), run(50.0, "held")
    print(f"block KL over the last 3 steps: block_kl=0 {sum(free[-3:]) / 3:.4f}, block_kl=50 {sum(held[-3:]) / 3:.4f}")
    assert free[0] == held[0] == 0.0  # both start from the uniform head
    assert sum(held[-3:]) < 0.5 * sum(free[-3:])
