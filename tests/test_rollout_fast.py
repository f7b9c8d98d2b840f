"""Fast modes of the sampler: threshold decoding, block KV cache, early commit, EOS fill, and the
learned unmasking-order hook."""

import pytest
import torch

from rollout import PolicyAdapter, StepState, build_tiny_policy, generate
from rollout.kv_cache import BlockKVCache, window_mask
from test_rollout_sampler import MASK, EOS, EosFrom, ShiftedModel, left_pad, random_prompts


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy(seed=1, initializer_range=0.3).eval()


@pytest.fixture(scope="module", params=["eurobert", "bert"])
def one_layer(request):
    """One-layer tiny models: RoPE (EuroBERT) and learned absolute positions (BERT)."""
    return build_tiny_policy(seed=2, num_hidden_layers=1, initializer_range=0.3, arch=request.param).eval()


@pytest.fixture(scope="module")
def batch():
    return left_pad(random_prompts([5, 8, 3], seed=9))


def run(model, ids, mask, **kw):
    base = dict(steps=16, gen_length=32, block_length=8, mask_id=MASK, attention_mask=mask)
    return generate(model, ids, **{**base, **kw})


def test_threshold_commits_at_least_one_and_tau_above_one_is_baseline(policy, batch):
    ids, mask = batch
    base = run(policy, ids, mask)
    same = run(policy, ids, mask, threshold=1.5)
    assert torch.equal(same.sequences, base.sequences) and torch.equal(same.unmask_step, base.unmask_step)
    fast = run(policy, ids, mask, threshold=0.3)
    assert (fast.completion_ids != MASK).all() and (fast.unmask_step >= 0).all()
    # every step commits >= 1 token in each row whose current block still had masks
    for t in range(fast.num_steps):
        hits = fast.unmask_step == t
        (k,) = (hits.nonzero()[:, 1] // 8).unique().tolist()  # the block decoded at step t
        for b in range(ids.shape[0]):
            if (fast.unmask_step[b, 8 * k:8 * k + 8] >= t).any():
                assert hits[b].sum() >= 1, (t, b)
    assert fast.num_steps < base.num_steps
    everything = run(policy, ids, mask, threshold=0.0)  # every probability passes: one step per block
    assert everything.num_steps == 4 and everything.num_forward_passes == 4
    assert torch.equal(everything.unmask_step, torch.arange(4).repeat_interleave(8).expand(3, -1))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_kv_cache_exact_on_one_layer_model(one_layer, batch, mode, cfg_scale):
    """With one layer, frozen keys/values depend only on frozen tokens: the cache is exact."""
    ids, mask = batch
    ref = run(one_layer, ids, mask, cfg_scale=cfg_scale)
    out = run(one_layer, ids, mask, cfg_scale=cfg_scale, kv_cache=mode)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.unmask_step, ref.unmask_step)
    assert out.num_forward_passes == ref.num_forward_passes


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_kv_cache_exact_with_one_step_per_block_and_approximate_otherwise(policy, batch, mode):
    ids, mask = batch
    # one step per block: only the block-start full forward is used -> exact for any depth
    ref = run(policy, ids, mask, steps=4, threshold=None)
    assert torch.equal(run(policy, ids, mask, steps=4, kv_cache=mode).sequences, ref.sequences)
    # several steps per block on a 4-layer model: an approximation (frozen keys/values are stale)
    ref = run(policy, ids, mask)
    out = run(policy, ids, mask, kv_cache=mode)
    assert (out.completion_ids != MASK).all()
    first = (ref.unmask_step == 0)  # step 0 is the full forward in both: identical commits
    assert torch.equal(out.unmask_step == 0, first)
    assert torch.equal(out.completion_ids[first], ref.completion_ids[first])


def test_cache_lookahead_spans_dual_to_prefix(policy, batch):
    """``cache_lookahead`` recomputes that many positions after the block under the dual cache: 0 is
    the dual cache, the whole rest of the completion is the prefix cache (same windows, same tokens)."""
    ids, mask = batch
    for threshold in (None, 0.6):
        dual = run(policy, ids, mask, threshold=threshold, kv_cache="dual")
        prefix = run(policy, ids, mask, threshold=threshold, kv_cache="prefix")
        assert torch.equal(run(policy, ids, mask, threshold=threshold, kv_cache="dual", cache_lookahead=0).sequences,
                           dual.sequences)
        wide = run(policy, ids, mask, threshold=threshold, kv_cache="dual", cache_lookahead=24)
        assert torch.equal(wide.sequences, prefix.sequences) and torch.equal(wide.unmask_step, prefix.unmask_step)
        assert wide.extras["cache_lookahead"] == 24
    widths = []  # query window width of every forward: the block + 8 positions, cut at the sequence end
    hook = policy.model.get_input_embeddings().register_forward_hook(lambda m, inp, out: widths.append(inp[0].shape[1]))
    try:
        mid = run(policy, ids, mask, kv_cache="dual", cache_lookahead=8)
    finally:
        hook.remove()
    P = ids.shape[1]
    assert (mid.completion_ids != MASK).all() and mid.num_forward_passes == dual.num_forward_passes
    assert widths == [w for k in range(4) for w in [P + 32] + [8 + min(8, 24 - 8 * k)] * 3]
    for bad in (dict(cache_lookahead=8), dict(kv_cache="prefix", cache_lookahead=8),
                dict(kv_cache="dual", cache_lookahead=-1)):
        with pytest.raises(ValueError, match="cache_lookahead="):
            run(policy, ids, mask, **bad)


def test_cached_window_logits_equal_full_forward_on_one_layer(one_layer, batch):
    ids, mask = batch
    model = one_layer.model
    x = torch.cat([ids, torch.full((3, 16), MASK)], 1)
    full_mask = torch.cat([mask, torch.ones(3, 16, dtype=mask.dtype)], 1)
    with torch.no_grad():
        cache = BlockKVCache()
        model(x, attention_mask=full_mask, past_key_values=cache)
        x[:, 8:12] = torch.randint(8, 100, (3, 4))  # commit some tokens of the block [8, 16)
        cache.set_window(8)
        win = model(x[:, 8:16], attention_mask=window_mask(full_mask, 8, 16, torch.float32),
                    position_ids=torch.arange(8, 16)[None], past_key_values=cache).logits
        full = model(x, attention_mask=full_mask).logits[:, 8:16]
    torch.testing.assert_close(win, full, rtol=1e-4, atol=1e-5)


def test_kv_cache_refuses_unsupported_models(tiny_model, batch):
    ids, mask = batch
    shifted = PolicyAdapter(ShiftedModel(tiny_model), mask_token_id=MASK, logits_shifted=True)
    with pytest.raises(ValueError, match="ShiftedModel is not verified for the block cache"):
        run(shifted, ids, mask, kv_cache="dual")
    with pytest.raises(ValueError, match="EosFrom"):
        run(EosFrom(tiny_model, 3), ids, mask, kv_cache="prefix")
    with pytest.raises(ValueError, match="kv_cache='full'"):
        run(tiny_model, ids, mask, kv_cache="full")


def test_early_commit(policy, batch):
    ids, mask = batch
    base = run(policy, ids, mask)
    never = run(policy, ids, mask, early_commit=1.5)  # no gap reaches 1.5: the baseline
    assert torch.equal(never.sequences, base.sequences) and torch.equal(never.unmask_step, base.unmask_step)
    at_once = run(policy, ids, mask, early_commit=0.0)  # every gap passes: all committed at step 0
    assert at_once.num_steps == 1 and (at_once.unmask_step == 0).all()
    x = torch.cat([ids, torch.full((3, 32), MASK)], 1)
    full_mask = torch.cat([mask, torch.ones_like(x[:, ids.shape[1]:])], 1)
    with torch.no_grad():
        logits = policy(x, attention_mask=full_mask).logits[:, ids.shape[1]:]
    logits[..., MASK] = float("-inf")
    assert torch.equal(at_once.completion_ids, logits.argmax(-1))
    dual = run(policy, ids, mask, early_commit=0.0, kv_cache="dual")  # scope: the current block
    assert dual.num_steps == 4 and torch.equal(dual.unmask_step, torch.arange(4).repeat_interleave(8).expand(3, -1))
    mid = run(policy, ids, mask, early_commit=0.5)
    assert (mid.completion_ids != MASK).all() and mid.num_steps <= base.num_steps


def test_fill_after_eos(tiny_model, batch):
    ids, mask = batch
    P = ids.shape[1]
    model = EosFrom(tiny_model, P + 4)
    base = run(model, ids, mask, eos_id=EOS)
    out = run(model, ids, mask, eos_id=EOS, fill_after_eos=True)
    comp = out.completion_ids
    assert (comp != MASK).all() and (out.unmask_step >= 0).all()
    for b in range(3):
        first = comp[b].tolist().index(EOS)
        assert (comp[b, first:] == EOS).all()
        # the fill happens at the step that committed the first EOS, never before it
        assert (out.unmask_step[b, first + 1:] <= out.unmask_step[b, first]).all()
    assert out.num_steps < base.num_steps
    with pytest.raises(ValueError, match="eos_id"):
        run(EosFrom(tiny_model, 3), ids, mask, fill_after_eos=True)


def test_order_policy_scores_right_to_left(policy, batch):
    ids, mask = batch
    seen = []

    def right_to_left(state: StepState) -> torch.Tensor:
        seen.append(state)
        return torch.arange(state.block_end - state.block_start, dtype=torch.float).expand_as(state.masked)

    out = run(policy, ids, mask, steps=32, order_policy=right_to_left, record_scores=True)
    for blk in out.unmask_step.view(3, 4, 8):
        assert (blk[:, 1:] < blk[:, :-1]).all()  # strictly right to left inside every block
    s = seen[5]
    assert s.hidden_states is not None and s.hidden_states.shape == (3, 8, policy.config.hidden_size)
    assert s.logits.shape == (3, 8, policy.config.vocab_size) and s.masked.shape == (3, 8)
    assert s.masked.sum(1).tolist() == [3, 3, 3] and s.num_transfer.tolist() == [1, 1, 1]
    assert [t.step_fraction for t in seen] == [i / 32 for i in range(32)]
    assert out.step_scores.shape == (3, 32, 32)
    # recorded scores: the policy's, on the candidates only (step 5: completion positions 0..2 left)
    assert torch.equal(out.step_scores[:, 5, :3], torch.tensor([0.0, 1.0, 2.0]).expand(3, -1))
    assert out.step_scores[:, 5, 3:].isnan().all()


def test_order_policy_selection_plackett_luce(policy, batch):
    ids, mask = batch
    g = torch.Generator().manual_seed(0)

    def plackett_luce(state: StepState) -> torch.Tensor:
        """Gumbel-top-k of learned scores (here: the confidences) = a Plackett-Luce sample of k positions."""
        gumbel = -torch.log(-torch.log(torch.rand(state.masked.shape, generator=g)))
        keys = (state.confidence.log() + gumbel).masked_fill(~state.masked, float("-inf"))
        ranks = keys.argsort(1, descending=True).argsort(1)
        return (ranks < state.num_transfer[:, None]) & state.masked

    out = run(policy, ids, mask, order_policy=plackett_luce)
    assert (out.completion_ids != MASK).all()
    counts = torch.stack([torch.bincount(r, minlength=16) for r in out.unmask_step])
    assert (counts == 2).all()  # the schedule's 2 per step, chosen by the policy

    def bad(state):
        return ~state.masked | state.masked

    with pytest.raises(ValueError, match="not masked"):
        run(policy, ids, mask, steps=16, order_policy=bad)
