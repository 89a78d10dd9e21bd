"""Tests of kit/hooks.py beyond the float64 references: capture leaves the caller's model as
it found it.

``capture`` runs in eval mode with every parameter's ``requires_grad`` switched off, for the
duration of a pass. Through ``fit_factors`` and ``score``: every submodule's train/eval mode
and every parameter's ``requires_grad`` flag come back unchanged, on every family and for a
mixture of modes; a model left in training mode (dropout) gives the factors of eval mode.

Elsewhere: captured gradients against ``torch.autograd`` in test_reference.py (padded
batches, real and sampled labels, Conv1D and Linear, with and without bias; one float64
reference shared with the factors and scores checks) and test_families.py (every family, the
completion-only query gradients, OPT's flattened MLP inputs); non-finite activations named
by layer and example in test_errors.py; sampled labels independent of batching in
test_reproducible.py.
"""

from __future__ import annotations

import pytest
import torch

import influencekit as ik

from helpers.tiny_models import FAMILIES, make_model

QUERY = ("The chef tastes the stew", " and adds more pepper.")


def snapshot(model):
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    return modes, flags


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_mode_and_requires_grad_are_restored(family, tokenizer, padded_train, training):
    model = make_model(family, len(tokenizer), layers=1)
    model.train(training)
    params = list(model.named_parameters())
    for k, (_, p) in enumerate(params):  # a mixture of frozen and trainable parameters
        p.requires_grad_(k % 3 != 0)
    before = snapshot(model)
    factors = ik.fit_factors(model, padded_train, "mlp", progress=False)
    assert snapshot(model) == before
    assert model.training is training
    ik.score(model, factors, [QUERY], padded_train, progress=False)
    assert snapshot(model) == before


def test_fit_in_training_mode_runs_without_dropout(tokenizer, padded_train):
    """A model left in train mode (dropout 0.1) gives the same factors as in eval mode."""
    model = make_model("gpt2", len(tokenizer), layers=1)
    assert model.config.resid_pdrop > 0
    eval_fit = ik.fit_factors(model, padded_train, "mlp", fisher="empirical", dtype=torch.float64,
                              progress=False)  # fmt: skip
    model.train()
    train_fit = ik.fit_factors(model, padded_train, "mlp", fisher="empirical", dtype=torch.float64,
                               progress=False)  # fmt: skip
    assert model.training
    for name in eval_fit.modules:
        assert torch.equal(eval_fit.layers[name].lam, train_fit.layers[name].lam)


def test_mixed_submodule_modes_are_restored(tokenizer, padded_train):
    model = make_model("gpt2", len(tokenizer), layers=1)
    model.train()
    model.transformer.h[0].mlp.eval()  # e.g. a frozen sub-block kept without dropout
    before = snapshot(model)
    ik.fit_factors(model, padded_train, "mlp", progress=False)
    assert snapshot(model) == before
