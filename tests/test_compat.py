"""Files written by the previous version of the kit open and score as it scored them.

tests/data/previous (written once by its make.py with influencekit 0.7.0): a tiny Llama, its
factors file (format 1: float64, no recorded damping or basis fingerprint) and two stores
(format 2: ``sparse8`` with paged positions in the whole eigenbasis, and ``lowrank:3``), with
the scores that version gave. The current kit reads them lazily, scores them, and continues
the old ``sparse8`` store in its own layout.

Tolerance: the scores are float32 sums of at most ~10⁴ products, so two CPUs (or summation
orders) may differ by ~10⁴ × 6·10⁻⁸ of the largest magnitude; 10⁻⁴ of the largest score
per query bounds that, and any real change (another damping, basis, or position decoding)
moves scores by far more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik

PREVIOUS = Path(__file__).parent / "data" / "previous"
QUERIES = [("The ship", " sailed over the sea."), ("The baker", " baked fresh bread.")]
TEXTS_NEW = ["The harbour lights came on as the ship returned.", "Bread and soup at the inn."]


@pytest.fixture(scope="module")
def previous():
    import sys

    sys.path.insert(0, str(PREVIOUS))
    from make import TEXTS

    model, tokenizer = ik.load_model(PREVIOUS / "model")
    train = ik.TextDataset.from_texts(TEXTS, tokenizer, max_length=24)
    scores = json.loads((PREVIOUS / "scores.json").read_text())
    return model, train, scores


def assert_same_scores(new: np.ndarray, old) -> None:
    old = np.asarray(old)
    assert new.shape == old.shape
    for q in range(len(old)):
        np.testing.assert_allclose(new[q], old[q], rtol=0, atol=1e-4 * np.abs(old[q]).max())


def test_version_one_factors_open_lazily_and_score_the_same(previous):
    model, train, scores = previous
    with h5py.File(PREVIOUS / "factors.h5", "r") as f:
        assert int(f.attrs["version"]) == 1
    factors = ik.Factors.load(PREVIOUS / "factors.h5")
    layer = factors.layers[factors.modules[0]]
    assert layer.dtype == torch.float64 and not layer._arrays  # nothing read yet
    result = ik.score(model, factors, QUERIES, train, progress=False)
    assert_same_scores(result.layer_scores, scores["fly"])
    # its damping, computed from Λ (the file records none), as that version computed it
    assert layer.default_damping() == 0.1 * float(layer.lam.double().mean())


@pytest.mark.parametrize("name", ["sparse8-40", "lowrank-3"])
def test_version_two_stores_open_and_score_the_same(previous, name):
    model, _, scores = previous
    store = ik.GradientStore.open(PREVIOUS / f"{name}.h5")
    with h5py.File(store.path, "r") as f:
        assert int(f.attrs["version"]) == 2
    factors = ik.Factors.load(PREVIOUS / "factors.h5")
    result = ik.score(model, factors, QUERIES, store, progress=False)
    assert_same_scores(result.layer_scores, scores[name])
    if name.startswith("sparse"):  # paged positions, the whole eigenbasis: no window
        assert all(c.positions.name == "pages" and c.window is None for c in store.codecs)


def test_an_old_sparse_store_is_continued_in_its_own_layout(previous, tmp_path):
    model, train, scores = previous
    for item in (PREVIOUS / "sparse8-40.h5", PREVIOUS / "sparse8-40.h5.d"):
        copy = shutil.copytree if item.is_dir() else shutil.copyfile
        copy(item, tmp_path / item.name)
    factors = ik.Factors.load(PREVIOUS / "factors.h5")
    more = ik.TextDataset.from_texts(
        [ex.text for ex in train] + TEXTS_NEW, train.tokenizer, max_length=24
    )
    store = ik.GradientStore.build(tmp_path / "sparse8-40.h5", model, more, factors=factors,
                                   progress=False)  # fmt: skip
    assert len(store) == len(more) and store.codec == "sparse8:40"
    assert all(c.positions.name == "pages" for c in store.codecs)
    result = ik.score(model, factors, QUERIES, store, progress=False)
    assert_same_scores(result.layer_scores[:, : len(train)], scores["sparse8-40"])
    exact = ik.score(model, factors, QUERIES, more, progress=False).scores[:, len(train) :]
    assert np.isfinite(result.scores).all() and (np.sign(result.scores[:, len(train) :]) != 0).all()
    assert exact.shape == (len(QUERIES), len(TEXTS_NEW))
