"""Rank-r queries (``influencekit.lowrank``) against dense float64 references.

``truncate`` against ``torch.linalg.svd`` (tall and wide matrices, rank above the matrix
rank; the rank kept by ``energy=`` against the singular values), ``factored_inner`` against
the inner product of the dense matrices, and
``max_factored_rank`` against its cost formula counted by hand.
"""

from __future__ import annotations

import pytest
import torch

import influencekit as ik
from influencekit.lowrank import (
    LowRank,
    as_dense,
    factored_inner,
    max_factored_rank,
    truncate,
    zero_pad,
)

F64 = torch.float64


@pytest.mark.parametrize("shape", [(2, 9, 4), (3, 4, 9), (1, 6, 6)])
@pytest.mark.parametrize("rank", [1, 3, 12])
def test_truncate_to_a_rank_is_the_truncated_svd(shape, rank):
    p = torch.randn(*shape, generator=torch.Generator().manual_seed(rank), dtype=F64)
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    r = min(rank, s.shape[-1])
    want = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
    low = truncate(p, rank=rank)
    assert low.rank == r and low.n_queries == shape[0]
    torch.testing.assert_close(low.dense(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.999, 1.0])
def test_truncate_to_an_energy_keeps_the_smallest_rank_that_holds_it(energy):
    gen = torch.Generator().manual_seed(7)
    p = torch.randn(3, 12, 5, generator=gen, dtype=F64) @ torch.diag(
        torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=F64)
    )
    squares = torch.linalg.svdvals(p) ** 2  # (3, 5), descending
    shares = squares.cumsum(-1) / squares.sum(-1, keepdim=True)
    # per matrix, the first rank whose leading share reaches energy; the stack keeps the most
    needed = [next(r + 1 for r in range(5) if row[r] >= energy - 1e-12) for row in shares]
    low = truncate(p, energy=energy)
    assert low.rank == max(needed)
    kept = (low.dense().square().sum((-1, -2)) / p.square().sum((-1, -2))).min()
    assert kept >= energy - 1e-9
    torch.testing.assert_close(low.dense(), truncate(p, rank=low.rank).dense())
    with pytest.raises(ik.ParameterError):
        truncate(p, rank=2, energy=energy)


def test_factored_inner_equals_the_dense_inner_product():
    gen = torch.Generator().manual_seed(0)
    query = LowRank(torch.randn(3, 7, 2, generator=gen, dtype=F64),
                    torch.randn(3, 5, 2, generator=gen, dtype=F64))  # fmt: skip
    u = torch.randn(4, 6, 7, generator=gen, dtype=F64)  # 4 examples, 6 factor pairs each
    v = torch.randn(4, 6, 5, generator=gen, dtype=F64)
    g = u.transpose(1, 2) @ v  # each example's Σ_k u_k v_kᵀ
    want = torch.einsum("qoi,boi->qb", query.dense(), g)
    torch.testing.assert_close(factored_inner(query, u, v), want, rtol=1e-12, atol=1e-12)
    # zero factor pairs (padded tokens, missing rank) change nothing
    padded = factored_inner(query, zero_pad(u, 9), zero_pad(v, 9))
    torch.testing.assert_close(padded, want, rtol=1e-12, atol=1e-12)


def test_map_and_as_dense():
    gen = torch.Generator().manual_seed(1)
    low = LowRank(torch.randn(2, 4, 3, generator=gen), torch.randn(2, 5, 3, generator=gen))
    left, right = torch.randn(6, 4, generator=gen), torch.randn(2, 5, generator=gen)
    torch.testing.assert_close(low.map(left, right).dense(), left @ low.dense() @ right.T)
    dense = torch.randn(2, 4, 5)
    assert as_dense(dense) is dense
    torch.testing.assert_close(as_dense(low), low.dense())


@pytest.mark.parametrize(
    ("n_queries", "stored", "shape", "highest"),
    [
        (1, 8, (1024, 1024), 576),  # rank 576: 9,437,184 against 9,437,184
        (64, 8, (64, 64), 4),
        (8, 32, (512, 129), 16),  # rank 16: 2,625,536 against 2,641,920
        (3, 4, (16, 65), 7),
        (1, 1, (2, 2), 2),
    ],
)
def test_max_factored_rank_counts_multiply_adds(n_queries, stored, shape, highest):
    d_out, d_in = shape

    def factored_pays(rank: int) -> bool:  # Σ_kr (u_k·us_r)(v_k·v_r) against forming G_z
        factored = n_queries * rank * stored * (d_out + d_in)
        return factored <= stored * d_out * d_in + n_queries * d_out * d_in

    assert factored_pays(highest) and not factored_pays(highest + 1)  # the hand count
    assert max_factored_rank(n_queries, stored, shape) == highest
