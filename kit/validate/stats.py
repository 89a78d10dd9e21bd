"""Correlations between sets of scores: how validation compares the kit with a ground truth.

Example:
    >>> x = np.array([[1.0, 5.0], [2.0, 4.0], [3.0, 6.0]])
    >>> spearman_columns(x, np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])).tolist()
    [1.0, 0.5]
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import ParameterError


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` with the same column of ``y`` (ties get
    average ranks); NaN for a column in which either side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=0), rankdata(y, axis=0)
    rx, ry = rx - rx.mean(0), ry - ry.mean(0)
    denom = np.sqrt((rx**2).sum(0) * (ry**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(0) / np.where(denom > 0, denom, 1), np.nan)


def compare(kit_scores: np.ndarray | Iterable, pbrf: np.ndarray | Iterable) -> dict:
    """Pearson and Spearman correlation of kit scores with PBRF responses.

    Both ``(n_queries, n_indices)`` (the same columns). Returns ``{"per_query": [{"pearson",
    "spearman", "scale"}, ...], "overall": {...}}``; ``scale`` is the least-squares slope of
    kit on PBRF through the origin (1 when the magnitudes agree too). ``overall`` pools every
    pair.

    Example:
        >>> out = compare([[1.0, 2.0, 3.0]], [[2.0, 4.0, 6.5]])
        >>> round(out["overall"]["spearman"], 3), round(out["per_query"][0]["scale"], 2)
        (1.0, 0.47)
    """
    kit = np.atleast_2d(np.asarray(kit_scores, dtype=np.float64))
    truth = np.atleast_2d(np.asarray(pbrf, dtype=np.float64))
    if kit.shape != truth.shape:
        raise ParameterError(
            "pbrf",
            pbrf,
            f"of the shape of kit_scores (shapes differ: kit {kit.shape}, pbrf {truth.shape})",
        )

    def stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {
            "pearson": float(np.corrcoef(x, y)[0, 1]),
            "spearman": float(spearman_columns(x[:, None], y[:, None])[0]),
            "scale": float(x @ y / (y @ y)),
        }

    return {
        "per_query": [stats(k, t) for k, t in zip(kit, truth, strict=True)],
        "overall": stats(kit.ravel(), truth.ravel()),
    }
