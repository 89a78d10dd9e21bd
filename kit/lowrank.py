"""Rank-r matrices kept as factors, and the truncated SVD that makes them.

Used for the paper's query batching (``query_rank``): a preconditioned query gradient
``P_q`` is replaced by its best rank-r approximation ``U Σ Vᵀ``, kept as :class:`LowRank`
``(U Σ, V)``. Contracting it with a training gradient ``G_z = Σ_k u_k v_kᵀ`` that is itself
kept as factors (token by token on the fly, or a ``lowrank`` store) never forms either
matrix: :func:`max_factored_rank` decides when that pays and :func:`factored_inner` does it.

Example:
    >>> p = truncate(torch.eye(2)[None] * 2, rank=1)
    >>> p.us.shape, p.v.shape, p.rank
    (torch.Size([1, 2, 1]), torch.Size([1, 2, 1]), 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ParameterError


@dataclass(frozen=True)
class LowRank:
    """A stack of rank-r matrices ``us @ vᵀ``: ``us`` ``(Q, d_out, r)`` (singular values
    folded in), ``v`` ``(Q, d_in, r)``.

    Example:
        >>> p = LowRank(torch.ones(1, 3, 1), torch.ones(1, 2, 1))
        >>> p.dense().shape, p.n_queries
        (torch.Size([1, 3, 2]), 1)
    """

    us: torch.Tensor
    v: torch.Tensor

    @property
    def n_queries(self) -> int:
        return self.us.shape[0]

    @property
    def rank(self) -> int:
        return self.us.shape[-1]

    def dense(self) -> torch.Tensor:
        """The full ``(Q, d_out, d_in)`` matrices."""
        return self.us @ self.v.transpose(-1, -2)

    def map(self, left: torch.Tensor, right: torch.Tensor) -> LowRank:
        """``left @ (us vᵀ) @ rightᵀ`` as factors: ``(left @ us, right @ v)``."""
        return LowRank(times_stack(left, self.us), times_stack(right, self.v))


def times_stack(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` for a matrix ``m`` and a stack ``x`` ``(..., d, r)``, as one product of the
    stacked columns with ``mᵀ``: ``m @ x`` itself broadcasts ``m``, copying it once per
    matrix of the stack, which costs more than the product when ``r`` is small.

    Example:
        >>> m, x = torch.randn(3, 3), torch.randn(2, 3, 4)
        >>> torch.allclose(times_stack(m, x), m @ x, atol=1e-6)
        True
    """
    return (x.transpose(-1, -2) @ m.transpose(-1, -2)).transpose(-1, -2)


QueryForm = torch.Tensor | LowRank  # a preconditioned query gradient, dense or factored


def as_dense(p: QueryForm) -> torch.Tensor:
    """``p`` as full matrices (a dense ``p`` is returned as it is)."""
    return p.dense() if isinstance(p, LowRank) else p


def max_factored_rank(n_queries: int, stored_rank: int, shape) -> int:
    """The highest query rank whose contraction in factors costs no more than through the
    dense gradient, with the gradient kept as ``stored_rank`` factor pairs (0: none).

    In factors: ``Q·r·R·(d_out + d_in)`` multiply-adds per example; dense: ``R·d_out·d_in``
    to form ``G_z`` plus ``Q·d_out·d_in`` to contract. Many queries or a high rank make the
    dense route cheaper; both give the same scores up to rounding.

    Example:
        >>> max_factored_rank(1, 8, (1024, 1024)), max_factored_rank(64, 8, (64, 64))
        (576, 4)
    """
    d_out, d_in = shape
    return d_out * d_in * (stored_rank + n_queries) // (n_queries * stored_rank * (d_out + d_in))


def factored_inner(query: LowRank, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``⟨us_q vᵀ_q, Σ_k u_k v_kᵀ⟩`` for every query and example: ``(Q, B)``.

    ``u`` ``(B, R, d_out)`` and ``v`` ``(B, R, d_in)`` are the example's factor pairs (token
    gradients and inputs, or stored low-rank factors); the inner product is
    ``Σ_{k,r} (u_k · us_r)(v_k · v_r)``, never forming a ``d_out × d_in`` matrix.
    """
    left = torch.einsum("bko,qor->qbkr", u, query.us)
    right = torch.einsum("bki,qir->qbkr", v, query.v)
    return (left * right).sum(dim=(2, 3))


def zero_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` ``(B, n, d)`` with zero rows added up to ``length`` along its second axis (zero
    rows add nothing to a sum of outer products: padded tokens, or missing rank).

    Example:
        >>> zero_pad(torch.ones(1, 2, 3), 4)[0, :, 0].tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    missing = length - x.shape[1]
    return x if missing <= 0 else torch.cat([x, x.new_zeros(x.shape[0], missing, x.shape[2])], 1)


def truncate(
    p: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
) -> LowRank | None:
    """The truncated SVD of each matrix in ``p`` (Q, d_out, d_in) as :class:`LowRank`: to
    ``rank``, or to the smallest rank that keeps the share ``energy`` of every matrix's
    squared Frobenius norm (one rank for the whole stack: the largest any matrix needs).
    With ``energy``, ``None`` when that rank exceeds ``max_rank``.

    Computed from the Gram matrix of the narrower side (``pᵀp`` or ``ppᵀ``) and its
    eigendecomposition: the same leading singular pairs as a full SVD, several times faster
    for the tall matrices of MLP layers (e.g. 1536 × 385), and only the leading ones are kept.

    Example:
        >>> p = truncate(torch.diag(torch.tensor([3.0, 1.0, 2.0]))[None], rank=2)
        >>> p.dense().diagonal(dim1=1, dim2=2).tolist()
        [[3.0, 0.0, 2.0]]
        >>> truncate(torch.diag(torch.tensor([3.0, 1.0, 2.0]))[None], energy=0.9).rank
        2
    """
    if (rank is None) == (energy is None):
        raise ParameterError("rank", rank, "given, or energy= given, but not both")
    wide = p.shape[-2] < p.shape[-1]
    x = p.transpose(-1, -2) if wide else p  # tall: (Q, m, n), m >= n
    # In p's own dtype: float32 gives the leading singular vectors to ~1e-6, which is far
    # below the error of dropping the others; float64 input keeps float64 throughout.
    gram = x.transpose(-1, -2) @ x
    # One eigh, vectors included, even where max_rank may refuse: the values alone take
    # most of its time, and most queries are kept, so deciding first would pay twice.
    values, vectors = torch.linalg.eigh(gram)  # σ², ascending
    r = min(rank, gram.shape[-1]) if rank is not None else energy_rank(values, energy)
    if energy is not None and max_rank is not None and r > max_rank:
        return None
    v = vectors[..., -r:].flip(-1)  # leading right singular vectors of x
    us = x @ v  # U Σ
    if not wide:
        return LowRank(us, v)
    sigma = us.norm(dim=-2, keepdim=True)
    return LowRank(v * sigma, us / torch.where(sigma > 0, sigma, torch.ones_like(sigma)))


def energy_rank(squares: torch.Tensor, energy: float) -> int:
    """The smallest rank whose leading ``squares`` (squared singular values, ascending, per
    matrix) sum to at least ``energy`` of each matrix's total; at least 1.

    Example:
        >>> energy_rank(torch.tensor([[1.0, 4.0, 95.0]]), 0.95), energy_rank(torch.zeros(1, 3), 0.9)
        (1, 1)
    """
    leading = squares.flip(-1).clamp(min=0).double()
    total = leading.sum(-1, keepdim=True)
    kept = leading.cumsum(-1) / torch.where(total > 0, total, torch.ones_like(total))
    needed = (kept < energy - 1e-12).sum(-1) + 1  # leading values needed to reach energy
    needed = torch.where(total[..., 0] > 0, needed, 1)  # a zero matrix: rank 1 holds it all
    return int(min(int(needed.max()), squares.shape[-1]))
