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

from . import checks, distributed
from .data import TextDataset, example_batches, length_order
from .errors import DataError, FileFormatError, ModelError, NonFiniteError, ParameterError
from .h5io import atomic_h5, open_h5, read_array
from .hooks import LayerIO, per_sequence_grads
from .lowrank import LowRank, QueryForm, as_dense, times_stack, truncate
from .models import (
    TrackedLayer,
    candidate_layers,
    check_finite_weights,
    check_sequences_fit,
    model_fingerprint,
    select_modules,
)
from .settings import RunSettings

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHERS = ("sampled", "empirical")
FORMAT = "influencekit.factors"
VERSION = 1
ARRAYS = ("q_a", "d_a", "q_s", "d_s", "lam")
BLOCK_FLOATS = 2**18  # 1 MiB of float32: a block that stays in a core's L2 cache
# Which arrays each strategy's layers must hold (a file missing one is damaged).
REQUIRED = {"ekfac": ARRAYS, "kfac": ARRAYS, "diagonal": ("lam",), "identity": ()}


@dataclass
class LayerFactors:
    """The factors of one layer, float64 on the CPU. Absent pieces are ``None``.

    ``q_a``/``q_s`` are ``None`` for ``diagonal`` and ``identity`` (the standard basis);
    ``lam`` is ``None`` for ``identity``.
    """

    name: str
    shape: tuple[int, int]  # canonical gradient shape (d_out, d_in [+1])
    q_a: torch.Tensor | None = None
    d_a: torch.Tensor | None = None
    q_s: torch.Tensor | None = None
    d_s: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    _basis_name: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _copies: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _finite: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def default_damping(self) -> float:
        """``0.1 × mean(Λ)``; 1 for ``identity`` (no curvature, plain dot product)."""
        return 1.0 if self.lam is None else 0.1 * float(self.lam.mean())

    def basis_fingerprint(self) -> str:
        """A name for this layer's eigenbasis (``Q_S``, ``Q_A``): equal for the same
        eigenvectors, ``"standard"`` without any (``diagonal``, ``identity``). Hashed once
        per pair of arrays (every score against a ``sparse`` store asks)."""
        if self.q_a is None:
            return "standard"
        key = (id(self.q_s), id(self.q_a))
        if self._basis_name is None or self._basis_name[0] != key:
            digest = hashlib.blake2b(digest_size=8)
            for q in (self.q_s, self.q_a):
                digest.update(q.to(torch.float64).contiguous().numpy().tobytes())
            self._basis_name = (key, "eig-" + digest.hexdigest())
        return self._basis_name[1]

    def check_finite(self) -> None:
        """Raise NonFiniteError naming this layer and the array holding NaN or inf. Arrays
        found finite are not scanned again until one is replaced or changed in place."""
        arrays = [(key, getattr(self, key)) for key in ARRAYS]
        state = tuple((id(x), x._version) for _, x in arrays if x is not None)
        if self._finite == state:
            return
        for key, value in arrays:
            if value is not None and not torch.isfinite(value).all():
                raise NonFiniteError(f"factors of layer {self.name}: {key} holds NaN or inf")
        self._finite = state

    def arrays_like(self, like: torch.Tensor) -> tuple:
        """``(q_s, q_a, lam)`` in ``like``'s dtype and device (``None`` where absent), converted
        once and kept for the next call on the same dtype and device."""
        key = (like.dtype, like.device, id(self.q_s), id(self.q_a), id(self.lam))
        if self._copies is None or self._copies[0] != key:
            opts = {"dtype": like.dtype, "device": like.device}
            found = (self.q_s, self.q_a, self.lam)
            self._copies = (key, *(None if x is None else x.to(**opts) for x in found))
        return self._copies[1:]

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
        self, s: torch.Tensor, a: torch.Tensor, damping: float, query_last: bool = False
    ) -> torch.Tensor:
        """``(Q_Sᵀ G Q_A) ⊘ (Λ + λ)`` for ``G = Σ_t s_t a_tᵀ``, rotating the tokens, not ``G``:
        the preconditioned gradient in the eigenbasis (the standard basis for ``diagonal``
        and ``identity``).

        ``s`` ``(Q, T, d_out)``, ``a`` ``(Q, T, d_in)``: ``T·(d_out² + d_in²)`` per query
        instead of ``d_out·d_in·(d_out + d_in)`` when a query has fewer tokens than ``d_in``.
        ``query_last``: the ``(Q, d_out, d_in)`` result lies in memory as ``(d_out, d_in, Q)``,
        every position's values for all queries side by side (what sparse codecs gather).
        """
        s, a, denom = self._rotated(s, a, damping)
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

    def _rotated(self, s: torch.Tensor, a: torch.Tensor, damping: float):
        """The token factors in the eigenbasis (:func:`rotated_tokens`) and ``Λ + λ``."""
        q_s, q_a, lam = self.arrays_like(s)
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
class Factors:
    """Fitted curvature for a set of layers of one model (identified by its fingerprint).

    Example:
        >>> factors.modules                      # doctest: +SKIP
        ['transformer.h.0.mlp.c_fc', 'transformer.h.0.mlp.c_proj']
    """

    strategy: str
    fisher: str
    layers: dict[str, LayerFactors]
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.layers)

    def damping_for(self, damping: float | Mapping[str, float] | None = None) -> dict[str, float]:
        """Per-layer damping ``{layer: λ}``: the defaults (``None``), one number for every
        layer, or a mapping naming exactly these layers; every λ a finite number > 0."""
        defaults = {name: layer.default_damping() for name, layer in self.layers.items()}
        return checks.damping(damping, list(self.layers), defaults)

    def eigenbasis(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_S, Q_A)`` of layer ``name`` with columns by decreasing eigenvalue (float64).

        The ``eig:K`` store codec keeps gradients in the leading ``K`` of these directions.
        """
        layer = self.layers[name]
        if layer.q_a is None:
            raise ParameterError(
                "factors", f"{self.strategy} factors", "ekfac or kfac factors (with eigenbases)"
            )
        by_s = torch.argsort(layer.d_s, descending=True)
        by_a = torch.argsort(layer.d_a, descending=True)
        return layer.q_s[:, by_s].contiguous(), layer.q_a[:, by_a].contiguous()

    def check_finite(self) -> None:
        """Raise NonFiniteError naming the first layer and array holding NaN or inf."""
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
        """Write an HDF5 file (atomically: a crash never leaves a half-written file)."""
        attrs = {
            "format": FORMAT,
            "version": VERSION,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "model_fingerprint": self.fingerprint,
            "modules": json.dumps(self.modules),
            "meta": json.dumps(self.meta),
        }
        with atomic_h5(path) as f:
            f.attrs.update(attrs)
            for i, (name, layer) in enumerate(self.layers.items()):
                group = f.create_group(f"layers/{i:04d}")
                group.attrs["name"] = name
                group.attrs["shape"] = list(layer.shape)
                for key in ARRAYS:
                    value = getattr(layer, key)
                    if value is not None:
                        group.create_dataset(key, data=value.numpy(), fletcher32=True)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        """Read factors written by :meth:`save`, with clear errors for any other file."""
        with open_h5(path, FORMAT, VERSION) as f:
            modules = json.loads(f.attrs["modules"])
            strategy = str(f.attrs["strategy"])
            if strategy not in REQUIRED:
                raise FileFormatError(f"{path}: unknown strategy {strategy!r}")
            layers = {}
            for i, name in enumerate(modules):
                group_path = f"layers/{i:04d}"
                if group_path not in f:
                    raise FileFormatError(f"{path}: group {group_path} ({name}) is missing")
                group = f[group_path]
                missing = [k for k in REQUIRED[strategy] if k not in group]
                if missing:
                    raise FileFormatError(f"{path}: {group_path} ({name}) lacks {missing}")
                arrays = {
                    k: torch.from_numpy(read_array(group, k, path)) for k in ARRAYS if k in group
                }
                layers[name] = LayerFactors(name, tuple(group.attrs["shape"]), **arrays)
            return cls(
                strategy=strategy,
                fisher=str(f.attrs["fisher"]),
                layers=layers,
                fingerprint=str(f.attrs["model_fingerprint"]),
                meta=json.loads(f.attrs["meta"]),
            )


def fit_factors(
    model: nn.Module,
    train: TextDataset,
    modules: str | list[str] = "mlp",
    *,
    strategy: str = "ekfac",
    fisher: str = "sampled",
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Factors:
    """Fit curvature factors for the selected layers on ``train``.

    ``fisher="sampled"`` draws labels from the model's own predictive distribution (the true
    Fisher, equal to the Gauss-Newton matrix for softmax cross-entropy), reproducible with
    ``seed``; ``"empirical"`` uses the real next tokens. ``max_examples=n`` fits on the first
    ``n`` sequences (pass ``train.subset(...)`` for a random sample). ``dtype`` is the
    accumulation dtype (``torch.float32`` or ``torch.float64``, or its name); ``amp_dtype``
    runs the forward in bf16/fp16 with accumulators in ``dtype``. ``batch_size``, ``device``
    (default: where the model is), ``amp_dtype`` and ``progress`` are the run settings
    (:class:`~influencekit.settings.RunSettings`), as for ``score`` and
    ``GradientStore.build``.

    Example:
        >>> factors = fit_factors(model, train, "mlp", fisher="sampled")  # doctest: +SKIP
    """
    checks.instance("train", train, TextDataset, "a TextDataset")
    checks.choice("strategy", strategy, STRATEGIES)
    checks.choice("fisher", fisher, FISHERS)
    seed = checks.count("seed", seed, minimum=0)
    max_examples = checks.count("max_examples", max_examples, optional=True)
    run = RunSettings(batch_size, device, dtype, amp_dtype, progress)
    layers = select_modules(model, modules)
    check_finite_weights(layers)
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    if len(train) == 0:
        raise DataError(f"training data {train.source}: the dataset is empty")
    indices = list(range(len(train) if max_examples is None else min(len(train), max_examples)))
    targets = "sampled" if fisher == "sampled" else "real"
    passes = _Passes(model, layers, train, indices, run.on(model), targets, seed)
    fitted = {layer.name: LayerFactors(layer.name, layer.grad_shape) for layer in layers}
    if strategy in ("ekfac", "kfac"):
        _fit_eigenbases(fitted, passes)
    if strategy == "kfac":
        for lf in fitted.values():
            lf.lam = torch.outer(lf.d_s, lf.d_a)
    if strategy in ("ekfac", "diagonal"):
        _fit_lambda(fitted, passes)
    meta = {"n_examples": len(indices), "seed": seed, "dataset": train.fingerprint()}
    return Factors(strategy, fisher, fitted, model_fingerprint(model), meta)


@dataclass(frozen=True)
class _Passes:
    """What both data passes of one fit share: the model, its layers, the examples, the run
    settings and the label choice."""

    model: nn.Module
    layers: list[TrackedLayer]
    train: TextDataset
    indices: list[int]
    run: RunSettings
    targets: str
    seed: int

    def captures(self, desc: str):
        """Captured (batch, layer inputs/gradients) over the fit's examples."""
        # Longest first: batches of similar length carry little padding, and a too-large batch
        # fails on the first step rather than the last. The sums do not depend on the order.
        order = length_order(self.train, self.indices)
        # Under torchrun each process takes every world-th of these batches; sums are then
        # all-reduced (see _summed).
        batches = example_batches(self.train, self.run.batch_size, order)
        return self.run.captures(
            self.model,
            self.layers,
            distributed.my_share(batches),
            desc=desc,
            total=distributed.share_count(self.run.n_batches(len(order))),
            example_ids=self.train.ids,
            targets=self.targets,
            seed=self.seed,
        )


def _summed(sums: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], run: RunSettings):
    """Every process's sums added up (a process given no batch contributes zeros)."""
    for name, shape in shapes.items():
        if name not in sums:
            sums[name] = torch.zeros(shape, dtype=run.dtype, device=run.device)
        distributed.all_sum(sums[name])
    return sums


def _accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Add into a running sum kept on the device in the accumulation dtype (no host sync)."""
    if name in sums:
        sums[name].add_(value)
    else:
        sums[name] = value.clone()


def _fit_eigenbases(fitted: dict[str, LayerFactors], passes: _Passes) -> None:
    """Pass 1: token-mean covariances A and S, then their float64 eigendecompositions."""
    a_sum: dict[str, torch.Tensor] = {}
    s_sum: dict[str, torch.Tensor] = {}
    n_tokens = 0
    for batch, io in passes.captures("covariances"):
        real = batch.attention_mask.bool()
        n_tokens += sum(batch.lengths)  # known on the host: no device sync
        for name, x in io.items():  # real tokens only: padded rows are zero, skip their work
            a, s = x.a[real], x.s[real]
            _accumulate(a_sum, name, a.T @ a)
            _accumulate(s_sum, name, s.T @ s)
    _summed(a_sum, {name: (lf.shape[1],) * 2 for name, lf in fitted.items()}, passes.run)
    _summed(s_sum, {name: (lf.shape[0],) * 2 for name, lf in fitted.items()}, passes.run)
    n_tokens = int(distributed.all_sum(torch.tensor([n_tokens], dtype=torch.int64))[0])
    # Each covariance is decomposed once, by one process: under torchrun the 2L
    # decompositions are dealt out largest first (so each rank gets a like share of the
    # O(n³) work), all computed, then sent to the others.
    rank, world = distributed.rank_and_world()
    covariances = [
        (lf, side, sums[name])
        for name, lf in fitted.items()
        for side, sums in (("a", a_sum), ("s", s_sum))
    ]
    largest_first = sorted(range(len(covariances)), key=lambda p: -covariances[p][2].shape[0])
    owner = {position: turn % world for turn, position in enumerate(largest_first)}
    # contiguous: row-major like a loaded file (fresh and loaded factors score bit-equal),
    # and what a broadcast needs
    mine = {
        position: eigh_on_device(total.double() / n_tokens)
        for position, (_, _, total) in enumerate(covariances)
        if owner[position] == rank
    }
    for position, (lf, side, total) in enumerate(covariances):
        n = total.shape[0]
        values, vectors = mine.get(position) or (
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, n, dtype=torch.float64),
        )
        distributed.broadcast(values, src=owner[position])
        distributed.broadcast(vectors, src=owner[position])
        setattr(lf, f"d_{side}", values)
        setattr(lf, f"q_{side}", vectors)


def eigh_on_device(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a float64 symmetric matrix where it lies (on a GPU, far faster
    than the host at the widths of large models), the host only if the device cannot; the
    eigenvalues and eigenvectors are returned on the host, contiguous.

    Example:
        >>> values, vectors = eigh_on_device(torch.eye(2, dtype=torch.float64))
        >>> values.tolist(), vectors.device.type
        ([1.0, 1.0], 'cpu')
    """
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except (RuntimeError, torch.cuda.OutOfMemoryError):
        if matrix.device.type == "cpu":
            raise
        values, vectors = torch.linalg.eigh(matrix.cpu())  # the device failed: the host
    return values.cpu().contiguous(), vectors.cpu().contiguous()


def _rotated_grads(x: LayerIO, real: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor):
    """``Q_Sᵀ G_z Q_A`` per sequence, rotating each real token first (cheaper than each G_z)."""
    s_rot = x.s.new_zeros(*x.s.shape[:2], q_s.shape[1])
    a_rot = x.a.new_zeros(*x.a.shape[:2], q_a.shape[1])
    s_rot[real] = x.s[real] @ q_s
    a_rot[real] = x.a[real] @ q_a
    return s_rot.transpose(1, 2) @ a_rot


def _fit_lambda(fitted: dict[str, LayerFactors], passes: _Passes) -> None:
    """Pass 2: mean over sequences of squared gradients in the eigenbasis (or standard basis)."""
    lam_sum: dict[str, torch.Tensor] = {}
    like = {"dtype": passes.run.dtype, "device": passes.run.device}
    bases = {
        name: (lf.q_s.to(**like), lf.q_a.to(**like))
        for name, lf in fitted.items()
        if lf.q_a is not None
    }
    for batch, io in passes.captures("eigenvalue correction"):
        real = batch.attention_mask.bool()
        for name, x in io.items():
            if name in bases:
                g = _rotated_grads(x, real, *bases[name])
            else:
                g = per_sequence_grads(x)
            _accumulate(lam_sum, name, g.square().sum(0))
    _summed(lam_sum, {name: tuple(lf.shape) for name, lf in fitted.items()}, passes.run)
    for name, lf in fitted.items():
        lf.lam = lam_sum[name].double().cpu() / len(passes.indices)
