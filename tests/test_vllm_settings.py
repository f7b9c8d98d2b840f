"""Item 4 of issue #23: vLLM set up as TRL's colocate mode sets it up on a GPU. ``max_model_len``
from the run's longest prompt + generation (preflight), a step budget vLLM's memory profiler
handles, ``tensor_parallel_size`` dividing the world size (one line otherwise), sleep mode
between generation and training when asked (vLLM's CPU build has no sleep mode: refused in one
line there; the engine's sleep / wake / weight-reload sequence is tested on a stand-in ``LLM``)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from recipes.config import load_config
from recipes.schema import ConfigError
from rl.config import RolloutOptions, VLLMOptions

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (pip install -e .[vllm])")


def test_step_budget_is_trls_raised_to_one_sequence():
    assert VLLMOptions().batched_tokens(456) == 4096  # TRL's colocate budget
    assert VLLMOptions().batched_tokens(5000) == 5000  # a non-causal sequence runs whole in one step
    assert VLLMOptions(max_num_batched_tokens=8192).batched_tokens(456) == 8192
    with pytest.raises(ConfigError, match="max_num_batched_tokens=1000: must be >= max_model_len=2000"):
        VLLMOptions(max_num_batched_tokens=1000, max_model_len=2000)


def test_tensor_parallel_size_must_divide_the_world():
    from recipes.preflight import check_rollout_engine
    from rollout.vllm_backend.engine import check_world

    check_world(VLLMOptions(tensor_parallel_size=2), 8)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3: must divide the number of processes \(8\)"):
        check_world(VLLMOptions(tensor_parallel_size=3), 8)
    if HAS_VLLM:
        cfg = load_config(["rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=3"])
        with pytest.raises(ConfigError, match="tensor_parallel_size=3: must divide the number of processes"):
            check_rollout_engine(cfg, 2)
        check_rollout_engine(cfg, 6)


@needs_vllm
def test_preflight_sets_max_model_len_from_the_longest_prompt_and_generation():
    from recipes.pipeline import with_engine_length
    from recipes.preflight import check_training
    from rl.tasks import build_task

    cfg = load_config(["rollout.backend=vllm"])
    task = build_task(cfg.task)
    lengths = check_training(cfg, task)
    assert lengths["generation"] == max(lengths["val_prompt"], lengths["test_prompt"], lengths["rl_prompt"]) + 17
    fitted = with_engine_length(cfg, lengths["generation"])
    assert fitted.rollout.vllm.max_model_len == lengths["generation"] < 512
    pinned = load_config(["rollout.backend=vllm", "rollout.vllm.max_model_len=300"])
    assert with_engine_length(pinned, lengths["generation"]).rollout.vllm.max_model_len == 300  # set by the user
    assert with_engine_length(load_config([]), 99).rollout.vllm.max_model_len == 0  # torch backend: unused


@needs_vllm
def test_sleep_mode_is_refused_in_one_line_where_vllm_has_none():
    from vllm.platforms import current_platform

    from recipes.preflight import check_rollout_engine

    if current_platform.is_sleep_mode_available():
        pytest.skip("this vLLM build has sleep mode (tests/test_gpu.py runs it)")
    cfg = load_config(["rollout.backend=vllm", "rollout.vllm.sleep=true"])
    with pytest.raises(ConfigError, match="rollout.vllm.sleep=true: vLLM's sleep mode needs a CUDA, ROCm or XPU device"):
        check_rollout_engine(cfg, 1)


class FakeLLM:
    """A stand-in for vLLM's ``LLM``: records sleep / wake_up / weight reloads."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake")

    def collective_rpc(self, method, kwargs):
        list(kwargs["weights_iterator"])
        self.calls.append(method)


def _engine_with(llm, sleep: bool):
    from rollout import build_tiny_policy
    from rollout.vllm_backend.engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM started: the sequencing only
    engine.options = SimpleNamespace(vllm=VLLMOptions(sleep=sleep))
    engine.llm, engine._dir, engine._checkpoint, engine._tp_group = llm, None, None, None
    engine._asleep = engine._stale = False
    engine.max_model_len = None
    engine.model, engine._adapter = build_tiny_policy(seed=0, hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=64), (lambda m: m)
    return engine


def test_sleep_frees_until_the_next_generation_and_reloads_the_current_weights():
    llm = FakeLLM()
    engine = _engine_with(llm, sleep=True)
    assert engine.update_weights() is not None and llm.calls == ["reload_weights"]
    engine.sleep()  # end of a generation phase (GRPO: before the update; Trainer.evaluate: after validation)
    engine.sleep()  # idempotent
    assert engine.update_weights() is None  # asleep: the weights are streamed at wake-up
    assert llm.calls == ["reload_weights", "sleep2"]
    engine._wake()
    assert llm.calls == ["reload_weights", "sleep2", "wake", "reload_weights"]
    engine._wake()  # awake: nothing
    assert llm.calls[-1] == "reload_weights" and len(llm.calls) == 4


def test_without_sleep_mode_the_engine_never_sleeps():
    llm = FakeLLM()
    engine = _engine_with(llm, sleep=False)
    engine.sleep()
    assert engine.update_weights() is not None and llm.calls == ["reload_weights"]


def test_grpo_and_validation_end_their_generation_phases_with_sleep(tmp_path):
    """The trainers call ``sleep()`` after GRPO's rollouts and after each validation (the torch
    backend's is a no-op), so vLLM's memory is back for the update."""
    from helpers.toy_grpo import make_trainer
    from rollout.engine import RolloutEngine

    calls = []

    class Recording(RolloutEngine):
        def sleep(self):
            calls.append("sleep")

        def update_weights(self):
            calls.append("update")
            return None

    rollouts = Recording(RolloutOptions(gen_length=8, block_length=8, steps=8, temperature=1.0))
    trainer = make_trainer(str(tmp_path / "run"), max_steps=2, rollouts=rollouts)
    trainer.eval_fn = lambda module, step: {"eval/x": 1.0}
    trainer.train()
    assert calls == ["sleep", "update", "sleep", "update", "sleep"]  # rollout, update x2, then the validation
    trainer.close()
    assert trainer.engine is None and trainer.policy is None


@needs_vllm
def test_one_vllm_engine_per_process():
    from rollout import build_tiny_policy
    from rollout.vllm_backend.engine import VLLMEngine, live_engines

    for e in live_engines():
        e.close()
    options = RolloutOptions(gen_length=8, block_length=8, steps=8, backend="vllm",
                             vllm=VLLMOptions(max_model_len=64))
    policy = build_tiny_policy(seed=0, arch="bert", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=128)
    with VLLMEngine(options, policy) as first:
        assert live_engines() == [first]
        vllm_config = first.llm.llm_engine.vllm_config
        assert vllm_config.model_config.max_model_len == 64
        assert vllm_config.scheduler_config.max_num_batched_tokens == 4096
        with pytest.raises(RuntimeError, match="another vLLM engine is running in this process; close it first"):
            VLLMEngine(options, policy)
        too_long = torch.full((1, 60), policy.tokenizer.convert_tokens_to_ids("7"))
        with pytest.raises(ValueError, match=r"rollout.vllm.max_model_len=64: a prompt of 60 tokens \+ gen_length=8"):
            first.generate(too_long, torch.ones_like(too_long))
    assert live_engines() == []
    with VLLMEngine(options, policy) as second:  # closed first: the next one starts
        assert live_engines() == [second]
