"""Scoring from a gradient store against on-the-fly scoring and explicit brute force.

What is checked (DESIGN.md §2; store/codecs.py for the codec theory):

1. A dense float32 store (several parts, padded batches) scores exactly like on-the-fly
   scoring: totals and per layer, ``modules="all"``, a store holding more layers than the
   factors, a store whose layers are listed in another order, and ``query_rank``.
2. float64: every codec in the regime where theory says it is exact (``dense``; ``kron:K``
   with ``K >= max(d_out, d_in)``; ``lowrank:R`` with ``R >=`` every sequence's token count;
   ``eig:K`` with ``K >= max(d_out, d_in)``) equals on-the-fly float64 scores to 1e-9, with
   and without ``query_rank``; smaller sizes do not. A ``kron:8`` store is checked against an
   independent brute force: ``G_z`` and ``G_q`` from ``torch.autograd`` on the module
   weights, ``P_q`` from the explicit EK-FAC formula, the projections and stored arrays read
   with plain h5py, and ``⟨P_out P_q P_inᵀ, P_out G_z P_inᵀ⟩`` computed by hand.
3. Codec error (printed with ``pytest -s``): for ``kron``, ``lowrank`` and ``eig`` at small
   sizes, the correlation with dense scores is positive but below 1 and improves with the
   size; ``kron`` is unbiased (the mean over projection seeds approaches the dense scores).
4. ``top_k``: the first ``k`` of the full ordering, per layer too; ``top_k > N``;
   ``save``/``load`` keep the indices; ``top(q, k)`` gives training indices.
5. ``refine``: refined candidates carry exact scores (the full ``P_q``, even with
   ``query_rank``), with and without ``top_k``; the final top list is sorted by them.
6. ``store.blocks``: rows 0..N-1 once, in order, bounded by the block size; tiny blocks
   give the same scores.
7. ``store.dataset()`` and ``store.tokenizer()`` give back the training set and tokenizer.
8. A float16 store takes half the bytes and scores within 1e-2 of the float32 store.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

import h5py
import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import influencekit as ik
from influencekit.store.reader import GradientStore
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_models import make_model

F32, F64 = torch.float32, torch.float64
MAX_LENGTH = 40
# Twelve texts of 23..41 tokens (41 is cut to 40): every batch of 3 or 4 holds padding.
TRAIN_TEXTS = [TINY_CORPUS[i] for i in (12, 1, 20, 33, 28, 4, 11, 36, 0, 15, 25, 39)]
QUERIES = [
    ("The chef tastes the stew", " and adds more pepper."),
    ("A comet", " grows a long tail when it nears the sun."),
    ("The sailors raise", " the mainsail at dawn."),
]
# Short sequences (5..12 tokens) for the float64 checks: fewer tokens than the smallest
# dimension of every MLP layer (16), so lowrank:12 is exact because of the token count,
# not because the rank is capped by the layer's shape.
SHORT_MAX_LENGTH = 12
SHORT_TEXTS = [
    " ".join(TINY_CORPUS[i].split()[:n])
    for i, n in zip(range(2, 40, 4), (2, 5, 3, 6, 4, 7, 2, 5, 3, 6), strict=True)
]
CHUNK = 5  # examples per part: 12 examples -> 3 parts (5, 5, 2)


def assert_rel(actual, expected, rtol, what=""):
    """``|actual - expected| <= rtol × (|expected| + max|expected|)`` elementwise."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    atol = rtol * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def rel_error(actual, expected) -> float:
    """``max|actual - expected| / max|expected|``."""
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def top_order(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries, highest first, ties by lower index."""
    return np.lexsort((np.arange(len(row)), -row))[:k]


# ---------------------------------------------------------------------------------------------
# Fixtures: a float32 world (12 sequences) and a float64 world (10 short sequences)


class World:
    """A model, its factors, its training set, on-the-fly reference scores, and stores."""

    def __init__(self, folder, tokenizer, texts, max_length, dtype, modules="mlp"):
        self.folder = folder
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.train = ik.TextDataset.from_texts(texts, tokenizer, max_length)
        self.model = make_model("gpt2", len(tokenizer), dtype=dtype)
        self.factors = ik.fit_factors(
            self.model, self.train, modules, dtype=dtype, batch_size=4, progress=False
        )
        self.exact = self.score(self.train, batch_size=4)
        self._stores = {}

    def score(self, train, **kw):
        kw.setdefault("batch_size", 3)
        factors = kw.pop("factors", self.factors)
        return ik.score(self.model, factors, QUERIES, train, dtype=self.dtype, progress=False,
                        **kw)  # fmt: skip

    def store(self, codec="dense", dtype=None, **kw) -> GradientStore:
        """A store built once per (codec, dtype, options) in this world's folder."""
        dtype = dtype or ("float64" if self.dtype == F64 else "float32")
        options = {"chunk_size": CHUNK, "batch_size": 3, **kw}
        key = (codec, dtype, json.dumps(options, sort_keys=True, default=str))
        if key not in self._stores:
            name = f"s{len(self._stores)}-{codec.replace(':', '')}-{dtype}.h5"
            self._stores[key] = ik.GradientStore.build(
                self.folder / name, self.model, self.train, codec=codec, dtype=dtype,
                factors=self.factors, progress=False, **options,
            )  # fmt: skip
        return self._stores[key]


@pytest.fixture(scope="module")
def w32(tokenizer, tmp_path_factory):
    world = World(tmp_path_factory.mktemp("w32"), tokenizer, TRAIN_TEXTS, MAX_LENGTH, F32)
    lengths = [len(ex.input_ids) for ex in world.train]
    assert len(set(lengths)) >= 10 and max(lengths) == MAX_LENGTH, lengths
    return world


@pytest.fixture(scope="module")
def w64(tokenizer, tmp_path_factory):
    world = World(tmp_path_factory.mktemp("w64"), tokenizer, SHORT_TEXTS, SHORT_MAX_LENGTH, F64)
    lengths = [len(ex.input_ids) for ex in world.train]
    assert len(set(lengths)) >= 3 and max(lengths) == SHORT_MAX_LENGTH, lengths
    return world


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
# 2. float64: exact codecs, and an independent brute force of the kron contraction


def max_dim(world) -> int:
    return max(max(world.factors.layers[n].shape) for n in world.factors.modules)


@pytest.mark.parametrize("kind", ["dense", "kron", "lowrank", "eig"])
def test_exact_codecs_float64(w64, kind):
    shapes = [w64.factors.layers[n].shape for n in w64.factors.modules]
    max_tokens = max(len(ex.input_ids) for ex in w64.train)
    assert max_tokens < min(min(s) for s in shapes)  # lowrank is not exact by a shape cap
    size = {"dense": 0, "kron": max_dim(w64), "lowrank": max_tokens, "eig": max_dim(w64)}[kind]
    codec = "dense" if kind == "dense" else f"{kind}:{size}"
    store = w64.store(codec)
    assert store.codec == codec and store.dtype == np.float64
    result = w64.score(store)
    assert result.meta["codec"] == codec
    assert_rel(result.layer_scores, w64.exact.layer_scores, 1e-9, what=codec)
    assert_rel(result.scores, w64.exact.scores, 1e-9, what=f"{codec} total")
    # query_rank: the rank-r factors meet every codec's stored form (factored paths).
    ranked = w64.score(store, query_rank=2)
    ranked_exact = w64.score(w64.train, query_rank=2)
    assert_rel(ranked.layer_scores, ranked_exact.layer_scores, 1e-9, what=f"{codec} rank 2")
    # A float64 store is scored in float64 whatever dtype= says (float32 would be ~1e-7 off).
    default = ik.score(w64.model, w64.factors, QUERIES, store, progress=False)
    assert_rel(default.layer_scores, w64.exact.layer_scores, 1e-9, what=f"{codec} dtype=None")


@pytest.mark.parametrize("codec", ["kron:16", "lowrank:4", "eig:8"])
def test_small_codecs_are_not_exact_float64(w64, codec):
    """The negative control of the test above: below the exact sizes, scores do change."""
    result = w64.score(w64.store(codec))
    err = rel_error(result.layer_scores, w64.exact.layer_scores)
    assert err > 1e-4, f"{codec}: relative error {err:.2e}, expected an approximation"


def autograd_weight_grads(model, names, ids, first=0) -> dict[str, torch.Tensor]:
    """``∇_W Σ_{t>=first} -log p(ids[t+1] | ids[:t+1])`` per module, (d_out, d_in + 1), bias
    last: one sequence, batch size 1, no padding, ``torch.autograd.grad`` on the weights."""
    modules = [model.get_submodule(name) for name in names]
    assert all(isinstance(m, Conv1D) and m.bias is not None for m in modules)
    logits = model(torch.tensor([list(ids)]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits, -1)
    loss = sum(-logp[t, ids[t + 1]] for t in range(first, len(ids) - 1))
    params = [p for m in modules for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(loss, params)
    # Conv1D keeps its weight as (d_in, d_out): transpose to (d_out, d_in).
    return {
        name: torch.cat([grads[2 * j].T, grads[2 * j + 1][:, None]], dim=1)
        for j, name in enumerate(names)
    }


def test_kron_store_equals_explicit_projection_float64(w64, tokenizer):
    k = 8
    store = w64.store(f"kron:{k}")
    names = store.modules
    # Projections and stored arrays with plain h5py: the manifest and the part files.
    with h5py.File(store.path, "r") as f:
        assert f.attrs["codec"] == f"kron:{k}"
        proj = {
            name: (f[f"layers/{j:04d}/p_out"][()], f[f"layers/{j:04d}/p_in"][()])
            for j, name in enumerate(names)
        }
        assert [f[f"layers/{j:04d}"].attrs["name"] for j in range(len(names))] == names
    parts = sorted(pathlib.Path(str(store.path) + ".d").glob("part-*.h5"))
    assert len(parts) == -(-len(w64.train) // CHUNK)
    stored = {name: [] for name in names}
    for part in parts:
        with h5py.File(part, "r") as f:
            for j, name in enumerate(names):
                stored[name].append(f[f"layers/{j:04d}/c"][()])
    stored = {name: torch.from_numpy(np.concatenate(v)) for name, v in stored.items()}

    for name in names:
        p_out, p_in = (torch.from_numpy(p) for p in proj[name])
        d_out, d_in = w64.factors.layers[name].shape
        assert p_out.shape == (min(k, d_out), d_out) and p_in.shape == (min(k, d_in), d_in)
        # Rows of a Haar orthogonal matrix scaled by sqrt(d/k): P Pᵀ = (d/k) I.
        for p, d in ((p_out, d_out), (p_in, d_in)):
            torch.testing.assert_close(p @ p.T, torch.eye(len(p), dtype=F64) * d / len(p))
        assert stored[name].shape == (len(w64.train), len(p_out), len(p_in))

    result = w64.score(store)
    damping = result.meta["damping"]
    train_grads = {
        i: autograd_weight_grads(w64.model, names, w64.train[i].input_ids) for i in (0, 3, 8)
    }
    for q, (prompt, completion) in enumerate(QUERIES):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
        g_q = autograd_weight_grads(w64.model, names, ids, first=len(prompt_ids) - 1)
        for col, name in enumerate(names):
            lf = w64.factors.layers[name]
            # The explicit EK-FAC preconditioned query P_q (DESIGN.md §2).
            rotated = lf.q_s.T @ g_q[name] @ lf.q_a
            p_q = lf.q_s @ (rotated / (lf.lam + damping[name])) @ lf.q_a.T
            p_out, p_in = (torch.from_numpy(p) for p in proj[name])
            for i, grads in train_grads.items():
                g_z = grads[name]
                compressed = p_out @ g_z @ p_in.T
                assert_rel(stored[name][i], compressed, 1e-9, what=f"{name} stored c, z{i}")
                expected = float(((p_out @ p_q @ p_in.T) * compressed).sum())
                assert_rel(result.layer_scores[q, i, col], expected, 1e-9,
                           what=f"{name} q{q} z{i} kron score")  # fmt: skip
                # The brute force itself agrees with the kit's exact scores.
                exact = float((p_q * g_z).sum())
                assert_rel(w64.exact.layer_scores[q, i, col], exact, 1e-9,
                           what=f"{name} q{q} z{i} exact")  # fmt: skip
    assert rel_error(result.layer_scores, w64.exact.layer_scores) > 1e-3  # K=8 < d: inexact


# ---------------------------------------------------------------------------------------------
# 3. Codec error at small sizes


CODEC_SIZES = {"kron": (2, 4, 8, 16, 32), "lowrank": (1, 2, 4, 8), "eig": (2, 4, 8, 16)}


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    """The whole tiny corpus (40 sequences), float32."""
    return World(tmp_path_factory.mktemp("corpus"), tokenizer, TINY_CORPUS, MAX_LENGTH, F32)


def test_codec_error_decreases_with_size(corpus):
    dense = corpus.score(corpus.store("dense", chunk_size=None)).scores
    assert_rel(dense, corpus.exact.scores, 1e-5, what="dense store")
    print(f"\ncodec error vs dense, {dense.shape[1]} sequences x {dense.shape[0]} queries")
    print(f"{'codec':>12} {'bytes/ex':>9} {'pearson':>8} {'rel.err':>8}")
    dense_bytes = corpus.store("dense", chunk_size=None).bytes_per_example()
    print(f"{'dense':>12} {dense_bytes:>9} {1:>8.4f} {0:>8.4f}")
    for kind, sizes in CODEC_SIZES.items():
        corr, err = [], []
        for size in sizes:
            store = corpus.store(f"{kind}:{size}", chunk_size=None)
            got = corpus.score(store).scores
            corr.append(float(np.corrcoef(got.ravel(), dense.ravel())[0, 1]))
            err.append(float(np.linalg.norm(got - dense) / np.linalg.norm(dense)))
            print(f"{kind + ':' + str(size):>12} {store.bytes_per_example():>9} "
                  f"{corr[-1]:>8.4f} {err[-1]:>8.4f}")  # fmt: skip
            assert store.bytes_per_example() < dense_bytes
        assert all(0 < c < 0.9999 for c in corr), (kind, corr)
        assert all(e > 1e-3 for e in err), (kind, err)
        # Better with size: overall, and step by step up to a little noise.
        assert 1 - corr[-1] < 0.5 * (1 - corr[0]), (kind, corr)  # the gap to 1 halves
        assert err[-1] < 0.5 * err[0], (kind, err)
        assert all(b > a - 0.05 for a, b in itertools.pairwise(corr)), (kind, corr)
        assert all(b < a * 1.1 for a, b in itertools.pairwise(err)), (kind, err)


def test_kron_is_unbiased_over_seeds(corpus):
    """E[PᵀP] = I for the scaled projections, so the mean over seeds tends to the dense score."""
    dense = corpus.score(corpus.store("dense", chunk_size=None)).scores
    draws = np.stack([
        corpus.score(corpus.store("kron:8", chunk_size=None, seed=seed)).scores
        for seed in range(24)
    ])  # fmt: skip
    single = [np.linalg.norm(d - dense) / np.linalg.norm(dense) for d in draws]
    mean = np.linalg.norm(draws.mean(0) - dense) / np.linalg.norm(dense)
    print(f"\nkron:8 over 24 seeds: median single rel.err {np.median(single):.3f}, "
          f"mean of draws {mean:.3f}")  # fmt: skip
    assert len({round(float(d.sum()), 6) for d in draws}) == len(draws)  # seeds differ
    # Independent draws: the error of the mean shrinks like 1/sqrt(24) ~ 0.2.
    assert mean < 0.45 * np.median(single), (mean, np.median(single))


# ---------------------------------------------------------------------------------------------
# 4. top_k


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
# 5. refine


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
# 6. Streaming


def test_blocks_cover_rows_once_in_order(w32, monkeypatch):
    store = w32.store("dense")
    n, per_example = len(store), store.bytes_per_example()
    expected_bytes = sum(
        int(np.prod(w32.factors.layers[m].shape)) for m in store.modules
    ) * 4  # fmt: skip
    assert per_example == expected_bytes
    everything = [arrays for _, arrays in store.blocks()]
    reference = [
        np.concatenate([arrays[j]["g"] for arrays in everything]) for j in range(len(store.modules))
    ]
    assert [len(r) for r in reference] == [n] * len(store.modules)
    # Blocks hold whole HDF5 chunks (a chunk is never read twice), so at least one chunk.
    chunk = max(h5py.File(p)["/"].attrs["chunk_rows"] for p in store.part_paths())
    for block_bytes in (1, per_example, 2 * per_example + 1, 3 * per_example, 10**9):
        rows_max = max(chunk, block_bytes // per_example)
        seen, pieces = [], [[] for _ in store.modules]
        for first, arrays in store.blocks(block_bytes=block_bytes):
            rows = {len(a["g"]) for a in arrays}
            assert len(rows) == 1, rows
            (count,) = rows
            assert 1 <= count <= rows_max
            assert count * per_example <= max(block_bytes, chunk * per_example)
            seen.extend(range(first, first + count))
            for j, a in enumerate(arrays):
                assert a["g"].shape[1:] == tuple(w32.factors.layers[store.modules[j]].shape)
                pieces[j].append(a["g"])
        assert seen == list(range(n)), (block_bytes, seen)
        for j, piece in enumerate(pieces):
            np.testing.assert_array_equal(np.concatenate(piece), reference[j])
    # A subset of layers, by position.
    for first, arrays in store.blocks([2, 0], block_bytes=per_example):
        assert len(arrays) == 2
        rows = len(arrays[0]["g"])
        np.testing.assert_array_equal(arrays[0]["g"], reference[2][first : first + rows])
        np.testing.assert_array_equal(arrays[1]["g"], reference[0][first : first + rows])

    # Scores streamed one chunk at a time equal the default blocks' scores.
    default = w32.score(store)
    calls = []

    def tiny_blocks(layers=None, **kw):
        calls.append(layers)
        return GradientStore.blocks(store, layers, block_bytes=1)

    monkeypatch.setattr(store, "blocks", tiny_blocks)
    tiny = w32.score(store, top_k=5)
    whole = w32.score(store)
    assert calls, "score did not stream through store.blocks"
    # float32 matmuls of 1 row round differently from those of 5: equal up to float32 rounding.
    assert_rel(whole.layer_scores, default.layer_scores, 1e-5, what="block_bytes=1")
    for q in range(len(QUERIES)):
        order = top_order(default.scores[q], 5)
        np.testing.assert_array_equal(tiny.indices[q], order)


# ---------------------------------------------------------------------------------------------
# 7. The store keeps its sequences and tokenizer


def test_store_dataset_and_tokenizer(w32, tokenizer, tmp_path):
    records = [
        {"text": TINY_CORPUS[i], "id": f"ex-{i}" if i % 2 else i, "theme": theme, "rank": r,
         "tags": [theme, "t"], "weight": 0.5 * r, "note": None}
        for r, (i, theme) in enumerate([(0, "cooking"), (13, "astronomy"), (21, "sailing"),
                                        (30, "music"), (12, "astronomy"), (5, "cooking")])
    ]  # fmt: skip
    records.append({"text": "Ünïcode ☃ sails — beyond the corpus, twice over " * 3, "id": "ü"})
    train = ik.TextDataset.from_records(records, tokenizer, max_length=24)
    assert any(len(ex.input_ids) == 24 for ex in train)  # one is truncated
    path = tmp_path / "grads.h5"
    built = ik.GradientStore.build(path, w32.model, train, chunk_size=3, batch_size=2,
                                   progress=False)  # fmt: skip
    for store in (built, ik.GradientStore.open(path)):
        assert len(store) == len(train) and store.ids == train.ids
        for ds in (store.dataset(), store.dataset(tokenizer)):
            assert len(ds) == len(train) and ds.max_length == train.max_length
            assert ds.ids == train.ids
            for mine, theirs in zip(ds, train, strict=True):
                assert mine.index == theirs.index
                assert mine.id == theirs.id and mine.text == theirs.text
                assert tuple(mine.input_ids) == tuple(theirs.input_ids)
                assert mine.metadata == theirs.metadata
        assert store.dataset()[2].metadata["theme"] == "sailing"
        rebuilt = store.tokenizer()
        texts = [r["text"] for r in records] + ["", " leading space", "x\ny\tz", "🚢 ⛵"]
        for text in texts:
            assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]
            ids = tokenizer(text)["input_ids"]
            assert rebuilt.decode(ids) == tokenizer.decode(ids)
        assert rebuilt.eos_token_id == tokenizer.eos_token_id
        assert len(rebuilt) == len(tokenizer)
    # The dataset read back scores like the original one (on the fly).
    factors = ik.fit_factors(w32.model, train, "mlp", batch_size=4, progress=False)
    a = w32.score(train, factors=factors)
    b = w32.score(built.dataset(), factors=factors)
    np.testing.assert_array_equal(a.layer_scores, b.layer_scores)
    assert b.train_ids == a.train_ids


# ---------------------------------------------------------------------------------------------
# 8. float16 store


@pytest.mark.parametrize("codec", ["dense", "kron:8"])
def test_float16_store(w32, codec):
    half, single = w32.store(codec, "float16"), w32.store(codec, "float32")
    assert half.dtype == np.float16
    assert 2 * half.bytes_per_example() == single.bytes_per_example()
    assert 2 * single.bytes_per_example() == w32.store(codec, "float64").bytes_per_example()
    with h5py.File(half.part_paths()[0], "r") as f:
        name = "g" if codec == "dense" else "c"
        assert f[f"layers/0000/{name}"].dtype == np.float16
    a, b = w32.score(half), w32.score(single)
    for col, layer in enumerate(a.layers):
        err = rel_error(a.layer_scores[..., col], b.layer_scores[..., col])
        assert err < 1e-2, f"{codec} {layer}: float16 relative error {err:.2e}"
    err = rel_error(a.scores, b.scores)
    assert 0 < err < 1e-2, err  # float16 rounding shows, but stays small


def test_token_ids_reads_just_the_asked_rows(w32):
    """refine reads its candidates' token ids row by row: they equal the full listing."""
    store = w32.store("dense")
    everything = store.examples().input_ids
    asked = [len(store) - 1, 0, 3, 3, 1]  # unsorted, repeated, across parts
    assert store.token_ids(asked) == [everything[i] for i in asked]
    assert store.token_ids([]) == []
    with pytest.raises(IndexError):
        store.token_ids([len(store)])
