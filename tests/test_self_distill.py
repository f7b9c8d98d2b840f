"""Self-distillation for parallel decoding (rl/distill.py, recipe=sft_grpo_distill): the
certainty-forcing term against dParallel's formula, the verifier filter on real rows, the recipe."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rl.losses import certainty_forcing_loss, diffusion_sft_loss, draw_sft_noise, masked_token_scores
from rollout import build_tiny_policy


def _dparallel_entropy_term(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """dParallel's ``DLMTrainer.compute_loss`` entropy term as published (llada_train.py): softmax of
    logits / temperature over the full logits, entropy with 1e-12 inside the log, kept where masked
    and argmax == label, averaged over those positions."""
    probs = torch.softmax(logits / temperature, dim=-1)
    h_tok = -(probs * torch.log(probs + 1e-12)).sum(dim=-1)
    correct = (logits.argmax(dim=-1) == input_ids) & masked
    return (h_tok * correct).sum() / correct.sum().clamp_min(1)


class _FullLogits(torch.nn.Module):
    """The policy seen as a plain model (no fused scoring): full logits, the loss's other path."""

    def __init__(self, policy):
        super().__init__()
        self.inner = policy

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    policy = build_tiny_policy(seed=0).double()
    b, p, n = 3, 5, 9
    ids = torch.randint(5, policy.model.config.vocab_size, (b, p + n))
    resp = torch.zeros_like(ids)
    resp[:, p:] = 1
    attn = torch.ones_like(ids)
    return policy, ids, resp, attn


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_certainty_term_equals_dparallels_formula_fused_and_unfused(batch, temperature):
    policy, ids, resp, attn = batch
    _, masked = draw_sft_noise(resp, torch.Generator().manual_seed(1))
    masked[0, -3:] = True  # at least some positions
    noisy = ids.masked_fill(masked, policy.mask_token_id)
    # make some predictions right: train-free, the argmax of a random model rarely hits the target
    logits = policy(noisy, attention_mask=attn).logits
    targets = torch.where(masked & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.5),
                          logits.argmax(-1), ids)
    ref = _dparallel_entropy_term(logits, targets, masked, temperature)
    assert ref > 0
    assert policy.fused_scoring
    for model in (policy, _FullLogits(policy)):
        got_logp, ent, correct = masked_token_scores(model, targets, masked, policy.mask_token_id, attn,
                                                     temperature=temperature)
        got = certainty_forcing_loss(ent, correct)
        assert torch.allclose(got.double(), ref, atol=2e-6, rtol=0), (type(model).__name__, got, ref)  # ours: float32
        want_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * masked
        assert torch.allclose(got_logp.double(), want_logp, atol=1e-6)
        assert correct.sum() == ((logits.argmax(-1) == targets) & masked).sum()


def test_certainty_loss_gradient_fused_equals_unfused(batch):
    policy, ids, resp, attn = batch
    noise = draw_sft_noise(resp, torch.Generator().manual_seed(3))
    grads = []
    for model in (policy, _FullLogits(policy)):
        policy.zero_grad()
        parts: dict = {}
        loss = diffusion_sft_loss(model, ids, resp, mask_id=policy.mask_token_id, attention_mask=attn, noise=noise,
                                  certainty_weight=2.0, certainty_temperature=0.5, parts=parts)
        loss.backward()
        assert torch.allclose(loss, parts["ce"] + 2.0 * parts["certainty"])
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    # weight 0: exactly LLaDA's SFT loss
    plain = diffusion_sft_loss(policy, ids, resp, mask_id=policy.mask_token_id, attention_mask=attn, noise=noise)
    zero = diffusion_sft_loss(policy, ids, resp, mask_id=policy.mask_token_id, attention_mask=attn, noise=noise,
                              certainty_weight=0.0)
    assert torch.equal(plain, zero)


class _ScriptedEngine:
    """Stands in for a rollout engine: answers each prompt with a fixed completion."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.calls = answers, 0
        self.adapter = SimpleNamespace(tokenizer=None)

    def generate(self, prompts, options=None, generator=None):
        self.calls += 1
        texts = [self.answers[p] for p in prompts]
        return SimpleNamespace(decode=lambda tok: texts, num_forward_passes=17)


def test_only_verified_completions_are_kept_with_the_real_sudoku_verifier():
    from recipes.pipeline import load_task_config
    from rl.config import RolloutOptions
    from rl.distill import self_distill_rows
    from rl.tasks import build_task

    task = build_task(load_task_config("sudoku4"))
    rows = task.rows("sft")[:6]  # rows with their solutions
    answers = {r["prompt"]: (r["response"] if i % 2 == 0 else r["response"][::-1]) for i, r in enumerate(rows)}
    answers[rows[2]["prompt"]] = f"<answer>{rows[2]['response']}"  # messy output: the verifier decides
    engine = _ScriptedEngine(answers)
    kept, stats = self_distill_rows(engine, task, [{k: r[k] for k in ("prompt", "puzzle", "solution")} for r in rows],
                                    RolloutOptions(gen_length=17, block_length=17, steps=17), samples_per_prompt=2,
                                    batch_size=4)
    solved = [i for i, r in enumerate(rows) if task.correct([r], [answers[r["prompt"]]])[0]]
    assert 0 in solved and 1 not in solved
    # duplicates (2 identical samples per prompt) kept once, in prompt order, with the decoded text
    assert kept == [{"prompt": rows[i]["prompt"], "response": answers[rows[i]["prompt"]]} for i in solved]
    assert stats["samples"] == 12 and stats["kept"] == len(solved)
    assert stats["solved"] == pytest.approx(2 * len(solved) / 12)
    assert stats["forward_passes"] == 17 and engine.calls == 3


def test_config_checks_name_the_key():
    from rl.config import ConfigError, SelfDistillConfig, SFTConfig

    with pytest.raises(ConfigError, match="certainty_weight"):
        SFTConfig(certainty_weight=-1.0)
    with pytest.raises(ConfigError, match="certainty_temperature"):
        SelfDistillConfig(certainty_temperature=0.0)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        SelfDistillConfig(samples_per_prompt=0)
    assert SelfDistillConfig().certainty_weight == 2.0 and SFTConfig().certainty_weight == 0.0


def test_the_speed_aware_recipe_runs_sft_grpo_then_distill(tmp_path, monkeypatch):
    """``dllm-rl recipe=sft_grpo_distill``, scaled down. A 4-step SFT solves nothing, so the
    verifier is replaced by one that accepts every completion (the filter itself is tested above);
    the data, the certainty-forcing SFT, validation, test and the summary are the real ones."""
    import rl.distill
    from recipes.__main__ import main
    from test_recipes import SMALL

    real = rl.distill.self_distill_rows

    class AcceptAll:
        def __init__(self, task):
            self.task = task

        def correct(self, rows, texts):
            return [True] * len(rows)

    monkeypatch.setattr(rl.distill, "self_distill_rows", lambda engine, task, *a, **k: real(engine, AcceptAll(task),
                                                                                           *a, **k))
    run_dir = tmp_path / "run"
    assert main(["recipe=sft_grpo_distill", *SMALL, f"run_dir={run_dir}", "distill.max_steps=3",
                 "distill.per_device_batch_size=8", "distill.eval_steps=2", "distill.num_prompts=16",
                 "logger.wandb.mode=disabled", "recipe.plot=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    d = summary["distill"]
    assert d["data"]["samples"] == 16 and d["data"]["kept"] >= 8  # duplicates dropped
    assert summary["lift"] == pytest.approx(d["eval/accuracy"] - summary["sft"]["eval/accuracy"])
    steps = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if "loss/certainty" in s]
    assert logged and all(s["loss"] == pytest.approx(s["loss/ce"] + 2.0 * s["loss/certainty"], rel=1e-5)
                          for s in logged)
    assert (run_dir / "final").resolve() == (run_dir / "distill" / "best").resolve()
    merged = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(merged) == {"sft", "rl", "distill"}


def test_a_policy_that_solves_too_little_hands_on_its_checkpoint(tmp_path, capsys):
    """A 4-step SFT solves no puzzle: in a pipeline the distill stage has no data, says so in one
    line and hands the RL checkpoint on unchanged (summary: ``skipped``, the same test accuracy);
    alone (``recipe=distill``) there is nothing to hand on: one data error (exit status 2)."""
    from recipes.__main__ import main
    from test_recipes import SMALL

    run = tmp_path / "run"
    assert main(["recipe=sft_grpo_distill", *SMALL, f"run_dir={run}", "distill.num_prompts=8",
                 "distill.per_device_batch_size=4", "logger.wandb.mode=disabled", "recipe.plot=false"]) == 0
    out = capsys.readouterr().out
    assert "[dllm-rl] distill skipped: the policy solved 0 of 8 decoded RL prompts" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"]["skipped"].startswith("the policy solved 0 of 8")
    assert Path(summary["distill"]["checkpoint"]) == Path(summary["rl"]["checkpoint"])
    assert summary["distill"]["eval/accuracy"] == summary["rl"]["eval/accuracy"]
    assert summary["lift"] == summary["rl"]["eval/accuracy"] - summary["sft"]["eval/accuracy"]
    assert (run / "final").resolve() == Path(summary["rl"]["checkpoint"]).resolve()
    assert not (run / "distill").exists()

    assert main(["recipe=distill", "model.path=" + summary["sft"]["checkpoint"], *SMALL, f"run_dir={tmp_path / 'alone'}",
                 "distill.num_prompts=8", "distill.per_device_batch_size=4", "logger.wandb.mode=disabled",
                 "recipe.plot=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dllm-rl: data error: distill: the policy solved 0 of 8 decoded RL prompts")


def test_rollout_fast_is_the_default_tasks_few_step_schedule():
    from recipes.config import load_config

    cfg = load_config(["rollout=fast"])
    base = load_config([])
    assert (cfg.rollout.gen_length, cfg.rollout.block_length) == (base.rollout.gen_length, base.rollout.block_length)
    assert base.rollout.steps / cfg.rollout.steps >= 3 and cfg.rollout.threshold is None
    # the distill stage selects its checkpoint on that schedule (configs/trainer/self_distill.yaml)
    assert dict(base.distill.val_rollout) == {"steps": cfg.rollout.steps}


def test_validation_decodes_with_the_stages_val_rollout(tmp_path, monkeypatch):
    import dataclasses

    import recipes.pipeline as P
    import rl.checkpoint
    from recipes.config import load_config
    from rl.config import ConfigError, SelfDistillConfig
    from rl.tasks import build_task

    cfg = load_config(["task.num_val=4", "recipe.select_best=false"])
    seen = []
    monkeypatch.setattr(P, "evaluate_rows", lambda engine, task, rows, ro, **k: seen.append(ro) or
                        {"eval/val_accuracy": 0.5})
    monkeypatch.setattr(rl.checkpoint, "param_checksum", lambda m: 0.0)  # no module to checksum here
    task = build_task(cfg.task)
    P.make_val_fn(cfg, task, tmp_path, None, val_rollout={"steps": 5})(None, 0)
    P.make_val_fn(cfg, task, tmp_path, None)(None, 0)
    assert seen == [dataclasses.replace(cfg.rollout, steps=5), cfg.rollout]
    with pytest.raises(ConfigError, match=r"val_rollout: unknown rollout option\(s\) \['stpes'\]"):
        SelfDistillConfig(val_rollout={"stpes": 5})
