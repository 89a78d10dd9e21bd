"""Scoring from a gradient store against on-the-fly scoring: ``score(..., store)``, with
``top_k`` and ``refine``.

What is checked (docs/math.md for the scores; store/codecs/ for the codec theory):

1. A dense float32 store (several parts, padded batches) scores exactly like on-the-fly
   scoring: totals and per layer, ``modules="all"``, a store holding more layers than the
   factors, a store whose layers are listed in another order, and ``query_rank``.
2. ``top_k``: the first ``k`` of the full ordering, per layer too; ``top_k > N``;
   ``save``/``load`` keep the indices; ``top(q, k)`` gives training indices.
3. ``refine``: refined candidates carry exact scores (the full ``P_q``, even with
   ``query_rank``), with and without ``top_k``; the final top list is sorted by them.
4. A float16 store takes half the bytes and scores within 1e-2 of the float32 store.
5. ``query_rank="auto"`` (the default): on a ``lowrank`` store within its Cauchy–Schwarz
   promise of ``"full"``, layer by layer; identical to ``"full"`` everywhere else.

The stores come from the ``w32`` (twelve sequences, float32) and ``w64`` (ten short
sequences, float64) worlds of conftest.py and helpers/store_worlds.py. Elsewhere: each
codec's exactness and error, against brute force, in test_codecs.py; reading a store
(``blocks``, ``rows``, ``gram``, ``token_ids``, ``dataset``, ``tokenizer``) in
test_reader.py; a store under faults in test_store_faults.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.forms import AUTO_ENERGY
from influencekit.scoring import preconditioned, query_tokens
from influencekit.settings import RunSettings

from helpers.store_worlds import CHUNK, QUERIES, assert_rel, rel_error, top_order

# ---------------------------------------------------------------------------------------------
# 1. Dense float32 store == on-the-fly float32


@pytest.mark.parametrize("build_batch", [3, 5])
def test_dense_store_equals_on_the_fly_float32(w32, build_batch):
    store = w32.store("dense", batch_size=build_batch)
    n = len(w32.train)
    assert len(store) == n and store.ids == w32.train.ids
    assert len(store.part_paths()) == -(-n // CHUNK) == 3
    assert store.codec == "dense" and store.modules == w32.factors.modules
    for score_batch in (2, 5):
        result = w32.score(store, batch_size=score_batch)
        assert result.layers == w32.factors.modules
        assert result.train_ids == w32.train.ids
        assert result.layer_scores.shape == (len(QUERIES), n, len(store.modules))
        assert not result.is_top_k and result.meta["codec"] == "dense"
        for col, name in enumerate(result.layers):
            assert_rel(result.layer_scores[..., col], w32.exact.layer_scores[..., col], 1e-5,
                       what=f"{name} (build bs {build_batch}, score bs {score_batch})")  # fmt: skip
        assert_rel(result.scores, w32.exact.scores, 1e-5, what="total")
    # The comparison is not vacuous: scores have both signs and differ across examples.
    assert (w32.exact.scores > 0).any() and (w32.exact.scores < 0).any()


def test_dense_store_all_modules_and_query_rank(w32):
    """Attention and MLP layers, a store with more layers than the factors, another order."""
    factors_all = ik.fit_factors(w32.model, w32.train, "all", batch_size=4, progress=False)
    assert any(".attn." in name for name in factors_all.modules)
    store_all = w32.store("dense", modules="all")
    assert store_all.modules == factors_all.modules
    exact_all = w32.score(w32.train, factors=factors_all)
    for rank in (None, 2):
        on_the_fly = (
            exact_all if rank is None
            else w32.score(w32.train, factors=factors_all, query_rank=rank)
        )  # fmt: skip
        got = w32.score(store_all, factors=factors_all, query_rank=rank)
        assert got.layers == factors_all.modules
        assert_rel(got.layer_scores, on_the_fly.layer_scores, 1e-5, what=f"all, rank {rank}")
    rank2 = w32.score(store_all, factors=factors_all, query_rank=2)
    assert rel_error(rank2.scores, exact_all.scores) > 1e-3  # rank 2 does change the scores

    # MLP factors against the "all" store: only the factors' layers are scored.
    subset = w32.score(store_all)
    assert subset.layers == w32.factors.modules
    assert_rel(subset.layer_scores, w32.exact.layer_scores, 1e-5, what="mlp factors, all store")

    # A store listing its layers in reverse order: results follow the factors' order.
    reverse = w32.store("dense", modules=list(reversed(w32.factors.modules)))
    assert reverse.modules == list(reversed(w32.factors.modules))
    got = w32.score(reverse)
    assert got.layers == w32.factors.modules
    assert_rel(got.layer_scores, w32.exact.layer_scores, 1e-5, what="reversed store layers")


# ---------------------------------------------------------------------------------------------
# 2. top_k


def test_top_k_matches_full_ordering(w32, tmp_path):
    store = w32.store("dense")
    full = w32.score(store)
    n = len(store)
    for k in (1, 4, n, n + 5):
        top = w32.score(store, top_k=k)
        kept = min(k, n)
        assert top.is_top_k and top.meta["top_k"] == k
        assert top.indices.shape == (len(QUERIES), kept)
        assert top.layer_scores.shape == (len(QUERIES), kept, len(store.modules))
        assert top.train_ids == store.ids
        for q in range(len(QUERIES)):
            order = top_order(full.scores[q], kept)
            np.testing.assert_array_equal(top.indices[q], order)
            assert_rel(top.layer_scores[q], full.layer_scores[q, order], 1e-12, what=f"k={k}")
            assert (np.diff(top.scores[q]) <= 0).all()
        if k >= n:  # every example, each once
            assert all(sorted(row) == list(range(n)) for row in top.indices.tolist())
    # On the fly, top_k picks the same examples.
    top = w32.score(store, top_k=4)
    on_the_fly = w32.score(w32.train, top_k=4)
    np.testing.assert_array_equal(on_the_fly.indices, top.indices)
    assert_rel(on_the_fly.layer_scores, top.layer_scores, 1e-5, what="on the fly top_k")

    # save / load keeps the indices.
    loaded = ik.InfluenceResult.load(top.save(tmp_path / "top.h5"))
    assert loaded.is_top_k
    np.testing.assert_array_equal(loaded.indices, top.indices)
    np.testing.assert_array_equal(loaded.layer_scores, top.layer_scores)
    assert loaded.train_ids == top.train_ids and loaded.query_ids == top.query_ids
    assert loaded.layers == top.layers and loaded.meta["top_k"] == 4
    # top(q, k) names training indices, with their scores.
    for q in range(len(QUERIES)):
        expected = [(int(i), float(full.scores[q, i])) for i in top_order(full.scores[q], 3)]
        for res in (top, loaded, full):
            got = res.top(q, 3)
            assert [i for i, _ in got] == [i for i, _ in expected]
            assert_rel([s for _, s in got], [s for _, s in expected], 1e-12, what="top()")


# ---------------------------------------------------------------------------------------------
# 3. refine


def test_refine_replaces_candidates_by_exact_scores(w32, tmp_path):
    store = w32.store("kron:4")
    rough = w32.score(store)
    exact = w32.exact
    assert rel_error(rough.layer_scores, exact.layer_scores) > 0.1  # kron:4 is rough here
    n, refine = len(store), 5
    queries = range(len(QUERIES))

    # Without top_k: the candidates are each query's best rough scores; only they change.
    res = w32.score(store, refine=refine)
    assert not res.is_top_k and res.meta["refine"] == refine
    candidates = [list(map(int, top_order(rough.scores[q], refine))) for q in queries]
    assert [list(c) for c in res.meta["refined"]] == candidates
    for q in queries:
        rest = sorted(set(range(n)) - set(candidates[q]))
        assert_rel(res.layer_scores[q, candidates[q]], exact.layer_scores[q, candidates[q]],
                   1e-5, what=f"refined q{q}")  # fmt: skip
        np.testing.assert_array_equal(res.layer_scores[q, rest], rough.layer_scores[q, rest])

    # top_k smaller than refine: all kept columns are refined, ranked by their exact scores.
    res = w32.score(store, top_k=3, refine=refine)
    assert res.is_top_k and res.indices.shape == (len(QUERIES), 3)
    assert [list(c) for c in res.meta["refined"]] == candidates
    for q in queries:
        cand = np.array(candidates[q])
        expected = cand[top_order(exact.scores[q, cand], 3)]
        np.testing.assert_array_equal(res.indices[q], expected)
        assert_rel(res.layer_scores[q], exact.layer_scores[q, expected], 1e-5, what=f"q{q}")
        assert (np.diff(res.scores[q]) <= 0).all()

    # top_k larger than refine: refined and rough scores side by side, sorted together.
    res = w32.score(store, top_k=8, refine=3)
    small = [list(map(int, top_order(rough.scores[q], 3))) for q in queries]
    assert [list(c) for c in res.meta["refined"]] == small
    for q in queries:
        assert set(res.indices[q].tolist()) == set(top_order(rough.scores[q], 8).tolist())
        assert (np.diff(res.scores[q]) <= 0).all(), res.scores[q]
        for j, i in enumerate(res.indices[q]):
            source = exact if i in small[q] else rough
            assert_rel(res.layer_scores[q, j], source.layer_scores[q, i], 1e-5,
                       what=f"q{q} column {j} (train {i})")  # fmt: skip
    # A refined result (with its candidate list in meta) saves and loads.
    loaded = ik.InfluenceResult.load(res.save(tmp_path / "refined.h5"))
    np.testing.assert_array_equal(loaded.indices, res.indices)
    assert loaded.meta["refined"] == res.meta["refined"]

    # refine beyond N: every example gets its exact score.
    res = w32.score(store, refine=n + 3)
    assert_rel(res.layer_scores, exact.layer_scores, 1e-5, what="refine > N")

    # With query_rank, the candidates come from rank-2 queries but the exact pass uses the
    # full P_q: refined scores equal the full-rank exact scores.
    ranked = w32.score(store, query_rank=2)
    res = w32.score(store, query_rank=2, refine=refine)
    for q in queries:
        cand = list(map(int, top_order(ranked.scores[q], refine)))
        assert list(res.meta["refined"][q]) == cand
        assert_rel(res.layer_scores[q, cand], exact.layer_scores[q, cand], 1e-5,
                   what=f"rank-2 refine q{q}")  # fmt: skip


def test_refine_float64_store(w64):
    store = w64.store("kron:4")
    res = w64.score(store, top_k=4, refine=6)
    for q in range(len(QUERIES)):
        cand = np.array(res.meta["refined"][q])
        expected = cand[top_order(w64.exact.scores[q, cand], 4)]
        np.testing.assert_array_equal(res.indices[q], expected)
        assert_rel(res.layer_scores[q], w64.exact.layer_scores[q, expected], 1e-9, what=f"q{q}")


# ---------------------------------------------------------------------------------------------
# 4. float16 store


@pytest.mark.parametrize("codec", ["dense", "kron:8"])
def test_float16_store(w32, codec):
    half, single = w32.store(codec, "float16"), w32.store(codec, "float32")
    assert half.dtype == np.float16
    assert 2 * half.gradient_bytes() == single.gradient_bytes()
    assert 2 * single.gradient_bytes() == w32.store(codec, "float64").gradient_bytes()
    with h5py.File(half.part_paths()[0], "r") as f:
        name = "g" if codec == "dense" else "c"
        assert f[f"layers/0000/{name}"].dtype == np.float16
    a, b = w32.score(half), w32.score(single)
    for col, layer in enumerate(a.layers):
        err = rel_error(a.layer_scores[..., col], b.layer_scores[..., col])
        assert err < 1e-2, f"{codec} {layer}: float16 relative error {err:.2e}"
    err = rel_error(a.scores, b.scores)
    assert 0 < err < 1e-2, err  # float16 rounding shows, but stays small


# ---------------------------------------------------------------------------------------------
# 5. query_rank="auto", the default


def test_auto_query_rank_is_within_its_promise_of_full(w64):
    """Against a ``lowrank:1`` store (where a rank-r query is cheaper for r up to about 17
    here) the default cuts each preconditioned query to the rank keeping ``AUTO_ENERGY`` of
    its squared norm, so per layer |auto − full| ≤ sqrt(1 − AUTO_ENERGY)·‖P_q‖·‖G_z‖
    (Cauchy–Schwarz, ``G_z`` as stored); where no rank pays, nothing changes."""
    store = w64.store("lowrank:1")
    full, auto = w64.score(store, query_rank="full"), w64.score(store)
    assert auto.meta["query_rank"] == "auto" and full.meta["query_rank"] == "full"
    ranks = auto.meta["query_ranks"]
    shapes = {name: w64.factors.layers[name].shape for name in auto.layers}
    assert all(1 <= ranks[name] <= min(shapes[name]) for name in auto.layers), ranks
    assert any(ranks[name] < min(shapes[name]) for name in auto.layers), ranks  # it did cut
    assert set(full.meta["query_ranks"].values()) == {"full"}

    run = RunSettings(dtype=torch.float64).on(w64.model)
    layers = w64.factors.tracked_layers(w64.model)
    tokens = query_tokens(w64.model, layers, ik.as_queries(QUERIES), w64.train.tokenizer, run)
    forms = preconditioned(w64.factors, tokens, w64.factors.damping_for(None))
    everything = list(range(len(store)))
    cut = 0
    for j, name in enumerate(auto.layers):
        p_norm = forms[name].flatten(1).norm(dim=1).numpy()
        g_norm = np.sqrt(np.diag(store.gram(everything, positions=[store.modules.index(name)])))
        bound = np.sqrt(1 - AUTO_ENERGY) * np.outer(p_norm, g_norm)
        gap = np.abs(auto.layer_scores[..., j] - full.layer_scores[..., j])
        assert (gap <= bound * (1 + 1e-9) + 1e-12).all(), (name, (gap / bound).max())
        cut += gap.max() > 1e-9 * np.abs(full.layer_scores[..., j]).max()
    assert cut > 0  # some layer's scores really moved, within the bound

    # Exact wherever cutting does not pay: on the fly, codecs that never gain from a rank,
    # and a lowrank:4 store, where the rank that keeps AUTO_ENERGY is too high to pay.
    for train in (w64.train, w64.store("dense"), w64.store("kron:4"), w64.store("lowrank:4")):
        auto, full = w64.score(train), w64.score(train, query_rank="full")
        np.testing.assert_array_equal(auto.layer_scores, full.layer_scores)
        assert set(auto.meta["query_ranks"].values()) == {"full"}
