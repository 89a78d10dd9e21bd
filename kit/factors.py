"""Curvature factors per tracked layer: EK-FAC and its baselines (docs/math.md).

For a layer with inputs ``a`` and output gradients ``s``:

- ``A = mean_tokens a aᵀ``, ``S = mean_tokens s sᵀ`` (non-pad tokens; ``s`` from sampled or
  real next tokens), eigendecomposed in float64: ``A = Q_A D_A Q_Aᵀ``, ``S = Q_S D_S Q_Sᵀ``;
- ``ekfac``: ``Λ = mean_sequences (Q_Sᵀ G_z Q_A)^∘2`` (same label choice as ``S``);
- ``kfac``: ``Λ = D_S ⊗ D_A`` (outer product);
- ``diagonal``: ``Λ = mean_sequences G_z^∘2`` in the standard basis (``Q`` = identity);
- ``identity``: no curvature (``Λ = 0``) and damping 1 by default: a plain dot product.

A preconditioned gradient is ``P = Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` with damping ``λ``
defaulting to ``0.1 × mean(Λ)`` per layer.

Factors are kept (in memory and on disk) in the dtype they were fitted in: float32 by
default, float64 on request. This module holds what factors are and their file;
:mod:`influencekit.fitting` fits them.

Example:
    >>> factors = fit_factors(model, train, modules="mlp")          # doctest: +SKIP
    >>> factors.save("run/factors.h5"); Factors.load("run/factors.h5")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checks
from .errors import FileFormatError, ModelError, NonFiniteError, ParameterError
from .h5io import atomic_h5, open_h5, read_array
from .lowrank import LowRank, QueryForm, as_dense, times_stack, truncate
from .models import (
    TrackedLayer,
    candidate_layers,
    check_finite_weights,
    model_fingerprint,
    select_modules,
)

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHERS = ("sampled", "empirical")
FORMAT = "influencekit.factors"
# 2: arrays float32 or float64 (the fit's dtype), each layer's default damping and basis
# fingerprint recorded; version 1 files (float64, nothing recorded) still read.
VERSION = 2
ARRAYS = ("q_a", "d_a", "q_s", "d_s", "lam")
BLOCK_FLOATS = 2**18  # 1 MiB of float32: a block that stays in a core's L2 cache
READ_ROWS_BYTES = 64 * 2**20  # a window of a layer is read this much of its rows at a time
# Which arrays each strategy's layers must hold (a file missing one is damaged).
REQUIRED = {"ekfac": ARRAYS, "kfac": ARRAYS, "diagonal": ("lam",), "identity": ()}


class LayerFactors:
    """The factors of one layer: ``q_a``, ``d_a``, ``q_s``, ``d_s``, ``lam`` (absent ones
    ``None``), in the dtype they were fitted in (float32 by default, float64 on request).

    ``q_a``/``q_s`` are ``None`` for ``diagonal`` and ``identity`` (the standard basis);
    ``lam`` is ``None`` for ``identity``. Factors read from a file (:meth:`Factors.load`)
    hold a :class:`LayerSource` and read each array the first time it is asked for, checked
    for NaN and inf; :meth:`release` forgets what was read, so a pass over many layers
    holds one at a time. :meth:`window` reads only a sub-block of the eigenbasis.

    Example:
        >>> lf = LayerFactors("fc", (2, 3), lam=torch.ones(2, 3))
        >>> lf.default_damping(), lf.q_a is None
        (0.1, True)
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, int],
        q_a: torch.Tensor | None = None,
        d_a: torch.Tensor | None = None,
        q_s: torch.Tensor | None = None,
        d_s: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
        *,
        source: LayerSource | None = None,
    ) -> None:
        self.name = name
        self.shape = tuple(int(d) for d in shape)  # canonical gradient shape (d_out, d_in [+1])
        given = {"q_a": q_a, "d_a": d_a, "q_s": q_s, "d_s": d_s, "lam": lam}
        self._arrays = {key: value for key, value in given.items() if value is not None}
        self._read: set[str] = set()  # arrays read from the source (release forgets them)
        self._source = source
        self._basis_name: tuple | None = None
        self._copies: tuple | None = None
        self._windows: tuple | None = None
        self._finite: tuple | None = None

    def __repr__(self) -> str:
        held = ", ".join(sorted(self._arrays)) or "nothing"
        where = f", from {self._source.path}" if self._source is not None else ""
        return f"LayerFactors({self.name!r}, shape={self.shape}, holding {held}{where})"

    # -- the arrays ------------------------------------------------------------------------

    def __getattr__(self, key: str):
        if key in ARRAYS:  # q_a, d_a, q_s, d_s, lam: held, read from the file, or None
            return self._array(key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __setattr__(self, key: str, value) -> None:
        if key in ARRAYS:
            if value is None:
                self._arrays.pop(key, None)
            else:
                self._arrays[key] = value
            self._read.discard(key)
            return
        object.__setattr__(self, key, value)

    def _array(self, key: str) -> torch.Tensor | None:
        if key in self._arrays:
            return self._arrays[key]
        if self._source is None or key not in self._source.keys:
            return None
        value = self._source.read(key)
        self._arrays[key] = value
        self._read.add(key)
        return value

    def has(self, key: str) -> bool:
        """Whether this layer has array ``key`` (held or in its file), without reading it."""
        return key in self._arrays or (self._source is not None and key in self._source.keys)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the factors are kept in (float64 where there are none)."""
        for value in self._arrays.values():
            return value.dtype
        return torch.float64 if self._source is None else self._source.dtype

    def nbytes(self) -> int:
        """Bytes of all this layer's arrays (held or not)."""
        d_out, d_in = self.shape
        sizes = {"q_a": d_in * d_in, "d_a": d_in, "q_s": d_out * d_out, "d_s": d_out}
        sizes["lam"] = d_out * d_in
        item = torch.empty(0, dtype=self.dtype).element_size()
        return item * sum(n for key, n in sizes.items() if self.has(key))

    def release(self) -> None:
        """Forget the arrays read from the file (and copies made from any array): they are
        read again when next asked for. Arrays given in memory stay."""
        for key in self._read:
            self._arrays.pop(key, None)
        self._read.clear()
        self._copies = self._windows = None
        self._finite = None

    # -- what is known without the arrays ----------------------------------------------------

    def default_damping(self) -> float:
        """``0.1 × mean(Λ)``; 1 for ``identity`` (no curvature, plain dot product). Recorded
        in the file, so a file's layers answer without reading ``Λ``."""
        if self._source is not None and self._source.damping is not None and not self._arrays:
            return self._source.damping
        lam = self.lam
        return 1.0 if lam is None else 0.1 * float(lam.mean(dtype=torch.float64))

    def basis_fingerprint(self) -> str:
        """A name for this layer's eigenbasis (``Q_S``, ``Q_A``): equal for the same
        eigenvectors, ``"standard"`` without any (``diagonal``, ``identity``). Recorded in
        the file; hashed once per pair of arrays otherwise (every score against a ``sparse``
        store asks)."""
        if not self.has("q_a"):
            return "standard"
        if self._source is not None and self._source.basis is not None:
            if "q_a" not in self._arrays or "q_a" in self._read:
                return self._source.basis
        q_s, q_a = self.q_s, self.q_a
        key = (id(q_s), id(q_a))
        if self._basis_name is None or self._basis_name[0] != key:
            digest = hashlib.blake2b(digest_size=8)
            for q in (q_s, q_a):
                digest.update(q.to(torch.float64).contiguous().numpy().tobytes())
            self._basis_name = (key, "eig-" + digest.hexdigest())
        return self._basis_name[1]

    def check_finite(self) -> None:
        """Raise NonFiniteError naming this layer and the array holding NaN or inf. Arrays
        found finite are not scanned again until one is replaced or changed in place (arrays
        read from a file are checked as they are read)."""
        arrays = [(key, self._arrays.get(key)) for key in ARRAYS]
        state = tuple((id(x), x._version) for _, x in arrays if x is not None)
        if self._finite == state:
            return
        for key, value in arrays:
            if value is not None and key not in self._read and not torch.isfinite(value).all():
                raise NonFiniteError(f"factors of layer {self.name}: {key} holds NaN or inf")
        self._finite = state

    # -- arithmetic --------------------------------------------------------------------------

    def arrays_like(self, like: torch.Tensor) -> tuple:
        """``(q_s, q_a, lam)`` in ``like``'s dtype and device (``None`` where absent), converted
        once and kept for the next call on the same dtype and device."""
        found = (self.q_s, self.q_a, self.lam)
        key = (like.dtype, like.device, *(id(x) for x in found))
        if self._copies is None or self._copies[0] != key:
            opts = {"dtype": like.dtype, "device": like.device}
            self._copies = (key, *(None if x is None else x.to(**opts) for x in found))
        return self._copies[1:]

    def window(self, rows: torch.Tensor, cols: torch.Tensor, like: torch.Tensor) -> tuple:
        """``(Q_S[:, rows], Q_A[:, cols], Λ[rows][:, cols])`` in ``like``'s dtype and device:
        the sub-block of the eigenbasis a windowed store keeps (``rows``, ``cols``: int
        index tensors). Read from the file a block of rows at a time where the arrays are
        not held, so the whole eigenbasis is never in memory; kept for the next call."""
        key = (like.dtype, like.device, id(rows), id(cols))
        if self._windows is None or self._windows[0] != key:
            opts = {"dtype": like.dtype, "device": like.device}
            parts = (
                self._columns("q_s", rows),
                self._columns("q_a", cols),
                self._block(rows, cols),
            )
            self._windows = (key, *(x.to(**opts) for x in parts))
        return self._windows[1:]

    def _columns(self, key: str, cols: torch.Tensor) -> torch.Tensor:
        if key in self._arrays or self._source is None:
            return self._array(key)[:, cols]
        return self._source.read_block(key, None, cols)

    def _block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        if "lam" in self._arrays or self._source is None:
            return self._array("lam")[rows][:, cols]
        return self._source.read_block("lam", rows, cols)

    def precondition(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        """``(Ĝ + λI)⁻¹`` applied to gradients ``(..., d_out, d_in)`` in their own dtype/device."""
        like = {"dtype": grads.dtype, "device": grads.device}
        denom = (0.0 if self.lam is None else self.lam.to(**like)) + damping
        if self.q_a is None:
            return grads / denom
        q_a, q_s = self.q_a.to(**like), self.q_s.to(**like)
        rotated = q_s.T @ grads @ q_a
        return q_s @ (rotated / denom) @ q_a.T

    def in_eigenbasis(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        damping: float,
        query_last: bool = False,
        window: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(Q_Sᵀ G Q_A) ⊘ (Λ + λ)`` for ``G = Σ_t s_t a_tᵀ``, rotating the tokens, not ``G``:
        the preconditioned gradient in the eigenbasis (the standard basis for ``diagonal``
        and ``identity``).

        ``s`` ``(Q, T, d_out)``, ``a`` ``(Q, T, d_in)``: ``T·(d_out² + d_in²)`` per query
        instead of ``d_out·d_in·(d_out + d_in)`` when a query has fewer tokens than ``d_in``.
        ``query_last``: the ``(Q, d_out, d_in)`` result lies in memory as ``(d_out, d_in, Q)``,
        every position's values for all queries side by side (what sparse codecs gather).
        ``window=(rows, cols)``: only those eigen-directions, ``(Q, len(rows), len(cols))``.
        """
        s, a, denom = self._rotated(s, a, damping, window)
        if query_last:
            return outer_query_last(s, a, denom)
        return (s.transpose(-1, -2) @ a).div_(denom)

    def whitened(self, s: torch.Tensor, a: torch.Tensor, damping: float) -> torch.Tensor:
        """``(Q_Sᵀ G Q_A) ⊘ sqrt(Λ + λ)`` per sequence for ``G = Σ_t s_t a_tᵀ`` (``s``
        ``(B, T, d_out)``, ``a`` ``(B, T, d_in)``): vectors whose inner products are
        ``⟨G_a, (Ĝ + λI)⁻¹ G_b⟩``, the influence of one sequence on another.
        """
        s, a, denom = self._rotated(s, a, damping)
        return (s.transpose(-1, -2) @ a) / denom**0.5

    def whiten(self, g: QueryForm, damping: float, *, in_eigenbasis: bool = False):
        """:meth:`whitened` of gradients given as matrices ``g`` ``(B, d_out, d_in)`` or
        their :class:`LowRank` factors (rotated as factors): in the weights' own basis, or
        (``in_eigenbasis``) already rotated into this layer's."""
        q_s, q_a, lam = self.arrays_like(g.v if isinstance(g, LowRank) else g)
        if q_a is not None and not in_eigenbasis:
            g = g.map(q_s.T, q_a.T) if isinstance(g, LowRank) else times_stack(q_s.T, g) @ q_a
        return as_dense(g) / ((0.0 if lam is None else lam) + damping) ** 0.5

    def _rotated(self, s: torch.Tensor, a: torch.Tensor, damping: float, window=None):
        """The token factors in the eigenbasis (:func:`rotated_tokens`) and ``Λ + λ``, over
        the whole eigenbasis or its ``window``."""
        if window is None:
            q_s, q_a, lam = self.arrays_like(s)
        else:
            q_s, q_a, lam = self.window(*window, like=s)
        return *rotated_tokens(s, a, q_s, q_a), (0.0 if lam is None else lam) + damping

    def from_eigenbasis(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_S x Q_Aᵀ``: back from :meth:`in_eigenbasis` to the weights' own basis."""
        if self.q_a is None:
            return x
        q_s, q_a, _ = self.arrays_like(x)
        return q_s @ x @ q_a.T

    def truncated_from_eigenbasis(
        self,
        x: torch.Tensor,
        rank: int | None = None,
        *,
        energy: float | None = None,
        max_rank: int | None = None,
    ) -> LowRank | None:
        """The truncated SVD of :meth:`from_eigenbasis` ``(x)``, as ``(U Σ, V)``: to ``rank``,
        or to the smallest rank keeping the share ``energy`` of its squared norm, ``None``
        when that is above ``max_rank`` (:func:`~influencekit.lowrank.truncate`).

        The eigenbases are orthogonal, so the SVD is taken of ``x`` in the eigenbasis and
        only its leading singular vectors are rotated back: the full matrix is never formed.
        """
        low = truncate(x, rank=rank, energy=energy, max_rank=max_rank)
        if self.q_a is None or low is None:
            return low
        return low.map(self.q_s.to(low.us), self.q_a.to(low.v))

    def precondition_tokens(self, s: torch.Tensor, a: torch.Tensor, damping: float) -> torch.Tensor:
        """``(Ĝ + λI)⁻¹ G`` for ``G = Σ_t s_t a_tᵀ`` from its token factors: ``(Q, O, I)``."""
        return self.from_eigenbasis(self.in_eigenbasis(s, a, damping))

    def precondition_truncated(
        self, s: torch.Tensor, a: torch.Tensor, damping: float, rank: int
    ) -> LowRank:
        """The rank-``rank`` truncated SVD of ``(Ĝ + λI)⁻¹ G``, as ``(U Σ, V)``, without
        forming the full preconditioned matrix."""
        return self.truncated_from_eigenbasis(self.in_eigenbasis(s, a, damping), rank)


def rotated_tokens(s: torch.Tensor, a: torch.Tensor, q_s, q_a) -> tuple[torch.Tensor, torch.Tensor]:
    """Token factors ``s @ q_s``, ``a @ q_a`` (as they are where ``q_a`` is ``None``) of only the
    tokens that add to ``G = Σ_t s_t a_tᵀ``: padding, and the prompt tokens of layers no
    later attention reads, have ``s_t = 0``. Each query's such tokens go first, and the
    token axis is cut to the longest query's count: ``G`` of every query is unchanged.

    Example:
        >>> s, a = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
        >>> s[0, 1:] = 0                                  # query 0 has one token that counts
        >>> s2, a2 = rotated_tokens(s, a, None, None)
        >>> s2.shape[1], torch.allclose(s2.mT @ a2, s.mT @ a)
        (4, True)
    """
    counts = s.ne(0).any(-1) & a.ne(0).any(-1)  # (Q, T): the tokens that count
    width = int(counts.sum(1).max()) if counts.numel() else 0
    if width == s.shape[1]:
        return (s, a) if q_a is None else (s @ q_s, a @ q_a)
    # a stable sort puts each query's counted tokens first, in their order
    order = torch.argsort((~counts).to(torch.int8), dim=1, stable=True)[:, :width]
    placed = counts.gather(1, order)  # (Q, width): where counted tokens land
    out = []
    for x, q in ((s, q_s), (a, q_a)):
        packed = x[counts]  # only the counted tokens are rotated
        y = x.new_zeros(x.shape[0], width, x.shape[-1] if q is None else q.shape[1])
        y[placed] = packed if q is None else packed @ q
        out.append(y)
    return out[0], out[1]


def outer_query_last(s: torch.Tensor, a: torch.Tensor, denom) -> torch.Tensor:
    """``(s_qᵀ a_q) ⊘ denom`` for every query ``q``, ``(Q, d_out, d_in)``, laid out in memory as
    ``(d_out, d_in, Q)``. On the CPU it is made a block of output rows at a time, each block
    about ``BLOCK_FLOATS`` floats, so that turning it query-last happens in cache.

    Example:
        >>> s, a = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
        >>> x = outer_query_last(s, a, 2.0)
        >>> x.shape, x.permute(1, 2, 0).is_contiguous(), torch.allclose(x, s.mT @ a / 2)
        (torch.Size([3, 4, 2]), True, True)
    """
    n, d_out, d_in = s.shape[0], s.shape[-1], a.shape[-1]
    denom = torch.as_tensor(denom, dtype=s.dtype, device=s.device).expand(d_out, d_in)
    out = torch.empty(d_out, d_in, n, dtype=s.dtype, device=s.device)
    rows = d_out if s.device.type != "cpu" else max(1, BLOCK_FLOATS // (d_in * n))
    s_t = s.transpose(-1, -2)
    for lo in range(0, d_out, rows):
        block = (s_t[:, lo : lo + rows] @ a).permute(1, 2, 0)
        torch.div(block, denom[lo : lo + rows, :, None], out=out[lo : lo + rows])
    return out.permute(2, 0, 1)


@dataclass
class LayerSource:
    """Where a layer's factors lie in a factors file, and what it records of them: its
    arrays' names, dtype, default damping and basis fingerprint (``None`` in files that do
    not record them, which are then computed from the arrays).

    :meth:`read` reads one array whole (checked against its checksum and for NaN or inf);
    :meth:`read_block` a sub-block, a block of rows at a time.
    """

    path: Path
    group: str  # e.g. "layers/0003"
    name: str
    keys: frozenset[str]
    dtype: torch.dtype
    damping: float | None = None
    basis: str | None = None

    def read(self, key: str) -> torch.Tensor:
        with open_h5(self.path, FORMAT, VERSION) as f:
            value = torch.from_numpy(read_array(f[self.group], key, self.path))
        if not torch.isfinite(value).all():
            raise NonFiniteError(
                f"{self.path}: factors of layer {self.name}: {key} holds NaN or inf"
            )
        return value

    def read_block(self, key: str, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        """``array[rows][:, cols]`` (all rows when ``rows`` is None), reading
        ``READ_ROWS_BYTES`` of whole rows at a time."""
        with open_h5(self.path, FORMAT, VERSION) as f:
            data = f[self.group][key]
            n_rows, n_cols = data.shape
            wanted = torch.arange(n_rows) if rows is None else rows.cpu().long()
            step = max(1, READ_ROWS_BYTES // max(1, n_cols * data.dtype.itemsize))
            order = torch.argsort(wanted)  # read in row order, place as asked
            out = torch.empty(len(wanted), len(cols), dtype=self.dtype)
            cols = cols.cpu().long()
            for lo in range(0, len(order), step):
                chosen = order[lo : lo + step]
                first, last = int(wanted[chosen[0]]), int(wanted[chosen[-1]])
                try:
                    rows_read = torch.from_numpy(data[first : last + 1])
                except OSError as err:
                    raise FileFormatError(
                        f"{self.path}: cannot read {self.group}/{key} ({err})"
                    ) from err
                out[chosen] = rows_read[wanted[chosen] - first][:, cols].to(self.dtype)
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"{self.path}: factors of layer {self.name}: {key} holds NaN or inf"
            )
        return out


@dataclass
class Factors:
    """Fitted curvature for a set of layers of one model (identified by its fingerprint).

    Factors fitted in memory hold their arrays; factors read from a file (:meth:`load`, or
    ``fit_factors(..., path=)``) read each layer's arrays when they are first needed, so
    factors larger than memory can be used a layer (or a group of layers) at a time.

    Example:
        >>> factors.modules                      # doctest: +SKIP
        ['transformer.h.0.mlp.c_fc', 'transformer.h.0.mlp.c_proj']
    """

    strategy: str
    fisher: str
    layers: dict[str, LayerFactors]
    fingerprint: str
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the file the layers are read from, for loaded factors

    @property
    def modules(self) -> list[str]:
        return list(self.layers)

    def nbytes(self) -> int:
        """Bytes of every layer's arrays (what holding them all in memory takes)."""
        return sum(layer.nbytes() for layer in self.layers.values())

    def release(self) -> None:
        """Forget every array read from the file (:meth:`LayerFactors.release`)."""
        for layer in self.layers.values():
            layer.release()

    def damping_for(self, damping: float | Mapping[str, float] | None = None) -> dict[str, float]:
        """Per-layer damping ``{layer: λ}``: the defaults (``None``), one number for every
        layer, or a mapping naming exactly these layers; every λ a finite number > 0."""
        defaults = (
            {name: layer.default_damping() for name, layer in self.layers.items()}
            if damping is None
            else None
        )
        return checks.damping(damping, list(self.layers), defaults)

    def eigenbasis(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_S, Q_A)`` of layer ``name`` with columns by decreasing eigenvalue.

        The ``eig:K`` store codec keeps gradients in the leading ``K`` of these directions.
        """
        layer = self.layers[name]
        if not layer.has("q_a"):
            raise ParameterError(
                "factors", f"{self.strategy} factors", "ekfac or kfac factors (with eigenbases)"
            )
        by_s = torch.argsort(layer.d_s, descending=True)
        by_a = torch.argsort(layer.d_a, descending=True)
        return layer.q_s[:, by_s].contiguous(), layer.q_a[:, by_a].contiguous()

    def check_finite(self) -> None:
        """Raise NonFiniteError naming the first layer and array holding NaN or inf (arrays
        read from a file are checked as they are read)."""
        for layer in self.layers.values():
            layer.check_finite()

    def tracked_layers(self, model: nn.Module) -> list[TrackedLayer]:
        """This model's layers for these factors, after checking weights, fingerprint, factors.

        Refuses NaN/inf weights (naming the layer), a model with another fingerprint, and
        non-finite factors (naming the layer and array).
        """
        found = model_fingerprint(model)
        if found != self.fingerprint:
            check_finite_weights(candidate_layers(model))  # NaN weights: say so, not "refit"
            raise ModelError(
                f"these factors were fitted on model {self.fingerprint}, but this model is "
                f"{found}: refit the factors for this model"
            )
        layers = select_modules(model, self.modules)
        check_finite_weights(layers)
        for layer in layers:
            if layer.grad_shape != self.layers[layer.name].shape:
                raise ModelError(
                    f"layer {layer.name}: shape {layer.grad_shape} differs from "
                    f"the factors' {self.layers[layer.name].shape}"
                )
        self.check_finite()
        return layers

    def save(self, path: str | Path) -> Path:
        """Write an HDF5 file (atomically: a crash never leaves a half-written file).
        Layers read from a file are copied one at a time.

        Example:
            >>> factors.save("run/factors.h5")          # doctest: +SKIP
        """
        path = Path(path)
        if self.path is not None and path.resolve() == Path(self.path).resolve():
            return path  # already that file, unchanged since (files are never edited)
        with FactorsWriter(path, self) as writer:
            for layer in self.layers.values():
                held = set(layer._arrays)
                writer.add(layer)
                if layer._source is not None and not held:
                    layer.release()
        return path

    @classmethod
    def load(cls, path: str | Path, *, lazy: bool = True) -> Factors:
        """Read factors written by :meth:`save`, with clear errors for any other file.

        Every attribute, layer group and array shape is checked here; the arrays themselves
        are read (and checked against their checksums and for NaN or inf) when a layer is
        first used, unless ``lazy=False``.

        Example:
            >>> factors = Factors.load("run/factors.h5")   # doctest: +SKIP
        """
        path = Path(path)
        with open_h5(path, FORMAT, VERSION) as f:
            modules = json.loads(f.attrs["modules"])
            strategy = str(f.attrs["strategy"])
            if strategy not in REQUIRED:
                raise FileFormatError(f"{path}: unknown strategy {strategy!r}")
            layers = {
                name: _lazy_layer(name, *_layer_header(f, path, i, name, strategy))
                for i, name in enumerate(modules)
            }
            factors = cls(
                strategy=strategy,
                fisher=str(f.attrs["fisher"]),
                layers=layers,
                fingerprint=str(f.attrs["model_fingerprint"]),
                meta=json.loads(f.attrs["meta"]),
                path=path,
            )
        if not lazy:
            for layer in factors.layers.values():
                for key in ARRAYS:
                    getattr(layer, key)
        return factors


def _layer_header(f, path: Path, i: int, name: str, strategy: str):
    """``(shape, source)`` of layer ``i`` of an open factors file, checked: the
    group exists, holds the arrays ``strategy`` needs, each of the shape it must have."""
    group_path = f"layers/{i:04d}"
    if group_path not in f:
        raise FileFormatError(f"{path}: group {group_path} ({name}) is missing")
    group = f[group_path]
    missing = [k for k in REQUIRED[strategy] if k not in group]
    if missing:
        raise FileFormatError(f"{path}: {group_path} ({name}) lacks {missing}")
    shape = tuple(int(d) for d in group.attrs["shape"])
    d_out, d_in = shape
    expected = {"q_a": (d_in, d_in), "d_a": (d_in,), "q_s": (d_out, d_out), "d_s": (d_out,)}
    expected["lam"] = (d_out, d_in)
    keys = frozenset(k for k in ARRAYS if k in group)
    dtypes = set()
    for key in keys:
        if tuple(group[key].shape) != expected[key]:
            raise FileFormatError(
                f"{path}: {group_path}/{key} ({name}) has shape {tuple(group[key].shape)}, "
                f"expected {expected[key]}"
            )
        dtypes.add(str(group[key].dtype))
    if not dtypes <= {"float32", "float64"} or len(dtypes) > 1:
        raise FileFormatError(f"{path}: {group_path} ({name}) holds arrays of {sorted(dtypes)}")
    dtype = getattr(torch, dtypes.pop()) if dtypes else torch.float64
    damping = float(group.attrs["default_damping"]) if "default_damping" in group.attrs else None
    basis = str(group.attrs["basis"]) if "basis" in group.attrs else None
    return shape, LayerSource(path, group_path, name, keys, dtype, damping, basis)


def _lazy_layer(name: str, shape: tuple[int, int], source: LayerSource) -> LayerFactors:
    return LayerFactors(name, shape, source=source)


class FactorsWriter:
    """A factors file written a layer at a time (``fit_factors(..., path=)`` writes each
    group of layers as it is fitted): opened on entry, renamed into place on a clean exit.

    Example:
        >>> with FactorsWriter("run/factors.h5", factors) as writer:   # doctest: +SKIP
        ...     for layer in factors.layers.values():
        ...         writer.add(layer)
    """

    def __init__(self, path: str | Path, header: Factors) -> None:
        self.path = Path(path)
        self.header = header
        self._context = None
        self._file = None

    def __enter__(self) -> FactorsWriter:
        self._context = atomic_h5(self.path)
        self._file = self._context.__enter__()
        h = self.header
        self._file.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "strategy": h.strategy,
                "fisher": h.fisher,
                "model_fingerprint": h.fingerprint,
                "modules": json.dumps(h.modules),
                "meta": json.dumps(h.meta),
            }
        )
        return self

    def add(self, layer: LayerFactors) -> None:
        """Write one layer (its arrays must be held or readable), in the header's order."""
        i = self.header.modules.index(layer.name)
        group = self._file.create_group(f"layers/{i:04d}")
        group.attrs["name"] = layer.name
        group.attrs["shape"] = list(layer.shape)
        for key in ARRAYS:
            value = getattr(layer, key)
            if value is not None:
                group.create_dataset(key, data=value.cpu().numpy(), fletcher32=True)
        group.attrs["default_damping"] = layer.default_damping()
        group.attrs["basis"] = layer.basis_fingerprint()
        self._file.flush()

    def __exit__(self, *exc) -> bool:
        return bool(self._context.__exit__(*exc))
