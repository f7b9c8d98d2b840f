"""Worker for tests/test_distributed_engine.py, started once per rank by a launcher:

    deepspeed --num_gpus 2 --master_port P tests/dist_worker.py --stage zero2 --out DIR
    torchrun --nproc_per_node 2 --master_port P tests/dist_worker.py --stage zero3 --out DIR

Trains the tiny model a few SFT steps on a fixed global batch split evenly over ranks (masks
drawn per sample from a per-sample seed, so they do not depend on the split), then checks
sharding, generation gathering, the sharded reference, checkpoint round trip and the HF
export. Writes ``DIR/rank{r}.json`` and ``DIR/weights-rank{r}.pt``; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rl import distributed as D
from rl.checkpoint import export_hf, load_checkpoint, save_checkpoint
from rl.engine import (build_engine, build_reference, consolidated_state_dict, gathered_for_generation,
                       init_distributed, is_zero3, unwrap, zero3_partition_numel)
from rl.losses import diffusion_sft_loss
from rollout.tiny import build_tiny_model, build_tiny_tokenizer

GLOBAL_BATCH, STEPS, LR = 4, 3, 1e-2


def global_batch(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (GLOBAL_BATCH, 24), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 10:] = True
    return ids, resp


def local_loss(engine, tok, batch, step: int, rank: int, world: int) -> torch.Tensor:
    """Mean SFT loss over this rank's rows; row i's masks come from seed (step, i)."""
    ids, resp = batch
    per = GLOBAL_BATCH // world
    rows = range(rank * per, (rank + 1) * per)
    losses = [diffusion_sft_loss(engine, ids[i:i + 1], resp[i:i + 1], mask_id=tok.mask_token_id,
                                 generator=torch.Generator().manual_seed(1000 * step + i)) for i in rows]
    return torch.stack(losses).mean()


def train_steps(engine, tok, batch, steps, start: int = 0) -> list[float]:
    """Global (rank-averaged) loss of each step."""
    rank, world = D.get_rank(), D.get_world_size()
    out = []
    for s in range(start, start + steps):
        loss = local_loss(engine, tok, batch, s, rank, world)
        engine.backward(loss)
        engine.step()
        out.append(D.all_reduce_mean(loss).item())
    return out


class CountGathers:
    """Counts ZeRO-3 parameter all-gathers issued through deepspeed.comm."""

    NAMES = ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_gather_coalesced")

    def __enter__(self):
        import deepspeed.comm as dcomm

        self.mod, self.n, self.orig = dcomm, 0, {}
        for name in self.NAMES:
            if hasattr(dcomm, name):
                fn = self.orig[name] = getattr(dcomm, name)
                setattr(dcomm, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def wrapped(*a, **k):
            self.n += 1
            return fn(*a, **k)
        return wrapped

    def __exit__(self, *exc):
        for name, fn in self.orig.items():
            setattr(self.mod, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True)
    ap.add_argument("--out", required=True)
    args, _ = ap.parse_known_args()  # the deepspeed launcher adds --local_rank
    out = Path(args.out)
    init_distributed()
    rank, world = D.get_rank(), D.get_world_size()
    tok = build_tiny_tokenizer()
    batch = global_batch(tok)
    res: dict = {"rank": rank, "world": world, "backend": torch.distributed.get_backend()}

    model = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        init_logits = model(batch[0]).logits
    ref = build_reference(model, args.stage)
    engine = build_engine(model, args.stage, lr=LR, warmup_steps=1, total_steps=10,
                          micro_batch_size=GLOBAL_BATCH // world)
    res["zero3"] = is_zero3(engine)
    res["losses"] = train_steps(engine, tok, batch, STEPS)
    sd = consolidated_state_dict(engine, rank0_only=False)
    torch.save(sd, out / f"weights-rank{rank}.pt")

    if is_zero3(engine):
        res["policy_numel"] = zero3_partition_numel(unwrap(engine))
        res["ref_numel"] = zero3_partition_numel(unwrap(ref))
    with torch.no_grad():
        res["ref_max_err"] = (ref(batch[0]).logits - init_logits).abs().max().item()
        with CountGathers() as c:
            expect = engine(batch[0]).logits
        res["gathers_engine_forward"] = c.n
        with gathered_for_generation(engine) as module, CountGathers() as c:
            err = max((module(batch[0]).logits - expect).abs().max().item() for _ in range(3))
        res["gathers_generation"], res["generation_max_err"] = c.n, err

    # checkpoint round trip across ranks: save, diverge one step, load, redo the step
    run = out / "run"
    gen = torch.Generator().manual_seed(100 + rank)
    save_checkpoint(engine, run, STEPS, {"step": STEPS, "generators": {"mask": gen}})
    draw = torch.rand(2, generator=gen).tolist()
    after = train_steps(engine, tok, batch, 1, start=STEPS)
    sd_after = consolidated_state_dict(engine, rank0_only=False)
    gen.manual_seed(0)
    state = load_checkpoint(engine, run, generators={"mask": gen})
    res["resume_step"] = state["step"]
    res["resume_draw_equal"] = torch.rand(2, generator=gen).tolist() == draw
    res["resume_loss_equal"] = train_steps(engine, tok, batch, 1, start=STEPS) == after
    sd_again = consolidated_state_dict(engine, rank0_only=False)
    res["resume_weights_equal"] = all(torch.equal(sd_again[k], sd_after[k]) for k in sd_after)

    export_hf(engine, tok, out / "hf")
    final = consolidated_state_dict(engine)  # collective under ZeRO-3; rank 0 gets the weights
    if rank == 0:
        torch.save(final, out / "final-weights.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    D.barrier()


if __name__ == "__main__":
    sys.exit(main())
