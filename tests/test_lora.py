"""LoRA adapters (PEFT): loading an adapter directory, ``modules="lora"``, and the base layers.

1. Capture: on a tiny Llama (``nn.Linear``) and a tiny GPT-2 (``Conv1D`` base layers) with a
   PEFT adapter built here, the kit's per-sequence gradients of every ``lora_A``/``lora_B``
   equal ``torch.autograd`` gradients of those parameters (float64, a padded batch).
2. ``fit_factors`` and ``score`` on ``modules="lora"`` equal the float64 brute force of
   tests/helpers/reference.py (explicit covariances, eigh, a dense Hessian solve).
3. ``"mlp"`` on an adapted model tracks the base layers: its scores equal those of the
   merged model (``merge_and_unload``), and differ from the base model's without the adapter.
4. ``ik.load_model(adapter_dir)`` over its base (named in ``adapter_config.json`` or given as
   ``base=``) gives the same scores as the adapter built in memory; the store and token
   scores run on it.
5. Refusals, each one line naming what and where: the base missing, an adapter over another
   base model, pickled adapter weights, ``modules="lora"`` on a model without an adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.data import example_batches
from influencekit.hooks import capture, per_sequence_grads
from influencekit.tiny import TINY_CORPUS

from helpers.reference import (
    assert_close,
    dense_hessian,
    dense_solve,
    float64_model,
    query_pass,
    reference_factors,
    reference_pass,
)
from helpers.tiny_models import make_model

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
TEXTS = [TINY_CORPUS[i] for i in (12, 1, 20, 33, 28, 4)]
QUERIES = [("The chef tastes the stew", " and adds more pepper."), ("A comet", " grows a tail.")]
SEED = 3


def adapted(model, family: str, seed: int = 0):
    """``model`` with a rank-2 LoRA adapter whose A and B are both random (PEFT's default
    B = 0 would make every A gradient zero), scaling alpha / r = 3."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=TARGETS[family],
        init_lora_weights=False,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return peft.get_peft_model(model, config).eval()


@pytest.fixture(scope="module")
def train(tokenizer):
    return ik.TextDataset.from_texts(TEXTS, tokenizer, max_length=40)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def world(request, tokenizer, train):
    """An adapted float64 model, its LoRA layers, and their brute-force factors."""
    model = adapted(float64_model(request.param, tokenizer), request.param)
    names = [layer.name for layer in ik.select_modules(model, "lora")]
    refs = reference_factors(model, names, train, "sampled", SEED)
    return request.param, model, names, refs


# ---------------------------------------------------------------------------------------------
# 1.-2. The adapter's linears against brute force


def test_lora_selects_every_a_and_b(world):
    family, _, names, _ = world
    adapted_layers = 2 * len(TARGETS[family])  # two blocks
    assert len(names) == 2 * adapted_layers
    assert sum(".lora_A." in n for n in names) == sum(".lora_B." in n for n in names)


def test_lora_capture_equals_autograd(world, train):
    _, model, names, _ = world
    layers = ik.select_modules(model, "lora")
    batch = next(example_batches(train, len(train)))  # one padded batch of every sequence
    io = capture(model, layers, batch, dtype=torch.float64)
    for i, example in enumerate(train):
        ref = reference_pass(model, names, example.input_ids)
        for name in names:
            found = per_sequence_grads(io[name])[i]
            assert_close(found, ref[name].g, what=f"{name}, sequence {i}")


def test_lora_fit_and_score_equal_brute_force(world, train, tokenizer):
    _, model, names, refs = world
    factors = ik.fit_factors(
        model, train, "lora", seed=SEED, batch_size=4, dtype=torch.float64, progress=False
    )
    for name in names:
        assert_close(factors.layers[name].lam, refs[name].lam["ekfac"], what=f"{name} Λ")
    result = ik.score(
        model, factors, QUERIES, train, batch_size=4, dtype=torch.float64, progress=False
    )
    train_grads = [reference_pass(model, names, ex.input_ids) for ex in train]
    queries = [query_pass(model, names, tokenizer, *q) for q in QUERIES]
    for j, name in enumerate(names):
        h = dense_hessian(refs[name], "ekfac", None)
        solved = dense_solve(h, torch.stack([q[name].g for q in queries]))
        expected = torch.einsum(
            "qij,nij->qn", solved, torch.stack([t[name].g for t in train_grads])
        )
        assert_close(result.layer_scores[:, :, j], expected, rtol=1e-8, what=name)


# ---------------------------------------------------------------------------------------------
# 3. Base layers of an adapted model are the merged model's layers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mlp_of_an_adapted_model_equals_the_merged_model(family, tokenizer, train):
    model = adapted(float64_model(family, tokenizer), family)
    names = [layer.name for layer in ik.select_modules(model, "mlp")]
    assert any(name.endswith(".base_layer") for name in names), names
    assert not any(".lora_" in name for name in names)

    def mlp_scores(m):
        factors = ik.fit_factors(m, train, "mlp", seed=SEED, dtype=torch.float64, progress=False)
        return ik.score(
            m, factors, QUERIES, train, dtype=torch.float64, progress=False
        ).layer_scores

    unmerged = mlp_scores(model)
    with model.disable_adapter():
        without = mlp_scores(model)
    merged = mlp_scores(model.merge_and_unload())
    assert_close(unmerged, merged, rtol=1e-8, what="merged vs unmerged")
    assert not np.allclose(unmerged, without, rtol=1e-3), "the adapter should change scores"


# ---------------------------------------------------------------------------------------------
# 4. Adapter directories


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tokenizer):
    """A float32 tiny Llama saved as a base directory, and an adapter directory over it."""
    root = tmp_path_factory.mktemp("lora")
    base = make_model("llama", len(tokenizer), dtype=torch.float32)
    base.save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    model = adapted(make_model("llama", len(tokenizer), dtype=torch.float32), "llama")
    model.save_pretrained(root / "adapter", safe_serialization=True)
    config_path = root / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(root / "base")
    config_path.write_text(json.dumps(config))
    return root, model


def test_load_adapter_directory_scores_like_the_model_it_was_saved_from(saved_adapter, train):
    root, original = saved_adapter
    loaded, tok = ik.load_model(root / "adapter", device="cpu")
    assert isinstance(loaded, peft.PeftModel) and not loaded.training
    assert tok("A comet")["input_ids"] == train.tokenizer("A comet")["input_ids"]
    results = []
    for model in (original, loaded):
        factors = ik.fit_factors(model, train, "lora", progress=False)
        results.append(ik.score(model, factors, QUERIES, train, progress=False))
    assert results[0].layers == results[1].layers
    np.testing.assert_allclose(results[1].scores, results[0].scores, rtol=1e-5, atol=1e-6)
    again, _ = ik.load_model(root / "adapter", base=root / "base", device="cpu")
    assert ik.model_fingerprint(again) == ik.model_fingerprint(loaded)


def test_store_and_token_scores_through_an_adapter(saved_adapter, train, tmp_path):
    root, _ = saved_adapter
    model, _ = ik.load_model(root / "adapter", device="cpu")
    factors = ik.fit_factors(model, train, "lora", progress=False)
    store = ik.GradientStore.build(
        tmp_path / "s.h5", model, train, factors=factors, codec="dense", progress=False
    )
    fly = ik.score(model, factors, QUERIES, train, progress=False)
    stored = ik.score(model, factors, QUERIES, store, progress=False)
    np.testing.assert_allclose(stored.scores, fly.scores, rtol=1e-4, atol=1e-5)
    tokens = ik.token_scores(model, factors, QUERIES[0], train[2])
    np.testing.assert_allclose(tokens.sum(), fly.scores[0, 2], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 5. Refusals


def copy_adapter(root, to, **config_changes):
    to.mkdir()
    for item in (root / "adapter").iterdir():
        (to / item.name).write_bytes(item.read_bytes())
    config = json.loads((to / "adapter_config.json").read_text())
    config.update(config_changes)
    (to / "adapter_config.json").write_text(json.dumps(config))
    return to


def test_adapter_whose_base_is_missing(saved_adapter, tmp_path):
    root, _ = saved_adapter
    missing = tmp_path / "no-such-base"
    adapter = copy_adapter(root, tmp_path / "a", base_model_name_or_path=str(missing))
    with pytest.raises(ik.MissingFileError, match=r"base model .*no-such-base") as info:
        ik.load_model(adapter)
    assert str(adapter) in str(info.value) and "\n" not in str(info.value)


def test_adapter_over_another_base_model(saved_adapter, tmp_path, tokenizer):
    root, _ = saved_adapter
    other = make_model("llama", len(tokenizer), dtype=torch.float32, hidden=24)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ik.ModelError, match=r"lora_A.*does not fit.*another base model") as info:
        ik.load_model(root / "adapter", base=tmp_path / "other")
    assert "adapter_model.safetensors" in str(info.value)


def test_adapter_over_a_base_without_its_layers(saved_adapter, tmp_path, tokenizer):
    root, _ = saved_adapter
    other = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    other.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        ik.ModelError,
        match=r"adapts model\.layers\.\d\.\S+, which base model .*gpt2 has no linear layer",
    ):
        ik.load_model(root / "adapter", base=tmp_path / "gpt2")


def test_pickled_adapter_weights_are_refused(saved_adapter, tmp_path):
    root, _ = saved_adapter
    adapter = copy_adapter(root, tmp_path / "a")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ik.ModelError, match=r"pickled adapter weights \(adapter_model\.bin\)"):
        ik.load_model(adapter)


def test_lora_on_a_model_without_an_adapter(tokenizer, train):
    model = make_model("llama", len(tokenizer), dtype=torch.float32)
    with pytest.raises(ik.ModelError, match=r"modules='lora': this model has no LoRA adapter"):
        ik.fit_factors(model, train, "lora", progress=False)


def test_base_without_an_adapter_is_a_parameter_error(saved_adapter):
    root, _ = saved_adapter
    with pytest.raises(ik.ParameterError, match="base"):
        ik.load_model(root / "base", base=root / "base")


def test_command_line_through_an_adapter(saved_adapter, train, tmp_path):
    from influencekit.cli import main

    root, _ = saved_adapter
    rows = [{"id": ex.id, "text": ex.text} for ex in train]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    queries = [{"prompt": p, "completion": c} for p, c in QUERIES]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    common = ["--model", str(root / "adapter"), "--train", str(tmp_path / "t.jsonl")]
    common += ["--max-length", "40", "--device", "cpu", "--quiet"]
    assert main(["fit", *common, "--modules", "lora", "--out", str(tmp_path / "f.h5")]) == 0
    factors = ik.Factors.load(tmp_path / "f.h5")
    assert factors.modules and all(".lora_" in name for name in factors.modules)
    out = ["--factors", str(tmp_path / "f.h5"), "--queries", str(tmp_path / "q.jsonl")]
    assert main(["score", *common, *out, "--out", str(tmp_path / "r.h5")]) == 0
    model, _ = ik.load_model(root / "adapter", device="cpu")
    expected = ik.score(model, factors, QUERIES, train, progress=False)
    found = ik.InfluenceResult.load(tmp_path / "r.h5")
    np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-5, atol=1e-7)
