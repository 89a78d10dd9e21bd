"""Projection codecs: ``P_out G_z P_inᵀ`` ``(k_out, k_in)`` for fixed projections, with
``k = min(K, d)`` on each side, computed from projected tokens, never forming ``G_z``.

- ``kron:K``: ``P`` the first ``k`` rows of a Haar-random orthogonal matrix scaled by
  ``sqrt(d / k)`` (so ``E[PᵀP] = I`` and the compressed inner product is unbiased), drawn
  from the store's seed. Exact when ``K ≥ d_out`` and ``K ≥ d_in`` (orthogonal then).
- ``eig:K``: ``P`` the top-``K`` eigenvectors of the layer's ``S`` and ``A`` covariances
  (rows orthonormal, no scaling): the score restricted to the leading curvature directions.
  Needs fitted factors at build time.

The projections are recorded in the store and read back, never redrawn.

Example:
    >>> import torch
    >>> from influencekit.store.codecs import CodecSpec
    >>> codec = KronCodec.create(CodecSpec("kron", 8), (3, 5))
    >>> codec.arrays()   # k = min(K, d): orthogonal here, so the scores below are exact
    {'c': (3, 5)}
    >>> a, s = torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    >>> g = torch.einsum("bto,bti->boi", s, a)
    >>> p = torch.randn(1, 3, 5)
    >>> exact = torch.einsum("qoi,boi->qb", p, g)
    >>> got = codec.contract(codec.compress_query(p), codec.encode(a, s))
    >>> torch.allclose(got, exact, atol=1e-4)
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch

from influencekit.errors import ParameterError
from influencekit.lowrank import LowRank, QueryForm

from .base import Codec, checksums

Tensor = torch.Tensor


class ProjectionCodec(Codec):
    """``P_out G_z P_inᵀ`` for projections ``p_out (k_out, d_out)``, ``p_in (k_in, d_in)``."""

    def __init__(self, spec, shape, params, tensors) -> None:
        super().__init__(spec, shape, params, tensors)
        p_out, p_in = tensors["p_out"], tensors["p_in"]
        self.params = {"k_out": int(p_out.shape[0]), "k_in": int(p_in.shape[0])}

    def arrays(self) -> dict[str, tuple[int, ...]]:
        return {"c": (self.params["k_out"], self.params["k_in"])}

    def encode_bytes(self, batch: int, length: int, item: int) -> int:
        k_out, k_in = self.params["k_out"], self.params["k_in"]
        projections = (k_out * self.shape[0] + k_in * self.shape[1]) * (8 + item)
        return super().encode_bytes(batch, length, item) + projections

    def _projections(self, like: Tensor) -> tuple[Tensor, Tensor]:
        opts = {"dtype": like.dtype, "device": like.device}
        return self.tensors["p_out"].to(**opts), self.tensors["p_in"].to(**opts)

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        p_out, p_in = self._projections(a)
        # Project every token first: (B, T, k) each, then one small (k_out × k_in) product.
        return {"c": (s @ p_out.T).transpose(1, 2) @ (a @ p_in.T)}

    def compress_query(self, p: QueryForm) -> Tensor:
        if isinstance(p, LowRank):
            return p.map(*self._projections(p.us)).dense()
        p_out, p_in = self._projections(p)
        return p_out @ p @ p_in.T

    def contract(self, query: Tensor, stored: dict[str, Tensor]) -> Tensor:
        return query.flatten(1) @ stored["c"].flatten(1).T

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨c_a, c_b⟩`` for every pair, ``(Ba, Bb)``: the inner product in the projected space.

        For ``kron`` an unbiased estimate of ``⟨G_a, G_b⟩`` (``E[PᵀP] = I`` on each side, the
        two sides drawn independently); for ``eig`` the part within the leading directions.
        """
        return a["c"].flatten(1) @ b["c"].flatten(1).T

    @classmethod
    def restore(cls, spec, shape, params, tensors):
        return cls(spec, shape, params, tensors)

    @classmethod
    def bytes_for(cls, size: int, shape: tuple[int, int], dtype: str) -> int:
        k_out, k_in = min(size, shape[0]), min(size, shape[1])
        return k_out * k_in * np.dtype(dtype).itemsize + checksums({"c": 0})

    @classmethod
    def exact_size(cls, shape, n_tokens):
        return max(shape)


class KronCodec(ProjectionCodec):
    """``kron:K``: scaled random orthogonal projections on both sides (unbiased)."""

    kind = "kron"
    unbiased = True

    @classmethod
    def create(cls, spec, shape, *, seed=0, layer_index=0, factors=None, damping=None):
        d_out, d_in = shape
        k_out, k_in = min(spec.size, d_out), min(spec.size, d_in)
        p_out = orthogonal_rows(k_out, d_out, projection_seed(seed, layer_index, 0))
        p_in = orthogonal_rows(k_in, d_in, projection_seed(seed, layer_index, 1))
        return cls(spec, shape, {}, {"p_out": p_out, "p_in": p_in})


class EigCodec(ProjectionCodec):
    """``eig:K``: the layer's top-``K`` eigenvectors of ``S`` and ``A`` (needs factors)."""

    kind = "eig"
    needs_factors = True

    @classmethod
    def create(cls, spec, shape, *, seed=0, layer_index=0, factors=None, damping=None):
        if factors is None or not factors.has("q_a"):
            raise ParameterError("factors", None, f"fitted ekfac or kfac factors for codec {spec}")
        d_out, d_in = shape
        k_out, k_in = min(spec.size, d_out), min(spec.size, d_in)
        by_s = torch.argsort(factors.d_s, descending=True)[:k_out]
        by_a = torch.argsort(factors.d_a, descending=True)[:k_in]
        p_out = factors.q_s[:, by_s].T.to(torch.float64).contiguous()
        p_in = factors.q_a[:, by_a].T.to(torch.float64).contiguous()
        return cls(spec, shape, {}, {"p_out": p_out, "p_in": p_in})


def projection_seed(seed: int, layer_index: int, side: int) -> int:
    """The generator seed of one projection: a fixed mix of store seed, layer and side."""
    return (seed * 0x9E3779B97F4A7C15 + layer_index * 0xBF58476D1CE4E5B9 + side * 0x94D049BB) % (
        2**63 - 1
    )


def orthogonal_rows(k: int, d: int, seed: int) -> Tensor:
    """``k ≤ d`` rows of a Haar-random ``d × d`` orthogonal matrix, scaled by ``sqrt(d / k)``.

    Example:
        >>> p = orthogonal_rows(3, 3, seed=1)
        >>> torch.allclose(p @ p.T, torch.eye(3, dtype=p.dtype))
        True
    """
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(d, k, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))  # sign fix makes the draw Haar-distributed
    return (q.T * math.sqrt(d / k)).contiguous()
