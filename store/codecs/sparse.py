"""``sparse:K`` and ``sparse8:K``: the ``K`` entries of a gradient in the layer's curvature
eigenbasis whose whitened energy is largest.

A score is ``⟨P̃_q, G̃_z⟩`` over the entries of ``G̃_z = Q_Sᵀ G_z Q_A`` (the gradient in the
eigenbasis), with ``P̃_q = G̃_q ⊘ (Λ + λ)``. Entries with ``Λ ≪ λ`` carry little of any score
(a typical query's weight there is ``Λ/λ``, and so is a training gradient's energy), so the
codec first fixes, per layer, a **window**: the eigen-directions ``rows`` of ``S`` and
``cols`` of ``A`` whose block holds the most of ``Σ (Λ/(Λ+λ))²`` (each entry's expected
share of a score's variance) among the blocks that cost at most ``WINDOW_COST`` forwards
of the layer to rotate a token into (:func:`choose_window`). Then each example keeps the
``K`` entries of ``G̃_z`` within the window of largest whitened energy ``G̃²/(Λ + λ)``:
values ``x (K,)`` (in the store's dtype, or ``sparse8``: float8 e4m3 bytes and a float32
scale ``s`` per example mapping its largest magnitude to 448) and their increasing positions
in the window (:mod:`~influencekit.store.codecs.positions`). Queries meet it in the same
window of the same eigenbasis, checked by fingerprint, so a score is ``Σ_k P̃_q[i_k] x_k``.

Exact when ``K ≥ d_out·d_in`` (the window is then the whole eigenbasis). With ``identity``
(or no) factors the basis is the standard one and the window the whole matrix. Stores
written before windows and Elias–Fano positions (no ``rows``/``cols``, ``page`` recorded)
read and score as they did.

Example:
    >>> import torch
    >>> from influencekit.store.codecs import CodecSpec
    >>> codec = SparseCodec.create(CodecSpec("sparse", 3), (2, 4))   # standard basis
    >>> a, s = torch.randn(1, 5, 4), torch.randn(1, 5, 2)
    >>> g = (s.mT @ a).flatten(1)
    >>> kept = codec.decode(codec.encode(a, s)).flatten(1)
    >>> int(kept.ne(0).sum()), torch.equal(kept.abs().max(), g.abs().max())
    (3, True)
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from influencekit.errors import MismatchError, ParameterError
from influencekit.forms import QueryNeeds
from influencekit.lowrank import QueryForm, as_dense

from .base import Codec, checksums
from .eight_bit import SCALE_BYTES, from_e4m3, to_e4m3
from .positions import EliasFano, PagedPositions

Tensor = torch.Tensor
STANDARD_BASIS = "standard"  # a sparse codec's basis without eigenvectors
ROTATE_BYTES = 2**27  # encode: at most this many bytes of rotated gradients at once
SAMPLE = 8192  # encode: entries sampled to set a row's candidate threshold
TOPK_ROW = 2**20  # rows up to this long take one torch.topk for the batch (faster there)
WINDOW_COST = 1.0  # rotating a token into the window: at most this many forwards of the layer
WINDOW_ROOM = 2  # a window holds at least this many times K entries (else the whole basis)


class SparseCodec(Codec):
    """``sparse:K``: ``K`` entries of the eigenbasis gradient, values in the store's dtype."""

    kind = "sparse"
    needs_factors = False  # with factors: their eigenbasis; without: the standard basis
    keeps_whole = True
    eight_bit = False

    def __init__(self, spec, shape, params, tensors) -> None:
        super().__init__(spec, shape, params, tensors)
        rows, cols = tensors.get("rows"), tensors.get("cols")
        self.rows = None if rows is None else rows.long()
        self.cols = None if cols is None else cols.long()
        self.window_shape = self.shape if rows is None else (len(rows), len(cols))
        n = self.window_shape[0] * self.window_shape[1]
        self.entries = min(spec.size, n)
        if params.get("positions", PagedPositions.name) == EliasFano.name:
            self.positions = EliasFano(n, self.entries)
        else:  # written before Elias–Fano positions
            self.positions = PagedPositions(n, self.entries, params.get("page"))
        self.params = {"entries": self.entries, **_without(params, "entries")}
        self._encoding: tuple | None = None  # (q_s, q_a, sqrt weight) of the window, attached
        self._cached: tuple | None = None  # the same in the dtype and device last encoded

    # -- what is stored ----------------------------------------------------------------------

    def arrays(self) -> dict[str, tuple[int, ...]]:
        scale = {"s": (1,)} if self.eight_bit else {}
        return {"x": (self.entries,), **scale, **self.positions.arrays()}

    def own_dtypes(self) -> dict[str, np.dtype]:
        own = dict(self.positions.own_dtypes())
        if self.eight_bit:
            own.update({"x": np.dtype(np.uint8), "s": np.dtype(np.float32)})
        return own

    def encode_bytes(self, batch: int, length: int, item: int) -> int:
        """The window's rotations and whitening (attached), a batch's rotated tokens, and
        at most ``ROTATE_BYTES`` of rotated gradients with their magnitudes."""
        (d_out, d_in), (k_out, k_in) = self.shape, self.window_shape
        attached = (
            (d_out * k_out + d_in * k_in + k_out * k_in) * item if self.rows is not None else 0
        )
        if self.rows is None and self.eigenbasis is not None:
            attached = (d_out * d_out + d_in * d_in + d_out * d_in) * item
        rotated = batch * length * (k_out + k_in) * item
        return super().encode_bytes(batch, length, item) + attached + rotated + 2 * ROTATE_BYTES

    @property
    def eigenbasis(self) -> str | None:
        found = self.params.get("basis", STANDARD_BASIS)
        return None if found == STANDARD_BASIS else found

    @property
    def window(self) -> tuple[Tensor, Tensor] | None:
        """``(rows, cols)``: the eigen-directions kept, or None for the whole basis."""
        return None if self.rows is None else (self.rows, self.cols)

    # -- encoding ----------------------------------------------------------------------------

    def check_factors(self, factors=None) -> None:
        """The factors' eigenbasis and default damping (its whitening) must be the ones the
        codec kept its entries by (a build continued with other factors is refused)."""
        self._check_basis(factors)
        damping = self.params.get("damping")
        if factors is not None and damping is not None and factors.default_damping() != damping:
            raise MismatchError(
                f"codec of {factors.name}: entries chosen with damping {damping}, these "
                f"factors' default damping is {factors.default_damping()}"
            )

    def _check_basis(self, factors) -> str:
        """The factors' eigenbasis fingerprint, refused unless it is the codec's."""
        basis = STANDARD_BASIS if factors is None else factors.basis_fingerprint()
        kept = self.params.get("basis", STANDARD_BASIS)
        if basis != kept:
            raise MismatchError(
                f"codec of {getattr(factors, 'name', 'this layer')}: kept in eigenbasis {kept}, "
                f"these factors have eigenbasis {basis}"
            )
        return basis

    def attach(self, factors=None) -> None:
        """Read the window's eigenvectors and whitening from the layer's factors (checked
        to be the eigenbasis this codec was made with)."""
        basis = self._check_basis(factors)
        if factors is None or basis == STANDARD_BASIS:
            weight = None if factors is None or factors.lam is None else factors.lam
            sqrt_w = None
            if weight is not None:
                sqrt_w = (1.0 / (weight + self.params["damping"])).sqrt().flatten()
            self._encoding = (None, None, sqrt_w)
        else:
            rows, cols = self.window or (torch.arange(self.shape[0]), torch.arange(self.shape[1]))
            like = torch.empty(0, dtype=factors.dtype)
            q_s, q_a, lam = factors.window(rows, cols, like)
            self._encoding = (q_s, q_a, (1.0 / (lam + self.params["damping"])).sqrt().flatten())
        self._cached = None

    def detach(self) -> None:
        self._encoding = self._cached = None

    def _on(self, like: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The window's rotations and ``sqrt(weight)`` (flat) in ``like``'s dtype and device."""
        if self._encoding is None:
            raise ParameterError("factors", None, "the factors this sparse store was built with")
        key = (like.dtype, like.device)
        if self._cached is None or self._cached[0] != key:
            opts = {"dtype": like.dtype, "device": like.device}
            self._cached = (key, *(None if x is None else x.to(**opts) for x in self._encoding))
        return self._cached[1:]

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        q_s, q_a, scale = self._on(a)
        if q_s is not None:  # rotate the real tokens into the window, not G
            s, a = _rotate(s, q_s), _rotate(a, q_a)
        per_example = s.shape[-1] * a.shape[-1] * s.element_size()
        step = max(1, ROTATE_BYTES // per_example)
        values, positions = [], []
        for lo in range(0, a.shape[0], step):  # a few sequences' windows at a time
            g = (s[lo : lo + step].transpose(1, 2) @ a[lo : lo + step]).flatten(1)
            # |G̃|·sqrt(w) orders entries as the whitened energy G̃²·w does
            size = g.abs() if scale is None else g.abs().mul_(scale)
            top = top_positions(size, self.entries)  # increasing
            values.append(torch.gather(g, 1, top))
            positions.append(top)
        return {**self.values(torch.cat(values)), **self.positions.pack(torch.cat(positions))}

    def values(self, x: Tensor) -> dict[str, Tensor]:
        """Kept values ``(B, K)`` as stored: as they are (``sparse``)."""
        return {"x": x}

    def kept(self, stored: dict[str, Tensor], dtype: torch.dtype, scaled: bool = True) -> Tensor:
        """The kept values ``(B, K)`` in ``dtype`` (``scaled=False``: without a per-example
        scale, for callers that apply it later; ``sparse`` has none)."""
        return stored["x"].to(dtype)

    def scale(self, stored: dict[str, Tensor], dtype: torch.dtype) -> Tensor | None:
        """The per-example scale ``(B, 1)`` of the kept values, or None."""
        return None

    # -- queries -----------------------------------------------------------------------------

    def query_needs(self, n_queries: int) -> QueryNeeds:
        """Queries in this codec's basis (its window of it), query-last for the gather."""
        if self.eigenbasis is None:
            return QueryNeeds()  # the standard basis is the weights' own
        return QueryNeeds(basis="eigen", window=self.window, query_last=True)

    def compress_query(self, p: QueryForm) -> Tensor:
        """The query in this codec's basis and window, one row per position: ``(n, Q)``."""
        return as_dense(p).flatten(1).T.contiguous()

    def contract(self, query: Tensor, stored: dict[str, Tensor]) -> Tensor:
        i = self.positions.unpack(stored)
        i = i.to(torch.int32) if self.positions.n < 2**31 else i
        x = self.kept(stored, query.dtype, scaled=False)
        # Every query's value at a kept position is one contiguous row of ``query``: one
        # fused gather and weighted sum per example (an embedding bag) reads each row once.
        bags = torch.arange(0, i.numel(), i.shape[1], dtype=i.dtype, device=i.device)
        picked = F.embedding_bag(
            i.flatten(), query, bags, mode="sum", per_sample_weights=x.flatten()
        )
        scale = self.scale(stored, query.dtype)
        return (picked if scale is None else picked * scale).T

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨G̃_a, G̃_b⟩`` of the kept entries for every pair, ``(Ba, Bb)``: the eigenbasis
        is orthogonal, so this is the inner product of the sparse approximations of ``G``."""
        left, right = self._rows(a), self._rows(b)
        dtype = (a["s"] if self.eight_bit else a["x"]).dtype
        return torch.from_numpy((left @ right.T).toarray()).to(dtype)

    def decode(self, stored: dict[str, Tensor]) -> Tensor:
        """The kept entries placed in ``(B, d_out, d_in)`` zero matrices, in the basis they
        are kept in (:attr:`eigenbasis`, its columns as the factors hold them; the
        standard basis without one)."""
        x = self.kept(stored, stored["s" if self.eight_bit else "x"].dtype)
        dense = x.new_zeros(x.shape[0], self.shape[0] * self.shape[1])
        dense.scatter_(1, self._full_positions(self.positions.unpack(stored).long()), x)
        return dense.view(-1, *self.shape)

    def _full_positions(self, positions: Tensor) -> Tensor:
        """Window positions as flat positions in the whole ``(d_out, d_in)`` basis."""
        if self.rows is None:
            return positions
        k_in = self.window_shape[1]
        rows, cols = self.rows.to(positions.device), self.cols.to(positions.device)
        return rows[positions // k_in] * self.shape[1] + cols[positions % k_in]

    def _rows(self, stored: dict[str, Tensor]) -> scipy.sparse.csr_matrix:
        """Stored entries as rows of a ``(B, n)`` scipy CSR matrix (float64), ``n`` the
        window's size."""
        x = self.kept(stored, torch.float64).cpu().numpy()
        i = self.positions.unpack(stored).cpu().numpy()
        n, k = x.shape
        pointers = np.arange(0, n * k + 1, k)
        return scipy.sparse.csr_matrix(
            (x.ravel(), i.ravel(), pointers), shape=(n, self.positions.n)
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, spec, shape, *, seed=0, layer_index=0, factors=None, damping=None):
        """In ``factors``' eigenbasis (a window of it, :func:`choose_window`), whitened with
        ``damping`` (default: theirs); the standard basis and plain magnitudes without
        factors (or with ``identity`` ones)."""
        positions = {"positions": EliasFano.name}
        if factors is None:
            codec = cls(spec, shape, {"basis": STANDARD_BASIS, **positions}, {})
            codec.attach(None)
            return codec
        damping = factors.default_damping() if damping is None else float(damping)
        params = {"basis": factors.basis_fingerprint(), "damping": damping, **positions}
        tensors = {}
        if factors.has("q_a"):
            rows, cols, mass = choose_window(factors.lam, damping, spec.size)
            if rows is not None:
                tensors = {"rows": rows, "cols": cols}
                params["window_mass"] = mass
        codec = cls(spec, shape, params, tensors)
        codec.attach(factors)
        return codec

    @classmethod
    def restore(cls, spec, shape, params, tensors):
        return cls(spec, shape, params, tensors)

    @classmethod
    def bytes_for(cls, size: int, shape: tuple[int, int], dtype: str) -> int:
        """Bytes per example of ``size`` entries among ``shape`` (the window's, where there is
        one) with Elias–Fano positions."""
        n = shape[0] * shape[1]
        entries = min(size, n)
        positions = EliasFano(n, entries)
        value = 1 if cls.eight_bit else np.dtype(dtype).itemsize
        scale = {"s": 0} if cls.eight_bit else {}
        arrays = {"x": 0, **scale, **positions.arrays()}
        extra = SCALE_BYTES if cls.eight_bit else 0
        return entries * value + positions.bytes() + extra + checksums(arrays)

    @classmethod
    def exact_size(cls, shape, n_tokens):
        return None if cls.eight_bit else shape[0] * shape[1]


class Sparse8Codec(SparseCodec):
    """``sparse8:K``: as ``sparse:K``, values as float8 e4m3 bytes times one float32 scale
    per example (its largest magnitude maps to 448)."""

    kind = "sparse8"
    eight_bit = True

    def values(self, x: Tensor) -> dict[str, Tensor]:
        """Kept values ``(B, K)`` as 8-bit floats (e4m3 bit patterns) scaled so that each
        row's largest magnitude is e4m3's largest, 448, and the scale (float32)."""
        coded, scale = to_e4m3(x)
        return {"x": coded, "s": scale}

    def kept(self, stored: dict[str, Tensor], dtype: torch.dtype, scaled: bool = True) -> Tensor:
        return from_e4m3(stored["x"], stored["s"] if scaled else None, dtype)

    def scale(self, stored: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return stored["s"].to(dtype)  # (B, 1): one scale per example


def choose_window(
    lam: Tensor, damping: float, entries: int, cost: float = WINDOW_COST
) -> tuple[Tensor | None, Tensor | None, float]:
    """The eigen-directions a sparse codec keeps: ``(rows, cols, mass)``, or ``(None, None,
    1.0)`` for the whole basis.

    Each entry's weight is ``c = (Λ/(Λ+λ))²``, its expected share of a score's variance
    (a typical query's preconditioned value there is ``Λ/(Λ+λ)`` times its gradient, and a
    training gradient's energy is ``Λ``). Rows and columns are taken in decreasing order of
    their summed ``c``; among the blocks ``k_out × k_in`` whose rotation costs at most
    ``cost`` forwards of the layer per token (``d_out·k_out + d_in·k_in + k_out·k_in ≤
    cost·d_out·d_in``) and hold at least ``WINDOW_ROOM·entries`` entries, the one with the
    most ``c`` (``mass``: its share of the whole). When none qualifies, or ``entries`` is
    near the whole size, the whole basis.

    Example:
        >>> lam = torch.zeros(64, 64); lam[:4, :4] = 1.0
        >>> rows, cols, mass = choose_window(lam, 0.01, entries=8)
        >>> sorted(rows[:4].tolist()), mass > 0.999
        ([0, 1, 2, 3], True)
    """
    d_out, d_in = lam.shape
    if WINDOW_ROOM * entries >= d_out * d_in:
        return None, None, 1.0
    c = (lam.float() / (lam.float() + damping)).square_()
    row_order = torch.argsort(c.sum(1), descending=True, stable=True)
    col_order = torch.argsort(c.sum(0), descending=True, stable=True)
    total = float(c.sum(dtype=torch.float64))
    cum = c[row_order][:, col_order].cumsum_(0).cumsum_(1)
    k_out = torch.arange(1, d_out + 1)
    k_in = torch.div(cost * d_out * d_in - k_out * d_out, d_in + k_out, rounding_mode="floor")
    k_in = k_in.clamp(max=d_in).long()
    valid = (k_in >= 1) & (k_out * k_in >= WINDOW_ROOM * entries)
    if not bool(valid.any()) or total <= 0:
        return None, None, 1.0
    mass = torch.where(valid, cum[k_out - 1, (k_in - 1).clamp(min=0)], -1.0)
    best = int(torch.argmax(mass))  # the first best: the fewest rows
    rows, cols = row_order[: best + 1], col_order[: int(k_in[best])]
    # int32: the indices a store records in its manifest (half the bytes of int64)
    return rows.to(torch.int32), cols.to(torch.int32), float(mass[best]) / total


def _rotate(x: Tensor, q: Tensor) -> Tensor:
    """``x @ q`` for the tokens of ``x`` ``(B, T, d)`` that are not zero (padding stays zero,
    unrotated)."""
    real = x.ne(0).any(-1)
    if bool(real.all()):
        return x @ q
    out = x.new_zeros(*x.shape[:2], q.shape[1])
    out[real] = x[real] @ q
    return out


def top_positions(values: Tensor, k: int) -> Tensor:
    """Each row's ``k`` largest positions of the non-negative ``values`` ``(B, n)``,
    increasing: one ``torch.topk`` over the batch where rows are short (it is faster there),
    :func:`largest` row by row where they are long.

    Example:
        >>> top_positions(torch.tensor([[0.5, 3.0, 1.0, 2.0], [4.0, 0.0, 1.0, 3.0]]), 2)
        tensor([[1, 3],
                [0, 3]])
    """
    if values.shape[1] <= TOPK_ROW:
        chosen = torch.topk(values, k, dim=1, sorted=False).indices
        mask = torch.zeros_like(values, dtype=torch.bool).scatter_(1, chosen, True)
        return mask.nonzero()[:, 1].view(values.shape[0], k)  # in order, without a sort
    return torch.stack([largest(row, k) for row in values])


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


def _without(params: dict, *keys: str) -> dict:
    return {k: v for k, v in params.items() if k not in keys}
