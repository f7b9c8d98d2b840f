"""Checks between composing the config and building anything heavy: the task has the splits the
recipe trains and evaluates on, and its prompts (plus ``gen_length``, or SFT responses) fit the
model's positions. Each failure is one :class:`ConfigError` / :class:`DataError` line, so a
run never dies on "index 512 is out of bounds" after a whole SFT stage.
"""

from __future__ import annotations

from recipes.schema import (RECIPES, ConfigError, DiffuGRPOConfig, DPOConfig, RunConfig, SelfDistillConfig, SFTConfig,
                            UnmaskOrderConfig)
from rl.tasks import DataError, Task
from rl.tasks.d1 import D1_GEN_LENGTHS

POSITION_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions")


def model_limits(cfg: RunConfig, path: str | None = None):
    """``(tokenizer, positions)`` of the model group (or the checkpoint at ``path``) without its
    weights; ``positions`` is None when the config states no limit (or cannot be read here:
    building the policy then reports why)."""
    path = path or cfg.model.path
    if path is None:
        from rollout.tiny import TINY_MODEL_DEFAULTS, build_tiny_tokenizer

        return build_tiny_tokenizer(), {**TINY_MODEL_DEFAULTS, **dict(cfg.model.tiny)}["max_position_embeddings"]
    from transformers import AutoTokenizer

    from rollout.models import UnsupportedModelError, load_model_config

    try:  # LLaDA / Dream: our implementation's config (not the remote code's), checked here
        config, _ = load_model_config(str(path), trust_remote_code=cfg.model.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=config,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    except UnsupportedModelError as e:
        raise ConfigError(f"model.path={path}: {e}") from None
    except (OSError, ValueError):
        return None, None
    return tokenizer, next((getattr(config, k) for k in POSITION_KEYS if getattr(config, k, None)), None)


def token_lengths(tokenizer, texts: list, *, exact: int = 32) -> list[int]:
    """Token counts of prompts as the sampler encodes them (chat template included): a batch
    estimate for all, then the ``exact`` longest encoded one by one."""
    from rl.data import encode_prompt

    plain = [i for i, t in enumerate(texts) if isinstance(t, str)]
    lengths = [0] * len(texts)
    if plain:
        overhead = len(encode_prompt(tokenizer, "x")) - len(tokenizer("x", add_special_tokens=False)["input_ids"])
        ids = tokenizer([texts[i] for i in plain], add_special_tokens=False)["input_ids"]
        for i, row in zip(plain, ids):
            lengths[i] = len(row) + overhead
    longest = sorted(range(len(texts)), key=lambda i: (isinstance(texts[i], str), -lengths[i]))
    for i in longest[:exact] + [i for i in range(len(texts)) if not isinstance(texts[i], str)]:
        lengths[i] = len(encode_prompt(tokenizer, texts[i]))
    return lengths


def check_splits(cfg: RunConfig, task: Task, world_size: int = 1, sft_task: Task | None = None) -> None:
    """The recipe's stages have rows: SFT labelled rows (from ``sft_task`` when the SFT stage has its
    own task), RL prompts for one global batch, a test split."""
    for key, _ in RECIPES[cfg.recipe.name]:
        stage = getattr(cfg, key)
        split = "sft" if isinstance(stage, SFTConfig) and not isinstance(stage, SelfDistillConfig) else "rl"
        source = sft_task if split == "sft" and sft_task is not None else task
        if not source.has_train:
            raise DataError(source.missing_train_message())
        rows = source.rows(split)
        if not rows:
            what = "labelled rows (with a response)" if split == "sft" else "RL prompts"
            raise DataError(f"task {source.name!r} has no {what} for the {key} stage ({source.source or 'its data'})")
        need = stage.per_device_batch_size * world_size  # (DPO draws pairs, built from these prompts later)
        if not isinstance(stage, DPOConfig) and len(rows) < need:
            raise DataError(f"task {source.name!r}: {len(rows)} rows for the {key} stage, fewer than one global "
                            f"batch ({stage.per_device_batch_size} per device x {world_size} processes)")
    if not task.rows("test"):
        raise DataError(f"task {task.name!r}: the test split is empty ({task.source or 'its data'})")


def _positions_hint(cfg: RunConfig) -> str:
    return "model.tiny.max_position_embeddings=<n>" if cfg.model.path is None else "a model with more positions"


def check_lengths(cfg: RunConfig, task: Task, uses: list[tuple], *, path: str | None = None) -> dict[str, int]:
    """``uses``: (split, rows, gen_length[, max prompt tokens]) for every way rows meet the model;
    gen_length 0 = SFT (prompt + response, truncated at ``sft.max_length``). ConfigError naming the largest need
    when any row cannot fit. Returns the token lengths it measured: ``<split>_prompt`` (the longest
    prompt, after the cap), ``sft`` (the longest SFT example) and ``generation`` (the longest prompt +
    gen_length: the vLLM engine's ``max_model_len``); empty when the tokenizer cannot be read here."""
    tokenizer, positions = model_limits(cfg, path)
    if tokenizer is None:
        return {}
    worst, lengths = (0, ""), {}
    for split, rows, gen_length, *cap in uses:
        if not rows:
            continue
        prompts = token_lengths(tokenizer, [r["prompt"] for r in rows])
        if cap and cap[0]:  # GRPO keeps the last max_prompt_length tokens
            prompts = [min(p, cap[0]) for p in prompts]
        if gen_length:
            need = max(prompts) + gen_length
            lengths[f"{split}_prompt"] = max(lengths.get(f"{split}_prompt", 0), max(prompts))
            lengths["generation"] = max(lengths.get("generation", 0), need)
            why = f"the longest {split} prompt is {max(prompts)} tokens, + gen_length={gen_length}"
        else:
            sft = cfg.sft
            responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
            need = max(min(p + max(len(r) + 1, sft.pad_response_to), sft.max_length) for p, r in zip(prompts, responses))
            if sft.example_format == "d1":  # every row is padded to max_length
                need = sft.max_length
            lengths["sft"] = max(lengths.get("sft", 0), need)
            why = f"SFT examples reach {need} tokens (sft.max_length={sft.max_length})"
        worst = max(worst, (need, why))
    need, why = worst
    if positions is not None and need > positions:
        raise ConfigError(f"task {task.name}: {why} needs {need} positions but the model has {positions} "
                          f"(set {_positions_hint(cfg)}, or shorten prompts / gen_length / sft.max_length)")
    return lengths


def check_rollout_engine(cfg: RunConfig, world_size: int) -> None:
    """The vLLM engines fit the launch: the model is not a block-diffusion one, ``tensor_parallel_size``
    divides the world size, sleep mode exists on this platform (one ConfigError line each)."""
    if cfg.rollout.backend != "vllm":
        return
    from rollout.models import read_config_dict
    from rollout.vllm_backend.engine import check_not_block_causal, check_sleep, check_world

    try:
        if cfg.model.path is not None:
            try:
                model_type = read_config_dict(str(cfg.model.path)).get("model_type")
            except (OSError, ValueError):  # not readable here: building the policy reports why
                model_type = None
            check_not_block_causal(model_type)
        check_world(cfg.rollout.vllm, world_size)
        check_sleep(cfg.rollout.vllm)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_block_model(cfg: RunConfig) -> None:
    """A block-diffusion model (SDAR / TraDo) trains every SFT-type stage with the block-diffusion loss,
    which has no certainty-forcing term: a stage asking for it (the default recipe's distill stage)
    stops the run here, before the first stage, not when that stage starts (one ConfigError line)."""
    if cfg.model.path is None:
        return
    from rollout.models import is_block_causal

    try:
        block = is_block_causal(str(cfg.model.path))
    except (OSError, ValueError):  # not readable here: building the policy reports why
        return
    if not block:
        return
    for key, _ in RECIPES[cfg.recipe.name]:
        stage = getattr(cfg, key)
        if isinstance(stage, SFTConfig) and stage.certainty_weight > 0:
            hint = " (or recipe=sft_then_grpo)" if isinstance(stage, SelfDistillConfig) else ""
            raise ConfigError(f"{key}.certainty_weight={stage.certainty_weight}: {cfg.model.path} is a block-diffusion "
                              f"model, whose SFT loss has no certainty-forcing term; set {key}.certainty_weight=0{hint}")


def check_code_columns(task: Task, splits: tuple[str, ...]) -> None:
    """A task scored by the code sandbox: malformed test columns stop the run here, one line naming
    the split, row and column (``rewards.code.check_code_rows``), instead of scoring 0 later."""
    if "code" not in task.rewards and task.accuracy_reward != "code":
        return
    from rewards.code import check_code_rows

    for split in splits:
        try:
            check_code_rows(task.rows(split))
        except ValueError as e:
            raise DataError(f"task {task.name!r}, {split} split: {e}") from None


def check_training(cfg: RunConfig, task: Task, world_size: int = 1, sft_task: Task | None = None) -> dict[str, int]:
    """Everything a training recipe needs from its task(s) before the first stage starts; returns
    the token lengths measured (:func:`check_lengths`)."""
    check_rollout_engine(cfg, world_size)
    check_block_model(cfg)
    check_splits(cfg, task, world_size, sft_task)
    check_code_columns(task, ("rl", "val", "test"))
    uses = [("val", task.rows("val"), cfg.rollout.gen_length), ("test", task.rows("test"), cfg.rollout.gen_length)]
    sft_lengths: dict[str, int] = {}
    for key, _ in RECIPES[cfg.recipe.name]:
        stage = getattr(cfg, key)
        if isinstance(stage, SelfDistillConfig):  # decodes RL prompts, then trains on prompt + completion
            uses.append(("rl", task.rows("rl"), stage.rollout.gen_length))
        elif isinstance(stage, SFTConfig):
            if sft_task is not None and sft_task is not task:
                sft_lengths = check_lengths(cfg, sft_task, [("sft", sft_task.rows("sft"), 0)])
            else:
                uses.append(("sft", task.rows("sft"), 0))
        else:
            ro = stage.rollout if isinstance(stage, (DiffuGRPOConfig, UnmaskOrderConfig)) else cfg.rollout
            uses.append(("rl", task.rows("rl"), ro.gen_length, getattr(stage, "max_prompt_length", None)))
    return {**sft_lengths, **check_lengths(cfg, task, uses)}


def check_eval(cfg: RunConfig, task: Task, rows: list[dict], path: str | None = None,
               world_size: int = 1) -> dict[str, int]:
    """The eval recipe on one task: test rows exist and fit at the longest evaluated length; returns
    the token lengths measured (:func:`check_lengths`)."""
    check_rollout_engine(cfg, world_size)
    if not rows:
        raise DataError(f"task {task.name!r}: the test split is empty ({task.source or 'its data'})")
    check_code_columns(task, ("test",))
    lengths = list(cfg.eval.gen_lengths) or ([max(D1_GEN_LENGTHS)] if cfg.eval.protocol == "d1" else
                                             [cfg.rollout.gen_length])
    return check_lengths(cfg, task, [("test", rows, max(lengths))], path=str(path) if path else cfg.eval.checkpoint)
