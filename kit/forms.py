"""The form a preconditioned query takes to meet training gradients, decided in one place.

``P_q = (Ĝ + λI)⁻¹ G_q`` (docs/math.md) can be handed over as a dense matrix in the
weights' basis, as its rank-r truncated SVD (:class:`~influencekit.lowrank.LowRank`), or
left in the layer's curvature eigenbasis (all of it, or a window of its directions) for
stores that keep gradients there. What a gradient source needs is a :class:`QueryNeeds`
(asked of a store's codec, of the on-the-fly source, of the fidelity probe);
:func:`query_form` turns query tokens into that form. Nothing else decides it.

Example:
    >>> needs = QueryNeeds(basis="weights")
    >>> form = query_form(layer, s, a, damping, needs, query_rank="full")   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lowrank import LowRank, QueryForm, as_dense, truncate

# query_rank="auto" keeps this share of each query's squared norm. On the wide trained model
# (benchmarks/wide_model.py) 0.99 keeps Pearson against exact within 0.005 of full-rank
# queries with a lowrank:8 store (ranks 50-77, 3x faster); 0.999 needs ranks 163-270, too
# high for a factored contraction to pay.
AUTO_ENERGY = 0.99
BASES = ("weights", "eigen")


@dataclass(frozen=True)
class QueryNeeds:
    """What a source of training gradients needs of one layer's preconditioned queries.

    ``basis``: ``"weights"`` (``P_q`` itself) or ``"eigen"`` (``(Q_Sᵀ G_q Q_A) ⊘ (Λ + λ)``,
    never rotated back), then only the eigen-directions ``window`` = ``(rows, cols)`` when
    given, laid out query-last when ``query_last`` (each position's values for every query
    side by side, what a gather reads). ``auto_rank``: ``query_rank="auto"`` truncates to
    the smallest rank keeping ``AUTO_ENERGY`` of the squared norm when that rank is at most
    this (0: never). ``factored_rank``: a truncated query stays as factors up to this rank
    (its contraction is then cheaper), and is made dense above it.

    Example:
        >>> QueryNeeds().basis, QueryNeeds(basis="eigen").auto_rank
        ('weights', 0)
    """

    basis: str = "weights"
    window: tuple[torch.Tensor, torch.Tensor] | None = None
    query_last: bool = False
    auto_rank: int = 0
    factored_rank: int = 0

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.window is not None and self.basis != "eigen":
            raise ValueError("a window of eigen-directions needs basis='eigen'")


def query_form(
    layer,
    s: torch.Tensor,
    a: torch.Tensor,
    damping: float,
    needs: QueryNeeds,
    query_rank: int | str = "full",
) -> QueryForm:
    """One layer's preconditioned queries, from their tokens ``s`` ``(Q, T, d_out)`` and
    ``a`` ``(Q, T, d_in)`` and ``layer``'s factors (a
    :class:`~influencekit.factors.LayerFactors`), in the form ``needs`` asks.

    ``query_rank``: ``"full"`` (exact), an int ``r`` (the rank-r truncated SVD, in the
    basis asked), or ``"auto"`` (truncated where ``needs.auto_rank`` allows, exact
    elsewhere). A truncated query above ``needs.factored_rank`` is handed over dense.
    Deciding ``"auto"`` takes an SVD of each query in the eigenbasis; the full matrix in
    the weights' basis is formed only when it is the answer.
    """
    rank = query_rank if isinstance(query_rank, int) else None
    if needs.basis == "eigen":
        query_last = needs.query_last and rank is None
        x = layer.in_eigenbasis(s, a, damping, query_last=query_last, window=needs.window)
        return x if rank is None else _factored_or_dense(truncate(x, rank=rank), needs)
    in_basis = layer.in_eigenbasis(s, a, damping)
    if rank is not None:
        return _factored_or_dense(layer.truncated_from_eigenbasis(in_basis, rank), needs)
    if query_rank == "auto" and needs.auto_rank >= 1:
        low = layer.truncated_from_eigenbasis(
            in_basis, energy=AUTO_ENERGY, max_rank=needs.auto_rank
        )
        if low is not None:
            return _factored_or_dense(low, needs)
    return layer.from_eigenbasis(in_basis)


def _factored_or_dense(low: LowRank, needs: QueryNeeds) -> QueryForm:
    """Keep the factors where they contract more cheaply; their dense product otherwise."""
    return low if low.rank <= needs.factored_rank else as_dense(low)
