"""One tracker for every trainer: W&B (offline unless configured), ``metrics.jsonl`` and a
tqdm progress bar. Only the main process writes anything.

Metric names follow TRL's (``reward``, ``reward_std``, ``kl``, ``timing/<phase>``, ...).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Sequence

import torch

from rl import distributed as D

log = logging.getLogger(__name__)

_WANDB_ID_FILE = "wandb_run_id.txt"
_RUN_CONTEXT: ContextVar[dict] = ContextVar("dllm_rl_run_context", default={})


@contextmanager
def run_context(*, name: str | None = None, group: str | None = None, job_type: str | None = None,
                config: dict | None = None):
    """Run-level W&B settings for every :class:`Tracker` created inside the block (the recipes
    wrap each stage in one): ``name`` (``<recipe>-<task>-<model>-seed<S>``), ``group`` (one per
    pipeline), ``job_type`` (the stage; also the progress bar's label) and ``config`` (the full
    composed config, logged with the stage trainer's config under ``trainer``)."""
    token = _RUN_CONTEXT.set({k: v for k, v in dict(name=name, group=group, job_type=job_type,
                                                        config=config).items() if v is not None})
    try:
        yield
    finally:
        _RUN_CONTEXT.reset(token)


def _to_floats(metrics: dict[str, Any]) -> dict[str, Any]:
    """Tensors (and numpy scalars) to python numbers with a single host transfer for all
    tensor values of the step."""
    tensor_keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: v for k, v in metrics.items() if k not in tensor_keys}
    if tensor_keys:
        flat = torch.stack([metrics[k].detach().float().reshape(()).cpu() if metrics[k].numel() == 1
                            else metrics[k].detach().float().mean().cpu() for k in tensor_keys])
        out.update(zip(tensor_keys, flat.tolist()))
    for k, v in out.items():
        if hasattr(v, "item") and not isinstance(v, (int, float)):
            out[k] = v.item()
    return out


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def _repair_jsonl(path: Path, keep_through_step: int | None) -> None:
    """Drop a torn last line (a kill mid-write) and, when resuming from step ``s``, the lines
    logged after ``s`` (they will be logged again). Rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep_through_step is not None and row.get("step", -1) > keep_through_step:
            continue
        kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class Tracker:
    """Fan-out logger.

    - ``log(metrics, step)``: one JSON object per call appended to ``run_dir/metrics.jsonl``
      (flushed per line), the same values to W&B, and the progress bar advanced to ``step``
      with the reward and the seconds per step in its postfix.
    - ``log_samples(step, prompts, completions, rewards)``: a small table to W&B and rows to
      ``run_dir/samples.jsonl``; with ``sample_table_every=N > 0`` only on steps divisible
      by N (so trainers may call it every step), with 0 on every call.
    - W&B mode: ``wandb_mode`` argument, else ``$WANDB_MODE``, else ``offline``; ``disabled``
      turns W&B off. Files go to ``run_dir/wandb``; never prompts for a login. A resumed run
      (``resume_step`` given) continues the same W&B run id and drops jsonl lines logged
      after ``resume_step``.
    - Run name, group, job type and the logged config: the arguments, else the enclosing
      :func:`run_context`. The progress bar is labelled with the job type (the stage), else
      the name, else "train".
    """

    def __init__(self, run_dir: str | Path, *, project: str = "dllm-rl", name: str | None = None,
                 config: dict | None = None, wandb_mode: str | None = None, total_steps: int | None = None,
                 is_main: bool | None = None, sample_table_every: int = 0, max_sample_rows: int = 8,
                 resume_step: int | None = None, progress: bool = True, group: str | None = None,
                 job_type: str | None = None):
        ctx = _RUN_CONTEXT.get()
        name, group, job_type = name or ctx.get("name"), group or ctx.get("group"), job_type or ctx.get("job_type")
        if "config" in ctx:
            config = {**ctx["config"], "trainer": config or {}}
        self.run_dir = Path(run_dir)
        self.is_main = D.is_main_process() if is_main is None else is_main
        self.sample_table_every = sample_table_every
        self.max_sample_rows = max_sample_rows
        self._wandb = None
        self._bar = None
        self._last_time: float | None = None
        self._last_step = resume_step or 0
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        for p in (self.metrics_path, self.samples_path):
            _repair_jsonl(p, resume_step)
        self._metrics_f = open(self.metrics_path, "a")
        self._samples_f = open(self.samples_path, "a")
        mode = wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be online, offline or disabled, got {mode!r}")
        if mode != "disabled":
            self._init_wandb(project, name, config, mode, group=group, job_type=job_type)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=self._last_step, desc=job_type or name or "train",
                             dynamic_ncols=True, leave=True)

    def _init_wandb(self, project: str, name: str | None, config: dict | None, mode: str, *,
                    group: str | None = None, job_type: str | None = None) -> None:
        import wandb

        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(exist_ok=True)
        id_file = self.run_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.sdk.lib.runid.generate_id()
        id_file.write_text(run_id)
        kwargs = dict(project=project, name=name, group=group, job_type=job_type, config=config or {},
                      dir=str(self.run_dir), mode=mode, resume="allow",
                      settings=wandb.Settings(console="off", silent=True))
        # After a SIGKILL the killed run's wandb-core service can hold the id for a few seconds
        # (until it notices its parent is gone): wait for it, then fall back to a fresh id.
        for attempt in range(20):
            try:
                self._wandb = wandb.init(id=run_id, **kwargs)
                return
            except Exception as e:  # wandb raises its own ServerResponseError: "run ID ... is in use"
                if "in use" not in str(e):
                    raise
                time.sleep(0.5)
        log.warning("W&B run id %s is still held by another process; logging to a new run", run_id)
        run_id = wandb.sdk.lib.runid.generate_id()
        id_file.write_text(run_id)
        self._wandb = wandb.init(id=run_id, **kwargs)

    # ------------------------------------------------------------------ logging
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record the metrics of ``step`` (tensors are converted here, once per step)."""
        if not self.is_main:
            return
        now = time.perf_counter()
        values = _to_floats(metrics)
        row = {"step": int(step), **{k: _json_safe(v) for k, v in values.items()}}
        self._metrics_f.write(json.dumps(row) + "\n")
        self._metrics_f.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
        if self._bar is not None:
            post = {}
            if "reward" in values:
                post["reward"] = f"{values['reward']:.3f}"
            elif "loss" in values:
                post["loss"] = f"{values['loss']:.4f}"
            if self._last_time is not None and step > self._last_step:
                post["s/step"] = f"{(now - self._last_time) / (step - self._last_step):.2f}"
            self._bar.set_postfix(post, refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
        self._last_time, self._last_step = now, max(self._last_step, int(step))

    def log_samples(self, step: int, prompts: Sequence[str], completions: Sequence[str],
                    rewards: Sequence[float] | torch.Tensor) -> None:
        """A table of (prompt, completion, reward) rows, at most ``max_sample_rows``."""
        if not self.is_main or (self.sample_table_every > 0 and step % self.sample_table_every != 0):
            return
        if not len(prompts) == len(completions) == len(rewards):
            raise ValueError(f"log_samples: prompts ({len(prompts)}), completions ({len(completions)}) and "
                             f"rewards ({len(rewards)}) differ in length")
        if isinstance(rewards, torch.Tensor):
            rewards = rewards.detach().float().cpu().tolist()
        rows = [(str(p), str(c), float(r)) for p, c, r in
                zip(prompts[: self.max_sample_rows], completions[: self.max_sample_rows], rewards)]
        for p, c, r in rows:
            self._samples_f.write(json.dumps({"step": int(step), "prompt": p, "completion": c,
                                              "reward": _json_safe(r)}) + "\n")
        self._samples_f.flush()
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "completion", "reward"],
                                data=[[int(step), p, c, r] for p, c, r in rows])
            self._wandb.log({"samples": table}, step=int(step))

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for f in (self._metrics_f, self._samples_f):
            if not f.closed:
                f.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
