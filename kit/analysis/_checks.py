"""Argument checks shared by the analyses: each names the argument and what is wrong."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from ..result import InfluenceResult


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_query(result: InfluenceResult, q) -> None:
    n = len(result.query_ids)
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q < n:
        raise ValueError(f"q must be a query index in 0..{n - 1}, got {q!r}")


def _check_dataset(result: InfluenceResult, dataset: Sequence) -> None:
    """The dataset must be the one the result was scored on: same ids, same order."""
    ids = [ex.id for ex in dataset]
    if ids == result.train_ids:
        return
    if len(ids) != len(result.train_ids):
        raise DataError(
            f"dataset has {len(ids)} sequences but the result scored {len(result.train_ids)}; "
            f"pass the training set the result was scored on"
        )
    i = next(i for i, (a, b) in enumerate(zip(ids, result.train_ids, strict=True)) if a != b)
    raise DataError(
        f"dataset does not match the result: position {i} holds id {ids[i]!r}, the result "
        f"{result.train_ids[i]!r}"
    )


def _query_text(result: InfluenceResult, q: int) -> str:
    queries = result.meta.get("queries")
    if not isinstance(queries, list) or len(queries) != len(result.query_ids):
        raise DataError(
            "result.meta['queries'] is missing or does not list every query; pass query_text="
        )
    return queries[q]["prompt"] + queries[q]["completion"]


def _scores(scores, name: str = "scores") -> np.ndarray:
    """All entries of ``scores`` as a flat float array, refusing NaN/inf."""
    values = np.ravel(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds NaN or inf ({int((~np.isfinite(values)).sum())} entries)")
    return values
