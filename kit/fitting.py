"""Fitting curvature factors from data: two passes over the fit set per group of layers.

Pass 1 sums each layer's token covariances ``A`` and ``S``; each is then eigendecomposed in
float64, one matrix at a time, and kept in the fit's dtype (float32 by default). Pass 2
sums the squared per-sequence gradients in that eigenbasis (``Λ``). docs/math.md has the
definitions; :mod:`influencekit.factors` holds what is fitted and its file.

Memory: ``max_memory`` (default a share of the free memory, :mod:`influencekit.memory`)
bounds what a fit holds. The layers are planned into consecutive groups, each fitted in its
own two passes, so that one group's accumulators and captured activations fit; the fitted
layers stay in memory, or with ``path=`` are written there group by group and read back
lazily, which is what factors larger than memory (an 8B model's) need.

Example:
    >>> factors = fit_factors(model, train, "mlp", max_memory="8GiB", path="run/f.h5")
    ... # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from . import checks, distributed, memory
from .data import TextDataset, example_batches, length_order
from .errors import DataError, ParameterError
from .factors import FISHERS, STRATEGIES, Factors, FactorsWriter, LayerFactors
from .hooks import LayerIO
from .models import (
    TrackedLayer,
    check_finite_weights,
    check_sequences_fit,
    model_fingerprint,
    select_modules,
)
from .settings import RunSettings

ROTATE_BYTES = 64 * 2**20  # pass 2 forms at most this many bytes of per-sequence gradients
CAPTURE_COPIES = 4  # a layer's captured a and s, and the copies a pass makes of them


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
    max_memory: int | str | None = None,
    path: str | Path | None = None,
) -> Factors:
    """Fit curvature factors for the selected layers on ``train``.

    ``fisher="sampled"`` draws labels from the model's own predictive distribution (the true
    Fisher, equal to the Gauss-Newton matrix for softmax cross-entropy), reproducible with
    ``seed``; ``"empirical"`` uses the real next tokens. ``max_examples=n`` fits on the first
    ``n`` sequences (pass ``train.subset(...)`` for a random sample). ``dtype`` is the
    accumulation dtype and the dtype the factors are kept in (``torch.float32``, the
    default, or ``torch.float64``, or its name); each covariance is eigendecomposed in
    float64 whatever it is. ``amp_dtype`` runs the forward in bf16/fp16 with accumulators
    in ``dtype``. ``batch_size``, ``device`` (default: where the model is), ``amp_dtype``
    and ``progress`` are the run settings (:class:`~influencekit.settings.RunSettings`), as
    for ``score`` and ``GradientStore.build``.

    ``max_memory``: bytes (or ``"8GiB"``) the fit may hold on its device; default half the
    memory free there. Layers are fitted in groups that fit, two passes over the data each
    (one group, two passes, when everything fits). ``path``: write the factors to this file
    as each group is fitted, and return them reading from it a layer at a time; needed
    when the factors themselves do not fit in ``max_memory`` (the error says so).

    Example:
        >>> factors = fit_factors(model, train, "mlp", fisher="sampled")  # doctest: +SKIP
    """
    checks.instance("train", train, TextDataset, "a TextDataset")
    checks.choice("strategy", strategy, STRATEGIES)
    checks.choice("fisher", fisher, FISHERS)
    seed = checks.count("seed", seed, minimum=0)
    max_examples = checks.count("max_examples", max_examples, optional=True)
    if max_memory is not None:
        memory.parse_bytes(max_memory, "max_memory")
    if path is not None and not isinstance(path, (str, Path)):
        raise ParameterError("path", path, "None or a file path (str or pathlib.Path)")
    run = RunSettings(batch_size, device, dtype, amp_dtype, progress)
    layers = select_modules(model, modules)
    check_finite_weights(layers)
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    if len(train) == 0:
        raise DataError(f"training data {train.source}: the dataset is empty")
    indices = list(range(len(train) if max_examples is None else min(len(train), max_examples)))
    targets = "sampled" if fisher == "sampled" else "real"
    run = run.on(model)
    longest = max(len(train[i].input_ids) for i in indices)
    plan, run = fit_plan(model, layers, strategy, run, longest, max_memory, keep=path is None)
    meta = {"n_examples": len(indices), "seed": seed, "dataset": train.fingerprint()}
    fitted = {layer.name: LayerFactors(layer.name, layer.grad_shape) for layer in layers}
    factors = Factors(strategy, fisher, fitted, model_fingerprint(model), meta)
    writer = None
    if path is not None and distributed.is_main():
        writer = FactorsWriter(path, factors).__enter__()
    try:
        for group in plan.groups:
            chosen = [layers[j] for j in group]
            passes = _Passes(model, chosen, train, indices, run, targets, seed)
            _fit_group({layer.name: fitted[layer.name] for layer in chosen}, strategy, passes)
            if path is not None:
                for layer in chosen:
                    if writer is not None:
                        writer.add(fitted[layer.name])
                    fitted[layer.name] = LayerFactors(layer.name, layer.grad_shape)  # freed
    except BaseException as err:
        if writer is not None:
            writer.__exit__(type(err), err, err.__traceback__)
        raise
    if path is None:
        return factors
    if writer is not None:
        writer.__exit__(None, None, None)
    distributed.barrier()  # every process reads the file rank 0 wrote
    return Factors.load(path)


def fit_plan(
    model: nn.Module,
    layers: list[TrackedLayer],
    strategy: str,
    run: RunSettings,
    longest: int,
    max_memory: int | str | None,
    *,
    keep: bool,
) -> tuple[memory.Plan, RunSettings]:
    """The groups of ``layers`` a fit takes in turn under ``max_memory``, and the run
    settings it takes them with.

    Per layer: its accumulators, which become its factors (``A`` and ``S``, then ``Q_A``,
    ``Q_S`` and ``Λ``), and its captured activations for a batch. Fixed: the model's own
    activations for a batch and one float64 eigendecomposition of the largest covariance.
    With ``keep`` (no ``path``) every fitted layer stays in memory, so all of them count.

    Each group costs two passes over the data, and a smaller batch leaves more room for
    layers: of ``run``'s batch size and its halvings down to one sequence, the fit takes the
    one whose plan has the fewest layers over the budget, then the fewest groups, then the
    least memory over the budget, then the largest batch. The covariances are sums over
    tokens, so the batch changes their rounding only.
    """
    budget = memory.max_memory(max_memory, run.device)
    sizes = [run.batch_size]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    plans = []
    for size in sizes:
        at = run.replace(batch_size=size)
        plan = _plan_at(model, layers, strategy, at, longest, budget, keep)
        if plan is not None:
            excess = max(0, plan.peak - budget)
            plans.append((len(plan.over), len(plan.groups), excess, -size, plan, at))
    if not plans:
        item = torch.empty(0, dtype=run.dtype).element_size()
        held = sum(item * factor_size(layer.grad_shape, strategy) for layer in layers)
        raise ParameterError(
            "path",
            None,
            f"a file to write the factors to: the {len(layers)} layers' factors take "
            f"{memory.describe(held)}, more than max_memory ({memory.describe(budget)}) "
            "leaves after the fit's working memory; with path= each group of layers is "
            "written there as it is fitted and read back when needed",
        )
    *_, plan, run = min(plans, key=lambda found: found[:4])
    plan.warn_if_over("fit_factors")
    return plan, run


def _plan_at(model, layers, strategy, run, longest, budget, keep) -> memory.Plan | None:
    """:func:`fit_plan` at ``run``'s batch size; None where ``keep`` and the fitted factors
    do not fit beside the fixed part on the host."""
    item = torch.empty(0, dtype=run.dtype).element_size()
    held = [item * factor_size(layer.grad_shape, strategy) for layer in layers]
    capture = [
        CAPTURE_COPIES * item * run.batch_size * longest * sum(layer.grad_shape) for layer in layers
    ]
    widest = max(max(layer.grad_shape) for layer in layers) if strategy in ("ekfac", "kfac") else 0
    fixed = memory.activation_bytes(model, run.batch_size, longest) + 20 * widest**2
    fixed += ROTATE_BYTES if strategy in ("ekfac", "diagonal") else 0
    if not keep:
        return memory.Plan([h + c for h, c in zip(held, capture, strict=True)], fixed, budget)
    if run.device.type == "cpu":  # the fitted factors share the budget with the work
        if fixed + sum(held) > budget:
            return None
        return memory.Plan(capture, fixed + sum(held), budget)
    return memory.Plan([h + c for h, c in zip(held, capture, strict=True)], fixed, budget)


def factor_size(shape: tuple[int, int], strategy: str) -> int:
    """Numbers a layer's factors hold: ``Q_A``, ``D_A``, ``Q_S``, ``D_S`` and ``Λ`` for
    ``ekfac`` and ``kfac``, ``Λ`` for ``diagonal``, nothing for ``identity``.

    Example:
        >>> factor_size((3, 2), "ekfac"), factor_size((3, 2), "diagonal")
        (24, 6)
    """
    d_out, d_in = shape
    if strategy in ("ekfac", "kfac"):
        return d_in * d_in + d_in + d_out * d_out + d_out + d_out * d_in
    return d_out * d_in if strategy == "diagonal" else 0


def _fit_group(fitted: dict[str, LayerFactors], strategy: str, passes: _Passes) -> None:
    """Fill ``fitted`` (one group's layers) with ``strategy``'s arrays, in the fit's dtype."""
    if strategy in ("ekfac", "kfac"):
        _fit_eigenbases(fitted, passes)
    if strategy == "kfac":
        for lf in fitted.values():
            lf.lam = torch.outer(lf.d_s, lf.d_a)
    if strategy in ("ekfac", "diagonal"):
        _fit_lambda(fitted, passes)


@dataclass(frozen=True)
class _Passes:
    """What both data passes of one group share: the model, the group's layers, the
    examples, the run settings and the label choice."""

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
    """Pass 1: token-mean covariances A and S, then their float64 eigendecompositions, one
    at a time, each accumulator freed as its eigenvectors (in the fit's dtype) replace it."""
    sums: dict[tuple[str, str], torch.Tensor] = {}
    n_tokens = 0
    for batch, io in passes.captures("covariances"):
        real = batch.attention_mask.bool()
        n_tokens += sum(batch.lengths)  # known on the host: no device sync
        for name, x in io.items():  # real tokens only: padded rows are zero, skip their work
            a, s = x.a[real], x.s[real]
            _accumulate(sums, (name, "a"), a.T @ a)
            _accumulate(sums, (name, "s"), s.T @ s)
    shapes = {
        (name, side): (lf.shape[1 if side == "a" else 0],) * 2
        for name, lf in fitted.items()
        for side in ("a", "s")
    }
    _summed(sums, shapes, passes.run)
    n_tokens = int(distributed.all_sum(torch.tensor([n_tokens], dtype=torch.int64))[0])
    # Each covariance is decomposed once, by one process: under torchrun the 2L
    # decompositions are dealt out largest first (so each rank gets a like share of the
    # O(n³) work), all computed, then sent to the others.
    rank, world = distributed.rank_and_world()
    keys = sorted(shapes, key=lambda key: -shapes[key][0])  # largest first
    owner = {key: turn % world for turn, key in enumerate(keys)}
    for key in keys:
        name, side = key
        total = sums.pop(key)
        n = total.shape[0]
        if owner[key] == rank:
            values, vectors = eigh_on_device(total.double() / n_tokens, overwrite=True)
        else:
            values = torch.zeros(n, dtype=torch.float64)
            vectors = torch.zeros(n, n, dtype=torch.float64)
        del total
        distributed.broadcast(values, src=owner[key])
        distributed.broadcast(vectors, src=owner[key])
        # contiguous: row-major like a loaded file (fresh and loaded factors score bit-equal)
        setattr(fitted[name], f"d_{side}", values.to(passes.run.dtype).contiguous())
        setattr(fitted[name], f"q_{side}", vectors.to(passes.run.dtype).contiguous())
        del values, vectors


def eigh_on_device(
    matrix: torch.Tensor, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigendecomposition of a float64 symmetric matrix where it lies, returned on the
    host, contiguous, eigenvalues ascending.

    On a GPU ``torch.linalg.eigh`` (far faster than the host at the widths of large models;
    the host only if the device cannot). On the host LAPACK's ``dsyevr`` through SciPy: its
    workspace is O(n), where ``torch.linalg.eigh``'s divide and conquer takes 2n² more
    doubles, 1 GiB at n = 8192. ``overwrite``: the host may use ``matrix``'s memory as its
    workspace (its values are then lost), saving a copy of it.

    Example:
        >>> values, vectors = eigh_on_device(torch.eye(2, dtype=torch.float64))
        >>> values.tolist(), vectors.device.type
        ([1.0, 1.0], 'cpu')
    """
    if matrix.device.type != "cpu":
        try:
            values, vectors = torch.linalg.eigh(matrix)
            return values.cpu().contiguous(), vectors.cpu().contiguous()
        except (RuntimeError, torch.cuda.OutOfMemoryError):
            matrix = matrix.cpu()  # the device failed: the host
    array = matrix.contiguous().numpy() if overwrite else matrix.numpy().copy()
    values, vectors = scipy.linalg.eigh(array, driver="evr", overwrite_a=True, check_finite=False)
    return torch.from_numpy(values), torch.from_numpy(np.ascontiguousarray(vectors))


def _rotated_squares(x: LayerIO, real: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor):
    """``Σ_z (Q_Sᵀ G_z Q_A)^∘2`` over the batch's sequences, rotating each real token first
    (cheaper than each G_z), and forming at most ``ROTATE_BYTES`` of ``G_z`` at a time."""
    s_rot = x.s.new_zeros(*x.s.shape[:2], q_s.shape[1])
    a_rot = x.a.new_zeros(*x.a.shape[:2], q_a.shape[1])
    s_rot[real] = x.s[real] @ q_s
    a_rot[real] = x.a[real] @ q_a
    return _squares(s_rot, a_rot)


def _squares(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Σ_z (s_zᵀ a_z)^∘2`` over a batch of token factors, a few sequences at a time."""
    per_sequence = s.shape[-1] * a.shape[-1] * s.element_size()
    step = max(1, ROTATE_BYTES // per_sequence)
    total = None
    for lo in range(0, s.shape[0], step):
        part = (s[lo : lo + step].transpose(1, 2) @ a[lo : lo + step]).square_().sum(0)
        total = part if total is None else total.add_(part)
    return total


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
                squares = _rotated_squares(x, real, *bases[name])
            else:
                squares = _squares(x.s, x.a)
            _accumulate(lam_sum, name, squares)
    del bases
    _summed(lam_sum, {name: tuple(lf.shape) for name, lf in fitted.items()}, passes.run)
    for name, lf in fitted.items():
        total = lam_sum.pop(name)
        lf.lam = (total.double() / len(passes.indices)).to(passes.run.dtype).cpu()
        del total
