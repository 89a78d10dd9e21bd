"""Bad arguments to the public functions: one table, one ParameterError per row.

Every row calls one public function with exactly one bad argument (the rest are good) and
expects :class:`influencekit.ParameterError` naming that parameter, raised by the check at
the top of the function: before a model runs or a file is written (each test's ``tmp_path``
must still be empty afterwards, which matters for ``GradientStore.build``).
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import influencekit as ik
import influencekit.widgets
from influencekit.tiny import TINY_CORPUS

from helpers.tiny_models import make_model

QUERIES = [("The moon", " rises over the sea."), ("The cook", " stirs the soup.")]
TEXTS = ["the cat sat on the mat", "a cat and a kitten", "stocks fell", "stocks rose"]


@pytest.fixture(scope="module")
def env(tokenizer):
    """A tiny float32 GPT-2, six training sequences, factors fitted on them, a two-query
    result and one query's themes: everything the good arguments of the rows need."""
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    train = ik.TextDataset.from_texts(TINY_CORPUS[:6], tokenizer, ids=[f"t{i}" for i in range(6)])
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    result = ik.score(model, factors, QUERIES, train, progress=False)
    themes = ik.themes.for_query(result, train, 0, top_k=4)
    return SimpleNamespace(model=model, train=train, factors=factors, result=result, themes=themes)


@dataclass(frozen=True)
class Late:
    """An argument made from the fixtures when the row runs (``make(env)``)."""

    make: Callable


def _call(function: Callable, defaults: Callable, bad: dict) -> Callable:
    """``run(env, tmp_path)``: ``function(**{**defaults(env, tmp_path), **bad})``."""

    def run(env, tmp_path):
        arguments = defaults(env, tmp_path)
        for name, value in bad.items():
            arguments[name] = value.make(env) if isinstance(value, Late) else value
        return function(**arguments)

    return run


def fit(**bad):
    def defaults(env, _):
        return {"model": env.model, "train": env.train, "progress": False}

    return _call(ik.fit_factors, defaults, bad)


def score(**bad):
    def defaults(env, _):
        return {
            "model": env.model,
            "factors": env.factors,
            "queries": QUERIES,
            "train": env.train,
            "progress": False,
        }

    return _call(ik.score, defaults, bad)


def build(**bad):
    def defaults(env, tmp_path):
        return {
            "path": tmp_path / "grads.h5",
            "model": env.model,
            "train": env.train,
            "codec": "dense",
            "progress": False,
        }

    return _call(ik.GradientStore.build, defaults, bad)


def tokens(**bad):
    def defaults(env, _):
        return {
            "model": env.model,
            "factors": env.factors,
            "query": QUERIES[0],
            "example": env.train[0],
        }

    return _call(ik.token_scores, defaults, bad)


def cluster(**bad):
    return _call(ik.themes.cluster, lambda env, _: {"texts": TEXTS}, bad)


def explorer(**bad):
    def defaults(env, _):
        return {"result": env.result, "dataset": env.train}

    return _call(ik.widgets.InfluenceExplorer, defaults, bad)


# (id, the parameter the error must name, the call with one bad argument)
CASES = [
    # fit_factors
    ("fit_factors-strategy=bogus", "strategy", fit(strategy="bogus")),
    ("fit_factors-fisher=bogus", "fisher", fit(fisher="bogus")),
    ("fit_factors-batch_size=0", "batch_size", fit(batch_size=0)),
    ("fit_factors-batch_size=True", "batch_size", fit(batch_size=True)),
    ("fit_factors-batch_size=2.5", "batch_size", fit(batch_size=2.5)),
    ("fit_factors-max_examples=0", "max_examples", fit(max_examples=0)),
    ("fit_factors-dtype=float16", "dtype", fit(dtype=torch.float16)),
    ("fit_factors-dtype='half'", "dtype", fit(dtype="half")),
    ("fit_factors-amp_dtype=float32", "amp_dtype", fit(amp_dtype=torch.float32)),
    ("fit_factors-seed=-1", "seed", fit(seed=-1)),
    ("fit_factors-seed='0'", "seed", fit(seed="0")),
    ("fit_factors-modules=42", "modules", fit(modules=42)),
    ("fit_factors-train=list", "train", fit(train=[1, 2])),
    ("fit_factors-device=nonsense", "device", fit(device="nonsense")),
    ("fit_factors-progress='yes'", "progress", fit(progress="yes")),
    # score
    ("score-damping=-1", "damping", score(damping=-1.0)),
    ("score-damping=nan", "damping", score(damping=math.nan)),
    ("score-damping='big'", "damping", score(damping="big")),
    ("score-damping=unknown-layer", "damping", score(damping={"no.such.layer": 1.0})),
    ("score-query_rank=0", "query_rank", score(query_rank=0)),
    ("score-query_rank=sometimes", "query_rank", score(query_rank="sometimes")),
    ("score-top_k=0", "top_k", score(top_k=0)),
    ("score-top_k=1.5", "top_k", score(top_k=1.5)),
    ("score-refine=0", "refine", score(refine=0)),
    ("score-refine=5-without-store", "refine", score(refine=5)),
    ("score-batch_size=0", "batch_size", score(batch_size=0)),
    ("score-dtype=int32", "dtype", score(dtype=torch.int32)),
    ("score-amp_dtype='fp8'", "amp_dtype", score(amp_dtype="fp8")),
    ("score-train=str", "train", score(train="not a dataset")),
    ("score-factors=str", "factors", score(factors="x")),
    # GradientStore.build
    ("build-codec='zip:3'", "codec", build(codec="zip:3")),
    ("build-codec='kron:0'", "codec", build(codec="kron:0")),
    ("build-codec=7", "codec", build(codec=7)),
    ("build-dtype='int8'", "dtype", build(dtype="int8")),
    ("build-batch_size=-1", "batch_size", build(batch_size=-1)),
    ("build-part_size=0", "part_size", build(part_size=0)),
    ("build-seed=-1", "seed", build(seed=-1)),
    ("build-train=list", "train", build(train=[1, 2])),
    ("build-eig-without-factors", "factors", build(codec="eig:4")),
    ("build-budget='lots'", "budget", build(codec=None, budget="lots")),
    ("build-budget=0", "budget", build(codec=None, budget=0)),
    ("build-budget-with-codec", "budget", build(budget="1MiB")),
    ("build-budget-too-small", "budget", build(codec=None, budget=64)),
    ("build-fidelity='yes'", "fidelity", build(fidelity="yes")),
    ("build-factors=str", "factors", build(codec="sparse:8", factors="x")),
    # token_scores
    ("token_scores-dtype=float16", "dtype", tokens(dtype=torch.float16)),
    ("token_scores-damping=0", "damping", tokens(damping=0.0)),
    ("token_scores-per_layer='yes'", "per_layer", tokens(per_layer="yes")),
    ("token_scores-example=str", "example", tokens(example="text")),
    # themes.cluster
    ("cluster-method=bogus", "method", cluster(method="bogus")),
    ("cluster-n_clusters=0", "n_clusters", cluster(n_clusters=0)),
    ("cluster-n_clusters>texts", "n_clusters", cluster(n_clusters=len(TEXTS) + 1)),
    ("cluster-max_clusters=0", "max_clusters", cluster(max_clusters=0)),
    ("cluster-n_terms=0", "n_terms", cluster(n_terms=0)),
    ("cluster-gram-shape", "gram", cluster(method="gradient", gram=np.eye(len(TEXTS) - 1))),
    ("cluster-vectors-rows", "vectors", cluster(method="gradient", vectors=np.eye(2))),
    ("cluster-texts=[]", "texts", cluster(texts=[])),
    # widgets.InfluenceExplorer
    ("explorer-result=str", "result", explorer(result="x")),
    ("explorer-k=0", "k", explorer(k=0)),
    ("explorer-themes-length", "themes", explorer(themes=Late(lambda env: [env.themes]))),
    (
        "explorer-queries-length",
        "queries",
        explorer(queries=[{"prompt": "The moon", "completion": " rises."}]),
    ),
]


@pytest.mark.parametrize(
    ("parameter", "call"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_argument_is_refused_naming_the_parameter(env, tmp_path, parameter, call):
    with pytest.raises(ik.ParameterError) as err:
        call(env, tmp_path)
    assert err.value.parameter == parameter
    assert re.search(rf"\b{re.escape(parameter)}\b", str(err.value)), str(err.value)
    assert list(tmp_path.iterdir()) == [], "a file was written before the check"


def test_the_table_covers_enough_cases():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


def test_parameter_error_is_every_kind_it_promises_and_pickles():
    error = ik.ParameterError("batch_size", 0, "an int >= 1")
    assert ik.ParameterError is influencekit.errors.ParameterError
    assert isinstance(error, ik.InfluenceKitError)
    assert isinstance(error, ValueError) and isinstance(error, TypeError)
    assert str(error) == "batch_size must be an int >= 1, got 0"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ik.ParameterError and str(copy) == str(error)
    assert (copy.parameter, copy.value, copy.allowed) == ("batch_size", 0, "an int >= 1")
