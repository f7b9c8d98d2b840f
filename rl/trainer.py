"""The loop every trainer shares: DeepSpeed engine, optional LoRA and reference model, resumable
data order, atomic checkpoints, tracking, periodic evaluation and the final HF export.

A trainer subclasses :class:`Trainer` and implements ``training_step(rows) -> metrics``; the
loop owns everything else, so SFT, diffu-GRPO, DPO and the unmasking-order learner resume,
log and checkpoint the same way.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from rl import distributed as D
from rl.checkpoint import export_hf, load_checkpoint, save_checkpoint
from rl.config import ConfigError, TrainerConfig
from rl.data import ShuffledIterator
from rl.engine import (build_engine, build_reference, gathered_for_generation, init_distributed, release_memory,
                       unwrap)
from rl.tracking import Tracker
from rollout.engine import RolloutEngine, build_rollout_engine

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

EvalFn = Callable[[torch.nn.Module, int], dict]


def resolve_deepspeed_config(name_or_path: str) -> Path:
    """``zero2`` -> configs/deepspeed/zero2.json; an existing path is returned as is."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed config file not found: {path}")
        return path
    path = CONFIG_DIR / "deepspeed" / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "deepspeed").glob("*.json"))
        raise ValueError(f"deepspeed={name_or_path!r}: not a file and not one of {known}")
    return path


def seeded_generator(seed: int, purpose: str, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator per (seed, purpose, rank): streams never collide, globals never touched."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(purpose.encode()) * 101 + rank) % (2**63 - 1))
    return g


def lora_target_names(model: torch.nn.Module, options) -> list[str]:
    """Full names of the modules of ``model`` (the HF model) that LoRA adapts: those whose name
    (published or ours, see :class:`rl.config.LoraOptions`) is a target or ends with ``.<target>``,
    peft's rule. Raises if nothing matches; logs the targets that match nothing."""
    import logging

    to_published = getattr(model, "to_published_name", None)
    use_published = options.target_names == "published" and to_published is not None

    def shown(name: str) -> str:
        return to_published(name + ".")[:-1] if use_published else name

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)
    candidates = {name: shown(name) for name, mod in model.named_modules() if name and isinstance(mod, kinds)}
    hits = {t: [n for n, s in candidates.items() if s == t or s.endswith("." + t)] for t in options.target_modules}
    selected = sorted({n for names in hits.values() for n in names})
    if not selected:
        leaves = sorted({s.split(".")[-1] for s in candidates.values()})
        raise ValueError(f"lora.target_modules={list(options.target_modules)} match no module of the model "
                         f"({'published' if use_published else 'module'} names here: {leaves[:20]})")
    unmatched = [t for t, names in hits.items() if not names]
    if unmatched:
        logging.getLogger(__name__).warning(
            "lora.target_modules %s match no %s module name of %s; adapting %d modules (%s)", unmatched,
            "published" if use_published else "", type(model).__name__, len(selected),
            ", ".join(sorted({shown(n).split(".")[-1] for n in selected})))
    return selected


def apply_lora(policy: torch.nn.Module, options, seed: int = 0) -> None:
    """Replace ``policy.model`` by a peft LoRA model (only adapter weights train) on the modules
    :func:`lora_target_names` selects. peft draws the adapters' initial weights from the global
    RNG: they are drawn from ``seed`` here, in a forked RNG state, so a LoRA run is reproducible and
    the caller's RNG stream is untouched."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(policy.model, options)
    cfg = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=targets)
    devices = [policy.model.device] if getattr(policy.model, "device", torch.device("cpu")).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        policy.model = get_peft_model(policy.model, cfg)


def check_master_weights(model: torch.nn.Module, bf16: bool) -> None:
    """Refuse (one :class:`ConfigError` line) to train 16-bit weights without DeepSpeed's bf16
    section: torch's AdamW would update bf16/fp16 tensors in place, with no fp32 master copy, and
    updates below half a bf16 ulp (2^-8 of the weight) would be rounded away. With ``bf16=True``
    DeepSpeed keeps fp32 master weights (ZeRO-1/2/3 partitions, or its bf16 optimizer wrapper at
    ZeRO-0) and casts the module to bf16 for the forward."""
    if bf16:
        return
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
    if low:
        raise ConfigError(f"bf16=false: the trainable weights are {', '.join(low)} and AdamW would update them "
                          f"with no fp32 master copy; set bf16=true (DeepSpeed keeps fp32 master weights) or load "
                          f"the model in float32 (model.dtype=float32)")


def enable_gradient_checkpointing(policy: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers models);
    non-reentrant, so it also works when only LoRA adapters require grad."""
    model = getattr(policy, "model", policy)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing=True: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Trainer:
    """Base trainer. Subclasses set ``needs_reference`` and implement :meth:`training_step`."""

    needs_reference: bool = False

    def __init__(self, config: TrainerConfig, policy: torch.nn.Module, train_dataset: Sequence[dict], *,
                 tokenizer=None, eval_fn: EvalFn | None = None, rollouts: RolloutEngine | None = None):
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer if tokenizer is not None else getattr(policy, "tokenizer", None)
        self.train_dataset = list(train_dataset)
        self.eval_fn = eval_fn
        self.run_dir = Path(config.run_dir)
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = next(policy.parameters()).device
        self.generators = {name: seeded_generator(config.seed, name, self.rank, self.device)
                           for name in self.generator_names()}
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.adapter())
        if config.lora.enabled:
            apply_lora(self.adapter(), config.lora, seed=config.seed)
        check_master_weights(policy, config.bf16)
        ds_config = resolve_deepspeed_config(config.deepspeed)
        # A frozen copy is taken before DeepSpeed partitions the policy; with LoRA the reference
        # is the same network with its adapters disabled (no copy at all).
        self.ref = None
        if self.needs_reference and not config.lora.enabled:
            self.ref = build_reference(policy, ds_config, bf16=config.bf16)
        rows_per_step = self.rows_per_step()
        micro = config.micro_batch_size or rows_per_step
        self.micro_batch_size = micro
        self.grad_accum = math.ceil(rows_per_step / micro)
        self.engine = build_engine(
            policy, ds_config, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas),
            warmup_steps=config.warmup_steps, total_steps=self.optimizer_steps_per_step() * config.max_steps,
            scheduler=config.lr_scheduler, micro_batch_size=micro, grad_accum=self.grad_accum,
            grad_clip=config.max_grad_norm, bf16=config.bf16,
        )
        # The rollout engine (rollout/engine.py): given (a recipe shares one with its evaluation) or
        # built from config.rollout; it serves this trainer's weights from now on.
        options = getattr(config, "rollout", None)
        self.rollouts = rollouts if rollouts is not None or options is None else build_rollout_engine(options)
        self._owns_rollouts = rollouts is None and self.rollouts is not None
        if self.rollouts is not None:
            self.rollouts.attach(self.engine, adapter=self.rollout_adapter)
        self.data = ShuffledIterator(len(self.train_dataset), config.per_device_batch_size, seed=config.seed,
                                     rank=self.rank, world_size=self.world_size)
        self.step = 0
        self.tracker: Tracker | None = None

    # ---- hooks for subclasses -------------------------------------------------------------
    def adapter(self) -> torch.nn.Module:
        """The policy adapter whose ``.model`` (the HF model) LoRA and gradient checkpointing apply to."""
        return self.policy

    def rollout_adapter(self, module: torch.nn.Module) -> torch.nn.Module:
        """The policy adapter the rollout engine generates with, inside the (gathered) module."""
        return module

    def generator_names(self) -> tuple[str, ...]:
        return ("mask",)

    def rows_per_step(self) -> int:
        """Rows one optimizer step sees on this rank (sets DeepSpeed's accumulation)."""
        return self.config.per_device_batch_size

    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps per training step (diffu-GRPO takes mu per batch)."""
        return 1

    def training_step(self, rows: list[dict]) -> dict[str, float | torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    # ---- shared pieces ----------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The policy as the trainers call it (the DeepSpeed engine)."""
        return self.engine

    @contextmanager
    def reference(self):
        """Yields a callable reference model: the frozen copy, or the policy with LoRA disabled."""
        if self.ref is not None:
            yield self.ref
            return
        peft_model = unwrap(self.engine).model
        with peft_model.disable_adapter():
            yield self.engine

    def micro_batches(self, n_rows: int) -> list[slice]:
        return [slice(i, min(i + self.micro_batch_size, n_rows)) for i in range(0, n_rows, self.micro_batch_size)]

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """One micro-batch: DeepSpeed scales by 1/grad_accum and steps at the boundary."""
        self.engine.backward(loss)
        if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary():
            # ZeRO-0 does not record the norm; ZeRO-1/2/3 do (their gradients are partitioned)
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            self._stage0_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        self.engine.step()

    def grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step (before clipping)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_stage0_grad_norm", None)
        return float(norm) if norm is not None else float("nan")

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        was_training = self.engine.module.training
        with gathered_for_generation(self.engine) as module:
            module.eval()
            metrics = self.eval_fn(module, self.step)
        self.engine.module.train(was_training)
        if self.rollouts is not None:
            self.rollouts.sleep()  # vLLM's sleep mode: its memory goes back to training
        return self.reduce_metrics(metrics)

    def reduce_metrics(self, metrics: dict) -> dict[str, float]:
        """Mean over ranks with one collective (on the process group's device); tensors become
        floats here, once per step."""
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=self.device).detach().reshape(())
                              for k in keys])
        return dict(zip(keys, (D.all_reduce_sum(values) / self.world_size).tolist()))

    def export_final(self) -> None:
        """Write run_dir/final; a trainer whose module is not an HF model wrapper overrides this."""
        export_hf(self.engine, self.tokenizer, self.run_dir / "final")

    def trainer_state(self) -> dict:
        return {"step": self.step, "data": self.data.state_dict(), "generators": self.generators}

    def save(self) -> None:
        save_checkpoint(self.engine, self.run_dir, self.step, self.trainer_state(),
                        keep_last=self.config.save_total_limit)

    def maybe_resume(self) -> None:
        if not self.config.resume:
            return
        state = load_checkpoint(self.engine, self.run_dir, generators=self.generators)
        if state is None:
            return
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run until ``max_steps``; returns the last logged metrics."""
        cfg = self.config
        self.maybe_resume()
        if self.rollouts is not None and cfg.resume:
            self.rollouts.update_weights()  # the resumed weights
        self.tracker = Tracker(self.run_dir, project=cfg.wandb_project, config=_as_dict(cfg),
                               wandb_mode=cfg.wandb_mode, total_steps=cfg.max_steps,
                               is_main=self.rank == 0,
                               resume_step=self.step if cfg.resume else None)
        self.engine.train()
        last: dict[str, float] = {}
        while self.step < cfg.max_steps:
            rows = [self.train_dataset[i] for i in self.data.next_indices()]
            t0 = time.perf_counter()
            metrics = self.training_step(rows)
            metrics["timing/step"] = time.perf_counter() - t0
            if self.rollouts is not None:  # the next rollout / evaluation sees this step's weights
                synced = self.rollouts.update_weights()
                if synced is not None:
                    metrics["timing/weight_sync"] = synced
            metrics["lr"] = self.current_lr()
            self.step += 1
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                last = self.reduce_metrics(metrics)
                self.tracker.log(last, step=self.step)
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step != cfg.max_steps:
                self.tracker.log(self.evaluate(), step=self.step)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step != cfg.max_steps:
                self.save()
        final_eval = self.evaluate()
        if final_eval:
            self.tracker.log(final_eval, step=self.step)
            last.update(final_eval)
        self.save()
        if cfg.export_hf:
            self.export_final()
        if self._owns_rollouts:
            self.rollouts.close()
        self.tracker.close()
        return last

    def close(self) -> None:
        """Free what the trainer holds: its rollout engine (when it built it), the DeepSpeed engines
        (optimizer states, gradient buffers, ZeRO hooks: ``DeepSpeedEngine.destroy``), the reference
        and the policy, then collect. A recipe calls this before loading the stage's checkpoint
        again for the test evaluation, so two copies of the weights never coexist. The trainer
        cannot be used afterwards."""
        if self.rollouts is not None and self._owns_rollouts:
            self.rollouts.close()
        for engine in (getattr(self, "engine", None), getattr(self, "ref", None)):
            if engine is not None and hasattr(engine, "destroy"):
                engine.destroy()
        self.engine = self.ref = self.policy = self.rollouts = self.eval_fn = None
        self.train_dataset = []
        release_memory()


def _as_dict(cfg) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)
