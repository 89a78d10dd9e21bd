"""Tests for influencekit.models: model_fingerprint, layer_role, module selection."""

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
        # A layer a PEFT adapter wraps keeps its role; the adapter's own linears are found
        # by ``is_lora`` (modules="lora"), never by "mlp" or "attention"
        ("base_model.model.model.decoder.layers.5.fc1.base_layer", "mlp"),
        ("base_model.model.model.layers.0.self_attn.q_proj.base_layer", "attention"),
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
