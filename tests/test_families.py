"""Every supported model family, end to end: module selection, gradient capture, fit, score.

The references here are plain ``torch.autograd`` gradients of the per-sequence summed loss
(batch size 1, no padding), in float64, and the EK-FAC formula of docs/math.md (Factors,
Scores) written out with explicit matrices: nothing is taken from the kit's own helpers.
Training texts: ``padded_train`` (conftest.py), eight sequences of different token lengths,
so that a batch of them is padded.

Elsewhere: the caller's mode and ``requires_grad`` flags after a fit or score, on every
family, in test_hooks.py; batch size, OPT's included, in test_reproducible.py.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import influencekit as ik
from influencekit.data import example_batches, query_batches
from influencekit.hooks import capture, per_sequence_grads

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers.tiny_models import FAMILIES, make_model

N_BLOCKS = 2

# Leaf names per block, written out for each family: (block prefix, mlp leaves, attention leaves).
LLAMA_STYLE = (
    "model.layers.{i}.",
    ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
)
EXPECTED = {
    "gpt2": ("transformer.h.{i}.", ["mlp.c_fc", "mlp.c_proj"], ["attn.c_attn", "attn.c_proj"]),
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "gpt_neox": (
        "gpt_neox.layers.{i}.",
        ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
        ["attention.query_key_value", "attention.dense"],
    ),
    "opt": (
        "model.decoder.layers.{i}.",
        ["fc1", "fc2"],
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    ),
    "phi": (
        "model.layers.{i}.",
        ["mlp.fc1", "mlp.fc2"],
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"],
    ),
}
# Never tracked: the LM head and the embeddings.
NEVER = {
    "gpt2": ["lm_head", "transformer.wte", "transformer.wpe"],
    "llama": ["lm_head", "model.embed_tokens"],
    "mistral": ["lm_head", "model.embed_tokens"],
    "qwen2": ["lm_head", "model.embed_tokens"],
    "gpt_neox": ["embed_out", "lm_head", "gpt_neox.embed_in"],
    "opt": ["lm_head", "model.decoder.embed_tokens", "model.decoder.embed_positions"],
    "phi": ["lm_head", "model.embed_tokens"],
}

QUERIES = [
    ("The chef tastes the stew", " and adds more pepper."),
    ("Jupiter is", " the largest planet."),
    ("The choir", " sings."),
]


def expected_names(family: str, kind: str) -> list[str]:
    prefix, mlp, attention = EXPECTED[family]
    leaves = {"mlp": mlp, "attention": attention, "all": mlp + attention}[kind]
    return [prefix.format(i=i) + leaf for i in range(N_BLOCKS) for leaf in leaves]


def module_order(model: nn.Module) -> dict[str, int]:
    return {name: k for k, (name, _) in enumerate(model.named_modules())}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def exact_model(family: str, vocab_size: int, **kwargs):
    """A tiny float64 model with SDPA attention.

    ``transformers``' eager attention for every family but GPT-2 takes its softmax in float32
    even for a float64 model, so a padded and an unpadded forward then differ at ~1e-8; SDPA
    stays in float64 and lets the references below agree to ~1e-12.
    """
    model = make_model(family, vocab_size, **kwargs)
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def model(family, tokenizer):
    return exact_model(family, len(tokenizer), layers=N_BLOCKS)


# ---------------------------------------------------------------------------------------------
# Reference: canonical gradients by plain autograd, one unpadded sequence at a time


def canonical_grad(module: nn.Module, weight_grad, bias_grad) -> torch.Tensor:
    """Canonical (d_out, d_in [+1]) gradient from autograd's storage-layout gradients."""
    g = weight_grad.T if isinstance(module, Conv1D) else weight_grad
    if bias_grad is not None:
        g = torch.cat([g, bias_grad[:, None]], dim=1)
    return g


def autograd_grads(model, modules: dict[str, nn.Module], ids: list[int], start: int):
    """Canonical gradient of ``sum_{t>=start} -log p(x_t | x_<t)`` per module (batch size 1)."""
    ids_t = torch.tensor([ids])
    logits = model(input_ids=ids_t).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids_t[0, 1:]
    loss = -logp[torch.arange(start - 1, len(ids) - 1), targets[start - 1 :]].sum()
    params = []
    for module in modules.values():
        params.append(module.weight)
        if module.bias is not None:
            params.append(module.bias)
    grads = iter(torch.autograd.grad(loss, params))
    out = {}
    for name, module in modules.items():
        wg = next(grads)
        bg = next(grads) if module.bias is not None else None
        out[name] = canonical_grad(module, wg, bg)
    return out


def query_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return list(p) + list(c), len(p)


# ---------------------------------------------------------------------------------------------
# (a) module selection by kind


@pytest.mark.parametrize("kind", ["mlp", "attention", "all"])
def test_select_modules_by_kind(model, family, kind):
    layers = ik.select_modules(model, kind)
    names = [layer.name for layer in layers]
    assert sorted(names) == sorted(expected_names(family, kind))
    assert len(set(names)) == len(names)
    order = module_order(model)
    assert names == sorted(names, key=order.__getitem__), "layers follow the model's order"
    modules = dict(model.named_modules())
    for layer in layers:
        assert layer.module is modules[layer.name]
        assert layer.transposed == isinstance(layer.module, Conv1D)
        assert layer.transposed == (family == "gpt2")
        w = layer.module.weight
        d_out, d_in = (w.shape[1], w.shape[0]) if layer.transposed else tuple(w.shape)
        has_bias = layer.module.bias is not None
        assert layer.grad_shape == (d_out, d_in + has_bias)


def test_all_is_mlp_and_attention_without_head_or_embeddings(model, family):
    mlp = {x.name for x in ik.select_modules(model, "mlp")}
    attention = {x.name for x in ik.select_modules(model, "attention")}
    everything = {x.name for x in ik.select_modules(model, "all")}
    assert not mlp & attention
    assert everything == mlp | attention  # these tiny configs have no other linear
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    for name in everything:
        assert modules[name] is not head
        assert not isinstance(modules[name], nn.Embedding)
    for name in NEVER[family]:
        assert name not in everything


def test_opt_projections_are_in_all_only(tokenizer):
    """OPT with word_embed_proj_dim != hidden has project_in/out: 'all' holds them, mlp does not."""
    import transformers as tf

    config = tf.OPTConfig(hidden_size=16, ffn_dim=32, word_embed_proj_dim=8, num_hidden_layers=1,
                          num_attention_heads=2, vocab_size=len(tokenizer),
                          max_position_embeddings=64)  # fmt: skip
    m = tf.AutoModelForCausalLM.from_config(config)
    everything = [x.name for x in ik.select_modules(m, "all")]
    assert "model.decoder.project_in" in everything
    assert "model.decoder.project_out" in everything
    assert "lm_head" not in everything
    mlp = [x.name for x in ik.select_modules(m, "mlp")]
    assert mlp == ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]


# ---------------------------------------------------------------------------------------------
# (b) explicit lists and unknown names


def test_explicit_list_keeps_the_given_order(model, family):
    names = expected_names(family, "all")
    chosen = [names[-1], names[0], names[2]]
    assert [x.name for x in ik.select_modules(model, chosen)] == chosen
    assert [x.name for x in ik.select_modules(model, names[1])] == [names[1]]


@pytest.mark.parametrize("bad", ["not.a.module", "NEVER"])
def test_unknown_name_raises_listing_the_candidates(model, family, bad):
    names = [NEVER[family][0]] if bad == "NEVER" else [bad]
    candidates = expected_names(family, "all")
    for selection in (names, [candidates[0], *names], names[0]):
        with pytest.raises(ik.ModelError) as info:
            ik.select_modules(model, selection)
        message = str(info.value)
        assert names[0] in message
        for name in candidates:
            assert name in message


def test_empty_and_duplicate_lists_raise(model, family):
    name = expected_names(family, "mlp")[0]
    with pytest.raises(ik.ModelError):
        ik.select_modules(model, [])
    with pytest.raises(ik.ModelError, match="twice"):
        ik.select_modules(model, [name, name])


# ---------------------------------------------------------------------------------------------
# (c) captured gradients equal autograd's, and end-to-end scores


def test_captured_gradients_equal_autograd_on_a_padded_batch(model, padded_train):
    layers = ik.select_modules(model, "all")
    modules = {layer.name: layer.module for layer in layers}
    (batch,) = example_batches(padded_train, batch_size=len(padded_train))
    assert batch.attention_mask.sum() < batch.attention_mask.numel(), "batch must be padded"
    io = capture(model, layers, batch, dtype=torch.float64)
    for layer in layers:
        x = io[layer.name]
        pad = batch.attention_mask == 0
        assert torch.all(x.a[pad] == 0) and torch.all(x.s[pad] == 0)
        grads = per_sequence_grads(x)
        assert grads.shape == (len(padded_train), *layer.grad_shape)
    for b, ex in enumerate(padded_train):
        reference = autograd_grads(model, modules, list(ex.input_ids), start=1)
        for layer in layers:
            got = per_sequence_grads(io[layer.name])[b]
            want = reference[layer.name]
            scale = want.abs().max()
            assert scale > 0
            torch.testing.assert_close(
                got, want, rtol=1e-10, atol=1e-12 * float(scale), msg=f"{layer.name}, seq {b}"
            )


def test_query_gradients_score_only_the_completion(model, tokenizer):
    layers = ik.select_modules(model, "mlp")
    modules = {layer.name: layer.module for layer in layers}
    queries = ik.as_queries(QUERIES)
    (batch,) = query_batches(queries, tokenizer, batch_size=len(queries))
    io = capture(model, layers, batch, dtype=torch.float64)
    for b, (prompt, completion) in enumerate(QUERIES):
        ids, start = query_ids(tokenizer, prompt, completion)
        reference = autograd_grads(model, modules, ids, start)
        for layer in layers:
            got = per_sequence_grads(io[layer.name])[b]
            want = reference[layer.name]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def reference_scores(model, factors, train, tokenizer, damping):
    """Σ_ℓ ⟨Q_S[(Q_Sᵀ G_q Q_A) ⊘ (Λ+λ)]Q_Aᵀ, G_z⟩ with autograd gradients, explicitly."""
    modules = dict(model.named_modules())
    tracked = {name: modules[name] for name in factors.modules}
    gq = [autograd_grads(model, tracked, *query_ids(tokenizer, p, c)) for p, c in QUERIES]
    gz = [autograd_grads(model, tracked, list(ex.input_ids), 1) for ex in train]
    out = np.zeros((len(QUERIES), len(train), len(tracked)))
    for col, name in enumerate(tracked):
        lf = factors.layers[name]
        q_s, q_a, lam = lf.q_s, lf.q_a, lf.lam
        for q, g in enumerate(gq):
            pre = q_s @ ((q_s.T @ g[name] @ q_a) / (lam + damping[name])) @ q_a.T
            for z, h in enumerate(gz):
                out[q, z, col] = float((pre * h[name]).sum())
    return out


def test_fit_and_score_end_to_end(model, padded_train, tokenizer):
    factors = ik.fit_factors(model, padded_train, "all", strategy="ekfac", dtype=torch.float64,
                             batch_size=3, progress=False)  # fmt: skip
    assert factors.modules == [x.name for x in ik.select_modules(model, "all")]
    for lf in factors.layers.values():
        assert lf.lam.dtype == torch.float64 and torch.isfinite(lf.lam).all()
        assert (lf.lam >= 0).all() and lf.lam.sum() > 0
    result = ik.score(model, factors, QUERIES, padded_train, dtype=torch.float64, batch_size=3,
                      progress=False)  # fmt: skip
    assert result.layer_scores.shape == (len(QUERIES), len(padded_train), len(factors.modules))
    assert np.isfinite(result.scores).all()
    assert np.abs(result.scores).max() > 0
    damping = factors.damping_for(None)
    want = reference_scores(model, factors, padded_train, tokenizer, damping)
    np.testing.assert_allclose(result.layer_scores, want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())  # fmt: skip


# ---------------------------------------------------------------------------------------------
# (d) OPT's MLP, which flattens its (B, T, d) inputs to (B*T, d)


def test_opt_mlp_with_one_sequence_per_batch_matches_autograd(tokenizer, padded_train):
    """OPT flattens (B, T, d) to (B*T, d) around fc1/fc2: one sequence per batch is exact too."""
    model = exact_model("opt", len(tokenizer), layers=1)
    layers = ik.select_modules(model, "mlp")
    modules = {layer.name: layer.module for layer in layers}
    for batch in example_batches(padded_train, batch_size=1):
        io = capture(model, layers, batch, dtype=torch.float64)
        ids = batch.input_ids[0].tolist()
        reference = autograd_grads(model, modules, ids, start=1)
        for layer in layers:
            got = per_sequence_grads(io[layer.name])[0]
            want = reference[layer.name]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
