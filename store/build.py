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
from influencekit.data import TextDataset
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

from .codecs import DEFAULT_CODEC, new_codecs, parse_codec, recorded_codecs
from .layout import DTYPES, StoreConfig
from .shards import build_sharded
from .writing import (
    Encoder,
    build_lock,
    check_unique_ids,
    commit,
    open_or_create,
    part_examples,
    pending,
)


def build(
    path: str | os.PathLike,
    model: nn.Module,
    train: TextDataset,
    modules: str | list[str] = "mlp",
    *,
    codec: str = DEFAULT_CODEC,
    dtype: str | torch.dtype = "float32",
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
    spec = parse_codec(codec)
    dtype = checks.storage_dtype("dtype", dtype, DTYPES)
    part_size = _part_size(part_size, chunk_size)
    seed = checks.count("seed", seed, minimum=0)
    checks.instance("train", train, TextDataset, "a TextDataset")
    if spec.kind == "eig" and not callable(getattr(factors, "eigenbasis", None)):
        raise ParameterError("factors", factors, f"fitted ekfac or kfac factors for codec {spec}")
    compute = torch.float64 if dtype == "float64" else torch.float32
    run = RunSettings(batch_size, device, compute, amp_dtype, progress)
    check_unique_ids(train)
    layers = select_modules(model, modules)
    check_finite_weights(layers)
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    eigenbases = (
        [factors.eigenbasis(layer.name) for layer in layers] if spec.kind == "eig" else None
    )
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
    if distributed.active():  # under torchrun: a shard per process, stitched by rank 0
        build_sharded(path, model, train, config, layers, eigenbases, part_size, run)
        return path
    with build_lock(path):
        fresh = new_codecs(spec, config.shapes, seed=seed, eigenbases=eigenbases)
        manifest = open_or_create(path, config, fresh, part_size, train.tokenizer)
        # the recorded codec arrays, not fresh draws: a resumed build encodes as the first did
        codecs = recorded_codecs(config.codec, config.shapes, manifest.layer_tensors)
        encoder = Encoder(model, layers, codecs, run)
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
