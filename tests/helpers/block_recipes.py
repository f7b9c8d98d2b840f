"""SFT then GRPO through the recipes on a tiny SDAR (block diffusion): full fine-tuning and LoRA, each
RL objective with its block-causal estimator. Run in-process (one rank) by
tests/test_block_diffusion_recipes.py, or once per rank under a launcher:

    torchrun --nproc_per_node 2 -m tests.helpers.block_recipes ROOT FOLDER --zero zero3

Case ``<full|lora>-<objective>`` runs in ``ROOT/<case>`` through the CLI entry point
(``recipes.__main__.main``); ``ROOT/<case>/exit_code`` records its exit status.
"""

from __future__ import annotations

import argparse
from pathlib import Path

BLOCK = 4
CASES = (("full", "diffu_grpo"), ("lora", "tracerl"))
# a random model solves no Sudoku: the reward-driven stage learns from the share of digits instead
DIGIT_REWARD = "task.rewards={helpers.recipe_matrix.digit_share: 1.0}"


def tiny_sdar(seed: int = 0, block_length: int = BLOCK):
    """A ~0.1M-parameter SDAR (2 Qwen3 blocks, block-causal attention) with the tiny tokenizer, as a
    :class:`rollout.PolicyAdapter`."""
    import torch

    from rollout import PolicyAdapter
    from rollout.models import SDARConfig, SDARForMaskedLM
    from rollout.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = SDARConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                     initializer_range=0.3, block_length=block_length, tie_word_embeddings=False,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                     mask_token_id=tok.mask_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SDARForMaskedLM(cfg)
    return PolicyAdapter(model, tok, mask_token_id=tok.mask_token_id)


def write_tiny_sdar(folder: str | Path, seed: int = 0, block_length: int = BLOCK) -> Path:
    """:func:`tiny_sdar` saved in ``folder`` (published layout, our writer) with its tokenizer."""
    policy = tiny_sdar(seed, block_length)
    folder = Path(folder)
    policy.model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    return folder


def case_name(variant: str, objective: str) -> str:
    return f"{variant}-{objective}"


def overrides(variant: str, objective: str, folder: str | Path, run_dir: str | Path, zero: str = "zero0") -> list[str]:
    """d1's two-stage recipe (SFT then GRPO) on the fixture, 3 + 3 steps, blocks of 4 in the rollouts."""
    out = ["recipe=sft_then_grpo", f"model.path={folder}", "model.family=auto", "model.name=tiny-sdar",
           f"run_dir={run_dir}", "seed=0",
           "logger.wandb.mode=disabled", "recipe.plot=false", "recipe.eval_batch_size=8",
           "task.num_sft=8", "task.num_rl=8", "task.num_val=4", "task.num_test=4", DIGIT_REWARD,
           "rollout.gen_length=20", f"rollout.block_length={BLOCK}", "rollout.steps=20", "rl.rollout.temperature=1.5",
           "sft.per_device_batch_size=4", "rl.per_device_prompts=2", "rl.num_generations=4", "rl.num_iterations=2",
           f"rl.objective={objective}"]
    for key in ("sft", "rl"):
        out += [f"{key}.max_steps=3", f"{key}.eval_steps=2", f"{key}.warmup_steps=0", f"{key}.deepspeed={zero}",
                f"{key}.gradient_checkpointing=true"]
        if variant == "lora":
            out += [f"{key}.lora.enabled=true", f"{key}.lora.r=4", f"{key}.lora.alpha=8", f"{key}.lora.dropout=0.0"]
    return out


def run(root: Path, folder: str | Path, zero: str) -> None:
    from recipes.__main__ import main

    for variant, objective in CASES:
        run_dir = root / case_name(variant, objective)
        code = main(overrides(variant, objective, folder, run_dir, zero))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "exit_code").write_text(str(code))


def _cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("folder")
    parser.add_argument("--zero", default="zero0")
    args = parser.parse_args()
    run(args.root, args.folder, args.zero)


if __name__ == "__main__":
    _cli()
