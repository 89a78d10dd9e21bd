"""The codec contract (store/codecs/base.py), run on every registered codec alike.

Each codec in ``CODECS`` is checked on random float64 tokens of one layer, against explicit
matrices (``G_z = Σ_t s_t a_tᵀ``, ``P_q = Q_S [(Q_Sᵀ G_q Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` with factors
made here from random orthogonal bases), through the same path scoring takes
(``query_form`` with the codec's ``query_needs``, then ``compress_query`` and ``contract``):

1. exact at its ``exact_size`` (to float64 rounding), and not exact below it;
2. unbiased where it says it is random (the mean over seeds approaches the exact scores
   within what the seeds' spread allows);
3. what it stores: ``encode`` gives the arrays ``arrays()`` names, in the shapes it names,
   representable in the dtypes ``array_dtypes`` names; bytes written into a part file the
   way a build writes them take exactly ``example_bytes`` per example (plus checksums), and
   ``bytes_for`` (what budgets count) never less;
4. ``decode`` against ``gram`` where the codec keeps whole gradients (its decoded matrices'
   inner products are the Grams), and no ``decode`` for projections;
5. restored from what a store records (``params``, ``tensors`` through a manifest written and
   read back) it reads and scores exactly as the codec that encoded.

A new codec (one class, one registry line) is checked here without a line added.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from influencekit.factors import LayerFactors
from influencekit.forms import query_form
from influencekit.lowrank import as_dense
from influencekit.store.codecs import CODECS, CodecSpec, make_codec, restore_codec
from influencekit.store.layout import Manifest, StoreConfig, read_manifest, write_manifest
from influencekit.store.writing import new_manifest

F64 = torch.float64
SHAPE = (6, 9)  # d_out, d_in
TOKENS = 4  # tokens per training sequence: lowrank is exact from rank 4
DAMPING = 0.3


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q


@pytest.fixture(scope="module")
def layer() -> LayerFactors:
    """Factors of one layer: random orthogonal eigenbases, a positive Λ of a wide range."""
    gen = torch.Generator().manual_seed(7)
    d_out, d_in = SHAPE
    d_s, d_a = (
        torch.rand(d_out, generator=gen, dtype=F64),
        torch.rand(d_in, generator=gen, dtype=F64),
    )
    lam = torch.outer(d_s, d_a) * torch.exp(torch.randn(SHAPE, generator=gen, dtype=F64))
    return LayerFactors(
        "fc",
        SHAPE,
        q_a=orthogonal(d_in, gen),
        d_a=d_a,
        q_s=orthogonal(d_out, gen),
        d_s=d_s,
        lam=lam,
    )


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, TOKENS, SHAPE[1], generator=gen, dtype=F64)
    s = torch.randn(5, TOKENS, SHAPE[0], generator=gen, dtype=F64)
    qa = torch.randn(2, 3, SHAPE[1], generator=gen, dtype=F64)
    qs = torch.randn(2, 3, SHAPE[0], generator=gen, dtype=F64)
    return a, s, qa, qs


def explicit_scores(layer, tokens) -> torch.Tensor:
    """``⟨P_q, G_z⟩`` from explicit matrices, ``(Q, B)``."""
    a, s, qa, qs = tokens
    g_z = torch.einsum("bto,bti->boi", s, a)
    g_q = torch.einsum("bto,bti->boi", qs, qa)
    rotated = layer.q_s.T @ g_q @ layer.q_a
    p_q = layer.q_s @ (rotated / (layer.lam + DAMPING)) @ layer.q_a.T
    return torch.einsum("qoi,boi->qb", p_q, g_z)


def codec_scores(codec, layer, tokens, stored=None) -> torch.Tensor:
    """Scores the way ``ik.score`` takes them: the codec's query form, compressed, contracted."""
    a, s, qa, qs = tokens
    form = query_form(layer, qs, qa, DAMPING, codec.query_needs(qa.shape[0]), "auto")
    return codec.contract(codec.compress_query(form), stored or codec.encode(a, s))


def sizes(cls) -> tuple[int | None, int]:
    """(the exact size, a size below it) of a codec on ``SHAPE`` and ``TOKENS``."""
    exact = cls.exact_size(SHAPE, TOKENS)
    return exact, {"lowrank": 2, "kron": 3, "eig": 3}.get(cls.kind, 20)


def made(kind: str, size: int, layer, seed: int = 0):
    spec = CodecSpec(kind, size if CODECS[kind].sized else 0)
    factors = layer if CODECS[kind].needs_factors or kind.startswith("sparse") else None
    return make_codec(spec, SHAPE, seed=seed, layer_index=1, factors=factors, damping=DAMPING)


@pytest.mark.parametrize("kind", list(CODECS))
def test_exact_at_its_exact_size_only(kind, layer, tokens):
    exact_size, below = sizes(CODECS[kind])
    expected = explicit_scores(layer, tokens)
    if exact_size is not None:
        codec = made(kind, exact_size, layer)
        got = codec_scores(codec, layer, tokens)
        # float64 products of a few dozen terms of size ~10: rounding far below 1e-10
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if CODECS[kind].sized:
        approx = codec_scores(made(kind, below, layer), layer, tokens)
        assert (approx - expected).abs().max() > 1e-6 * expected.abs().max()


@pytest.mark.parametrize("kind", [kind for kind, cls in CODECS.items() if cls.unbiased])
def test_unbiased_where_random(kind, layer, tokens):
    """The mean over 400 seeds is within 5 standard errors of the exact scores."""
    expected = explicit_scores(layer, tokens)
    draws = torch.stack(
        [codec_scores(made(kind, 3, layer, seed=seed), layer, tokens) for seed in range(400)]
    )
    mean, error = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - expected).abs() <= 5 * error + 1e-12).all()
    assert (draws.std(0) > 0).all()  # a random codec that does not vary would be exact


@pytest.mark.parametrize("kind", list(CODECS))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_what_it_stores_and_its_bytes(kind, dtype, layer, tokens, tmp_path):
    from influencekit.store.layout import PartExamples, write_part

    codec = made(kind, sizes(CODECS[kind])[1], layer)
    a, s, _, _ = tokens
    stored = codec.encode(a, s)
    assert {k: tuple(v.shape[1:]) for k, v in stored.items()} == codec.arrays()
    kinds = codec.array_dtypes(dtype)
    arrays = [{k: v.cpu().numpy().astype(kinds[k]) for k, v in stored.items()}]
    n = len(a)
    examples = PartExamples([f"x{i}" for i in range(n)], [""] * n, [{}] * n, [[1, 2]] * n)
    path = tmp_path / "part.h5"
    write_part(path, uuid="u", number=0, first=0, examples=examples, arrays=arrays, max_length=4)
    import h5py

    with h5py.File(path, "r") as f:
        group = f["layers/0000"]
        data = sum(group[k].id.get_storage_size() for k in group)
        chunks = sum(group[k].id.get_num_chunks() for k in group)
    assert data == n * codec.example_bytes(dtype) + 4 * chunks  # values, and a checksum each
    assert codec.bytes_for(
        codec.spec.size, codec.window_shape if hasattr(codec, "window_shape") else SHAPE, dtype
    ) >= codec.example_bytes(dtype)


@pytest.mark.parametrize("kind", list(CODECS))
def test_decode_against_gram(kind, layer, tokens):
    codec = made(kind, sizes(CODECS[kind])[1], layer)
    a, s, _, _ = tokens
    stored = codec.encode(a, s)
    gram = codec.gram(stored, stored)
    assert gram.shape == (len(a), len(a))
    if not codec.keeps_whole:
        with pytest.raises(NotImplementedError):
            codec.decode(stored)
        return
    flat = as_dense(codec.decode(stored)).flatten(1)
    assert flat.shape == (len(a), SHAPE[0] * SHAPE[1])
    torch.testing.assert_close(flat @ flat.T, gram, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(CODECS))
def test_restored_from_the_manifest_scores_the_same(kind, layer, tokens, tmp_path):
    codec = made(kind, sizes(CODECS[kind])[1], layer)
    a, s, _, _ = tokens
    stored = codec.encode(a, s)
    config = StoreConfig(str(codec.spec), "float64", 0, ["fc"], [list(SHAPE)], "m", "w", "t", 8)
    path = tmp_path / "grads.h5"
    write_manifest(path, new_manifest(config, [codec], None))
    manifest: Manifest = read_manifest(path)
    back = restore_codec(codec.spec, SHAPE, manifest.layer_tensors[0], manifest.layer_params[0])
    assert back.params == codec.params and back.arrays() == codec.arrays()
    torch.testing.assert_close(
        codec_scores(back, layer, tokens, stored), codec_scores(codec, layer, tokens, stored)
    )
    torch.testing.assert_close(back.gram(stored, stored), codec.gram(stored, stored))
    if back.needs_factors or back.eigenbasis is not None:  # encoding needs the factors again
        back.attach(layer)
    for key, value in back.encode(a, s).items():
        assert torch.equal(value, stored[key]), key
    np.testing.assert_array_equal(sorted(back.tensors), sorted(codec.tensors))
