"""Exact damped Gauss–Newton influence: the ε → 0 limit of PBRF, solved by conjugate gradient.

Over the tracked layers' weights and biases (every other parameter frozen, as in
:mod:`~influencekit.validate.pbrf`), in float64 and with none of the kit's approximations (no
block-diagonal over layers, no Kronecker factors, no sampled labels):

    I_exact(q, z) = g_qᵀ (G + Λ)⁻¹ ∇L(z)

- ``g_q`` = gradient of ``−log p(completion | prompt)`` (summed over completion tokens);
- ``L(z)`` = summed next-token NLL of training sequence ``z``;
- ``G`` = exact Gauss–Newton matrix of ``(1/N) Σ_i L(z_i)`` over the whole training set: the
  Hessian at ``θ_s`` of ``(1/N) Σ_i Σ_t KL(p_θs ‖ p_θ)``, i.e.
  ``(1/N) Σ_i Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` with ``J_t = ∂logits_t/∂θ``;
- ``Λ`` = per-layer damping ``λ_ℓ`` (a layer's bias shares its λ).

This is what :func:`~influencekit.validate.pbrf_scores` approaches as ``epsilon → 0`` (its
module docstring derives it), at the cost of one linear solve per query instead of one
non-linear minimisation per training sequence. ``(G + Λ) v_q = g_q`` is solved by
(preconditioned) conjugate gradient with exact Gauss–Newton-vector products
``Gu = (1/N) Σ Jᵀ H_out (J u)``: ``J u`` by forward-mode AD (``torch.func.jvp``), ``Jᵀ w`` by
reverse mode, ``H_out w = p ⊙ w − p (pᵀ w)`` per predicted position, over training batches of
``batch_size`` sequences so memory stays bounded. Kit :class:`~influencekit.Factors` fitted on
the same model and layers can precondition it: each layer's ``(Ĝ_ℓ + λ_ℓ I)⁻¹`` applied to its
block. They change the iteration count, never the answer; being block-diagonal they miss the
coupling between layers, so they help most with one tracked layer (about half the iterations
on the tiny test model) and little with several at small damping. Then
``I[q, i] = v_q · ∇L(z_i)``.

The float64 copy of the model runs GPT-2-style attention in its ``"eager"`` implementation,
since PyTorch's fused CPU attention has no forward-mode derivative; the values are the same
up to rounding.

Example:
    >>> factors = ik.fit_factors(model, train, "mlp")                      # doctest: +SKIP
    >>> scores, info = exact_influence(model, train, queries, damping=factors.damping_for(),
    ...                                factors=factors, return_info=True)   # doctest: +SKIP
    >>> scores.shape, info[0].converged                                    # doctest: +SKIP
    ((4, 40), True)
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import jvp, vjp

from .. import checks
from ..data import (
    Batch,
    Query,
    TextDataset,
    as_queries,
    collate,
    length_order,
    padding_id,
    query_batches,
)
from ..errors import ModelError, NonFiniteError, ParameterError
from ..factors import Factors
from ..hooks import label_log_probs
from ..models import TrackedLayer, check_finite_weights, check_sequences_fit, select_modules
from .measure import functional_logits, layer_damping, param_damping, tracked_params

Params = dict[str, torch.Tensor]


@dataclass
class SolveInfo:
    """How the conjugate-gradient solve of one query went.

    ``iterations``: CG iterations (Gauss–Newton-vector products) used; ``residual``: the final
    relative residual ``‖g_q − (G + Λ) v_q‖ / ‖g_q‖``, recomputed from scratch at the end;
    ``converged``: whether CG's own residual reached ``tol`` within ``max_iter``.
    """

    iterations: int
    residual: float
    converged: bool = True


class _ExactProblem:
    """The float64 model copy (tracked layers' parameters only free), the training set in
    length-ordered batches, and the products and gradients the solve needs, on flat vectors."""

    def __init__(self, model: nn.Module, train: TextDataset, modules, tokenizer, batch_size: int):
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        _use_eager_attention(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers: list[TrackedLayer] = select_modules(self.model, modules)
        check_finite_weights(self.layers)
        self.params: Params = tracked_params(self.layers)
        self.names = list(self.params)
        self.shapes = [self.params[name].shape for name in self.names]
        self.sizes = [self.params[name].numel() for name in self.names]
        self.tokenizer = train.tokenizer if tokenizer is None else tokenizer
        self.pad = padding_id(self.tokenizer)
        self.train = train
        check_sequences_fit(self.model, (ex.input_ids for ex in train), "train")
        order = length_order(train)  # similar lengths together: little padding
        self.batches = [
            collate([train[i].input_ids for i in chunk], [1] * len(chunk), list(chunk), self.pad)
            for chunk in (order[lo : lo + batch_size] for lo in range(0, len(order), batch_size))
        ]

    # --- flat vectors <-> parameter dicts ------------------------------------------------------

    def unflatten(self, flat: torch.Tensor) -> Params:
        pieces = torch.split(flat, self.sizes)
        return {n: x.view(s) for n, x, s in zip(self.names, pieces, self.shapes, strict=True)}

    def flatten(self, params: Params) -> torch.Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])

    # --- the model as a function of the tracked parameters -------------------------------------

    def logits(self, params: Params, batch: Batch) -> torch.Tensor:
        return functional_logits(self.model, params, batch)

    def gnh(self, flat: torch.Tensor) -> torch.Tensor:
        """``G u``: the exact Gauss–Newton matrix of the mean summed-token loss, times ``u``."""
        tangent = self.unflatten(flat)
        out = torch.zeros_like(flat)
        for batch in self.batches:

            def run(params: Params, batch: Batch = batch) -> torch.Tensor:
                return self.logits(params, batch)

            logits, ju = jvp(run, (self.params,), (tangent,))
            p = torch.softmax(logits, -1)
            hju = (p * ju - p * (p * ju).sum(-1, keepdim=True)) * batch.label_mask[..., None]
            _, pullback = vjp(run, self.params)
            (grads,) = pullback(hju)
            out += self.flatten(grads)
        return out / len(self.train)

    def gradient(self, batch: Batch) -> torch.Tensor:
        """Gradient of ``−Σ label log-probs`` of a one-row batch: ``∇L(z)`` or ``g_q``."""
        params = {name: p.clone().requires_grad_() for name, p in self.params.items()}
        with torch.enable_grad():
            logp = torch.log_softmax(self.logits(params, batch), -1)
            loss = -label_log_probs(logp, batch).sum()
            grads = torch.autograd.grad(loss, [params[name] for name in self.names])
        return torch.cat([g.reshape(-1) for g in grads])

    def train_gradient(self, index: int) -> torch.Tensor:
        return self.gradient(collate([self.train[index].input_ids], [1], [index], self.pad))

    def query_gradient(self, query: Query) -> torch.Tensor:
        return self.gradient(next(query_batches([query], self.tokenizer, 1)))

    # --- damping and preconditioning -------------------------------------------------------------

    def damping_vector(self, lam: Mapping[str, float]) -> torch.Tensor:
        """``Λ`` as a flat vector: each layer's λ on its weight and its bias."""
        per_param = param_damping(self.params, lam)
        return torch.cat(
            [
                torch.full((size,), per_param[name], dtype=torch.float64)
                for name, size in zip(self.names, self.sizes, strict=True)
            ]
        )

    def preconditioner(self, factors: Factors, lam: Mapping[str, float]):
        """``r ↦ ⊕_ℓ (Ĝ_ℓ + λ_ℓ I)⁻¹ r_ℓ`` with the kit's factors, on flat vectors."""
        names = [layer.name for layer in self.layers]
        if set(factors.modules) != set(names):
            raise ModelError(
                f"the factors cover {factors.modules} but the tracked layers are {names}; "
                "pass the factors' modules as `modules`"
            )
        factors.check_finite()
        for layer in self.layers:
            if factors.layers[layer.name].shape != layer.grad_shape:
                raise ModelError(
                    f"layer {layer.name}: factors are for shape "
                    f"{factors.layers[layer.name].shape}, the layer has {layer.grad_shape}"
                )

        def apply(flat: torch.Tensor) -> torch.Tensor:
            params = self.unflatten(flat)
            out: Params = {}
            for layer in self.layers:
                grad = layer.to_matrix(params[f"{layer.name}.weight"],
                                       params.get(f"{layer.name}.bias"))  # fmt: skip
                pre = factors.layers[layer.name].precondition(grad, lam[layer.name])
                weight, bias = layer.from_matrix(pre)
                out[f"{layer.name}.weight"] = weight
                if bias is not None:
                    out[f"{layer.name}.bias"] = bias
            return self.flatten(out)

        return apply


def _use_eager_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to the plain-matmul attention (forward-mode differentiable)."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            return
        except (ValueError, NotImplementedError):  # pragma: no cover - model without eager
            return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):  # pragma: no cover
        config._attn_implementation = "eager"


def conjugate_gradient(
    matvec,
    rhs: torch.Tensor,
    *,
    precondition=None,
    tol: float = 1e-6,
    max_iter: int = 200,
    name: str = "system",
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``A x = rhs`` for symmetric positive definite ``A`` (given as ``matvec``) by
    (preconditioned) conjugate gradient from ``x = 0``.

    Stops once the recursively updated residual satisfies ``‖r‖ ≤ tol·‖rhs‖`` or after
    ``max_iter`` iterations; the returned :class:`SolveInfo` holds the residual recomputed
    as ``‖rhs − A x‖ / ‖rhs‖`` (one more product). ``precondition``: ``r ↦ M⁻¹ r`` for a
    symmetric positive definite ``M`` (default identity). Raises :class:`NonFiniteError`
    naming ``name`` if NaN or inf appears.

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0]).double())
        >>> torch.allclose(a @ x, torch.tensor([1.0, 2.0]).double()), info.iterations
        (True, 2)
    """
    if not torch.isfinite(rhs).all():
        raise NonFiniteError(f"{name}: the right-hand side holds NaN or inf")
    norm = float(torch.linalg.vector_norm(rhs))
    x = torch.zeros_like(rhs)
    if norm == 0.0:
        return x, SolveInfo(iterations=0, residual=0.0, converged=True)
    r = rhs.clone()
    z = precondition(r) if precondition is not None else r
    p = z.clone()
    rz = float(r @ z)
    iterations = 0
    while iterations < max_iter and float(torch.linalg.vector_norm(r)) > tol * norm:
        ap = matvec(p)
        curvature = float(p @ ap)
        if not math.isfinite(curvature) or not math.isfinite(rz):
            raise NonFiniteError(
                f"{name}: NaN or inf in the curvature product at CG iteration {iterations + 1}; "
                "check the model weights and the training data"
            )
        if curvature <= 0:
            raise ParameterError(
                "matvec",
                f"pᵀAp = {curvature:.3g} at CG iteration {iterations + 1}",
                f"a positive definite operator ({name}: the system is not positive definite)",
            )
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * ap
        z = precondition(r) if precondition is not None else r
        rz_next = float(r @ z)
        p = z + (rz_next / rz) * p
        rz = rz_next
        iterations += 1
    converged = float(torch.linalg.vector_norm(r)) <= tol * norm
    residual = float(torch.linalg.vector_norm(rhs - matvec(x))) / norm
    if not (math.isfinite(residual) and torch.isfinite(x).all()):
        raise NonFiniteError(f"{name}: the solution holds NaN or inf")
    return x, SolveInfo(iterations=iterations, residual=residual, converged=converged)


def exact_influence(
    model: nn.Module,
    train: TextDataset,
    queries,
    *,
    damping: float | Mapping[str, float],
    modules: str | list[str] = "mlp",
    factors: Factors | None = None,
    tol: float = 1e-6,
    max_iter: int = 200,
    indices: Sequence[int] | None = None,
    batch_size: int = 32,
    tokenizer=None,
    return_info: bool = False,
):
    """Exact damped Gauss–Newton influence ``g_qᵀ (G + Λ)⁻¹ ∇L(z_i)``: ``(n_queries, n)``.

    ``G`` is the exact Gauss–Newton matrix over the tracked layers of ``modules`` jointly,
    always over the whole of ``train``; the columns are the training sequences ``indices``
    (default: all, ``n = len(train)``). ``damping``: one λ, or the kit's per-layer
    ``{layer_name: λ}`` map (e.g. ``factors.damping_for(None)``), naming exactly the tracked
    layers. ``factors``: kit factors for the same layers, used only as the CG preconditioner
    (they change the iteration count, not the answer). Each query's solve stops at relative
    residual ``tol`` or after ``max_iter`` iterations; an unconverged solve is still returned
    and warned about (``RuntimeWarning`` naming the query). ``batch_size``: training
    sequences per forward in the Gauss–Newton products. ``tokenizer`` defaults to
    ``train.tokenizer``.

    Returns the scores, or ``(scores, infos)`` with ``return_info``, ``infos[q]`` the
    :class:`SolveInfo` of query ``q``. Raises :class:`~influencekit.errors.NonFiniteError`
    naming the query when NaN or inf appears.

    Example:
        >>> truth = exact_influence(model, train, queries, damping=1e-3)    # doctest: +SKIP
        >>> truth.shape                                                      # doctest: +SKIP
        (4, 40)
        >>> compare(result.scores, truth)["overall"]                         # doctest: +SKIP
    """
    checks.count("batch_size", batch_size)
    checks.positive_number("tol", tol)
    checks.count("max_iter", max_iter)
    queries = as_queries(queries)
    columns = list(range(len(train))) if indices is None else [train[i].index for i in indices]
    problem = _ExactProblem(model, train, modules, tokenizer, batch_size)
    check_sequences_fit(problem.model, (q.encode(problem.tokenizer)[0] for q in queries), "queries")
    lam = layer_damping(problem.layers, damping)
    diagonal = problem.damping_vector(lam)
    precondition = problem.preconditioner(factors, lam) if factors is not None else None

    def matvec(u: torch.Tensor) -> torch.Tensor:
        return problem.gnh(u) + diagonal * u

    solutions, infos = [], []
    for query in queries:
        name = f"query {query.id!r}"
        g_q = problem.query_gradient(query)
        if not torch.isfinite(g_q).all():
            raise NonFiniteError(
                f"{name}: the query gradient holds NaN or inf; check the model weights"
            )
        v_q, info = conjugate_gradient(
            matvec, g_q, precondition=precondition, tol=tol, max_iter=max_iter, name=name
        )
        if not info.converged:
            warnings.warn(
                f"{name}: conjugate gradient stopped after {info.iterations} iterations at "
                f"relative residual {info.residual:.3g} > tol {tol:g}; raise max_iter or the "
                "damping, or pass factors as a preconditioner",
                RuntimeWarning,
                stacklevel=2,
            )
        solutions.append(v_q)
        infos.append(info)
    solved = torch.stack(solutions)  # (n_queries, n_params)
    scores = np.empty((len(queries), len(columns)))
    for j, index in enumerate(columns):
        scores[:, j] = (solved @ problem.train_gradient(index)).numpy()
    bad = ~np.isfinite(scores)
    if bad.any():
        q, j = (int(k[0]) for k in np.nonzero(bad))
        raise NonFiniteError(
            f"query {queries[q].id!r}: the score against training sequence "
            f"{train[columns[j]].id!r} is NaN or inf; check the model and the training data"
        )
    return (scores, infos) if return_info else scores
