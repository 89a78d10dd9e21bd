"""Codecs: how each training gradient ``G_z`` of one layer is kept, and how queries meet it.

Every codec keeps the per-layer structure and supports four operations:

- ``encode(a, s)``: from a batch's per-token inputs ``a`` ``(B, T, d_in)`` and output
  gradients ``s`` ``(B, T, d_out)`` (padding zeroed) to the arrays stored per example;
- ``compress_query(p)``: a preconditioned query gradient ``P_q`` (dense ``(Q, d_out, d_in)``
  or rank-r factors, :class:`~influencekit.lowrank.LowRank`) in the form that meets the
  stored arrays;
- ``contract(query, stored)``: ``⟨P_q, G_z⟩`` (or its compressed estimate) for every query
  and stored example, ``(Q, B)``. Stored gradients are never expanded to full matrices,
  except ``lowrank`` against a dense query, one block at a time, when that is cheaper;
- ``gram(a, b)``: ``⟨G_a, G_b⟩`` (or its compressed estimate) between two batches of stored
  examples, ``(Ba, Bb)``, also without expanding them.

The codecs (``spec`` strings, recorded in the store):

- ``dense``: ``G_z`` itself, ``(d_out, d_in)``; exact.
- ``kron:K``: ``P_out G_z P_inᵀ`` ``(k_out, k_in)``, ``k = min(K, d)``, with ``P`` the first
  ``k`` rows of a random orthogonal matrix scaled by ``sqrt(d / k)`` (so ``E[PᵀP] = I`` and the
  compressed inner product is unbiased). Computed from projected tokens, never forming
  ``G_z``. Exact when ``K ≥ d_out`` and ``K ≥ d_in`` (the projections are then orthogonal).
- ``lowrank:R``: factors with ``G_z ≈ Σ_r u_r v_rᵀ``, a near-best rank-``R`` approximation
  (randomized range finder with 2 power iterations, never forming ``G_z``); exact when ``R``
  ≥ the number of tokens (the rank of ``G_z``).
- ``eig:K``: like ``kron`` but ``P`` are the top-``K`` eigenvectors of the layer's
  ``S`` and ``A`` covariances (rows orthonormal, no scaling): the score restricted to
  the leading curvature directions. Needs fitted factors at build time.

Example:
    >>> import torch
    >>> codec = make_codec(parse_codec("kron:8"), (3, 5), seed=0, layer_index=0)
    >>> codec.arrays()   # k = min(K, d): orthogonal here, so the scores below are exact
    {'c': (3, 5)}
    >>> a, s = torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    >>> g = torch.einsum("bto,bti->boi", s, a)
    >>> stored = codec.encode(a, s)
    >>> p = torch.randn(1, 3, 5)
    >>> exact = torch.einsum("qoi,boi->qb", p, g)
    >>> torch.allclose(codec.contract(codec.compress_query(p), stored), exact, atol=1e-4)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from influencekit.errors import ParameterError
from influencekit.lowrank import (
    LowRank,
    QueryForm,
    as_dense,
    factored_inner,
    max_factored_rank,
    zero_pad,
)

Tensor = torch.Tensor
KINDS = ("dense", "kron", "lowrank", "eig")
DEFAULT_CODEC = "lowrank:8"  # chosen from benchmarks/store.py: see docs/store-format.md
OVERSAMPLE = 8  # extra columns of the lowrank range finder
POWER_ITERATIONS = 2
GRAM_ELEMENTS = 2**24  # lowrank gram: at most this many (a, b, k, j) products at once


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec string: ``kind`` and its size (``K`` or ``R``; 0 for dense)."""

    kind: str
    size: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "dense" else f"{self.kind}:{self.size}"


def parse_codec(text: str) -> CodecSpec:
    """Parse ``dense``, ``kron:K``, ``lowrank:R`` or ``eig:K``, with a clear error otherwise.

    Example:
        >>> parse_codec("lowrank:8")
        CodecSpec(kind='lowrank', size=8)
    """
    allowed = "dense, kron:K, lowrank:R or eig:K (K, R integers >= 1), e.g. kron:32"
    if not isinstance(text, str):
        raise ParameterError("codec", text, allowed)
    kind, _, size = text.strip().partition(":")
    if kind == "dense" and not size:
        return CodecSpec("dense")
    if kind in KINDS and kind != "dense" and size.isdigit() and int(size) >= 1:
        return CodecSpec(kind, int(size))
    raise ParameterError("codec", text, allowed)


class DenseCodec:
    """The exact gradient ``G_z`` per example."""

    def max_factored_rank(self, n_queries: int) -> int:
        """The highest query rank that contracts more cheaply than dense queries: none here
        (``query_rank="auto"`` truncates queries only where a codec says it pays)."""
        return 0

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = tuple(shape)
        self.params: dict = {}
        self.tensors: dict[str, Tensor] = {}

    def arrays(self) -> dict[str, tuple[int, ...]]:
        return {"g": self.shape}

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        return {"g": torch.einsum("bto,bti->boi", s, a)}

    def compress_query(self, p: QueryForm) -> Tensor:
        return as_dense(p)

    def contract(self, query: Tensor, stored: dict[str, Tensor]) -> Tensor:
        # One (Q, O·I) × (O·I, B) matmul: much faster than the equivalent einsum on CPU.
        return query.flatten(1) @ stored["g"].flatten(1).T

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨G_a, G_b⟩`` for every pair of stored examples, ``(Ba, Bb)``; exact."""
        return a["g"].flatten(1) @ b["g"].flatten(1).T


class ProjectionCodec:
    """``P_out G_z P_inᵀ`` for fixed projections ``p_out (k_out, d_out)``, ``p_in (k_in, d_in)``.

    ``kron`` draws scaled random orthogonal rows; ``eig`` takes leading eigenvectors.
    """

    def max_factored_rank(self, n_queries: int) -> int:
        return 0  # a query is projected to a small dense (k_out, k_in) whatever its rank

    def __init__(self, shape: tuple[int, int], p_out: Tensor, p_in: Tensor) -> None:
        self.shape = tuple(shape)
        self.tensors = {"p_out": p_out, "p_in": p_in}
        self.params = {"k_out": int(p_out.shape[0]), "k_in": int(p_in.shape[0])}

    def arrays(self) -> dict[str, tuple[int, ...]]:
        return {"c": (self.params["k_out"], self.params["k_in"])}

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


class LowRankCodec:
    """Rank-``R`` factors of ``G_z``: ``u (R, d_out)`` (singular values folded in), ``v (R, d_in)``.

    ``omega`` ``(d_in, R + OVERSAMPLE)`` is the fixed random test matrix of the range finder,
    recorded in the store so every build of it computes the same factors.
    """

    def max_factored_rank(self, n_queries: int) -> int:
        """``Q·r·R·(d_out + d_in)`` against ``(R + Q)·d_out·d_in`` per example."""
        return max_factored_rank(n_queries, self.rank, self.shape)

    def __init__(self, shape: tuple[int, int], rank: int, omega: Tensor) -> None:
        self.shape = tuple(shape)
        self.rank = min(rank, *self.shape)
        self.params = {"rank": self.rank, "power_iterations": POWER_ITERATIONS}
        self.tensors = {"omega": omega}

    def arrays(self) -> dict[str, tuple[int, ...]]:
        d_out, d_in = self.shape
        return {"u": (self.rank, d_out), "v": (self.rank, d_in)}

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        # G = Sᵀ A with S (T, d_out), A (T, d_in), never formed: a randomized range finder
        # (Halko et al. 2011) applies G and Gᵀ through the token matrices, O(T·(d_out + d_in)·k)
        # per product with k = R + oversampling. Exact whenever rank(G) ≤ k, e.g. T ≤ R.
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
        return {
            "u": zero_pad(left.transpose(1, 2), self.rank),
            "v": zero_pad(vh[:, :r, :], self.rank),
        }

    def compress_query(self, p: QueryForm) -> QueryForm:
        """Keep rank-r factors when the factored contraction is cheaper than the dense one."""
        if isinstance(p, LowRank) and p.rank <= self.max_factored_rank(p.n_queries):
            return p
        return as_dense(p)

    def contract(self, query: QueryForm, stored: dict[str, Tensor]) -> Tensor:
        u, v = stored["u"], stored["v"]  # (B, R, d_out), (B, R, d_in)
        if isinstance(query, LowRank):
            return factored_inner(query, u, v)
        # A dense query needs d_out·d_in work per pair anyway: rebuild this block's G_z once.
        g = u.transpose(1, 2) @ v
        return query.flatten(1) @ g.flatten(1).T

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


def make_codec(
    spec: CodecSpec,
    shape: tuple[int, int],
    *,
    seed: int = 0,
    layer_index: int = 0,
    eigenbasis: tuple[Tensor, Tensor] | None = None,
):
    """The codec of one layer with gradient ``shape`` ``(d_out, d_in)``.

    ``eigenbasis`` (``eig`` only): ``(Q_S, Q_A)`` with columns sorted by decreasing eigenvalue.
    """
    d_out, d_in = shape
    if spec.kind == "dense":
        return DenseCodec(shape)
    if spec.kind == "lowrank":
        k = min(spec.size, d_out, d_in) + OVERSAMPLE
        gen = torch.Generator().manual_seed(projection_seed(seed, layer_index, 2))
        return LowRankCodec(
            shape, spec.size, torch.randn(d_in, k, generator=gen, dtype=torch.float64)
        )
    k_out, k_in = min(spec.size, d_out), min(spec.size, d_in)
    if spec.kind == "kron":
        p_out = orthogonal_rows(k_out, d_out, projection_seed(seed, layer_index, 0))
        p_in = orthogonal_rows(k_in, d_in, projection_seed(seed, layer_index, 1))
        return ProjectionCodec(shape, p_out, p_in)
    if eigenbasis is None:
        raise ParameterError("factors", None, f"fitted ekfac or kfac factors for codec {spec}")
    q_s, q_a = eigenbasis
    return ProjectionCodec(shape, q_s[:, :k_out].T.contiguous(), q_a[:, :k_in].T.contiguous())


def restore_codec(spec: CodecSpec, shape: tuple[int, int], tensors: dict[str, Tensor]):
    """Rebuild a layer codec from what a store recorded (projections are read, not redrawn)."""
    if spec.kind == "dense":
        return DenseCodec(shape)
    if spec.kind == "lowrank":
        return LowRankCodec(shape, spec.size, tensors["omega"])
    return ProjectionCodec(shape, tensors["p_out"], tensors["p_in"])


def new_codecs(spec: CodecSpec, shapes: list[tuple[int, int]], *, seed: int, eigenbases=None):
    """The codecs of a new store, one per layer of gradient shape ``shapes[j]``: random
    projections drawn from ``seed``; ``eigenbases[j]`` ``(Q_S, Q_A)`` for ``eig``."""
    return [
        make_codec(
            spec,
            tuple(shape),
            seed=seed,
            layer_index=j,
            eigenbasis=None if eigenbases is None else eigenbases[j],
        )
        for j, shape in enumerate(shapes)
    ]


def recorded_codecs(codec: str, shapes: list[list[int]], tensors: list[dict[str, Tensor]]):
    """The codecs a store recorded: spec string, per-layer shapes and codec arrays."""
    spec = parse_codec(codec)
    return [
        restore_codec(spec, tuple(shape), arrays)
        for shape, arrays in zip(shapes, tensors, strict=True)
    ]
