"""Tests of store/codecs.py: how each codec keeps a training gradient, and how queries and
other stored gradients meet it.

1. float64: every codec in the regime where theory says it is exact (``dense``; ``kron:K``
   with ``K >= max(d_out, d_in)``; ``lowrank:R`` with ``R >=`` every sequence's token count;
   ``eig:K`` with ``K >= max(d_out, d_in)``) scores like on-the-fly float64 to 1e-9, with
   and without ``query_rank``; smaller sizes do not. A ``kron:8`` store is checked against an
   independent brute force: ``G_z`` and ``G_q`` from ``torch.autograd`` on the module
   weights, ``P_q`` from the explicit EK-FAC formula, the projections and stored arrays read
   with plain h5py, and ``⟨P_out P_q P_inᵀ, P_out G_z P_inᵀ⟩`` computed by hand.
2. Codec error (printed with ``pytest -s``): for ``kron``, ``lowrank`` and ``eig`` at small
   sizes, the correlation with dense scores is positive but below 1 and improves with the
   size; ``kron`` is unbiased (the mean over projection seeds approaches the dense scores).
3. The codecs' ``gram`` on random tensors, including the chunked lowrank path.

The stores are built through ``GradientStore.build`` in the worlds of
helpers/store_worlds.py (``w64`` from conftest.py, and the whole tiny corpus here).
Elsewhere: the Grams of stored gradients against autograd in test_reader.py; scoring from a
store (``top_k``, ``refine``, float16) in test_store_scoring.py.
"""

from __future__ import annotations

import itertools
import pathlib

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.store import codecs as codecs_module
from influencekit.store.codecs import make_codec, parse_codec
from influencekit.tiny import TINY_CORPUS

from helpers.store_worlds import (
    CHUNK,
    F32,
    F64,
    MAX_LENGTH,
    QUERIES,
    World,
    assert_rel,
    autograd_weight_grads,
    rel_error,
)

# ---------------------------------------------------------------------------------------------
# 1. float64: exact codecs, and an independent brute force of the kron contraction


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
    result = w64.score(store, query_rank="full")  # exact queries: the codec's exactness
    assert result.meta["codec"] == codec
    assert_rel(result.layer_scores, w64.exact.layer_scores, 1e-9, what=codec)
    assert_rel(result.scores, w64.exact.scores, 1e-9, what=f"{codec} total")
    # query_rank: the rank-r factors meet every codec's stored form (factored paths).
    ranked = w64.score(store, query_rank=2)
    ranked_exact = w64.score(w64.train, query_rank=2)
    assert_rel(ranked.layer_scores, ranked_exact.layer_scores, 1e-9, what=f"{codec} rank 2")
    # A float64 store is scored in float64 whatever dtype= says (float32 would be ~1e-7 off).
    default = ik.score(w64.model, w64.factors, QUERIES, store, query_rank="full", progress=False)
    assert_rel(default.layer_scores, w64.exact.layer_scores, 1e-9, what=f"{codec} dtype=None")


@pytest.mark.parametrize("codec", ["kron:16", "lowrank:4", "eig:8"])
def test_small_codecs_are_not_exact_float64(w64, codec):
    """The negative control of the test above: below the exact sizes, scores do change."""
    result = w64.score(w64.store(codec))
    err = rel_error(result.layer_scores, w64.exact.layer_scores)
    assert err > 1e-4, f"{codec}: relative error {err:.2e}, expected an approximation"


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
            # The explicit EK-FAC preconditioned query P_q (docs/math.md, Scores).
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
# 2. Codec error at small sizes


CODEC_SIZES = {"kron": (2, 4, 8, 16, 32), "lowrank": (1, 2, 4, 8), "eig": (2, 4, 8, 16)}


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    """The whole tiny corpus (40 sequences), float32."""
    return World(tmp_path_factory.mktemp("corpus"), tokenizer, TINY_CORPUS, MAX_LENGTH, F32)


def test_codec_error_decreases_with_size(corpus):
    dense = corpus.score(corpus.store("dense", part_size=None)).scores
    assert_rel(dense, corpus.exact.scores, 1e-5, what="dense store")
    print(f"\ncodec error vs dense, {dense.shape[1]} sequences x {dense.shape[0]} queries")
    print(f"{'codec':>12} {'bytes/ex':>9} {'pearson':>8} {'rel.err':>8}")
    dense_bytes = corpus.store("dense", part_size=None).bytes_per_example()
    print(f"{'dense':>12} {dense_bytes:>9} {1:>8.4f} {0:>8.4f}")
    for kind, sizes in CODEC_SIZES.items():
        corr, err = [], []
        for size in sizes:
            store = corpus.store(f"{kind}:{size}", part_size=None)
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
    dense = corpus.score(corpus.store("dense", part_size=None)).scores
    draws = np.stack([
        corpus.score(corpus.store("kron:8", part_size=None, seed=seed)).scores
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
# 3. The codecs' gram on random tensors


@pytest.mark.parametrize("spec", ["dense", "kron:7", "kron:3", "lowrank:2", "lowrank:9"])
def test_codec_gram_random(spec, monkeypatch):
    shape = (5, 7)
    codec = make_codec(parse_codec(spec), shape, seed=3, layer_index=1)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, 7, generator=gen, dtype=F64)  # 6 examples of 4 tokens
    s = torch.randn(6, 4, 5, generator=gen, dtype=F64)
    stored = codec.encode(a, s)
    first = {k: v[:4] for k, v in stored.items()}
    second = {k: v[2:] for k, v in stored.items()}
    got = codec.gram(first, second)
    assert got.shape == (4, 4) and got.dtype == F64
    if spec.startswith("kron"):
        c = stored["c"].flatten(1)
        expected = c[:4] @ c[2:].T
    else:
        dense = (
            stored["g"] if spec == "dense" else stored["u"].transpose(1, 2) @ stored["v"]
        ).flatten(1)
        expected = dense[:4] @ dense[2:].T
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if spec in ("dense", "kron:7", "lowrank:9"):  # exact: orthogonal projections, R >= T
        g = torch.einsum("bto,bti->boi", s, a).flatten(1)
        torch.testing.assert_close(got, g[:4] @ g[2:].T, rtol=1e-10, atol=1e-10)
    if spec.startswith("lowrank"):  # a few rows of ``a`` at a time: the same numbers
        monkeypatch.setattr(codecs_module, "GRAM_ELEMENTS", 1)
        torch.testing.assert_close(codec.gram(first, second), got, rtol=1e-14, atol=1e-14)
        empty = codec.gram({k: v[:0] for k, v in stored.items()}, second)
        assert empty.shape == (0, 4)
