"""Reproducibility: the same inputs give bit-identical factors and scores, and the batch
size does not change them.

1. Determinism: an empirical fit uses no randomness (another seed changes only the recorded
   meta), and fitting and scoring twice gives the same bits; a sampled fit depends on its
   seed only (A, from the inputs alone, does not depend on it at all).
2. Batch size: factors (A and S, their eigenvalues, Λ) and scores equal those computed one
   sequence at a time, to float64 rounding, whether fit and score are batched alike or
   only the scoring is: GPT-2 (Conv1D) on every layer with the sampled Fisher (its labels
   are drawn per example, whatever the batch), GPT-2 and Llama MLPs with both Fishers, and
   OPT, whose MLP flattens its (B, T, d) inputs to (B*T, d).

Files (round trips, damaged files) and the fingerprint check are tested in test_factors.py
and test_result.py; the padding side in test_reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS

from helpers.engines import (
    ARRAYS,
    PADDED_INDICES,
    QUERIES,
    TEXT_INDICES,
    assert_factors_identical,
    exact_model,
    fit,
    score,
)

# ---------------------------------------------------------------------------------------------
# 1. Determinism


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_empirical_fits_and_scores_are_bit_identical(gpt2_model, gpt2_train, strategy):
    first = fit(gpt2_model, gpt2_train, fisher="empirical", strategy=strategy)
    second = fit(gpt2_model, gpt2_train, fisher="empirical", strategy=strategy, seed=123)
    # fisher="empirical" uses no randomness: another seed changes only the recorded meta.
    for name in first.modules:
        for key in ARRAYS:
            x, y = getattr(first.layers[name], key), getattr(second.layers[name], key)
            assert (x is None) == (y is None)
            assert x is None or torch.equal(x, y)
    third = fit(gpt2_model, gpt2_train, fisher="empirical", strategy=strategy)
    assert_factors_identical(first, third)
    r1, r2 = score(gpt2_model, first, gpt2_train), score(gpt2_model, third, gpt2_train)
    assert np.array_equal(r1.layer_scores, r2.layer_scores)
    assert r1.meta == r2.meta


def test_sampled_fits_depend_on_the_seed_only(gpt2_model, gpt2_train):
    a = fit(gpt2_model, gpt2_train, fisher="sampled", seed=7)
    b = fit(gpt2_model, gpt2_train, fisher="sampled", seed=7)
    assert_factors_identical(a, b)
    assert np.array_equal(
        score(gpt2_model, a, gpt2_train).scores, score(gpt2_model, b, gpt2_train).scores
    )
    c = fit(gpt2_model, gpt2_train, fisher="sampled", seed=8)
    for name in a.modules:
        la, lc = a.layers[name], c.layers[name]
        # A holds only inputs, which do not depend on the sampled labels.
        assert torch.equal(la.q_a, lc.q_a) and torch.equal(la.d_a, lc.d_a)
        assert not torch.allclose(la.d_s, lc.d_s, rtol=1e-3)
        assert not torch.allclose(la.lam, lc.lam, rtol=1e-3)
    # Sampled labels are not the real next tokens.
    e = fit(gpt2_model, gpt2_train, fisher="empirical")
    assert not torch.allclose(a.layers[a.modules[0]].lam, e.layers[e.modules[0]].lam, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# 2. Batch size


def covariances(lf):
    return lf.q_a @ torch.diag(lf.d_a) @ lf.q_a.T, lf.q_s @ torch.diag(lf.d_s) @ lf.q_s.T


@dataclass(frozen=True)
class Batching:
    """One model, training set and fit, computed at several batch sizes.

    A tiny float64 model of ``family`` with ``blocks`` blocks (SDPA attention), the texts at
    positions ``texts`` of TINY_CORPUS cut to ``max_length`` tokens, factors of ``modules``
    fitted with ``fisher`` and ``seed``, scores of ``queries``; each batch size of ``sizes``
    after the first is compared with the first. Λ is compared within ``lam_atol × max Λ`` and
    the scores of factors fitted at that batch size within ``scores_atol × max|scores|``.
    """

    family: str
    blocks: int
    texts: tuple[int, ...]
    max_length: int
    modules: str
    fisher: str
    seed: int
    queries: list
    sizes: tuple[int, ...]
    lam_atol: float
    scores_atol: float


# Eight texts of 23 to 41 tokens (41 is cut to 40): every batch of 2 or 5 holds padding.
CONV1D_TEXTS = (12, 1, 20, 33, 28, 4, 11, 36)
CONV1D_QUERIES = [
    ("The chef tastes the stew", " and adds more pepper."),
    ("A comet", " grows a long tail when it nears the sun."),
]


def mlp_batching(family: str, fisher: str) -> Batching:
    """Ten texts, one batch of all of them at most; scores within 1e-12 of their scale."""
    sizes = (1, 3, len(TEXT_INDICES))
    texts = tuple(TEXT_INDICES)
    return Batching(family, 2, texts, 128, "mlp", fisher, 0, QUERIES, sizes, 1e-10, 1e-12)


BATCHINGS = {
    "gpt2-all-sampled": Batching(
        "gpt2", 2, CONV1D_TEXTS, 40, "all", "sampled", 5, CONV1D_QUERIES, (1, 2, 5), 1e-10, 1e-10
    ),
    "gpt2-mlp-sampled": mlp_batching("gpt2", "sampled"),
    "gpt2-mlp-empirical": mlp_batching("gpt2", "empirical"),
    "llama-mlp-sampled": mlp_batching("llama", "sampled"),
    "llama-mlp-empirical": mlp_batching("llama", "empirical"),
    # OPT reshapes its MLP's (B, T, d) inputs to (B*T, d): capture must not assume (B, T, d).
    "opt-mlp-empirical": Batching(
        "opt", 1, tuple(PADDED_INDICES), 128, "mlp", "empirical", 0, QUERIES, (1, 4), 1e-12, 1e-10
    ),
}


@pytest.mark.parametrize("case", BATCHINGS.values(), ids=BATCHINGS.keys())
def test_batch_size_does_not_change_factors_or_scores(tokenizer, case):
    model = exact_model(case.family, len(tokenizer), layers=case.blocks)
    texts = [TINY_CORPUS[i] for i in case.texts]
    train = ik.TextDataset.from_texts(texts, tokenizer, max_length=case.max_length)
    options = {"fisher": case.fisher, "seed": case.seed, "dtype": torch.float64, "progress": False}

    def factors_at(batch_size):
        return ik.fit_factors(model, train, case.modules, batch_size=batch_size, **options)

    def scores_at(batch_size, factors):
        return ik.score(model, factors, case.queries, train, batch_size=batch_size,
                        dtype=torch.float64, progress=False).layer_scores  # fmt: skip

    first, *others = case.sizes
    reference = factors_at(first)
    ref_scores = scores_at(first, reference)
    scale = np.abs(ref_scores).max()
    assert scale > 0
    for batch_size in others:
        other = factors_at(batch_size)
        assert other.modules == reference.modules
        for name in reference.modules:
            lr, lo = reference.layers[name], other.layers[name]
            for want, got in zip(covariances(lr), covariances(lo), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10,
                                           atol=1e-12 * float(want.abs().max()))  # fmt: skip
            for key in ("d_a", "d_s"):
                want = getattr(lr, key)
                torch.testing.assert_close(getattr(lo, key), want, rtol=1e-10,
                                           atol=1e-10 * float(want.abs().max()))  # fmt: skip
            torch.testing.assert_close(lo.lam.sum(), lr.lam.sum(), rtol=1e-10, atol=0)
            torch.testing.assert_close(lo.lam, lr.lam, rtol=1e-10,
                                       atol=case.lam_atol * float(lr.lam.abs().max()))  # fmt: skip
        got = scores_at(batch_size, other)
        np.testing.assert_allclose(got, ref_scores, rtol=1e-10, atol=case.scores_atol * scale,
                                   err_msg=f"fit and score at batch size {batch_size}")  # fmt: skip
        # score's batching alone, with the factors fitted at the first batch size
        again = scores_at(batch_size, reference)
        np.testing.assert_allclose(again, ref_scores, rtol=1e-10, atol=1e-10 * scale,
                                   err_msg=f"score at batch size {batch_size}")  # fmt: skip
