"""``dllm-rl plan [overrides]``: the per-GPU memory of the composed run, stage by stage and item by
item (formulas: rl/memory.py), the largest micro-batch that fits a GPU, and the check at preflight
that stops a CUDA run predicted not to fit (``plan.check=false`` runs anyway).

    dllm-rl plan experiment=llada_gsm8k plan.world_size=8 plan.gpu_memory_gib=80

Nothing is downloaded and no weight is loaded: the model is built on the meta device from its
config (a local folder, or the published configs of :data:`KNOWN_CONFIGS` for the hub names the
model group names). Token lengths come from the task's rows when they can be read (preflight
always can), else from the config's bounds (``sft.max_length``, ``rl.max_prompt_length``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from recipes.schema import ConfigError, DiffuGRPOConfig, DPOConfig, RECIPES, RunConfig, SFTConfig
from rl.memory import (CUDA_RESERVE, GIB, StagePlan, block_generation, deepspeed_buffers, generation, largest_fitting,
                       model_shape, model_states, optimizer_step, reference_weights, train_activations)

# Published config.json values of the hub checkpoints the model group names (what `plan` needs when
# the checkpoint is not on disk): GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, and the 8B
# block-diffusion models, which keep Qwen3-8B's architecture (SDAR is continued from Qwen3-8B-Base;
# TraDo-8B from SDAR-8B-Chat): Qwen3-8B's config.json values, blocks of 4.
KNOWN_CONFIGS: dict[str, dict] = {
    "GSAI-ML/LLaDA-8B-Instruct": dict(
        model_type="llada", d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
        vocab_size=126464, embedding_size=126464, max_sequence_length=4096, rope=True, rope_theta=500000.0,
        block_type="llama", activation_type="silu", layer_norm_type="rms", rms_norm_eps=1e-5, weight_tying=False,
        include_bias=False, include_qkv_bias=False, attention_dropout=0.0, residual_dropout=0.0,
        embedding_dropout=0.0, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "Dream-org/Dream-v0-Instruct-7B": dict(
        model_type="Dream", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, mask_token_id=151666),
    **{name: dict(
        model_type="sdar", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, block_length=4, mask_token_id=151669)
       for name in ("JetLM/SDAR-8B-Chat", "Gen-Verse/TraDo-8B-Instruct")},
}
PLANNED = (SFTConfig, DiffuGRPOConfig, DPOConfig)  # the stages plan_stage covers (not the order learner)
DEFAULT_GPU_GIB = 80.0  # `dllm-rl plan` on a machine without a GPU
DEFAULT_PLAN_WORLD = 8  # `dllm-rl plan` outside a launcher
ASSUMED_PROMPT = 256  # prompt tokens assumed when neither the rows nor max_prompt_length say


def meta_model(cfg: RunConfig) -> torch.nn.Module:
    """The model group's network on the meta device (no memory, nothing loaded)."""
    m = cfg.model
    if m.path is None:
        from rollout.tiny import build_tiny_model, build_tiny_tokenizer

        with torch.device("meta"):
            return build_tiny_model(build_tiny_tokenizer(), seed=None, **dict(m.tiny))
    from rollout.models import UnsupportedModelError, load_model_config, native_class

    try:
        if not _local_config_or_known(str(m.path)):
            raise OSError(f"{m.path}: not in the local cache")
        config, native = load_model_config(str(m.path), trust_remote_code=m.trust_remote_code)
    except UnsupportedModelError as e:
        raise ConfigError(f"model.path={m.path}: {e}") from None
    except (OSError, ValueError):
        known = KNOWN_CONFIGS.get(str(m.path))
        if known is None:
            raise ConfigError(f"model.path={m.path}: no config.json to plan with (offline and not one of "
                              f"{', '.join(KNOWN_CONFIGS)}); give a local folder") from None
        native = native_class(known["model_type"])
        config = native.config_class(**{k: v for k, v in known.items() if k != "model_type"})
    with torch.device("meta"):
        if native is not None:
            return native(config)
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_config(config, trust_remote_code=m.trust_remote_code)


def lora_params(model: torch.nn.Module, options) -> int:
    """Parameters of LoRA's adapters: ``r (in + out)`` per adapted Linear (rl.trainer's targets;
    counted once per model and options)."""
    from rl.trainer import lora_target_names

    cache = model.__dict__.setdefault("_plan_lora_params", {})
    key = (options.r, tuple(options.target_modules), options.target_names)
    if key not in cache:
        modules = dict(model.named_modules())
        cache[key] = sum(options.r * (modules[n].in_features + modules[n].out_features)
                         for n in lora_target_names(model, options))
    return cache[key]


def _ds(stage_cfg) -> dict:
    from rl.engine import load_ds_config
    from rl.trainer import resolve_deepspeed_config

    return load_ds_config(resolve_deepspeed_config(stage_cfg.deepspeed))


def plan_stage(cfg: RunConfig, key: str, model: torch.nn.Module, *, world_size: int, gpu_bytes: float,
               lengths: dict | None = None, micro_batch: int | None = None, cuda: bool = True) -> StagePlan:
    """The :class:`rl.memory.StagePlan` of stage ``key`` (``sft`` / ``rl``) of ``cfg``."""
    stage = getattr(cfg, key)
    lengths = lengths or {}
    shape = model_shape(model)
    ds = _ds(stage)
    zero = ds.get("zero_optimization", {})
    zstage = int(zero.get("stage", 0))
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    weight_bytes = 4 if cfg.model.dtype == "float32" else 2
    qlora = bool(stage.lora.load_in_4bit)
    compute = 2 if (stage.bf16 or weight_bytes == 2 or qlora) else 4
    trainable = lora_params(model, stage.lora) if stage.lora.enabled else shape.params
    plan = StagePlan(stage=key)
    model_states(plan, shape, world_size=world_size, zero_stage=zstage, bf16=stage.bf16, weight_bytes=weight_bytes,
                 trainable=trainable, lora=stage.lora.enabled, offload_optimizer=offload_opt, qlora=qlora)
    deepspeed_buffers(plan, zero_stage=zstage, bf16=stage.bf16,
                      reduce_bucket_size=int(zero.get("reduce_bucket_size", 0)),
                      overlap_comm=bool(zero.get("overlap_comm", False)), trainable=trainable,
                      prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 0)))
    if getattr(stage, "beta", 0) > 0 and isinstance(stage, DiffuGRPOConfig) and not stage.lora.enabled:
        reference_weights(plan, shape, world_size=world_size, zero_stage=zstage, weight_bytes=compute)
    gen = cfg.rollout.gen_length
    # a block-diffusion model (SDAR / TraDo) trains on [x_0, x_t]: the clean sequence and a noisy copy of
    # the completion (rl/block_diffusion.py), and samples block by block against a cache
    block = getattr(model, "block_length", None) if getattr(model, "block_causal", False) else None
    if isinstance(stage, SFTConfig):
        rows_per_step = stage.per_device_batch_size
        seq = stage.max_length if stage.example_format == "d1" else min(lengths.get("sft", stage.max_length),
                                                                         stage.max_length)
        rows, scored = micro_batch or stage.micro_batch_size or rows_per_step, seq
        if block:  # the noisy copy of the response: at most the whole sequence again
            seq, scored = 2 * seq, seq
    elif isinstance(stage, DiffuGRPOConfig):
        gen = stage.rollout.gen_length
        rows_per_step = stage.per_device_prompts * stage.num_generations
        data, cap = lengths.get("rl_prompt"), stage.max_prompt_length
        prompt = min(data, cap) if data and cap else (data or cap or ASSUMED_PROMPT)
        seq, scored = prompt + gen, gen
        from rl.estimators import get_estimator

        estimator = get_estimator(stage.estimator, **dict(stage.estimator_options))
        if block:
            from rl.block_diffusion import block_form

            estimator = block_form(estimator, block)
            seq = prompt + 2 * gen
        passes = estimator.passes_per_draw(stage.rollout.steps)
        rows = (micro_batch or stage.micro_batch_size or rows_per_step) * passes
        ro = stage.rollout
        if cfg.rollout.backend == "torch" and block:
            block_generation(plan, shape, rows=rows_per_step, seq_len=prompt + gen, block_length=ro.block_length,
                             compute_bytes=compute, phase="rollout", label="rollout", sampled=ro.temperature > 0)
        elif cfg.rollout.backend == "torch":
            generation(plan, shape, rows=rows_per_step, seq_len=seq,
                       window=gen if ro.early_commit is not None else ro.block_length, compute_bytes=compute,
                       phase="rollout", label="rollout", sampled=ro.temperature > 0)
    elif isinstance(stage, DPOConfig):
        rows_per_step = stage.per_device_batch_size
        prompt = lengths.get("rl_prompt") or ASSUMED_PROMPT
        seq, scored = prompt + stage.max_completion_length, stage.max_completion_length
        rows = (micro_batch or stage.micro_batch_size or rows_per_step) * 2 * stage.n_samples
    else:
        raise ConfigError(f"{key}: dllm-rl plan covers SFT, diffu-GRPO and DPO stages, not {type(stage).__name__}")
    train_activations(plan, shape, rows=rows, seq_len=seq, scored=scored, compute_bytes=compute,
                      checkpointing=stage.gradient_checkpointing)
    optimizer_step(plan, shape, world_size=world_size, zero_stage=zstage, trainable=trainable, cuda=cuda,
                   offload_optimizer=offload_opt)
    vllm = cfg.rollout.vllm
    if cfg.rollout.backend == "vllm":
        share = vllm.gpu_memory_utilization * gpu_bytes
        note = "rollout.vllm.gpu_memory_utilization x GPU"
        if vllm.sleep:  # freed while training; back for generation
            plan.add("rollout engine (vLLM, asleep while training)", share, "rollout", note)
            plan.add("validation engine (vLLM)", share, "validation", note)
        else:
            plan.add("rollout engine (vLLM)", share, "resident", note)
    else:  # every stage validates (at its end at least) through the stage's engine
        val_seq = (lengths.get("val_prompt") or lengths.get("rl_prompt") or ASSUMED_PROMPT) + cfg.rollout.gen_length
        (partial(block_generation, block_length=cfg.rollout.block_length) if block else
         partial(generation, window=cfg.rollout.block_length))(
            plan, shape, rows=cfg.recipe.eval_batch_size, seq_len=val_seq, compute_bytes=compute, phase="validation",
            label="validation", sampled=cfg.rollout.temperature > 0)
    plan.rows_per_step, plan.micro_batch, plan.seq_len = rows_per_step, rows, seq
    plan.trainable, plan.shape = trainable, shape
    return plan


def environment(cfg: RunConfig, world_size: int | None = None) -> tuple[int, float]:
    """``(world size, bytes of one GPU)`` the plan is for: ``plan.*``, else this launch's (``dllm-rl
    plan`` outside a launcher: :data:`DEFAULT_PLAN_WORLD`; without a GPU: :data:`DEFAULT_GPU_GIB`)."""
    import os

    world = cfg.plan.world_size or world_size or int(os.environ.get("WORLD_SIZE", 0)) or DEFAULT_PLAN_WORLD
    gib = cfg.plan.gpu_memory_gib or (torch.cuda.get_device_properties(0).total_memory / GIB
                                      if torch.cuda.is_available() else DEFAULT_GPU_GIB)
    return world, gib * GIB


def plan_run(cfg: RunConfig, *, world_size: int, gpu_bytes: float, lengths: dict | None = None,
             cuda: bool = True) -> list[StagePlan]:
    """One :class:`StagePlan` per training stage of the recipe that :data:`PLANNED` covers."""
    model = meta_model(cfg)
    return [plan_stage(cfg, key, model, world_size=world_size, gpu_bytes=gpu_bytes, lengths=lengths, cuda=cuda)
            for key, cls in RECIPES[cfg.recipe.name] if issubclass(cls, PLANNED)]


def _local_config_or_known(path: str) -> bool:
    """Whether ``path`` is a folder, a hub name in the local cache, or not one of KNOWN_CONFIGS (then
    the loader is asked); a known hub name that is not cached is planned from its published config
    without touching the network."""
    if Path(path).is_dir() or path not in KNOWN_CONFIGS:
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(path, "config.json"), str)


def fitting_micro_batch(cfg: RunConfig, key: str, *, world_size: int, gpu_bytes: float, lengths: dict | None = None,
                        model=None) -> int:
    """The largest micro-batch (rows per forward/backward; GRPO: completions) of stage ``key`` whose
    plan fits ``gpu_bytes`` with :data:`CUDA_RESERVE` kept free (0: none, not even 1)."""
    model = model if model is not None else meta_model(cfg)
    stage = getattr(cfg, key)
    rows = stage.per_device_prompts * stage.num_generations if isinstance(stage, DiffuGRPOConfig) \
        else stage.per_device_batch_size
    return largest_fitting(lambda m: plan_stage(cfg, key, model, world_size=world_size, gpu_bytes=gpu_bytes,
                                                lengths=lengths, micro_batch=m), gpu_bytes - CUDA_RESERVE, rows)


def check_fits(cfg: RunConfig, world_size: int, lengths: dict | None = None) -> None:
    """Preflight: one ConfigError line when a stage's predicted peak does not fit this GPU."""
    world, gpu = environment(cfg, world_size)
    if not any(issubclass(cls, PLANNED) for _, cls in RECIPES[cfg.recipe.name]):
        return
    model = meta_model(cfg)
    for key, cls in RECIPES[cfg.recipe.name]:
        if not issubclass(cls, PLANNED):
            continue
        plan = plan_stage(cfg, key, model, world_size=world, gpu_bytes=gpu, lengths=lengths)
        if plan.peak + CUDA_RESERVE <= gpu:
            continue
        phase = plan.peak_phase
        if phase == "validation":
            fix = "lower recipe.eval_batch_size"
        elif phase == "rollout":
            fix = f"lower {key}.per_device_prompts or use rollout.backend=vllm"
        else:
            m = fitting_micro_batch(cfg, key, world_size=world, gpu_bytes=gpu, lengths=lengths, model=model)
            fix = (f"largest {key}.micro_batch_size that fits: {m}" if m else
                   f"no micro-batch fits: {key}.gradient_checkpointing=true, LoRA or a higher ZeRO stage")
        raise ConfigError(f"plan: stage {key} needs {plan.peak / GIB:.1f} GiB per GPU at its peak ({phase}) + "
                          f"{CUDA_RESERVE / GIB:.0f} GiB CUDA reserve, the GPU has {gpu / GIB:.1f} GiB; {fix} "
                          f"(dllm-rl plan for the items; plan.check=false runs anyway)")


# ---- the table ---------------------------------------------------------------------------------

def task_lengths(cfg: RunConfig) -> tuple[dict, str]:
    """Token lengths from the task's rows (preflight's reading), or ``({}, why not)``."""
    from recipes.preflight import check_lengths
    from rl.tasks import DataError, build_task

    try:
        task = build_task(cfg.task)
        sft_task = build_task(cfg.sft_task) if cfg.sft_task is not None else task
        uses = [("val", task.rows("val"), cfg.rollout.gen_length), ("rl", task.rows("rl"), cfg.rollout.gen_length)]
        lengths = check_lengths(cfg, task, uses)
        if sft_task.rows("sft"):
            lengths["sft"] = check_lengths(cfg, sft_task, [("sft", sft_task.rows("sft"), 0)]).get("sft", 0)
        return lengths, ""
    except (DataError, ConfigError, OSError, ValueError) as e:
        return {}, str(e).splitlines()[0] if str(e) else type(e).__name__


def format_plan(cfg: RunConfig, plans: list[StagePlan], *, world_size: int, gpu_bytes: float, lengths_note: str = "",
                overrides: list[str] | None = None, model=None) -> str:
    """The markdown table of ``dllm-rl plan``."""
    model = model if model is not None else meta_model(cfg)
    shape = plans[0].shape if plans else model_shape(model)
    lines = [f"# dllm-rl plan: {' '.join(overrides or []) or 'defaults'}", "",
             f"{world_size} processes, {gpu_bytes / GIB:.1f} GiB per GPU; model {cfg.model.path or cfg.model.name}: "
             f"{shape.params / 1e9:.3f}B parameters ({cfg.model.dtype}); {CUDA_RESERVE / GIB:.0f} GiB kept free for "
             f"the CUDA context, NCCL and fragmentation"]
    if lengths_note:
        lines.append(f"token lengths from the config's bounds (the rows could not be read: {lengths_note})")
    for plan in plans:
        stage = getattr(cfg, plan.stage)
        lora = (f"LoRA r={stage.lora.r}{' on a 4-bit base' if stage.lora.load_in_4bit else ''}"
                if stage.lora.enabled else "full")
        precision = "bf16" if stage.bf16 else "fp32"
        lines += ["", f"## {plan.stage}: {type(stage).__name__}, {stage.deepspeed}, {precision}, "
                      f"{lora} ({plan.trainable / 1e6:.1f}M trained), micro-batch {plan.micro_batch} x {plan.seq_len} "
                      f"tokens{', gradient checkpointing' if stage.gradient_checkpointing else ''}", "",
                  "| item | phase | GiB |", "|---|---|---|"]
        for item in plan.items:
            lines.append(f"| {item.name}{f' ({item.note})' if item.note else ''} | {item.phase} | "
                         f"{item.bytes / GIB:.2f} |")
        lines.append(f"| **peak** (resident + {plan.peak_phase}) | | **{plan.peak / GIB:.2f}** |")
        fits = plan.peak + CUDA_RESERVE <= gpu_bytes
        m = fitting_micro_batch(cfg, plan.stage, world_size=world_size, gpu_bytes=gpu_bytes, model=model)
        lines.append("")
        lines.append(f"{'fits' if fits else 'DOES NOT FIT'} {gpu_bytes / GIB:.0f} GiB; largest micro-batch that fits: "
                     f"{m} (of {plan.rows_per_step} rows per device and step)")
    return "\n".join(lines)


def main(overrides: list[str]) -> int:
    """``dllm-rl plan [overrides]``: print the table; exit status 1 when a stage does not fit."""
    from recipes.config import load_config

    cfg = load_config(overrides)
    if not any(issubclass(cls, PLANNED) for _, cls in RECIPES[cfg.recipe.name]):
        raise ConfigError(f"recipe={cfg.recipe.name}: dllm-rl plan covers the SFT, diffu-GRPO and DPO stages")
    world, gpu = environment(cfg)
    lengths, why = task_lengths(cfg)
    plans = plan_run(cfg, world_size=world, gpu_bytes=gpu, lengths=lengths)
    print(format_plan(cfg, plans, world_size=world, gpu_bytes=gpu, lengths_note=why, overrides=overrides))
    return 0 if all(p.peak + CUDA_RESERVE <= gpu for p in plans) else 1


