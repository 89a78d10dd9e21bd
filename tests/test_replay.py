"""The exact metagradient by replaying training (kit/validate/replay.py).

1. The replay trains exactly as the recipe's loop does (the same batches, learning rates,
   dropout masks, clipping and AdamW): float64 weights equal to ``train_lm``'s.
2. The metagradient against central finite differences of retraining with one sequence's
   weight moved by ±ε (tiny model, float64): the derivative it claims is the one training
   has.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS
from influencekit.training import new_gpt2, train_lm
from influencekit.validate import Recipe
from influencekit.validate.replay import metagradient_scores, replay_training

RECIPE = Recipe(n_layer=1, n_embd=16, n_head=2, n_positions=32, epochs=2, batch_size=4,
                peak_lr=3e-2, warmup=1)  # fmt: skip
QUERIES = [("The ship left", " the harbour at dawn."), ("The oven must be", " hot.")]


@pytest.fixture(scope="module")
def data(tokenizer):
    return ik.TextDataset.from_texts(TINY_CORPUS[:10], tokenizer, max_length=24)


def f_of(model, tokenizer) -> np.ndarray:
    return ik.validate.completion_log_probs(model, QUERIES, tokenizer)


def causal_loss_in_float64(logits, labels, vocab_size, **_):
    """transformers' causal LM loss without its cast of the logits to float32."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=-100
    )


def recipe_trained(data, seed):
    """The recipe's own loop (``train_lm``: torch's AdamW and clipping) on a float64 model
    whose loss stays in float64."""
    model = new_gpt2(data.tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=seed)
    model = model.double()
    model.loss_function = causal_loss_in_float64
    train_lm(model, data, epochs=RECIPE.epochs, batch_size=RECIPE.batch_size,
             peak_lr=RECIPE.peak_lr, warmup=RECIPE.warmup, seed=seed,
             weight_decay=RECIPE.weight_decay)  # fmt: skip
    return model


def test_the_replay_trains_as_the_recipe_does(data):
    model = recipe_trained(data, seed=3)
    replay = replay_training(RECIPE, data, seed=3)
    assert len(replay.steps) == len(replay.states) == 2 * 3  # 10 sequences in batches of 4
    assert [s.number for s in replay.steps] == list(range(1, 7))
    trained = dict(model.named_parameters())
    for name, value in replay.final.items():
        # the same float64 arithmetic in another order: rounding, amplified by 6 steps
        torch.testing.assert_close(value, trained[name].detach(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        f_of(replay.model, data.tokenizer), f_of(model, data.tokenizer), rtol=1e-9
    )


def finite_differences(data, i: int, eps: float) -> np.ndarray:
    """``(f(w + ε e_i) − f(w − ε e_i)) / 2ε`` over retrained models, for every query."""
    moved = []
    for sign in (1, -1):
        weights = torch.ones(len(data), dtype=torch.float64)
        weights[i] += sign * eps
        replay = replay_training(RECIPE, data, seed=1, weights=weights)
        moved.append(f_of(replay.model, data.tokenizer))
    return (moved[0] - moved[1]) / (2 * eps)


def test_metagradient_matches_finite_differences_of_retraining(data):
    scores = metagradient_scores(RECIPE, data, QUERIES, seed=1, progress=False)
    assert scores.shape == (len(QUERIES), len(data)) and np.isfinite(scores).all()
    scale = np.abs(scores).max()
    assert scale > 0
    # Rounding: f is about 50 in size, known to ~1e-14, so a difference over 2ε = 2e-7
    # carries up to ~1e-7 of it. Truncation: O(ε²), large where AdamW divides by a small
    # second moment (a gradient that nearly cancels in a batch): it must shrink about 100×
    # from ε = 1e-6 to 1e-7, as a true derivative's does.
    floor = 1e-7
    for i in range(len(data)):
        coarse = np.abs(finite_differences(data, i, 1e-6) - scores[:, i]).max()
        fine = np.abs(finite_differences(data, i, 1e-7) - scores[:, i]).max()
        assert fine <= 1e-5 * scale, (i, fine)
        assert fine <= coarse / 20 + floor, (i, coarse, fine)
