"""Building a gradient store: crash-safe, resumable, appendable.

:func:`build` brings the store at ``path`` up to date with ``train``: examples whose id is
already stored are skipped, the rest are computed in parts of ``part_size`` examples, and
each part is committed on its own (part file renamed into place, then the manifest
replaced; :mod:`influencekit.store.writing`). So the same call is the first build, the
resume after a crash (kill -9 at any moment loses at most the part in flight) and the append
of new examples; an interrupted and resumed build yields the same parts, byte for byte in
their arrays, as an uninterrupted one, because parts are cut from ``train``'s order the same
way each time. Under ``torchrun`` the parts are dealt out to the processes
(:mod:`influencekit.store.shards`).

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

from influencekit import checks, distributed
from influencekit.data import TextDataset, as_queries
from influencekit.errors import ParameterError
from influencekit.models import (
    check_finite_weights,
    check_sequences_fit,
    layers_fingerprint,
    model_fingerprint,
    select_modules,
    tokenizer_fingerprint,
)
from influencekit.progress import progress_counter
from influencekit.settings import RunSettings

from .budget import choose_codec, parse_bytes
from .codecs import Basis, new_codecs, parse_codec, recorded_codecs
from .fidelity import measure as measure_fidelity
from .layout import DTYPES, Manifest, StoreConfig, read_manifest
from .shards import build_sharded
from .writing import (
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
    chunk_size: int | None = None,
) -> Path:
    """Compute, compress and store each training sequence's per-layer gradient at ``path``.

    What :meth:`influencekit.GradientStore.build` runs; its docstring describes the
    parameters. Every argument is checked before anything is written. Returns ``path``.
    """
    path = Path(path)
    if codec is not None:
        parse_codec(codec)  # a bad string is refused before anything else is looked at
    if dtype is not None:
        dtype = checks.storage_dtype("dtype", dtype, DTYPES)
    if budget is not None:
        parse_bytes(budget)
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
    shapes = [tuple(layer.grad_shape) for layer in layers]
    covered = factors is not None and all(layer.name in factors.layers for layer in layers)
    if codec is None and budget is None and path.exists():  # continuing: the store's codec
        recorded = read_manifest(path).config
        codec, dtype = recorded.codec, dtype or recorded.dtype
    spec, dtype = choose_codec(codec, budget, dtype, shapes, sparse=covered)
    if spec.kind == "eig" and not callable(getattr(factors, "eigenbasis", None)):
        raise ParameterError("factors", factors, f"fitted ekfac or kfac factors for codec {spec}")
    compute = torch.float64 if dtype == "float64" else torch.float32
    run = RunSettings(batch_size, device, compute, amp_dtype, progress)
    check_finite_weights(layers)
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    if spec.kind in ("eig", "sparse", "sparse8"):
        check_factors_cover(factors, layers)
    eigenbases = (
        [factors.eigenbasis(layer.name) for layer in layers] if spec.kind == "eig" else None
    )
    bases = sparse_bases(factors, layers) if spec.kind in ("sparse", "sparse8") else None
    config = StoreConfig(
        codec=str(spec),
        dtype=dtype,
        seed=seed,
        modules=[layer.name for layer in layers],
        shapes=[list(layer.grad_shape) for layer in layers],
        model_fingerprint=model_fingerprint(model),
        weights_fingerprint=layers_fingerprint(layers),
        tokenizer_fingerprint=tokenizer_fingerprint(train.tokenizer),
        max_length=train.max_length,
    )
    run = run.on(model)

    def probe(manifest: Manifest, codecs: list) -> None:
        """Measure and record the codec's fidelity once, when the store has none yet."""
        if fidelity and manifest.fidelity is None:
            found = measure_fidelity(
                model, layers, codecs, train, run,
                dtype=dtype, factors=factors if covered else None, queries=probe_queries,
                seed=seed,
            )  # fmt: skip
            record_fidelity(path, manifest, found)

    if distributed.active():  # under torchrun: a shard per process, stitched by rank 0
        curvature = (eigenbases, bases)
        build_sharded(path, model, train, config, layers, curvature, part_size, run, probe)
        return path
    with build_lock(path):
        fresh = new_codecs(spec, config.shapes, seed=seed, eigenbases=eigenbases, bases=bases)
        manifest = open_or_create(path, config, fresh, part_size, train.tokenizer)
        # the recorded codec arrays, not fresh draws: a resumed build encodes as the first did
        codecs = recorded_codecs(
            config.codec, config.shapes, manifest.layer_tensors, manifest.layer_params, bases
        )
        probe(manifest, codecs)
        encoder = Encoder(model, layers, codecs, run, dtype)
        todo = pending(path, manifest, train)
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
    return path


def check_factors_cover(factors, layers: list) -> None:
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


def sparse_bases(factors, layers: list) -> list[Basis]:
    """Each layer's eigenbasis and whitening ``1 / (Λ + λ)`` (default damping) from fitted
    factors, for ``sparse``; the standard basis and plain magnitudes without factors."""
    if factors is None:
        return [Basis() for _ in layers]
    out = []
    for layer in layers:
        fitted = factors.layers[layer.name]
        damping = fitted.default_damping()
        weight = None if fitted.lam is None else 1.0 / (fitted.lam + damping)
        out.append(Basis(fitted.basis_fingerprint(), fitted.q_s, fitted.q_a, weight, damping))
    return out


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
