"""Reproducibility: same inputs give bit-identical factors and scores; batching does not
matter; files round-trip exactly and bad files fail with a FileFormatError naming the file;
factors refuse a model with other weights."""

from __future__ import annotations

import pathlib
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_models import make_model

ARRAYS = ("q_a", "d_a", "q_s", "d_s", "lam")
TEXT_INDICES = [0, 4, 11, 15, 22, 27, 31, 38, 9, 19]
QUERIES = [("The ship left", " the harbour at dawn."), ("The oven must be", " hot.")]


def exact_model(family: str, vocab_size: int, **kwargs):
    """float64 with SDPA attention: eager attention takes its softmax in float32 for most
    families, which would make padded and unpadded forwards differ at ~1e-8."""
    model = make_model(family, vocab_size, **kwargs)
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return exact_model("gpt2", len(tokenizer))


@pytest.fixture(scope="module")
def train(tokenizer):
    return ik.TextDataset.from_texts([TINY_CORPUS[i] for i in TEXT_INDICES], tokenizer)


def fit(model, train, **kwargs):
    options = {"dtype": torch.float64, "progress": False, "batch_size": 4} | kwargs
    return ik.fit_factors(model, train, "mlp", **options)


def score(model, factors, train, **kwargs):
    options = {"dtype": torch.float64, "progress": False} | kwargs
    return ik.score(model, factors, QUERIES, train, **options)


def assert_factors_identical(a: ik.Factors, b: ik.Factors) -> None:
    assert (a.strategy, a.fisher, a.fingerprint, a.modules) == (
        b.strategy,
        b.fisher,
        b.fingerprint,
        b.modules,
    )
    assert a.meta == b.meta
    for name in a.modules:
        la, lb = a.layers[name], b.layers[name]
        assert tuple(la.shape) == tuple(lb.shape)
        for key in ARRAYS:
            x, y = getattr(la, key), getattr(lb, key)
            assert (x is None) == (y is None), f"{name}.{key}"
            if x is not None:
                assert x.dtype == y.dtype == torch.float64
                assert torch.equal(x, y), f"{name}.{key} differs"


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_empirical_fits_and_scores_are_bit_identical(model, train, strategy):
    first = fit(model, train, fisher="empirical", strategy=strategy)
    second = fit(model, train, fisher="empirical", strategy=strategy, seed=123)
    # fisher="empirical" uses no randomness: another seed changes only the recorded meta.
    for name in first.modules:
        for key in ARRAYS:
            x, y = getattr(first.layers[name], key), getattr(second.layers[name], key)
            assert (x is None) == (y is None)
            assert x is None or torch.equal(x, y)
    third = fit(model, train, fisher="empirical", strategy=strategy)
    assert_factors_identical(first, third)
    r1, r2 = score(model, first, train), score(model, third, train)
    assert np.array_equal(r1.layer_scores, r2.layer_scores)
    assert r1.meta == r2.meta


def test_sampled_fits_depend_on_the_seed_only(model, train):
    a = fit(model, train, fisher="sampled", seed=7)
    b = fit(model, train, fisher="sampled", seed=7)
    assert_factors_identical(a, b)
    assert np.array_equal(score(model, a, train).scores, score(model, b, train).scores)
    c = fit(model, train, fisher="sampled", seed=8)
    for name in a.modules:
        la, lc = a.layers[name], c.layers[name]
        # A holds only inputs, which do not depend on the sampled labels.
        assert torch.equal(la.q_a, lc.q_a) and torch.equal(la.d_a, lc.d_a)
        assert not torch.allclose(la.d_s, lc.d_s, rtol=1e-3)
        assert not torch.allclose(la.lam, lc.lam, rtol=1e-3)
    # Sampled labels are not the real next tokens.
    e = fit(model, train, fisher="empirical")
    assert not torch.allclose(a.layers[a.modules[0]].lam, e.layers[e.modules[0]].lam, rtol=1e-3)


def covariances(lf):
    return lf.q_a @ torch.diag(lf.d_a) @ lf.q_a.T, lf.q_s @ torch.diag(lf.d_s) @ lf.q_s.T


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_size_does_not_change_factors_or_scores(tokenizer, train, family, fisher):
    model = exact_model(family, len(tokenizer))
    reference = fit(model, train, fisher=fisher, batch_size=1)
    ref_scores = score(model, reference, train, batch_size=1).layer_scores
    scale = np.abs(ref_scores).max()
    assert scale > 0
    for batch_size in (3, len(train)):
        other = fit(model, train, fisher=fisher, batch_size=batch_size)
        for name in reference.modules:
            lr, lo = reference.layers[name], other.layers[name]
            for want, got in zip(covariances(lr), covariances(lo), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10,
                                           atol=1e-12 * float(want.abs().max()))  # fmt: skip
            torch.testing.assert_close(lo.lam.sum(), lr.lam.sum(), rtol=1e-10, atol=0)
            torch.testing.assert_close(lo.lam, lr.lam, rtol=1e-10,
                                       atol=1e-10 * float(lr.lam.max()))  # fmt: skip
        got = score(model, other, train, batch_size=batch_size).layer_scores
        np.testing.assert_allclose(got, ref_scores, rtol=1e-10, atol=1e-12 * scale)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_factors_round_trip_exactly(model, train, tmp_path, strategy):
    factors = fit(model, train, strategy=strategy)
    path = factors.save(tmp_path / "run" / "factors.h5")
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p != path], "no temporary file left behind"
    loaded = ik.Factors.load(path)
    assert_factors_identical(factors, loaded)
    assert isinstance(loaded.layers[loaded.modules[0]].shape[0], int | np.integer)
    assert loaded.damping_for(None) == factors.damping_for(None)
    # Equal arrays, but not equal memory layout (eigh returns column-major eigenvectors, a
    # loaded array is row-major), so BLAS may round the scores differently in the last bit.
    want = score(model, factors, train).layer_scores
    np.testing.assert_allclose(score(model, loaded, train).layer_scores, want, rtol=1e-12,
                               atol=1e-14 * np.abs(want).max())  # fmt: skip


def test_result_round_trips_exactly(model, train, tmp_path):
    factors = fit(model, train)
    result = score(model, factors, train, query_rank=2)
    loaded = ik.InfluenceResult.load(result.save(tmp_path / "result.h5"))
    assert np.array_equal(loaded.layer_scores, result.layer_scores)
    assert loaded.layer_scores.dtype == np.float64
    assert (loaded.layers, loaded.train_ids, loaded.query_ids) == (
        result.layers,
        result.train_ids,
        result.query_ids,
    )
    assert loaded.meta == result.meta
    assert loaded.top(1, k=4) == result.top(1, k=4)

    values = np.array([[[0.1, -2.5e-300], [np.pi, 1e300]]])
    meta = {"note": "ü", "x": [1, None]}
    odd = ik.InfluenceResult(values, ["l0", "l1"], ["naïve-1", "Ω/2"], ["q 😀"], meta)
    back = ik.InfluenceResult.load(odd.save(tmp_path / "odd.h5"))
    assert np.array_equal(back.layer_scores, odd.layer_scores)
    assert (back.train_ids, back.query_ids, back.meta) == (odd.train_ids, odd.query_ids, odd.meta)


# ---------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture(scope="module")
def saved(model, train, tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    factors = fit(model, train)
    result = score(model, factors, train)
    return factors.save(root / "factors.h5"), result.save(root / "result.h5")


def copy(path: pathlib.Path, tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    target = tmp_path / name
    shutil.copy(path, target)
    return target


def assert_bad_file(loader, path) -> None:
    with pytest.raises(ik.FileFormatError) as info:
        loader(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("loader", [ik.Factors.load, ik.InfluenceResult.load])
def test_files_that_are_not_influencekit_files(loader, saved, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("just some text, not HDF5\n")
    assert_bad_file(loader, text)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    assert_bad_file(loader, empty)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    assert_bad_file(loader, plain)
    factors_path, result_path = saved
    other = result_path if loader == ik.Factors.load else factors_path
    assert_bad_file(loader, other)  # the other kind of influencekit file


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95, -1])
@pytest.mark.parametrize("which", [0, 1])
def test_truncated_files(saved, tmp_path, which, fraction):
    source = saved[which]
    data = source.read_bytes()
    cut = len(data) - 1 if fraction == -1 else int(len(data) * fraction)
    path = tmp_path / f"truncated-{source.name}"
    path.write_bytes(data[:cut])
    assert_bad_file([ik.Factors.load, ik.InfluenceResult.load][which], path)


def test_missing_layer_group(saved, tmp_path):
    path = copy(saved[0], tmp_path, "no-layer.h5")
    with h5py.File(path, "a") as f:
        del f["layers/0001"]
    assert_bad_file(ik.Factors.load, path)
    with pytest.raises(ik.FileFormatError, match=r"transformer\.h\.0\.mlp\.c_proj"):
        ik.Factors.load(path)


def test_corrupted_bytes_are_caught_by_the_checksum(saved, tmp_path):
    path = copy(saved[0], tmp_path, "flipped.h5")
    with h5py.File(path, "r") as f:
        info = f["layers/0000/lam"].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        byte = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([byte[0] ^ 0xFF]))
    assert_bad_file(ik.Factors.load, path)


def test_result_missing_a_dataset(saved, tmp_path):
    path = copy(saved[1], tmp_path, "no-scores.h5")
    with h5py.File(path, "a") as f:
        del f["layer_scores"]
    assert_bad_file(ik.InfluenceResult.load, path)


def test_newer_format_version(saved, tmp_path):
    path = copy(saved[0], tmp_path, "future.h5")
    with h5py.File(path, "a") as f:
        f.attrs["version"] = 99
    assert_bad_file(ik.Factors.load, path)


@pytest.mark.parametrize("array", ["lam", "q_a"])
def test_missing_array_in_a_layer_group(saved, tmp_path, array):
    path = copy(saved[0], tmp_path, f"no-{array}.h5")
    with h5py.File(path, "a") as f:
        del f[f"layers/0000/{array}"]
    assert_bad_file(ik.Factors.load, path)


# ---------------------------------------------------------------------------------------------
# Fingerprint


def test_factors_refuse_a_model_with_other_weights(model, train, tokenizer):
    factors = fit(model, train)
    other = exact_model("gpt2", len(tokenizer), seed=1)
    with pytest.raises(ik.ModelError, match=factors.fingerprint):
        score(other, factors, train)
    with pytest.raises(ik.ModelError):
        ik.token_scores(other, factors, QUERIES[0], train[0])

    tuned = exact_model("gpt2", len(tokenizer))  # same weights as `model`, then a small change
    with torch.no_grad():
        tuned.transformer.h[1].mlp.c_proj.weight.mul_(1.01)
    with pytest.raises(ik.ModelError):
        score(tuned, factors, train)

    untracked = exact_model("gpt2", len(tokenizer))  # a change outside the tracked layers
    with torch.no_grad():
        untracked.transformer.wpe.weight.add_(0.05)
    with pytest.raises(ik.ModelError):
        score(untracked, factors, train)


def test_factors_accept_the_same_weights_in_another_instance(model, train, tokenizer):
    factors = fit(model, train)
    twin = exact_model("gpt2", len(tokenizer))  # same seed, so the same weights
    assert ik.model_fingerprint(twin) == factors.fingerprint
    np.testing.assert_array_equal(score(twin, factors, train).scores,
                                  score(model, factors, train).scores)  # fmt: skip


def test_max_examples_fits_on_the_first_sequences(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    train = ik.TextDataset.from_texts(TINY_CORPUS[:12], tokenizer, max_length=32)
    opts = {"fisher": "empirical", "dtype": torch.float64, "progress": False}
    capped = ik.fit_factors(model, train, "mlp", max_examples=5, **opts)
    first = ik.fit_factors(model, train.subset(range(5)), "mlp", **opts)
    assert capped.meta["n_examples"] == 5
    for name in capped.modules:
        torch.testing.assert_close(capped.layers[name].lam, first.layers[name].lam)
