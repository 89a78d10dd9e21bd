"""Truncated SVDs of stacks of matrices, as ``(U Σ, V)`` factors.

Used for the paper's query batching (``query_rank``): a preconditioned query gradient is
replaced by its best rank-r approximation.

Example:
    >>> us, v = truncate_rank(torch.eye(2)[None] * 2, 1)
    >>> us.shape, v.shape
    (torch.Size([1, 2, 1]), torch.Size([1, 2, 1]))
"""

from __future__ import annotations

import torch

LowRank = tuple[torch.Tensor, torch.Tensor]  # (U Σ: (Q, d_out, r), V: (Q, d_in, r))


def truncate_rank(p: torch.Tensor, rank: int) -> LowRank:
    """Rank-``rank`` truncated SVD of each matrix in ``p`` (Q, d_out, d_in) as ``(U Σ, V)``.

    Computed from the float64 Gram matrix of the narrower side (``pᵀp`` or ``ppᵀ``) and its
    eigendecomposition: the same leading singular pairs as a full SVD, several times faster
    for the tall matrices of MLP layers (e.g. 1536 × 385), and only the leading ones are kept.

    Example:
        >>> us, v = truncate_rank(torch.diag(torch.tensor([3.0, 1.0, 2.0]))[None], 2)
        >>> (us @ v.transpose(1, 2)).diagonal(dim1=1, dim2=2).tolist()
        [[3.0, 0.0, 2.0]]
    """
    wide = p.shape[-2] < p.shape[-1]
    x = p.transpose(-1, -2) if wide else p  # tall: (Q, m, n), m >= n
    # In p's own dtype: float32 gives the leading singular vectors to ~1e-6, which is far
    # below the error of dropping the others; float64 input keeps float64 throughout.
    values, vectors = torch.linalg.eigh(x.transpose(-1, -2) @ x)
    r = min(rank, values.shape[-1])
    v = vectors[..., -r:].flip(-1)  # leading right singular vectors of x
    us = x @ v  # U Σ
    if not wide:
        return us, v
    sigma = us.norm(dim=-2, keepdim=True)
    return v * sigma, us / torch.where(sigma > 0, sigma, torch.ones_like(sigma))
