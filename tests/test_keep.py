"""Keepers (``influencekit.keep``) against the obvious reference: every score in one array,
sorted at the end.

Blocks arrive in a shuffled order and of uneven sizes, as batches of a length-ordered dataset
or blocks of a store do. ``TopK`` must keep exactly each query's ``k`` highest totals (ties by
lower index), ``AllScores`` every score in place; ``best`` / ``replace`` / ``final`` (what
``refine`` uses) must act as replacing the scores in the full array and sorting again.
"""

from __future__ import annotations

import numpy as np
import pytest

from influencekit.keep import AllScores, TopK, keeper

N_QUERIES, N_TRAIN, N_LAYERS = 3, 37, 2


def blocks(rng: np.random.Generator, scores: np.ndarray):
    """``scores`` ``(Q, N, L)`` as shuffled blocks of 1 to 8 training indices."""
    order = rng.permutation(scores.shape[1])
    cuts = np.cumsum(rng.integers(1, 9, size=scores.shape[1]))
    for piece in np.split(order, cuts[cuts < len(order)]):
        yield piece, scores[:, piece]


def reference_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Each query's ``k`` best training indices: highest total first, ties by lower index."""
    totals = scores.sum(-1)
    return np.array([sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in totals])


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(N_QUERIES, N_TRAIN, N_LAYERS))
    values[:, 5] = values[:, 9]  # equal totals: the lower index must win
    return values


@pytest.mark.parametrize("k", [1, 4, N_TRAIN, N_TRAIN + 5])
def test_top_k_keeps_the_k_highest_of_shuffled_blocks(scores, k):
    keep = TopK(N_QUERIES, k, N_LAYERS)
    for indices, block in blocks(np.random.default_rng(k), scores):
        keep.add(indices, block)
    layer_scores, indices = keep.final()
    want = reference_top(scores, k)
    np.testing.assert_array_equal(indices, want)
    rows = np.arange(N_QUERIES)[:, None]
    np.testing.assert_array_equal(layer_scores, scores[rows, want])


def test_all_scores_puts_every_block_in_place(scores):
    keep = AllScores(N_QUERIES, N_TRAIN, N_LAYERS)
    for indices, block in blocks(np.random.default_rng(1), scores):
        keep.add(indices, block)
    layer_scores, indices = keep.final()
    assert indices is None
    np.testing.assert_array_equal(layer_scores, scores)
    np.testing.assert_array_equal(keep.best(4), reference_top(scores, 4))


@pytest.mark.parametrize("top_k", [None, 3])
def test_replace_then_final_is_replacing_in_the_full_array(scores, top_k):
    """What ``refine`` does: the ``refine`` best candidates get new scores, then the top
    ``top_k`` are taken from the corrected scores."""
    refine = 6
    keep = keeper(N_QUERIES, N_TRAIN, N_LAYERS, None if top_k is None else max(top_k, refine))
    for indices, block in blocks(np.random.default_rng(2), scores):
        keep.add(indices, block)
    candidates = keep.best(refine)
    np.testing.assert_array_equal(candidates, reference_top(scores, refine))
    exact = np.random.default_rng(3).normal(size=(N_QUERIES, refine, N_LAYERS))
    keep.replace(candidates, exact)

    corrected = scores.copy()
    corrected[np.arange(N_QUERIES)[:, None], candidates] = exact
    layer_scores, indices = keep.final(top_k)
    if top_k is None:
        np.testing.assert_array_equal(layer_scores, corrected)
        return
    # Only the kept candidates compete: the top-k keeper never saw the others again.
    kept = reference_top(scores, max(top_k, refine))
    rows = np.arange(N_QUERIES)[:, None]
    totals = corrected[rows, kept].sum(-1)
    order = np.array([sorted(range(len(r)), key=lambda j: (-r[j], kept[q, j]))[:top_k]
                      for q, r in enumerate(totals)])  # fmt: skip
    np.testing.assert_array_equal(indices, kept[rows, order])
    np.testing.assert_array_equal(layer_scores, corrected[rows, kept[rows, order]])


def test_keeper_chooses_by_top_k():
    assert isinstance(keeper(1, 5, 1, None), AllScores)
    assert isinstance(keeper(1, 5, 1, 2), TopK)
