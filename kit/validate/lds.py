"""The linear datamodeling score (LDS, Park et al. 2023): do scores predict real retraining?

Draw ``M`` random subsets of the training set (each a fraction ``α``, usually half), retrain
a model on each with several seeds, and measure ``f = log p(completion | prompt)`` of every
query. Influence scores predict the measurement of subset ``S_j`` as the sum of its members'
scores, ``g_j = Σ_{i ∈ S_j} I(q, z_i)`` (a positive score: including ``z_i`` raises ``f``).
The LDS of a query is the Spearman rank correlation over the subsets between ``g_j`` and the
seed-averaged measurement; the reported LDS is its mean over queries.

:func:`retrain` runs the retraining and keeps every measurement in a :class:`Retraining`,
saved to an HDF5 cache after each run: an interrupted run resumes, and the LDS of any new
scores is recomputed from the cache in milliseconds, without retraining.

Example:
    >>> subsets = random_subsets(40, 8, seed=0)
    >>> runs = retrain(recipe, train, queries, subsets, seeds=[0, 1], cache="runs.h5")
    ... # doctest: +SKIP
    >>> lds(result, runs).mean                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from .. import checks
from ..data import TextDataset, as_queries
from ..errors import DataError, FileFormatError, MismatchError, NonFiniteError, ParameterError
from ..h5io import UTF8, atomic_h5, open_h5, read_array
from ..progress import progress_counter
from ..result import InfluenceResult
from .measure import completion_log_probs
from .stats import spearman_columns

FORMAT = "influencekit.retraining"
VERSION = 1


def random_subsets(n_train: int, count: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` random subsets of ``range(n_train)``, each of ``round(fraction · n_train)``
    members drawn without replacement: a boolean ``(count, n_train)`` membership array.

    Example:
        >>> s = random_subsets(10, 3, seed=1)
        >>> s.shape, s.sum(axis=1).tolist()
        ((3, 10), [5, 5, 5])
    """
    checks.count("n_train", n_train)
    checks.count(
        "count", count, minimum=2, allowed="an int >= 2 (a correlation needs at least 2 subsets)"
    )
    checks.number(
        "fraction",
        fraction,
        minimum=0,
        maximum=1,
        exclusive=True,
        allowed="strictly between 0 and 1",
    )
    size = round(fraction * n_train)
    if not 0 < size < n_train:
        raise ParameterError(
            "fraction",
            fraction,
            f"a fraction of n_train = {n_train} giving subsets of 1 to n_train - 1 members "
            f"(size {size} here)",
        )
    rng = np.random.default_rng(seed)
    members = np.zeros((count, n_train), dtype=bool)
    for row in members:
        row[rng.choice(n_train, size=size, replace=False)] = True
    return members


@dataclass
class Retraining:
    """Models retrained on subsets with seeds, and their measurements.

    ``subsets``: ``(M, N)`` membership; ``seeds``: ``(S,)`` training seeds, the same list for
    every subset; ``measurements[j, s, q]``: ``log p(completion | prompt)`` of query ``q``
    under the model trained on subset ``j`` with seed ``seeds[s]`` (NaN: not run yet);
    ``seconds[j, s]``: how long that run took; ``settings``: the recipe and anything else that
    must match for a cache to be reused (JSON-serialisable).
    """

    subsets: np.ndarray
    seeds: np.ndarray
    train_ids: list[str]
    train_fingerprint: str
    queries: list[dict]  # {"id", "prompt", "completion"}
    settings: dict
    measurements: np.ndarray = field(default=None)  # type: ignore[assignment]
    seconds: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.subsets = np.asarray(self.subsets, dtype=bool)
        self.seeds = np.asarray(self.seeds, dtype=np.int64)
        shape = (len(self.subsets), len(self.seeds), len(self.queries))
        if self.measurements is None:
            self.measurements = np.full(shape, np.nan)
        if self.seconds is None:
            self.seconds = np.full(shape[:2], np.nan)
        if self.subsets.ndim != 2 or self.subsets.shape[1] != len(self.train_ids):
            raise ParameterError(
                "subsets",
                f"an array of shape {self.subsets.shape}",
                f"(subsets, train) with one column per training id ({len(self.train_ids)})",
            )
        if self.measurements.shape != shape:
            raise ParameterError(
                "measurements",
                f"an array of shape {self.measurements.shape}",
                f"of shape (subsets, seeds, queries) = {shape}",
            )

    @property
    def query_ids(self) -> list[str]:
        return [q["id"] for q in self.queries]

    @property
    def done(self) -> np.ndarray:
        """``(M, S)``: which (subset, seed) runs have been measured."""
        return np.isfinite(self.measurements).all(axis=-1)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def mean_measurements(self) -> np.ndarray:
        """``(M, Q)``: each subset's measurement averaged over seeds (every run must be done)."""
        if not self.complete:
            missing = int((~self.done).sum())
            raise DataError(
                f"{missing} of {self.done.size} retraining runs not measured yet: run retrain "
                "(with this cache) to finish them"
            )
        return self.measurements.mean(axis=1)

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash leaves the previous file intact)."""
        path = Path(path)
        with atomic_h5(path) as f:
            f.attrs.update(
                format=FORMAT,
                version=VERSION,
                settings=json.dumps(self.settings, sort_keys=True),
                queries=json.dumps(self.queries),
                train_fingerprint=self.train_fingerprint,
            )
            f["subsets"] = self.subsets
            f["seeds"] = self.seeds
            f["train_ids"] = np.array(self.train_ids, dtype=object).astype(UTF8)
            f["measurements"] = self.measurements
            f["seconds"] = self.seconds
        return path

    @classmethod
    def load(cls, path: str | Path) -> Retraining:
        """Read a file written by :meth:`save` (no pickles: arrays and JSON text only)."""
        with open_h5(path, FORMAT, VERSION) as f:
            ids = [
                x.decode() if isinstance(x, bytes) else x for x in read_array(f, "train_ids", path)
            ]
            fields = {
                "subsets": read_array(f, "subsets", path),
                "seeds": read_array(f, "seeds", path),
                "train_ids": ids,
                "train_fingerprint": str(f.attrs["train_fingerprint"]),
                "queries": json.loads(f.attrs["queries"]),
                "settings": json.loads(f.attrs["settings"]),
                "measurements": read_array(f, "measurements", path),
                "seconds": read_array(f, "seconds", path),
            }
        try:
            return cls(**fields)
        except ParameterError as err:
            raise FileFormatError(f"{path}: inconsistent retraining ({err})") from err

    def differences(self, other: Retraining) -> list[str]:
        """What differs in the set-up (not the measurements) between two retrainings."""
        diffs = []
        for name in ("train_fingerprint", "queries", "settings", "train_ids"):
            if getattr(self, name) != getattr(other, name):
                diffs.append(name)
        for name in ("subsets", "seeds"):
            a, b = getattr(self, name), getattr(other, name)
            if a.shape != b.shape or not np.array_equal(a, b):
                diffs.append(f"{name} (shape {b.shape} vs {a.shape})")
        return diffs


def _query_records(queries) -> list[dict]:
    return [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries]


def retrain(
    train_fn: Callable[[TextDataset, int], nn.Module],
    train: TextDataset,
    queries,
    subsets: np.ndarray,
    seeds: Sequence[int],
    *,
    cache: str | Path | None = None,
    settings: dict | None = None,
    progress: bool = True,
) -> Retraining:
    """Retrain on every subset with every seed and measure every query.

    ``train_fn(dataset, seed)`` returns a model trained on ``dataset`` (a
    :meth:`TextDataset.subset` of ``train``) from ``seed``; ``settings`` (JSON) describe it,
    e.g. ``recipe.settings()``. With ``cache`` the runs already in that file are reused
    (its subsets, seeds, training set, queries and settings must match, or
    :class:`~influencekit.errors.MismatchError` names what differs) and the file is rewritten
    after each new run, so an interrupted call loses at most the run in progress.
    A measurement that is not finite raises :class:`~influencekit.errors.NonFiniteError`
    naming the subset, seed and query, and is not recorded.
    """
    queries = as_queries(queries)
    runs = Retraining(
        subsets, seeds, train.ids, train.fingerprint(), _query_records(queries), settings or {}
    )
    if cache is not None and Path(cache).exists():
        cached = Retraining.load(cache)
        diffs = runs.differences(cached)
        if diffs:
            raise MismatchError(
                f"{cache}: this retraining cache was made for another set-up; differs in "
                f"{', '.join(diffs)}. Pass another cache path or delete the file."
            )
        runs = cached
    todo = np.argwhere(~runs.done)  # (subset, seed) pairs not yet measured, in order
    with progress_counter(len(todo), desc="retraining", enabled=progress) as bar:
        for j, s in todo:
            start = time.perf_counter()
            model = train_fn(train.subset(np.flatnonzero(runs.subsets[j])), int(runs.seeds[s]))
            values = completion_log_probs(model, queries, train.tokenizer)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise NonFiniteError(
                    f"retraining on subset {j} with seed {runs.seeds[s]}: log p(completion | "
                    f"prompt) of query {queries[bad[0]].id!r} is {values[bad[0]]}"
                )
            runs.measurements[j, s] = values
            runs.seconds[j, s] = time.perf_counter() - start
            if cache is not None:
                runs.save(cache)
            bar.update(1)
    return runs


@dataclass
class LDS:
    """Linear datamodeling scores of one set of influence scores.

    ``per_query``: Spearman correlation over subsets, NaN where undefined (a query whose
    predictions or measurements are all equal; listed in ``undefined``); ``mean``: their
    mean over the defined queries; ``seed_agreement``: per query, the Spearman correlation
    between the measurements averaged over two disjoint halves of the seeds — how
    reproducible the target itself is, a soft ceiling for the LDS (None with one seed).
    """

    per_query: np.ndarray
    query_ids: list[str]
    mean: float
    undefined: list[str]
    seed_agreement: np.ndarray | None


def _scores_for(scores: InfluenceResult | np.ndarray, runs: Retraining) -> np.ndarray:
    if isinstance(scores, InfluenceResult):
        if scores.is_top_k:
            raise ParameterError(
                "scores",
                "a top-k result",
                "a full result: LDS needs every training sequence's score, not a top-k result",
            )
        diffs = []
        if list(scores.train_ids) != runs.train_ids:
            diffs.append("train_ids")
        if list(scores.query_ids) != runs.query_ids:
            diffs.append(f"query_ids ({scores.query_ids} vs {runs.query_ids})")
        if diffs:
            raise MismatchError(f"result and retraining differ in {', '.join(diffs)}")
        scores = scores.scores
    scores = np.asarray(scores, dtype=np.float64)
    want = (len(runs.queries), len(runs.train_ids))
    if scores.shape != want:
        raise ParameterError(
            "scores", f"an array of shape {scores.shape}", f"of shape (queries, train) = {want}"
        )
    if not np.isfinite(scores).all():
        q, i = np.argwhere(~np.isfinite(scores))[0]
        raise NonFiniteError(
            f"score of query {runs.query_ids[q]!r}, training {runs.train_ids[i]!r}"
        )
    return scores


def lds(scores: InfluenceResult | np.ndarray, runs: Retraining) -> LDS:
    """The LDS of ``scores`` (an :class:`InfluenceResult` or a ``(queries, train)`` array in
    the retraining's order) against the measured retraining ``runs``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> tau = rng.normal(size=(1, 30))
        >>> subsets = random_subsets(30, 20)
        >>> runs = Retraining(subsets, [0], [str(i) for i in range(30)], "", [{"id": "q"}], {},
        ...                   measurements=(subsets @ tau.T)[:, None, :])
        >>> round(lds(tau, runs).mean, 6), round(lds(-tau, runs).mean, 6)
        (1.0, -1.0)
    """
    values = _scores_for(scores, runs)
    predicted = runs.subsets.astype(np.float64) @ values.T  # (M, Q)
    per_query = spearman_columns(predicted, runs.mean_measurements())
    defined = np.isfinite(per_query)
    agreement = None
    if len(runs.seeds) >= 2:
        half = len(runs.seeds) // 2
        first = runs.measurements[:, :half].mean(1)
        second = runs.measurements[:, half : 2 * half].mean(1)
        agreement = spearman_columns(first, second)
    return LDS(
        per_query=per_query,
        query_ids=runs.query_ids,
        mean=float(per_query[defined].mean()) if defined.any() else float("nan"),
        undefined=[q for q, ok in zip(runs.query_ids, defined, strict=True) if not ok],
        seed_agreement=agreement,
    )
