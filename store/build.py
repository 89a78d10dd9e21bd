"""Building a gradient store: crash-safe, resumable, appendable, within a memory budget.

:func:`build` brings the store at ``path`` up to date with ``train``: examples whose id is
already stored are skipped, the rest are computed in parts of ``part_size`` examples, and
each part is committed on its own (part file renamed into place, then the manifest
replaced; :mod:`influencekit.store.writing`). So the same call is the first build, the
resume after a crash (kill -9 at any moment loses at most the part in flight) and the append
of new examples; an interrupted and resumed build yields the same parts, byte for byte in
their arrays, as an uninterrupted one, because parts are cut from ``train``'s order the same
way each time. Under ``torchrun`` the parts are dealt out to the processes
(:mod:`influencekit.store.shards`).

A new store without ``codec`` chooses each layer's codec on a probe of the training data
(:mod:`influencekit.store.budget`, :mod:`influencekit.store.fidelity`). ``max_memory``
bounds what the build holds: the layers are probed and encoded in groups that fit, one
capture of the data per group.

Users call it as :meth:`influencekit.GradientStore.build`, which opens the result.

Example:
    >>> build("run/grads.h5", model, train, codec="kron:32")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from influencekit import checks, distributed, memory
from influencekit.data import TextDataset, as_queries
from influencekit.errors import ParameterError
from influencekit.models import (
    TrackedLayer,
    check_finite_weights,
    check_sequences_fit,
    layers_fingerprint,
    model_fingerprint,
    select_modules,
    tokenizer_fingerprint,
)
from influencekit.progress import progress_counter
from influencekit.settings import RunSettings

from . import budget as budgets
from .codecs import CODECS, Codec, joined_specs, layer_specs, make_codec, recorded_codecs
from .fidelity import Fidelity, Probe, compare
from .layout import DTYPES, PART_BYTES, Manifest, StoreConfig, read_manifest
from .shards import build_sharded
from .writing import (
    MAX_PART_SIZE,
    Encoder,
    build_lock,
    check_unique_ids,
    commit,
    open_or_create,
    part_examples,
    pending,
    record_fidelity,
)


def build(
    path: str | os.PathLike,
    model: nn.Module,
    train: TextDataset,
    modules: str | list[str] | None = None,
    *,
    codec: str | None = None,
    budget: int | str | None = None,
    dtype: str | torch.dtype | None = None,
    fidelity: bool = True,
    fidelity_queries=None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    part_size: int | None = None,
    seed: int = 0,
    factors=None,
    progress: bool = True,
    max_memory: int | str | None = None,
    chunk_size: int | None = None,
) -> Path:
    """Compute, compress and store each training sequence's per-layer gradient at ``path``.

    What :meth:`influencekit.GradientStore.build` runs; its docstring describes the
    parameters. Every argument is checked before anything is written. Returns ``path``.
    """
    path = Path(path)
    kinds = [] if codec is None else [spec.kind for spec in _specs(codec)]  # refused early
    if dtype is not None:
        dtype = checks.storage_dtype("dtype", dtype, DTYPES)
    if budget is not None:
        budget = budgets.parse_bytes(budget)
    if codec is not None and budget is not None:
        raise ParameterError("budget", budget, "None when codec= is given (it forces one)")
    if max_memory is not None:
        memory.parse_bytes(max_memory, "max_memory")
    part_size = _part_size(part_size, chunk_size)
    seed = checks.count("seed", seed, minimum=0)
    fidelity = checks.flag("fidelity", fidelity)
    checks.instance("train", train, TextDataset, "a TextDataset")
    if factors is not None and not hasattr(factors, "layers"):
        raise ParameterError("factors", factors, "Factors (from fit_factors or Factors.load)")
    probe_queries = None if fidelity_queries is None else as_queries(fidelity_queries)
    check_unique_ids(train)
    if modules is None:  # the factors' layers: what the store will be scored with
        modules = "mlp" if factors is None else factors.modules
    layers = select_modules(model, modules)
    if codec is not None:
        layer_specs(codec, len(layers))  # one spec, or one per layer
    needing = [kind for kind in kinds if CODECS[kind].needs_factors]
    if needing and factors is None:
        raise ParameterError("factors", None, f"fitted ekfac or kfac factors for codec {codec}")
    covered = factors is not None and all(layer.name in factors.layers for layer in layers)
    if covered or needing or any(kind.startswith("sparse") for kind in kinds):
        check_factors_cover(factors, layers)
    recorded = read_manifest(path) if path.exists() else None
    if codec is None and recorded is not None:  # continuing: the store's own codec and dtype
        if budget != recorded.budget:
            raise budget_mismatch(path, recorded.budget, budget)
        codec, dtype = recorded.config.codec, dtype or recorded.config.dtype
    compute = torch.float64 if dtype == "float64" else torch.float32
    run = RunSettings(batch_size, device, compute, amp_dtype, progress)
    check_finite_weights(layers)
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    run = run.on(model)
    plan = BuildPlan(
        path, model, layers, train, run, seed=seed, max_memory=max_memory,
        factors=factors if covered else None, fidelity=fidelity, queries=probe_queries,
    )  # fmt: skip
    if codec is None and recorded is None:
        plan.check_budget(budget, dtype)  # before anything is written
    if distributed.active():  # under torchrun: a shard per process, stitched by rank 0
        build_sharded(path, train, plan, codec, budget, dtype, part_size)
        return path
    with build_lock(path):
        manifest = plan.open(codec, budget, dtype, part_size)
        codecs = plan.recorded(manifest)
        if fidelity and manifest.fidelity is None:
            record_fidelity(path, manifest, plan.measure(codecs, manifest.config.dtype))
        encoder = plan.encoder(codecs, manifest.config.dtype)
        todo = pending(path, manifest, train)
        try:
            with progress_counter(len(todo), desc="building store", enabled=run.progress) as bar:
                for lo in range(0, len(todo), manifest.part_size):
                    positions = todo[lo : lo + manifest.part_size]
                    commit(
                        path,
                        manifest,
                        part_examples(train, positions),
                        encoder.encode(train, positions),
                    )
                    bar.update(len(positions))
        finally:
            encoder.close()
    return path


# The probe's layers are taken in groups of at most this many bytes whatever the budget: its
# memory then does not grow with the model's depth, and its few sequences cost little to read
# again per group.
PROBE_MEMORY = 2**30


class BuildPlan:
    """What one build decides before it writes: the store's configuration and codecs (forced,
    chosen on the probe, or read back), their fidelity, and the groups of layers probed and
    encoded together within the memory budget. Rank 0 of a ``torchrun`` build makes the same
    decisions through it (:mod:`influencekit.store.shards`)."""

    def __init__(
        self, path, model, layers, train, run, *, seed, max_memory, factors, fidelity, queries
    ) -> None:
        self.path, self.model, self.layers, self.train, self.run = path, model, layers, train, run
        self.seed, self.factors, self.fidelity, self.queries = seed, factors, fidelity, queries
        self.limit = memory.max_memory(max_memory, run.device)
        self.fitted = {} if factors is None else {n.name: factors.layers[n.name] for n in layers}
        self.longest = max((len(ex.input_ids) for ex in train), default=1)

    def config(self, codec: str, dtype: str) -> StoreConfig:
        return StoreConfig(
            codec=codec,
            dtype=dtype,
            seed=self.seed,
            modules=[layer.name for layer in self.layers],
            shapes=[list(layer.grad_shape) for layer in self.layers],
            model_fingerprint=model_fingerprint(self.model),
            weights_fingerprint=layers_fingerprint(self.layers),
            tokenizer_fingerprint=tokenizer_fingerprint(self.train.tokenizer),
            max_length=self.train.max_length,
        )

    def open(self, codec: str | None, budget: int | None, dtype: str | None, part_size):
        """The store's manifest: continued (with ``codec``, the one it records), or created
        with a forced ``codec`` or codecs chosen within ``budget`` (the choice and its
        fidelity recorded)."""
        if codec is not None and self.path.exists():  # continued: its codecs, checked
            config = self.config(codec, dtype or "float32")
            manifest = open_or_create(self.path, config, [], part_size, self.train.tokenizer)
            for layer, recorded in zip(self.layers, self.recorded(manifest), strict=True):
                recorded.check_factors(self.fitted.get(layer.name))
            return manifest
        if codec is not None:
            config = self.config(codec, dtype or "float32")
            codecs = self.fresh(config)
            tokenizer = self.train.tokenizer
            return open_or_create(self.path, config, codecs, part_size, tokenizer, None, "codec")
        config, codecs, found = self.choose(budget, dtype)
        chosen_by = "default" if budget is None else "budget"
        tokenizer = self.train.tokenizer
        manifest = open_or_create(
            self.path, config, codecs, part_size, tokenizer, budget, chosen_by
        )
        record_fidelity(self.path, manifest, found)
        return manifest

    def fresh(self, config: StoreConfig) -> list[Codec]:
        """A new store's codecs for ``config``'s specs: random parts drawn from the seed,
        eigen-windows chosen from the factors; detached (they record, not encode)."""
        specs = layer_specs(config.codec, len(self.layers))
        return [
            self._made(spec, layer, j)
            for j, (layer, spec) in enumerate(zip(self.layers, specs, strict=True))
        ]

    def _made(self, spec, layer: TrackedLayer, j: int) -> Codec:
        fitted = self.fitted.get(layer.name)
        codec = make_codec(spec, layer.grad_shape, seed=self.seed, layer_index=j, factors=fitted)
        codec.detach()
        if fitted is not None:
            fitted.release()
        return codec

    def _shares(self, budget: int | None, dtype: str):
        """Each layer's share of the gradient bytes, the gradient bytes and the overhead."""
        shapes = [layer.grad_shape for layer in self.layers]
        caps = [budgets.exact_bytes(shape, dtype, self.longest) for shape in shapes]
        gradient = budgets.default_budget(shapes)
        shares = None
        for _ in range(2):  # the manifest's share depends on the layers' shares: settle it
            per_part = max(1, min(MAX_PART_SIZE, PART_BYTES // max(1, gradient)))
            overhead = budgets.example_overhead(self.train, shapes, per_part, shares)
            if budget is not None:
                gradient = budget - overhead
            shares = budgets.shares(max(0, gradient), caps)
        return shares, gradient, overhead

    def check_budget(self, budget: int | None, dtype: str | None) -> None:
        """Refuse a budget that leaves some layer less than its smallest codec takes."""
        dtype = dtype or budgets.BUDGET_DTYPE
        shares, gradient, overhead = self._shares(budget, dtype)
        shapes = [layer.grad_shape for layer in self.layers]
        if any(
            share < budgets.least_bytes(s, dtype) for share, s in zip(shares, shapes, strict=True)
        ):
            raise budgets.too_small(budget, gradient, overhead, shapes)

    def choose(self, budget: int | None, dtype: str | None):
        """``(config, codecs, fidelity)`` of a new store whose codecs are chosen: each
        layer's share of ``budget`` (default :func:`budget.default_budget` plus what a
        sequence takes besides its gradients) spent on each candidate, and the candidate
        with the best scores on the probe kept (:func:`budget.choose`)."""
        explicit = dtype is not None
        dtype = dtype or budgets.BUDGET_DTYPE
        shares, gradient, overhead = self._shares(budget, dtype)
        shapes = [layer.grad_shape for layer in self.layers]
        options = {}
        for j, (layer, share) in enumerate(zip(self.layers, shares, strict=True)):
            fitted = self.fitted.get(layer.name)
            found = budgets.candidates(
                share, layer.grad_shape, dtype=dtype, explicit_dtype=explicit,
                longest=self.longest, seed=self.seed, layer_index=j, factors=fitted,
            )  # fmt: skip
            if fitted is not None:
                fitted.release()
            if not found:
                raise budgets.too_small(budget, gradient, overhead, shapes)
            options[layer.name] = found
        chosen, found = self._probe_choice(options, dtype)
        codecs = [chosen[layer.name] for layer in self.layers]
        return self.config(joined_specs([c.spec for c in codecs]), dtype), codecs, found

    def _probe_choice(self, options: dict[str, list], dtype: str):
        """Each layer's codec from its candidates, and the chosen store's fidelity, both on
        the probe (one pass over it per group of layers); without a choice to make and
        ``fidelity=False``, the only candidates and no fidelity."""
        if len(self.train) == 0 or (
            not self.fidelity and all(len(o) == 1 for o in options.values())
        ):
            return {name: found[0] for name, found in options.items()}, None
        probe = self.probe(dtype)
        most = max(len(found) for found in options.values())
        scores = {}
        for group in probe.groups(most, min(self.limit, PROBE_MEMORY)):
            scores.update(probe.layer_scores({n.name: options[n.name] for n in group}, group))
        chosen, records = budgets.choose(scores, options)
        exact = sum(scores[layer.name][0] for layer in self.layers)
        approx = sum(scores[name][1][options[name].index(chosen[name])] for name in options)
        found = compare(probe, exact, approx, [records[layer.name] for layer in self.layers])
        return chosen, found

    def probe(self, dtype: str) -> Probe:
        return Probe(
            self.model, self.layers, self.train, self.run,
            dtype=dtype, factors=self.factors, queries=self.queries, seed=self.seed,
        )  # fmt: skip

    def recorded(self, manifest: Manifest) -> list[Codec]:
        """The codecs the store records (read back: a resumed build encodes as the first)."""
        cfg = manifest.config
        return recorded_codecs(cfg.codec, cfg.shapes, manifest.layer_tensors, manifest.layer_params)

    def measure(self, codecs: list[Codec], dtype: str) -> Fidelity | None:
        """The fidelity of the store's ``codecs`` on the probe."""
        if len(self.train) == 0:
            return None
        probe = self.probe(dtype)
        options = {layer.name: [codec] for layer, codec in zip(self.layers, codecs, strict=True)}
        exact = approx = 0.0
        for group in probe.groups(1, min(self.limit, PROBE_MEMORY)):
            found = probe.layer_scores({n.name: options[n.name] for n in group}, group)
            for layer_exact, (layer_approx,) in found.values():
                exact, approx = exact + layer_exact, approx + layer_approx
        return compare(probe, exact, approx)

    def encoder(self, codecs: list[Codec], dtype: str) -> Encoder:
        """An encoder of every layer's codec, in groups that fit the memory budget."""
        return Encoder(
            self.model, self.layers, codecs, self.run, dtype,
            factors=self.fitted, limit=self.limit, longest=self.longest,
        )  # fmt: skip


def check_factors_cover(factors, layers: list[TrackedLayer]) -> None:
    """Refuse factors that lack a tracked layer or hold it with another shape."""
    if factors is None:
        return
    for layer in layers:
        fitted = factors.layers.get(layer.name)
        if fitted is None:
            raise ParameterError(
                "factors", f"factors of {factors.modules}", f"factors fitted on {layer.name}"
            )
        if tuple(fitted.shape) != tuple(layer.grad_shape):
            raise ParameterError(
                "factors",
                f"{layer.name} of shape {tuple(fitted.shape)}",
                f"factors of this model ({layer.name} has shape {tuple(layer.grad_shape)})",
            )


def budget_mismatch(path: Path, recorded: int | None, given: int | None):
    """The error for continuing a store with another budget than its codecs were chosen for."""
    from influencekit.errors import MismatchError

    def said(value):
        return "none (its codec was forced, or the default)" if value is None else f"{value} bytes"

    return MismatchError(
        f"{path}: cannot continue this store, it was built differently: budget: store "
        f"{said(recorded)}, this build {said(given)}"
    )


def _specs(codec: str) -> list:
    """The specs of a ``codec`` string (one, or one per layer), refusing a bad one."""
    from .codecs import parse_codec

    if not isinstance(codec, str):
        parse_codec(codec)  # raises, naming codec
    return [parse_codec(part) for part in codec.split(",")]


def _part_size(part_size: int | None, chunk_size: int | None) -> int | None:
    """``part_size``, or the same number under its former name ``chunk_size``."""
    if chunk_size is not None:
        warnings.warn(
            "chunk_size= is now called part_size= (examples per part)", FutureWarning, stacklevel=3
        )
        if part_size is not None and part_size != chunk_size:
            raise ParameterError("chunk_size", chunk_size, "None when part_size is given")
        part_size = chunk_size
    return checks.count("part_size", part_size, optional=True)
