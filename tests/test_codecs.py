"""Tests of store/codecs/: how each codec keeps a training gradient, and how queries and
other stored gradients meet it.

1. float64: every codec in the regime where theory says it is exact (``dense``; ``kron:K``
   with ``K >= max(d_out, d_in)``; ``lowrank:R`` with ``R >=`` every sequence's token count;
   ``eig:K`` with ``K >= max(d_out, d_in)``; ``sparse:K`` with ``K >= d_out·d_in``) scores
   like on-the-fly float64 to 1e-9, with and without ``query_rank``; smaller sizes do not.
   A ``kron:8`` store is checked against an independent brute force: ``G_z`` and ``G_q``
   from ``torch.autograd`` on the module weights, ``P_q`` from the explicit EK-FAC formula,
   the projections and stored arrays read with plain h5py, and
   ``⟨P_out P_q P_inᵀ, P_out G_z P_inᵀ⟩`` computed by hand; ``sparse:K`` likewise
   (the eigen-rotated autograd gradient, its ``K`` entries of largest whitened energy picked
   by a plain sort, positions decoded from the stored pages by hand).
2. Codec error (printed with ``pytest -s``): for ``kron``, ``lowrank``, ``eig`` and
   ``sparse`` at small sizes, the correlation with dense scores is positive but below 1 and
   improves with the size; ``kron`` is unbiased (the mean over projection seeds approaches
   the dense scores).
3. The codecs' ``gram`` on random tensors, including the chunked lowrank path and the sparse
   codec's paged positions. ``sparse8:K`` keeps ``sparse:K``'s entries in 8-bit floats: its
   bytes are decoded, and the values rounded, by hand.

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
from influencekit.lowrank import as_dense
from influencekit.store.codecs import lowrank as lowrank_module
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


@pytest.mark.parametrize("kind", ["dense", "kron", "lowrank", "eig", "sparse"])
def test_exact_codecs_float64(w64, kind):
    shapes = [w64.factors.layers[n].shape for n in w64.factors.modules]
    max_tokens = max(len(ex.input_ids) for ex in w64.train)
    assert max_tokens < min(min(s) for s in shapes)  # lowrank is not exact by a shape cap
    entries = max(s[0] * s[1] for s in shapes)  # sparse: every entry of the largest layer
    size = {"dense": 0, "kron": max_dim(w64), "lowrank": max_tokens, "eig": max_dim(w64),
            "sparse": entries}[kind]  # fmt: skip
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


@pytest.mark.parametrize("codec", ["kron:16", "lowrank:4", "eig:8", "sparse:64"])
def test_small_codecs_are_not_exact_float64(w64, codec):
    """The negative control of the test above: below the exact sizes, scores do change."""
    result = w64.score(w64.store(codec))
    err = rel_error(result.layer_scores, w64.exact.layer_scores)
    assert err > 1e-4, f"{codec}: relative error {err:.2e}, expected an approximation"


def query_grads(world, tokenizer, names) -> list[dict[str, torch.Tensor]]:
    """Each test query's completion gradient per module, from ``torch.autograd``."""
    grads = []
    for prompt, completion in QUERIES:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
        grads.append(autograd_weight_grads(world.model, names, ids, first=len(prompt_ids) - 1))
    return grads


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
    for q, g_q in enumerate(query_grads(w64, tokenizer, names)):
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


def elias_fano_by_hand(h: np.ndarray, low: np.ndarray | None, k: int, n: int) -> np.ndarray:
    """Increasing positions from their Elias–Fano bytes: ``floor(log2(n / k))`` low bits
    each (little-endian bits), and the high parts in unary (the j-th set bit sits at
    ``high_j + j``)."""
    bits = max(0, int(np.floor(np.log2(n / k))))
    marks = np.flatnonzero(np.unpackbits(h, bitorder="little"))[:k]
    high = marks - np.arange(k)
    if not bits:
        return high
    flat = np.unpackbits(low, bitorder="little")[: k * bits].reshape(k, bits)
    return (high << bits) | (flat * (1 << np.arange(bits))).sum(1)


def test_sparse_store_equals_brute_force_float64(w64, tokenizer):
    k = 40
    store = w64.store(f"sparse:{k}")
    names = store.modules
    with h5py.File(store.path, "r") as f:  # the manifest records sizes, window and eigenbasis
        params = [dict(f[f"layers/{j:04d}"].attrs) for j in range(len(names))]
        windows = [
            (f[f"layers/{j:04d}/rows"][()], f[f"layers/{j:04d}/cols"][()])
            for j in range(len(names))
        ]
    for name, layer_params, (rows, cols) in zip(names, params, windows, strict=True):
        lf = w64.factors.layers[name]
        assert layer_params["entries"] == k and layer_params["positions"] == "elias-fano"
        assert layer_params["basis"] == lf.basis_fingerprint() != "standard"
        assert layer_params["damping"] == pytest.approx(lf.default_damping(), rel=1e-15)
        # a window smaller than the layer, holding at least twice the entries kept
        assert 2 * k <= len(rows) * len(cols) < lf.shape[0] * lf.shape[1]
        assert 0 < layer_params["window_mass"] <= 1
    stored = {name: {"x": [], "h": [], "l": []} for name in names}
    for part in sorted(pathlib.Path(str(store.path) + ".d").glob("part-*.h5")):
        with h5py.File(part, "r") as f:
            for j, name in enumerate(names):
                for key in ("x", "h", "l"):
                    stored[name][key].append(f[f"layers/{j:04d}/{key}"][()])
    stored = {n: {key: np.concatenate(v) for key, v in d.items()} for n, d in stored.items()}

    def positions(name: str, j: int, row: int) -> np.ndarray:
        """Flat positions in the window (Elias–Fano, decoded by hand)."""
        rows, cols = windows[j]
        layer = stored[name]
        assert layer["h"].dtype == np.uint8 and layer["l"].dtype == np.uint8
        return elias_fano_by_hand(layer["h"][row], layer["l"][row], k, len(rows) * len(cols))

    result = w64.score(store)
    damping = result.meta["damping"]
    train_grads = {
        i: autograd_weight_grads(w64.model, names, w64.train[i].input_ids) for i in (0, 4, 9)
    }
    for j, name in enumerate(names):
        lf = w64.factors.layers[name]
        rows, cols = (torch.from_numpy(w).long() for w in windows[j])
        weight = 1 / (lf.lam + lf.default_damping())
        for i, grads in train_grads.items():
            # G̃_z in the window of the eigenbasis; its K entries of largest whitened energy
            rotated = (lf.q_s[:, rows].T @ grads[name] @ lf.q_a[:, cols]).flatten()
            energy = rotated**2 * weight[rows][:, cols].flatten()
            kept = np.sort(np.argsort(-energy.numpy(), kind="stable")[:k])
            np.testing.assert_array_equal(positions(name, j, i), kept)
            assert_rel(stored[name]["x"][i], rotated[kept], 1e-9, what=f"{name} x, z{i}")
    for q, g_q in enumerate(query_grads(w64, tokenizer, names)):
        for col, name in enumerate(names):
            lf = w64.factors.layers[name]
            rows, cols = (torch.from_numpy(w).long() for w in windows[col])
            # P̃_q: the explicit EK-FAC preconditioned query, in the window of the eigenbasis.
            window = lf.q_s[:, rows].T @ g_q[name] @ lf.q_a[:, cols]
            p_rot = (window / (lf.lam[rows][:, cols] + damping[name])).flatten()
            for i in train_grads:
                kept = positions(name, col, i)
                expected = float((p_rot[kept] * torch.from_numpy(stored[name]["x"][i])).sum())
                assert_rel(result.layer_scores[q, i, col], expected, 1e-9,
                           what=f"{name} q{q} z{i} sparse score")  # fmt: skip
    assert rel_error(result.layer_scores, w64.exact.layer_scores) > 1e-3  # K < d_out·d_in


def e4m3_by_hand(values: np.ndarray) -> np.ndarray:
    """Round to the nearest float8 e4m3 number, ties to even: 4 significant bits for normal
    numbers (exponent >= -6), steps of 2^-9 below."""
    m, e = np.frexp(values)  # values = m · 2^e with 0.5 <= |m| < 1
    normal = np.ldexp(np.round(m * 16) / 16, e)
    return np.where(np.abs(values) < 2.0**-6, np.round(values / 2.0**-9) * 2.0**-9, normal)


def decode_e4m3(bits: np.ndarray) -> np.ndarray:
    """float8 e4m3 bit patterns (sign, 4 exponent bits with bias 7, 3 mantissa bits)."""
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    subnormal = mantissa / 8 * 2.0**-6
    normal = (1 + mantissa / 8) * 2.0 ** (exponent.astype(np.int64) - 7)
    return sign * np.where(exponent == 0, subnormal, normal)


def test_sparse8_keeps_the_same_entries_in_eight_bits(w64):
    """sparse8:K keeps sparse:K's entries; each value is the e4m3 rounding of value / scale,
    with the scale mapping a row's largest magnitude to 448 (both checked by hand from the
    stored bytes); its scores stay close to sparse:K's."""
    full, small = w64.store("sparse:40"), w64.store("sparse8:40")
    everyone = list(range(len(full)))
    for j in range(len(full.modules)):
        (a,) = full.rows(everyone, [j])
        (b,) = small.rows(everyone, [j])
        for key in ("h", "l"):  # the same positions
            np.testing.assert_array_equal(a[key], b[key])
        assert b["x"].dtype == np.uint8 and b["s"].dtype == np.float32
        scale = np.abs(a["x"]).max(axis=1, keepdims=True) / 448
        np.testing.assert_allclose(b["s"], scale, rtol=1e-6)
        ratio = a["x"] / b["s"].astype(np.float64)  # float64 store: computed in float64
        np.testing.assert_array_equal(decode_e4m3(b["x"]), e4m3_by_hand(ratio))
        assert np.abs(decode_e4m3(b["x"])).max() == 448
    exact8, exact = w64.score(small).scores, w64.score(full).scores
    assert 0 < rel_error(exact8, exact) < 0.05  # rounded, and close
    for x, y in zip(exact8, exact, strict=True):
        assert np.corrcoef(x, y)[0, 1] > 0.999


def test_sparse_store_needs_its_own_factors(w64, tmp_path):
    """Scoring with factors of another eigenbasis, or continuing the build with them, is
    refused; kfac factors of the same data (the same eigenbasis as ekfac) score."""
    store = w64.store("sparse:40")
    other = ik.fit_factors(w64.model, w64.train[:6], "mlp", dtype=F64, batch_size=4,
                           progress=False)  # fmt: skip
    with pytest.raises(ik.MismatchError, match="eigenbasis"):
        w64.score(store, factors=other)
    kfac = ik.fit_factors(w64.model, w64.train, "mlp", strategy="kfac", dtype=F64,
                          batch_size=4, progress=False)  # fmt: skip
    on_the_fly = w64.score(w64.train, factors=kfac).layer_scores
    assert np.isfinite(w64.score(store, factors=kfac).layer_scores).all()
    assert rel_error(w64.score(store, factors=kfac).layer_scores, on_the_fly) < 1
    path = tmp_path / "s.h5"
    options = {"codec": "sparse:40", "dtype": "float64", "progress": False}
    ik.GradientStore.build(path, w64.model, w64.train[:5], factors=w64.factors, **options)
    with pytest.raises(ik.MismatchError, match="codec of"):
        ik.GradientStore.build(path, w64.model, w64.train, factors=other, **options)


# ---------------------------------------------------------------------------------------------
# 2. Codec error at small sizes


CODEC_SIZES = {
    "kron": (2, 4, 8, 16, 32),
    "lowrank": (1, 2, 4, 8),
    "eig": (2, 4, 8, 16),
    "sparse": (8, 32, 128, 512),
}


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


@pytest.mark.parametrize(
    "spec",
    ["dense", "kron:7", "kron:3", "lowrank:2", "lowrank:9", "sparse:6", "sparse:35", "sparse8:35"],
)
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
    elif spec.startswith("sparse"):  # standard basis here: the largest |G| entries, by hand
        g = torch.einsum("bto,bti->boi", s, a).flatten(1)
        k = int(spec.split(":")[1])
        top = torch.argsort(-(g**2), dim=1, stable=True)[:, :k]
        values = torch.gather(g, 1, top)
        if spec.startswith("sparse8"):  # 8-bit values, each row scaled to 448 at most
            scale = (values.abs().amax(1, keepdim=True) / 448).float().double()
            values = torch.from_numpy(e4m3_by_hand((values / scale).numpy())) * scale
        kept = torch.zeros_like(g).scatter_(1, top, values)
        expected = kept[:4] @ kept[2:].T
    else:
        dense = (
            stored["g"] if spec == "dense" else stored["u"].transpose(1, 2) @ stored["v"]
        ).flatten(1)
        expected = dense[:4] @ dense[2:].T
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if spec in ("dense", "kron:7", "lowrank:9", "sparse:35"):  # exact: orthogonal, R >= T, K
        # (sparse8:35 keeps every entry too, but in 8 bits)
        g = torch.einsum("bto,bti->boi", s, a).flatten(1)
        torch.testing.assert_close(got, g[:4] @ g[2:].T, rtol=1e-10, atol=1e-10)
    if spec.startswith("lowrank"):  # a few rows of ``a`` at a time: the same numbers
        monkeypatch.setattr(lowrank_module, "GRAM_ELEMENTS", 1)
        torch.testing.assert_close(codec.gram(first, second), got, rtol=1e-14, atol=1e-14)
        empty = codec.gram({k: v[:0] for k, v in stored.items()}, second)
        assert empty.shape == (0, 4)


@pytest.mark.parametrize("spec", ["dense", "lowrank:2", "lowrank:9", "sparse:6", "sparse8:35"])
def test_codec_decode_gives_the_kept_gradients(spec, monkeypatch):
    """``decode`` returns the matrices whose inner products ``gram`` computes (so exactly
    ``G`` where a codec keeps it whole), in the basis they are kept in; the projecting
    codecs have none."""
    codec = make_codec(parse_codec(spec), (5, 7), seed=3, layer_index=1)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, 7, generator=gen, dtype=F64)
    s = torch.randn(6, 4, 5, generator=gen, dtype=F64)
    stored = codec.encode(a, s)
    decoded = as_dense(codec.decode(stored))  # lowrank: as factors
    assert decoded.shape == (6, 5, 7) and decoded.dtype == F64
    flat = decoded.flatten(1)
    torch.testing.assert_close(flat @ flat.T, codec.gram(stored, stored), rtol=1e-12, atol=1e-12)
    if spec in ("dense", "lowrank:9"):  # whole: R >= T tokens
        torch.testing.assert_close(decoded, torch.einsum("bto,bti->boi", s, a))
    if spec == "sparse:6":  # the 6 largest |G| entries of each example, zeros elsewhere
        assert ((decoded != 0).flatten(1).sum(1) == 6).all()
    assert not make_codec(parse_codec("kron:3"), (5, 7)).keeps_whole
