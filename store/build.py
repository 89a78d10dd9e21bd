"""Building a gradient store: crash-safe, resumable, appendable.

``build_store`` brings the store at ``path`` up to date with ``train``: examples whose id is
already stored are skipped, the rest are computed in chunks of ``chunk_size`` examples, and
each chunk is committed as one part (part file renamed into place, then the manifest
replaced). So the same call is the first build, the resume after a crash (kill -9 at any
moment loses at most the chunk in flight) and the append of new examples; an interrupted
and resumed build yields the same parts, byte for byte in their arrays, as an uninterrupted
one, because chunks are formed from ``train``'s order the same way each time.

Example:
    >>> store = build_store("run/grads.h5", model, train, codec="kron:32")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influencekit import distributed
from influencekit.data import TextDataset, check_batch_size, example_batches, length_order
from influencekit.errors import (
    DataError,
    FileFormatError,
    MismatchError,
    NonFiniteError,
    StoreWriteError,
)
from influencekit.hooks import capture_batches
from influencekit.models import (
    TrackedLayer,
    check_finite_weights,
    check_sequences_fit,
    layers_fingerprint,
    model_fingerprint,
    resolve_device,
    select_modules,
    tokenizer_fingerprint,
)
from influencekit.progress import progress_counter

from .codecs import DEFAULT_CODEC, make_codec, parse_codec
from .layout import (
    DTYPES,
    PART_BYTES,
    Manifest,
    PartExamples,
    StoreConfig,
    part_name,
    parts_dir,
    read_manifest,
    tokenizer_files,
    write_manifest,
    write_part,
)
from .reader import GradientStore

MAX_CHUNK = 4096


def build_store(
    path: str | os.PathLike,
    model: nn.Module,
    train: TextDataset,
    *,
    modules: str | list[str] = "mlp",
    codec: str = DEFAULT_CODEC,
    dtype: str = "float32",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    factors=None,
    progress: bool = True,
) -> GradientStore:
    """Compute, compress and store each training sequence's per-layer gradient.

    ``codec``: ``dense``, ``kron:K``, ``lowrank:R`` or ``eig:K`` (needs ``factors``).
    ``dtype``: ``float16``, ``float32`` or ``float64`` on disk (computation is float32, or
    float64 for a float64 store). ``chunk_size``: examples per commit (default: about 64 MiB
    of gradients). ``seed`` draws the ``kron`` projections.

    An existing store at ``path`` is continued: it must have been built with the same model,
    tokenizer, modules, max_length, codec, dtype and seed, or :class:`MismatchError` says
    what differs. Examples already stored (same id) are skipped; an id stored with other
    tokens is refused.

    Under ``torchrun`` (a process group of more than one process), every rank calls it with
    the same arguments: each builds a shard of the pending examples and rank 0 stitches
    them into this one store, the same as a single process would build
    (:mod:`influencekit.store.shards`); every rank returns it.

    Example:
        >>> store = build_store("run/grads.h5", model, train, codec="kron:32")  # doctest: +SKIP
    """
    path = Path(path)
    spec = parse_codec(codec)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_batch_size(batch_size)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if not isinstance(train, TextDataset):
        raise TypeError(f"train must be a TextDataset, got {type(train).__name__}")
    _check_unique_ids(train)  # before anything is written
    layers = select_modules(model, modules)
    check_finite_weights(layers)
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    device = resolve_device(model, device)
    config = StoreConfig(
        codec=str(spec),
        dtype=dtype,
        seed=int(seed),
        modules=[layer.name for layer in layers],
        shapes=[list(layer.grad_shape) for layer in layers],
        model_fingerprint=model_fingerprint(model),
        weights_fingerprint=layers_fingerprint(layers),
        tokenizer_fingerprint=tokenizer_fingerprint(train.tokenizer),
        max_length=train.max_length,
    )
    if distributed.active():  # under torchrun: a shard per process, stitched by rank 0
        from .shards import build_sharded

        return build_sharded(
            path,
            model,
            train,
            config=config,
            spec=spec,
            layers=layers,
            chunk_size=chunk_size,
            factors=factors,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
            progress=progress,
        )
    with _build_lock(path):
        _open_or_create(path, config, spec, layers, chunk_size, factors, train.tokenizer)
        store = GradientStore.open(path)  # its codecs hold the recorded projections, not redrawn
        compute = torch.float64 if dtype == "float64" else torch.float32
        encoder = _Encoder(model, layers, store.codecs, batch_size, device, compute, amp_dtype)
        _write_chunks(path, store.manifest, encoder, train, _pending(store, train), progress)
    return GradientStore.open(path)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One builder per store at a time; the kernel drops the lock if the builder dies."""
    folder = parts_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreWriteError(
                f"{path}: another process is building this store right now"
            ) from None
        yield


def _open_or_create(path, config, spec, layers, chunk_size, factors, tokenizer) -> None:
    """Check the committed manifest against ``config``, or write a new empty one."""
    folder = parts_dir(path)
    if path.exists():
        manifest = read_manifest(path)
        diffs = manifest.config.differences(config, "store", "this build")
        if chunk_size is not None and chunk_size != manifest.chunk_size:
            diffs.append(f"chunk_size: store {manifest.chunk_size}, this build {chunk_size}")
        if diffs:
            raise MismatchError(
                f"{path}: cannot continue this store, it was built differently: " + "; ".join(diffs)
            )
    else:
        leftovers = sorted(p.name for p in folder.glob("part-*.h5"))
        if leftovers:
            raise FileFormatError(
                f"{folder} holds parts ({', '.join(leftovers[:3])}, ...) but {path}, which "
                f"names the committed ones, is missing: remove {folder} to start afresh"
            )
        manifest = _new_manifest(config, spec, layers, chunk_size, factors)
        manifest.tokenizer_files = tokenizer_files(tokenizer)
        try:
            write_manifest(path, manifest)
        except OSError as err:
            raise StoreWriteError(f"{path}: cannot create the store ({err})") from err
    _remove_uncommitted(path, len(manifest.part_counts))


def _new_manifest(config, spec, layers: list[TrackedLayer], chunk_size, factors) -> Manifest:
    codecs = []
    for index, layer in enumerate(layers):
        basis = None
        if spec.kind == "eig":
            if factors is None:
                raise ValueError("codec eig:K needs fitted factors at build time: pass factors=")
            basis = factors.eigenbasis(layer.name)
        codecs.append(
            make_codec(
                spec, layer.grad_shape, seed=config.seed, layer_index=index, eigenbasis=basis
            )
        )
    per_example = (
        sum(int(np.prod(s)) for c in codecs for s in c.arrays().values())
        * np.dtype(config.dtype).itemsize
    )
    if chunk_size is None:
        chunk_size = max(1, min(MAX_CHUNK, PART_BYTES // max(1, per_example)))
    tensors = [{k: v.to(torch.float64).contiguous() for k, v in c.tensors.items()} for c in codecs]
    return Manifest(
        config, uuidlib.uuid4().hex, int(chunk_size), [c.params for c in codecs], tensors, []
    )


def _remove_uncommitted(path: Path, n_committed: int) -> None:
    """Delete parts past the committed ones (a crash between rename and manifest) and temp files."""
    for item in path.parent.glob(f".{path.name}.tmp-*"):  # a manifest write cut short
        item.unlink(missing_ok=True)
    folder = parts_dir(path)
    for item in folder.iterdir():
        name = item.name
        if name.startswith(".part-") and ".tmp-" in name:
            item.unlink(missing_ok=True)
        elif name.startswith("part-") and name.endswith(".h5") and name >= part_name(n_committed):
            item.unlink(missing_ok=True)


def _pending(store: GradientStore, train: TextDataset) -> list[int]:
    """Positions in ``train`` not yet stored, in order; refuses ids stored with other tokens.

    Stored examples are read part by part and kept as one digest each, so a resume over a
    large store holds no copy of its token ids.
    """
    if train.max_length != store.config.max_length:
        raise MismatchError(
            f"{store.path}: max_length: store {store.config.max_length}, dataset {train.max_length}"
        )
    digest_of = {
        id_: _tokens_digest(ids)
        for part in store.parts_examples()
        for id_, ids in zip(part.ids, part.input_ids, strict=True)
    }
    pending = []
    for position, ex in enumerate(train):
        if ex.id not in digest_of:
            pending.append(position)
        elif _tokens_digest(ex.input_ids) != digest_of[ex.id]:
            raise MismatchError(
                f"{store.path}: example id {ex.id!r} is already stored with different tokens"
            )
    return pending


def _tokens_digest(ids) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def _check_unique_ids(train: TextDataset) -> None:
    seen = set()
    for ex in train:
        if ex.id in seen:
            raise DataError(f"{train.source}: id {ex.id!r} appears twice; store ids must be unique")
        seen.add(ex.id)


@dataclass(frozen=True)
class _Encoder:
    """What every chunk of one build shares: the model, its tracked layers and their codecs."""

    model: nn.Module
    layers: list[TrackedLayer]
    codecs: list
    batch_size: int
    device: torch.device
    compute: torch.dtype  # float32, or float64 for a float64 store
    amp_dtype: torch.dtype | None

    def encode(self, train: TextDataset, chunk: list[int]) -> list[dict[str, np.ndarray]]:
        """Each layer's stored arrays for the examples ``chunk`` (rows in ``chunk`` order)."""
        row_of = {index: row for row, index in enumerate(chunk)}
        out: list[dict] = [{} for _ in self.codecs]
        order = length_order(train, chunk)  # longest first: little padding per batch
        batches = example_batches(train, self.batch_size, order)
        for batch, io in capture_batches(
            self.model,
            self.layers,
            batches,
            device=self.device,
            progress=False,
            example_ids=train.ids,
            dtype=self.compute,
            amp_dtype=self.amp_dtype,
        ):
            rows = [row_of[i] for i in batch.indices]
            for layer, codec, dest in zip(self.layers, self.codecs, out, strict=True):
                x = io[layer.name]
                for key, value in codec.encode(x.a, x.s).items():
                    if key not in dest:
                        dest[key] = np.zeros((len(chunk), *value.shape[1:]), _numpy(self.compute))
                    dest[key][rows] = value.cpu().numpy()
        return out


def _write_chunks(path, manifest, encoder: _Encoder, train, pending, progress) -> None:
    """Encode and commit ``pending`` (positions in ``train``) chunk by chunk."""
    step = manifest.chunk_size
    with progress_counter(len(pending), desc="building store", enabled=progress) as bar:
        for lo in range(0, len(pending), step):
            chunk = pending[lo : lo + step]
            examples = PartExamples(
                [train[i].id for i in chunk],
                [train[i].text for i in chunk],
                [dict(train[i].metadata) for i in chunk],
                [list(train[i].input_ids) for i in chunk],
            )
            _commit(path, manifest, examples, encoder.encode(train, chunk))
            bar.update(len(chunk))


def _numpy(compute: torch.dtype):
    return np.float64 if compute == torch.float64 else np.float32


def _commit(
    path: Path,
    manifest: Manifest,
    examples: PartExamples,
    arrays,
    *,
    number: int | None = None,
    first: int | None = None,
) -> None:
    """Write one part, then the manifest naming it: the only two steps that change the store.

    The part file is the store's next one; its header names it part ``number`` starting at
    example ``first`` (by default its place in this store). A shard of a multi-process build
    passes the part's place in the main store instead, where it will be linked.
    """
    local = len(manifest.part_counts)
    on_disk = np.dtype(manifest.config.dtype)
    arrays = [{k: v.astype(on_disk, copy=False) for k, v in layer.items()} for layer in arrays]
    _check_representable(arrays, manifest, examples)
    try:
        write_part(
            parts_dir(path) / part_name(local),
            uuid=manifest.uuid,
            number=local if number is None else number,
            first=manifest.n_examples if first is None else first,
            examples=examples,
            arrays=arrays,
            max_length=manifest.config.max_length,
        )
        manifest.part_counts.append(len(examples.ids))
        try:
            write_manifest(path, manifest)
        except BaseException:
            manifest.part_counts.pop()
            raise
    except (OSError, RuntimeError) as err:
        raise StoreWriteError(
            f"{path}: writing part {local} failed ({err}); it keeps its "
            f"{manifest.n_examples} committed examples. Free space (or fix the cause) and run "
            "the same build again to resume."
        ) from err


def _check_representable(arrays, manifest: Manifest, examples: PartExamples) -> None:
    """Refuse to store inf (a float16 overflow): no non-finite value enters a store."""
    for name, layer in zip(manifest.config.modules, arrays, strict=True):
        for key, value in layer.items():
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            if bad.any():
                example = examples.ids[int(np.argmax(bad))]
                raise NonFiniteError(
                    f"layer {name}: stored gradient {key!r} of example {example!r} is not "
                    f"finite in {manifest.config.dtype}; build with dtype='float32'"
                )
