"""Error paths of the engine: every failure is a clear influencekit error naming the culprit.

Data-file parsing errors live in test_data.py; here: module selection, non-finite weights,
activations and gradients, bad queries handed to ``score``, bad parameters, corrupted factors
files, mismatched models, and ``token_scores`` without a tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import sys

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.data import Example
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_models import make_model

TRAIN_IDS = [f"t{i}" for i in range(6)]
QUERY = ("The moon", " rises over the sea.")


@pytest.fixture(scope="module")
def train(tokenizer):
    return ik.TextDataset.from_texts(TINY_CORPUS[:6], tokenizer, ids=TRAIN_IDS)


@pytest.fixture(scope="module")
def llama(tokenizer):
    """A float32 tiny Llama (untied embeddings). Tests copy it before changing any weight."""
    return make_model("llama", len(tokenizer), dtype=torch.float32)


@pytest.fixture(scope="module")
def factors(llama, train):
    return ik.fit_factors(llama, train, "mlp", progress=False)


@pytest.fixture(scope="module")
def factors_file(factors, tmp_path_factory):
    return factors.save(tmp_path_factory.mktemp("factors") / "factors.h5")


def broken_copy(model, param_name, index, value=float("nan")):
    """A deep copy of ``model`` with ``param[index] = value``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        dict(model.named_parameters())[param_name][index] = value
    return model


def refit_fingerprint(factors, model):
    """The same factors, stamped with ``model``'s fingerprint.

    Stands for factors fitted on these very weights (fitting on non-finite weights is refused),
    so that ``score`` gets past the fingerprint check to the non-finite values themselves.
    """
    return dataclasses.replace(factors, fingerprint=ik.model_fingerprint(model))


def token_only_in(tokenizer, texts, others):
    """A token id that the ``texts`` use and none of ``others`` do."""
    used = {t for text in texts for t in tokenizer(text)["input_ids"]}
    elsewhere = {t for text in others for t in tokenizer(text)["input_ids"]}
    return sorted(used - elsewhere)[0]


# ---------------------------------------------------------------------------------------------
# Module selection


MLP_NAME = "model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize(
    ("modules", "what"),
    [
        (["model.layers.0.mlp.gate_prj"], "model.layers.0.mlp.gate_prj"),
        ([MLP_NAME, "nonexistent"], "nonexistent"),
        ("nonsense", "nonsense"),
        ("MLP", "MLP"),
        ([], "modules=[]"),
        (["lm_head"], "lm_head"),
        (["model.layers.0.input_layernorm"], "model.layers.0.input_layernorm"),
    ],
)
def test_bad_module_selection_lists_candidates(llama, train, modules, what):
    for call in (
        lambda: ik.select_modules(llama, modules),
        lambda: ik.fit_factors(llama, train, modules, progress=False),
    ):
        with pytest.raises(ik.ModelError) as info:
            call()
        message = str(info.value)
        assert what in message
        assert "Trackable layers:" in message
        for name in (MLP_NAME, "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            assert name in message


def test_module_listed_twice(llama):
    with pytest.raises(ik.ModelError, match="twice"):
        ik.select_modules(llama, [MLP_NAME, MLP_NAME])


@pytest.mark.parametrize("modules", [None, 3])
def test_modules_of_wrong_type_is_named(llama, modules):
    with pytest.raises((ik.ModelError, TypeError), match="modules"):
        ik.select_modules(llama, modules)


# ---------------------------------------------------------------------------------------------
# Non-finite weights, activations and gradients


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fit_factors_names_tracked_layer_with_nonfinite_weight(llama, train, value):
    layer = "model.layers.1.mlp.down_proj"
    broken = broken_copy(llama, f"{layer}.weight", (3, 5), value)
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.fit_factors(broken, train, "mlp", progress=False)


def test_fit_factors_names_gpt2_layer_with_nan_bias(tokenizer, train):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    layer = "transformer.h.1.mlp.c_fc"
    broken = broken_copy(model, f"{layer}.bias", 0)
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.fit_factors(broken, train, "mlp", strategy="diagonal", progress=False)


def test_score_names_tracked_layer_with_nan_weight(llama, factors, train):
    layer = "model.layers.1.mlp.down_proj"
    broken = broken_copy(llama, f"{layer}.weight", (3, 5))
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.score(broken, refit_fingerprint(factors, broken), [QUERY], train, progress=False)


def test_score_reports_nan_weight_rather_than_fingerprint(llama, factors, train):
    layer = "model.layers.1.mlp.down_proj"
    broken = broken_copy(llama, f"{layer}.weight", (3, 5))
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.score(broken, factors, [QUERY], train, progress=False)


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_nan_in_untracked_layernorm_names_layer_and_example(llama, factors, train, fisher):
    broken = broken_copy(llama, "model.layers.1.input_layernorm.weight", 2)
    # Every sequence goes through the norm: the first one is named.
    with pytest.raises(ik.NonFiniteError, match=r"layer model\.layers\.\d\.mlp\..*'t0'"):
        ik.fit_factors(broken, train, "mlp", fisher=fisher, progress=False)
    with pytest.raises(ik.NonFiniteError, match=r"layer model\.layers\.\d\.mlp\..*'0'"):
        ik.score(broken, refit_fingerprint(factors, broken), [QUERY], train, progress=False)


def test_nan_embedding_row_names_the_training_example_using_it(llama, factors, train, tokenizer):
    others = [ex.text for ex in train if ex.id != "t3"] + ["".join(QUERY)]
    token = token_only_in(tokenizer, [train[3].text], others)
    broken = broken_copy(llama, "model.embed_tokens.weight", (token, 1))
    pattern = r"layer model\.layers\.0\.mlp\.gate_proj: .*example id 't3'"
    with pytest.raises(ik.NonFiniteError, match=pattern):
        ik.fit_factors(broken, train, "mlp", progress=False)
    with pytest.raises(ik.NonFiniteError, match=pattern):
        ik.score(broken, refit_fingerprint(factors, broken), [QUERY], train, progress=False)


def test_inf_embedding_row_names_the_query_using_it(llama, factors, train, tokenizer):
    odd = {"id": "zq", "prompt": "Quokka zebra", "completion": " jumps"}
    token = token_only_in(tokenizer, [odd["prompt"]], [*(ex.text for ex in train), *QUERY])
    broken = broken_copy(llama, "model.embed_tokens.weight", token, float("inf"))
    with pytest.raises(ik.NonFiniteError, match=r"layer model\.layers\.\d\..*example id 'zq'"):
        ik.score(broken, refit_fingerprint(factors, broken), [QUERY, odd], train, progress=False)


def test_token_scores_names_training_example_id(llama, factors, train, tokenizer):
    token = token_only_in(tokenizer, [train[3].text], ["".join(QUERY)])
    broken = broken_copy(llama, "model.embed_tokens.weight", (token, 1))
    with pytest.raises(ik.NonFiniteError, match="'t3'"):
        ik.token_scores(broken, refit_fingerprint(factors, broken), QUERY, train[3])


def nan_factors(factors, key="lam"):
    bad = copy.deepcopy(factors)
    tensor = getattr(bad.layers[MLP_NAME], key)
    tensor[(0,) * tensor.ndim] = float("nan")
    return bad


@pytest.mark.parametrize("key", ["lam", "q_a", "q_s"])
def test_score_with_nan_factors_never_returns_nan(llama, factors, train, key):
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.score(llama, nan_factors(factors, key), [QUERY], train, damping=0.1, progress=False)


@pytest.mark.parametrize("key", ["lam", "q_a"])
def test_token_scores_with_nan_factors_never_returns_nan(llama, factors, train, key):
    bad = nan_factors(factors, key)
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.token_scores(llama, bad, QUERY, train[0], damping=0.1)


def test_nan_factors_with_default_damping_are_named_as_nonfinite(llama, factors, train):
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.score(llama, nan_factors(factors), [QUERY], train, progress=False)


# ---------------------------------------------------------------------------------------------
# Bad queries handed to score


@pytest.mark.parametrize(
    ("queries", "named"),
    [
        (("The moon", ""), "query"),
        ({"prompt": "The moon", "completion": "   "}, "query"),
        ([QUERY, ("The sea", "")], "queries[1]"),
        ([QUERY, {"id": "q7", "prompt": "The sea", "completion": ""}], "queries[1]"),
        ([ik.Query("The moon", "", id="q-empty")], "'q-empty'"),
    ],
)
def test_score_refuses_empty_completion(llama, factors, train, queries, named):
    with pytest.raises(ik.DataError, match="completion") as info:
        ik.score(llama, factors, queries, train, progress=False)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("queries", "named"),
    [(("", " rises"), "'0'"), ([QUERY, ik.Query("", " rises", id="no-prompt")], "'no-prompt'")],
)
def test_score_refuses_prompt_without_tokens(llama, factors, train, queries, named):
    with pytest.raises(ik.DataError, match="prompt gives 0 tokens") as info:
        ik.score(llama, factors, queries, train, progress=False)
    assert named in str(info.value)


@pytest.mark.parametrize("queries", [[], 42, ["The moon rises"], [("a", "b", "c")]])
def test_score_refuses_malformed_queries(llama, factors, train, queries):
    with pytest.raises(ik.DataError, match="quer"):
        ik.score(llama, factors, queries, train, progress=False)


def test_score_refuses_duplicate_query_ids(llama, factors, train):
    dupes = [ik.Query("The moon", " rises", id="q"), ik.Query("The sun", " sets", id="q")]
    with pytest.raises(ik.DataError, match="duplicate query id 'q'"):
        ik.score(llama, factors, dupes, train, progress=False)


def test_score_refuses_train_that_is_not_a_dataset(llama, factors):
    with pytest.raises(TypeError, match="TextDataset"):
        ik.score(llama, factors, [QUERY], list(TINY_CORPUS), progress=False)


# ---------------------------------------------------------------------------------------------
# Bad parameters


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"strategy": "eekfac"}, "strategy"),
        ({"strategy": "EKFAC"}, "strategy"),
        ({"fisher": "true"}, "fisher"),
        ({"dtype": torch.float16}, "dtype"),
        ({"dtype": torch.bfloat16}, "dtype"),
        ({"dtype": "float32"}, "dtype"),
        ({"max_examples": 0}, "max_examples"),
        ({"max_examples": -3}, "max_examples"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_fit_factors_bad_parameter_is_named(llama, train, kwargs, named):
    with pytest.raises(ValueError, match=named) as info:
        ik.fit_factors(llama, train, "mlp", progress=False, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value) or named == "dtype"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"query_rank": 0}, "query_rank"),
        ({"query_rank": -2}, "query_rank"),
        ({"damping": -1}, "damping"),
        ({"damping": 0}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"damping": float("inf")}, "damping"),
        ({"damping": {MLP_NAME: 0.1}}, "damping mapping has no entry for layer"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_score_bad_parameter_is_named(llama, factors, train, kwargs, named):
    with pytest.raises(ValueError, match=named):
        ik.score(llama, factors, [QUERY], train, progress=False, **kwargs)


@pytest.mark.parametrize("entry", ["fit_factors", "score"])
def test_batch_size_zero_is_named(llama, factors, train, entry):
    with pytest.raises(ValueError, match="batch_size"):
        if entry == "fit_factors":
            ik.fit_factors(llama, train, "mlp", batch_size=0, progress=False)
        else:
            ik.score(llama, factors, [QUERY], train, batch_size=0, progress=False)


@pytest.mark.parametrize("damping", [-1, 0])
def test_token_scores_bad_damping_is_named(llama, factors, train, damping):
    with pytest.raises(ValueError, match="damping"):
        ik.token_scores(llama, factors, QUERY, train[0], damping=damping)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, "float32"])
def test_score_bad_dtype_is_named(llama, factors, train, dtype):
    with pytest.raises(ValueError, match="dtype"):
        ik.score(llama, factors, [QUERY], train, dtype=dtype, progress=False)


@pytest.mark.parametrize("query_rank", [1.5, "2"])
def test_score_non_integer_query_rank_is_named(llama, factors, train, query_rank):
    with pytest.raises((ValueError, TypeError), match="query_rank"):
        ik.score(llama, factors, [QUERY], train, query_rank=query_rank, progress=False)


# ---------------------------------------------------------------------------------------------
# Inputs the model cannot take


def test_tokenizer_larger_than_model_vocab_is_named(train, tokenizer):
    small = make_model("llama", 100, dtype=torch.float32)
    with pytest.raises(ik.InfluenceKitError, match="vocab"):
        ik.fit_factors(small, train, "mlp", progress=False)


def test_sequence_longer_than_model_positions_is_named(tokenizer):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    long = ik.TextDataset.from_texts([" ".join(TINY_CORPUS)], tokenizer, max_length=512)
    assert len(long[0].input_ids) > model.config.n_positions
    with pytest.raises(ik.InfluenceKitError, match="128"):
        ik.fit_factors(model, long, "mlp", strategy="diagonal", progress=False)


# ---------------------------------------------------------------------------------------------
# InfluenceResult


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_result_with_nonfinite_layer_score_names_query_train_and_layer(bad):
    layer_scores = np.zeros((2, 3, 2))
    layer_scores[1, 2, 0] = bad
    with pytest.raises(ik.NonFiniteError) as info:
        ik.InfluenceResult(layer_scores, ["mlp.a", "mlp.b"], ["x", "y", "z"], ["q0", "q1"])
    message = str(info.value)
    assert "'q1'" in message and "'z'" in message and "mlp.a" in message


def test_result_with_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"shape \(3, 2, 2\)"):
        ik.InfluenceResult(np.zeros((3, 2, 2)), ["a", "b"], ["x", "y", "z"], ["q0", "q1"])


# ---------------------------------------------------------------------------------------------
# Factors files


def test_factors_load_missing_file(tmp_path):
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.h5"):
        ik.Factors.load(missing)


@pytest.mark.parametrize("content", [b"", b"layer,lambda\n0,1.0\n", bytes(range(256)) * 8])
def test_factors_load_non_hdf5_file(tmp_path, content):
    path = tmp_path / "factors.h5"
    path.write_bytes(content)
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


def test_factors_load_directory(tmp_path):
    with pytest.raises(ik.InfluenceKitError, match=re.escape(str(tmp_path))):
        ik.Factors.load(tmp_path)


def test_factors_load_result_file_names_its_format(tmp_path):
    path = tmp_path / "result.h5"
    ik.InfluenceResult(np.ones((1, 2, 1)), ["l"], ["a", "b"], ["q"]).save(path)
    with pytest.raises(ik.FileFormatError) as info:
        ik.Factors.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "influencekit.factors" in message and "influencekit.result" in message


def test_factors_load_foreign_hdf5_file(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["weights"] = np.arange(10.0)
        f.attrs["format"] = "keras"
    with pytest.raises(ik.FileFormatError, match=r"foreign\.h5.*format='keras'"):
        ik.Factors.load(path)
    with h5py.File(path, "w") as f:
        f["weights"] = np.arange(10.0)
    with pytest.raises(ik.FileFormatError, match=r"foreign\.h5.*format=None"):
        ik.Factors.load(path)


def copy_of(path, tmp_path, name="copy.h5"):
    target = tmp_path / name
    target.write_bytes(pathlib.Path(path).read_bytes())
    return target


def test_factors_load_newer_version_says_upgrade(factors_file, tmp_path):
    path = copy_of(factors_file, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = 99
    with pytest.raises(ik.FileFormatError, match="upgrade influencekit"):
        ik.Factors.load(path)


@pytest.mark.parametrize("attr", ["modules", "strategy", "model_fingerprint", "meta"])
def test_factors_load_missing_attribute(factors_file, tmp_path, attr):
    path = copy_of(factors_file, tmp_path)
    with h5py.File(path, "r+") as f:
        del f.attrs[attr]
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


def test_factors_load_missing_layer_group(factors_file, tmp_path):
    path = copy_of(factors_file, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["layers/0001"]
    with pytest.raises(ik.FileFormatError, match=r"layers/0001.*model\.layers\.0\.mlp\.up_proj"):
        ik.Factors.load(path)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.999])
def test_factors_load_truncated_file(factors_file, tmp_path, fraction):
    data = pathlib.Path(factors_file).read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


@pytest.mark.parametrize("key", ["q_a", "d_a", "q_s", "d_s", "lam"])
def test_factors_load_flipped_bytes_inside_a_dataset(factors_file, tmp_path, key):
    with h5py.File(factors_file, "r") as f:
        dataset = f[f"layers/0002/{key}"]
        assert dataset.fletcher32
        chunk = dataset.id.get_chunk_info(0)  # chunked (fletcher32), so no get_offset()
    data = bytearray(pathlib.Path(factors_file).read_bytes())
    for i in range(4):
        data[chunk.byte_offset + chunk.size // 2 + i] ^= 0xFF
    path = tmp_path / "flipped.h5"
    path.write_bytes(bytes(data))
    with pytest.raises(ik.FileFormatError) as info:
        ik.Factors.load(path)
    assert str(path) in str(info.value)
    assert f"layers/0002/{key}" in str(info.value)


@pytest.mark.parametrize(
    ("marker", "start"),
    [
        (b"SNOD", 1024),  # a symbol-table node of a layer group (not the root)
        (b'["model.layers.0.mlp', 0),  # inside the JSON 'modules' attribute
    ],
    ids=["group-structure", "json-attribute"],
)
def test_factors_load_damaged_bytes(factors_file, tmp_path, marker, start):
    data = bytearray(pathlib.Path(factors_file).read_bytes())
    at = data.find(marker, start)
    assert at > 0
    data[at] ^= 0xFF
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(data))
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


def test_factors_round_trip_still_scores(llama, factors_file, train):
    """Sanity check for the fixtures above: the undamaged file loads and scores."""
    loaded = ik.Factors.load(factors_file)
    result = ik.score(llama, loaded, [QUERY], train, progress=False)
    assert np.isfinite(result.scores).all()


# ---------------------------------------------------------------------------------------------
# Factors from another model


def test_score_with_factors_of_another_model(llama, factors, train, tokenizer):
    other = make_model("llama", len(tokenizer), dtype=torch.float32, seed=1)
    for call in (
        lambda: ik.score(other, factors, [QUERY], train, progress=False),
        lambda: ik.token_scores(other, factors, QUERY, train[0]),
    ):
        with pytest.raises(ik.ModelError) as info:
            call()
        message = str(info.value)
        assert factors.fingerprint in message
        assert ik.model_fingerprint(other) in message
        assert "refit" in message


def test_score_with_factors_of_another_architecture(factors, train, tokenizer):
    gpt2 = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    with pytest.raises(ik.ModelError, match=factors.fingerprint):
        ik.score(gpt2, factors, [QUERY], train, progress=False)


def test_factors_shape_mismatch_names_layer(llama, factors, train):
    bad = copy.deepcopy(factors)
    bad.layers[MLP_NAME].shape = (7, 7)
    with pytest.raises(ik.ModelError, match=re.escape(MLP_NAME) + r".*\(7, 7\)"):
        ik.score(llama, bad, [QUERY], train, progress=False)


# ---------------------------------------------------------------------------------------------
# token_scores without a tokenizer


def test_token_scores_without_any_tokenizer(llama, factors, train):
    example = train[0]
    bare = Example(example.index, example.id, example.text, example.input_ids, {})
    with pytest.raises(ValueError, match="tokenizer"):
        ik.token_scores(llama, factors, QUERY, bare)


def test_token_scores_uses_the_examples_tokenizer(llama, factors, train):
    with_tok = ik.token_scores(llama, factors, QUERY, train[2])
    explicit = ik.token_scores(llama, factors, QUERY, train[2], tokenizer=train.tokenizer)
    assert with_tok.shape == (len(train[2].input_ids),)
    np.testing.assert_array_equal(with_tok, explicit)
