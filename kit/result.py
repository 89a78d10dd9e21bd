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

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Query, as_queries
from .errors import FileFormatError, NonFiniteError, ParameterError
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
    # The scored queries (prompt, completion, id = query_ids[q], metadata); None when unknown.
    queries: list[Query] | None = None
    _scores: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.meta = dict(self.meta)
        if self.queries is None and "queries" in self.meta:  # as written in a result file
            self.queries = self.meta["queries"]
        self.meta.pop("queries", None)
        if self.queries is not None:
            self.queries = _typed_queries(self.queries, self.query_ids)
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
                raise ParameterError(
                    "indices",
                    self.indices,
                    f"(queries, k) = ({len(self.query_ids)}, k) training indices "
                    f"below {len(self.train_ids)} (shape {self.indices.shape} given)",
                )
        expected = (len(self.query_ids), columns, len(self.layers))
        if self.layer_scores.shape != expected:
            kind = "k" if self.indices is not None else "train"
            raise ParameterError(
                "layer_scores",
                f"an array of shape {self.layer_scores.shape}",
                f"of shape (queries, {kind}, layers) = {expected}",
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

    def columns(self, q: int, k: int = 10, *, largest: bool = True) -> np.ndarray:
        """Positions in ``scores[q]`` of query ``q``'s ``k`` highest (or lowest) scores, the
        most extreme first; ties by position. For a top-k result these are its own columns.

        Example:
            >>> r = InfluenceResult(np.array([[[1.0], [5.0], [3.0]]]), ["l"], list("abc"), ["q"])
            >>> r.columns(0, k=2).tolist(), r.columns(0, k=1, largest=False).tolist()
            ([1, 2], [0])
        """
        if self.indices is not None and not largest:
            raise ParameterError(
                "largest",
                largest,
                "True for a top-k result, which keeps only each query's highest scores (score "
                "without top_k to see the lowest)",
            )
        row = self.scores[q]
        return np.argsort(-row if largest else row, kind="stable")[:k]

    def train_index(self, q: int, columns: np.ndarray) -> np.ndarray:
        """The training indices of query ``q``'s ``columns`` (the columns themselves unless
        this is a top-k result)."""
        return columns if self.indices is None else self.indices[q, columns]

    def top(self, q: int, k: int = 10, *, largest: bool = True) -> list[tuple[int, float]]:
        """The ``k`` most (or least, ``largest=False``) influential ``(train_index, score)``."""
        columns = self.columns(q, k, largest=largest)
        index = self.train_index(q, columns)
        return [(int(i), float(v)) for i, v in zip(index, self.scores[q, columns], strict=True)]

    def rank(self, q: int, i: int) -> int:
        """Where training sequence ``i`` ranks for query ``q``: 1 + how many score higher.

        Example:
            >>> r = InfluenceResult(np.array([[[1.0], [5.0], [3.0]]]), ["l"], list("abc"), ["q"])
            >>> r.rank(0, 2)
            2
        """
        if self.indices is not None:
            raise ParameterError(
                "result", "a top-k result", "a full result: rank needs every score of the query"
            )
        row = self.scores[q]
        return 1 + int((row > row[i]).sum())

    def layer_shares(self, q: int, k: int = 10, *, largest: bool = True) -> np.ndarray:
        """Each layer's part of the summed score of query ``q``'s top ``k`` sequences (the
        ``k`` lowest with ``largest=False``).

        ``(n_layers,)``, summing to 1 (a layer that pulls the other way gets a negative share).
        All zeros when the ``k`` scores sum to zero, where no share is defined.

        Example:
            >>> import numpy as np
            >>> scores = np.array([[[3.0, 1.0], [0.0, 0.0]]])
            >>> r = InfluenceResult(scores, ["a", "b"], ["x", "y"], ["q"])
            >>> r.layer_shares(0, k=1).tolist()
            [0.75, 0.25]
        """
        per_layer = self.layer_scores[q, self.columns(q, k, largest=largest)].sum(axis=0)
        total = per_layer.sum()
        return per_layer / total if total != 0 else np.zeros_like(per_layer)

    def save(self, path: str | Path) -> Path:
        """Write an HDF5 file any HDF5 tool can read (atomically)."""
        with atomic_h5(path) as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "meta": json.dumps({**self.meta, **self._queries_record()}, default=_plain),
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

    def _queries_record(self) -> dict:
        """The queries as the file keeps them: ``meta["queries"]``, prompt, completion and
        metadata per query (ids are the ``query_ids`` dataset)."""
        if self.queries is None:
            return {}
        return {
            "queries": [
                {"prompt": q.prompt, "completion": q.completion, **q.metadata} for q in self.queries
            ]
        }

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
        except (ValueError, TypeError) as err:
            raise FileFormatError(f"{path}: inconsistent result ({err})") from err


def _plain(value):
    """A value JSON cannot write as it is (a query's metadata may hold numpy values): numpy
    scalars and arrays as numbers and lists, anything else as its text."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def _typed_queries(queries, query_ids: list[str]) -> list[Query]:
    """One :class:`Query` per query id (the result's ids win over the records' own)."""
    if len(queries) != len(query_ids):
        raise ParameterError(
            "queries", f"{len(queries)} queries", f"one per query id ({len(query_ids)})"
        )
    typed = as_queries(list(queries))  # dicts (as in files), Query objects or tuples
    return [dataclasses.replace(q, id=qid) for q, qid in zip(typed, query_ids, strict=True)]
