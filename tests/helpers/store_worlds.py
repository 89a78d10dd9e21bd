"""Models, factors and gradient stores for the store tests, with their tolerance helpers.

``World`` holds a tiny GPT-2, its factors, its training set, its on-the-fly scores (the
reference a store's scores are compared with) and the stores built from them, each built
once. The fixtures ``w32`` (twelve sequences, float32) and ``w64`` (ten short sequences,
float64) are in ``tests/conftest.py``; test_store_scoring.py, test_codecs.py and
test_reader.py use them. ``autograd_weight_grads`` is the independent reference of a
sequence's weight gradients (``torch.autograd`` on the module weights) that the codec and
reader tests check stored gradients against.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

import influencekit as ik
from influencekit.store.reader import GradientStore
from influencekit.tiny import TINY_CORPUS

from helpers.tiny_models import make_model

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
# Worlds: one per configuration, built once per test module (the w32 and w64 fixtures)


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
        options = {"part_size": CHUNK, "batch_size": 3, **kw}
        key = (codec, dtype, json.dumps(options, sort_keys=True, default=str))
        if key not in self._stores:
            name = f"s{len(self._stores)}-{codec.replace(':', '')}-{dtype}.h5"
            self._stores[key] = ik.GradientStore.build(
                self.folder / name, self.model, self.train, codec=codec, dtype=dtype,
                factors=self.factors, progress=False, **options,
            )  # fmt: skip
        return self._stores[key]


# ---------------------------------------------------------------------------------------------
# The independent reference: autograd on the module weights, one sequence at a time


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
