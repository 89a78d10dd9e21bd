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

A codec that keeps whole gradients (``dense``, ``lowrank``, ``sparse``, not the projecting
``kron`` and ``eig``) also has ``decode(stored)``: the kept gradients as ``(B, d_out, d_in)``
matrices (or their :class:`~influencekit.lowrank.LowRank` factors), in the basis they are
kept in, which themes precondition (``themes.stored_influence_vectors``).

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
- ``sparse:K``: the ``K`` entries of ``G̃_z = Q_Sᵀ G_z Q_A`` (the gradient in the layer's
  curvature eigenbasis) of largest whitened energy ``G̃²/(Λ + λ)``: values ``x (K,)``, and
  their flat positions, increasing, as ``i (K,)`` the offset within its page and ``n (P,)``
  the count kept per page (pages of 256 entries with one-byte offsets, or of 65,536 with
  two-byte offsets, whichever costs the layer fewer bytes). Queries
  meet it in the same eigenbasis (``P̃_q = G̃_q ⊘ (Λ + λ)``), so a score is
  ``Σ_k P̃_q[i_k] x_k``: the kept entries are the ones an average query's score depends on
  most. Exact when ``K ≥ d_out·d_in``. With
  ``identity`` (or no) factors, the standard basis and plain magnitudes. Needs the factors at
  build time and the same factors' eigenbasis (checked by fingerprint) at scoring time.

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

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

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
KINDS = ("dense", "kron", "lowrank", "eig", "sparse", "sparse8")
OVERSAMPLE = 8  # extra columns of the lowrank range finder
POWER_ITERATIONS = 2
GRAM_ELEMENTS = 2**24  # lowrank gram: at most this many (a, b, k, j) products at once
ROTATE_ELEMENTS = 2**25  # sparse encode: at most this many rotated-gradient entries at once
STANDARD_BASIS = "standard"  # a sparse codec's basis without eigenvectors
# sparse positions: an offset within a page, and a count per page. Pages of 256 entries take
# one byte per offset and two per count; pages of 65,536 two and four. Each layer takes the
# layout that costs it fewer bytes (sparse_layout).
LAYOUTS = {2**8: (np.uint8, np.uint16), 2**16: (np.uint16, np.int32)}
SAMPLE = 8192  # sparse encode: entries sampled to set a row's candidate threshold
FLOAT8_MAX = 448.0  # the largest float8 e4m3 value: sparse8 scales each row's largest to it


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec string: ``kind`` and its size (``K`` or ``R``; 0 for dense)."""

    kind: str
    size: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "dense" else f"{self.kind}:{self.size}"


def parse_codec(text: str) -> CodecSpec:
    """Parse ``dense``, ``kron:K``, ``lowrank:R``, ``eig:K`` or ``sparse:K``, with a clear
    error otherwise.

    Example:
        >>> parse_codec("lowrank:8")
        CodecSpec(kind='lowrank', size=8)
    """
    allowed = (
        "dense, kron:K, lowrank:R, eig:K, sparse:K or sparse8:K (K, R integers >= 1), "
        "e.g. sparse8:4096"
    )
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

    def decode(self, stored: dict[str, Tensor]) -> Tensor:
        """The stored gradients as ``(B, d_out, d_in)`` matrices, in the standard basis."""
        return stored["g"]


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

    def decode(self, stored: dict[str, Tensor]) -> LowRank:
        """The stored rank-``R`` gradients ``u_zᵀ v_z``, as factors (rotating them costs
        ``R·(d_out² + d_in²)``, rotating the product ``d_out·d_in·(d_out + d_in)``)."""
        return LowRank(stored["u"].transpose(1, 2), stored["v"].transpose(1, 2))


@dataclass(frozen=True)
class Basis:
    """Where a ``sparse`` codec keeps a layer's gradients, and how it picks their entries.

    ``q_s`` ``(d_out, d_out)`` and ``q_a`` ``(d_in, d_in)``: the eigenvectors (columns) of the
    layer's curvature factors, or ``None`` for the standard basis; ``weight`` ``(d_out, d_in)``:
    each entry's whitening ``1 / (Λ + λ)``, or ``None`` (all equal); ``fingerprint`` names the
    rotations, so scoring can check it holds the same eigenbasis.
    """

    fingerprint: str = STANDARD_BASIS
    q_s: Tensor | None = None
    q_a: Tensor | None = None
    weight: Tensor | None = None
    damping: float | None = None


class SparseCodec:
    """The ``K`` entries of the eigenbasis gradient ``G̃_z`` of largest whitened energy:
    values ``x (K,)`` and flat positions (``i``, ``n``: see :meth:`pack`) into
    ``(d_out, d_in)``.

    ``basis`` (:class:`Basis`) is needed to encode; reading and scoring need only its
    fingerprint, recorded in ``params``. Queries arrive already in that basis (the scorer
    asks :attr:`eigenbasis` and preconditions in the eigenbasis without rotating back).
    ``eight_bit`` (``sparse8``): values as 8-bit floats (e4m3, 3 mantissa bits) times one
    float32 scale ``s`` per example and layer, instead of the store's dtype. ``page``: the
    positions' page size (a key of ``LAYOUTS``; default: the smaller layout for this layer).
    """

    def max_factored_rank(self, n_queries: int) -> int:
        return 0  # a dense query is gathered at K positions: no factored form is cheaper

    def __init__(
        self,
        shape: tuple[int, int],
        entries: int,
        basis: Basis | None,
        eight_bit: bool = False,
        page: int | None = None,
    ) -> None:
        self.shape = tuple(shape)
        self.entries = min(entries, self.shape[0] * self.shape[1])
        self.basis = basis
        self.eight_bit = eight_bit
        self.page = (
            sparse_layout(self.entries, self.shape[0] * self.shape[1]) if page is None else page
        )
        offsets, counts = LAYOUTS[self.page]
        self.own_dtypes = {"i": offsets, "n": counts}  # whatever the store's dtype
        if eight_bit:
            self.own_dtypes.update({"x": np.uint8, "s": np.float32})
        self.params = {"entries": self.entries, "page": self.page}
        if basis is not None:
            self.params["basis"] = basis.fingerprint
            if basis.damping is not None:
                self.params["damping"] = basis.damping
        self.tensors: dict[str, Tensor] = {}
        self._cached: tuple | None = None  # the basis in the dtype and device last encoded

    @property
    def eigenbasis(self) -> str | None:
        """The fingerprint of the eigenbasis queries must be given in; None: the standard one."""
        found = self.params.get("basis", STANDARD_BASIS)
        return None if found == STANDARD_BASIS else found

    def arrays(self) -> dict[str, tuple[int, ...]]:
        scale = {"s": (1,)} if self.eight_bit else {}
        return {"x": (self.entries,), **scale, "i": (self.entries,), "n": (self.pages,)}

    @property
    def pages(self) -> int:
        return -(-self.shape[0] * self.shape[1] // self.page)

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        if self.basis is None:
            raise ParameterError("factors", None, "the factors this sparse store was built with")
        q_s, q_a, scale = self._on(a)
        if q_s is not None:  # rotate the tokens, not G: T·(d_out² + d_in²) per sequence
            s, a = s @ q_s, a @ q_a
        step = max(1, ROTATE_ELEMENTS // (self.shape[0] * self.shape[1]))
        values, positions = [], []
        for lo in range(0, a.shape[0], step):  # a few sequences' full G̃ at a time
            g = (s[lo : lo + step].transpose(1, 2) @ a[lo : lo + step]).flatten(1)
            # |G̃|·sqrt(w) orders entries as the whitened energy G̃²·w does, in two passes
            size = g.abs() if scale is None else g.abs().mul_(scale)
            # increasing positions: reads and grams go in order
            top = torch.stack([largest(row, self.entries) for row in size])
            values.append(torch.gather(g, 1, top))
            positions.append(top)
        return {**self.values(torch.cat(values)), **self.pack(torch.cat(positions))}

    def values(self, x: Tensor) -> dict[str, Tensor]:
        """Kept values ``(B, K)`` as stored: as they are, or as 8-bit floats (e4m3 bit
        patterns) scaled so that each row's largest magnitude is e4m3's largest, 448."""
        if not self.eight_bit:
            return {"x": x}
        # the scale as float32 keeps it (exactly) on disk
        scale = (x.abs().amax(dim=1, keepdim=True) / FLOAT8_MAX).float().to(x.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        coded = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
        return {"x": coded, "s": scale}

    def kept(self, stored: dict[str, Tensor], dtype: torch.dtype, scaled: bool = True) -> Tensor:
        """The kept values ``(B, K)`` in ``dtype``, decoded from 8 bits where they are
        (``scaled=False``: without each row's scale, for callers that apply it later)."""
        x = stored["x"]
        if not self.eight_bit:
            return x.to(dtype)
        decoded = x.to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
        return decoded * stored["s"].to(dtype) if scaled else decoded

    def _on(self, like: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The rotations and ``sqrt(weight)`` (flat) in ``like``'s dtype and device, made once."""
        key = (like.dtype, like.device)
        if self._cached is None or self._cached[0] != key:
            basis, opts = self.basis, {"dtype": like.dtype, "device": like.device}
            self._cached = (
                key,
                None if basis.q_s is None else basis.q_s.to(**opts),
                None if basis.q_a is None else basis.q_a.to(**opts),
                None if basis.weight is None else basis.weight.sqrt().flatten().to(**opts),
            )
        return self._cached[1:]

    def pack(self, positions: Tensor) -> dict[str, Tensor]:
        """Increasing flat positions ``(B, K)`` as page offsets ``i`` and page counts ``n``."""
        pages = torch.div(positions, self.page, rounding_mode="floor")
        counts = torch.zeros(positions.shape[0], self.pages, dtype=torch.int64, device=pages.device)
        counts.scatter_add_(1, pages, torch.ones_like(pages))
        return {"i": (positions - pages * self.page).to(torch.int32), "n": counts.to(torch.int32)}

    def positions(self, stored: dict[str, Tensor]) -> Tensor:
        """The flat positions ``(B, K)`` of stored page offsets and counts, in int32 (the
        largest layer a sparse store takes, 2²⁸ weights, fits) or int64 if stored so."""
        offsets, counts = stored["i"], stored["n"]
        dtype = torch.promote_types(offsets.dtype, torch.int32)
        # Each row's counts sum to K: one repeat over all rows lays out every entry's page.
        starts = torch.arange(counts.shape[1], dtype=dtype, device=counts.device) * self.page
        page = torch.repeat_interleave(
            starts.repeat(counts.shape[0]), counts.flatten(), output_size=offsets.numel()
        )
        return page.view_as(offsets) + offsets

    def compress_query(self, p: QueryForm) -> Tensor:
        """The query in this codec's basis, one row per position: ``(d_out·d_in, Q)``."""
        return as_dense(p).flatten(1).T.contiguous()

    def contract(self, query: Tensor, stored: dict[str, Tensor]) -> Tensor:
        i = self.positions(stored)  # (B, K)
        x = self.kept(stored, query.dtype, scaled=False)
        # Every query's value at a kept position is one contiguous row of ``query``: one
        # fused gather and weighted sum per example (an embedding bag) reads each row once.
        bags = torch.arange(0, i.numel(), i.shape[1], dtype=i.dtype, device=i.device)
        picked = F.embedding_bag(
            i.flatten(), query, bags, mode="sum", per_sample_weights=x.flatten()
        )
        if self.eight_bit:
            picked = picked * stored["s"].to(query.dtype)  # (B, 1): one scale per example
        return picked.T

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨G̃_a, G̃_b⟩`` of the kept entries for every pair, ``(Ba, Bb)``: the eigenbasis
        is orthogonal, so this is the inner product of the sparse approximations of ``G``."""
        left, right = self._rows(a), self._rows(b)
        dtype = (a["s"] if self.eight_bit else a["x"]).dtype
        return torch.from_numpy((left @ right.T).toarray()).to(dtype)

    def decode(self, stored: dict[str, Tensor]) -> Tensor:
        """The kept entries placed in ``(B, d_out, d_in)`` zero matrices, in the basis they
        are kept in (:attr:`eigenbasis`: the factors' eigenbasis, or the standard one)."""
        x = self.kept(stored, stored["s" if self.eight_bit else "x"].dtype)
        dense = x.new_zeros(x.shape[0], self.shape[0] * self.shape[1])
        dense.scatter_(1, self.positions(stored).long(), x)
        return dense.view(-1, *self.shape)

    def _rows(self, stored: dict[str, Tensor]) -> scipy.sparse.csr_matrix:
        """Stored sparse codes as rows of a ``(B, d_out·d_in)`` scipy CSR matrix (float64)."""
        x = self.kept(stored, torch.float64).cpu().numpy()
        return _sparse_rows(x, self.positions(stored).cpu().numpy(), self.shape)


def sparse_layout(entries: int, size: int) -> int:
    """The page size (a key of ``LAYOUTS``) that stores ``entries`` positions among ``size``
    in the fewest bytes: offsets of one byte pay once a layer keeps more than about 1/129
    of its entries.

    Example:
        >>> sparse_layout(4096, 2048 * 513), sparse_layout(27290, 2048 * 513)
        (65536, 256)
    """

    def cost(page: int) -> int:
        offset, count = (np.dtype(d).itemsize for d in LAYOUTS[page])
        return entries * offset + -(-size // page) * count

    return min(LAYOUTS, key=lambda page: (cost(page), -page))


def largest(values: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest of the non-negative ``values`` (one row), increasing.

    The same set as ``torch.topk`` where no two values tie at the ``k``-th largest (at a tie
    the first positions win), found faster on long rows and already in order: a threshold
    from a fixed strided sample keeps about ``2k`` candidates (every one of the top ``k``
    whenever at least ``k`` pass), and the ``k``-th largest candidate cuts them to ``k``.

    Example:
        >>> largest(torch.tensor([0.5, 3.0, 1.0, 2.0]), 2)
        tensor([1, 3])
    """
    n = values.shape[0]
    candidates = None
    if k * 8 <= n:
        sample = values[:: max(1, n // SAMPLE)]
        above = min(sample.shape[0], math.ceil(2 * k * sample.shape[0] / n))
        threshold = torch.kthvalue(sample, sample.shape[0] - above + 1).values
        candidates = torch.nonzero(values >= threshold).flatten()  # increasing
    if candidates is None or candidates.shape[0] < k:  # a short row or an unlucky sample
        candidates = torch.arange(n, device=values.device)
    picked = values[candidates]
    kth = torch.kthvalue(picked, picked.shape[0] - k + 1).values
    above, tied = picked > kth, picked == kth
    keep = above | (tied & (tied.cumsum(0) <= k - above.sum()))
    return candidates[keep]


def _sparse_rows(x: np.ndarray, i: np.ndarray, shape: tuple[int, int]) -> scipy.sparse.csr_matrix:
    """Values ``x`` at flat positions ``i`` (both ``(B, K)``) as a ``(B, d_out·d_in)``
    scipy CSR matrix."""
    n, k = x.shape
    pointers = np.arange(0, n * k + 1, k)
    return scipy.sparse.csr_matrix((x.ravel(), i.ravel(), pointers), shape=(n, shape[0] * shape[1]))


def stored_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A stored array as codecs compute with it (on the CPU): floats in ``dtype``, integers
    as they are, uint16 positions widened to int32 (which torch indexes with).

    Example:
        >>> stored_tensor(np.arange(3, dtype=np.uint16), torch.float32).dtype
        torch.int32
    """
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    tensor = torch.from_numpy(array)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def array_dtypes(codec, dtype) -> dict[str, np.dtype]:
    """The on-disk dtype of each of ``codec``'s arrays in a store of float ``dtype``: the
    codec's ``own_dtypes`` (``sparse``'s positions, ``sparse8``'s bytes and scales) keep
    theirs whatever the store's."""
    own = getattr(codec, "own_dtypes", {})
    return {name: np.dtype(own.get(name, dtype)) for name in codec.arrays()}


def example_bytes(codec, dtype) -> int:
    """Bytes one stored example takes in ``codec``'s arrays (float ``dtype``; integer
    arrays in their own)."""
    kinds = array_dtypes(codec, dtype)
    return sum(int(np.prod(shape)) * kinds[name].itemsize for name, shape in codec.arrays().items())


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
    basis: Basis | None = None,
):
    """The codec of one layer with gradient ``shape`` ``(d_out, d_in)``.

    ``eigenbasis`` (``eig`` only): ``(Q_S, Q_A)`` with columns sorted by decreasing eigenvalue;
    ``basis`` (``sparse`` only, default the standard basis): see :class:`Basis`.
    """
    d_out, d_in = shape
    if spec.kind == "dense":
        return DenseCodec(shape)
    if spec.kind in ("sparse", "sparse8"):
        basis = Basis() if basis is None else basis
        return SparseCodec(shape, spec.size, basis, eight_bit=spec.kind == "sparse8")
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


def restore_codec(
    spec: CodecSpec,
    shape: tuple[int, int],
    tensors: dict[str, Tensor],
    params: dict | None = None,
    basis: Basis | None = None,
):
    """Rebuild a layer codec from what a store recorded (projections are read, not redrawn).

    A ``sparse`` codec rebuilt without ``basis`` reads and scores but cannot encode."""
    if spec.kind == "dense":
        return DenseCodec(shape)
    if spec.kind in ("sparse", "sparse8"):
        page = (params or {}).get("page")
        codec = SparseCodec(shape, spec.size, basis, spec.kind == "sparse8", page)
        codec.params = dict(params or codec.params)
        return codec
    if spec.kind == "lowrank":
        return LowRankCodec(shape, spec.size, tensors["omega"])
    return ProjectionCodec(shape, tensors["p_out"], tensors["p_in"])


def new_codecs(
    spec: CodecSpec, shapes: list[tuple[int, int]], *, seed: int, eigenbases=None, bases=None
):
    """The codecs of a new store, one per layer of gradient shape ``shapes[j]``: random
    projections drawn from ``seed``; ``eigenbases[j]`` ``(Q_S, Q_A)`` for ``eig``;
    ``bases[j]`` (:class:`Basis`) for ``sparse``."""
    return [
        make_codec(
            spec,
            tuple(shape),
            seed=seed,
            layer_index=j,
            eigenbasis=None if eigenbases is None else eigenbases[j],
            basis=None if bases is None else bases[j],
        )
        for j, shape in enumerate(shapes)
    ]


def recorded_codecs(
    codec: str,
    shapes: list[list[int]],
    tensors: list[dict[str, Tensor]],
    params: list[dict] | None = None,
    bases: list[Basis] | None = None,
):
    """The codecs a store recorded: spec string, per-layer shapes, codec arrays and
    parameters; ``bases`` (``sparse``) lets them encode too."""
    spec = parse_codec(codec)
    params = params or [None] * len(shapes)
    bases = bases or [None] * len(shapes)
    return [
        restore_codec(spec, tuple(shape), arrays, layer_params, basis)
        for shape, arrays, layer_params, basis in zip(shapes, tensors, params, bases, strict=True)
    ]
