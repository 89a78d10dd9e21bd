"""Writing a gradient store: the steps every build takes, in one process or as a shard.

- :func:`build_lock`: one builder per store at a time (the kernel drops it if the builder dies);
- :func:`open_or_create`: the committed manifest, checked against this build's configuration,
  or a new empty store with its codec arrays drawn once and recorded;
- :func:`pending`: the training positions not yet stored (an id stored with other tokens is
  refused);
- :class:`Encoder`: each layer's stored arrays for a list of examples (capture, then codecs);
- :func:`commit`: write one part, then the manifest naming it, the only two steps that change
  a store, so a crash at any moment leaves the previous committed state.

:mod:`influencekit.store.build` (one process) and :mod:`influencekit.store.shards`
(``torchrun``) are made of these steps; neither reads the store through
:class:`~influencekit.store.GradientStore`.

Example:
    >>> tokens_digest([464, 3290]) == tokens_digest((464, 3290))
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influencekit import memory
from influencekit.data import TextDataset, example_batches, length_order
from influencekit.errors import (
    DataError,
    FileFormatError,
    MismatchError,
    NonFiniteError,
    StoreWriteError,
)
from influencekit.models import TrackedLayer
from influencekit.settings import RunSettings

from .layout import (
    PART_BYTES,
    Manifest,
    PartExamples,
    StoreConfig,
    part_name,
    parts_dir,
    read_manifest,
    read_part_examples,
    tokenizer_files,
    write_manifest,
    write_part,
)

MAX_PART_SIZE = 4096  # examples per part at most, whatever their size


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
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


def open_or_create(
    path: Path,
    config: StoreConfig,
    codecs: list,
    part_size: int | None,
    tokenizer,
    budget: int | None = None,
    chosen_by: str | None = None,
) -> Manifest:
    """The committed manifest at ``path`` if it was built with ``config`` (and
    ``part_size``, when given), or a new empty store with ``codecs``' arrays (and the
    ``budget`` they were chosen for and what chose them, ``chosen_by``, recorded);
    uncommitted leftovers of a crashed build are removed either way. A continued store's
    own codecs are checked against the build's factors by the caller
    (:meth:`Codec.check_factors`)."""
    folder = parts_dir(path)
    if path.exists():
        manifest = read_manifest(path)
        diffs = manifest.config.differences(config, "store", "this build")
        if part_size is not None and part_size != manifest.part_size:
            diffs.append(f"part_size: store {manifest.part_size}, this build {part_size}")
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
        manifest = new_manifest(config, codecs, part_size)
        manifest.tokenizer_files = tokenizer_files(tokenizer)
        manifest.budget, manifest.chosen_by = budget, chosen_by
        try:
            write_manifest(path, manifest)
        except OSError as err:
            raise StoreWriteError(f"{path}: cannot create the store ({err})") from err
    remove_uncommitted(path, len(manifest.part_counts))
    return manifest


def new_manifest(config: StoreConfig, codecs: list, part_size: int | None) -> Manifest:
    """An empty store's manifest; ``part_size=None`` puts about ``PART_BYTES`` in a part."""
    per_example = sum(c.example_bytes(config.dtype) for c in codecs)
    if part_size is None:
        part_size = max(1, min(MAX_PART_SIZE, PART_BYTES // max(1, per_example)))
    tensors = [{k: _recorded(v) for k, v in c.tensors.items()} for c in codecs]
    return Manifest(
        config, uuidlib.uuid4().hex, int(part_size), [c.params for c in codecs], tensors, []
    )


def _recorded(value: torch.Tensor) -> torch.Tensor:
    """A codec array as the manifest keeps it: floats in float64, integers as they are."""
    return (value.to(torch.float64) if value.is_floating_point() else value).contiguous()


def record_fidelity(path: Path, manifest: Manifest, fidelity) -> None:
    """Keep a measured :class:`~influencekit.store.fidelity.Fidelity` (or None) in the
    manifest, replaced atomically like every manifest write."""
    if fidelity is None:
        return
    manifest.fidelity = fidelity.to_dict()
    try:
        write_manifest(path, manifest)
    except OSError as err:
        raise StoreWriteError(f"{path}: cannot record the store's fidelity ({err})") from err


def remove_uncommitted(path: Path, n_committed: int) -> None:
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


def pending(path: Path, manifest: Manifest, train: TextDataset) -> list[int]:
    """Positions in ``train`` not yet stored, in order; refuses ids stored with other tokens.

    Stored examples are read part by part and kept as one digest each, so a resume over a
    large store holds no copy of its token ids.
    """
    if train.max_length != manifest.config.max_length:
        raise MismatchError(
            f"{path}: max_length: store {manifest.config.max_length}, dataset {train.max_length}"
        )
    digest_of = {}
    for part, _, _ in manifest.parts(path):
        stored = read_part_examples(part)
        for id_, ids in zip(stored.ids, stored.input_ids, strict=True):
            digest_of[id_] = tokens_digest(ids)
    positions = []
    for position, ex in enumerate(train):
        if ex.id not in digest_of:
            positions.append(position)
        elif tokens_digest(ex.input_ids) != digest_of[ex.id]:
            raise MismatchError(
                f"{path}: example id {ex.id!r} is already stored with different tokens"
            )
    return positions


def tokens_digest(ids) -> bytes:
    """A 16-byte digest of a sequence of token ids."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def check_unique_ids(train: TextDataset) -> None:
    """Refuse a dataset with an id twice (a store finds its examples by id)."""
    seen = set()
    for ex in train:
        if ex.id in seen:
            raise DataError(f"{train.source}: id {ex.id!r} appears twice; store ids must be unique")
        seen.add(ex.id)


def part_examples(train: TextDataset, positions: list[int]) -> PartExamples:
    """The per-example records of ``train[positions]`` as a part keeps them."""
    examples = [train[i] for i in positions]
    return PartExamples(
        [ex.id for ex in examples],
        [ex.text for ex in examples],
        [dict(ex.metadata) for ex in examples],
        [list(ex.input_ids) for ex in examples],
    )


class Encoder:
    """Each layer's stored arrays for a list of examples: the model, its tracked layers,
    their codecs, the run settings (their ``dtype``: float32, or float64 for a float64
    store) and the store's ``dtype``, the one arrays are made in (a codec's own dtypes
    aside).

    ``factors`` (``{layer: LayerFactors}``) give the codecs that keep gradients in an
    eigenbasis what they encode with (:meth:`Codec.attach`). The layers are encoded in
    groups whose codecs and captured activations fit ``limit`` bytes: one group (every
    layer, attached once for the whole build) when they fit, else one capture of each
    part's examples per group, its codecs attached for it and then let go.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        codecs: list,
        run: RunSettings,
        dtype: str,
        *,
        factors: dict | None = None,
        limit: int | None = None,
        longest: int = 1,
    ) -> None:
        self.model, self.layers, self.codecs, self.run, self.dtype = (
            model,
            layers,
            codecs,
            run,
            dtype,
        )
        self.factors = factors or {}
        item = torch.empty(0, dtype=run.dtype).element_size()
        costs = [codec.encode_bytes(run.batch_size, longest, item) for codec in codecs]
        fixed = memory.activation_bytes(model, run.batch_size, longest) + PART_BYTES
        plan = memory.Plan(costs, fixed, limit or 2**62)
        plan.warn_if_over("GradientStore.build")
        self.groups = plan.groups
        self._attached = False

    def _attach(self, group: list[int]) -> None:
        for j in group:
            fitted = self.factors.get(self.layers[j].name)
            self.codecs[j].attach(fitted)
            if fitted is not None:
                fitted.release()

    def _detach(self, group: list[int]) -> None:
        for j in group:
            self.codecs[j].detach()

    def close(self) -> None:
        """Let every codec go of what it was attached (the build is over)."""
        self._detach(range(len(self.codecs)))
        self._attached = False

    def encode(self, train: TextDataset, positions: list[int]) -> list[dict[str, np.ndarray]]:
        """Each layer's stored arrays for the examples ``positions`` (rows in that order)."""
        row_of = {index: row for row, index in enumerate(positions)}
        out: list[dict] = [{} for _ in self.codecs]
        order = length_order(train, positions)  # longest first: little padding per batch
        kinds = [codec.array_dtypes(self.dtype) for codec in self.codecs]
        for group in self.groups:
            one = len(self.groups) == 1
            if not (one and self._attached):
                self._attach(group)
                self._attached = one
            layers = [self.layers[j] for j in group]
            for batch, io in self.run.captures(
                self.model,
                layers,
                example_batches(train, self.run.batch_size, order),
                desc="encoding",
                example_ids=train.ids,
                progress=False,
            ):
                rows = [row_of[i] for i in batch.indices]
                for j in group:
                    x, codec, dest = io[self.layers[j].name], self.codecs[j], out[j]
                    for key, value in codec.encode(x.a, x.s).items():
                        if key not in dest:
                            dest[key] = np.zeros((len(positions), *value.shape[1:]), kinds[j][key])
                        dest[key][rows] = value.cpu().numpy()
            if not one:
                self._detach(group)
        return out


def commit(
    path: Path,
    manifest: Manifest,
    examples: PartExamples,
    arrays: list[dict[str, np.ndarray]],
    *,
    number: int | None = None,
    first: int | None = None,
) -> None:
    """Write one part, then the manifest naming it: the only two steps that change the store.

    ``arrays``: each layer's, in their on-disk dtypes (as :class:`Encoder` makes them).

    The part file is the store's next one; its header names it part ``number`` starting at
    example ``first`` (by default its place in this store). A shard of a multi-process build
    passes the part's place in the main store instead, where it will be linked.
    """
    local = len(manifest.part_counts)
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
