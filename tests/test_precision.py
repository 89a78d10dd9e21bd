"""Low-precision forwards: a bf16 model or bf16 autocast, with float32 accumulators.

The scores cannot equal the float32 ones bit for bit, but they must rank the training data
the same way to within bf16 noise, and every accumulator must stay float32.
"""

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS

from helpers.tiny_models import make_model

QUERIES = [("The captain steers", " the yacht."), ("Stars shine", " at night.")]


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32, hidden=32)
    train = ik.TextDataset.from_texts(TINY_CORPUS, tokenizer, max_length=32)
    factors = ik.fit_factors(model, train, "mlp", fisher="empirical", progress=False)
    reference = ik.score(model, factors, QUERIES, train, progress=False)
    return model, train, factors, reference


def pearson(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_autocast_bf16_forward_keeps_scores(setup):
    model, train, factors, reference = setup
    bf16 = ik.fit_factors(model, train, "mlp", fisher="empirical", amp_dtype=torch.bfloat16,
                          progress=False)  # fmt: skip
    # kept in the accumulation dtype (float32 by default), not the bf16 of the forward
    assert all(lf.lam.dtype == torch.float32 for lf in bf16.layers.values())
    result = ik.score(model, factors, QUERIES, train, amp_dtype=torch.bfloat16, progress=False)
    assert np.isfinite(result.scores).all()
    assert pearson(result.scores, reference.scores) > 0.95
    for name in factors.modules:  # factors fitted under autocast match the fp32 ones closely
        lam32, lam16 = factors.layers[name].lam, bf16.layers[name].lam
        assert pearson(lam16.numpy(), lam32.numpy()) > 0.95


def test_bf16_weights_with_float32_accumulators(setup, tokenizer):
    _, train, _, reference = setup
    low = make_model("gpt2", len(tokenizer), dtype=torch.float32, hidden=32).to(torch.bfloat16)
    factors = ik.fit_factors(low, train, "mlp", fisher="empirical", progress=False)
    result = ik.score(low, factors, QUERIES, train, progress=False)
    assert np.isfinite(result.scores).all()
    assert pearson(result.scores, reference.scores) > 0.9
