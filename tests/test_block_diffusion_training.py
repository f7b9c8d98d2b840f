"""Block-diffusion training through the trainers, on a tiny SDAR (our block-causal Qwen3 blocks):
the block-causal estimators (rl/block_diffusion.py) against the pure functions and per-block forwards,
the estimator swap of the GRPO trainer (diffu_grpo -> block_mean_field, tracerl -> block_tracerl), the
SFT trainer's block-diffusion loss, and one loss step of each on hand-made rollouts (trajectories with
step maps), full and LoRA. The rollouts of a block model come from the rollout engine (not used here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.block_recipes import tiny_sdar
from rl.block_diffusion import (BlockMeanField, BlockScoring, BlockTraceRLTrace, block_diffusion_sft_loss,
                                block_estimator, block_masked_logprobs, block_trace_logprobs, draw_block_sft_noise,
                                split_prompt_response)
from rl.estimators import ESTIMATORS, get_estimator
from rollout.types import Rollout, completion_mask_from_eos

BLOCK = 4
P, L = 7, 10  # prompt width (left padded), completion width
PROMPT_LENS = [7, 5, 2, 6]


def hand_made_rollout(policy, seed: int = 0, g: int = 4) -> Rollout:
    """Left-padded prompts of lengths PROMPT_LENS, random completions (an EOS in two rows), and a step
    map as the block sampler records it: block by block (absolute alignment: the first block holds the
    prompt's tail), 1 or 2 tokens per step, global step numbers."""
    gen = torch.Generator().manual_seed(seed)
    tok = policy.tokenizer
    lo = 10  # past the special and role tokens
    b = len(PROMPT_LENS)
    prompt = torch.full((b, P), tok.pad_token_id, dtype=torch.long)
    pmask = torch.zeros(b, P, dtype=torch.long)
    for i, n in enumerate(PROMPT_LENS):
        prompt[i, P - n:] = torch.randint(lo, len(tok), (n,), generator=gen)
        pmask[i, P - n:] = 1
    comp = torch.randint(lo, len(tok), (b, L), generator=gen)
    comp[1, 6] = comp[3, 2] = tok.eos_token_id
    steps = torch.zeros(b, L, dtype=torch.long)
    for i, n in enumerate(PROMPT_LENS):
        first = BLOCK - n % BLOCK if n % BLOCK else BLOCK  # completion tokens in the block holding the prompt's tail
        bounds = [0] + list(range(first, L, BLOCK)) + [L]
        step = 0
        for s, e in zip(bounds[:-1], bounds[1:]):
            order = (s + torch.randperm(e - s, generator=gen)).tolist()
            j = 0
            while j < len(order):
                k = int(torch.randint(1, 3, (1,), generator=gen))
                steps[i, order[j:j + k]] = step
                j, step = j + k, step + 1
    return Rollout(sequences=torch.cat([prompt, comp], 1), prompt_ids=prompt, prompt_mask=pmask, completion_ids=comp,
                   completion_mask=completion_mask_from_eos(comp, tok.eos_token_id), unmask_step=steps,
                   num_forward_passes=int(steps.max()) + 1, num_steps=int(steps.max()) + 1)


@pytest.fixture(scope="module")
def policy():
    return tiny_sdar().eval()


@pytest.fixture(scope="module")
def ro(policy):
    return hand_made_rollout(policy)


def _direct(model, ro: Rollout, masked: torch.Tensor) -> torch.Tensor:
    """Per row and block b (absolute alignment): one forward on the real tokens up to the end of block b,
    block b's masked completion tokens replaced by the mask, the model's own block-causal attention (2D
    padding mask); the log-probs of those tokens. ``masked [B, L]``."""
    out = torch.zeros(masked.shape)
    for i in range(ro.sequences.shape[0]):
        n = int(ro.prompt_mask[i].sum())
        x = torch.cat([ro.prompt_ids[i, P - n:], ro.completion_ids[i]])
        blocks = torch.arange(n + L) // BLOCK
        for blk in blocks[n:].unique().tolist():
            end = int((blocks <= blk).sum())
            here = torch.zeros(end, dtype=torch.bool)
            here[n:] = masked[i, :end - n] & (blocks[n:end] == blk)
            seq = torch.where(here, torch.full_like(x[:end], model.mask_token_id), x[:end])
            logp = torch.log_softmax(model(seq[None]).logits[0].double(), -1)
            for j in here.nonzero().squeeze(-1).tolist():
                out[i, j - n] = float(logp[j, x[j]])
    return out


# ---- the block estimators ----------------------------------------------------------------------------
def test_block_mean_field_equals_per_block_forwards_and_the_pure_function(policy, ro):
    est = block_estimator(get_estimator("mean_field", p_mask_prompt=0.0), policy.model_block_length)
    assert isinstance(est, BlockMeanField) and est.model_block_length == BLOCK and est.align == "absolute"
    sample = est.draw(ro.attention_mask, ro.completion_mask, P, torch.Generator().manual_seed(0))
    with torch.no_grad():
        terms = est.combine(sample, est.score(policy, ro.sequences, ro.attention_mask, P, sample,
                                              policy.mask_token_id)).per_token
        want = _direct(policy, ro, torch.ones(ro.completion_ids.shape, dtype=torch.bool)) * ro.completion_mask
        pure = block_masked_logprobs(policy.model, ro.sequences, torch.ones_like(ro.completion_mask).bool(),
                                     policy.mask_token_id, prompt_len=P, block_length=BLOCK,
                                     attention_mask=ro.prompt_mask, align="absolute",
                                     select=ro.completion_mask.bool())  # the bare model: full logits
    torch.testing.assert_close(terms, want, rtol=0, atol=2e-5)  # fused scoring (adapter) vs full log-softmax
    torch.testing.assert_close(terms, pure, rtol=0, atol=2e-5)
    # prompt masking: the masked prompt tokens are masks in the clean context
    est = block_estimator(get_estimator("mean_field", p_mask_prompt=0.5), BLOCK)
    sample = est.draw(ro.attention_mask, ro.completion_mask, P, torch.Generator().manual_seed(1))
    assert sample.masked[0, :, :P].any() and not (sample.masked[0, :, :P] & ~ro.prompt_mask.bool()).any()
    with torch.no_grad():
        masked_prompt = est.score(policy, ro.sequences, ro.attention_mask, P, sample, policy.mask_token_id)[0]
        ro2 = dataclasses.replace(ro, prompt_ids=torch.where(sample.masked[0, :, :P], policy.mask_token_id,
                                                             ro.prompt_ids))
        want = _direct(policy, ro2, torch.ones(ro.completion_ids.shape, dtype=torch.bool)) * ro.completion_mask
    torch.testing.assert_close(masked_prompt, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shrink", [1, 2])
def test_block_tracerl_estimator_equals_the_trace_likelihood(policy, ro, shrink):
    est = block_estimator(get_estimator("tracerl", shrink=shrink), policy.model_block_length)
    assert isinstance(est, BlockTraceRLTrace) and est.shrink == shrink
    sample = est.draw(ro.attention_mask, ro.completion_mask, P, None, trace=ro.unmask_step, num_steps=ro.num_steps)
    with torch.no_grad():
        terms = est.combine(sample, est.score(policy, ro.sequences, ro.attention_mask, P, sample,
                                              policy.mask_token_id)).per_token
        want, group = block_trace_logprobs(policy, ro.sequences, ro.unmask_step, mask_id=policy.mask_token_id,
                                           prompt_len=P, block_length=BLOCK, shrink=shrink,
                                           attention_mask=ro.prompt_mask, align="absolute",
                                           scored=ro.completion_mask.bool())
    torch.testing.assert_close(terms, want, rtol=0, atol=1e-6)
    assert sample.num_passes == int(group.max()) + 1
    if shrink == 1:  # the exact likelihood of the sampled trajectory: step by step, block by block
        with torch.no_grad():
            direct = torch.zeros_like(terms)
            for s in range(int(ro.unmask_step.max()) + 1):
                now = ro.unmask_step == s
                direct = torch.where(now, _direct(policy, ro, ro.unmask_step >= s), direct)
        torch.testing.assert_close(terms, direct * ro.completion_mask, rtol=0, atol=2e-5)


def test_block_estimator_swap_and_registry():
    assert {"block_mean_field", "block_tracerl", "block_mc_elbo", "block_d2_stepmerge"} <= set(ESTIMATORS)
    for name, cls in ESTIMATORS.items():
        if issubclass(cls, BlockScoring):
            assert cls.block_of in ESTIMATORS and cls.level == ESTIMATORS[cls.block_of].level, name
    est = block_estimator(get_estimator("mc_elbo", n_samples=3, eps=0.01, max_batch=5), 8)
    assert (est.name, est.n_samples, est.eps, est.max_batch, est.model_block_length) == ("block_mc_elbo", 3, 0.01, 5, 8)
    kept = get_estimator("block_tracerl", shrink=3, model_block_length=2)
    assert block_estimator(kept, 8) is kept  # an explicit block estimator keeps its options
    assert block_estimator(get_estimator("block_tracerl"), 8).model_block_length == 8
    with pytest.raises(ValueError, match="no block-causal form.*mean_field -> block_mean_field"):
        block_estimator(get_estimator("coupled"), 8)
    with pytest.raises(ValueError, match="model_block_length"):
        get_estimator("block_tracerl").draw(None, torch.ones(1, 4), 2, None, trace=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="align"):
        get_estimator("block_mean_field", align="left")


# ---- SFT ----------------------------------------------------------------------------------------------
def test_split_prompt_response_lays_out_prompts_left_and_responses_right():
    from rl.sft import collate_sft

    enc = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([5, 6, 7], [0, 0, 0]), ([4, 5, 6, 7, 8, 9], [0, 1, 1, 1, 1, 0])]
    b = collate_sft(enc, pad_id=0)
    lay = split_prompt_response(b["input_ids"], b["response_mask"], b["attention_mask"], pad_id=0)
    assert lay.prompt_len == 3
    assert lay.input_ids.tolist() == [[0, 5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0], [0, 0, 4, 5, 6, 7, 8, 9]]
    assert lay.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    assert lay.response_mask.int().tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]


SFT_ROWS = [{"prompt": f"add {i} and {i + 3}", "response": f"{2 * i + 3}"} for i in range(8)]


def sft_trainer(tmp_path, policy, *, micro: int = 4, lora: bool = False, **kw):
    from rl.config import LoraOptions, SFTConfig
    from rl.sft import SFTTrainer

    cfg = SFTConfig(run_dir=str(tmp_path), max_steps=2, lr=1e-3, per_device_batch_size=4, micro_batch_size=micro,
                    deepspeed="zero0", logging_steps=1, save_steps=0, export_hf=False, wandb_mode="disabled",
                    lora=LoraOptions(enabled=lora, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                    **kw)
    return SFTTrainer(cfg, policy, SFT_ROWS, eval_dataset=SFT_ROWS[:4])


def test_sft_trainer_uses_the_block_diffusion_loss(tmp_path):
    trainer = sft_trainer(tmp_path / "a", tiny_sdar())
    assert trainer.block_length == BLOCK
    rows = SFT_ROWS[:4]
    g = trainer.generators["mask"]
    state = g.get_state()
    batch = trainer.block_batch(rows)
    lay = batch["layout"]
    noise = draw_block_sft_noise(lay.response_mask.shape, g, lower_p=0.1, upper_p=0.9)
    with torch.no_grad():
        want = block_diffusion_sft_loss(trainer.policy, lay.input_ids, lay.response_mask,
                                        mask_id=trainer.mask_id, prompt_len=lay.prompt_len, block_length=BLOCK,
                                        attention_mask=lay.attention_mask, align="absolute", noise=noise,
                                        normalize="tokens")
    g.set_state(state)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    out = trainer.training_step(rows)
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert "eval/loss" in trainer.evaluate()


def test_sft_block_loss_does_not_depend_on_micro_batch_size(tmp_path):
    out = {}
    for micro in (4, 2, 1):
        trainer = sft_trainer(tmp_path / f"m{micro}", tiny_sdar(), micro=micro)
        m = trainer.training_step(SFT_ROWS[:4])
        out[micro] = (float(m["loss"]), float(m["grad_norm"]))
    for micro in (2, 1):
        assert out[micro] == pytest.approx(out[4], rel=1e-4), out


def test_sft_block_lora_trains_only_adapters(tmp_path):
    trainer = sft_trainer(tmp_path, tiny_sdar(), lora=True)
    m = trainer.train()
    assert torch.isfinite(torch.tensor(m["loss"]))
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_sft_block_config_checks():
    from rl.config import ConfigError, SFTConfig

    with pytest.raises(ConfigError, match="block_upper_p"):
        SFTConfig(block_lower_p=0.5, block_upper_p=0.4)
    with pytest.raises(ConfigError, match="block_lower_p"):
        SFTConfig(block_lower_p=0.0, block_weighting="inverse_p")
    with pytest.raises(ConfigError, match="block_align"):
        SFTConfig(block_align="left")


# ---- RL: one policy update on a hand-made rollout ---------------------------------------------------
def grpo_trainer(tmp_path, policy, *, objective: str = "diffu_grpo", lora: bool = False, beta: float = 0.0,
                 num_iterations: int = 2, micro: int = 4, **kw):
    from rl.config import DiffuGRPOConfig, LoraOptions, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer

    cfg = DiffuGRPOConfig(run_dir=str(tmp_path), max_steps=1, lr=1e-3, per_device_prompts=1, num_generations=4,
                          num_iterations=num_iterations, beta=beta, epsilon=0.2, objective=objective,
                          deepspeed="zero0", micro_batch_size=micro, sample_table_every=0, export_hf=False,
                          rollout=kw.pop("rollout", RolloutOptions(gen_length=L - 2, block_length=BLOCK, steps=L - 2)),
                          lora=LoraOptions(enabled=lora, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          wandb_mode="disabled", **kw)
    return DiffuGRPOTrainer(cfg, policy, [{"prompt": "x"}], reward_funcs=[lambda completions, **_: [0.0] * len(completions)])


@pytest.mark.parametrize("objective,estimator", [("diffu_grpo", "block_mean_field"), ("tracerl", "block_tracerl")])
@pytest.mark.parametrize("lora", [False, True])
def test_grpo_policy_update_on_a_block_model(tmp_path, ro, objective, estimator, lora):
    trainer = grpo_trainer(tmp_path, tiny_sdar(), objective=objective, lora=lora, beta=0.04 if lora else 0.0)
    assert trainer.estimator.name == estimator and trainer.estimator.model_block_length == BLOCK
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    sample = trainer.estimator.draw(ro.attention_mask, ro.completion_mask, P, torch.Generator().manual_seed(0),
                                    **({"trace": ro.unmask_step, "num_steps": ro.num_steps}
                                       if trainer.estimator.needs_trace else {}))
    with torch.no_grad():
        terms = trainer.logps(trainer.model, ro.sequences, ro.attention_mask, P, sample, slice(None),
                              ro.completion_mask, {})
        if objective == "tracerl":
            want, _ = block_trace_logprobs(trainer.policy, ro.sequences, ro.unmask_step, mask_id=trainer.mask_id,
                                           prompt_len=P, block_length=BLOCK, shrink=trainer.objective.shrink,
                                           attention_mask=ro.prompt_mask, align="absolute",
                                           scored=ro.completion_mask.bool())
        else:
            want = block_masked_logprobs(trainer.policy, ro.sequences, sample.masked[0], trainer.mask_id,
                                         prompt_len=P, block_length=BLOCK, attention_mask=ro.prompt_mask,
                                         align="absolute", select=ro.completion_mask.bool())
    torch.testing.assert_close(terms, want, rtol=0, atol=1e-6)
    before = [p.detach().clone() for p in trainer.policy.parameters() if p.requires_grad]
    m = trainer.policy_update(ro, adv)
    assert all(torch.isfinite(torch.as_tensor(m[k])) for k in ("loss", "kl", "grad_norm")), m
    assert float(m["grad_norm"]) > 0
    after = [p.detach() for p in trainer.policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_grpo_block_loss_does_not_depend_on_micro_batch_size(tmp_path, ro):
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    out = {}
    for micro in (4, 2, 1):
        trainer = grpo_trainer(tmp_path / f"m{micro}", tiny_sdar(), objective="tracerl", micro=micro)
        m = trainer.policy_update(ro, adv)
        out[micro] = (float(m["loss"]), float(m["grad_norm"]))
    for micro in (2, 1):
        assert out[micro] == pytest.approx(out[4], rel=1e-4), out


def test_grpo_on_a_block_model_refuses_an_estimator_without_a_block_form(tmp_path):
    with pytest.raises(ValueError, match="no block-causal form"):
        grpo_trainer(tmp_path, tiny_sdar(), estimator="coupled")


def test_grpo_on_a_block_model_needs_the_models_blocks_in_the_rollouts(tmp_path):
    from rl.config import ConfigError, RolloutOptions

    with pytest.raises(ConfigError, match="rollout.block_length=8: .* set it to 4"):
        grpo_trainer(tmp_path, tiny_sdar(), rollout=RolloutOptions(gen_length=8, block_length=8, steps=8))
