"""``GradientStore``: the store as users hold it: build one, open one, read and stream it.

:meth:`GradientStore.build` (:mod:`influencekit.store.build`) and :meth:`GradientStore.open`
are the two ways in; a store is then read here, and scored against queries by
:mod:`influencekit.store.scoring`.

Opening reads the manifest once: a reader sees exactly the examples committed at that
moment, even while a build is adding more (parts are immutable; the manifest is replaced
atomically). Gradients are read block by block, so memory does not grow with the store.

Example:
    >>> store = GradientStore.open("run/grads.h5")              # doctest: +SKIP
    >>> len(store), store.codec, store.modules[:1]              # doctest: +SKIP
    (1200, 'kron:32', ['transformer.h.0.mlp.c_fc'])
    >>> for first, arrays in store.blocks():                     # doctest: +SKIP
    ...     arrays[0]["c"].shape                                 # (rows, k_out, k_in)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from influencekit.data import Example, TextDataset
from influencekit.errors import FileFormatError, MismatchError, OutOfRangeError
from influencekit.h5io import open_h5
from influencekit.models import (
    layers_fingerprint,
    model_fingerprint,
    select_modules,
    tokenizer_fingerprint,
)

from . import build as building
from .codecs import layer_specs, recorded_codecs, stored_tensor
from .fidelity import Fidelity
from .layout import (
    PART_FORMAT,
    PART_VERSION,
    Manifest,
    PartExamples,
    check_part,
    load_tokenizer,
    read_manifest,
    read_part_examples,
)

BLOCK_BYTES = 32 * 2**20  # gradient bytes read at once while streaming


class GradientStore:
    """Compressed per-layer training gradients on disk, with the sequences they came from."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        """Use :meth:`open` (or :meth:`build`): they read and check the manifest."""
        self.path = Path(path)
        self.manifest = manifest
        self.config = manifest.config
        self.codecs = recorded_codecs(
            self.config.codec, self.config.shapes, manifest.layer_tensors, manifest.layer_params
        )
        self._examples: PartExamples | None = None
        self._ids: list[str] | None = None
        self._tokenizer = None
        for number, (part, first, count) in enumerate(manifest.parts(self.path)):
            check_part(part, manifest.uuid, number, first, count)

    @classmethod
    def open(cls, path: str | os.PathLike) -> GradientStore:
        """Open a store for reading (only examples committed by now are seen).

        Example:
            >>> store = GradientStore.open("run/grads.h5")   # doctest: +SKIP
        """
        return cls(Path(path), read_manifest(Path(path)))

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        model: nn.Module,
        train: TextDataset,
        modules: str | list[str] | None = None,
        **options,
    ) -> GradientStore:
        """Compute, compress and store each training sequence's per-layer gradient; open it.

        ``modules``: which layers (as for ``fit_factors``); by default the layers of
        ``factors`` when they are given, else ``"mlp"``. Keyword options (their defaults
        in :func:`influencekit.store.build.build`):

        - ``factors=None``: fitted factors. With them a layer may be kept as ``sparse8:K``
          in their curvature eigenbasis (score the store with the same factors);
        - ``codec=None``: force one for every layer (or one per layer, comma-separated):
          ``dense``, ``kron:K``, ``lowrank:R``, ``lowrank8:R``, ``eig:K`` (needs
          ``factors`` with eigenbases), ``sparse:K`` or ``sparse8:K``. None: each layer's
          codec chosen within ``budget`` (:mod:`influencekit.store.budget`);
        - ``budget=None``: bytes per sequence on disk, an int or a string such as
          ``"128KiB"``: each layer's share goes to ``sparse8:K`` (with factors) and
          ``lowrank8:R``, each as large as fits, and the fidelity probe keeps the better
          per layer (an exact ``dense`` or ``lowrank:R`` when it fits). Default: per layer
          what ``lowrank:8`` takes in float32, at most 20 KiB. :attr:`manifest` records
          ``chosen_by`` (``"codec"``, ``"budget"`` or ``"default"``) and ``budget``;
        - ``dtype=None``: ``float16``, ``float32`` or ``float64`` on disk, as a name or a
          ``torch.dtype`` (computation is float32, or float64 for a float64 store); default
          float16 for a chosen codec, float32 for a forced one;
        - ``fidelity=True``: measure the codec's scores against exact ones on a seeded probe
          of the training sequences and record them (:attr:`fidelity`);
          ``fidelity_queries``: probe with these queries instead of training sequences;
        - ``part_size=None``: examples per part, one commit each (default: about 64 MiB of
          gradients; ``chunk_size`` is its former name);
        - ``seed=0``: draws the ``kron`` projections, the ``lowrank`` range finder and the
          fidelity probe;
        - ``batch_size=8``, ``device=None``, ``amp_dtype=None``, ``progress=True``: the run
          settings, as for ``fit_factors``.

        An existing store at ``path`` is continued (with its own codec and dtype when
        neither ``codec`` nor ``budget`` is given): it must have been built with the same
        model, tokenizer, modules, max_length, codec, dtype and seed, or
        :class:`~influencekit.MismatchError` says what differs. Examples already stored
        (same id) are skipped; an id stored with other tokens is refused. A crash loses at
        most the part in flight: the same call resumes.

        Under ``torchrun`` (a process group of more than one process), every rank calls it
        with the same arguments: each builds a shard of the pending examples and rank 0
        stitches them into this one store, the same as a single process would build
        (:mod:`influencekit.store.shards`); every rank returns it.

        Example:
            >>> store = GradientStore.build("g.h5", model, train, codec="kron:32")  # doctest: +SKIP
        """
        return cls.open(building.build(path, model, train, modules, **options))

    # -- what is stored ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self.manifest.n_examples

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.path)!r}, {len(self)} examples, codec={self.codec}, "
            f"{len(self.modules)} layers, {self.bytes_per_example()} bytes/example)"
        )

    @property
    def codec(self) -> str:
        return self.config.codec

    @property
    def fidelity(self) -> Fidelity | None:
        """How faithful the stored gradients are: the codec's scores against exact ones on a
        probe sample, measured when the store was built (None for a store built without).

        Example:
            >>> store.fidelity.pearson_min     # doctest: +SKIP
            0.916
        """
        found = self.manifest.fidelity
        return None if found is None else Fidelity.from_dict(found)

    @property
    def source(self) -> str:
        """Where the stored sequences are: the store's path (as ``TextDataset.source``)."""
        return str(self.path)

    @property
    def modules(self) -> list[str]:
        return list(self.config.modules)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.dtype)

    @property
    def layer_codecs(self) -> list[str]:
        """Each layer's codec spec, in the order of :attr:`modules`."""
        return [str(spec) for spec in layer_specs(self.codec, len(self.modules))]

    def _layer_bytes(self, layer: int) -> int:
        return self.codecs[layer].example_bytes(self.dtype)

    def gradient_bytes(self) -> int:
        """Bytes of gradient arrays per stored example, all layers together (what the codecs
        keep, without checksums or anything else a part holds)."""
        return sum(self._layer_bytes(j) for j in range(len(self.codecs)))

    def bytes_on_disk(self) -> int:
        """Bytes of every file of the store: the manifest and each committed part."""
        return self.path.stat().st_size + sum(part.stat().st_size for part in self.part_paths())

    def bytes_per_example(self) -> int:
        """What the store's files take on disk per stored example (:meth:`bytes_on_disk`
        over the examples); for an empty store, the gradient bytes one example will take.

        Example:
            >>> store.bytes_per_example()     # doctest: +SKIP
            63511
        """
        if len(self) == 0:
            return self.gradient_bytes()
        return round(self.bytes_on_disk() / len(self))

    def part_paths(self) -> list[Path]:
        return [part for part, _, _ in self.manifest.parts(self.path)]

    def examples(self) -> PartExamples:
        """Ids, texts, extra fields and token ids of every stored example (read once)."""
        if self._examples is None:
            merged = PartExamples([], [], [], [])
            for part in self.parts_examples():
                for key in ("ids", "texts", "metadata", "input_ids"):
                    getattr(merged, key).extend(getattr(part, key))
            self._examples = merged
        return self._examples

    def parts_examples(self) -> Iterator[PartExamples]:
        """The per-example records part by part (memory of one part at a time)."""
        for path, _, _ in self.manifest.parts(self.path):
            yield read_part_examples(path)

    def token_ids(self, indices: list[int]) -> list[list[int]]:
        """Token ids of the stored examples ``indices``, reading only their rows.

        Example:
            >>> store.token_ids([0, 5])          # doctest: +SKIP
            [[464, 3290, ...], [...]]
        """
        wanted = sorted(set(int(i) for i in indices))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < len(self):
            raise OutOfRangeError(f"{self.path}: indices must lie in 0..{len(self) - 1}")
        found: dict[int, list[int]] = {}
        for path, first, count in self.manifest.parts(self.path):
            rows = [i - first for i in wanted if first <= i < first + count]
            if not rows:
                continue
            with _open_part(path) as f:
                try:
                    lengths = f["examples/n_tokens"][rows]
                    tokens = f["examples/input_ids"][rows]
                except (OSError, KeyError) as err:
                    raise FileFormatError(f"{path}: cannot read stored token ids ({err})") from err
            for row, n, ids in zip(rows, lengths, tokens, strict=True):
                found[first + row] = ids[:n].tolist()
        return [found[int(i)] for i in indices]

    def _check_positions(self, positions: list[int] | None) -> list[int]:
        if positions is None:
            return list(range(len(self.codecs)))
        positions = [int(j) for j in positions]
        if any(not 0 <= j < len(self.codecs) for j in positions):
            last = len(self.codecs) - 1
            raise OutOfRangeError(f"{self.path}: layer positions must lie in 0..{last}")
        return positions

    def rows(
        self, indices: list[int], positions: list[int] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """The stored arrays of the examples ``indices``, reading only their rows.

        One dict per layer position in ``positions`` (default all), mapping array name to
        ``(len(indices), ...)`` in the order of ``indices`` (repeats allowed), as on disk.

        Example:
            >>> store.rows([7, 2, 7], positions=[0])[0]["u"].shape   # doctest: +SKIP
            (3, 8, 64)
        """
        positions = self._check_positions(positions)
        asked = np.asarray([int(i) for i in indices], dtype=np.int64)
        if asked.size and not 0 <= asked.min() <= asked.max() < len(self):
            raise OutOfRangeError(f"{self.path}: indices must lie in 0..{len(self) - 1}")
        expected = [self.codecs[j].arrays() for j in positions]
        kinds = [self.codecs[j].array_dtypes(self.dtype) for j in positions]
        out = [
            {name: np.empty((len(asked), *shape), kind[name]) for name, shape in arrays.items()}
            for arrays, kind in zip(expected, kinds, strict=True)
        ]
        wanted = np.unique(asked)  # h5py reads a list of rows only if increasing and unique
        for path, first, count in self.manifest.parts(self.path):
            lo, hi = np.searchsorted(wanted, [first, first + count])
            if lo == hi:
                continue
            rows = (wanted[lo:hi] - first).tolist()
            dest = np.flatnonzero((asked >= first) & (asked < first + count))
            src = np.searchsorted(rows, asked[dest] - first)
            with _open_part(path) as f:
                for j, shapes, arrays in zip(positions, expected, out, strict=True):
                    got = _read_rows(f, path, j, rows, shapes)
                    for name, value in got.items():
                        arrays[name][dest] = value[src]
        return out

    def gram(self, indices: list[int], positions: list[int] | None = None) -> np.ndarray:
        """``⟨G_a, G_b⟩`` between the stored examples ``indices``, summed over ``positions``.

        ``(n, n)`` float64, symmetric: the inner products of the concatenated per-layer
        gradients (sum-of-token-losses, as stored), each layer through its codec's ``gram``
        (exact for ``dense``; for ``kron``/``eig`` in the projected space; for ``lowrank``
        of the stored rank-``R`` approximations). ``positions``: layer positions (default
        all). Reads the chosen rows one layer at a time. A one-token sequence has a zero gradient.

        Example:
            >>> g = store.gram([0, 5, 9])                                  # doctest: +SKIP
            >>> norms = np.sqrt(np.diag(g))                                # doctest: +SKIP
            >>> cosine = g / np.outer(norms, norms)                        # doctest: +SKIP
        """
        positions = self._check_positions(positions)
        # Each distinct example once; repeats are copied from its row and column at the end.
        asked = np.asarray([int(i) for i in indices], dtype=np.int64)
        unique, inverse = np.unique(asked, return_inverse=True)
        total = np.zeros((len(unique), len(unique)))
        for j in positions:
            (arrays,) = self.rows(unique.tolist(), [j])
            x = {name: stored_tensor(value, torch.float64) for name, value in arrays.items()}
            total += self.codecs[j].gram(x, x).numpy()
        total = (total + total.T) / 2  # X Xᵀ need not round symmetrically
        return total[np.ix_(inverse.ravel(), inverse.ravel())]

    @property
    def ids(self) -> list[str]:
        """Ids of the stored examples, in order (read part by part once, then kept)."""
        if self._ids is None:
            source = [self._examples] if self._examples is not None else self.parts_examples()
            self._ids = [id_ for part in source for id_ in part.ids]
        return list(self._ids)

    @property
    def tokenizer(self):
        """The tokenizer the store was built with, rebuilt once from the files it keeps.

        Example:
            >>> store.tokenizer("a ship")["input_ids"]   # doctest: +SKIP
        """
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest.tokenizer_files, self.path)
        return self._tokenizer

    def dataset(self, tokenizer=None) -> TextDataset:
        """The stored sequences as a :class:`TextDataset` (stored token ids, not re-tokenized).

        ``tokenizer`` defaults to the store's own (:attr:`tokenizer`).

        Example:
            >>> train = store.dataset(tokenizer); train[0].text   # doctest: +SKIP
        """
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        self.check(tokenizer=tokenizer)
        ex = self.examples()
        rows = zip(ex.ids, ex.texts, ex.input_ids, ex.metadata, strict=True)
        examples = [
            Example(i, id_, text, tuple(ids), meta, tokenizer)
            for i, (id_, text, ids, meta) in enumerate(rows)
        ]
        return TextDataset(examples, tokenizer, self.config.max_length, str(self.path))

    # -- checks -----------------------------------------------------------------------------

    def check(
        self, *, model: nn.Module | None = None, tokenizer=None, modules: list[str] | None = None
    ) -> None:
        """Refuse a model, tokenizer or module list other than the store was built with.

        Raises :class:`MismatchError` listing what differs.
        """
        problems = []
        cfg = self.config
        if model is not None:
            found = model_fingerprint(model)
            if found != cfg.model_fingerprint:
                problems.append(f"model: store built with {cfg.model_fingerprint}, this is {found}")
            else:
                tracked = layers_fingerprint(select_modules(model, self.modules))
                if tracked != cfg.weights_fingerprint:
                    problems.append(
                        f"tracked weights: store {cfg.weights_fingerprint}, this model {tracked}"
                    )
        if tokenizer is not None:
            found = tokenizer_fingerprint(tokenizer)
            if found != cfg.tokenizer_fingerprint:
                problems.append(
                    f"tokenizer: store built with {cfg.tokenizer_fingerprint}, this is {found}"
                )
        if modules is not None:
            missing = [m for m in modules if m not in self.modules]
            if missing:
                problems.append(f"modules: the store lacks {missing} (it holds {self.modules})")
        if problems:
            raise MismatchError(f"{self.path}: " + "; ".join(problems))

    def check_eigenbasis(self, fingerprints: dict[str, str]) -> None:
        """Refuse factors whose eigenbasis differs from the one a layer's gradients are kept
        in (``sparse`` stores built with factors); ``fingerprints``: ``{layer: fingerprint}``
        of the factors at hand (:meth:`~influencekit.factors.LayerFactors.basis_fingerprint`).
        """
        problems = []
        for name, codec in zip(self.modules, self.codecs, strict=True):
            kept = codec.eigenbasis
            if kept is not None and name in fingerprints and fingerprints[name] != kept:
                problems.append(f"{name}: store {kept}, these factors {fingerprints[name]}")
        if problems:
            raise MismatchError(
                f"{self.path}: the store keeps gradients in the eigenbasis of the factors it "
                "was built with, and these factors have another (score with those factors): "
                + "; ".join(problems)
            )

    # -- streaming --------------------------------------------------------------------------

    def blocks(
        self,
        positions: list[int] | None = None,
        *,
        block_bytes: int = BLOCK_BYTES,
        every: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[int, list[dict[str, np.ndarray]]]]:
        """Yield ``(first_index, arrays)`` blocks; ``arrays[j]`` maps array name to ``(rows, ...)``.

        ``positions`` picks layers by position (default all). ``every=(offset, step)`` reads only
        the blocks numbered ``offset, offset + step, ...`` (one process's share of a pass
        split over ``step`` processes). Checksums are verified on every read; a damaged chunk
        raises :class:`FileFormatError` naming the part file and dataset.
        """
        offset, step = every
        number = -1
        positions = list(range(len(self.codecs))) if positions is None else positions
        per_example = sum(self._layer_bytes(j) for j in positions)
        wanted = max(1, block_bytes // max(1, per_example))
        for path, first, count in self.manifest.parts(self.path):
            with _open_part(path) as f:
                # Whole HDF5 chunks per block: a chunk split between blocks would be read
                # and checksummed twice.
                chunk = int(f.attrs.get("chunk_rows", 1))
                rows = max(chunk, wanted // chunk * chunk)
                for lo in range(0, count, rows):
                    number += 1
                    if number % step != offset:
                        continue
                    hi = min(count, lo + rows)
                    yield (
                        first + lo,
                        [
                            _read_rows(f, path, j, slice(lo, hi), self.codecs[j].arrays())
                            for j in positions
                        ],
                    )


def _open_part(path: Path):
    return open_h5(path, PART_FORMAT, PART_VERSION)


def _read_rows(
    f: h5py.File, path: Path, layer: int, rows: slice | list[int], shapes: dict[str, tuple]
) -> dict[str, np.ndarray]:
    """One layer's arrays at ``rows`` (a slice, or a list of increasing unique rows), checked
    against the codec's array names and shapes: a part missing one array is damaged."""
    key = f"layers/{layer:04d}"
    try:
        group = f[key]
        got = {name: group[name][rows] for name in group}
    except (OSError, KeyError) as err:
        lo, hi = (rows.start, rows.stop - 1) if isinstance(rows, slice) else (rows[0], rows[-1])
        raise FileFormatError(f"{path}: cannot read /{key} rows {lo}..{hi} ({err})") from err
    found = {name: tuple(value.shape[1:]) for name, value in got.items()}
    if found != {name: tuple(shape) for name, shape in shapes.items()}:
        raise FileFormatError(f"{path}: /{key} holds arrays {found}, expected {dict(shapes)}")
    return got
