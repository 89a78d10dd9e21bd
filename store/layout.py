"""The on-disk layout of a gradient store: one manifest file and immutable part files.

``grads.h5`` (the manifest, rewritten atomically at every commit) holds the store's
configuration, each layer's codec parameters and the list of committed parts; its
``parts/`` group holds HDF5 external links to them, so ``h5ls -r --follow-symlinks`` shows
everything. ``grads.h5.d/part-000000.h5``, ... (each written to a temporary name and renamed
into place) hold a run of consecutive examples: their ids, text, token ids and extra fields,
and per layer the codec's arrays, chunked along examples with fletcher32 checksums.

Why two kinds of file: HDF5 gives no guarantee about a file whose writer is killed
mid-write, but a rename is atomic. A part becomes part of the store only when the manifest
naming it has been renamed into place, so a crash at any moment leaves the previous
manifest, which names only complete parts. docs/store-format.md describes every field.

Example:
    >>> parts_dir("run/grads.h5")
    PosixPath('run/grads.h5.d')
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from influencekit.errors import FileFormatError
from influencekit.h5io import UTF8, atomic_h5, open_h5, read_array

FORMAT = "influencekit.store"
PART_FORMAT = "influencekit.store-part"
# 3: a codec per layer, sparse windows and Elias–Fano positions, lowrank8, the budget the
# codecs were chosen for; 2: sparse codecs (paged positions) and the fidelity record; 1 and
# 2 still read
VERSION = 3
PART_VERSION = 1
# What a stored gradient is the gradient of (docs/math.md); a new definition gets a new string.
LOSS = "sum over t of -log p(x_{t+1} | x_<=t), real next tokens, padding excluded (v1)"
PART_BYTES = 64 * 2**20  # a part (one commit) holds about this much gradient data
HDF5_CHUNK_BYTES = 2**20  # HDF5 chunks of about 1 MiB along the example axis
DTYPES = ("float16", "float32", "float64")


def parts_dir(path: str | os.PathLike) -> Path:
    """The folder holding the part files of the store at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".d")


def part_name(number: int) -> str:
    return f"part-{number:06d}.h5"


@dataclass(frozen=True)
class StoreConfig:
    """Everything that fixes the meaning of the stored gradients; compared on every reuse."""

    codec: str
    dtype: str
    seed: int
    modules: list[str]
    shapes: list[list[int]]
    model_fingerprint: str
    weights_fingerprint: str
    tokenizer_fingerprint: str
    max_length: int
    loss: str = LOSS

    def differences(self, other: StoreConfig, mine: str, theirs: str) -> list[str]:
        """``"field: <mine> X, <theirs> Y"`` for every field that differs."""
        ours, them = asdict(self), asdict(other)
        return [
            f"{key}: {mine} {ours[key]!r}, {theirs} {them[key]!r}"
            for key in ours
            if ours[key] != them[key]
        ]


@dataclass
class Manifest:
    """The manifest's content: configuration, codec parameters, committed parts."""

    config: StoreConfig
    uuid: str
    part_size: int  # examples per part (the file attribute is called chunk_size)
    layer_params: list[dict]  # per layer: JSON-able codec parameters
    layer_tensors: list[dict[str, torch.Tensor]]  # per layer: codec arrays (projections)
    part_counts: list[int] = field(default_factory=list)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    fidelity: dict | None = None  # measured at build (influencekit.store.fidelity)
    budget: int | None = None  # bytes per sequence the codecs were chosen for (None: see below)
    chosen_by: str | None = None  # "codec" (forced), "budget" or "default"; None: not recorded

    @property
    def n_examples(self) -> int:
        return int(sum(self.part_counts))

    def parts(self, path: Path) -> list[tuple[Path, int, int]]:
        """``(part file, first example, count)`` of every committed part of the store at
        ``path``."""
        folder, first, found = parts_dir(path), 0, []
        for number, count in enumerate(self.part_counts):
            found.append((folder / part_name(number), first, count))
            first += count
        return found


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest at ``path`` (readers see the old or the new one)."""
    cfg = manifest.config
    with atomic_h5(path, in_memory=True) as f:
        f.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "uuid": manifest.uuid,
                "chunk_size": manifest.part_size,
                "n_examples": manifest.n_examples,
                "n_parts": len(manifest.part_counts),
                "parts_dir": parts_dir(path).name,
                "config": json.dumps(asdict(cfg)),
                **{k: v for k, v in asdict(cfg).items() if k not in ("modules", "shapes")},
                "modules": json.dumps(cfg.modules),
            }
        )
        if manifest.fidelity is not None:
            f.attrs["fidelity"] = json.dumps(manifest.fidelity)
        if manifest.budget is not None:
            f.attrs["budget"] = int(manifest.budget)
        if manifest.chosen_by is not None:
            f.attrs["chosen_by"] = manifest.chosen_by
        counts = np.asarray(manifest.part_counts, dtype=np.int64)
        f.create_dataset("part_counts", data=counts, maxshape=(None,))
        for i, (name, shape) in enumerate(zip(cfg.modules, cfg.shapes, strict=True)):
            group = f.create_group(f"layers/{i:04d}")
            group.attrs.update({"name": name, "shape": list(shape)})
            group.attrs.update(manifest.layer_params[i])
            for key, value in manifest.layer_tensors[i].items():
                group.create_dataset(key, data=value.numpy(), fletcher32=True)
        saved = f.create_group("tokenizer")  # the files that made the stored token ids
        for name, content in manifest.tokenizer_files.items():
            saved.create_dataset(name, data=np.frombuffer(content, dtype=np.uint8))
        links = f.create_group("parts")
        for number in range(len(manifest.part_counts)):
            target = f"{parts_dir(path).name}/{part_name(number)}"
            links[part_name(number)] = h5py.ExternalLink(target, "/")
    fsync_dir(path.parent)


def read_manifest(path: Path) -> Manifest:
    """Read a manifest, or raise FileFormatError naming the file and what is wrong."""
    with open_h5(path, FORMAT, VERSION) as f:
        raw = json.loads(f.attrs["config"])
        config = StoreConfig(**raw)
        params, tensors = [], []
        for i, name in enumerate(config.modules):
            key = f"layers/{i:04d}"
            if key not in f:
                raise FileFormatError(f"{path}: group /{key} ({name}) is missing")
            group = f[key]
            params.append(
                {k: _plain(v) for k, v in group.attrs.items() if k not in ("name", "shape")}
            )
            tensors.append({k: torch.from_numpy(read_array(group, k, path)) for k in group})
        counts = [int(c) for c in read_array(f, "part_counts", path)]
        saved = f.get("tokenizer", {})
        files = {name: read_array(saved, name, path).tobytes() for name in saved}
        fidelity = json.loads(f.attrs["fidelity"]) if "fidelity" in f.attrs else None
        budget = int(f.attrs["budget"]) if "budget" in f.attrs else None
        chosen_by = str(f.attrs["chosen_by"]) if "chosen_by" in f.attrs else None
        return Manifest(
            config,
            str(f.attrs["uuid"]),
            int(f.attrs["chunk_size"]),
            params,
            tensors,
            counts,
            files,
            fidelity,
            budget,
            chosen_by,
        )


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class PartExamples:
    """Per-example records of one part (or of the rows about to be written as one)."""

    ids: list[str]
    texts: list[str]
    metadata: list[dict]
    input_ids: list[list[int]]


def write_part(
    path: Path,
    *,
    uuid: str,
    number: int,
    first: int,
    examples: PartExamples,
    arrays: list[dict[str, np.ndarray]],
    max_length: int,
) -> None:
    """Write one part atomically: a crash or full disk leaves no file under its name."""
    count = len(examples.ids)
    with atomic_h5(path, in_memory=True) as f:
        f.attrs.update(
            {"format": PART_FORMAT, "version": PART_VERSION, "store_uuid": uuid, "number": number}
        )
        f.attrs.update({"first": first, "count": count})
        group = f.create_group("examples")
        group.create_dataset("ids", data=np.array(examples.ids, dtype=object), dtype=UTF8)
        group.create_dataset("text", data=np.array(examples.texts, dtype=object), dtype=UTF8)
        meta = [json.dumps(m, sort_keys=True) for m in examples.metadata]
        group.create_dataset("metadata", data=np.array(meta, dtype=object), dtype=UTF8)
        # fletcher32 cannot cover variable-length strings: a digest of them does instead.
        group.attrs["strings_sha256"] = _strings_digest(examples.ids, examples.texts, meta)
        lengths = np.array([len(ids) for ids in examples.input_ids], dtype=np.int32)
        tokens = np.full((count, max_length), -1, dtype=np.int32)  # -1 pads past n_tokens
        for row, ids in enumerate(examples.input_ids):
            tokens[row, : len(ids)] = ids
        group.create_dataset("n_tokens", data=lengths, fletcher32=True)
        # compressed: the -1 padding past each sequence's end takes next to nothing
        group.create_dataset(
            "input_ids", data=tokens, fletcher32=True, chunks=_chunks(tokens),
            compression="gzip", compression_opts=4, shuffle=True,
        )  # fmt: skip
        # One chunk height for every gradient array, so readers can take blocks of whole chunks.
        rows = chunk_rows(
            max((v[:1].nbytes for la in arrays for v in la.values()), default=1), count
        )
        f.attrs["chunk_rows"] = rows
        for i, layer_arrays in enumerate(arrays):
            layer = f.create_group(f"layers/{i:04d}")
            for key, value in layer_arrays.items():
                chunks = (rows, *value.shape[1:])
                layer.create_dataset(key, data=value, fletcher32=True, chunks=chunks)
    fsync_dir(path.parent)


def _strings_digest(ids: list[str], texts: list[str], metadata: list[str]) -> str:
    return hashlib.sha256(json.dumps([ids, texts, metadata]).encode()).hexdigest()


def chunk_rows(row_bytes: int, count: int) -> int:
    """Examples per HDF5 chunk: at most about HDF5_CHUNK_BYTES, at least one, and dividing
    ``count`` where a divisor at least half that large exists, else splitting it evenly:
    HDF5 allocates a whole last chunk however few rows it holds, and the bytes on disk
    should be the rows'.

    Example:
        >>> chunk_rows(10_000, 300), chunk_rows(10_000, 211), chunk_rows(10**7, 5)
        (100, 71, 1)
    """
    most = max(1, min(count, HDF5_CHUNK_BYTES // max(1, row_bytes)))
    for rows in range(most, (most + 1) // 2 - 1, -1):
        if count % rows == 0:
            return rows
    return -(-count // -(-count // most))  # as even a split as chunks of at most `most`


def _chunks(value: np.ndarray) -> tuple[int, ...]:
    """HDF5 chunks of whole examples, about HDF5_CHUNK_BYTES each."""
    return (chunk_rows(value[:1].nbytes, len(value)), *value.shape[1:])


def read_part_examples(path: Path) -> PartExamples:
    """The per-example records of one part file."""
    with open_h5(path, PART_FORMAT, PART_VERSION) as f:
        group = f["examples"]
        ids = [s.decode() for s in read_array(group, "ids", path)]
        texts = [s.decode() for s in read_array(group, "text", path)]
        meta = [s.decode() for s in read_array(group, "metadata", path)]
        lengths = read_array(group, "n_tokens", path)
        tokens = read_array(group, "input_ids", path)
        if _strings_digest(ids, texts, meta) != group.attrs.get("strings_sha256"):
            raise FileFormatError(f"{path}: the stored ids, texts or metadata are damaged")
        metadata = [json.loads(m) for m in meta]
    return PartExamples(
        ids, texts, metadata, [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]
    )


def check_part(path: Path, uuid: str, number: int, first: int, count: int) -> None:
    """Check a part's header: it belongs to this store and holds the expected rows."""
    if not path.is_file():
        raise FileFormatError(f"{path}: part {number} of the store is missing")
    with open_h5(path, PART_FORMAT, PART_VERSION) as f:
        found = (
            str(f.attrs["store_uuid"]),
            int(f.attrs["number"]),
            int(f.attrs["first"]),
            int(f.attrs["count"]),
        )
    if found != (uuid, number, first, count):
        raise FileFormatError(
            f"{path}: expected part {number} of store {uuid} (examples {first}.."
            f"{first + count - 1}), found part {found[1]} of store {found[0]} "
            f"(first {found[2]}, count {found[3]})"
        )


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (not needed against kill -9, but against power loss)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for ``tokenizer`` (JSON, text, sentencepiece)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def load_tokenizer(files: dict[str, bytes], where: Path):
    """Rebuild a tokenizer from the files a store keeps (no network, no pickles)."""
    from transformers import AutoTokenizer

    if not files:
        raise FileFormatError(f"{where}: the store keeps no tokenizer; pass tokenizer=")
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / Path(name).name).write_bytes(content)
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # tokenizers raises its own types: name the store instead
            raise FileFormatError(f"{where}: cannot rebuild its tokenizer ({err})") from err
