"""The small engines that several test modules share, and their plain helpers.

The fixtures built from them are in ``tests/conftest.py``:

- a float32 tiny Llama (``llama``), six training sequences with ids ``t0..t5``
  (``llama_train``), its EK-FAC factors (``llama_factors``) and their file
  (``llama_factors_file``): the error paths (test_errors.py, test_factors.py,
  test_scoring.py);
- a float64 tiny GPT-2 with SDPA attention (``gpt2_model``), ten training sequences
  (``gpt2_train``) and the factors and result files saved from them (``gpt2_files``):
  reproducibility, files and fingerprints (test_reproducible.py, test_factors.py,
  test_result.py);
- eight training sequences of different token lengths, so that a batch of them is padded
  (``padded_train``): every family end to end (test_families.py, test_hooks.py).
"""

from __future__ import annotations

import pytest
import torch

import influencekit as ik

from helpers.tiny_models import make_model

# ---------------------------------------------------------------------------------------------
# The float32 Llama of the error paths

TRAIN_IDS = [f"t{i}" for i in range(6)]
QUERY = ("The moon", " rises over the sea.")
MLP_NAME = "model.layers.0.mlp.gate_proj"


# ---------------------------------------------------------------------------------------------
# The float64 GPT-2 of the reproducibility, factors and result tests

ARRAYS = ("q_a", "d_a", "q_s", "d_s", "lam")
TEXT_INDICES = [0, 4, 11, 15, 22, 27, 31, 38, 9, 19]
QUERIES = [("The ship left", " the harbour at dawn."), ("The oven must be", " hot.")]


def exact_model(family: str, vocab_size: int, **kwargs):
    """float64 with SDPA attention: eager attention takes its softmax in float32 for most
    families, which would make padded and unpadded forwards differ at ~1e-8."""
    model = make_model(family, vocab_size, **kwargs)
    model.set_attn_implementation("sdpa")
    return model


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


def assert_bad_file(loader, path) -> None:
    """``loader(path)`` raises FileFormatError, and its message names the file."""
    with pytest.raises(ik.FileFormatError) as info:
        loader(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Eight texts of different token lengths, so a batch of them is padded (TINY_CORPUS positions)

PADDED_INDICES = [1, 3, 6, 12, 19, 26, 33, 36]
