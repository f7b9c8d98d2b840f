"""Our LLaDA / Dream implementations against the published modeling code (../shared/models):
logits, left padding, the published folder layout both ways, one-line refusals, gradient
checkpointing and bf16 autocast."""

import json
import shutil

import pytest
import torch

from helpers.published import published_model
from rollout import PolicyAdapter
from rollout.models import DreamForMaskedLM, LLaDAForMaskedLM, SDARForMaskedLM
from test_rollout_sampler import left_pad, random_prompts

CLASSES = {"llada": LLaDAForMaskedLM, "dream": DreamForMaskedLM, "sdar": SDARForMaskedLM}
FAMILIES = ["llada", "dream"]


def logits_close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, {"tie": True}, {"kv_heads": 1, "layers": 3}])
def test_logits_equal_published_code(published_folder, family, options):
    folder = published_folder(family, **options)
    ref = published_model(family, folder)
    ours = CLASSES[family].from_pretrained(str(folder)).eval()
    assert ours.config.tie_word_embeddings == bool(options.get("tie"))
    x = torch.stack(random_prompts([11, 11, 11], seed=1))
    with torch.no_grad():
        logits_close(ours(x).logits, ref(x).logits)
        # hidden states: every layer's input, then the normed output (the published order)
        h_ours, h_ref = ours(x, output_hidden_states=True).hidden_states, ref(x, output_hidden_states=True).hidden_states
    assert len(h_ours) == len(h_ref) == ours.config.layer_config().num_hidden_layers + 1
    for a, b in zip(h_ours, h_ref):
        logits_close(a, b)


def test_llada_left_padding_equals_published_unpadded_rows(published_folder):
    """The published LLaDA ignores the attention mask; a padded row of ours must equal that row
    run alone (unpadded) through the published code."""
    folder = published_folder("llada")
    ref = published_model("llada", folder)
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    rows = random_prompts([4, 9, 6], seed=2)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = pol(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            logits_close(out[i, -len(r):], ref(r[None]).logits[0])


def test_dream_left_padding_equals_published_sampler_inputs(published_folder):
    """Dream's own sampler passes positions that skip left padding and a 4D bool mask; ours gets
    the 2D mask through the adapter and must agree at every real position."""
    folder = published_folder("dream", kv_heads=1)
    ref = published_model("dream", folder)
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=2))
    tok_idx = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # diffusion_generate's positions
    mask4d = mask.bool()[:, None, None, :] & mask.bool()[:, None, :, None]
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what the adapter passes
        ours = pol.model(ids, attention_mask=mask, position_ids=positions).logits  # raw (shifted), as published
        theirs = ref(ids, mask4d, tok_idx).logits
        aligned = pol(ids, attention_mask=mask).logits
    real = mask.bool()
    logits_close(ours[real], theirs[real])
    # the adapter realigns Dream's logits: position i gets the logits computed at i - 1
    torch.testing.assert_close(aligned[:, 1:], ours[:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_export_is_published_layout_and_round_trips(published_folder, tmp_path, family, tie):
    folder = published_folder(family, tie=tie)
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    out = tmp_path / "export"
    pol.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == source["model_type"] and config["auto_map"] == source["auto_map"]
    assert config["architectures"] == source["architectures"]
    for key in ("d_model", "n_layers", "weight_tying") if family == "llada" else ("hidden_size", "rope_theta"):
        assert config[key] == source[key], key
    for py in folder.glob("*.py"):
        assert (out / py.name).read_text() == py.read_text()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(folder / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # the published tensor names, nothing more
    x = torch.stack(random_prompts([10, 10], seed=4))
    with torch.no_grad():
        expected = pol.model(x).logits
        logits_close(published_model(family, out)(x).logits, expected)
        logits_close(PolicyAdapter.from_pretrained(str(out)).model(x).logits, expected)
    assert PolicyAdapter.from_pretrained(str(out)).tokenizer.mask_token_id == pol.mask_token_id


def test_adapter_ids_and_capabilities(published_folder):
    llada = PolicyAdapter.from_pretrained(str(published_folder("llada")))
    dream = PolicyAdapter.from_pretrained(str(published_folder("dream")))
    for pol in (llada, dream):
        assert (pol.mask_token_id, pol.eos_token_id, pol.pad_token_id) == (1, 2, 0)  # from the folder's config
        assert pol.supports_kv_cache and pol.fused_scoring
    assert not llada.logits_shifted and dream.logits_shifted


@pytest.mark.parametrize("family", [*FAMILIES, "sdar"])
def test_fused_scoring_equals_log_softmax(published_folder, family):
    pol = PolicyAdapter.from_pretrained(str(published_folder(family, init_std=0.3))).eval()
    ids, mask = left_pad(random_prompts([7, 12], seed=6))
    n = 5
    targets = torch.randint(8, 100, (2, n))
    targets[0, 1] = -1
    with torch.no_grad():
        logps = pol(ids, attention_mask=mask, logits_to_keep=n, score_targets=targets).token_logps
        full = torch.log_softmax(pol(ids, attention_mask=mask).logits[:, -n:].float(), -1)
    expected = full.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(targets < 0, 0)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,key,value", [("llada", "alibi", True), ("llada", "block_type", "sequential"),
                                              ("llada", "layer_norm_type", "default"),
                                              ("dream", "hidden_size", 65)])
def test_unsupported_config_fails_with_one_line(published_folder, tmp_path, family, key, value):
    folder = tmp_path / "bad"
    shutil.copytree(published_folder(family), folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{key}={value!r}" if family == "llada" else key) as err:
        PolicyAdapter.from_pretrained(str(folder))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", [*FAMILIES, "sdar"])
def test_gradient_checkpointing_gives_the_same_gradients(published_folder, family):
    x = torch.stack(random_prompts([9, 9], seed=8))

    def grads(checkpointing):
        model = CLASSES[family].from_pretrained(str(published_folder(family))).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(x).logits.float().logsumexp(-1).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_on_cpu(published_folder, family):
    """Forward and backward under CPU bf16 autocast run and stay near the fp32 result."""
    model = CLASSES[family].from_pretrained(str(published_folder(family))).train()
    x = torch.stack(random_prompts([9, 9], seed=8))
    with torch.no_grad():
        fp32 = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, attention_mask=torch.ones_like(x)).logits
        loss = out.float().logsumexp(-1).mean()
    loss.backward()
    assert out.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
