"""The proximal Bregman response function (PBRF): a ground truth for influence scores.

Bae et al. 2022 ("If Influence Functions are the Answer, Then What is the Question?") show
that damped Gauss–Newton influence functions approximate, to first order in ε, the response
of the *proximal Bregman objective*, not of retraining. Here one training sequence ``z_m`` is
up-weighted by ``ε`` and, over the **tracked layers' weights and biases only** (every other
parameter frozen, as the kit scores only those), we minimise

    PBRF(θ) = (1/N) Σ_i D_i(θ) + ε · L(z_m, θ) + Σ_ℓ (λ_ℓ / 2) ‖θ_ℓ − θ_s,ℓ‖²

where ``θ_s`` are the model's weights, ``N = len(train)``, ``L(z)`` is the kit's training
loss (the *sum* over predicted tokens of ``−log p``, docs/math.md) and ``D_i`` is the
Bregman divergence of the output-space loss between the new and the original logits on
sequence ``i``. For softmax cross-entropy that divergence does not depend on the label:
``D_i(θ) = Σ_t KL(p_θs(· | x_≤t) ‖ p_θ(· | x_≤t))`` summed over the predicted positions
(the same positions ``L`` sums over). The returned response is

    R(q, z_m) = [f(θ*(ε)) − f(θ_s)] / ε,      f = log p(completion | prompt),

or with ``symmetric=True`` ``[f(θ*(ε)) − f(θ*(−ε))] / (2ε)``, which cancels the ε² term.

**Relation to the kit's score.** The Hessian of ``(1/N) Σ_i D_i`` at ``θ_s`` is the
Gauss–Newton matrix ``G`` of the mean over sequences of the summed-token losses, so to first
order ``θ* − θ_s = −ε (G + λ)⁻¹ ∇L(z_m)`` and

    lim_{ε→0} R(q, z_m) = −∇fᵀ (G + λ)⁻¹ ∇L(z_m) = g_qᵀ (G + λ)⁻¹ ∇L(z_m),

which is the kit's ``I(q, z_m)`` (docs/math.md: positive = up-weighting ``z_m`` raises
``log p(completion | prompt)``), with the kit's per-layer damping ``λ_ℓ`` equal to the
proximity weight here (pass the same float, or ``factors.damping_for(None)``). The
normalisation matches ``ekfac`` and ``diagonal`` factors fitted on all of ``train``: their
``Λ`` is a *mean over sequences* of squared per-sequence (summed-token) gradients, i.e. an
estimate of the GNH of ``(1/N) Σ_i L(z_i)`` — the ``1/N`` above. Remaining differences are
the kit's approximations: block-diagonal over layers (PBRF couples them), Kronecker
eigenbasis, and one sampled label per token for the Fisher. ``kfac`` factors use token means
``S ⊗ A``, which underestimate the per-sequence GNH by roughly the tokens per sequence, so
``kfac`` scores are larger in scale (correlation is unaffected by a constant).

The objective is solved in the rescaled variable ``δ = (θ − θ_s) / ε`` (well conditioned
whatever ε: it tends to the quadratic ``½ δᵀ(G + λ)δ + ∇L(z_m)ᵀδ``), in float64, by
full-batch L-BFGS with a strong-Wolfe line search (default) or Adam.

Example:
    >>> r = pbrf_response(model, train, ("The chef tastes the", " soup."), 3, damping=1e-3)
    ... # doctest: +SKIP
    >>> scores = pbrf_scores(model, train, queries, [0, 1, 2], damping=1e-3)  # doctest: +SKIP
    >>> compare(result.scores[:, [0, 1, 2]], scores)["overall"]["pearson"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import checks
from ..data import TextDataset, as_queries, collate, padding_id, query_batches
from ..errors import ParameterError
from ..hooks import label_log_probs
from ..models import select_modules
from .measure import functional_logits, layer_damping, param_damping, tracked_params

Params = dict[str, torch.Tensor]


@dataclass
class PBRFInfo:
    """How one PBRF minimisation went.

    ``grad_ratio``: final ``‖∇J(δ)‖ / ‖∇J(0)‖`` in the rescaled variable (small = converged);
    ``evaluations``: objective evaluations used; ``objective``: final ``J(δ)``.
    """

    grad_ratio: float
    evaluations: int
    objective: float


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_{masked positions} KL(exp(ref_logp) ‖ exp(logp))``: the Bregman divergence of
    softmax cross-entropy between two logit vectors (whatever the label).

    Example:
        >>> ref = torch.log_softmax(torch.tensor([[[0.0, 1.0]]]), -1)
        >>> float(kl_divergence(ref, ref, torch.tensor([[True]])))
        0.0
    """
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * mask).sum()


def minimise_pbrf(
    params: Params,
    divergence: Callable[[Params], torch.Tensor],
    loss: Callable[[Params], torch.Tensor],
    *,
    epsilon: float,
    damping: float | Mapping[str, float],
    method: str = "lbfgs",
    steps: int = 500,
    lr: float = 1.0,
    tol: float = 1e-7,
) -> tuple[Params, PBRFInfo]:
    """Minimise ``divergence(θ) + ε·loss(θ) + Σ (λ/2)‖θ − θ_s‖²`` from ``θ_s = params``.

    ``divergence`` must be zero with zero gradient at ``θ_s`` (a Bregman divergence to the
    original outputs, already averaged over the training set). ``damping``: one ``λ`` or a
    ``{name: λ}`` map over ``params``. ``method``: ``"lbfgs"`` (``steps`` iterations at
    most, ``lr`` its step scale) or ``"adam"`` (``steps`` updates of rate ``lr``). Stops once
    the rescaled gradient norm has fallen by ``tol``. Returns the minimiser and a
    :class:`PBRFInfo`. ``params`` are not modified.

    Example:
        >>> theta = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> best, info = minimise_pbrf(theta, lambda p: 0.5 * (p["w"] @ x) ** 2,
        ...     lambda p: -(p["w"] @ x), epsilon=0.1, damping=1.0)
        >>> torch.allclose(best["w"], 0.1 * x / (1 + x @ x))
        True
    """
    if epsilon == 0:
        raise ParameterError("epsilon", epsilon, "non-zero")
    checks.choice("method", method, ("lbfgs", "adam"))
    lam = {
        name: float(damping[name] if isinstance(damping, Mapping) else damping) for name in params
    }
    if any(value <= 0 for value in lam.values()):
        raise ParameterError("damping", lam, "> 0 (for every parameter)")
    origin = {name: p.detach() for name, p in params.items()}
    base_loss = loss(origin).detach()
    delta = {name: torch.zeros_like(p, requires_grad=True) for name, p in origin.items()}
    count = 0

    def objective() -> torch.Tensor:
        # J(δ) = PBRF(θ_s + εδ) / ε²: the same minimiser, but O(1) values and gradients for
        # any ε, so the optimiser's tolerances mean the same thing at every scale.
        nonlocal count
        count += 1
        theta = {name: origin[name] + epsilon * d for name, d in delta.items()}
        prox = sum(0.5 * lam[name] * (d * d).sum() for name, d in delta.items())
        return divergence(theta) / epsilon**2 + (loss(theta) - base_loss) / epsilon + prox

    def grad_norm() -> float:
        value = objective()
        grads = torch.autograd.grad(value, list(delta.values()))
        return float(torch.sqrt(sum((g * g).sum() for g in grads)))

    start = grad_norm()  # = ‖∇L(z_m)‖ at δ = 0
    if method == "lbfgs":
        opt = torch.optim.LBFGS(
            list(delta.values()),
            lr=lr,
            max_iter=steps,
            history_size=50,
            tolerance_grad=tol * start,
            tolerance_change=0.0,  # a flat valley must not stop it early: the gradient decides
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        opt.step(closure)
    else:
        opt = torch.optim.Adam(list(delta.values()), lr=lr)
        for step in range(steps):
            opt.zero_grad()
            objective().backward()
            if step % 50 == 0 or step == steps - 1:
                norm = float(torch.sqrt(sum((d.grad * d.grad).sum() for d in delta.values())))
                if norm <= tol * start:
                    break
            opt.step()
    final = grad_norm()
    value = float(objective().detach())
    best = {name: (origin[name] + epsilon * d).detach() for name, d in delta.items()}
    return best, PBRFInfo(grad_ratio=final / max(start, 1e-300), evaluations=count, objective=value)


class _PBRFProblem:
    """A float64 copy of the model with everything but the tracked layers frozen, the training
    set as one padded batch with its original log-probabilities, and the queries' batch."""

    def __init__(self, model: nn.Module, train: TextDataset, queries, modules, tokenizer=None):
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = select_modules(self.model, modules)
        self.params: Params = tracked_params(self.layers)
        tok = train.tokenizer if tokenizer is None else tokenizer
        pad = padding_id(tok)
        self.train = train
        self.batch = collate(
            [ex.input_ids for ex in train], [1] * len(train), list(range(len(train))), pad
        )
        self.queries = as_queries(queries)
        self.query_batch = next(query_batches(self.queries, tok, max(1, len(self.queries))))
        self.pad = pad
        with torch.no_grad():
            self.ref_logp = self.log_probs(self.params, self.batch)
            self.f0 = self.measure(self.params)

    def log_probs(self, params: Params, batch) -> torch.Tensor:
        return torch.log_softmax(functional_logits(self.model, params, batch), -1)

    def divergence(self, params: Params) -> torch.Tensor:
        """``(1/N) Σ_i Σ_t KL(p_θs ‖ p_θ)`` over every training sequence's predicted positions."""
        logp = self.log_probs(params, self.batch)
        return kl_divergence(self.ref_logp, logp, self.batch.label_mask) / len(self.train)

    def loss_for(self, index: int) -> Callable[[Params], torch.Tensor]:
        """``L(z_m, θ)``: the summed next-token NLL of training sequence ``index``."""
        batch = collate([self.train[index].input_ids], [1], [index], self.pad)

        def loss(params: Params) -> torch.Tensor:
            return -label_log_probs(self.log_probs(params, batch), batch).sum()

        return loss

    def measure(self, params: Params) -> torch.Tensor:
        """``log p(completion | prompt)`` per query, shape ``(n_queries,)``."""
        return label_log_probs(self.log_probs(params, self.query_batch), self.query_batch)

    def response(self, index: int, epsilon: float, damping, symmetric: bool, **solver):
        """``(f(θ*(ε)) − f(θ_s)) / ε`` per query (or the symmetric difference), and infos."""
        loss = self.loss_for(index)
        lam = param_damping(self.params, layer_damping(self.layers, damping))
        signs = (1.0, -1.0) if symmetric else (1.0,)
        shifts, infos = [], []
        for sign in signs:
            best, info = minimise_pbrf(
                self.params, self.divergence, loss, epsilon=sign * epsilon, damping=lam, **solver
            )
            with torch.no_grad():
                shifts.append(self.measure(best) - self.f0)
            infos.append(info)
        if symmetric:
            return ((shifts[0] - shifts[1]) / (2 * epsilon)).numpy(), infos
        return (shifts[0] / epsilon).numpy(), infos


def pbrf_response(model: nn.Module, train: TextDataset, query, index: int, **options) -> float:
    """PBRF response of one query to up-weighting training sequence ``index``: the one entry
    of :func:`pbrf_scores` for ``[query]`` and ``[index]`` (same keyword options).

    Directly comparable with the kit's score for ``(query, train[index])`` computed with the
    same ``damping`` and ``modules`` (see the module docstring for the exact relation).
    ``query``: anything :func:`~influencekit.as_queries` accepts for one query.

    Example:
        >>> pbrf_response(model, train, ("The choir sings", " a song."), 0, damping=1e-3)
        ... # doctest: +SKIP
        0.0123
    """
    return float(pbrf_scores(model, train, [query], [index], **options)[0, 0])


def pbrf_scores(
    model: nn.Module,
    train: TextDataset,
    queries,
    indices: Sequence[int],
    *,
    epsilon: float = 1e-3,
    damping: float | Mapping[str, float],
    modules: str | list[str] = "mlp",
    symmetric: bool = True,
    method: str = "lbfgs",
    steps: int = 500,
    lr: float = 1.0,
    tol: float = 1e-7,
    tokenizer=None,
    return_info: bool = False,
):
    """PBRF responses ``(n_queries, len(indices))``: one minimisation per training index (and
    sign), every query measured at its optimum. ``epsilon``: the up-weighting; ``damping``:
    the proximity weight (the kit's λ, one float or per layer); ``symmetric``: the
    ``±epsilon`` difference; ``method`` ``"lbfgs"`` or ``"adam"`` with ``steps``, ``lr`` and
    gradient tolerance ``tol``.

    With ``return_info`` returns ``(scores, infos)``, ``infos[j]`` the :class:`PBRFInfo` of
    each minimisation for ``indices[j]``.

    Example:
        >>> truth = pbrf_scores(model, train, queries, [0, 5, 9], damping=1e-3)  # doctest: +SKIP
        >>> truth.shape                                                          # doctest: +SKIP
        (4, 3)
    """
    problem = _PBRFProblem(model, train, queries, modules, tokenizer)
    columns, infos = [], []
    for index in indices:
        values, info = problem.response(
            int(index), epsilon, damping, symmetric, method=method, steps=steps, lr=lr, tol=tol
        )
        columns.append(values)
        infos.append(info)
    scores = np.stack(columns, axis=1) if columns else np.zeros((len(problem.queries), 0))
    return (scores, infos) if return_info else scores
