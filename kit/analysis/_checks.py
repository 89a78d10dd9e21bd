"""Argument checks shared by the analyses: each names the argument and what is wrong."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import checks
from ..errors import DataError, ParameterError
from ..result import InfluenceResult


def _check_int(name: str, value, minimum: int = 1) -> None:
    checks.count(name, value, minimum=minimum)


def _check_result(result) -> None:
    checks.instance("result", result, InfluenceResult, "an InfluenceResult")


def _check_query(result: InfluenceResult, q) -> None:
    _check_result(result)
    last = len(result.query_ids) - 1
    checks.count("q", q, minimum=0, maximum=last, allowed=f"a query index in 0..{last}")


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
    """Query ``q``'s prompt + completion, from ``result.queries``."""
    if result.queries is None:
        raise DataError(
            "result.queries is missing (score records them; a result file keeps them in "
            "meta['queries']): pass query_text="
        )
    query = result.queries[q]
    return query.prompt + query.completion


def _scores(scores, name: str = "scores") -> np.ndarray:
    """All entries of ``scores`` as a flat float array, refusing NaN/inf."""
    values = np.ravel(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ParameterError(name, f"NaN or inf in {bad} entries", "finite numbers")
    return values
