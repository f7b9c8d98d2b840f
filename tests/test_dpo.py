"""Diffusion DPO (VRPO): the loss by hand, antithetic variance reduction measured, the data
loader's errors, the trainer's wiring and resume, and a short on-policy run on Sudoku."""

import copy
import json
import math

import pytest
import torch

from rl.dpo import (DPOConfig, dpo_loss, dpo_metrics, draw_shared_timestep, encode_responses,
                    load_preference_data, per_pass_terms, score_std)
from rl.estimators import get_estimator
from rl.pairs import pair_best_worst

PUZZLES = ["12.4|3..1|..2.|4.3.", "1.3.|..1.|2..4|.4..", "..34|3...|.1.2|4..1", "4...|.32.|2.1.|...3"]
CHOSEN = ["1234|3421|4312|2143", "1234|3412|2341|4123", "2134|3412|1342|4221", "4312|1324|2143|3421"]
REJECTED = ["1234|3421|4312|2144", "1111|3412|2341|4123", "2134|3412|1342|4222", "4312|1324|2143|342"]


@pytest.fixture(scope="module")
def small_model(tiny_tokenizer):
    """A smaller built-in model: the variance properties do not depend on size, the test time does."""
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128).eval()


# ---- (a) the loss against a hand computation ---------------------------------------------------
def test_dpo_loss_matches_hand_computation():
    beta = 0.1
    pi_w, ref_w = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    pi_l, ref_l = torch.tensor([-20.0, -5.0]), torch.tensor([-19.0, -9.0])
    loss, r_w, r_l = dpo_loss(pi_w, ref_w, pi_l, ref_l, beta)
    # row 0: r_w = 0.1 * 2 = 0.2, r_l = 0.1 * -1 = -0.1, margin 0.3, loss = log(1 + e^-0.3)
    # row 1: r_w = 0.1 * -1 = -0.1, r_l = 0.1 * 4 = 0.4, margin -0.5, loss = log(1 + e^0.5)
    expected = torch.tensor([math.log1p(math.exp(-0.3)), math.log1p(math.exp(0.5))])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(r_w, torch.tensor([0.2, -0.1])) and torch.allclose(r_l, torch.tensor([-0.1, 0.4]))
    m = dpo_metrics(r_w, r_l, pi_w, pi_l)
    assert m["rewards/accuracies"].item() == 0.5
    assert math.isclose(m["rewards/margins"].item(), (0.3 - 0.5) / 2, abs_tol=1e-6)
    assert math.isclose(m["rewards/chosen"].item(), 0.05, abs_tol=1e-6)
    assert math.isclose(m["rewards/rejected"].item(), 0.15, abs_tol=1e-6)
    assert m["logps/chosen"].item() == -7.0 and m["logps/rejected"].item() == -12.5
    # the gradient is -beta * sigmoid(-margin) on B_pi(y_w): the DPO gradient weight
    pi = pi_w.clone().requires_grad_()
    dpo_loss(pi, ref_w, pi_l, ref_l, beta)[0].sum().backward()
    assert torch.allclose(pi.grad, -beta * torch.sigmoid(-torch.tensor([0.3, -0.5])), atol=1e-6)
    # per-pass score spread: passes [K=2, B=1]
    s = score_std(torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    assert math.isclose(s.item(), math.sqrt(2.0), rel_tol=1e-6)


# ---- (b) antithetic sampling lowers the variance of the score estimate -----------------------------
def _pair_batches(tok):
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PUZZLES]
    return (encode_responses(tok, prompts, CHOSEN, max_completion_length=64),
            encode_responses(tok, prompts, REJECTED, max_completion_length=64))


@torch.no_grad()
def _score_repeats(est, policy, reference, batches, g, *, antithetic: bool, repeats: int, n: int, shared_t=False):
    """``repeats`` independent score estimates ``[R, B]`` (each from n passes per ELBO), drawn in
    one batch of R * n passes: (B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))."""
    def draw(b):
        if shared_t:  # n_t = 1, n_y = n within each repeat: draw repeat by repeat
            parts = [draw_shared_timestep(est_n, b.attention_mask, b.completion_mask, b.prompt_len, g)
                     for _ in range(repeats)]
            return type(parts[0])(torch.cat([p.masked for p in parts]), torch.cat([p.weights for p in parts]))
        return est.draw(b.attention_mask, b.completion_mask, b.prompt_len, g)

    est_n = get_estimator(est.name, n_samples=n)
    terms = []
    for b in batches:  # chosen, rejected: their own draws
        s_pi = draw(b)
        s_ref = s_pi if antithetic else draw(b)
        pi = per_pass_terms(s_pi, est.score(policy, b.input_ids, b.attention_mask, b.prompt_len, s_pi, 1))
        ref = per_pass_terms(s_ref, est.score(reference, b.input_ids, b.attention_mask, b.prompt_len, s_ref, 1))
        terms.append((pi - ref).view(repeats, n, -1).mean(1))
    return terms[0] - terms[1]


def _perturbed(model, scale=0.1, seed=1):
    """A policy slightly off the reference: every weight plus scale * its std * N(0, 1)."""
    pol = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(scale * p.std().nan_to_num(0) * torch.randn(p.shape, generator=g))
    return pol


def test_antithetic_sampling_lowers_score_variance(tiny_tokenizer, small_model):
    reference, policy = small_model, _perturbed(small_model)
    batches = _pair_batches(tiny_tokenizer)
    repeats, n = 32, 2
    est = get_estimator("mc_elbo", n_samples=repeats * n, max_batch=512)
    g = torch.Generator().manual_seed(0)
    anti = _score_repeats(est, policy, reference, batches, g, antithetic=True, repeats=repeats, n=n)
    indep = _score_repeats(est, policy, reference, batches, g, antithetic=False, repeats=repeats, n=n)
    var_a, var_i = anti.var(0), indep.var(0)  # per pair, over repeats
    print(f"\nscore estimate variance over {repeats} repeats (mc_elbo, n={n}), per pair:"
          f"\n  antithetic  {[round(v, 3) for v in var_a.tolist()]}  mean {var_a.mean().item():.3f}"
          f"\n  independent {[round(v, 1) for v in var_i.tolist()]}  mean {var_i.mean().item():.1f}"
          f"\n  ratio independent / antithetic = {(var_i.mean() / var_a.mean()).item():.0f}x")
    assert (var_a < 0.1 * var_i).all()
    # both estimate the same score: the means agree within 4 standard errors
    se = ((var_a + var_i) / repeats).sqrt()
    assert ((anti.mean(0) - indep.mean(0)).abs() < 4 * se).all()
    # the policy really differs from the reference (otherwise antithetic would be trivially 0)
    assert (var_a > 0).all()


def test_optimal_allocation_lowers_variance_of_the_elbo(tiny_tokenizer, small_model):
    """VRPO Thm. 3: n timesteps with one mask each beats one timestep with n masks."""
    b = _pair_batches(tiny_tokenizer)[0]
    repeats, n = 64, 4
    est = get_estimator("mc_elbo", n_samples=repeats * n, max_batch=1024)
    est_n = get_estimator("mc_elbo", n_samples=n)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        s_opt = est.draw(b.attention_mask, b.completion_mask, b.prompt_len, g)
        parts = [draw_shared_timestep(est_n, b.attention_mask, b.completion_mask, b.prompt_len, g) for _ in range(repeats)]
        s_shared = type(s_opt)(torch.cat([p.masked for p in parts]), torch.cat([p.weights for p in parts]))
        # within a repeat of the shared allocation, all n passes have the same t (same 1/t weight)
        w = parts[0].weights
        assert torch.equal(torch.where(w > 0, w, w.amax((0, 2), keepdim=True)), w.amax((0, 2), keepdim=True).expand_as(w))
        out = {}
        for name, s in (("optimal", s_opt), ("shared_t", s_shared)):
            terms = per_pass_terms(s, est.score(small_model, b.input_ids, b.attention_mask, b.prompt_len, s, 1))
            out[name] = terms.view(repeats, n, -1).mean(1)
    v_opt, v_sh = out["optimal"].var(0).mean(), out["shared_t"].var(0).mean()
    print(f"\nELBO variance (n={n}, {repeats} repeats): optimal allocation {v_opt.item():.1f}, "
          f"one shared timestep {v_sh.item():.1f}, ratio {(v_sh / v_opt).item():.2f}x")
    assert v_opt < v_sh


# ---- data ----------------------------------------------------------------------------------------
def test_load_preference_data_formats_and_errors(tmp_path):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PUZZLES, CHOSEN, REJECTED)]
    jsonl = tmp_path / "prefs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_preference_data(jsonl) == rows

    import pyarrow as pa
    import pyarrow.parquet as pq

    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": i} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "prefs.parquet")
    got = load_preference_data(tmp_path / "prefs.parquet", columns={"prompt": "question", "chosen": "good",
                                                                      "rejected": "bad"})
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in got] == rows and got[2]["id"] == 2

    import datasets

    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(conv)}).save_to_disk(str(tmp_path / "hf"))
    got = load_preference_data(tmp_path / "hf", split="train")
    assert got[1]["chosen"] == CHOSEN[1] and got[1]["prompt"][0]["content"] == PUZZLES[1]

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(KeyError, match=r"broken.jsonl.*row 1.*'rejected'"):
        load_preference_data(broken)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: cannot read rows"):
        load_preference_data(bad_json)
    with pytest.raises(KeyError, match=r"no split 'test'"):
        load_preference_data(tmp_path / "hf", split="test")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_preference_data(tmp_path / "empty.jsonl")


def test_pair_best_worst_skips_ties_and_unscored():
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b"}, {"prompt": "c"}]
    comps = [["x", "y", "z"], ["p", "q"], ["u", "v", "w"]]
    scores = [[0.5, 1.0, 0.0], [1.0, 1.0], [None, 0.2, None]]
    pairs = pair_best_worst(rows, comps, scores)
    assert pairs == [{"prompt": "a", "answer": 1, "chosen": "y", "rejected": "z",
                      "chosen_reward": 1.0, "rejected_reward": 0.0}]
    assert pair_best_worst(rows[:1], comps[:1], scores[:1], min_margin=1.0) == []


# ---- the trainer: wiring, metrics, resume ----------------------------------------------------------
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "score/std", "loss", "grad_norm", "lr")


def _dpo_trainer(run_dir, *, max_steps=4, resume=False, antithetic=True, save_steps=0, **kw):
    from rl.dpo import DiffusionDPOTrainer
    from rollout import build_tiny_policy

    policy = build_tiny_policy(seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PUZZLES, CHOSEN, REJECTED)] * 2
    cfg = DPOConfig(run_dir=str(run_dir), seed=0, max_steps=max_steps, lr=1e-3, per_device_batch_size=4,
                    micro_batch_size=2, n_samples=2, antithetic=antithetic, save_steps=save_steps,
                    resume=resume, export_hf=False, wandb_mode="disabled", **kw)
    return DiffusionDPOTrainer(cfg, policy, rows)


def _logged(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows}


def _spy_draws(trainer):
    drawn = []
    draw = trainer.estimator.draw

    def spy(*a, **k):
        s = draw(*a, **k)
        drawn.append(s)
        return s

    trainer.estimator.draw = spy
    return drawn


def test_trainer_antithetic_wiring_metrics_and_resume(tmp_path):
    full = _dpo_trainer(tmp_path / "full", max_steps=4)
    drawn = _spy_draws(full)
    full.train()
    # antithetic: one draw per response set per step (policy and reference share it), and the
    # chosen and rejected draws are independent
    assert len(drawn) == 2 * 4
    assert not torch.equal(drawn[0].weights[:, :, :4], drawn[1].weights[:, :, :4])
    logged = _logged(tmp_path / "full")
    assert sorted(logged) == [1, 2, 3, 4]
    for key in DPO_METRICS:
        assert key in logged[1], key
    # step 1: policy == reference and the masks are shared, so the implicit rewards are exactly 0
    assert logged[1]["rewards/chosen"] == logged[1]["rewards/rejected"] == 0.0
    assert logged[1]["rewards/accuracies"] == 0.0 and logged[1]["score/std"] == 0.0
    assert logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[4]["rewards/margins"] > 0 and logged[4]["score/std"] > 0

    # resume: 2 steps, then a new trainer continues from the checkpoint to step 4
    _dpo_trainer(tmp_path / "split", max_steps=2).train()
    _dpo_trainer(tmp_path / "split", max_steps=4, resume=True).train()
    split = _logged(tmp_path / "split")
    for step in (3, 4):
        for key, value in logged[step].items():
            if key != "grad_norm":
                assert split[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


def test_trainer_independent_sampling_draws_separately(tmp_path):
    trainer = _dpo_trainer(tmp_path / "indep", max_steps=1, antithetic=False)
    drawn = _spy_draws(trainer)
    trainer.train()
    assert len(drawn) == 4  # chosen/rejected x policy/reference
    step1 = _logged(tmp_path / "indep")[1]
    # same weights, different masks: the implicit rewards are pure mask noise, not 0
    assert step1["rewards/chosen"] != 0.0 and step1["score/std"] > 0


def test_trainer_mean_field_and_config_errors(tmp_path):
    trainer = _dpo_trainer(tmp_path / "mf", max_steps=1, estimator="mean_field",
                           estimator_options={"p_mask_prompt": 0.15}, rpo_alpha=0.5)
    trainer.train()
    step1 = _logged(tmp_path / "mf")[1]
    assert step1["rewards/accuracies"] == 0.0 and "score/std" in step1  # n_samples=2 prompt masks
    # policy == reference: the DPO term is log 2; RPO adds alpha * NLL per token of the chosen
    # response (every CHOSEN has 19 characters + EOS)
    assert step1["loss"] == pytest.approx(math.log(2) - 0.5 * step1["logps/chosen"] / 20, rel=1e-5)
    with pytest.raises(ValueError, match="optimal_allocation=False: needs"):
        _dpo_trainer(tmp_path / "x", estimator="mean_field", optimal_allocation=False)
    with pytest.raises(KeyError, match="row 0 has no column 'rejected'"):
        from rl.dpo import DiffusionDPOTrainer
        from rollout import build_tiny_policy

        DiffusionDPOTrainer(DPOConfig(run_dir=str(tmp_path / "y")), build_tiny_policy(), [{"prompt": "a", "chosen": "b"}])


# ---- (c) on-policy pairs on Sudoku raise rewards/accuracies and the task reward ----------------------
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def on_policy_dpo_run(run_dir, *, model_overrides, sft_steps, num_prompts, num_generations, dpo_steps, lr, beta,
                      n_samples, batch_size=16, estimator="mc_elbo", rpo_alpha=0.0, max_pairs=None, seed=0):
    """SFT the built-in model on 64 labelled puzzles, build best-vs-worst pairs from its own
    samples (temperature 1) on unlabelled puzzles, run diffusion DPO on them. Returns the greedy
    task reward (fraction of empty cells right) on the pair prompts and on held-out puzzles,
    before and after DPO, and the logged DPO metrics."""
    from rewards import get_reward
    from rewards.sudoku import make_sudoku_dataset
    from rl.config import RolloutOptions, SFTConfig
    from rl.dpo import DiffusionDPOTrainer
    from rl.pairs import build_preference_pairs, mean_reward
    from rl.sft import SFTTrainer
    from rl.trainer import seeded_generator
    from rollout import build_tiny_policy

    data = [{"prompt": r["puzzle"], **r} for r in make_sudoku_dataset(64 + num_prompts + 64, seed=seed)]
    sft_rows = [{**r, "response": r["solution"]} for r in data[:64]]
    prompts, held_out = data[64:64 + num_prompts], data[64 + num_prompts:]
    policy = build_tiny_policy(seed=seed, **model_overrides)
    SFTTrainer(SFTConfig(run_dir=str(run_dir / "sft"), seed=seed, max_steps=sft_steps, lr=1e-3, per_device_batch_size=64,
                         warmup_steps=5, lr_scheduler="cosine", wandb_mode="disabled", export_hf=False,
                         logging_steps=sft_steps), policy, sft_rows).train()
    reward = get_reward("sudoku")
    greedy = RolloutOptions(gen_length=17, block_length=17, steps=17, temperature=0.0)
    sampling = RolloutOptions(gen_length=17, block_length=17, steps=17, temperature=1.0)

    def task_reward():
        return (mean_reward(policy, prompts, reward, rollout=greedy),
                mean_reward(policy, held_out, reward, rollout=greedy))

    before = task_reward()
    pairs = build_preference_pairs(policy, prompts, reward, num_generations=num_generations, rollout=sampling,
                                   generator=seeded_generator(seed, "pairs", 0))[:max_pairs]
    assert len(pairs) >= batch_size and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    cfg = DPOConfig(run_dir=str(run_dir / "dpo"), seed=seed, max_steps=dpo_steps, lr=lr, beta=beta,
                    per_device_batch_size=batch_size, n_samples=n_samples, estimator=estimator,
                    rpo_alpha=rpo_alpha, wandb_mode="disabled", export_hf=False)
    DiffusionDPOTrainer(cfg, policy, pairs).train()
    after = task_reward()
    logged = _logged(run_dir / "dpo")
    return {"before": before, "after": after, "pairs": len(pairs), "metrics": [logged[s] for s in sorted(logged)]}


def _report(out):
    acc = [m["rewards/accuracies"] for m in out["metrics"]][1:]  # step 1 is 0 by construction
    k = max(1, len(acc) // 4)
    print(f"\nrewards/accuracies per step from step 2: {[round(a, 2) for a in acc]}")
    print(f"on-policy DPO: {out['pairs']} pairs; rewards/accuracies steps 2-{k + 1} {sum(acc[:k]) / k:.3f}, "
          f"last {k} steps {sum(acc[-k:]) / k:.3f}; task reward on pair prompts {out['before'][0]:.3f} -> "
          f"{out['after'][0]:.3f}, held-out {out['before'][1]:.3f} -> {out['after'][1]:.3f}; final margin "
          f"{out['metrics'][-1]['rewards/margins']:.3f}, score/std {out['metrics'][-1]['score/std']:.3f}")
    return sum(acc[:k]) / k, sum(acc[-k:]) / k


def test_on_policy_dpo_fits_its_pairs(tmp_path):
    """Fast version: a briefly SFT'd small model, 32 on-policy pairs seen for 8 epochs. At step 1
    (policy == reference, shared masks) every implicit reward is 0 and rewards/accuracies is 0;
    after updates the implicit reward ranks the pairs well above the 0.5 of a random ranking
    (it jumps within a few steps). The task reward is reported, not asserted: a model this weak
    (greedy reward ~0.27, about what random digits get) does not improve its task reward in 17
    steps with DPO or with RPO (measured 0.266 -> 0.246 for both), and a rise seen with a
    200-step in-test SFT (+0.012 on 32 prompts) is too small to assert. The slow test asserts
    the task-reward rise (RPO); docs/benchmarks.md has the runs from the recipe's SFT checkpoint."""
    out = on_policy_dpo_run(tmp_path, model_overrides=SMALL, sft_steps=40, num_prompts=40, num_generations=4,
                            dpo_steps=17, lr=3e-4, beta=0.1, n_samples=4, max_pairs=32)
    first, last = _report(out)
    assert out["metrics"][0]["rewards/accuracies"] == 0.0  # step 1: policy == reference, shared masks
    acc = [m["rewards/accuracies"] for m in out["metrics"][1:]]
    assert sum(acc) / len(acc) >= 0.7 and last >= 0.7, acc
    assert out["metrics"][-1]["rewards/margins"] > 0


@pytest.mark.slow
def test_on_policy_dpo_raises_task_reward(tmp_path):
    """Longer run: the default-size model SFT'd for 200 steps, 64 prompts x 8 samples, 60 DPO steps
    with the RPO term; greedy task reward on the pair prompts must rise."""
    out = on_policy_dpo_run(tmp_path, model_overrides={}, sft_steps=200, num_prompts=64, num_generations=8,
                            dpo_steps=60, lr=1e-4, beta=0.1, n_samples=4, rpo_alpha=1.0)
    first, last = _report(out)
    assert last > first + 0.1, (first, last)
    assert out["after"][0] > out["before"][0], out
