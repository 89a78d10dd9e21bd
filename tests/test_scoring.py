"""Tests of kit/scoring.py's handling of its inputs: the queries and training set handed to
``score``, and the tokenizer ``token_scores`` needs.

1. ``score`` refuses empty completions, prompts that give no tokens, malformed and duplicate
   queries (naming the query by position or id), and a training set that is not a dataset.
2. ``token_scores`` takes the tokenizer of the training example, and without one says so.

Elsewhere: ``score``, ``token_scores`` and ``query_rank`` against float64 brute force (the
dense inverse, the explicit preconditioned query gradient, the truncated SVD, and the sign
by a finite difference) in test_reference.py, which shares one reference implementation
between capture, factors and scores; every family end to end in test_families.py; scores
from a gradient store, ``top_k`` and ``refine`` in test_store_scoring.py; factors of another
model in test_factors.py; bad parameters and non-finite values in test_errors.py; batch size
in test_reproducible.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import influencekit as ik
from influencekit.data import Example
from influencekit.tiny import TINY_CORPUS

from helpers.engines import QUERY

# ---------------------------------------------------------------------------------------------
# 1. Bad queries handed to score


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
def test_score_refuses_empty_completion(llama, llama_factors, llama_train, queries, named):
    with pytest.raises(ik.DataError, match="completion") as info:
        ik.score(llama, llama_factors, queries, llama_train, progress=False)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("queries", "named"),
    [(("", " rises"), "'0'"), ([QUERY, ik.Query("", " rises", id="no-prompt")], "'no-prompt'")],
)
def test_score_refuses_prompt_without_tokens(llama, llama_factors, llama_train, queries, named):
    with pytest.raises(ik.DataError, match="prompt gives 0 tokens") as info:
        ik.score(llama, llama_factors, queries, llama_train, progress=False)
    assert named in str(info.value)


@pytest.mark.parametrize("queries", [[], 42, ["The moon rises"], [("a", "b", "c")]])
def test_score_refuses_malformed_queries(llama, llama_factors, llama_train, queries):
    with pytest.raises(ik.DataError, match="quer"):
        ik.score(llama, llama_factors, queries, llama_train, progress=False)


def test_score_refuses_duplicate_query_ids(llama, llama_factors, llama_train):
    dupes = [ik.Query("The moon", " rises", id="q"), ik.Query("The sun", " sets", id="q")]
    with pytest.raises(ik.DataError, match="duplicate query id 'q'"):
        ik.score(llama, llama_factors, dupes, llama_train, progress=False)


def test_score_refuses_train_that_is_not_a_dataset(llama, llama_factors):
    with pytest.raises(TypeError, match="TextDataset"):
        ik.score(llama, llama_factors, [QUERY], list(TINY_CORPUS), progress=False)


# ---------------------------------------------------------------------------------------------
# 2. token_scores and the tokenizer


def test_token_scores_without_any_tokenizer(llama, llama_factors, llama_train):
    example = llama_train[0]
    bare = Example(example.index, example.id, example.text, example.input_ids, {})
    with pytest.raises(ValueError, match="tokenizer"):
        ik.token_scores(llama, llama_factors, QUERY, bare)


def test_token_scores_uses_the_examples_tokenizer(llama, llama_factors, llama_train):
    with_tok = ik.token_scores(llama, llama_factors, QUERY, llama_train[2])
    explicit = ik.token_scores(
        llama, llama_factors, QUERY, llama_train[2], tokenizer=llama_train.tokenizer
    )
    assert with_tok.shape == (len(llama_train[2].input_ids),)
    np.testing.assert_array_equal(with_tok, explicit)
