"""The exact metagradient of a query's measurement with respect to each training sequence's
weight, by replaying training (forward through it, then backward through the optimiser).

Give every training sequence ``z_i`` a weight ``w_i`` in the training loss, each batch's
``Σ_{i ∈ B} w_i · L(z_i) / (real next tokens in B)`` (the recipe's mean loss at ``w = 1``).
Training is then a function of ``w``: ``θ_T(w)``, through every optimiser step. The score
of ``z_i`` for a query is ``∂ f(θ_T(w)) / ∂ w_i`` at ``w = 1``, with
``f = log p(completion | prompt)``: a positive score, as everywhere in the kit, means that
up-weighting ``z_i`` raises ``f``. No curvature approximation and no local model: it is the
first-order effect of each sequence on the trained model as the recipe trains it, the
ground truth the influence approximations are judged by (Ilyas & Engstrom 2025 compute it
so, "MAGIC").

How: :func:`replay_training` runs the recipe's loop (:func:`influencekit.training.train_lm`:
the same batches, learning rates and dropout masks) as a function of ``w``, keeping each
step's state (weights, AdamW's moments and the random state the dropout masks come from).
:func:`metagradient_scores` then walks the steps backwards: each step is recomputed with
its graph and the adjoints of the next state are pulled back through it (a vector-Jacobian
product through the gradient, the clipping and the AdamW update), collecting ``∂/∂w`` on the
way. Memory: every step's state, ``3 × parameters × steps`` numbers; time: a few training
steps' worth per step and query. For small models, in float64.

Example:
    >>> from influencekit.validate import Recipe, load_setting
    >>> setting = load_setting()
    >>> scores = metagradient_scores(Recipe(epochs=1), setting.train[:32], setting.queries[:2])
    ... # doctest: +SKIP
    >>> scores.shape                                                     # doctest: +SKIP
    (2, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data import Batch, TextDataset, as_queries, query_batches
from ..hooks import label_log_probs
from ..progress import progress_counter
from ..training import Step, new_gpt2, schedule, training_batch
from .measure import functional_logits

BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, as the recipe's loop uses them
EPS = 1e-8
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (norm + this)
CLIP = 1.0  # the recipe's gradient clipping (train_lm's default)


@dataclass
class Replay:
    """A replayed training run: the model (its final weights loaded), the steps, and the
    state before each step (``params``, AdamW's ``m`` and ``v``, the torch random state)."""

    model: nn.Module
    train: TextDataset
    steps: list[Step]
    states: list[tuple[dict, dict, dict, torch.Tensor]]
    final: dict[str, torch.Tensor]
    weight_decay: float


def recipe_steps(recipe, n: int, seed: int) -> list[Step]:
    """The steps of ``recipe`` on ``n`` sequences from ``seed``, as its loop takes them."""
    return schedule(n, epochs=recipe.epochs, batch_size=recipe.batch_size,
                    peak_lr=recipe.peak_lr, warmup=recipe.warmup, seed=seed)  # fmt: skip


def replay_training(
    recipe,
    train: TextDataset,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    weights: torch.Tensor | None = None,
) -> Replay:
    """Train as ``recipe(train, seed)`` does, in ``dtype``, keeping every step's state;
    ``weights`` (one per sequence, default all 1) weigh each sequence's loss.

    Example:
        >>> replay = replay_training(Recipe(epochs=1), setting.train[:32])  # doctest: +SKIP
        >>> len(replay.states) == len(replay.steps)                          # doctest: +SKIP
        True
    """
    model = new_gpt2(
        train.tokenizer, n_layer=recipe.n_layer, n_embd=recipe.n_embd, n_head=recipe.n_head,
        n_positions=recipe.n_positions, seed=seed,
    ).to(dtype)  # fmt: skip
    model.train()  # dropout on, as the recipe trains
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    m = {name: torch.zeros_like(p) for name, p in params.items()}
    v = {name: torch.zeros_like(p) for name, p in params.items()}
    weights = torch.ones(len(train), dtype=dtype) if weights is None else weights.to(dtype)
    steps, states = recipe_steps(recipe, len(train), seed), []
    for step in steps:
        states.append((params, m, v, torch.get_rng_state()))
        batch = training_batch(train, step.rows)
        leaves = {k: x.requires_grad_(True) for k, x in params.items()}
        params, m, v = adamw_step(
            model, leaves, m, v, batch, weights[step.rows], step, recipe.weight_decay
        )
        params = {k: x.detach() for k, x in params.items()}
        m = {k: x.detach() for k, x in m.items()}
        v = {k: x.detach() for k, x in v.items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    model.eval()
    return Replay(model, train, steps, states, params, recipe.weight_decay)


def adamw_step(model, params, m, v, batch: Batch, weights, step: Step, weight_decay: float,
               *, create_graph: bool = False):  # fmt: skip
    """One step of the recipe's loop as a function of the state and the batch's weights:
    the weighted mean loss's gradient, clipped to norm ``CLIP``, then AdamW. Returns the
    next ``(params, m, v)``."""
    loss = weighted_loss(model, params, batch, weights)
    names = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    scale = torch.clamp(CLIP / (norm + CLIP_EPS), max=1.0)
    b1, b2 = BETAS
    correction1, correction2 = 1 - b1**step.number, 1 - b2**step.number
    new_p, new_m, new_v = {}, {}, {}
    for name, g in zip(names, grads, strict=True):
        g = g * scale
        p = params[name] * (1 - step.lr * weight_decay)
        new_m[name] = b1 * m[name] + (1 - b1) * g
        new_v[name] = b2 * v[name] + (1 - b2) * g * g
        denom = _sqrt(new_v[name]) / math.sqrt(correction2) + EPS
        new_p[name] = p - (step.lr / correction1) * new_m[name] / denom
    return new_p, new_m, new_v


def weighted_loss(model, params, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i · L(z_i) / (real next tokens in the batch)``: the recipe's mean
    next-token cross-entropy at ``w = 1``."""
    logits = functional_logits(model, params, batch)
    per_row = -label_log_probs(torch.log_softmax(logits, -1), batch)
    return (weights * per_row).sum() / batch.label_mask.sum()


def metagradient_scores(
    recipe,
    train: TextDataset,
    queries,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> np.ndarray:
    """``∂ log p(completion | prompt) / ∂ w_i`` at the end of ``recipe``'s training on
    ``train`` from ``seed``, for every query and training sequence: ``(Q, N)``.

    Example:
        >>> scores = metagradient_scores(Recipe(epochs=1), setting.train[:32],
        ...                              setting.queries[:2])            # doctest: +SKIP
    """
    queries = as_queries(queries)
    replay = replay_training(recipe, train, seed=seed, dtype=dtype)
    adjoints = [_query_gradient(replay, query) for query in queries]
    names = list(replay.final)
    out = torch.zeros(len(queries), len(train), dtype=dtype)
    with progress_counter(len(replay.steps), desc="replaying backwards", enabled=progress) as bar:
        for step, state in zip(reversed(replay.steps), reversed(replay.states), strict=True):
            adjoints = _pull_back(replay, step, state, names, adjoints, out)
            bar.update(1)
    return out.numpy()


def _pull_back(replay: Replay, step: Step, state, names, adjoints, out) -> list:
    """The adjoints of the state before ``step`` from those after it, one per query; each
    query's ``∂/∂w`` of the step's batch added to ``out``."""
    params, m, v, rng = state
    leaves = [
        {k: x.detach().requires_grad_(True) for k, x in part.items()} for part in (params, m, v)
    ]
    weights = torch.ones(len(step.rows), dtype=out.dtype, requires_grad=True)
    torch.set_rng_state(rng)  # the same dropout masks as the forward pass drew
    model = replay.model.train()
    after = adamw_step(
        model, *leaves, training_batch(replay.train, step.rows), weights, step, replay.weight_decay,
        create_graph=True,
    )  # fmt: skip
    outputs = [part[k] for part in after for k in names]
    inputs = [part[k] for part in leaves for k in names] + [weights]
    pulled = []
    for q, adjoint in enumerate(adjoints):
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=adjoint, retain_graph=q < len(adjoints) - 1,
            materialize_grads=True,  # zeros for what the step does not reach
        )  # fmt: skip
        out[q, step.rows] += grads[-1].detach()
        pulled.append([g.detach() for g in grads[:-1]])
    replay.model.eval()
    return pulled


def _query_gradient(replay: Replay, query) -> list[torch.Tensor]:
    """``∂ f / ∂`` the final state, as adjoints: the weights' gradient, zeros for ``m``, ``v``."""
    final = {k: x.detach().requires_grad_(True) for k, x in replay.final.items()}
    replay.model.eval()
    batch = next(query_batches([query], replay.train.tokenizer, 1))
    logits = functional_logits(replay.model, final, batch)
    f = label_log_probs(torch.log_softmax(logits, -1), batch).sum()
    params = torch.autograd.grad(f, list(final.values()), materialize_grads=True)
    zeros = [torch.zeros_like(x) for x in final.values()]
    return [*params, *zeros, *zeros]


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """``√x`` whose derivative at 0 is 0, not infinite: a moment that never moved (a
    parameter no batch reached, like an unused embedding row) passes no gradient back, where
    the plain square root's would be ``0 · ∞``."""
    moved = x > 0
    return torch.where(moved, torch.where(moved, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))
