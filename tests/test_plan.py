"""Item 1 of issue #23: ``dllm-rl plan``. Model-state bytes equal DeepSpeed's own estimators for
LLaDA-8B; the activation formula equals the tensors autograd saves in transformers' Llama / Qwen2
blocks; the CLI's table, the largest fitting micro-batch and the one-line refusal at preflight.
Predicted vs measured peaks on CPU: scripts/bench_memory.py (docs/benchmarks.md; ``-m slow`` here)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.config import load_config
from recipes.schema import ConfigError
from rl.memory import GIB, CUDA_RESERVE, layer_activation_bytes, model_shape

ROOT = Path(__file__).resolve().parents[1]
MODEL_STATE_ITEMS = ("weights", "gradients", "optimizer:", "ZeRO-3: gathered")
LLADA_8B = ["experiment=llada_gsm8k", "plan.world_size=8", "plan.gpu_memory_gib=80"]


def _full_finetune(stage: str) -> list[str]:
    return [*LLADA_8B, "recipe=sft", "sft.lora.enabled=false", f"sft.deepspeed={stage}"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 2)])
def test_llada_8b_model_states_equal_deepspeeds_estimators(stage, gpus, nodes):
    """Full fine-tuning in bf16 (DeepSpeed's mixed precision), offload off: our itemised weights,
    gradients, optimizer states (and ZeRO-3's gathered layer) sum to the bytes of
    ``estimate_zero{2,3}_model_states_mem_needs``, and the ``..._all_cold`` tables print them."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)

    from recipes.plan import meta_model, plan_stage

    cfg = load_config(_full_finetune(stage))
    model = meta_model(cfg)
    shape = model_shape(model)
    h, i, layers, vocab = 4096, 12288, 32, 126464  # the published config (recipes/plan.py KNOWN_CONFIGS)
    assert shape.params == 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h == 8_015_581_184
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())  # DeepSpeed's rule
    assert shape.largest_layer == largest == vocab * h
    plan = plan_stage(cfg, "sft", model, world_size=gpus * nodes, gpu_bytes=80 * GIB)
    ours = sum(item.bytes for item in plan.items if item.name.startswith(MODEL_STATE_ITEMS) and item.phase == "resident")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if stage == "zero2":
            _, theirs = estimate_zero2_model_states_mem_needs(shape.params, gpus, nodes, cpu_offload=False)
            estimate_zero2_model_states_mem_needs_all_cold(shape.params, gpus, nodes)
        else:
            _, theirs, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpus, nodes,
                                                                 cpu_offload=False, cpu_offload_params=False)
            estimate_zero3_model_states_mem_needs_all_cold(shape.params, shape.largest_layer, gpus, nodes)
    assert int(ours) == theirs  # DeepSpeed rounds its 18 Psi / N term down to whole bytes
    rows = [line.split("|") for line in out.getvalue().splitlines() if line.count("|") == 2]
    printed = {cells[1].strip() for cells in rows if "offload_optimizer=none" in cells[2]
               and "offload_param=OffloadDeviceEnum" not in cells[2]}
    assert printed == {f"{ours / GIB:.2f}GB"}


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(ids)
    return sum(seen.values())


def _tiny(family: str, layers: int, h: int, i: int, heads: int, kv: int, dtype):
    from rollout.models import DreamConfig, DreamForMaskedLM, LLaDAConfig, LLaDAForMaskedLM

    if family == "llada":
        cfg = LLaDAConfig(d_model=h, n_heads=heads, n_kv_heads=kv, n_layers=layers, mlp_hidden_size=i,
                          activation_type="silu", block_type="llama", rope=True, layer_norm_type="rms", vocab_size=100,
                          embedding_size=100, weight_tying=False, max_sequence_length=256, attention_dropout=0.0,
                          residual_dropout=0.0, embedding_dropout=0.0)
        cls = LLaDAForMaskedLM
    else:
        cfg = DreamConfig(vocab_size=100, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256)
        cls = DreamForMaskedLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).to(dtype)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(64, 96, 2, 2), (128, 256, 4, 1)])
def test_layer_activations_equal_what_autograd_saves(family, dtype, dims):
    """One decoder layer's saved activations: the difference between a 2-layer and a 1-layer model."""
    h, i, heads, kv = dims
    ids = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    one, two = (_saved_bytes(_tiny(family, n, h, i, heads, kv, dtype), ids) for n in (1, 2))
    shape = model_shape(_tiny(family, 1, h, i, heads, kv, dtype))
    assert two - one == layer_activation_bytes(shape, ids.numel(), torch.finfo(dtype).bits // 8)


def test_largest_fitting_micro_batch_is_the_boundary():
    from recipes.plan import fitting_micro_batch, meta_model, plan_stage

    cfg = load_config([*_full_finetune("zero3"), "sft.per_device_batch_size=64", "sft.micro_batch_size=1"])
    model = meta_model(cfg)
    gpu = 80 * GIB
    m = fitting_micro_batch(cfg, "sft", world_size=8, gpu_bytes=gpu, model=model)
    assert 1 <= m < 64
    peak = lambda b: plan_stage(cfg, "sft", model, world_size=8, gpu_bytes=gpu, micro_batch=b).peak  # noqa: E731
    assert peak(m) + CUDA_RESERVE <= gpu < peak(m + 1) + CUDA_RESERVE


@pytest.mark.parametrize("overrides, message", [
    ([*LLADA_8B, "plan.gpu_memory_gib=40"], r"plan: stage sft needs \d+\.\d GiB per GPU at its peak \(validation\).*"
                                            r"lower recipe.eval_batch_size"),
    ([*_full_finetune("zero2"), "sft.micro_batch_size=4", "recipe.eval_batch_size=8"],
     r"plan: stage sft needs \d+\.\d GiB per GPU at its peak \(train\).*largest sft.micro_batch_size that fits: \d"),
])
def test_a_run_predicted_not_to_fit_stops_with_one_line(overrides, message):
    from recipes.plan import check_fits

    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match=message) as e:
        check_fits(cfg, 8)
    assert "\n" not in str(e.value) and "plan.check=false runs anyway" in str(e.value)
    check_fits(load_config([*overrides, "plan.gpu_memory_gib=200"]), 8)


def test_plan_command_prints_the_table_and_exits_1_when_a_stage_does_not_fit(capsys):
    from recipes.__main__ import main

    assert main(["plan", *LLADA_8B]) == 0
    out = capsys.readouterr().out
    assert "| weights: 4-bit base (NF4, double quant) | resident |" in out
    assert "8.016B parameters" in out and out.count("**peak**") == 2
    assert main(["plan", *LLADA_8B, "plan.gpu_memory_gib=24"]) == 1
    assert "DOES NOT FIT 24 GiB" in capsys.readouterr().out
    assert main(["plan", "plan.gpu_memory_gib=-1"]) == 2
    assert "plan.gpu_memory_gib=-1" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_peaks_within_15_percent_of_the_plan(tmp_path):
    """scripts/bench_memory.py on the tiny LLaDA-architecture size (the full table: docs/benchmarks.md)."""
    import json

    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--sizes", "tiny", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in json.loads(out.read_text()):
        assert abs(r["predicted"] / r["measured"] - 1) <= 0.15, r


def test_block_diffusion_plan_trado_math():
    """TraDo-8B with dLLM-RL's settings (experiment=trado_math) is planned as a block-diffusion model:
    the block-causal TraceRL form (passes = block length / shrink, not one per denoising step), training
    on [x_0, x_t] (prompt + twice the completion), rollouts from the exact cache of finished blocks."""
    from recipes.plan import meta_model, plan_stage

    cfg = load_config(["experiment=trado_math", "plan.world_size=8", "plan.gpu_memory_gib=80"])
    model = meta_model(cfg)
    assert model.block_causal and model.block_length == 4
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 8.19) < 0.01  # Qwen3-8B's size
    plan = plan_stage(cfg, "rl", model, world_size=8, gpu_bytes=80 * GIB)
    assert plan.micro_batch == 1 * 4  # micro_batch_size 1 x 4 passes (shrink 1, blocks of 4)
    assert plan.seq_len == 784 + 2 * 2000
    shape = model_shape(model)
    kv = {i.name: i.bytes for i in plan.items if "KV cache" in i.name}
    per_position = shape.layers * 2 * shape.kv_heads * shape.head_dim * 2  # bf16 keys and values of every layer
    assert kv == {"rollout: KV cache of finished blocks, 128 x 2784 positions": 128 * 2784 * per_position,
                  "validation: KV cache of finished blocks, 128 x 2256 positions": 128 * (256 + 2000) * per_position}
    assert plan.peak + CUDA_RESERVE <= 80 * GIB


def test_block_kv_cache_item_equals_a_filled_transformers_cache():
    """The plan's KV-cache bytes equal what our SDAR implementation stores in transformers' DynamicCache."""
    from transformers.cache_utils import DynamicCache

    from rl.memory import StagePlan, block_generation
    from rollout.models import SDARConfig, SDARForMaskedLM

    cfg = SDARConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64, block_length=4)
    model = SDARForMaskedLM(cfg).eval()
    rows, seq = 3, 12
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 60, (rows, seq)), past_key_values=cache, use_cache=True)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    plan = StagePlan(stage="rl")
    block_generation(plan, model_shape(model), rows=rows, seq_len=seq, block_length=4, compute_bytes=4,
                     phase="rollout", label="rollout", sampled=False)
    assert [i.bytes for i in plan.items if "KV cache" in i.name] == [stored]
