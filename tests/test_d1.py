"""d1 as published (github.com/dllm-reasoning/d1): its SFT examples, prompts, LoRA targets, QLoRA,
evaluation protocol, and the whole pipeline as one command on fixtures.

Values marked "recorded" were produced by d1's own code on our fixture rows with
``scripts/check_d1_data.py --d1-repo <d1 checkout> --write-fixture tests/fixtures/d1_data.json``
(that script compares the two directly where a d1 checkout exists); CI checks our code against
them without d1's code."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from recipes.schema import TaskConfig
from rl.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RECORDED = json.loads((FIXTURES / "d1_data.json").read_text())
D1_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


def task(name: str, **kw):
    cfg = replace(TaskConfig(), name=name, **{"rewards": {"math": 1.0}, "accuracy_reward": "math", **kw})
    return build_task(cfg)


# ---- data ---------------------------------------------------------------------------------------

def test_s1k_rows_encode_to_d1s_recorded_sft_examples(tiny_tokenizer):
    """Same s1K-schema rows and tokenizer: input ids and prompt lengths equal d1's preprocess_dataset
    (recorded): chat-templated user + assistant turns, right-padded to max_length, prompt = the
    templated user turn plus "\\n"."""
    from rl.sft_format import encode_d1_example
    from rl.tasks.d1 import s1k_row

    raw = [json.loads(line) for line in (FIXTURES / "s1k" / "train.jsonl").read_text().splitlines()]
    n = RECORDED["sft_max_length"]
    for i, (r, want) in enumerate(zip(raw, RECORDED["sft"], strict=True)):
        row = s1k_row(r, "fixture", i)
        ids, mask = encode_d1_example(tiny_tokenizer, row["prompt"], row["response"], max_length=n)
        assert ids == want["input_ids"] and len(ids) == n
        assert mask == [0] * want["prompt_length"] + [1] * (n - want["prompt_length"])
    # the padding is trained (d1 has no attention mask in SFT): the tail of every row is pad tokens
    assert ids[-1] == tiny_tokenizer.pad_token_id and mask[-1] == 1


def test_s1k_task_splits_like_d1():
    """Every row is an SFT row; d1's 1% eval split (0 of 12 here, 10 of s1K's 1,000) or num_val."""
    from rl.tasks.d1 import S1K_EVAL_FRACTION

    t = task("s1k", path=str(FIXTURES / "s1k"), prompt_style="d1", num_val=0)
    assert len(t.rows("sft")) == 12 - int(12 * S1K_EVAL_FRACTION) and not t.rows("rl") and not t.rows("test")
    t = task("s1k", path=str(FIXTURES / "s1k"), prompt_style="d1", num_val=2)
    assert len(t.rows("val")) == 2 and len(t.rows("sft")) == 10
    row = t.rows("sft")[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("\nRespond in the following")
    assert row["response"].startswith("<reasoning>") and row["response"].endswith("</answer>")


def test_s1k_bad_rows_give_one_line(tmp_path):
    from rl.tasks import DataError

    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"question": "q", "attempt": "a"}) + "\n")
    with pytest.raises(DataError, match="row 0 has no column 'thinking_trajectories'"):
        task("s1k", path=str(bad), prompt_style="d1")


def test_d1_training_prompts_equal_d1s_recorded(shared_data):
    """GRPO prompts with prompt_style=d1 equal d1's data_utils output on the same rows (recorded)."""
    from rl.tasks.d1 import countdown_prompt, sudoku_prompt

    rec = RECORDED["train_prompts"]
    gsm = task("gsm8k", prompt_style="d1", num_test=8, num_val=0)
    assert [r["prompt"] for r in gsm.rows("test")] == rec["gsm8k"]
    assert all(r["answer"] == r["answer"].strip() for r in gsm.rows("test"))  # d1: the text after ####, as is
    math = task("math500", prompt_style="d1", num_test=8, num_val=0, path=str(shared_data / "math500"))
    assert [r["prompt"] for r in math.rows("test")] == rec["math500"]
    assert all(r["answer"] == r["solution"] for r in math.rows("test"))  # d1's `answer` is the whole solution
    cd = [([3, 5, 7], 22), ([10, 2, 4], 9), ([1, 2, 3], 6)]
    assert [countdown_prompt(n, t, "d1") for n, t in cd] == rec["countdown"]
    assert [sudoku_prompt("3102200002100320", "d1")] == rec["sudoku"]


def test_d1_eval_prompts_equal_d1s_recorded(tiny_tokenizer):
    """prompt_style=d1_eval rendered by the chat template = d1's create_prompt text (recorded):
    the assistant turn is opened with <reasoning> (TRL: a final assistant message is continued)."""
    from rl.tasks.d1 import eval_prompt
    from rollout.prompts import encode_prompt

    for kind, rec in RECORDED["eval_prompts"].items():
        ids = encode_prompt(tiny_tokenizer, eval_prompt(kind, rec["question"]))
        assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == rec["text"]
        assert rec["text"].endswith("<reasoning>")


def test_d1_prompt_styles_only_for_d1s_tasks():
    from rl.tasks import DataError

    with pytest.raises(DataError, match="d1's prompts exist for its tasks only"):
        task("local", path=str(FIXTURES / "s1k" / "train.jsonl"), prompt_style="d1", columns={"prompt": "question"})


def test_sudoku4_reads_d1s_csv_layout(tmp_path):
    csv = tmp_path / "puzzles.csv"
    csv.write_text("Puzzle,Solution\n" + "".join(f"{p},{s}\n" for p, s in [
        ("0102200002100320", "3142243142131324"), ("0140432014020000", "2143432114323214"),
        ("3100240000000320", "3142243142131324"), ("0000432014020001", "2143432114323214")]))
    t = task("sudoku4", path=str(csv), prompt_style="d1", num_val=1, num_test=1, rewards={"d1_sudoku": 1.0},
             accuracy_reward="sudoku")
    rows = t.rows("test") + t.rows("val") + t.rows("rl")
    assert len(rows) == 4 and all(len(r["puzzle"]) == 16 and r["puzzle"][0] in "0123" for r in rows)
    assert {r["puzzle"] for r in rows} >= {"0102200002100320"}  # the leading 0 survives the CSV reader
    assert rows[0]["prompt"][0]["content"].endswith(f"Solve the following Sudoku puzzle: {rows[0]['puzzle']}\n")


# ---- LoRA and QLoRA --------------------------------------------------------------------------------

def _lora_modules(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))}


def test_lora_targets_are_the_weights_peft_adapts_on_the_published_llada(published_folder):
    """d1's target list on the published LLaDA code (peft) adapts q/k/v/up; ours, which runs LLaDA
    on Llama blocks with other names, adapts the same weights (compared in published names)."""
    from peft import LoraConfig, get_peft_model

    from helpers.published import published_model
    from rl.config import LoraOptions
    from rl.trainer import apply_lora
    from rollout import PolicyAdapter

    folder = published_folder("llada")
    reference = _lora_modules(get_peft_model(published_model("llada", folder), LoraConfig(r=4, target_modules=D1_LORA)))
    assert {n.split(".")[-1] for n in reference} == {"q_proj", "k_proj", "v_proj", "up_proj"}
    for targets in (D1_LORA, ["q_proj", "k_proj", "v_proj"], ["attn_out", "ff_out"]):
        ref = _lora_modules(get_peft_model(published_model("llada", folder), LoraConfig(r=4, target_modules=targets)))
        policy = PolicyAdapter.from_pretrained(str(folder))
        apply_lora(policy, LoraOptions(enabled=True, r=4, alpha=8, target_modules=targets))
        ours = {policy.model.get_base_model().to_published_name(n + ".")[:-1] for n in _lora_modules(policy.model)}
        assert ours == ref, targets
    policy = PolicyAdapter.from_pretrained(str(folder))  # our own names: all seven kinds
    apply_lora(policy, LoraOptions(enabled=True, r=4, alpha=8, target_modules=D1_LORA, target_names="native"))
    assert {n.split(".")[-1] for n in _lora_modules(policy.model)} == set(D1_LORA)


def test_qlora_loads_4bit_trains_adapters_and_exports_the_unquantized_merge(published_folder, tmp_path):
    """QLoRA as d1's GRPO (bitsandbytes NF4 + double quantization, bf16 compute; its CPU backend
    here): the frozen base is 4-bit, the adapters get gradients, and the export merges them into
    the checkpoint's unquantized weights (what d1 evaluates: base + adapter)."""
    from bitsandbytes.nn import Linear4bit
    from safetensors.torch import load_file

    from recipes.config import load_config
    from recipes.pipeline import stage_policy
    from rl.checkpoint import export_hf
    from rl.config import LoraOptions
    from rl.trainer import apply_lora
    from rollout.models import LLaDAForMaskedLM

    folder = published_folder("llada")
    cfg = load_config([f"model.path={folder}", "model.family=llada", "rl.lora.enabled=true",
                       "rl.lora.load_in_4bit=true", "device=cpu"])
    policy = stage_policy(cfg, cfg.rl, None)
    q = policy.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested
    apply_lora(policy, LoraOptions(enabled=True, r=4, alpha=8, target_modules=D1_LORA))
    ids = torch.randint(0, 60, (2, 12))
    policy(ids).logits.float().pow(2).mean().backward()
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in policy.named_parameters() if "lora_B" in n)
    layer = policy.model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # a non-zero update to merge
    out = export_hf(policy, policy.tokenizer, tmp_path / "final")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llada"
    base = load_file(str(folder / "model.safetensors"))["model.transformer.blocks.0.q_proj.weight"]
    merged = load_file(str(out / "model.safetensors"))["model.transformer.blocks.0.q_proj.weight"]
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    assert torch.allclose(merged.float(), base.float() + layer.scaling["default"] * b @ a, atol=1e-5)
    reloaded = LLaDAForMaskedLM.from_pretrained(str(out))  # and our loader (and the published code) reads it
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == base.dtype


def test_qlora_config_errors():
    from recipes.config import load_config
    from recipes.schema import ConfigError

    with pytest.raises(ConfigError, match=r"rl.lora.load_in_4bit: 4-bit weights cannot be trained"):
        load_config(["rl.lora.load_in_4bit=true"])
    with pytest.raises(ConfigError, match="cannot be ZeRO-3 partitioned"):
        load_config(["rl.lora.enabled=true", "rl.lora.load_in_4bit=true", "rl.deepspeed=zero3"])
    with pytest.raises(ConfigError, match=r"rl.lora.target_names='llama': not allowed"):
        load_config(["rl.lora.target_names=llama"])


# ---- GRPO prompt truncation, prompt encoding -------------------------------------------------------

def test_max_prompt_length_keeps_the_last_prompt_tokens(tmp_path):
    """TRL's max_prompt_length (d1: 200): the rollout sees the last N prompt tokens."""
    from helpers.toy_grpo import make_trainer
    from rollout.prompts import encode_prompt

    rows = [{"prompt": "abcdefghij" * (i + 1)} for i in range(8)]
    trainer = make_trainer(str(tmp_path / "run"), max_steps=1, rows=rows)
    trainer.config.max_prompt_length = 7
    ro = trainer.rollout(rows[:4])
    assert ro.prompt_ids.shape[1] == 7
    full = encode_prompt(trainer.tokenizer, rows[0]["prompt"])
    assert ro.prompt_ids[0].tolist() == full[-7:]


def test_encode_prompt_continues_a_final_assistant_turn(tiny_tokenizer):
    from rollout.prompts import encode_prompt

    user = [{"role": "user", "content": "2+2?"}]
    opened = encode_prompt(tiny_tokenizer, user + [{"role": "assistant", "content": "<reasoning>"}])
    plain = encode_prompt(tiny_tokenizer, user)
    assert opened == plain + tiny_tokenizer("<reasoning>", add_special_tokens=False)["input_ids"]


# ---- the whole pipeline, one command -----------------------------------------------------------------

def test_d1_pipeline_one_command_on_fixtures(published_folder, tmp_path):
    """d1's pipeline as one command (experiment=llada_gsm8k, sizes cut for CPU): SFT on an s1K-schema
    file with d1's examples and LoRA, GRPO on the GSM8K local copy with d1's prompts, rewards and
    QLoRA, then the final checkpoint evaluated with d1's protocol (generations in d1's layout,
    scored by our verifier and by d1's parse rules)."""
    from recipes.__main__ import main
    from rewards.d1 import d1_eval_accuracy

    folder = published_folder("llada", max_positions=2048)
    run = tmp_path / "run"
    assert main(["experiment=llada_gsm8k", f"model.path={folder}", "model.dtype=float32", "model.mask_token_id=null",
                 f"sft_task.path={FIXTURES / 's1k'}", "task.num_val=2", "task.num_test=2", f"run_dir={run}",
                 "sft.max_steps=2", "sft.max_length=320", "sft.per_device_batch_size=2", "sft.bf16=false",
                 "sft.deepspeed=zero0", "sft.lora.r=4", "sft.save_steps=0",
                 "rl.max_steps=1", "rl.bf16=false", "rl.deepspeed=zero0", "rl.lora.r=4", "rl.num_iterations=2",
                 "rl.per_device_prompts=1", "rl.num_generations=2", "rl.max_prompt_length=64", "rl.save_steps=0",
                 "rollout.gen_length=16", "rollout.block_length=16", "rollout.steps=4", "eval.gen_lengths=[16]",
                 "eval.block_length=16", "recipe.eval_batch_size=2", "logger.wandb.mode=disabled", "threads=1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft_task"] == "s1k" and summary["task"] == "gsm8k"
    assert {f"rewards/{n}/mean" for n in ("d1_xmlcount", "d1_soft_format", "d1_strict_format", "d1_int", "d1_gsm8k")} \
        <= set(summary["rl"]["train"])
    (result,) = summary["final_eval"]
    assert result["protocol"] == "d1" and (result["gen_length"], result["steps"]) == (16, 8)  # steps = length / 2
    (gen_file,) = (run / "eval" / "generations").glob("gsm8k_*_16_8_0_generations.json")
    data = json.loads(gen_file.read_text())
    items = data["generations"]
    assert len(items) == 2 and set(items[0]) >= {"question", "generations", "ground_truth"}
    assert isinstance(items[0]["ground_truth"], float) and data["gen_length"] == 16
    assert result["d1_accuracy"] == pytest.approx(d1_eval_accuracy("gsm8k", items))
    assert "d1's parser" in (run / "eval" / "results.md").read_text()
