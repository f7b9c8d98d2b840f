"""Trajectory likelihoods (rl/objectives/trajectory.py): d2-StepMerge and TraceRL. The segmentations,
the passes they build, the exact sampled-trajectory likelihood with one segment per step, equality with
the authors' recorded numbers (tests/fixtures/objectives/{d2_stepmerge,tracerl}.json) and short runs
through DiffuGRPOTrainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rl.objectives.trajectory  # noqa: F401  (registers them until rl/objectives/__init__.py imports it)
from rl.aggregation import LOSS_TYPES, BatchCounts, per_token
from rl.estimators import MaskSample, get_estimator
from rl.objectives import PolicyLossInputs, get_objective
from rl.objectives.trajectory import (D2StepMerge, TraceRL, TraceRLTrace, pass_weights, stepmerge_segments,
                                      trace_step_groups)

FIXTURES = Path(__file__).parent / "fixtures" / "objectives"


# ---- segmentations -----------------------------------------------------------------------------------
def test_stepmerge_cuts_the_steps_into_n_runs_of_equal_length():
    steps = torch.arange(12).repeat(2, 1)
    assert torch.equal(stepmerge_segments(steps, 12, 4), steps // 3)
    assert torch.equal(stepmerge_segments(steps, 12, 12), steps)
    assert torch.equal(stepmerge_segments(steps, 12, 1), torch.zeros_like(steps))
    for s, n in ((12, 5), (30, 22), (7, 3)):  # uneven: cuts at floor(j s / n)
        cuts = [j * s // n for j in range(1, n)]
        t = torch.arange(s)[None]
        assert stepmerge_segments(t, torch.tensor(s), n)[0].tolist() == [sum(c <= v for c in cuts) for v in range(s)]
    # N > steps: empty segments, every token still in exactly one, in step order
    seg = stepmerge_segments(torch.arange(4)[None], 4, 8)[0]
    assert seg.tolist() == [1, 3, 5, 7]
    # the step count: the option, else the caller's num_steps (Rollout.num_steps), else the batch's last step + 1
    trace, cmask = torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4, dtype=torch.long)
    for est, kw, want in ((D2StepMerge(N=2), {}, [0, 0, 1, 1]), (D2StepMerge(N=2), {"num_steps": 8}, [0, 0, 0, 0]),
                          (D2StepMerge(N=2, num_steps=6), {"num_steps": 8}, [0, 0, 0, 1])):
        w = est.draw(None, cmask, 1, None, trace=trace, **kw).weights
        assert (w != 0).float().argmax(0)[0].tolist() == want


def test_trace_groups_count_only_the_rows_own_steps():
    trace = torch.tensor([[0, 0, 3, 3, 9, 9, 9, 12],  # trace steps 0, 3, 9, 12: steps 1-2, 4-8, 10-11 idle
                          [7, 6, 5, 4, 3, 2, 1, 0],
                          [5, 5, 5, 5, 5, 5, 5, 5]])
    group, k = trace_step_groups(trace, 2)
    assert group.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [3, 3, 2, 2, 1, 1, 0, 0], [0] * 8]
    assert k == 4
    for shrink in (1, 3, 5):
        group, k = trace_step_groups(trace, shrink)
        for row, g in zip(trace.tolist(), group.tolist()):  # the r-th distinct step of the row -> r // shrink
            order = sorted(set(row))
            assert g == [order.index(v) // shrink for v in row]
        assert k == max(-(-len(set(r)) // shrink) for r in trace.tolist())


@pytest.mark.parametrize("name, options", [("d2_stepmerge", {"N": 3, "p_mask_prompt": 1.0}),
                                           ("tracerl", {"shrink": 2})])
def test_pass_k_shows_the_earlier_segments_and_scores_segment_k(name, options):
    g = torch.Generator().manual_seed(0)
    b, p, l = 3, 4, 10
    trace = torch.randint(0, 9, (b, l), generator=g)
    cmask = torch.ones(b, l, dtype=torch.long)
    cmask[1, 6:] = 0
    attn = torch.ones(b, p + l, dtype=torch.long)
    attn[2, :2] = 0  # left padding
    est = get_estimator(name, **options)
    assert est.level == "token" and est.needs_trace
    s = est.draw(attn, cmask, p, g, trace=trace)
    seg = stepmerge_segments(trace, trace.max() + 1, 3) if name == "d2_stepmerge" else trace_step_groups(trace, 2)[0]
    k = s.num_passes
    for i in range(k):
        assert torch.equal(s.masked[i, :, p:], seg >= i)  # segments >= k unseen, earlier ones shown
        assert torch.equal(s.weights[i] != 0, (seg == i) & cmask.bool())
    assert torch.equal((s.weights != 0).sum(0), cmask)  # each valid token scored exactly once
    assert set(s.weights.unique().tolist()) <= {0.0, float(k)}  # mean over passes = the token's own log-prob
    prompt_masked = s.masked[:, :, :p]
    if name == "d2_stepmerge":  # p_mask_prompt = 1: every real prompt token, never padding
        assert torch.equal(prompt_masked, attn[:, :p].bool().expand(k, -1, -1))
    else:
        assert not prompt_masked.any()
    with pytest.raises(ValueError, match="trace"):
        est.draw(attn, cmask, p, g)


# ---- the exact sampled-trajectory likelihood ---------------------------------------------------------
@pytest.fixture(scope="module")
def sampled():
    """A rollout of the fp64 tiny model (left-padded prompts, 2 tokens per step) and its exact
    per-token trajectory log-likelihood: token l scored in the state just before its commit step,
    computed here by replaying the steps."""
    from rollout import generate
    from rollout.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, initializer_range=0.3).double().eval()
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(8, 90, (3, 6), generator=g)
    pmask = torch.ones_like(prompt)
    prompt[1, :2], pmask[1, :2] = tok.pad_token_id, 0
    ro = generate(model, prompt, attention_mask=pmask, steps=6, gen_length=12, block_length=4, temperature=1.0,
                  mask_id=tok.mask_token_id, eos_id=tok.eos_token_id, generator=g)
    ids, attn, trace, p = ro.sequences, ro.attention_mask, ro.unmask_step, prompt.shape[1]
    exact = torch.zeros(trace.shape, dtype=torch.float64)
    states = {}
    with torch.no_grad():
        for s in range(ro.num_steps):
            state = ids.clone()
            state[:, p:] = ids[:, p:].masked_fill(trace >= s, tok.mask_token_id)
            lp = F.log_softmax(model(state, attention_mask=attn).logits[:, p:], -1).gather(-1, ids[:, p:, None])[..., 0]
            exact = torch.where(trace == s, lp, exact)
            states[s] = lp
    return {"model": model, "ro": ro, "exact": exact, "states": states, "mask_id": tok.mask_token_id}


def _per_token(est, sampled) -> torch.Tensor:
    ro, p = sampled["ro"], sampled["ro"].prompt_ids.shape[1]
    s = est.draw(ro.attention_mask, ro.completion_mask, p, torch.Generator().manual_seed(0), trace=ro.unmask_step)
    with torch.no_grad():
        return est.estimate(sampled["model"], ro.sequences, ro.attention_mask, p, ro.completion_mask,
                            sampled["mask_id"], sample=s).per_token


@pytest.mark.parametrize("est", [D2StepMerge(N=6, p_mask_prompt=0.0), TraceRLTrace(shrink=1)], ids=["d2", "tracerl"])
def test_one_segment_per_step_gives_the_exact_trajectory_likelihood(sampled, est):
    ro = sampled["ro"]
    assert ro.num_steps == 6 and (ro.unmask_step.max() == 5)
    valid = ro.completion_mask.bool()
    got = _per_token(est, sampled)
    torch.testing.assert_close(got[valid], sampled["exact"][valid], rtol=0, atol=1e-12)
    torch.testing.assert_close(got.sum(-1), (sampled["exact"] * valid).sum(-1), rtol=0, atol=1e-11)
    assert bool((got[~valid] == 0).all())


@pytest.mark.parametrize("est, first_step", [
    (D2StepMerge(N=3, p_mask_prompt=0.0), lambda trace: (trace // 2) * 2),  # segments {0,1}, {2,3}, {4,5}
    (D2StepMerge(N=4, p_mask_prompt=0.0), lambda trace: torch.tensor([0, 1, 3, 4])[stepmerge_segments(trace, 6, 4)]),
    (TraceRLTrace(shrink=2), lambda trace: (trace // 2) * 2),  # every row commits at every step here
], ids=["d2-N3", "d2-N4", "tracerl-shrink2"])
def test_merged_segments_score_each_token_in_its_segments_first_state(sampled, est, first_step):
    ro = sampled["ro"]
    valid = ro.completion_mask.bool()
    start = first_step(ro.unmask_step)
    want = torch.zeros_like(sampled["exact"])
    for s, lp in sampled["states"].items():
        want = torch.where(start == s, lp, want)
    torch.testing.assert_close(_per_token(est, sampled)[valid], want[valid], rtol=0, atol=1e-12)


# ---- the authors' recorded numbers -------------------------------------------------------------------
def test_d2_matches_the_authors_recorded_numbers():
    from scripts.objective_refs import d2 as ref

    rec = json.loads((FIXTURES / "d2_stepmerge.json").read_text())
    n = rec["N"]
    assert (rec["prompt_len"], rec["epsilon"], rec["beta"], rec["p_mask_prompt"]) == \
        (ref.PROMPT_LEN, ref.EPSILON, ref.BETA, ref.P_MASK_PROMPT)
    tok, models = ref.build_models()
    x, trace = torch.tensor(rec["sequences"]), torch.tensor(rec["unmask_step"])
    cmask, pm = torch.tensor(rec["completion_mask"]), torch.tensor(rec["prompt_masked"]).bool()
    adv = torch.tensor(rec["advantages"], dtype=torch.float64)
    a = rec["authors"]
    est, s0 = ref.our_sample(trace, cmask, pm[0], n)
    s1 = ref.our_sample(trace, cmask, pm[1], n)[1]
    p = ref.PROMPT_LEN
    assert torch.equal(s0.masked[:, :, p:].int(), torch.tensor(a["trajectory_masked"]))  # their trajectory states
    assert torch.equal((s0.weights != 0).int(), torch.tensor(a["trajectory_scored"]))
    old, refl, logp, loss, grads = ref.our_step(models, est, [s0, s1], x, cmask, adv, tok.mask_token_id, n)
    valid = cmask.bool()
    for ours, theirs in ((old, a["old"]), (refl, a["ref"]), (logp, a["policy_iteration1"])):
        torch.testing.assert_close(ours[..., valid], torch.tensor(theirs, dtype=torch.float64)[..., valid],
                                   rtol=1e-9, atol=1e-10)
    assert float(loss) == pytest.approx(a["loss"], rel=1e-9, abs=1e-12)
    for name, value in a["grad_sums"].items():
        assert float(grads[name].sum()) == pytest.approx(value, rel=1e-8, abs=1e-11), name
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
    assert norm == pytest.approx(a["grad_norm"], rel=1e-9)


def test_tracerl_matches_the_authors_recorded_numbers():
    from scripts.objective_refs import tracerl as ref

    rec = json.loads((FIXTURES / "tracerl.json").read_text())
    assert (rec["prompt_len"], rec["epsilon"], rec["beta_old"]) == (ref.PROMPT_LEN, ref.EPS, ref.BETA)
    tok, models = ref.build_models()
    inp = {"ids": torch.tensor(rec["sequences"]), "trace": torch.tensor(rec["unmask_step"]),
           "completion_mask": torch.tensor(rec["completion_mask"])}
    a = rec["authors"]
    ours = ref.our_run(models, inp, rec["advantages"], rec["shrink"], tok.mask_token_id)
    pairs = ref.pass_list(ours["sample"])
    assert [list(x) for x in pairs] == a["passes"]  # their rows: (completion, trace step), empty ones dropped
    old = ref.to_rows(ours["old"], ours["sample"], pairs)
    torch.testing.assert_close(old.float().double(), torch.tensor(a["old_float32"], dtype=torch.float64),
                               rtol=0, atol=1e-6)  # they store float32
    per_pass = ref.to_rows(ours["loss_el"] * ours["rows_of"].unsqueeze(-1), ours["sample"], pairs).sum(-1)
    torch.testing.assert_close(per_pass, torch.tensor(a["per_pass_loss"], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    loss, grads = ours["authors"]  # our per-token loss under their normalisation (mean over passes)
    assert float(loss) == pytest.approx(a["loss"], rel=1e-9, abs=1e-12)
    for name, value in a["grad_sums"].items():
        assert float(grads[name].sum()) == pytest.approx(value, rel=1e-8, abs=1e-11), name
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
    assert norm == pytest.approx(a["grad_norm"], rel=1e-9)
    # the trainer's aggregation weighs each completion equally: with these uneven trace-step counts it differs
    steps = ours["rows_of"].tolist()
    assert len(set(steps)) > 1 and abs(float(ours["trainer"][0]) - a["loss"]) > 1e-4


# ---- the losses --------------------------------------------------------------------------------------
def _toy_sample():
    """2 completions x 6 tokens; row 0: 3 passes of 2 tokens; row 1: 2 passes of 3 and 1 token, 2 invalid."""
    trace = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 2, 2]])
    cmask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    est = TraceRLTrace(shrink=1)
    return est, est.draw(None, cmask, 2, None, trace=trace), cmask


def test_tracerl_loss_is_a_mean_over_trace_steps_of_token_means():
    est, s, cmask = _toy_sample()
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(s.weights.shape, generator=g, dtype=torch.float64) * (s.weights != 0)
    old = (est.combine(s, logps).per_token - 0.3 * torch.rand(2, 6, generator=g, dtype=torch.float64)) * cmask
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    obj = TraceRL(shrink=1, beta_old=0.5)
    logp = obj.terms(est, s, logps, cmask, {})
    out = obj.loss(PolicyLossInputs(logp=logp, old_logp=old, ref_logp=None, advantages=adv, mask=cmask.double(),
                                    epsilon=0.2, sample=s))
    m = cmask.double()
    total = (per_token(out.loss, m) * LOSS_TYPES["seq_mean_token_sum"](m, BatchCounts(10.0, 2.0, 6, 1))).sum()
    want = []
    for i in range(2):
        passes = [k for k in range(s.num_passes) if bool((s.weights[k, i] != 0).any())]
        per = []
        for k in passes:
            sel = s.weights[k, i] != 0
            ratio = torch.exp(logp[i, sel] - old[i, sel])
            surr = torch.minimum(ratio * adv[i], ratio.clamp(0.8, 1.2) * adv[i]).mean()
            d = old[i, sel] - logp[i, sel]
            per.append(-surr + 0.5 * (d.exp() - d - 1).sum())
        want.append(torch.stack(per).mean())
    torch.testing.assert_close(total, torch.stack(want).mean())
    step_w, pass_w = pass_weights(s.weights, torch.float64)
    assert step_w[0].tolist() == [1 / 6] * 6 and step_w[1].tolist() == [1 / 6] * 3 + [1 / 2, 0, 0]
    assert pass_w[1].tolist() == [1 / 2] * 4 + [0, 0]
    # pass_mean=False: the plain token sum; pass_mean=True without the terms' bookkeeping refuses
    flat = TraceRL(shrink=1, beta_old=0.0, pass_mean=False).loss(PolicyLossInputs(
        logp=logp.detach().clone(), old_logp=old, ref_logp=None, advantages=adv, mask=m))
    torch.testing.assert_close(flat.loss, -torch.minimum(torch.exp(logp - old) * adv[:, None],
                                                         torch.exp(logp - old).clamp(0.8, 1.2) * adv[:, None]))
    with pytest.raises(ValueError, match="pass_mean"):
        obj.loss(PolicyLossInputs(logp=logp.detach().clone(), old_logp=old, ref_logp=None, advantages=adv, mask=m))


def test_d2_loss_is_d1s_clipped_ratio_with_the_reference_kl():
    g = torch.Generator().manual_seed(1)
    logp, old, refl = (-torch.rand(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    adv = torch.tensor([0.7, -1.1], dtype=torch.float64)
    out = get_objective("d2_stepmerge").loss(PolicyLossInputs(logp=logp, old_logp=old, ref_logp=refl, advantages=adv,
                                                              mask=torch.ones(2, 5), epsilon=0.5, beta=0.04))
    ratio = torch.exp(logp - old)
    d = refl - logp
    want = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.5, 1.5) * adv[:, None]) + 0.04 * (d.exp() - d - 1)
    torch.testing.assert_close(out.loss, want)


def test_options_config_and_mismatches():
    from rl.config import ConfigError, DiffuGRPOConfig

    cfg = DiffuGRPOConfig(run_dir="/tmp/unused", objective="d2_stepmerge", objective_options={"N": 4})
    assert (cfg.estimator, cfg.estimator_options, cfg.loss_type) == \
        ("d2_stepmerge", {"N": 4, "p_mask_prompt": 0.15}, "dapo")
    cfg = DiffuGRPOConfig(run_dir="/tmp/unused", objective="tracerl", beta=0.0, objective_options={"shrink": 2})
    assert (cfg.estimator, cfg.estimator_options, cfg.loss_type) == ("tracerl", {"shrink": 2}, "seq_mean_token_sum")
    with pytest.raises(ConfigError, match="takes tracerl or d2_stepmerge"):
        DiffuGRPOConfig(run_dir="/tmp/unused", objective="tracerl", beta=0.0, estimator="mean_field")
    with pytest.raises(ValueError, match="n_samples must be 1"):
        TraceRLTrace(n_samples=2)
    with pytest.raises(ValueError, match="shrink"):
        get_objective("tracerl", shrink=0)
    est, s, cmask = _toy_sample()
    with pytest.raises(ValueError, match="shrink=2 but the estimator shrink=1"):
        TraceRL(shrink=2).terms(est, s, torch.zeros(s.weights.shape), cmask, {})
    d2 = D2StepMerge(N=3)
    with pytest.raises(ValueError, match="N=8"):
        get_objective("d2_stepmerge").terms(d2, MaskSample(torch.zeros(3, 2, 8, dtype=torch.bool),
                                                           torch.zeros(3, 2, 6)), torch.zeros(3, 2, 6), cmask, {})


# ---- through the trainer -----------------------------------------------------------------------------
def _trainer(run_dir: str, objective: str, objective_options: dict, *, beta: float, max_steps: int = 2,
             micro_batch_size: int = 8):
    from rl.config import DiffuGRPOConfig, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer
    from rollout import build_tiny_policy
    from tests.helpers.toy_grpo import target_char_reward

    policy = build_tiny_policy(seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128)
    cfg = DiffuGRPOConfig(
        run_dir=run_dir, seed=0, max_steps=max_steps, lr=3e-3, per_device_prompts=4, num_generations=4,
        num_iterations=2, beta=beta, epsilon=0.2, objective=objective, objective_options=objective_options,
        rollout=RolloutOptions(gen_length=8, block_length=4, steps=8, temperature=1.0), sample_table_every=0,
        export_hf=False, micro_batch_size=micro_batch_size, max_grad_norm=1.0,
    )
    return DiffuGRPOTrainer(cfg, policy, [{"prompt": f"{i:03d}"} for i in range(16)], reward_funcs=[target_char_reward])


@pytest.mark.parametrize("objective, options, beta, passes", [("d2_stepmerge", {"N": 4}, 0.04, 4),
                                                               ("tracerl", {"shrink": 3}, 0.0, 3)])
def test_short_training_run_reads_the_trace_and_updates_the_weights(tmp_path, objective, options, beta, passes):
    trainer = _trainer(str(tmp_path / "run"), objective, options, beta=beta)
    assert trainer.objective.name == objective and trainer.estimator.needs_trace
    drawn = []
    draw = trainer.estimator.draw

    def spy(*a, **k):
        drawn.append(k.get("trace"))
        s = draw(*a, **k)
        drawn.append(s.num_passes)
        return s

    trainer.estimator.draw = spy
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    last = trainer.train()
    traces, ks = drawn[::2], drawn[1::2]
    assert len(traces) == 2 * 2 and all(t is not None and t.shape == (16, 8) for t in traces)
    assert set(ks) == {passes}  # 8 steps: N = 4 segments of 2; tracerl: 8 trace steps, shrink 3 -> 3 groups
    for key in ("loss", "grad_norm", "kl", "clip_ratio/region_mean", "reward"):
        assert key in last, key
    assert torch.isfinite(torch.tensor(float(last["loss"]))) and float(last["grad_norm"]) > 0
    if beta > 0:
        assert float(last["kl"]) > 0
    assert 0.0 <= float(last["clip_ratio/region_mean"]) <= 1.0  # a fraction under either aggregation
    moved = sum(float((v.detach() - before[k]).abs().max()) for k, v in trainer.model.named_parameters())
    assert moved > 0


def test_scoring_skips_empty_passes_and_equals_the_full_scoring(sampled):
    from rl.estimators import Estimator

    ro, p = sampled["ro"], sampled["ro"].prompt_ids.shape[1]
    cmask = ro.completion_mask.clone()
    cmask[0, 3:] = 0  # a short completion: its late segments score nothing
    est = D2StepMerge(N=6, p_mask_prompt=0.5)
    s = est.draw(ro.attention_mask, cmask, p, torch.Generator().manual_seed(1), trace=ro.unmask_step)
    assert not bool((s.weights[-1, 0] != 0).any())
    model = sampled["model"]
    calls = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        got = est.score(model, ro.sequences, ro.attention_mask, p, s, sampled["mask_id"])
        full = Estimator.score(est, model, ro.sequences, ro.attention_mask, p, s, sampled["mask_id"])
    finally:
        hook.remove()
    assert calls[0] == int((s.weights != 0).any(-1).sum()) < calls[1] == s.num_passes * ro.sequences.shape[0]
    torch.testing.assert_close(got, full, rtol=0, atol=1e-13)


@pytest.mark.parametrize("objective, options", [("d2_stepmerge", {"N": 4}), ("tracerl", {"shrink": 3})])
def test_trainer_loss_does_not_depend_on_micro_batch_size(tmp_path, objective, options):
    """policy_update on one rollout with unequal completion lengths: micro-batches of 16 and 4 rows give
    the same loss and gradient norm (TraceRL's per-step weights are per completion)."""
    import dataclasses

    first = _trainer(str(tmp_path / "ro"), objective, options, beta=0.0, max_steps=1)
    ro = first.rollout(first.train_dataset[:4])
    mask = torch.ones_like(ro.completion_mask)
    for i in range(16):
        mask[i, 1 + i % 7:] = 0
    ro = dataclasses.replace(ro, completion_mask=mask)
    adv = torch.linspace(-1.0, 1.0, 16)
    out = []
    for micro in (16, 4):
        t = _trainer(str(tmp_path / f"m{micro}"), objective, options, beta=0.0, max_steps=1, micro_batch_size=micro)
        m = t.policy_update(ro, adv)
        out.append((float(m["loss"]), float(m["grad_norm"])))
    assert out[1] == pytest.approx(out[0], rel=1e-4)


@pytest.mark.parametrize("est", [D2StepMerge(N=3, n_samples=2), TraceRLTrace(shrink=2)], ids=["d2", "tracerl"])
def test_batched_passes_equal_chunked_forwards(sampled, est):
    """(tests/test_estimators.py's check, which draws without a trace.) max_batch / chunk_size change nothing."""
    import dataclasses

    ro, p = sampled["ro"], sampled["ro"].prompt_ids.shape[1]
    s = est.draw(ro.attention_mask, ro.completion_mask, p, torch.Generator().manual_seed(2), trace=ro.unmask_step)
    with torch.no_grad():
        one = est.score(sampled["model"], ro.sequences, ro.attention_mask, p, s, sampled["mask_id"])
        chunked = dataclasses.replace(est, max_batch=2, chunk_size=3).score(sampled["model"], ro.sequences,
                                                                            ro.attention_mask, p, s, sampled["mask_id"])
    torch.testing.assert_close(one, chunked, rtol=0, atol=1e-12)
    assert one.shape == s.weights.shape
    assert bool((one[s.weights == 0] == 0).all()) and bool((one[s.weights != 0] < 0).all())
