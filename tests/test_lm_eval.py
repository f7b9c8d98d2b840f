"""lm-evaluation-harness integration (recipes/lm_eval.py, docs/lm_eval.md): the `dllm-rl` model on the
tiny checkpoint with the local tasks in tests/fixtures/lm_eval, offline.

- the Monte-Carlo log-likelihood: LLaDA's formula on fixed masks (with and without CFG), its draw of
  the masked-token counts, exact unbiasedness for the ELBO by enumeration, the ELBO below the
  model's exact likelihood, equal to it for a factorised model, and MC convergence;
- is_greedy against LLaDA's suffix_greedy_prediction;
- generate_until token-exact with the rollout engine in every sampler mode, stop strings, request
  gen_kwargs, chat templates;
- lm_eval.simple_evaluate end to end on the four local tasks, and the documented CLI command.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl.config import RolloutOptions
from rl.estimators import MaskSample
from rollout import PolicyAdapter, build_rollout_engine, build_tiny_policy
from rollout.prompts import left_pad

try:
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    import recipes.lm_eval as lme
    MISSING = None
except ImportError as e:
    MISSING = f"lm-eval is not installed ({e}): pip install -e '.[lmeval]' (lm-eval==0.4.13)"

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["dllm_rl_tiny_gen", "dllm_rl_tiny_mc", "dllm_rl_tiny_cloze", "dllm_rl_tiny_rolling"]


@pytest.fixture(autouse=True)
def _needs_lm_eval():
    """Every test here fails (never skips) without the extra: CI installs it."""
    if MISSING:
        pytest.fail(MISSING, pytrace=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny model (seed 0) and its tokenizer, saved as a checkpoint folder."""
    path = tmp_path_factory.mktemp("lm_eval") / "tiny"
    build_tiny_policy(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def cli_run(request, checkpoint, tmp_path_factory):
    """test_cli_command's subprocess, started with the module so that its imports and lm-eval's index
    of its ~14k built-in task files overlap the in-process tests (test_cli_command waits for it)."""
    if MISSING or not any(item.name == "test_cli_command" for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(folder / "datasets")}  # not shared with the tests running meanwhile
    cmd = [sys.executable, "-m", "recipes.lm_eval", "--model", "dllm-rl", "--model_args",
           f"pretrained={checkpoint},gen_length=8,block_length=8,steps=8,mc_num=2,threads=1",
           "--tasks", "dllm_rl_tiny_gen,dllm_rl_tiny_mc", "--include_path", "tests/fixtures/lm_eval",
           "--limit", "2", "--batch_size", "2", "--output_path", str(folder / "out")]
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    yield SimpleNamespace(proc=proc, dir=folder)
    if proc.poll() is None:  # the test did not run to the end: stop the process this fixture started
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def policy(checkpoint) -> PolicyAdapter:
    return PolicyAdapter.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def lm(checkpoint):
    return lme.DLLMEvalHarness(pretrained=str(checkpoint), gen_length=16, block_length=8, steps=16, mc_num=8,
                               batch_size=4, device="cpu")


@pytest.fixture
def at_root(monkeypatch):
    """The task files name their data relative to the repository root."""
    monkeypatch.chdir(ROOT)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text)


# ---- the Monte-Carlo estimator ----------------------------------------------------------------------

def _logits(adapter, x: torch.Tensor, prompt_len: int, cfg: float) -> torch.Tensor:
    """LLaDA's get_logits: the model's logits, with unsupervised CFG on the prompt-masked copy."""
    if cfg == 0:
        return adapter(x).logits
    un = x.clone()
    un[:, :prompt_len] = adapter.mask_token_id
    cond, uncond = adapter(torch.cat([x, un])).logits.chunk(2)
    return uncond + (cfg + 1) * (cond - uncond)


def llada_loglikelihood(adapter, prefix, target, masks, cfg=0.0) -> float:
    """LLaDA eval_llada.py get_loglikelihood on the given masks [K, L] (its loss: cross-entropy of the
    masked tokens / p_mask, summed per pass, averaged over the passes, negated)."""
    seq = torch.tensor([prefix + target])
    p, l = len(prefix), len(target)
    losses = []
    with torch.no_grad():
        for m in masks:
            full = torch.cat([torch.zeros(p, dtype=torch.bool), m])[None]
            noisy = torch.where(full, adapter.mask_token_id, seq)
            logits = _logits(adapter, noisy, p, cfg).float()
            p_mask = m.sum() / l
            losses.append((F.cross_entropy(logits[full], seq[full], reduction="none") / p_mask).sum())
    return -float(torch.stack(losses).mean())


def _sample(masks: torch.Tensor, prompt_len: int) -> MaskSample:
    k, l = masks.shape
    counts = masks.sum(-1, keepdim=True).float()
    full = torch.cat([torch.zeros(k, prompt_len, dtype=torch.bool), masks], -1)
    return MaskSample(full[:, None], (masks.float() * l / counts)[:, None])


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_estimate_equals_llada_formula_on_fixed_masks(policy, cfg):
    tok = policy.tokenizer
    prefix, target = _ids(tok, "Q: 2 + 2\nA:"), _ids(tok, " 4, yes")
    g = torch.Generator().manual_seed(0)
    counts = lme.llada_mask_counts(len(target), 6, g)
    masks = torch.stack([torch.randperm(len(target), generator=g) < c for c in counts])
    ours = lme.estimate_loglikelihood(policy, prefix, target, mc_num=6, batch_size=4, cfg=cfg,
                                      sample=_sample(masks, len(prefix)))
    assert ours == pytest.approx(llada_loglikelihood(policy, prefix, target, masks, cfg), rel=1e-5, abs=1e-4)


def test_mask_counts_follow_llada_and_are_uniform():
    for length, n in [(8, 4), (7, 3), (12, 5), (3, 8), (1, 4), (10, 10)]:
        for k in range(1, length + 1):
            ours = lme.spread_counts(k, length, n)
            # LLaDA's _forward_process, wherever its float rounding has no .5 tie
            x = torch.round(torch.linspace(float(k), k + (n - 1) * (length / n), steps=n)).long()
            llada = ((x - 1) % length) + 1
            ties = torch.tensor([(2 * i * length) % (2 * n) == n for i in range(n)])
            assert torch.equal(ours[~ties], llada[~ties])
            assert ours.min() >= 1 and ours.max() <= length
        # every pass's count is exactly uniform over 1..L when k is
        table = torch.stack([lme.spread_counts(k, length, n) for k in range(1, length + 1)])
        for col in table.T:
            assert sorted(col.tolist()) == list(range(1, length + 1))
    # (LLaDA's half-to-even float rounding is not: L = 3, batch 2 gives the second pass l in {1, 1, 2})
    llada = [int(((torch.round(torch.linspace(float(k), k + 1.5, steps=2)).long() - 1) % 3 + 1)[1]) for k in (1, 2, 3)]
    assert sorted(llada) == [1, 1, 2] and sorted(int(lme.spread_counts(k, 3, 2)[1]) for k in (1, 2, 3)) == [1, 2, 3]
    # masks: exactly l of the L tokens, weights L / l, the prompt never masked
    g = torch.Generator().manual_seed(1)
    est = lme.LLaDAElbo(n_samples=10, max_batch=4)
    s = est.draw(None, torch.ones(1, 6, dtype=torch.long), 3, g)
    assert not s.masked[:, :, :3].any()
    n_masked = s.masked[:, 0, 3:].sum(-1)
    assert torch.allclose(s.weights[:, 0].sum(-1), torch.full((10,), 6.0))  # l tokens x L / l
    assert set(n_masked.tolist()) <= set(range(1, 7))


def _conditionals(adapter, prefix, target) -> dict:
    """log p(y_i | context, y outside m) for every non-empty mask m of the target (float64)."""
    p, l = len(prefix), len(target)
    seq = torch.tensor([prefix + target])
    out = {}
    with torch.no_grad():
        for r in range(1, l + 1):
            for m in itertools.combinations(range(l), r):
                x = seq.clone()
                x[0, [p + i for i in m]] = adapter.mask_token_id
                logp = torch.log_softmax(adapter(x).logits[0, p:].double(), -1)
                out[frozenset(m)] = {i: float(logp[i, target[i]]) for i in m}
    return out


def _exact(cond: dict, l: int, batch: int):
    """(ELBO by orders, E[estimate] over LLaDA's draw, E[single pass], E[single pass^2], log p_gen)."""
    def f(size):  # mean over masks of that size of (L / l) sum log p
        vals = [(l / size) * sum(c.values()) for m, c in cond.items() if len(m) == size]
        return sum(vals) / len(vals), sum(v * v for v in vals) / len(vals)

    elbo_orders, probs = 0.0, []
    for order in itertools.permutations(range(l)):
        left, logp = set(range(l)), 0.0
        for i in order:
            logp += cond[frozenset(left)][i]
            left.discard(i)
        elbo_orders += logp
        probs.append(math.exp(logp))
    n_orders = math.factorial(l)
    expected = sum(f(int(c))[0] for k in range(1, l + 1) for c in lme.spread_counts(k, l, batch)) / (l * batch)
    first = sum(f(s)[0] for s in range(1, l + 1)) / l
    second = sum(f(s)[1] for s in range(1, l + 1)) / l
    return elbo_orders / n_orders, expected, first, second, math.log(sum(probs) / n_orders)


def test_estimator_is_unbiased_for_the_elbo_and_lower_bounds_the_likelihood(policy):
    tok = policy.tokenizer
    prefix, target = _ids(tok, "Q: 1 + 6\nA:"), _ids(tok, " 7!")
    cond = _conditionals(policy, prefix, target)
    elbo, expected, first, second, log_p = _exact(cond, len(target), batch=4)
    # exactly unbiased (the counts are exactly uniform), the ELBO = the any-order AR expectation
    assert expected == pytest.approx(elbo, abs=1e-9)
    assert first == pytest.approx(elbo, abs=1e-9)
    assert elbo < log_p  # Jensen: a strict lower bound of the random-order sampler's likelihood
    # Monte-Carlo convergence: within 4 standard errors (iid bound; stratification only lowers it)
    n = 2048
    se = math.sqrt((second - first ** 2) / n)
    est = lme.estimate_loglikelihood(policy, prefix, target, mc_num=n, batch_size=256,
                                     generator=torch.Generator().manual_seed(0))
    assert abs(est - elbo) < 4 * se + 1e-4


class Factorised(nn.Module):
    """A 'model' whose prediction at each position ignores the input: its likelihood is exact."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[None, :input_ids.shape[1]].expand(input_ids.shape[0], -1, -1))


def test_estimator_converges_to_the_exact_loglikelihood_of_a_factorised_model():
    torch.manual_seed(0)
    vocab, prefix, target = 11, [1, 2, 3], [4, 7, 0, 9]
    adapter = PolicyAdapter(Factorised(torch.randn(7, vocab) * 2), mask_token_id=10).eval()
    logp = torch.log_softmax(adapter.model.table.detach().double(), -1)
    exact = float(sum(logp[3 + i, t] for i, t in enumerate(target)))
    cond = _conditionals(adapter, prefix, target)
    elbo, expected, first, second, log_p = _exact(cond, len(target), batch=3)
    assert elbo == pytest.approx(exact, abs=1e-9) and log_p == pytest.approx(exact, abs=1e-9)
    assert expected == pytest.approx(exact, abs=1e-9)
    n = 4096
    est = lme.estimate_loglikelihood(adapter, prefix, target, mc_num=n, batch_size=128,
                                     generator=torch.Generator().manual_seed(0))
    assert abs(est - exact) < 4 * math.sqrt((second - first ** 2) / n) + 1e-4


# ---- is_greedy ------------------------------------------------------------------------------------

def llada_suffix_greedy(adapter, prefix, length, cfg=0.0) -> list[int]:
    """LLaDA's suffix_greedy_prediction loop (one token per step, the most confident masked position),
    with our sampler's one documented difference: the mask token is never proposed."""
    mask_id = adapter.mask_token_id
    seq = torch.full((1, len(prefix) + length), mask_id)
    seq[0, :len(prefix)] = torch.tensor(prefix)
    with torch.no_grad():
        for _ in range(length):
            where = seq == mask_id
            logits = _logits(adapter, seq, len(prefix), cfg)[where].float()
            p = torch.softmax(logits, -1)
            x0 = logits.masked_fill(torch.arange(logits.shape[-1]) == mask_id, float("-inf")).argmax(-1)
            confidence = p.gather(-1, x0[:, None])[:, 0]
            keep = torch.full_like(x0, mask_id)
            top = confidence.argmax()
            keep[top] = x0[top]
            seq[where] = keep
    return seq[0, len(prefix):].tolist()


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_is_greedy_matches_llada_suffix_greedy_prediction(policy, cfg):
    tok = policy.tokenizer
    engine = build_rollout_engine(RolloutOptions(gen_length=8, block_length=8, steps=8), policy)
    for text in ("Q: 2 + 2\nA:", "the cat sat on the"):
        prefix = _ids(tok, text)
        greedy = llada_suffix_greedy(policy, prefix, 5, cfg)
        assert lme.is_greedy(engine, prefix, greedy, cfg)
        for i in (0, 2, 4):
            other = list(greedy)
            other[i] = _ids(tok, "z")[0] if greedy[i] != _ids(tok, "z")[0] else _ids(tok, "y")[0]
            assert not lme.is_greedy(engine, prefix, other, cfg)


# ---- generate_until -------------------------------------------------------------------------------

PROMPTS = ["Q: 2 + 2\nA:", "Q: 3 + 5 = ?\nA:", "hello"]
MODES = {
    "baseline": {},
    "threshold": {"threshold": 0.3},
    "kv_prefix": {"kv_cache": "prefix"},
    "kv_dual_lookahead": {"kv_cache": "dual", "cache_lookahead": 2},
    "early_commit": {"early_commit": 0.2},
    "fill_after_eos": {"fill_after_eos": True, "threshold": 0.5},
    "entropy": {"remasking": "entropy"},
    "random_remasking": {"remasking": "random"},
    "temperature": {"temperature": 0.8},
    "cfg": {"cfg_scale": 0.5},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_generate_until_is_the_rollout_engine(checkpoint, policy, mode):
    """Token-exact with engine.generate on the same left-padded batch and options, every sampler mode."""
    args = {"gen_length": 16, "block_length": 8, "steps": 8, **MODES[mode]}
    model = lme.DLLMEvalHarness.create_from_arg_string(
        f"pretrained={checkpoint}," + ",".join(f"{k}={v}" for k, v in args.items()), {"batch_size": 3, "device": "cpu"})
    reqs = [Instance("generate_until", {}, (p, {"until": [], "do_sample": False}), i) for i, p in enumerate(PROMPTS)]
    got = model.generate_until(reqs)
    options = RolloutOptions(**args)
    tok = policy.tokenizer
    ids, mask = left_pad([tok.encode(p) for p in PROMPTS], tok.pad_token_id)
    g = lme._generator(lme.request_seed(model.seed, ids.tolist(), repr(model.options)))
    rollout = build_rollout_engine(options, policy).generate(ids, mask, options=options, generator=g)
    assert got == rollout.decode(tok)
    assert model.generate_until(reqs) == got  # reproducible


def test_generate_until_stop_strings_and_request_options(checkpoint, policy):
    tok = policy.tokenizer
    # block_length from model_args, gen_length / steps from the request: 6 tokens -> 2 blocks of 4, 2 steps each
    model = lme.DLLMEvalHarness(pretrained=str(checkpoint), block_length=4, steps=128, device="cpu", batch_size=2)
    opts, cut, until = model.request_options({"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False})
    assert (opts.gen_length, opts.block_length, opts.steps, opts.temperature, cut) == (8, 4, 4, 0.0, 6)
    assert until == ["\n\n", "<|eos|>"]
    opts, _, _ = model.request_options({"max_new_tokens": 3, "temperature": 0.7, "do_sample": True, "threshold": 0.9})
    assert (opts.gen_length, opts.steps, opts.temperature, opts.threshold) == (4, 2, 0.7, 0.9)
    # model_args win over the request
    fixed = lme.DLLMEvalHarness(pretrained=str(checkpoint), gen_length=16, block_length=8, steps=8, temperature=0.0,
                                device="cpu")
    opts, cut, _ = fixed.request_options({"max_gen_toks": 100, "temperature": 1.0, "do_sample": True})
    assert (opts.gen_length, opts.steps, opts.temperature, cut) == (16, 8, 0.0, None)

    engine = build_rollout_engine(RolloutOptions(gen_length=8, block_length=4, steps=4), policy)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    raw = engine.generate(ids).completion_ids[0].tolist()
    text6 = tok.decode(raw[:6], skip_special_tokens=True)
    [got] = model.generate_until([Instance("generate_until", {}, (PROMPTS[0], {"until": [], "max_gen_toks": 6}), 0)])
    assert got == text6  # cut to max_gen_toks
    stop = text6[2]
    req = Instance("generate_until", {}, (PROMPTS[0], {"until": [stop], "max_gen_toks": 6}), 0)
    [got] = model.generate_until([req])
    assert got == text6.split(stop)[0] and len(got) < len(text6)


def test_model_args_are_typed_and_validated(checkpoint):
    model = lme.DLLMEvalHarness.create_from_arg_string(
        f"pretrained={checkpoint},gen_length=16,block_length=8,steps=4,temperature=0,threshold=none,kv_cache=dual,"
        "cache_lookahead=2,fill_after_eos=true,vllm.max_num_seqs=8,mc_num=4,cfg=0.5,batch_size=2,max_length=64",
        {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    o = model.options
    assert (o.gen_length, o.steps, o.temperature, o.threshold, o.kv_cache, o.cache_lookahead, o.fill_after_eos) == \
        (16, 4, 0.0, None, "dual", 2, True)
    assert isinstance(o.temperature, float) and o.vllm.max_num_seqs == 8
    assert o.cfg_scale == 0.5  # cfg guides generation too unless cfg_scale is given
    assert (model.batch_size, model.mc_num, model.cfg, model.max_length) == (2, 4, 0.5, 64)  # model_args win
    bad = {"steps=5": "steps=5", "temperature=abc": "temperature", "nope=1": "unknown key", "kv_cache=x": "kv_cache",
           "batch_size=auto": "batch_size", "vllm.nope=1": "vllm.nope", "gen_length=12": "gen_length=12",
           "prompt_special_tokens=true": "add_bos_token", "mc_num=0": "mc_num",
           "fill_after_eos=maybe": "fill_after_eos"}
    for arg, words in bad.items():
        with pytest.raises(ValueError, match=words):
            lme.DLLMEvalHarness.create_from_arg_string(f"pretrained={checkpoint},gen_length=16,block_length=8,{arg}",
                                                       {"device": "cpu"})


# ---- log-likelihood requests ----------------------------------------------------------------------

def test_loglikelihood_requests(lm, policy):
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in
            enumerate([("Q: 2 + 2\nA:", " 4"), ("the cat sat on the ", "mat"), ("", "abc")])]
    out = lm.loglikelihood(reqs)
    assert all(isinstance(ll, float) and ll < 0 and isinstance(g, bool) for ll, g in out)
    assert lm.loglikelihood(reqs[::-1]) == out[::-1]  # seeded by content, not by order
    # the trailing space moves to the continuation (lm-eval's encoding); the empty context is BOS
    ctx, cont = lm._encode_pair("the cat sat on the ", "mat")
    assert out[1][0] == lm.loglikelihood_tokens(ctx, cont)
    bos = policy.tokenizer.bos_token_id
    assert out[2][0] == lm.loglikelihood_tokens([bos], _ids(policy.tokenizer, "abc"))


def test_loglikelihood_rolling_sums_windows(checkpoint, policy):
    model = lme.DLLMEvalHarness(pretrained=str(checkpoint), mc_num=4, batch_size=4, max_length=8, device="cpu")
    tok, text = policy.tokenizer, "abcdefghijklmnopq"
    [got] = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = _ids(tok, text)
    windows = list(map(lme.lm_utils.make_disjoint_window, lme.lm_utils.get_rolling_token_windows(
        token_list=ids, prefix_token=tok.bos_token_id, max_seq_len=7, context_len=1)))
    assert len(windows) == 3 and sum(len(w[1]) for w in windows) == len(ids)
    assert all(len(c) + len(x) <= 8 for c, x in windows)
    assert got == pytest.approx(sum(model.loglikelihood_tokens(c, x) for c, x in windows))


# ---- lm-eval end to end ---------------------------------------------------------------------------

def test_simple_evaluate_end_to_end(checkpoint, policy, at_root):
    tok = policy.tokenizer
    options = RolloutOptions(gen_length=16, block_length=8, steps=16)
    engine = build_rollout_engine(options, policy)
    rows = [json.loads(line) for line in (FIXTURES / "data" / "qa.jsonl").read_text().splitlines()]
    raw = [engine.generate(torch.tensor([tok.encode(f"Q: {r['question']}\nA:")])).decode(tok)[0] for r in rows]
    stop = raw[0][len(raw[0]) // 2]  # a stop string that cuts the first completion
    res = lm_eval.simple_evaluate(
        model="dllm-rl", model_args=f"pretrained={checkpoint},gen_length=16,block_length=8,steps=16,mc_num=4",
        tasks=TASKS, task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False), batch_size=1,
        device="cpu", log_samples=True, bootstrap_iters=0, gen_kwargs={"until": [stop, "\n"]})
    results = res["results"]
    assert set(TASKS) <= set(results)
    assert 0 <= results["dllm_rl_tiny_gen"]["exact_match,none"] <= 1
    assert 0 <= results["dllm_rl_tiny_mc"]["acc,none"] <= 1 and "acc_norm,none" in results["dllm_rl_tiny_mc"]
    assert results["dllm_rl_tiny_cloze"]["perplexity,none"] > 1 and "acc,none" in results["dllm_rl_tiny_cloze"]
    assert results["dllm_rl_tiny_rolling"]["word_perplexity,none"] > 1
    assert res["config"]["model"] == "dllm-rl" and res["config"]["rollout_options"]["gen_length"] == 16

    samples = sorted(res["samples"]["dllm_rl_tiny_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    for s, r, text in zip(samples, rows, raw):
        context, gen_kwargs = s["arguments"][0]
        assert context == f"Q: {r['question']}\nA:" and gen_kwargs["until"] == [stop, "\n"]
        assert s["resps"][0][0] == text.split(stop)[0].split("\n")[0]  # token-exact, then cut
    assert samples[0]["resps"][0][0] == raw[0].split(stop)[0] != raw[0]

    lm = lme.DLLMEvalHarness(pretrained=str(checkpoint), mc_num=4, batch_size=1, device="cpu")  # as the run
    for s in res["samples"]["dllm_rl_tiny_mc"] + res["samples"]["dllm_rl_tiny_cloze"]:
        for (context, continuation), [(ll, greedy)] in zip(s["arguments"], s["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            assert ll == pytest.approx(lm.loglikelihood_tokens(ctx, cont), abs=1e-5)
            assert greedy == (llada_suffix_greedy(policy, ctx, len(cont)) == cont)


def test_apply_chat_template(checkpoint, policy, at_root):
    res = lm_eval.simple_evaluate(
        model="dllm-rl", model_args=f"pretrained={checkpoint},gen_length=8,block_length=8,steps=8",
        tasks=["dllm_rl_tiny_gen"], task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False),
        device="cpu", batch_size=1, log_samples=True, bootstrap_iters=0, limit=2, apply_chat_template=True)
    tok = policy.tokenizer
    engine = build_rollout_engine(RolloutOptions(gen_length=8, block_length=8, steps=8), policy)
    for s in res["samples"]["dllm_rl_tiny_gen"]:
        context = s["arguments"][0][0]
        assert context.startswith("<|bos|><|user|>Q: ") and context.endswith("<|assistant|>")
        ids = tok.encode(context)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        expected = engine.generate(torch.tensor([ids])).decode(tok)[0].split("\n")[0]
        assert s["resps"][0][0] == expected
    assert res["config"]["model"] == "dllm-rl"


def test_cli_command(cli_run):
    """The documented command: python -m recipes.lm_eval <lm_eval's arguments>, offline."""
    rc = cli_run.proc.wait(timeout=300)
    stdout, stderr = (cli_run.dir / "stdout.txt").read_text(), (cli_run.dir / "stderr.txt").read_text()
    assert rc == 0, stderr[-3000:]
    assert "dllm_rl_tiny_gen" in stdout and "exact_match" in stdout and "acc" in stdout
    [result_file] = (cli_run.dir / "out").rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert {"dllm_rl_tiny_gen", "dllm_rl_tiny_mc"} <= set(results)
