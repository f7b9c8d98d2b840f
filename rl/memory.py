"""Per-device memory of a training stage, itemised: the formulas behind ``dllm-rl plan`` and the
memory check at preflight (recipes/plan.py builds the inputs from the run config).

Model states follow DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``, offload off): with bf16 mixed precision a trained
parameter costs 2 bytes of bf16 weight + 2 of bf16 gradient + 4 of fp32 gradient + 4 of fp32
master weight + 8 of Adam moments; ZeRO-2 partitions all but the bf16 weight over the N ranks
(2 Psi + 18 Psi / N), ZeRO-3 the weight too, its gradients reduced straight into the fp32
partition, plus a gathered largest layer of 4 bytes per parameter (18 Psi / N + 4 L). Without
bf16: fp32 weights, gradients and moments (4 + 4 + 8), ZeRO-1/2/3 adding their fp32 partition copy
(4 Psi / N); at ZeRO-0 torch's AdamW frees the gradients at every step, so they count in the
backward (the LM head's, the first computed) and at the step only. Frozen weights (LoRA's base)
cost their bytes only; QLoRA's 4-bit base costs :data:`NF4_BYTES` per quantized weight.

Activations (saved for backward, per token and decoder layer; transformers' Llama / Qwen2 blocks
with SDPA, measured with ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py):
``b (8h + 4i + 2 kv) + 4 heads + 8`` bytes in a ``b``-byte compute dtype, plus ``4h`` in 16-bit
(RMSNorm's float32 upcast); ``h`` hidden, ``i`` MLP width, ``kv`` = key/value width (GQA), the
``4 heads`` the float32 log-sum-exp of flash / memory-efficient attention (no T x T matrix).
Gradient checkpointing keeps each layer's input (``b h``) and one layer's activations.
Scoring (the fused path of rollout/adapter.py, SFT and GRPO): one chunk of 256 positions' logits
at a time, ``b V`` + 3 float32 copies (upcast, log-softmax, its gradient) per position.
Generation (torch backend): the full logits of every position of the batch in ``b`` bytes plus
float64 Gumbel noise on the scored window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rl.logprobs import DEFAULT_CHUNK_SIZE

GIB = 2**30
# bitsandbytes NF4 with double quantization: 4 bits per weight, an 8-bit absmax per block of 64
# and a float32 scale per 256 absmax values (QLoRA, Dettmers et al. 2023, Sec. 3)
NF4_BYTES = 0.5 + (1 + 4 / 256) / 64
# Not in torch.cuda.max_memory_allocated but on the device: the CUDA context, NCCL buffers and the
# caching allocator's fragmentation; the fit check keeps this much free.
CUDA_RESERVE = 3 * GIB
PHASES = ("resident", "train", "step", "rollout", "validation")


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need of a model (see :func:`model_shape`)."""

    params: int  # parameters, a tied embedding / head counted once
    largest_layer: int  # parameters of the largest module (DeepSpeed's ``largest_layer_params``)
    quantizable: int  # parameters of the Linear layers 4-bit QLoRA quantizes (all but the LM head)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the LM head


def model_shape(model) -> ModelShape:
    """The :class:`ModelShape` of a transformers model (built on the meta device: no memory)."""
    import torch.nn as nn

    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantizable = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    c = model.config
    layer = getattr(c, "layer_config", None)
    lc = layer() if callable(layer) else c
    heads = lc.num_attention_heads
    head_dim = getattr(lc, "head_dim", None) or lc.hidden_size // heads
    vocab = head.weight.shape[0] if head is not None else lc.vocab_size
    return ModelShape(params=params, largest_layer=largest, quantizable=quantizable, hidden=lc.hidden_size,
                      layers=lc.num_hidden_layers, heads=heads,
                      kv_heads=getattr(lc, "num_key_value_heads", None) or heads,
                      head_dim=head_dim, intermediate=lc.intermediate_size, vocab=vocab)


@dataclass(frozen=True)
class Item:
    """One line of the plan: ``bytes`` on each device during ``phase`` (``resident``: always)."""

    name: str
    bytes: float
    phase: str = "resident"
    note: str = ""


@dataclass
class StagePlan:
    """A stage's items; ``peak`` = resident + the largest phase."""

    stage: str
    items: list[Item] = field(default_factory=list)
    rows_per_step: int = 0  # rows (GRPO: completions) per device and optimizer step
    micro_batch: int = 0  # rows per forward / backward (x the estimator's passes)
    seq_len: int = 0  # tokens per row
    trainable: int = 0  # trained parameters
    shape: ModelShape | None = None

    def add(self, name: str, nbytes: float, phase: str = "resident", note: str = "") -> None:
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
        if nbytes:
            self.items.append(Item(name, float(nbytes), phase, note))

    def total(self, phase: str) -> float:
        return sum(i.bytes for i in self.items if i.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES[1:], key=self.total)

    @property
    def peak(self) -> float:
        return self.total("resident") + self.total(self.peak_phase)


# ---- model states --------------------------------------------------------------------------------

def model_states(plan: StagePlan, shape: ModelShape, *, world_size: int, zero_stage: int, bf16: bool,
                 weight_bytes: int, trainable: int, lora: bool = False, offload_optimizer: bool = False,
                 qlora: bool = False) -> None:
    """Weights, gradients and optimizer states per device (module docstring). ``trainable``: the
    trained parameters: all of the model's, or with ``lora`` the adapters', added to a frozen base
    in ``weight_bytes`` (4-bit with ``qlora``); ``weight_bytes``: the loaded dtype's (DeepSpeed's bf16
    casts the module to 2)."""
    n = max(world_size, 1)
    part = n if zero_stage >= 1 else 1  # optimizer states and fp32 gradients
    wpart = n if zero_stage >= 3 else 1  # weights
    wb = 2 if bf16 else weight_bytes
    full = not lora
    frozen = shape.params if lora else 0
    if qlora:
        quantized = min(shape.quantizable, frozen)
        plan.add("weights: 4-bit base (NF4, double quant)", quantized * NF4_BYTES / wpart)
        plan.add(f"weights: base not quantized ({'bf16' if wb == 2 else 'fp32'})", (frozen - quantized) * wb / wpart)
    elif frozen:
        plan.add(f"weights: frozen base ({'bf16' if wb == 2 else 'fp32'})", frozen * wb / wpart)
    what = "weights" if full else "weights: LoRA adapters"
    if bf16:
        plan.add(f"{what} (bf16)", 2 * trainable / wpart)
        if zero_stage >= 3:  # reduced straight into the fp32 partition (DeepSpeed's 18 Psi / N)
            plan.add("gradients (fp32 partition)", 4 * trainable / part)
        else:
            plan.add("gradients (bf16 + fp32)", 2 * trainable / (part if zero_stage >= 2 else 1) + 4 * trainable / part)
        if not offload_optimizer:
            plan.add("optimizer: fp32 master weights", 4 * trainable / part)
    else:
        plan.add(f"{what} (fp32)", 4 * trainable / wpart)
        grads = 4 * trainable / (part if zero_stage >= 2 else 1)
        if zero_stage >= 1:
            plan.add("gradients (fp32)", grads)
            if not offload_optimizer:
                plan.add("optimizer: fp32 partition copy (ZeRO)", 4 * trainable / part)
        else:  # torch's AdamW behind ZeRO-0: gradients exist from the backward to the step (set_to_none)
            plan.add("gradients (fp32), LM head's first", 4 * min(trainable, shape.largest_layer), "train",
                     note="the backward starts at the head")
            plan.add("gradients (fp32)", grads, "step")
    if not offload_optimizer:
        plan.add("optimizer: Adam moments (fp32)", 8 * trainable / part)
    if zero_stage >= 3:
        plan.add("ZeRO-3: gathered largest layer (16-bit weight + gradient)", 4 * shape.largest_layer,
                 note="DeepSpeed's estimate")


def deepspeed_buffers(plan: StagePlan, *, zero_stage: int, bf16: bool, reduce_bucket_size: int,
                      overlap_comm: bool = False, prefetch_bucket_size: int = 0, trainable: int) -> None:
    """ZeRO's contiguous gradient bucket(s): ``torch.empty(reduce_bucket_size)`` in the reduction
    dtype at every accumulation boundary, two with ``overlap_comm``, whatever the number of trained
    parameters (DeepSpeed 0.19's ``setup_buckets``); ZeRO-3's prefetch bucket (16-bit)."""
    if zero_stage >= 2 and reduce_bucket_size and trainable:
        plan.add("DeepSpeed gradient bucket(s)", reduce_bucket_size * (2 if bf16 else 4) * (2 if overlap_comm else 1),
                 note="reduce_bucket_size")
    if zero_stage >= 3 and prefetch_bucket_size:
        plan.add("ZeRO-3 prefetch bucket", prefetch_bucket_size * (2 if bf16 else 4),
                 note="stage3_prefetch_bucket_size")


def reference_weights(plan: StagePlan, shape: ModelShape, *, world_size: int, zero_stage: int,
                      weight_bytes: int) -> None:
    """The frozen reference policy of a KL term (beta > 0 without LoRA): a copy of the weights,
    ZeRO-3 partitioned like the policy."""
    plan.add("reference model (beta > 0)", shape.params * weight_bytes / (world_size if zero_stage >= 3 else 1))


# ---- activations ---------------------------------------------------------------------------------

def layer_activation_bytes(shape: ModelShape, tokens: int, compute_bytes: int) -> float:
    """Saved activations of one decoder layer for ``tokens`` tokens (module docstring)."""
    b, h = compute_bytes, shape.hidden
    per = b * (8 * h + 4 * shape.intermediate + 2 * shape.kv_heads * shape.head_dim) + 4 * shape.heads + 8
    if b < 4:
        per += 4 * h  # RMSNorm's float32 upcast of its input, twice per layer
    return per * tokens


def train_activations(plan: StagePlan, shape: ModelShape, *, rows: int, seq_len: int, scored: int, compute_bytes: int,
                      checkpointing: bool, chunk: int = DEFAULT_CHUNK_SIZE) -> None:
    """Forward + backward of one micro-batch of ``rows`` x ``seq_len`` tokens with ``scored``
    scored positions per row, through the fused scoring path."""
    tokens = rows * seq_len
    b, h = compute_bytes, shape.hidden
    layer = layer_activation_bytes(shape, tokens, b)
    if checkpointing:
        plan.add("activations: layer inputs (gradient checkpointing)", b * h * tokens * shape.layers, "train")
        plan.add("activations: one layer recomputed", layer, "train")
    else:
        plan.add(f"activations: {shape.layers} layers x {rows} x {seq_len} tokens", layer * shape.layers, "train")
    # embedding output, final norm, rotary tables; the backward's working set of one layer
    plan.add("activations: embeddings, final norm, backward working set",
             tokens * (b * (8 * h + 4 * shape.head_dim) + b * (2 * h + 3 * shape.intermediate)), "train")
    positions = min(chunk, rows * scored)
    plan.add(f"scoring: logits of {positions} positions at a time (fused)",
             positions * shape.vocab * (b + 12) + rows * scored * (b * h + 12), "train")


def optimizer_step(plan: StagePlan, shape: ModelShape, *, world_size: int, zero_stage: int, trainable: int,
                   cuda: bool, offload_optimizer: bool = False) -> None:
    """torch's AdamW step: on CUDA the foreach implementation holds one float32 temporary the size
    of the (partitioned) parameters; on CPU one parameter at a time."""
    if offload_optimizer:
        return
    part = max(world_size, 1) if zero_stage >= 1 else 1
    size = trainable / part if cuda else min(trainable, shape.largest_layer)
    plan.add("optimizer step: Adam temporaries", 4 * size, "step")


def generation(plan: StagePlan, shape: ModelShape, *, rows: int, seq_len: int, window: int, compute_bytes: int,
               phase: str, label: str, sampled: bool = True) -> None:
    """One denoising forward of the torch backend on ``rows`` x ``seq_len`` tokens (rollout/sampler.py):
    the full logits of every position; on the ``window`` scored positions a copy without the mask
    token, the float32 softmax of the statistics and, when ``sampled`` (temperature > 0), the float64
    Gumbel noise (``u``, ``log(-log u)`` and the noisy logits: 4 float64 arrays at once,
    rollout/remasking.py); one layer's transient activations (no grad)."""
    b = compute_bytes
    plan.add(f"{label}: logits of {rows} x {seq_len} positions", rows * seq_len * shape.vocab * b, phase)
    per = b + 8 + (32 if sampled else 0)
    plan.add(f"{label}: {'float64 noise, ' if sampled else ''}softmax on {rows} x {window} positions",
             rows * window * shape.vocab * per, phase)
    plan.add(f"{label}: one layer's activations", rows * seq_len * b * (4 * shape.hidden + 3 * shape.intermediate),
             phase)


def block_generation(plan: StagePlan, shape: ModelShape, *, rows: int, seq_len: int, block_length: int,
                     compute_bytes: int, phase: str, label: str, sampled: bool = True) -> None:
    """One step of the block-diffusion sampler (rollout/block_sampler.py) on ``rows`` sequences of up
    to ``seq_len`` tokens: the exact KV cache of the finished blocks (keys and values of every layer),
    and :func:`generation` on at most two blocks (the finished one being stored + the current one)."""
    plan.add(f"{label}: KV cache of finished blocks, {rows} x {seq_len} positions",
             rows * seq_len * shape.layers * 2 * shape.kv_heads * shape.head_dim * compute_bytes, phase)
    generation(plan, shape, rows=rows, seq_len=2 * block_length, window=2 * block_length, compute_bytes=compute_bytes,
               phase=phase, label=label, sampled=sampled)


def largest_fitting(build, budget: float, limit: int) -> int:
    """The largest ``m`` in [1, limit] with ``build(m).peak <= budget`` (0 if none). Peaks grow
    with the micro-batch: doubling, then bisection."""
    if limit < 1 or build(1).peak > budget:
        return 0
    lo = 1
    while lo < limit and build(min(2 * lo, limit)).peak <= budget:
        lo = min(2 * lo, limit)
    if lo == limit:
        return limit
    hi = min(2 * lo, limit)  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if build(mid).peak <= budget else (lo, mid)
    return lo
