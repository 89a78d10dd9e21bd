"""``lowrank:R``: factors with ``G_z ≈ Σ_r u_r v_rᵀ``, a near-best rank-``R`` approximation.

``u`` ``(R, d_out)`` (singular values folded in) and ``v`` ``(R, d_in)`` per example. For
batches of at most ``2·(R + OVERSAMPLE)`` tokens the best rank-``R`` approximation is
computed exactly from the token matrices (``G_z = Sᵀ A`` has rank at most ``T``: two thin QRs
and one ``T × T`` SVD, cheaper there than the range finder); longer ones go through a
randomized range finder with 2 power iterations (Halko et al. 2011). Neither forms ``G_z``.
Exact when ``R`` ≥ the number of tokens (the rank of ``G_z``).
``omega`` ``(d_in, R + OVERSAMPLE)``, the range finder's fixed random test matrix, is
recorded in the store so every build of it computes the same factors.

Example:
    >>> import torch
    >>> from influencekit.store.codecs import CodecSpec
    >>> codec = LowRankCodec.create(CodecSpec("lowrank", 4), (6, 5))
    >>> a, s = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    >>> stored = codec.encode(a, s)                  # 3 tokens <= R: exact
    >>> torch.allclose(stored["u"].mT @ stored["v"], s.mT @ a)
    True
"""

from __future__ import annotations

import numpy as np
import torch

from influencekit.forms import QueryNeeds
from influencekit.lowrank import (
    LowRank,
    QueryForm,
    factored_inner,
    max_factored_rank,
    zero_pad,
)

from .base import Codec, checksums
from .eight_bit import SCALE_BYTES, from_e4m3, to_e4m3
from .projection import projection_seed

Tensor = torch.Tensor
OVERSAMPLE = 8  # extra columns of the range finder
POWER_ITERATIONS = 2
GRAM_ELEMENTS = 2**24  # gram: at most this many (a, b, k, j) products at once
BAND_ELEMENTS = 2**20  # dense contraction: entries of the rebuilt G_z held at once (~4 MiB)


class LowRankCodec(Codec):
    """Rank-``R`` factors of ``G_z``: ``u (R, d_out)``, ``v (R, d_in)``."""

    kind = "lowrank"
    keeps_whole = True

    def __init__(self, spec, shape, params, tensors) -> None:
        super().__init__(spec, shape, params, tensors)
        self.rank = min(spec.size, *self.shape)
        self.params = {"rank": self.rank, "power_iterations": POWER_ITERATIONS}

    def arrays(self) -> dict[str, tuple[int, ...]]:
        d_out, d_in = self.shape
        return {"u": (self.rank, d_out), "v": (self.rank, d_in)}

    def encode_bytes(self, batch: int, length: int, item: int) -> int:
        k = self.rank + OVERSAMPLE
        work = 4 * batch * max(k, length) * sum(self.shape) * item  # bases, QRs, products
        return super().encode_bytes(batch, length, item) + work + self.shape[1] * k * 8

    def max_factored_rank(self, n_queries: int) -> int:
        """``Q·r·R·(d_out + d_in)`` against ``(R + Q)·d_out·d_in`` per example."""
        return max_factored_rank(n_queries, self.rank, self.shape)

    def query_needs(self, n_queries: int) -> QueryNeeds:
        """Dense queries, or rank-r factors where they contract more cheaply (``"auto"``
        truncates them to that rank at most)."""
        rank = self.max_factored_rank(n_queries)
        return QueryNeeds(auto_rank=rank, factored_rank=rank)

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        if s.shape[1] <= 2 * (self.rank + OVERSAMPLE):  # the batch's token axis
            left, right = _token_svd(a, s, self.rank)
        else:
            left, right = self._range_finder(a, s)
        return {"u": zero_pad(left, self.rank), "v": zero_pad(right, self.rank)}

    def _range_finder(self, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        # G = Sᵀ A with S (T, d_out), A (T, d_in), never formed: a randomized range finder
        # applies G and Gᵀ through the token matrices, O(T·(d_out + d_in)·k) per product with
        # k = R + oversampling. Exact whenever rank(G) ≤ k.
        omega = self.tensors["omega"].to(dtype=a.dtype, device=a.device)
        apply_g = lambda x: s.transpose(1, 2) @ (a @ x)  # noqa: E731  G x, (B, d_out, k)
        apply_gt = lambda y: a.transpose(1, 2) @ (s @ y)  # noqa: E731  Gᵀ y, (B, d_in, k)
        y = apply_g(omega.expand(a.shape[0], -1, -1))
        for _ in range(POWER_ITERATIONS):  # sharpen the spectrum: G (Gᵀ G)^q Ω
            y = apply_g(torch.linalg.qr(apply_gt(torch.linalg.qr(y)[0]))[0])
        basis = torch.linalg.qr(y)[0]  # (B, d_out, k), orthonormal columns spanning G's range
        small = apply_gt(basis).transpose(1, 2)  # basisᵀ G: (B, k, d_in)
        u, sigma, vh = torch.linalg.svd(small, full_matrices=False)
        r = min(self.rank, sigma.shape[-1])
        left = (basis @ u[..., :r]) * sigma[:, None, :r]  # (B, d_out, r)
        return left.transpose(1, 2), vh[:, :r, :]

    def compress_query(self, p: QueryForm) -> QueryForm:
        return p  # query_form already gave factors where they pay, dense elsewhere

    def contract(self, query: QueryForm, stored: dict[str, Tensor]) -> Tensor:
        u, v = stored["u"], stored["v"]  # (B, R, d_out), (B, R, d_in)
        if isinstance(query, LowRank):
            return factored_inner(query, u, v)
        return _banded_inner(query, u, v)

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨u_aᵀ v_a, u_bᵀ v_b⟩`` for every pair, ``(Ba, Bb)``, from the factors alone."""
        # ⟨Σ_k u_k v_kᵀ, Σ_j u'_j v'_jᵀ⟩ = Σ_kj (u_k · u'_j)(v_k · v'_j): R² dot products of
        # length d_out + d_in per pair, no d_out × d_in matrix. The (rows, Bb, R, R) products
        # are formed for a few rows of ``a`` at a time, so memory stays bounded for large B.
        ub, vb = b["u"], b["v"]
        per_row = ub.shape[0] * a["u"].shape[1] * ub.shape[1]
        step = max(1, GRAM_ELEMENTS // max(1, per_row))
        out = [ub.new_zeros(0, ub.shape[0])]
        for lo in range(0, a["u"].shape[0], step):
            left = torch.einsum("ako,bjo->abkj", a["u"][lo : lo + step], ub)
            right = torch.einsum("aki,bji->abkj", a["v"][lo : lo + step], vb)
            out.append((left * right).sum(dim=(2, 3)))
        return torch.cat(out)

    def decode(self, stored: dict[str, Tensor]) -> LowRank:
        """The stored rank-``R`` gradients ``u_zᵀ v_z``, as factors (rotating them costs
        ``R·(d_out² + d_in²)``, rotating the product ``d_out·d_in·(d_out + d_in)``)."""
        return LowRank(stored["u"].transpose(1, 2), stored["v"].transpose(1, 2))

    @classmethod
    def create(cls, spec, shape, *, seed=0, layer_index=0, factors=None, damping=None):
        k = min(spec.size, *shape) + OVERSAMPLE
        gen = torch.Generator().manual_seed(projection_seed(seed, layer_index, 2))
        omega = torch.randn(shape[1], k, generator=gen, dtype=torch.float64)
        return cls(spec, shape, {}, {"omega": omega})

    @classmethod
    def restore(cls, spec, shape, params, tensors):
        return cls(spec, shape, params, tensors)

    @classmethod
    def bytes_for(cls, size: int, shape: tuple[int, int], dtype: str) -> int:
        r = min(size, *shape)
        return r * (shape[0] + shape[1]) * np.dtype(dtype).itemsize + checksums({"u": 0, "v": 0})

    @classmethod
    def exact_size(cls, shape, n_tokens):
        return n_tokens


def _banded_inner(query: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``⟨P_q, u_zᵀ v_z⟩`` for dense queries ``(Q, d_out, d_in)``: ``(Q, B)``.

    A dense query needs ``d_out·d_in`` work per pair anyway, so each ``G_z`` is rebuilt
    (``R·d_out·d_in``, once for all queries), a band of rows at a time: the whole block's
    ``G_z`` would go out to memory and back (on 2 CPU cores, twice the time of bands that
    stay in cache).

    Example:
        >>> u, v = torch.randn(3, 2, 5), torch.randn(3, 2, 4)
        >>> p = torch.randn(2, 5, 4)
        >>> want = torch.einsum("qoi,boi->qb", p, u.mT @ v)
        >>> torch.allclose(_banded_inner(p, u, v), want, atol=1e-5)
        True
    """
    n_examples, _, d_out = u.shape
    rows = max(1, BAND_ELEMENTS // max(1, n_examples * v.shape[2]))
    out = query.new_zeros(query.shape[0], n_examples)
    for lo in range(0, d_out, rows):
        band = u[:, :, lo : lo + rows].transpose(1, 2) @ v  # (B, rows, d_in)
        out += query[:, lo : lo + rows].reshape(query.shape[0], -1) @ band.flatten(1).T
    return out


def _token_svd(a: Tensor, s: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The exact leading ``rank`` singular pairs of each ``G = Sᵀ A`` from its token
    matrices: thin QRs ``Sᵀ = Q_s R_s``, ``Aᵀ = Q_a R_a``, so ``G = Q_s (R_s R_aᵀ) Q_aᵀ``
    and only the ``T × T`` middle is decomposed. Returns ``(U Σ, V)`` as ``(B, r, d)``.

    Example:
        >>> a = torch.randn(1, 5, 4, dtype=torch.float64)
        >>> s = torch.randn(1, 5, 3, dtype=torch.float64)
        >>> u, v = _token_svd(a, s, 3)
        >>> torch.allclose(u.mT @ v, s.mT @ a)
        True
    """
    q_s, r_s = torch.linalg.qr(s.transpose(1, 2))  # (B, d_out, T), (B, T, T)
    q_a, r_a = torch.linalg.qr(a.transpose(1, 2))  # (B, d_in, T), (B, T, T)
    u, sigma, vh = torch.linalg.svd(r_s @ r_a.transpose(1, 2))
    r = min(rank, sigma.shape[-1])
    left = (q_s @ u[..., :r]) * sigma[:, None, :r]  # (B, d_out, r)
    right = q_a @ vh[:, :r, :].transpose(1, 2)  # (B, d_in, r)
    return left.transpose(1, 2), right.transpose(1, 2)


class LowRank8Codec(LowRankCodec):
    """``lowrank8:R``: as ``lowrank:R``, each factor row (one rank-1 term) as float8 e4m3
    bytes times one float32 scale (``su``, ``sv``): twice the rank of float16 factors in the
    same bytes."""

    kind = "lowrank8"

    def arrays(self) -> dict[str, tuple[int, ...]]:
        d_out, d_in = self.shape
        r = self.rank
        return {"u": (r, d_out), "su": (r, 1), "v": (r, d_in), "sv": (r, 1)}

    def own_dtypes(self) -> dict[str, np.dtype]:
        return {"u": np.dtype(np.uint8), "v": np.dtype(np.uint8), "su": np.dtype(np.float32),
                "sv": np.dtype(np.float32)}  # fmt: skip

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        factors = super().encode(a, s)
        u, su = to_e4m3(factors["u"])
        v, sv = to_e4m3(factors["v"])
        return {"u": u, "su": su, "v": v, "sv": sv}

    def _factors(self, stored: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "u": from_e4m3(stored["u"], stored["su"], dtype),
            "v": from_e4m3(stored["v"], stored["sv"], dtype),
        }

    def contract(self, query: QueryForm, stored: dict[str, Tensor]) -> Tensor:
        return super().contract(query, self._factors(stored, _float(query)))

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        dtype = a["su"].dtype
        return super().gram(self._factors(a, dtype), self._factors(b, dtype))

    def decode(self, stored: dict[str, Tensor]) -> LowRank:
        return super().decode(self._factors(stored, stored["su"].dtype))

    @classmethod
    def bytes_for(cls, size: int, shape: tuple[int, int], dtype: str) -> int:
        r = min(size, *shape)
        arrays = {"u": 0, "su": 0, "v": 0, "sv": 0}
        return r * (shape[0] + shape[1]) + 2 * r * SCALE_BYTES + checksums(arrays)

    @classmethod
    def exact_size(cls, shape, n_tokens):
        return None  # 8-bit factors are never exact


def _float(query: QueryForm) -> torch.dtype:
    return query.us.dtype if isinstance(query, LowRank) else query.dtype
