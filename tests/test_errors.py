"""Error paths that cut across the engine: every failure is a clear influencekit error naming
the culprit, whichever public function meets it.

Here: module selection (``select_modules`` and ``fit_factors``); non-finite weights,
activations, gradients and factors (``fit_factors``, ``score`` and ``token_scores`` name the
layer, and the training example or query); bad parameters (each named, whichever function
gets it); and inputs the model cannot take. The tests share a float32 tiny Llama and its
factors (``llama``, ``llama_train``, ``llama_factors`` in conftest.py).

Errors that belong to one module are tested with it: data files in test_data.py, factors
files and factors of another model in test_factors.py, ``InfluenceResult`` construction and
files in test_result.py, queries handed to ``score`` and ``token_scores`` without a
tokenizer in test_scoring.py, gradient stores in test_store_faults.py and test_reader.py.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import sys

import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers.engines import MLP_NAME, QUERY
from helpers.tiny_models import make_model


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
def test_bad_module_selection_lists_candidates(llama, llama_train, modules, what):
    for call in (
        lambda: ik.select_modules(llama, modules),
        lambda: ik.fit_factors(llama, llama_train, modules, progress=False),
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
def test_fit_factors_names_tracked_layer_with_nonfinite_weight(llama, llama_train, value):
    layer = "model.layers.1.mlp.down_proj"
    broken = broken_copy(llama, f"{layer}.weight", (3, 5), value)
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.fit_factors(broken, llama_train, "mlp", progress=False)


def test_fit_factors_names_gpt2_layer_with_nan_bias(tokenizer, llama_train):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    layer = "transformer.h.1.mlp.c_fc"
    broken = broken_copy(model, f"{layer}.bias", 0)
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.fit_factors(broken, llama_train, "mlp", strategy="diagonal", progress=False)


def test_score_names_tracked_layer_with_nan_weight(llama, llama_factors, llama_train):
    layer = "model.layers.1.mlp.down_proj"
    broken = broken_copy(llama, f"{layer}.weight", (3, 5))
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.score(
            broken, refit_fingerprint(llama_factors, broken), [QUERY], llama_train, progress=False
        )


def test_score_reports_nan_weight_rather_than_fingerprint(llama, llama_factors, llama_train):
    layer = "model.layers.1.mlp.down_proj"
    broken = broken_copy(llama, f"{layer}.weight", (3, 5))
    with pytest.raises(ik.NonFiniteError, match=re.escape(layer)):
        ik.score(broken, llama_factors, [QUERY], llama_train, progress=False)


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_nan_in_untracked_layernorm_names_layer_and_example(
    llama, llama_factors, llama_train, fisher
):
    broken = broken_copy(llama, "model.layers.1.input_layernorm.weight", 2)
    # Every sequence goes through the norm: the first one is named.
    with pytest.raises(ik.NonFiniteError, match=r"layer model\.layers\.\d\.mlp\..*'t0'"):
        ik.fit_factors(broken, llama_train, "mlp", fisher=fisher, progress=False)
    with pytest.raises(ik.NonFiniteError, match=r"layer model\.layers\.\d\.mlp\..*'0'"):
        ik.score(
            broken, refit_fingerprint(llama_factors, broken), [QUERY], llama_train, progress=False
        )


def test_nan_embedding_row_names_the_training_example_using_it(
    llama, llama_factors, llama_train, tokenizer
):
    others = [ex.text for ex in llama_train if ex.id != "t3"] + ["".join(QUERY)]
    token = token_only_in(tokenizer, [llama_train[3].text], others)
    broken = broken_copy(llama, "model.embed_tokens.weight", (token, 1))
    pattern = r"layer model\.layers\.0\.mlp\.gate_proj: .*example id 't3'"
    with pytest.raises(ik.NonFiniteError, match=pattern):
        ik.fit_factors(broken, llama_train, "mlp", progress=False)
    with pytest.raises(ik.NonFiniteError, match=pattern):
        ik.score(
            broken, refit_fingerprint(llama_factors, broken), [QUERY], llama_train, progress=False
        )


def test_inf_embedding_row_names_the_query_using_it(llama, llama_factors, llama_train, tokenizer):
    odd = {"id": "zq", "prompt": "Quokka zebra", "completion": " jumps"}
    token = token_only_in(tokenizer, [odd["prompt"]], [*(ex.text for ex in llama_train), *QUERY])
    broken = broken_copy(llama, "model.embed_tokens.weight", token, float("inf"))
    with pytest.raises(ik.NonFiniteError, match=r"layer model\.layers\.\d\..*example id 'zq'"):
        ik.score(
            broken,
            refit_fingerprint(llama_factors, broken),
            [QUERY, odd],
            llama_train,
            progress=False,
        )


def test_token_scores_names_training_example_id(llama, llama_factors, llama_train, tokenizer):
    token = token_only_in(tokenizer, [llama_train[3].text], ["".join(QUERY)])
    broken = broken_copy(llama, "model.embed_tokens.weight", (token, 1))
    with pytest.raises(ik.NonFiniteError, match="'t3'"):
        ik.token_scores(broken, refit_fingerprint(llama_factors, broken), QUERY, llama_train[3])


def nan_factors(factors, key="lam"):
    bad = copy.deepcopy(factors)
    tensor = getattr(bad.layers[MLP_NAME], key)
    tensor[(0,) * tensor.ndim] = float("nan")
    return bad


@pytest.mark.parametrize("key", ["lam", "q_a", "q_s"])
def test_score_with_nan_factors_never_returns_nan(llama, llama_factors, llama_train, key):
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.score(
            llama,
            nan_factors(llama_factors, key),
            [QUERY],
            llama_train,
            damping=0.1,
            progress=False,
        )


@pytest.mark.parametrize("key", ["lam", "q_a"])
def test_token_scores_with_nan_factors_never_returns_nan(llama, llama_factors, llama_train, key):
    bad = nan_factors(llama_factors, key)
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.token_scores(llama, bad, QUERY, llama_train[0], damping=0.1)


def test_nan_written_into_factors_after_a_score_is_still_refused(llama, llama_factors, llama_train):
    factors = copy.deepcopy(llama_factors)
    ik.score(llama, factors, [QUERY], llama_train, progress=False)  # found finite once
    factors.layers[MLP_NAME].lam[0, 0] = float("nan")  # then changed in place
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.score(llama, factors, [QUERY], llama_train, progress=False)


def test_nan_factors_with_default_damping_are_named_as_nonfinite(llama, llama_factors, llama_train):
    with pytest.raises(ik.NonFiniteError, match=re.escape(MLP_NAME)):
        ik.score(llama, nan_factors(llama_factors), [QUERY], llama_train, progress=False)


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
        ({"dtype": "half"}, "dtype"),
        ({"max_examples": 0}, "max_examples"),
        ({"max_examples": -3}, "max_examples"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_fit_factors_bad_parameter_is_named(llama, llama_train, kwargs, named):
    with pytest.raises(ValueError, match=named) as info:
        ik.fit_factors(llama, llama_train, "mlp", progress=False, **kwargs)
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
        ({"damping": {MLP_NAME: 0.1}}, r"damping must be a mapping naming exactly.*missing"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_score_bad_parameter_is_named(llama, llama_factors, llama_train, kwargs, named):
    with pytest.raises(ValueError, match=named):
        ik.score(llama, llama_factors, [QUERY], llama_train, progress=False, **kwargs)


@pytest.mark.parametrize("entry", ["fit_factors", "score"])
def test_batch_size_zero_is_named(llama, llama_factors, llama_train, entry):
    with pytest.raises(ValueError, match="batch_size"):
        if entry == "fit_factors":
            ik.fit_factors(llama, llama_train, "mlp", batch_size=0, progress=False)
        else:
            ik.score(llama, llama_factors, [QUERY], llama_train, batch_size=0, progress=False)


@pytest.mark.parametrize("damping", [-1, 0])
def test_token_scores_bad_damping_is_named(llama, llama_factors, llama_train, damping):
    with pytest.raises(ValueError, match="damping"):
        ik.token_scores(llama, llama_factors, QUERY, llama_train[0], damping=damping)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, "float16"])
def test_score_bad_dtype_is_named(llama, llama_factors, llama_train, dtype):
    with pytest.raises(ValueError, match="dtype"):
        ik.score(llama, llama_factors, [QUERY], llama_train, dtype=dtype, progress=False)


@pytest.mark.parametrize("query_rank", [1.5, "2"])
def test_score_non_integer_query_rank_is_named(llama, llama_factors, llama_train, query_rank):
    with pytest.raises((ValueError, TypeError), match="query_rank"):
        ik.score(llama, llama_factors, [QUERY], llama_train, query_rank=query_rank, progress=False)


# ---------------------------------------------------------------------------------------------
# Inputs the model cannot take


def test_tokenizer_larger_than_model_vocab_is_named(llama_train, tokenizer):
    small = make_model("llama", 100, dtype=torch.float32)
    with pytest.raises(ik.InfluenceKitError, match="vocab"):
        ik.fit_factors(small, llama_train, "mlp", progress=False)


def test_sequence_longer_than_model_positions_is_named(tokenizer):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    long = ik.TextDataset.from_texts([" ".join(TINY_CORPUS)], tokenizer, max_length=512)
    assert len(long[0].input_ids) > model.config.n_positions
    with pytest.raises(ik.InfluenceKitError, match="128"):
        ik.fit_factors(model, long, "mlp", strategy="diagonal", progress=False)
