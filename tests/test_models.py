"""Tests for influencekit.models: load_model, model_fingerprint, layer_role, module selection."""

from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch

import influencekit as ik
from influencekit.models import candidate_layers, layer_role
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers.tiny_models import FAMILIES, make_model

TEXTS = ["The moon rises.", "Fresh bread rises slowly.", "Zebras & quokkas: 42!"]


def save_model_dir(path, model, tokenizer):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A saved tiny gpt2 and llama directory, with the float32 models they were saved from."""
    out = {}
    for family in ("gpt2", "llama"):
        model = make_model(family, len(tokenizer), dtype=torch.float32)
        path = tmp_path_factory.mktemp(f"saved-{family}")
        out[family] = (save_model_dir(path, model, tokenizer), model)
    return out


# ---------------------------------------------------------------------------------------------
# load_model: round trips


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_model_round_trips_weights_and_tokenizer(saved, tokenizer, family):
    path, original = saved[family]
    model, tok = ik.load_model(path)
    assert type(model) is type(original)
    assert not model.training, "load_model must return the model in eval mode"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    want, got = original.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    for text in [*TEXTS, TINY_CORPUS[0]]:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert tok.decode(tok(TEXTS[2])["input_ids"]) == TEXTS[2]
    assert ik.model_fingerprint(model) == ik.model_fingerprint(original)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_model_dtype_option(saved, family):
    path, original = saved[family]
    model, _ = ik.load_model(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not model.training
    for name, param in original.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], param.double()), name


def test_load_model_accepts_str_path_and_sharded_safetensors(tmp_path, tokenizer):
    model = make_model("llama", len(tokenizer), dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    loaded, _ = ik.load_model(str(tmp_path))
    assert ik.model_fingerprint(loaded) == ik.model_fingerprint(model)


def test_load_model_prefers_safetensors_when_a_pickle_is_also_present(tmp_path, tokenizer):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    save_model_dir(tmp_path, model, tokenizer)
    # A pickle with different weights next to the safetensors file must be ignored.
    other = make_model("gpt2", len(tokenizer), dtype=torch.float32, seed=1)
    torch.save(other.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, _ = ik.load_model(tmp_path)
    assert ik.model_fingerprint(loaded) == ik.model_fingerprint(model)


# ---------------------------------------------------------------------------------------------
# load_model: refusals


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pt"])
def test_load_model_refuses_pickled_weights(tmp_path, tokenizer, weights_name):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / weights_name)
    with pytest.raises(ik.ModelError) as info:
        ik.load_model(tmp_path)
    message = str(info.value)
    assert "safetensors" in message
    assert weights_name in message
    assert str(tmp_path) in message


def test_load_model_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ik.load_model(missing)


def test_load_model_refuses_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a directory")
    with pytest.raises(ik.ModelError, match=r"model\.safetensors.*found a file"):
        ik.load_model(path)


def test_load_model_refuses_dir_without_config(tmp_path, saved):
    src, _ = saved["gpt2"]
    for item in src.iterdir():
        if item.name != "config.json":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    with pytest.raises(ik.ModelError, match=r"config\.json"):
        ik.load_model(tmp_path)


def test_load_model_refuses_empty_dir(tmp_path):
    with pytest.raises(ik.ModelError) as info:
        ik.load_model(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "config.json" in str(info.value)


def test_load_model_refuses_dir_without_any_weights(tmp_path, tokenizer):
    make_model("gpt2", len(tokenizer)).config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ik.ModelError, match=r"safetensors"):
        ik.load_model(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_model_refuses_dir_without_tokenizer(tmp_path, tokenizer, family):
    make_model(family, len(tokenizer), dtype=torch.float32).save_pretrained(
        tmp_path, safe_serialization=True
    )
    with pytest.raises(ik.ModelError, match="tokenizer"):
        ik.load_model(tmp_path)


def test_load_model_truncated_safetensors_names_the_file(tmp_path, saved):
    src, _ = saved["gpt2"]
    for item in src.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ik.ModelError, match=r"model\.safetensors"):
        ik.load_model(tmp_path)


def test_load_model_refuses_checkpoint_with_missing_weights(tmp_path, saved):
    from safetensors.torch import load_file, save_file

    src, _ = saved["llama"]
    for item in src.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ik.ModelError, match=r"model\.layers\.1\.mlp\.down_proj"):
        ik.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# model_fingerprint


@pytest.fixture(scope="module")
def gpt2_f32(tokenizer):
    return make_model("gpt2", len(tokenizer), dtype=torch.float32)


def test_fingerprint_is_a_stable_short_hex_string(gpt2_f32, tokenizer):
    first = ik.model_fingerprint(gpt2_f32)
    assert first == ik.model_fingerprint(gpt2_f32)
    assert len(first) == 16 and int(first, 16) >= 0
    # The same weights built again (same seed) give the same fingerprint.
    assert ik.model_fingerprint(make_model("gpt2", len(tokenizer), dtype=torch.float32)) == first


def test_fingerprint_ignores_float32_bfloat16_casts(gpt2_f32):
    want = ik.model_fingerprint(gpt2_f32)
    bf16 = copy.deepcopy(gpt2_f32).to(torch.bfloat16)
    assert ik.model_fingerprint(bf16) == want
    assert ik.model_fingerprint(bf16.to(torch.float32)) == want
    assert ik.model_fingerprint(gpt2_f32) == want, "fingerprinting must not modify the model"


@pytest.mark.parametrize(
    "param_name",
    [
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.weight",
    ],
)
def test_fingerprint_changes_when_one_weight_changes(gpt2_f32, param_name):
    want = ik.model_fingerprint(gpt2_f32)
    changed = copy.deepcopy(gpt2_f32)
    with torch.no_grad():
        dict(changed.named_parameters())[param_name].view(-1)[0] += 0.5
    assert ik.model_fingerprint(changed) != want


def test_fingerprint_differs_between_models(gpt2_f32, tokenizer):
    other_seed = make_model("gpt2", len(tokenizer), dtype=torch.float32, seed=1)
    llama = make_model("llama", len(tokenizer), dtype=torch.float32)
    fingerprints = {ik.model_fingerprint(m) for m in (gpt2_f32, other_seed, llama)}
    assert len(fingerprints) == 3


# ---------------------------------------------------------------------------------------------
# layer_role and selection across families


@pytest.mark.parametrize(
    ("name", "role"),
    [
        # GPT-2 (Conv1D): attn.c_proj is attention even though mlp.c_proj is feed-forward.
        ("transformer.h.0.attn.c_attn", "attention"),
        ("transformer.h.0.attn.c_proj", "attention"),
        ("transformer.h.11.mlp.c_fc", "mlp"),
        ("transformer.h.11.mlp.c_proj", "mlp"),
        # Llama / Mistral / Qwen2
        ("model.layers.0.self_attn.q_proj", "attention"),
        ("model.layers.0.self_attn.o_proj", "attention"),
        ("model.layers.31.mlp.gate_proj", "mlp"),
        ("model.layers.31.mlp.up_proj", "mlp"),
        ("model.layers.31.mlp.down_proj", "mlp"),
        # GPT-NeoX / Pythia
        ("gpt_neox.layers.3.attention.query_key_value", "attention"),
        ("gpt_neox.layers.3.attention.dense", "attention"),
        ("gpt_neox.layers.3.mlp.dense_h_to_4h", "mlp"),
        ("gpt_neox.layers.3.mlp.dense_4h_to_h", "mlp"),
        # OPT: fc1/fc2 sit directly in the decoder layer, no "mlp" parent
        ("model.decoder.layers.5.self_attn.out_proj", "attention"),
        ("model.decoder.layers.5.fc1", "mlp"),
        ("model.decoder.layers.5.fc2", "mlp"),
        # Phi: attention output is "dense"
        ("model.layers.2.self_attn.dense", "attention"),
        ("model.layers.2.mlp.fc1", "mlp"),
        # Falcon / Bloom, GPT-J, Mixtral experts
        ("transformer.h.0.self_attention.query_key_value", "attention"),
        ("transformer.h.0.mlp.dense_4h_to_h", "mlp"),
        ("transformer.h.0.mlp.fc_in", "mlp"),
        ("model.layers.0.block_sparse_moe.experts.3.w2", "mlp"),
        # Not in a block
        ("lm_head", "other"),
        ("model.embed_tokens", "other"),
        ("score", "other"),
    ],
)
def test_layer_role(name, role):
    assert layer_role(name) == role


@pytest.fixture(scope="module")
def family_models(tokenizer):
    return {family: make_model(family, len(tokenizer), dtype=torch.float32) for family in FAMILIES}


# Feed-forward linears per block, per family.
MLP_PER_BLOCK = {"gpt2": 2, "llama": 3, "mistral": 3, "qwen2": 3, "gpt_neox": 2, "opt": 2, "phi": 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_selections_partition_each_family(family_models, family):
    model = family_models[family]
    names = lambda sel: [layer.name for layer in ik.select_modules(model, sel)]  # noqa: E731
    mlp, attention, every = names("mlp"), names("attention"), names("all")
    assert len(mlp) == 2 * MLP_PER_BLOCK[family]  # the tiny models have 2 blocks
    assert attention and not set(mlp) & set(attention)
    assert sorted(mlp + attention) == sorted(every)
    head = model.get_output_embeddings()
    assert all(layer.module is not head for layer in candidate_layers(model))
    assert all(layer_role(n) == "mlp" for n in mlp)
    # An explicit list (and a single name) select exactly those layers, in the given order.
    assert names(list(reversed(mlp))) == list(reversed(mlp))
    assert names(mlp[0]) == [mlp[0]]


@pytest.mark.parametrize(
    "family",
    [pytest.param(f) if f == "opt" else f for f in FAMILIES],
)
def test_fit_factors_runs_on_every_family_mlp(family_models, tokenizer, family):
    model = family_models[family]
    train = ik.TextDataset.from_texts(TINY_CORPUS[:3], tokenizer)
    factors = ik.fit_factors(model, train, "mlp", strategy="diagonal", progress=False)
    for layer in ik.select_modules(model, "mlp"):
        lam = factors.layers[layer.name].lam
        assert tuple(lam.shape) == layer.grad_shape
        assert torch.isfinite(lam).all()
