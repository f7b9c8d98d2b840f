"""Check rl/block_diffusion.py (block-diffusion SFT loss, TraceRL trace likelihood for SDAR/TraDo)
against Gen-Verse/dLLM-RL's code on identical inputs.

    # the authors' repository, not vendored here (read, never imported by the package):
    git clone https://github.com/Gen-Verse/dLLM-RL REFS/dLLM-RL        # checked at commit 10b4fd1
    .venv/bin/python scripts/check_block_diffusion_reference.py --refs REFS/dLLM-RL [--write-fixture]

Their functions are nested in ``main()`` of ``train/rl_sdar.py`` and ``train/sft_sdar.py``
(``make_basic_block_attention``, ``process_pad``, ``collapse_k_unique``, ``one_round_vectorized``,
``collect_training_data``, ``compute_logp_old_tok_parallel``, ``simple_collate``, ``forward_process``,
and the ``TrainDataset`` class); they are ``ast``-extracted and exec'd in a namespace holding what
``main`` closes over (``config.training`` with configs/rl_trado.yaml's / sft_trado.yaml's values,
``start_pos``, ``pad_id``, ``mask_id``, ``model``, ...). No deepspeed / accelerate / transformers
needed. Both sides run the same tiny block-causal model (:class:`TinyBlockLM`, float64; it reads a
0/1 or bool ``[B, 1, N, N]`` mask and ``position_ids`` the way the published SDAR code does) on the
same token ids (left-padded prompts of different real lengths, right-padded responses), the same
step maps and advantages; their SFT masks come from ``torch.manual_seed(s)`` and ours from a
generator seeded ``s``, which must give the same masks.

Prints one table (what was compared, max |diff|, ok); ``--write-fixture`` records the authors'
numbers in tests/fixtures/block_diffusion/reference.json, which tests/test_block_diffusion.py
compares against without the checkout. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import types

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # our package, and objective_refs (also when imported as scripts.<this>)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from objective_refs._authors import checkout_path, main_functions  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "block_diffusion" / "reference.json"

# the shared toy problem: vocabulary, special ids, shapes
VOCAB, PAD_ID, MASK_ID, EOS_ID = 40, 0, 1, 2
MODEL = dict(vocab=VOCAB, hidden=32, heads=2, layers=2, max_pos=48)
SEEDS = {"policy": 0, "old": 1}
BLOCK = 4  # configs/rl_trado.yaml / sft_trado.yaml training.block_size
PROMPT_LENS = [5, 3, 6, 1]  # real prompt lengths (left padded to P = 6)
RESP_LENS = [11, 7, 10, 3]  # real response lengths (right padded with PAD to L = 11)
P, L = max(PROMPT_LENS), max(RESP_LENS)
ADVANTAGES = [1.0, -0.5, 0.25, -0.75]
EPS, BETA = 0.20, 0.01  # rl_trado.yaml training.eps / beta (use_kl_estimator_k3: True)
LOWER_P, UPPER_P = 0.1, 0.9  # sft_trado.yaml
POST_NUM = 0  # both configs
SFT_SEED = 10086  # sft_trado.yaml training.seed
SHRINKS = (1, 2, 3)
RECORD_SHRINK = 2
FIXTURE_PARAMS = 6


# ---- the shared model ---------------------------------------------------------------------------------
class TinyBlockLM(torch.nn.Module):
    """A tiny pre-norm transformer that attends as told by a 4D mask (``[B, 1, N, N]``, bool or 0/1,
    True / > 0 = visible, as the published SDAR attention reads it) and embeds ``position_ids``
    (learned absolute positions), logits at position i predict token i. ``logits_to_keep = n``: the
    last n positions only. Initialised from ``seed`` (CPU RNG, so the same on every machine)."""

    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, max_pos: int, seed: int):
        super().__init__()
        self.heads = heads
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok = torch.nn.Embedding(vocab, hidden)
            self.pos = torch.nn.Embedding(max_pos, hidden)
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({
                "ln1": torch.nn.LayerNorm(hidden), "qkv": torch.nn.Linear(hidden, 3 * hidden),
                "o": torch.nn.Linear(hidden, hidden), "ln2": torch.nn.LayerNorm(hidden),
                "up": torch.nn.Linear(hidden, 2 * hidden), "down": torch.nn.Linear(2 * hidden, hidden)})
                for _ in range(layers))
            self.ln = torch.nn.LayerNorm(hidden)
            self.head = torch.nn.Linear(hidden, vocab)
            for p in self.parameters():  # larger than the default init: log-probs far from uniform
                torch.nn.init.normal_(p, std=0.3)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **_):
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        x = self.tok(input_ids) + self.pos(position_ids)
        if attention_mask is None:
            visible = torch.ones(b, 1, n, n, dtype=torch.bool, device=input_ids.device)
        else:
            visible = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask > 0
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, torch.finfo(x.dtype).min)
        hd = x.shape[-1] // self.heads
        for layer in self.layers:
            q, k, v = layer["qkv"](layer["ln1"](x)).view(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
            x = x + layer["o"]((att @ v).transpose(1, 2).reshape(b, n, -1))
            x = x + layer["down"](F.gelu(layer["up"](layer["ln2"](x))))
        logits = self.head(self.ln(x))
        return types.SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def build_models() -> dict[str, TinyBlockLM]:
    return {k: TinyBlockLM(**MODEL, seed=s).double().eval() for k, s in SEEDS.items()}


# ---- the shared inputs ----------------------------------------------------------------------------------
def build_inputs() -> dict:
    """Token ids ``[B, P + L]`` (prompts left-padded with PAD, responses ending in EOS then PAD), the
    prompt's attention mask, the scored response tokens (not PAD: their post_num = 0) and step maps:
    per block a random order of unmasking, several tokens per step, global step numbers (as their
    rollout engine records), only for the real response tokens (their code pads the rest)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.full((len(PROMPT_LENS), P + L), PAD_ID, dtype=torch.long)
    step_maps = []
    for i, (pl, rl) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        ids[i, P - pl:P] = torch.randint(3, VOCAB, (pl,), generator=g)
        ids[i, P:P + rl] = torch.randint(3, VOCAB, (rl,), generator=g)
        ids[i, P + rl - 1] = EOS_ID
        steps, step = [], 1
        for s in range(0, rl, BLOCK):
            n = min(BLOCK, rl - s)
            per_step = torch.randint(1, 3, (n,), generator=g).tolist()  # tokens per step: 1 or 2
            order = torch.randperm(n, generator=g).tolist()
            blk, j = [0] * n, 0
            for c in per_step:
                for pos in order[j:j + c]:
                    blk[pos] = step
                j += c
                step += 1
                if j >= n:
                    break
            steps += blk
        step_maps.append(steps)
    attn = (ids[:, :P] != PAD_ID).long()
    response = ids[:, P:] != PAD_ID
    return {"ids": ids, "attention_mask": attn, "response": response, "step_maps": step_maps}


def padded_trace(step_maps: list[list[int]]) -> torch.Tensor:
    """Their padding of a step map to the response width: the row's last step + 1 after the response."""
    return torch.tensor([m[:L] + [max(m) + 1] * (L - len(m)) for m in step_maps], dtype=torch.long)


# ---- the authors' side ------------------------------------------------------------------------------------
RL_NESTED = ("collapse_k_unique", "make_basic_block_attention", "process_pad", "one_round_vectorized",
             "collect_training_data", "simple_collate", "compute_logp_old_tok_parallel", "forward_process")
SFT_NESTED = ("collapse_k_unique", "make_basic_block_attention", "process_pad", "one_round_vectorized",
              "collect_training_data", "forward_process")


def authors_namespace(repo: pathlib.Path, source: str, nested: tuple[str, ...], training: dict) -> dict:
    """The authors' nested functions (and ``TrainDataset``) of ``source``'s ``main`` exec'd into one
    namespace with what ``main`` closes over; set ``ns["model"]`` before calling."""
    path = checkout_path(repo, source, "dLLM-RL")
    config = types.SimpleNamespace(training=types.SimpleNamespace(block_size=BLOCK, post_num=POST_NUM, **training))
    ns = {"torch": torch, "F": F, "config": config, "start_pos": P, "L0": P, "L1": L, "post_num": POST_NUM,
          "pad_id": PAD_ID, "mask_id": MASK_ID, "model": None, "Dataset": torch.utils.data.Dataset}
    main_functions(path, nested, ns)
    ns["basic_block_attention"] = ns["make_basic_block_attention"](P + 2 * L, P, BLOCK).cpu()
    return ns


def authors_rl(repo, models: dict, inp: dict, shrink: int) -> dict:
    """Their TraceRL rows (collect_training_data), old log-probs under the rollout policy
    (compute_logp_old_tok_parallel, float32 storage), the loss of forward_process on all rows at once
    with its gradient, and each row's loss alone."""
    ns = authors_namespace(repo, "train/rl_sdar.py", RL_NESTED,
                           dict(method="TraceRL", shrink=shrink, lower_p=LOWER_P, upper_p=UPPER_P, eps=EPS,
                                beta=BETA, use_kl_estimator_k3=True))
    step_maps = [m[:L] + [max(m) + 1] * (L - len(m)) for m in inp["step_maps"]]  # their main's padding
    with torch.no_grad():
        ext, p_mask, tok_idx, labels, rewards = ns["collect_training_data"](inp["ids"].clone(), step_maps, ADVANTAGES)
    dataset = ns["TrainDataset"](ext, p_mask, tok_idx, labels, rewards)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=ns["simple_collate"])
    accel = types.SimpleNamespace(device=torch.device("cpu"), wait_for_everyone=lambda: None)

    def logps_under(model):
        ns["model"] = model
        with torch.no_grad():
            ns["compute_logp_old_tok_parallel"](accel, dataset, loader, start_pos=P, pad_id=PAD_ID, batch_size=1)
        model.eval()
        out = dataset.logp_old_tok.clone()
        dataset.logp_old_tok.fill_(float("-inf"))
        return out

    policy_lp, old = logps_under(models["policy"]), logps_under(models["old"])
    dataset.logp_old_tok.copy_(old)
    policy = models["policy"]
    ns["model"] = policy
    policy.zero_grad(set_to_none=True)
    loss = ns["forward_process"](ext, p_mask, tok_idx, labels, rewards, dataset.logp_old_tok)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        per_row = torch.stack([ns["forward_process"](ext[r:r + 1], p_mask[r:r + 1], tok_idx[r:r + 1], labels[r:r + 1],
                                                     rewards[r:r + 1], dataset.logp_old_tok[r:r + 1])
                               for r in range(ext.shape[0])])
    attn = ns["process_pad"](ns["basic_block_attention"].clone().repeat_interleave(ext.shape[0], 0), ext)
    return {"ext": ext, "p_mask": p_mask, "tok_idx": tok_idx, "attn": attn, "old": old, "policy": policy_lp,
            "loss": loss.detach(), "grads": grads, "per_row": per_row}


def authors_sft(repo, model, inp: dict, method: str, shrink: int = 1) -> dict:
    """Their SFT rows (collect_training_data, ``semi-ar`` noise from torch.manual_seed(SFT_SEED), or
    ``trace``) and the loss of their forward_process on all rows with its gradient."""
    ns = authors_namespace(repo, "train/sft_sdar.py", SFT_NESTED,
                           dict(method=method, shrink=shrink, lower_p=LOWER_P, upper_p=UPPER_P))
    step_maps = [m[:L] + [max(m) + 1] * (L - len(m)) for m in inp["step_maps"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SFT_SEED)
        ext, p_mask, tok_idx, labels = ns["collect_training_data"](inp["ids"].clone(), step_maps)
    ns["model"] = model
    model.zero_grad(set_to_none=True)
    loss = ns["forward_process"](ext, p_mask, tok_idx, labels)
    loss.backward()
    return {"ext": ext, "p_mask": p_mask, "loss": loss.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


# ---- our side -----------------------------------------------------------------------------------------------
def our_passes(inp: dict, shrink: int) -> list[tuple[int, int]]:
    """Our (completion, pass) pairs that score something, in their row order (completion-major)."""
    from rl.block_diffusion import block_ids, block_trace_groups, real_positions

    valid = real_positions(inp["attention_mask"], len(PROMPT_LENS), P + L, P)
    group, k = block_trace_groups(padded_trace(inp["step_maps"]), block_ids(valid, P, BLOCK)[:, P:], shrink)
    scored = (group.unsqueeze(0) == torch.arange(k).view(k, 1, 1)) & inp["response"]
    return [(b, s) for b in range(group.shape[0]) for s in range(k) if bool(scored[s, b].any())]


def our_rl(models: dict, inp: dict, shrink: int, *, old_float32: bool = True) -> dict:
    """Our block_trace_logprobs under the rollout and current policies and tracerl_block_loss (their
    normalisation) with its gradient; old log-probs rounded to float32 as they store them."""
    from rl.block_diffusion import block_trace_logprobs, tracerl_block_loss

    trace, kw = padded_trace(inp["step_maps"]), dict(mask_id=MASK_ID, prompt_len=P, block_length=BLOCK, shrink=shrink,
                                                     attention_mask=inp["attention_mask"], scored=inp["response"])
    with torch.no_grad():
        old, group = block_trace_logprobs(models["old"], inp["ids"], trace, **kw)
    old_in = old.float().double() if old_float32 else old
    policy = models["policy"]
    policy.zero_grad(set_to_none=True)
    logp, _ = block_trace_logprobs(policy, inp["ids"], trace, **kw)
    loss = tracerl_block_loss(logp, old_in, torch.tensor(ADVANTAGES, dtype=torch.float64), group, inp["response"],
                              epsilon=EPS, beta=BETA, use_kl_estimator_k3=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    per_pass = {}
    with torch.no_grad():
        for b, s in our_passes(inp, shrink):
            sel = (group[b:b + 1] == s) & inp["response"][b:b + 1]
            per_pass[(b, s)] = tracerl_block_loss(logp[b:b + 1].detach(), old_in[b:b + 1], torch.tensor(ADVANTAGES[b:b + 1],
                                                  dtype=torch.float64), group[b:b + 1], sel, epsilon=EPS, beta=BETA)
    return {"old": old, "policy": logp.detach(), "group": group, "loss": loss.detach(), "grads": grads,
            "per_pass": per_pass}


def our_sft(model, inp: dict) -> dict:
    """Our block_diffusion_sft_loss with noise drawn from a generator seeded SFT_SEED."""
    from rl.block_diffusion import block_diffusion_sft_loss, draw_block_sft_noise

    p, masked = draw_block_sft_noise((len(PROMPT_LENS), L), torch.Generator().manual_seed(SFT_SEED),
                                     lower_p=LOWER_P, upper_p=UPPER_P)
    model.zero_grad(set_to_none=True)
    loss = block_diffusion_sft_loss(model, inp["ids"], inp["response"], mask_id=MASK_ID, prompt_len=P, block_length=BLOCK,
                                    attention_mask=inp["attention_mask"], noise=(p, masked))
    loss.backward()
    return {"masked": masked, "loss": loss.detach(),
            "grads": {n: q.grad.detach().clone() for n, q in model.named_parameters()}}


def our_sft_trace(model, inp: dict, shrink: int) -> torch.Tensor:
    """Their SFT ``trace`` method in our terms: the trace passes, -sum log p / L per pass, mean over passes."""
    from rl.block_diffusion import block_trace_logprobs

    logp, group = block_trace_logprobs(model, inp["ids"], padded_trace(inp["step_maps"]), mask_id=MASK_ID, prompt_len=P,
                                       block_length=BLOCK, shrink=shrink, attention_mask=inp["attention_mask"],
                                       scored=inp["response"])
    return -logp.sum() / L / len(our_passes(inp, shrink))


def _grad_diff(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a), max(float(a[k].abs().max()) for k in a)


def grad_summary(grads: dict) -> dict:
    names = sorted(grads)[:FIXTURE_PARAMS]
    return {"grad_sums": {k: float(grads[k].sum()) for k in names},
            "grad_norm": float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))}


# ---- the comparison ---------------------------------------------------------------------------------------
def run(repo: pathlib.Path) -> tuple[list[tuple[str, float, bool]], dict]:
    from rl.block_diffusion import block_diffusion_input

    models, inp = build_models(), build_inputs()
    rows: list[tuple[str, float, bool]] = []
    record: dict = {}
    trace = padded_trace(inp["step_maps"])
    for shrink in SHRINKS:
        tag = f"TraceRL shrink={shrink}"
        theirs, ours = authors_rl(repo, models, inp, shrink), our_rl(models, inp, shrink)
        pairs = our_passes(inp, shrink)
        same_n = len(pairs) == theirs["ext"].shape[0]
        bad_ids = bad_pm = bad_attn = bad_pos = 10 ** 6
        if same_n:
            bad_ids = bad_pm = bad_attn = bad_pos = 0
            for r, (b, s) in enumerate(pairs):
                x = block_diffusion_input(inp["ids"][b:b + 1], ours["group"][b:b + 1] >= s, MASK_ID, prompt_len=P,
                                          block_length=BLOCK, attention_mask=inp["attention_mask"][b:b + 1])
                assert x.copy_start == P
                pm = torch.cat([torch.zeros(P, dtype=torch.bool), (ours["group"][b] == s) & inp["response"][b]])
                real = torch.cat([inp["attention_mask"][b].bool(), torch.ones(2 * L, dtype=torch.bool)])
                bad_ids += int((x.input_ids[0] != theirs["ext"][r]).sum())
                bad_pm += int((pm != theirs["p_mask"][r]).sum())
                bad_attn += int((x.attention_mask[0, 0] != theirs["attn"][r, 0].bool()).sum())
                bad_pos += int((x.position_ids[0] != theirs["tok_idx"][r])[real].sum())
        rows.append((f"{tag}: {len(pairs)} passes (theirs {theirs['ext'].shape[0]}), noisy [x0, xt] inputs (mismatches)",
                     float(bad_ids), bad_ids == 0))
        rows.append((f"{tag}: scored sets p_mask (mismatches)", float(bad_pm), bad_pm == 0))
        rows.append((f"{tag}: 4D attention masks incl. process_pad (mismatches)", float(bad_attn), bad_attn == 0))
        rows.append((f"{tag}: position ids at real tokens (mismatches)", float(bad_pos), bad_pos == 0))
        if not same_n:
            continue
        pm = theirs["p_mask"][:, P:]
        for what in ("old", "policy"):
            mine = torch.stack([ours[what][b] * ((ours["group"][b] == s) & inp["response"][b]) for b, s in pairs])
            d = float((mine - theirs[what][:, P:].double())[pm].abs().max())
            rows.append((f"{tag}: {what} per-token log-probs (theirs stored in float32)", d, d <= 1e-6))
        d = max(abs(float(ours["per_pass"][p] - theirs["per_row"][r])) for r, p in enumerate(pairs))
        rows.append((f"{tag}: per-pass loss (surrogate sum / L + beta k3 sum / L)", d, d <= 1e-12))
        d = abs(float(ours["loss"] - theirs["loss"]))
        rows.append((f"{tag}: loss (mean over passes)", d, d <= 1e-12 * max(1.0, abs(float(theirs["loss"])))))
        gd, gs = _grad_diff(theirs["grads"], ours["grads"])
        rows.append((f"{tag}: gradient (max |grad| {gs:.2e})", gd, gd <= 1e-12 * max(1.0, gs)))
        d = abs(float(our_rl(models, inp, shrink, old_float32=False)["loss"] - theirs["loss"]))
        rows.append((f"{tag}: loss with float64 old log-probs vs their float32 storage [shown]", d, True))
        if shrink == RECORD_SHRINK:
            record["tracerl"] = {
                "shrink": shrink, "passes": [list(p) for p in pairs],
                "noisy_inputs": theirs["ext"].tolist(), "p_mask": theirs["p_mask"].int().tolist(),
                "old_float32": (theirs["old"][:, P:] * pm).tolist(), "per_pass_loss": theirs["per_row"].tolist(),
                "loss": float(theirs["loss"]), **grad_summary(theirs["grads"])}
    # SFT, semi-ar
    policy = models["policy"]
    theirs, ours = authors_sft(repo, policy, inp, "semi-ar"), our_sft(policy, inp)
    same_rows = theirs["ext"].shape[0] == len(PROMPT_LENS)
    bad = int((theirs["ext"][:, P + L:] != torch.where(ours["masked"], MASK_ID, inp["ids"][:, P:])).sum()) if same_rows else 10 ** 6
    rows.append(("SFT semi-ar: masks from seed 10086, theirs (global RNG) vs ours (generator) (mismatches)",
                 float(bad), bad == 0))
    bad = int((theirs["p_mask"][:, P:] != (ours["masked"] & inp["response"])).sum()) if same_rows else 10 ** 6
    rows.append(("SFT semi-ar: scored sets (post_num 0: padding unscored) (mismatches)", float(bad), bad == 0))
    d = abs(float(theirs["loss"] - ours["loss"]))
    rows.append(("SFT semi-ar: loss (sum over masked / L, mean over rows)", d, d <= 1e-12))
    gd, gs = _grad_diff(theirs["grads"], ours["grads"])
    rows.append((f"SFT semi-ar: gradient (max |grad| {gs:.2e})", gd, gd <= 1e-12 * max(1.0, gs)))
    record["sft"] = {"seed": SFT_SEED, "masked_tail": theirs["ext"][:, P + L:].eq(MASK_ID).int().tolist(),
                     "p_mask": theirs["p_mask"].int().tolist(), "loss": float(theirs["loss"]),
                     **grad_summary(theirs["grads"])}
    # SFT, trace
    for shrink in (1, 2):
        theirs = authors_sft(repo, policy, inp, "trace", shrink)
        with torch.no_grad():
            mine = our_sft_trace(policy, inp, shrink)
        d = abs(float(theirs["loss"] - mine))
        rows.append((f"SFT trace shrink={shrink}: loss ({theirs['ext'].shape[0]} rows)", d, d <= 1e-12))
    record.update({
        "about": "Gen-Verse/dLLM-RL (commit 10b4fd1) train/rl_sdar.py and train/sft_sdar.py on these inputs, "
                 "scripts/check_block_diffusion_reference.py",
        "model": {**MODEL, "seeds": SEEDS}, "block_length": BLOCK, "prompt_len": P, "epsilon": EPS, "beta": BETA,
        "lower_p": LOWER_P, "upper_p": UPPER_P, "pad_id": PAD_ID, "mask_id": MASK_ID,
        "sequences": inp["ids"].tolist(), "attention_mask": inp["attention_mask"].tolist(),
        "step_maps": inp["step_maps"], "trace": trace.tolist(), "advantages": ADVANTAGES})
    return rows, record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", type=pathlib.Path, required=True, help="the dLLM-RL checkout (or a folder holding dLLM-RL/)")
    ap.add_argument("--write-fixture", action="store_true", help=f"also write {FIXTURE.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    rows, record = run(args.refs)
    failed = 0
    print(f"{'compared':<100} {'max |diff|':>11}  ok")
    for what, diff, ok in rows:
        print(f"{what:<100} {diff:>11.3e}  {'yes' if ok else 'NO'}")
        failed += not ok
    if args.write_fixture:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(record, separators=(",", ":")) + "\n")
        print(f"wrote {FIXTURE.relative_to(ROOT)}")
    print("all equal" if not failed else f"{failed} mismatch(es)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
