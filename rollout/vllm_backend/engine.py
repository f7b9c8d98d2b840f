"""The vLLM rollout engine: our denoising loop (:func:`rollout.sampler.denoise`) with every forward
one ``LLM.encode`` call on the batch.

The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights
move by reference: :meth:`VLLMEngine.update_weights` streams the policy's tensors into vLLM's model
one at a time (:func:`rollout.weights.hf_weights`: ZeRO-3 shards gathered per tensor, LoRA
merged). Under a multi-rank launcher each rank holds its own engine (vLLM's
``external_launcher``: ranks in groups of ``tensor_parallel_size``), colocated with training.

Per call each row is sent without its left padding (positions count real tokens, as in the torch
backend); the pooler (:class:`rollout.vllm_backend.models.DenoisePooler`) returns, for the scored
window, the proposal and the statistics the loop asked for. At temperature > 0 every row draws its
float64 Gumbel noise from a seed taken from the caller's generator, so a run is reproducible
and its proposals follow the same distribution as the torch backend's (not the same draws).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import weakref
from typing import Any

import torch
from torch import nn

from rollout.engine import RolloutEngine
from rollout.remasking import needed_stats
from rollout.sampler import Proposal, check_args, denoise
from rollout.types import Rollout
from rollout.weights import hf_weights

# vLLM's CPU attention backend accepts these head sizes only (others fail at the first forward).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# The model config keys that bound a sequence's length (LLaDA's published key, then the usual ones).
POSITION_KEYS = ("max_sequence_length", "max_position_embeddings", "n_positions")
# Engines of this process that hold a running vLLM ``LLM`` (at most one: each takes its
# ``gpu_memory_utilization`` share of the device).
_LIVE: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()


def live_engines() -> list["VLLMEngine"]:
    """The engines of this process whose vLLM ``LLM`` is running."""
    return [e for e in list(_LIVE) if e.llm is not None]


def model_positions(config) -> int | None:
    """The longest sequence the model's config allows (None when it states none)."""
    return next((int(getattr(config, k)) for k in POSITION_KEYS if getattr(config, k, None)), None)


def check_world(settings: Any, world_size: int) -> None:
    """One ``ValueError`` line when the engines cannot be laid out over ``world_size`` ranks."""
    tp = settings.tensor_parallel_size
    if world_size % tp:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={tp}: must divide the number of processes "
                         f"({world_size}); each group of {tp} consecutive ranks shares one engine")


def check_sleep(settings: Any) -> None:
    """One ``ValueError`` line when ``rollout.vllm.sleep`` is asked on a platform without it."""
    if not settings.sleep:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        raise ValueError(f"rollout.vllm.sleep=true: vLLM's sleep mode needs a CUDA, ROCm or XPU device "
                         f"(this vLLM runs on {current_platform.device_type}); set rollout.vllm.sleep=false")


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_not_block_causal(model_type: str | None) -> None:
    """One ``ValueError`` line for a block-diffusion ``model_type`` (SDAR / TraDo): the vLLM backend
    runs each denoising step on the whole sequence with bidirectional attention; block-causal
    decoding with the exact cache of finished blocks is the torch backend's
    (:mod:`rollout.block_sampler`)."""
    from rollout.models import native_class

    if getattr(native_class(model_type), "block_causal", False):
        raise ValueError(f"rollout.backend=vllm: model_type={model_type!r} is a block-diffusion model (block-causal "
                         f"attention, decoded block by block with an exact cache), which the vLLM backend does not "
                         f"serve; use rollout.backend=torch")


def check_model(config) -> None:
    """One ``ValueError`` line when vLLM cannot serve a model with this transformers ``config``."""
    check_not_block_causal(getattr(config, "model_type", None))
    from rollout.vllm_backend.models import SUPPORTED, to_vllm_config

    translated = to_vllm_config(config)
    if translated is config:
        raise ValueError(f"rollout.backend=vllm: model_type={getattr(config, 'model_type', None)!r} is not served "
                         f"(supported: {', '.join(SUPPORTED)}); use rollout.backend=torch")
    from vllm.platforms import current_platform

    head = getattr(translated, "head_dim", None) or translated.hidden_size // translated.num_attention_heads
    if current_platform.is_cpu() and head not in CPU_HEAD_SIZES:
        raise ValueError(f"rollout.backend=vllm: head size {head} (hidden_size / num_attention_heads) is not "
                         f"supported by vLLM's CPU attention (supported: {', '.join(map(str, CPU_HEAD_SIZES))})")


def start_llm(path: str, settings: Any, *, dtype: str, load_format: str = "auto", max_model_len: int | None = None):
    """A vLLM ``LLM`` serving the checkpoint folder ``path`` as our pooling dLLM, in this process.
    ``settings``: ``RolloutOptions.vllm``; ``load_format="dummy"`` leaves the weights to
    :meth:`VLLMEngine.update_weights`. As TRL's colocate mode: ``max_model_len`` = prompt +
    generation, a step budget vLLM's memory profiler handles (:meth:`VLLMOptions.batched_tokens`),
    one engine per group of ``tensor_parallel_size`` ranks (``external_launcher``), sleep mode when
    ``settings.sleep``."""
    from vllm import LLM
    from vllm.platforms import current_platform

    from rollout.vllm_backend import register
    from rollout.vllm_backend.models import to_vllm_config

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    check_world(settings, world)
    check_sleep(settings)
    if current_platform.is_cpu():
        # follow torch's thread setting (the recipes run one thread) instead of pinning every core
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    register()
    kw = {}
    if world > 1:
        kw["distributed_executor_backend"] = "external_launcher"  # one engine per rank (TRL's colocate)
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if settings.sleep:
        kw["enable_sleep_mode"] = True
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker disables it for the whole process
    try:
        return LLM(model=str(path), runner="pooling", hf_overrides=to_vllm_config, skip_tokenizer_init=True,
                   load_format=load_format, dtype=dtype, tensor_parallel_size=settings.tensor_parallel_size,
                   gpu_memory_utilization=settings.gpu_memory_utilization, max_num_seqs=settings.max_num_seqs,
                   max_num_batched_tokens=settings.batched_tokens(int(max_model_len or 0)),
                   enforce_eager=settings.enforce_eager, enable_prefix_caching=False, seed=0, **kw)
    finally:
        torch.set_num_threads = set_num_threads


def tensor_parallel_group():
    """vLLM's tensor-parallel group coordinator when its engine spans several ranks, else None."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    return group if group.world_size > 1 else None


def gather_rows(ids: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None, group, pad_id: int):
    """Every rank's prompts of the tensor-parallel ``group`` (vLLM's coordinator) as one left-padded
    batch in rank order, a generator seeded alike on all of them (the first rank's draw), and where
    this rank's rows are: ``(first row, rows, prompt width)``. TRL's colocated tensor parallelism
    does the same; the collectives are vLLM's, on the group's device."""
    mask = torch.ones_like(ids) if mask is None else mask
    # vLLM's CPU shared-memory all-gather takes floating tensors only ("not implemented for 'Long'"),
    # so every gather goes as float32: token ids, sizes and a seed below 2**24 are exact there.
    seed = torch.randint(0, 2**24, (1,), generator=generator, device=generator.device if generator else "cpu")
    mine = torch.tensor([ids.shape[0], ids.shape[1], int(seed)], dtype=torch.float32, device=group.device)
    sizes = group.all_gather(mine, dim=0).view(-1, 3).long().tolist()
    rows, width = max(s[0] for s in sizes), max(s[1] for s in sizes)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:  # [rows, width]: left-pad, then extra rows
        t = torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)
        t = torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]), value=value)
        return t.to(device=group.device, dtype=torch.float32)

    keep = torch.cat([torch.arange(r * rows, r * rows + s[0]) for r, s in enumerate(sizes)]).to(group.device)
    all_ids = group.all_gather(padded(ids, pad_id), dim=0)[keep].to(ids.device, torch.long)
    all_mask = group.all_gather(padded(mask, 0), dim=0)[keep].to(ids.device, mask.dtype)
    shared = torch.Generator(device=ids.device).manual_seed(sizes[0][2])
    first = sum(s[0] for s in sizes[:group.rank_in_group])
    return all_ids, all_mask, shared, (first, ids.shape[0], ids.shape[1])


def take_rows(out: Rollout, first: int, rows: int, prompt_width: int) -> Rollout:
    """This rank's rows of a group batch, its prompts cut back to their own width."""
    sel = slice(first, first + rows)
    cut = out.prompt_ids.shape[1] - prompt_width
    return dataclasses.replace(
        out, sequences=out.sequences[sel, cut:], prompt_ids=out.prompt_ids[sel, cut:],
        prompt_mask=out.prompt_mask[sel, cut:], completion_ids=out.completion_ids[sel],
        completion_mask=out.completion_mask[sel], unmask_step=out.unmask_step[sel],
        step_scores=None if out.step_scores is None else out.step_scores[sel])


class VLLMDenoiser:
    """:class:`rollout.sampler.Denoiser` on a vLLM engine: one ``encode`` call per step."""

    passes = 1

    def __init__(self, llm, *, attention_mask: torch.Tensor | None, batch: int, mask_id: int, shift: int,
                 temperature: float, generator: torch.Generator | None, stats: tuple[str, ...]):
        from vllm.pooling_params import PoolingParams

        self.llm, self.temperature, self.generator, self.stats = llm, temperature, generator, stats
        self.params = PoolingParams
        self.pads = [0] * batch if attention_mask is None else (attention_mask == 0).sum(1).tolist()
        self.common = {"shift": shift, "mask_id": mask_id, "temperature": temperature, "stats": list(stats)}

    def _seed(self) -> int:
        g = self.generator
        device = g.device if g is not None else "cpu"
        return int(torch.randint(0, 2**62, (1,), generator=g, device=device))

    def __call__(self, x: torch.Tensor, s0: int, e0: int, scope_end: int, block_first_step: bool) -> Proposal:
        B, N = x.shape
        seed = self._seed() if self.temperature > 0 else 0
        window = {**self.common, "back": N - s0, "n": scope_end - s0}
        params = [self.params(extra_kwargs={**window, "seed": seed + b}) for b in range(B)]
        prompts = [{"prompt_token_ids": row[pad:]} for row, pad in zip(x.tolist(), self.pads)]
        outs = self.llm.encode(prompts, pooling_params=params, pooling_task="token_classify", use_tqdm=False)
        data = torch.stack([o.outputs.data for o in outs]).to(x.device)
        return Proposal(x0=data[..., 0].long(),
                        stats={name: data[..., 1 + i].float() for i, name in enumerate(self.stats)})


class VLLMEngine(RolloutEngine):
    """The rollout engine on vLLM (see the module docstring). ``checkpoint``: start from this
    folder's weights (read by vLLM's loader, published tensor names) instead of streaming the
    attached model's. At most one runs per process (:func:`live_engines`).

    Sleep mode (``rollout.vllm.sleep``, TRL's ``vllm_enable_sleep_mode``): :meth:`sleep` (called by
    the trainers when a generation phase ends) frees the engine's weights and activations (vLLM
    level 2); the next :meth:`generate` wakes it and streams the policy's current weights in, and
    :meth:`update_weights` while asleep only marks them stale (returns None)."""

    backend = "vllm"

    def __init__(self, options: Any, model: nn.Module | None = None, *, adapter=None, checkpoint: str | None = None):
        self.llm = None
        self._dir: str | None = None
        self._checkpoint = checkpoint
        self._tp_group = None
        self._asleep = False
        self._stale = False
        self.max_model_len: int | None = None
        super().__init__(options, model, adapter=adapter)

    def attach(self, model: nn.Module, *, adapter=None) -> None:
        super().attach(model, adapter=adapter)
        if self.llm is not None:
            self.update_weights()
            return
        others = [e for e in live_engines() if e is not self]
        if others:
            raise RuntimeError("rollout.backend=vllm: another vLLM engine is running in this process; close it "
                               "first (one engine per process: each takes rollout.vllm.gpu_memory_utilization of "
                               "the device)")
        hf = _hf_model(self.adapter.model)
        check_model(hf.config)
        settings = self.options.vllm
        dtype = settings.dtype if settings.dtype != "auto" else _dtype_name(next(hf.parameters()).dtype)
        self.max_model_len = settings.max_model_len or model_positions(hf.config)
        if self._checkpoint is not None:
            self.llm = start_llm(self._checkpoint, settings, dtype=dtype, max_model_len=self.max_model_len)
        else:
            self._dir = tempfile.mkdtemp(prefix="dllm-rl-vllm-")
            hf.config.save_pretrained(self._dir)
            self.llm = start_llm(self._dir, settings, dtype=dtype, load_format="dummy",
                                 max_model_len=self.max_model_len)
        _LIVE.add(self)
        self._tp_group = tensor_parallel_group()
        if self._checkpoint is None:
            self.update_weights()

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor | None, options: Any, *,
                  generator: torch.Generator | None, order_policy, record_scores: bool) -> Rollout:
        if order_policy is not None:
            raise ValueError("rollout.backend=vllm: order policies read the dLLM's logits and hidden states, "
                             "which only backend=torch gives")
        if options.cfg_scale or options.kv_cache is not None:
            raise ValueError(f"rollout.backend=vllm: cfg_scale={options.cfg_scale}, kv_cache={options.kv_cache!r} "
                             "are torch-only options")
        check_args(ids, mask, steps=options.steps, gen_length=options.gen_length, block_length=options.block_length,
                   temperature=options.temperature, cfg_scale=0.0, remasking=options.remasking,
                   threshold=options.threshold, early_commit=options.early_commit, kv_cache=None)
        if self.max_model_len and ids.shape[1] + options.gen_length > self.max_model_len:
            longest = int((mask.sum(1) if mask is not None else torch.full((1,), ids.shape[1])).max())
            if longest + options.gen_length > self.max_model_len:
                raise ValueError(f"rollout.vllm.max_model_len={self.max_model_len}: a prompt of {longest} tokens + "
                                 f"gen_length={options.gen_length} does not fit; raise it (0 = set by the recipe)")
        self._wake()
        adapter = self.adapter
        eos_id = adapter.eos_token_id
        if options.fill_after_eos and eos_id is None:
            raise ValueError("fill_after_eos=True needs eos_id (the model/adapter does not define one)")
        stats = needed_stats(options.remasking, options.threshold, options.early_commit)
        local = None
        if self._tp_group is not None:  # the group's engines must see one batch: run all its rows
            ids, mask, generator, local = gather_rows(ids, mask, generator, self._tp_group, adapter.pad_token_id)
        denoiser = VLLMDenoiser(self.llm, attention_mask=mask, batch=ids.shape[0], mask_id=adapter.mask_token_id,
                                shift=int(bool(adapter.logits_shifted)), temperature=options.temperature,
                                generator=generator, stats=stats)
        out = denoise(denoiser, ids, attention_mask=mask, steps=options.steps, gen_length=options.gen_length,
                      block_length=options.block_length, mask_id=adapter.mask_token_id, eos_id=eos_id,
                      remasking=options.remasking, generator=generator, threshold=options.threshold,
                      early_commit=options.early_commit, fill_after_eos=options.fill_after_eos,
                      record_scores=record_scores)
        out.extras["backend"] = "vllm"
        return out if local is None else take_rows(out, *local)

    def update_weights(self) -> float | None:
        """Stream the attached model's weights into vLLM, one tensor at a time; seconds taken (None
        while asleep: the weights are streamed when the engine wakes)."""
        self._check_attached()
        if self._asleep:
            self._stale = True
            return None
        return self._load_weights()

    def _load_weights(self) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():  # vLLM's in-place reload (it re-applies its post-load weight processing)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(self.adapter.model)})
        self._stale = False
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Free the engine's device memory until the next generation (``rollout.vllm.sleep``; vLLM
        level 2: weights and activations discarded, as TRL's colocate mode does)."""
        if self.llm is None or self._asleep or not self.options.vllm.sleep:
            return
        self.llm.sleep(level=2)
        self._asleep = self._stale = True

    def _wake(self) -> None:
        if not self._asleep:
            return
        self.llm.wake_up()
        self._asleep = False
        if self._stale:
            self._load_weights()

    def close(self) -> None:
        """Shut vLLM's engine down, release its process groups (not the caller's) and its memory."""
        if self.llm is not None:
            _shutdown(self.llm)
            self.llm = None
            _LIVE.discard(self)
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        super().close()


def _shutdown(llm) -> None:
    """``LLM`` shutdown in process. vLLM's own teardown ends with ``destroy_process_group()``, which
    would also destroy the trainer's default group and every DeepSpeed group: release vLLM's
    groups only."""
    import vllm.v1.engine.core as core
    from vllm.distributed import parallel_state as ps

    def release_vllm_groups(*args, **kwargs) -> None:
        ps.destroy_model_parallel()
        if ps._WORLD is not None:
            ps._WORLD.destroy()
            ps._WORLD = None

    teardown = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = release_vllm_groups
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        core.cleanup_dist_env_and_memory = teardown
