"""scripts/bench_frontier.py and its task (scripts/count_up.py: addition by counting up, worked lines)."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_frontier as bf  # noqa: E402
import count_up as task  # noqa: E402


def test_worked_example():
    ex = task.make_example(3998, 3, 4)
    assert ex.prompt == "03:03998" and ex.answer == "4001" and (ex.number, ex.count) == (3998, 3)
    assert ex.completion == "02:03999\n01:04000\n00:04001\n=4001"
    assert task.is_correct(ex.completion, ex) and task.steps_consistent(ex.completion, ex)


@pytest.mark.parametrize("digits,counts", [(1, (1, 1)), (3, (2, 9)), (4, (8, 24)), (6, (90, 99))])
def test_generated_problems_verify(digits, counts):
    for ex in task.sample(random.Random(0), 200, digits, counts):
        number, count = ex.number, ex.count
        assert ex.prompt == f"{count:02d}:{number:0{digits + 1}d}"
        assert len(str(number)) == digits and counts[0] <= count <= counts[1]
        assert int(ex.answer) == number + count and task.final_answer(ex.completion) == ex.answer
        assert task.steps_consistent(ex.completion, ex)
        lines = ex.completion.splitlines()
        assert len(lines) == count + 1 and {len(ln) for ln in [ex.prompt, *lines[:-1]]} == {digits + 4}
        assert len(ex.completion) == count * (digits + 5) + 1 + len(ex.answer)


def test_wrong_steps_and_answers_are_caught():
    ex = task.make_example(58, 3, 2)
    good = ex.completion
    assert ex.prompt == "03:058" and good == "02:059\n01:060\n00:061\n=61"
    for bad in (good.replace("060", "050"),  # a carry dropped
                good.replace("01:", "00:"),  # the countdown skips
                good.replace("059", "59"),  # not zero-padded
                good.replace("=61", "=62"),  # the sum is not the last value
                "02:059\n00:061\n=61"):  # a step missing
        assert not task.steps_consistent(bad, ex)
    assert not task.is_correct(good.replace("=61", "=60"), ex)
    assert task.final_answer("no answer here") is None and task.final_answer("") is None
    assert task.is_correct("garbage\n=61\n", ex)  # accuracy reads only the stated sum


def test_held_out_is_distinct_and_seeded():
    a = task.held_out(3, 300, 2, (1, 9))
    assert len({e.prompt for e in a}) == 300 and a == task.held_out(3, 300, 2, (1, 9))


def test_bad_input():
    for digits, counts in ((0, (1, 5)), (3, (0, 5)), (3, (5, 4)), (3, (5, 100))):
        with pytest.raises(ValueError, match="need digits >= 1"):
            task.sample(random.Random(0), 1, digits, counts)
    with pytest.raises(ValueError, match="does not have 3 digits"):
        task.make_example(42, 3, 3)
    assert task.parse_counts("8-24") == (8, 24) and task.parse_counts("16") == (16, 16)
    with pytest.raises(ValueError, match="counts="):
        task.parse_counts("a-b")
    with pytest.raises(SystemExit, match="--thresholds"):
        bf.main(["--thresholds", "0.5,x"])
    with pytest.raises(SystemExit, match="--counts"):
        bf.main(["--counts", "0-3"])
    with pytest.raises(SystemExit, match="--lookahead"):
        bf.main(["--lookahead", "16,x"])


def test_frontier_bench_smoke(tmp_path, capsys):
    """End to end on a barely trained tiny model: every row present, the reference first with
    ratios 1 to itself, the JSON and the plot written."""
    out = tmp_path / "rows.json"
    bf.main(["--train-steps", "2", "--check-every", "1", "--n-val", "2", "--n-test", "4", "--batch", "2",
             "--digits", "2", "--counts", "2-3", "--gen-length", "32", "--block-length", "16", "--thresholds", "0.9",
             "--json", str(out), "--plot", str(tmp_path / "f.png")])
    rows = json.loads(out.read_text())["rows"]
    names = [r["mode"] for r in rows]
    # the reference, 6 modes without a threshold, 10 with tau=0.9 (caches: prefix, dual, dual + lookahead 16)
    assert names[0] == bf.BASELINE and len(set(names)) == len(names) == 17
    assert "tau=0.9 + dual cache, lookahead 16 + EOS fill" in names
    assert rows[0]["x_tps"] == rows[0]["x_nfe"] == 1 and rows[0]["delta"] == 0 and rows[0]["agree"] == 1
    assert all(r["n"] == 4 for r in rows) and (tmp_path / "f.png").stat().st_size > 0
    assert "goal (>= 10x tokens/s" in capsys.readouterr().out


def test_frontier_bench_bert_variant_has_cache_rows(tmp_path, capsys):
    """The tiny model's BERT variant (absolute positions) has the block cache too; ``--lookahead ''``
    drops the lookahead rows."""
    out = tmp_path / "rows.json"
    bf.main(["--arch", "tiny-bert", "--train-steps", "2", "--n-val", "2", "--n-test", "2", "--batch", "2",
             "--digits", "2", "--counts", "2-3", "--gen-length", "16", "--block-length", "16", "--thresholds", "0.9",
             "--lookahead", "", "--json", str(out)])
    data = json.loads(out.read_text())
    names = [r["mode"] for r in data["rows"]]
    assert "BertForMaskedLM" in data["note"] and "tau=0.9 + dual cache + EOS fill" in names
    assert len(names) == 14 and not any("lookahead" in n for n in names)
    bf.main(["--arch", "tiny-bert", "--train-steps", "2", "--n-val", "2", "--n-test", "2", "--batch", "2",
             "--digits", "2", "--counts", "2-3", "--gen-length", "16", "--block-length", "16", "--thresholds", "0.9",
             "--match", r"lookahead 16 \+ EOS fill$", "--json", str(out)])
    names = [r["mode"] for r in json.loads(out.read_text())["rows"]]
    assert names == [bf.BASELINE, "tau=0.9 + dual cache, lookahead 16 + EOS fill"]  # --match keeps the reference


def test_frontier_modes_and_statistics():
    core = bf.build_modes([0.5, 0.9], [0.9], "core", kv_cache=True)
    full = bf.build_modes([0.5, 0.9], [0.9], "all", kv_cache=True)
    assert core[0].kwargs == {} == full[0].kwargs and len(full) == 3 * 3 * 2 * 2
    assert {m.name for m in core} <= {m.name for m in full}
    assert not any("cache" in m.name for m in bf.build_modes([0.9], [0.9], "all", kv_cache=False))
    assert all(m.backend == "vllm" and "kv_cache" not in m.kwargs for m in bf.vllm_modes([0.9], [0.9]))
    # paired differences: the mode fixes 2 of the reference's misses and breaks 1, on 4 problems
    ref = bf.Tally(correct=[True, False, False, True], exact=[False] * 4, nfe=256, batches=1, wall=8.0, cpu=8.0)
    fast = bf.Tally(correct=[True, True, True, False], exact=[False] * 4, nfe=16, batches=1, wall=0.5, cpu=1.0)
    ref.tokens = fast.tokens = [torch.zeros(4, 8, dtype=torch.long)]
    rows = bf.summarize({"ref": ref, "fast": fast}, gen_length=8)
    assert rows[1]["delta"] == pytest.approx(0.25) and rows[1]["se_delta"] == pytest.approx(0.4787, abs=1e-4)
    assert rows[1]["x_tps"] == 16 and rows[1]["x_cpu"] == 8 and rows[1]["x_nfe"] == 16
    assert "MET" in bf.goal_verdict(rows) and "NOT met" in bf.goal_verdict(rows, speed=20)
    assert [r["mode"] for r in bf.pareto(rows)] == ["fast"]


def test_frontier_bench_init_continues_from_a_checkpoint(tmp_path, capsys):
    """``--init`` trains from a saved checkpoint (its weights, not a fresh model's) and saves the result."""
    small = ["--train-steps", "2", "--n-val", "2", "--n-test", "2", "--batch", "2", "--digits", "2", "--counts", "2-3",
             "--gen-length", "16", "--block-length", "16", "--train-only"]
    bf.main([*small, "--save", str(tmp_path / "a")])
    bf.main([*small, "--init", str(tmp_path / "a"), "--save", str(tmp_path / "b")])
    assert f"{tmp_path / 'a'} model trained" in capsys.readouterr().out
    a = bf.PolicyAdapter.from_pretrained(tmp_path / "a")
    b = bf.PolicyAdapter.from_pretrained(tmp_path / "b")
    fresh = bf.build_policy("tiny", 0)
    pa, pb, pf = (dict(m.named_parameters()) for m in (a, b, fresh))
    name = next(n for n in pa if n.endswith("embed_tokens.weight") or "embeddings" in n)
    d_ab, d_fb = (pb[name] - pa[name]).abs().max(), (pb[name] - pf[name]).abs().max()
    assert 0 < d_ab < d_fb  # two more steps from a, not from a fresh model
    with pytest.raises(SystemExit, match="--init .* and --model"):
        bf.main([*small, "--init", str(tmp_path / "a"), "--model", str(tmp_path / "b")])


def test_test_seed_problems_are_never_trained_on(monkeypatch):
    """``--test-seed`` picks the held-out and validation sets; the training stream never samples their prompts."""
    seen = {}

    def fake_train(policy, args, sample, **kw):
        seen["prompts"] = {p for p, _ in sample(random.Random(0), 400)}
        seen["kw"] = kw
        return 0.0

    monkeypatch.setattr(bf, "train", fake_train)
    bf.main(["--digits", "1", "--counts", "1-2", "--n-test", "4", "--n-val", "2", "--test-seed", "5", "--train-only",
             "--gen-length", "16", "--block-length", "16", "--warmup", "300", "--weight-decay", "0.1"])
    assert seen["kw"]["warmup"] == 300 and seen["kw"]["weight_decay"] == 0.1
    test = task.held_out(1005, 4, 1, (1, 2))
    val = [e for e in task.held_out(2005, 6, 1, (1, 2)) if e.prompt not in {t.prompt for t in test}][:2]
    held = {e.prompt for e in test + val}
    assert len(held) == 6 and not held & seen["prompts"]
    assert len(seen["prompts"]) == 9 * 2 - 6  # every other prompt is trained on


def test_exclude_trained_leaves_out_a_training_streams_prompts(monkeypatch):
    """``--exclude-trained SEED:STEPS[:BATCH]`` and ``--exclude-test-seeds``: the held-out and validation
    sets skip every prompt that training run could have drawn and the named earlier sets."""
    seen = {}

    def fake_train(policy, args, sample, **kw):
        seen["prompts"] = {p for p, _ in sample(random.Random(0), 400)}
        return 0.0

    monkeypatch.setattr(bf, "train", fake_train)
    small = ["--digits", "1", "--counts", "1-2", "--n-test", "4", "--n-val", "2", "--test-seed", "5", "--train-only",
             "--gen-length", "16", "--block-length", "16"]
    bf.main([*small, "--exclude-trained", "3:2:3"])
    held = {f"{c:02d}:{n:02d}" for n in range(1, 10) for c in (1, 2)} - seen["prompts"]  # test + validation
    trained = task.drawn(3, 7, 1, (1, 2))  # ceil(1.05 * 2 steps * 3)
    assert len(held) == 6 and trained and not held & trained
    monkeypatch.setattr(bf, "SEEN_SET", 3)
    bf.main([*small, "--exclude-test-seeds", "9"])
    earlier = {e.prompt for off in (1000, 2000) for e in task.held_out(9 + off, 3, 1, (1, 2))}
    held = {f"{c:02d}:{n:02d}" for n in range(1, 10) for c in (1, 2)} - seen["prompts"]
    assert len(held) == 6 and not held & earlier
    for bad in (["--exclude-trained", "0"], ["--exclude-trained", "0:x"], ["--exclude-trained", "0:5:0"],
                ["--exclude-test-seeds", "a"], ["--exclude-trained", "0:100"]):
        with pytest.raises(SystemExit, match=bad[0]):
            bf.main([*small, *bad])


def test_exclude_trained_covers_the_draws_training_skipped():
    """The benchmark's training stream at its real shape (it skips the held-out and validation prompts)
    draws only prompts among the first ``DRAW_MARGIN * steps * batch`` of its seed."""
    shape, steps, batch = (4, (8, 24)), 200, 16
    unseen = {e.prompt for e in task.held_out(1000, 512, *shape) + task.held_out(2000, 544, *shape)}
    rng, trained, skipped = random.Random(0), set(), 0
    for _ in range(steps):  # bench_frontier.main's sample(): draw, drop the unseen, draw again
        out = []
        while len(out) < batch:
            new = task.sample(rng, batch - len(out), *shape)
            skipped += sum(e.prompt in unseen for e in new)
            out += [e for e in new if e.prompt not in unseen]
        trained |= {e.prompt for e in out}
    assert skipped > 0 and not trained <= task.drawn(0, steps * batch, *shape)
    assert trained <= bf.excluded_prompts([f"0:{steps}"], "", batch, shape)
    with pytest.raises(ValueError, match="19 distinct problems asked, 18 .* exist"):
        task.held_out(0, 19, 1, (1, 2))


def test_lr_factor_warms_up_then_decays():
    """bench_rollout.train's schedule: linear warm-up to the peak, then linear decay to ``decay_to``."""
    from bench_rollout import lr_factor

    assert lr_factor(0, 1000, 100, 0.1) == pytest.approx(0.01)
    assert lr_factor(49, 1000, 100, 0.1) == pytest.approx(0.5 * (1 - 0.9 * 0.049))
    assert lr_factor(99, 1000, 100, 0.1) == pytest.approx(1 - 0.9 * 0.099)
    assert lr_factor(1000, 1000, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0, 1.0) == 1.0  # no warm-up, constant


def test_count_up_probe(tmp_path, capsys):
    """The probe's digit kinds on a worked example, and an end-to-end run on a barely trained checkpoint."""
    import count_up_probe as probe

    ex = task.make_example(3998, 12, 4)  # lines 11:03999, 10:04000, 09:04001 ...
    kinds = dict(probe.char_kinds(ex, 3))  # line 3 = "09:04001": the counter borrows, no value carry
    assert ex.completion[18:26] == "09:04001"
    assert kinds[18] == "counter tens, borrow" and kinds[19] == "counter ones" and kinds[20] == kinds[26] == "':' and newline"
    assert ex.completion[20] == ":" and ex.completion[26] == "\n"
    assert [kinds[o] for o in range(21, 26)] == ["value digit, no carry"] * 4 + ["value ones"]
    kinds = dict(probe.char_kinds(ex, 2))  # "10:04000": 03999 -> 04000 carries into four digits
    assert kinds[9] == "counter tens, no borrow"
    assert [kinds[o] for o in range(12, 17)] == ["value digit, no carry"] + ["value digit, carry"] * 3 + ["value ones"]
    kinds = dict(probe.char_kinds(ex, 13))  # the sum line "=4010" after "00:04010\n"
    assert ex.completion[12 * 9:] == "=4010" and sorted(kinds) == [109, 110, 111, 112]
    assert set(kinds.values()) == {"sum line digit"}
    small = ["--digits", "2", "--counts", "2-3", "--gen-length", "32", "--block-length", "8"]
    bf.main([*small[:4], "--train-steps", "2", "--n-val", "2", "--n-test", "2", "--train-only",
             "--save", str(tmp_path / "m")])
    probe.main([str(tmp_path / "m"), "--n", "3", "--batch", "2", *small])
    out = capsys.readouterr().out
    assert all(k in out for k in probe.KINDS) and "left-to-right" in out and "reference" in out
    assert out.count("worked lines right") == 2


def test_block_state_noise():
    """``--block-noise``: with fraction 1 every row is a sampler state (the completion's first blocks
    given, one block partly masked, everything after it masked; loss weight 1); with fraction 0 it is
    LLaDA's i.i.d. masking, draw for draw."""
    from rl.losses import draw_sft_noise

    resp = torch.zeros(64, 40, dtype=torch.bool)
    resp[:, 5:] = True  # a 5-token prompt, 35 completion positions = blocks of 8, 8, 8, 8, 3
    t, masked = bf.block_state_noise(1.0, 8)(resp, torch.Generator().manual_seed(0))
    assert (t == 1).all() and not masked[:, :5].any()
    starts = set()
    for row in masked[:, 5:]:
        first = int(row.int().argmax()) if row.any() else 35
        start = first - first % 8
        starts.add(start)
        assert row[start + 8:].all() and not row[:start].any()
    assert starts == {0, 8, 16, 24, 32}
    t0, m0 = bf.block_state_noise(0.0, 8)(resp, torch.Generator().manual_seed(1))
    t1, m1 = draw_sft_noise(resp, torch.Generator().manual_seed(1))
    assert torch.equal(t0, t1) and torch.equal(m0, m1)
    with pytest.raises(SystemExit, match="--block-noise=1.5"):
        bf.main(["--block-noise", "1.5", "--train-steps", "1", "--n-val", "2", "--n-test", "2", "--digits", "2",
                 "--counts", "2-3", "--gen-length", "16", "--block-length", "16", "--train-only"])
