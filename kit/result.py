"""``InfluenceResult``: scores of queries against training sequences, per layer.

``layer_scores[q, i, l]`` is ``I_l(q, z_i)``; ``scores`` is their sum over layers. A positive
score means up-weighting training sequence ``i`` raises ``log p(completion | prompt)``.
Results refuse NaN/inf on construction, naming the query, training id and layer.

A *top-k* result (``score(..., top_k=k)``) keeps only each query's ``k`` highest scores:
then ``indices[q, j]`` is the training index of column ``j`` (columns sorted by decreasing
score), and ``scores``/``layer_scores`` have ``k`` columns instead of ``n_train``.

Example:
    >>> import numpy as np
    >>> r = InfluenceResult(np.arange(6.0).reshape(1, 3, 2), ["l0", "l1"], ["a", "b", "c"], ["q"])
    >>> r.scores
    array([[1., 5., 9.]])
    >>> r.top(0, k=2)
    [(2, 9.0), (1, 5.0)]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FileFormatError, NonFiniteError
from .h5io import UTF8, atomic_h5, open_h5, read_array

FORMAT = "influencekit.result"
VERSION = 1


@dataclass
class InfluenceResult:
    """Influence of every training sequence on every query, kept per layer."""

    layer_scores: np.ndarray  # (n_queries, n_train, n_layers), float64
    layers: list[str]
    train_ids: list[str]
    query_ids: list[str]
    meta: dict = field(default_factory=dict)
    indices: np.ndarray | None = None  # (n_queries, k) training indices of a top-k result
    _scores: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A read-only view: `scores` is summed once, so the result must not change under it.
        self.layer_scores = np.asarray(self.layer_scores, dtype=np.float64).view()
        self.layer_scores.flags.writeable = False
        columns = len(self.train_ids)
        if self.indices is not None:
            self.indices = np.asarray(self.indices, dtype=np.int64)
            columns = self.indices.shape[-1]
            if self.indices.shape != (len(self.query_ids), columns) or (
                self.indices.size
                and not 0 <= self.indices.min() <= self.indices.max() < len(self.train_ids)
            ):
                raise ValueError(
                    f"indices must be (queries, k) = ({len(self.query_ids)}, k) training indices "
                    f"below {len(self.train_ids)}, got shape {self.indices.shape}"
                )
        expected = (len(self.query_ids), columns, len(self.layers))
        if self.layer_scores.shape != expected:
            raise ValueError(
                f"layer_scores has shape {self.layer_scores.shape}, expected "
                f"(queries, {'k' if self.indices is not None else 'train'}, layers) = {expected}"
            )
        bad = ~np.isfinite(self.layer_scores)
        if bad.any():
            q, i, layer = (int(x) for x in np.argwhere(bad)[0])
            i = int(self.indices[q, i]) if self.indices is not None else i
            raise NonFiniteError(
                f"{int(bad.sum())} non-finite score(s), first: query {self.query_ids[q]!r}, "
                f"training id {self.train_ids[i]!r}, layer {self.layers[layer]}"
            )
        self._scores = self.layer_scores.sum(axis=-1)
        self._scores.flags.writeable = False

    @property
    def is_top_k(self) -> bool:
        """True when only each query's top-k scores are kept (see ``indices``)."""
        return self.indices is not None

    @property
    def scores(self) -> np.ndarray:
        """``(n_queries, n_train)``: total influence, the sum of ``layer_scores`` over layers
        (summed once; read-only, like ``layer_scores``)."""
        return self._scores

    def top(self, q: int, k: int = 10, *, largest: bool = True) -> list[tuple[int, float]]:
        """The ``k`` most (or least, ``largest=False``) influential ``(train_index, score)``."""
        if self.indices is not None and not largest:
            raise ValueError(
                "this top-k result keeps only each query's highest scores; score without "
                "top_k to see the lowest"
            )
        row = self.scores[q]
        order = np.argsort(-row if largest else row, kind="stable")[:k]
        index = self.indices[q] if self.indices is not None else np.arange(len(row))
        return [(int(index[i]), float(row[i])) for i in order]

    def rank(self, q: int, i: int) -> int:
        """Where training sequence ``i`` ranks for query ``q``: 1 + how many score higher.

        Example:
            >>> r = InfluenceResult(np.array([[[1.0], [5.0], [3.0]]]), ["l"], list("abc"), ["q"])
            >>> r.rank(0, 2)
            2
        """
        if self.indices is not None:
            raise ValueError("a top-k result keeps only each query's best scores: rank needs all")
        row = self.scores[q]
        return 1 + int((row > row[i]).sum())

    def layer_shares(self, q: int, k: int = 10) -> np.ndarray:
        """Each layer's part of the summed score of query ``q``'s top ``k`` sequences.

        ``(n_layers,)``, summing to 1 (a layer that pulls the other way gets a negative share).
        All zeros when the top ``k`` scores sum to zero, where no share is defined.

        Example:
            >>> import numpy as np
            >>> scores = np.array([[[3.0, 1.0], [0.0, 0.0]]])
            >>> r = InfluenceResult(scores, ["a", "b"], ["x", "y"], ["q"])
            >>> r.layer_shares(0, k=1).tolist()
            [0.75, 0.25]
        """
        row = self.scores[q]
        columns = np.argsort(-row, kind="stable")[:k]
        per_layer = self.layer_scores[q, columns].sum(axis=0)
        total = per_layer.sum()
        return per_layer / total if total != 0 else np.zeros_like(per_layer)

    def save(self, path: str | Path) -> Path:
        """Write an HDF5 file any HDF5 tool can read (atomically)."""
        with atomic_h5(path) as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "meta": json.dumps(self.meta),
                    "layers": json.dumps(self.layers),
                }
            )
            f.create_dataset("layer_scores", data=self.layer_scores, fletcher32=True)
            f.create_dataset("scores", data=self.scores, fletcher32=True)
            f.create_dataset("train_ids", data=np.array(self.train_ids, dtype=object), dtype=UTF8)
            f.create_dataset("query_ids", data=np.array(self.query_ids, dtype=object), dtype=UTF8)
            if self.indices is not None:
                f.create_dataset("indices", data=self.indices, fletcher32=True)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> InfluenceResult:
        """Read a result written by :meth:`save`."""
        with open_h5(path, FORMAT, VERSION) as f:
            layer_scores = read_array(f, "layer_scores", path)
            train_ids = [s.decode() for s in read_array(f, "train_ids", path)]
            query_ids = [s.decode() for s in read_array(f, "query_ids", path)]
            layers = json.loads(f.attrs["layers"])
            meta = json.loads(f.attrs["meta"])
            indices = read_array(f, "indices", path) if "indices" in f else None
        if layer_scores.ndim != 3:
            raise FileFormatError(f"{path}: layer_scores must be 3-D, found {layer_scores.shape}")
        try:
            return cls(layer_scores, layers, train_ids, query_ids, meta, indices)
        except ValueError as err:
            raise FileFormatError(f"{path}: inconsistent result ({err})") from err
