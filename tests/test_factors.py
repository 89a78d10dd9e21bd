"""Tests of kit/factors.py: ``Factors`` files, the model check, ``fit_factors`` options.

1. ``save``/``load``: every strategy round-trips exactly, with no temporary file left.
2. Files that are not factors files, or damaged ones: ``Factors.load`` raises a clear error
   naming the file (and the damaged layer group or dataset where there is one). The damaged
   files start from two saved factors files: a float32 Llama's (``llama_factors_file``) and
   a float64 GPT-2's (``gpt2_files``).
3. Factors refuse a model other than the one they were fitted on (``Factors.tracked_layers``,
   used by ``score`` and ``token_scores``): other weights, another architecture, other layer
   shapes; they accept the same weights in another instance.
4. ``max_examples`` fits on the first sequences.
5. Query gradients in the eigenbasis (``LayerFactors.in_eigenbasis``) equal explicit float64
   matrices, with padded and prompt-only tokens, in both memory layouts.

Elsewhere: ``fit_factors`` against float64 brute force (A, S, eigenbases and Λ of every
strategy) in test_reference.py, which shares one reference implementation between capture,
factors and scores; EK-FAC against the exact Gauss-Newton matrix, and ``damping_for``, in
test_approximation.py; determinism and independence of batch size in test_reproducible.py;
non-finite weights and factors in test_errors.py.
"""

from __future__ import annotations

import copy
import pathlib
import re

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS

from helpers.engines import (
    MLP_NAME,
    QUERIES,
    QUERY,
    assert_bad_file,
    assert_factors_identical,
    exact_model,
    fit,
    score,
)
from helpers.tiny_models import make_model

# ---------------------------------------------------------------------------------------------
# 1. Round trips


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_factors_round_trip_exactly(gpt2_model, gpt2_train, tmp_path, strategy):
    factors = fit(gpt2_model, gpt2_train, strategy=strategy)
    path = factors.save(tmp_path / "run" / "factors.h5")
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p != path], "no temporary file left behind"
    loaded = ik.Factors.load(path)
    assert_factors_identical(factors, loaded)
    assert isinstance(loaded.layers[loaded.modules[0]].shape[0], int | np.integer)
    assert loaded.damping_for(None) == factors.damping_for(None)
    # Equal arrays, but not equal memory layout (eigh returns column-major eigenvectors, a
    # loaded array is row-major), so BLAS may round the scores differently in the last bit.
    want = score(gpt2_model, factors, gpt2_train).layer_scores
    np.testing.assert_allclose(score(gpt2_model, loaded, gpt2_train).layer_scores, want, rtol=1e-12,
                               atol=1e-14 * np.abs(want).max())  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. Files that are not factors files, and damaged ones


@pytest.fixture
def factors_files(llama_factors_file, gpt2_files):
    """The saved factors files that the damaged ones start from, by model."""
    return {"llama": llama_factors_file, "gpt2": gpt2_files[0]}


def copy_of(path, tmp_path, name="copy.h5"):
    target = tmp_path / name
    target.write_bytes(pathlib.Path(path).read_bytes())
    return target


def test_factors_load_missing_file(tmp_path):
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.h5"):
        ik.Factors.load(missing)


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text, not HDF5\n", b"layer,lambda\n0,1.0\n", bytes(range(256)) * 8],
    ids=["empty", "text", "csv", "binary"],
)
def test_factors_load_non_hdf5_file(tmp_path, content):
    path = tmp_path / "factors.h5"
    path.write_bytes(content)
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


def test_factors_load_directory(tmp_path):
    with pytest.raises(ik.InfluenceKitError, match=re.escape(str(tmp_path))):
        ik.Factors.load(tmp_path)


def test_factors_load_result_file_names_its_format(tmp_path, gpt2_files):
    path = tmp_path / "result.h5"
    ik.InfluenceResult(np.ones((1, 2, 1)), ["l"], ["a", "b"], ["q"]).save(path)
    with pytest.raises(ik.FileFormatError) as info:
        ik.Factors.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "influencekit.factors" in message and "influencekit.result" in message
    assert_bad_file(ik.Factors.load, gpt2_files[1])  # a result file saved by score


def test_factors_load_foreign_hdf5_file(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["weights"] = np.arange(10.0)
        f.attrs["format"] = "keras"
    with pytest.raises(ik.FileFormatError, match=r"foreign\.h5.*format='keras'"):
        ik.Factors.load(path)
    with h5py.File(path, "w") as f:
        f["weights"] = np.arange(10.0)
    with pytest.raises(ik.FileFormatError, match=r"foreign\.h5.*format=None"):
        ik.Factors.load(path)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    assert_bad_file(ik.Factors.load, plain)


@pytest.mark.parametrize("source", ["llama", "gpt2"])
def test_factors_load_newer_version_says_upgrade(factors_files, tmp_path, source):
    path = copy_of(factors_files[source], tmp_path, "future.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = 99
    with pytest.raises(ik.FileFormatError, match="upgrade influencekit") as info:
        ik.Factors.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("attr", ["modules", "strategy", "model_fingerprint", "meta"])
def test_factors_load_missing_attribute(llama_factors_file, tmp_path, attr):
    path = copy_of(llama_factors_file, tmp_path)
    with h5py.File(path, "r+") as f:
        del f.attrs[attr]
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("llama", r"layers/0001.*model\.layers\.0\.mlp\.up_proj"),
        ("gpt2", r"transformer\.h\.0\.mlp\.c_proj"),
    ],
    ids=["llama", "gpt2"],
)
def test_factors_load_missing_layer_group(factors_files, tmp_path, source, pattern):
    path = copy_of(factors_files[source], tmp_path, "no-layer.h5")
    with h5py.File(path, "r+") as f:
        del f["layers/0001"]
    assert_bad_file(ik.Factors.load, path)
    with pytest.raises(ik.FileFormatError, match=pattern):
        ik.Factors.load(path)


@pytest.mark.parametrize("array", ["lam", "q_a"])
def test_missing_array_in_a_layer_group(gpt2_files, tmp_path, array):
    path = copy_of(gpt2_files[0], tmp_path, f"no-{array}.h5")
    with h5py.File(path, "a") as f:
        del f[f"layers/0000/{array}"]
    assert_bad_file(ik.Factors.load, path)


# Each file cut at four points (-1: all but the last byte).
@pytest.mark.parametrize(
    ("source", "fraction"),
    [
        *(("llama", fraction) for fraction in (0.02, 0.3, 0.6, 0.999)),
        *(("gpt2", fraction) for fraction in (0.05, 0.5, 0.95, -1)),
    ],
)
def test_factors_load_truncated_file(factors_files, tmp_path, source, fraction):
    data = pathlib.Path(factors_files[source]).read_bytes()
    cut = len(data) - 1 if fraction == -1 else int(len(data) * fraction)
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[:cut])
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path, lazy=False)


# Bytes flipped in the middle of a dataset's first chunk: every array of one layer of the
# Llama's file (four bytes each), and one byte of a GPT-2 layer's Λ.
@pytest.mark.parametrize(
    ("source", "dataset", "flipped"),
    [
        *(("llama", f"layers/0002/{key}", 4) for key in ("q_a", "d_a", "q_s", "d_s", "lam")),
        ("gpt2", "layers/0000/lam", 1),
    ],
)
def test_factors_load_flipped_bytes_inside_a_dataset(
    factors_files, tmp_path, source, dataset, flipped
):
    original = factors_files[source]
    with h5py.File(original, "r") as f:
        assert f[dataset].fletcher32
        chunk = f[dataset].id.get_chunk_info(0)  # chunked (fletcher32), so no get_offset()
    data = bytearray(pathlib.Path(original).read_bytes())
    for i in range(flipped):
        data[chunk.byte_offset + chunk.size // 2 + i] ^= 0xFF
    path = tmp_path / "flipped.h5"
    path.write_bytes(bytes(data))
    with pytest.raises(ik.FileFormatError) as info:
        ik.Factors.load(path, lazy=False)
    assert str(path) in str(info.value)
    assert dataset in str(info.value)
    # Read lazily (the default), the damage surfaces when that array is first read.
    lazy = ik.Factors.load(path)
    _, group, key = dataset.split("/")
    layer = lazy.layers[lazy.modules[int(group)]]
    with pytest.raises(ik.FileFormatError) as info:
        getattr(layer, key)
    assert str(path) in str(info.value) and dataset in str(info.value)


@pytest.mark.parametrize(
    ("marker", "start"),
    [
        (b"SNOD", 1024),  # a symbol-table node of a layer group (not the root)
        (b'["model.layers.0.mlp', 0),  # inside the JSON 'modules' attribute
    ],
    ids=["group-structure", "json-attribute"],
)
def test_factors_load_damaged_bytes(llama_factors_file, tmp_path, marker, start):
    data = bytearray(pathlib.Path(llama_factors_file).read_bytes())
    at = data.find(marker, start)
    assert at > 0
    data[at] ^= 0xFF
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(data))
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path))):
        ik.Factors.load(path)


def test_factors_round_trip_still_scores(llama, llama_factors_file, llama_train):
    """The undamaged Llama file that the damaged ones start from loads and scores."""
    loaded = ik.Factors.load(llama_factors_file)
    result = ik.score(llama, loaded, [QUERY], llama_train, progress=False)
    assert np.isfinite(result.scores).all()


# ---------------------------------------------------------------------------------------------
# 3. Factors of another model


def test_factors_refuse_a_model_with_other_weights(gpt2_model, gpt2_train, tokenizer):
    factors = fit(gpt2_model, gpt2_train)
    other = exact_model("gpt2", len(tokenizer), seed=1)
    with pytest.raises(ik.ModelError, match=factors.fingerprint):
        score(other, factors, gpt2_train)
    with pytest.raises(ik.ModelError):
        ik.token_scores(other, factors, QUERIES[0], gpt2_train[0])

    tuned = exact_model("gpt2", len(tokenizer))  # same weights as gpt2_model, then a small change
    with torch.no_grad():
        tuned.transformer.h[1].mlp.c_proj.weight.mul_(1.01)
    with pytest.raises(ik.ModelError):
        score(tuned, factors, gpt2_train)

    untracked = exact_model("gpt2", len(tokenizer))  # a change outside the tracked layers
    with torch.no_grad():
        untracked.transformer.wpe.weight.add_(0.05)
    with pytest.raises(ik.ModelError):
        score(untracked, factors, gpt2_train)


def test_factors_accept_the_same_weights_in_another_instance(gpt2_model, gpt2_train, tokenizer):
    factors = fit(gpt2_model, gpt2_train)
    twin = exact_model("gpt2", len(tokenizer))  # same seed, so the same weights
    assert ik.model_fingerprint(twin) == factors.fingerprint
    np.testing.assert_array_equal(score(twin, factors, gpt2_train).scores,
                                  score(gpt2_model, factors, gpt2_train).scores)  # fmt: skip


def test_score_with_factors_of_another_model(llama, llama_factors, llama_train, tokenizer):
    other = make_model("llama", len(tokenizer), dtype=torch.float32, seed=1)
    for call in (
        lambda: ik.score(other, llama_factors, [QUERY], llama_train, progress=False),
        lambda: ik.token_scores(other, llama_factors, QUERY, llama_train[0]),
    ):
        with pytest.raises(ik.ModelError) as info:
            call()
        message = str(info.value)
        assert llama_factors.fingerprint in message
        assert ik.model_fingerprint(other) in message
        assert "refit" in message


def test_score_with_factors_of_another_architecture(llama_factors, llama_train, tokenizer):
    gpt2 = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    with pytest.raises(ik.ModelError, match=llama_factors.fingerprint):
        ik.score(gpt2, llama_factors, [QUERY], llama_train, progress=False)


def test_factors_shape_mismatch_names_layer(llama, llama_factors, llama_train):
    bad = copy.deepcopy(llama_factors)
    bad.layers[MLP_NAME].shape = (7, 7)
    with pytest.raises(ik.ModelError, match=re.escape(MLP_NAME) + r".*\(7, 7\)"):
        ik.score(llama, bad, [QUERY], llama_train, progress=False)


# ---------------------------------------------------------------------------------------------
# 4. fit_factors options


def test_max_examples_fits_on_the_first_sequences(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    train = ik.TextDataset.from_texts(TINY_CORPUS[:12], tokenizer, max_length=32)
    opts = {"fisher": "empirical", "dtype": torch.float64, "progress": False}
    capped = ik.fit_factors(model, train, "mlp", max_examples=5, **opts)
    first = ik.fit_factors(model, train.subset(range(5)), "mlp", **opts)
    assert capped.meta["n_examples"] == 5
    for name in capped.modules:
        torch.testing.assert_close(capped.layers[name].lam, first.layers[name].lam)


# ---------------------------------------------------------------------------------------------
# 5. Queries in the eigenbasis


@pytest.mark.parametrize("query_last", [False, True])
@pytest.mark.parametrize("strategy", ["ekfac", "diagonal", "identity"])
def test_in_eigenbasis_equals_explicit_matrices(strategy, query_last):
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, n, t = 6, 5, 3, 7
    s = torch.randn(n, t, d_out, dtype=torch.float64, generator=gen)
    a = torch.randn(n, t, d_in, dtype=torch.float64, generator=gen)
    s[0, 4:] = 0  # padding: no output gradient
    s[1, :3] = 0  # prompt tokens no later layer reads
    a[2, 5:] = 0
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64, generator=gen))[0]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=gen))[0]
    lam = torch.rand(d_out, d_in, dtype=torch.float64, generator=gen)
    layer = ik.factors.LayerFactors("x", (d_out, d_in))
    if strategy == "ekfac":
        layer.q_s, layer.q_a, layer.lam = q_s, q_a, lam
    elif strategy == "diagonal":
        layer.lam = lam
    found = layer.in_eigenbasis(s, a, 0.3, query_last=query_last)
    for q in range(n):
        g = sum(torch.outer(s[q, i], a[q, i]) for i in range(t))  # G = Σ_t s_t a_tᵀ
        if strategy == "ekfac":
            g = q_s.T @ g @ q_a
        expected = g / ((0.0 if strategy == "identity" else lam) + 0.3)
        torch.testing.assert_close(found[q], expected, rtol=1e-12, atol=1e-12)
    if query_last:  # every position's values for all queries lie side by side
        assert found.permute(1, 2, 0).is_contiguous()
