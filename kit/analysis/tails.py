"""Influence distribution: the heavy, power-law-like upper tail of a query's scores.

Example:
    >>> import numpy as np
    >>> top_share(np.array([8.0, 1.0, 1.0, -2.0]), fraction=0.25)
    0.8
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import DataError, MissingDependencyError, ParameterError
from ._checks import _scores

MIN_TAIL = 10  # fewer tail points than this give no usable exponent


def tail_fit(scores, *, xmin: float | None = None, tail: float = 0.1) -> dict:
    """Power-law fit of the upper tail of the positive scores, tested against an exponential.

    ``xmin`` defaults to the ``1 - tail`` quantile of the positive scores; the fit uses every
    score ``x >= xmin``. The exponent is the continuous maximum-likelihood estimate of Clauset,
    Shalizi & Newman (2009), ``alpha = 1 + n / Σ ln(x / xmin)``, standard error
    ``(alpha - 1) / sqrt(n)``. The alternative is an exponential tail ``x - xmin ~ Exp(rate)``
    with ``rate = 1 / mean(x - xmin)`` (its MLE). ``loglik_ratio`` is ``R = Σ ln p_pl(x) -
    ln p_exp(x)``; ``p_value`` is Vuong's two-sided test of ``R / (σ sqrt(n))`` against a
    standard normal (σ: the pointwise differences' standard deviation). ``favours`` is
    ``"power law"`` (R > 0) or ``"exponential"`` (R < 0) when ``p_value <= 0.1``, else
    ``"neither"``. Raises :class:`~influencekit.errors.DataError` (a ``ValueError``) with
    fewer than 10 tail points.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).pareto(1.5, 20_000) + 1.0  # density ∝ x^-2.5
        >>> fit = tail_fit(x)
        >>> round(fit["alpha"], 1), fit["n_tail"], fit["favours"]
        (2.5, 2000, 'power law')
    """
    positive = _scores(scores)
    positive = positive[positive > 0]
    if xmin is None:
        _check_fraction("tail", tail)
        if positive.size < MIN_TAIL:
            raise DataError(
                f"scores: {positive.size} positive score(s); tail_fit needs at least {MIN_TAIL}"
            )
        xmin = float(np.quantile(positive, 1 - tail))
    elif not _is_number(xmin) or not xmin > 0:
        raise ParameterError("xmin", xmin, "> 0 (or None: the 1 - tail quantile)")
    x = positive[positive >= xmin]
    n = x.size
    if n < MIN_TAIL:
        raise DataError(
            f"scores: {n} positive score(s) >= xmin = {xmin:.4g}; tail_fit needs at least "
            f"{MIN_TAIL} (lower xmin or raise tail)"
        )
    log_ratio = np.log(x / xmin).sum()
    if log_ratio == 0:
        raise DataError(f"scores: every tail score equals xmin = {xmin:.4g}; no slope to fit")
    alpha = 1 + n / log_ratio
    from scipy import stats  # lazy: a slow import

    # scipy's Pareto(b) has density ∝ x^-(b + 1), so b = alpha - 1.
    ll_power = stats.pareto.logpdf(x, alpha - 1, scale=xmin)
    ll_exp = stats.expon.logpdf(x, loc=xmin, scale=np.mean(x - xmin))
    diff = ll_power - ll_exp
    ratio = float(diff.sum())
    spread = float(diff.std())
    z = ratio / (spread * math.sqrt(n)) if spread > 0 else 0.0
    p_value = float(2 * stats.norm.sf(abs(z)))
    if p_value > 0.1:
        favours = "neither"
    else:
        favours = "power law" if ratio > 0 else "exponential"
    return {
        "alpha": float(alpha),
        "alpha_se": float((alpha - 1) / math.sqrt(n)),
        "xmin": float(xmin),
        "n_tail": int(n),
        "loglik_ratio": ratio,
        "p_value": p_value,
        "favours": favours,
    }


def top_share(scores, fraction: float = 0.01) -> float:
    """Share of the total positive influence held by the top ``fraction`` of sequences.

    ``scores`` is one query's row (all entries are taken); the top ``round(fraction × N)``
    sequences, at least 1, count with their positive scores. 0.0 when no score is positive.

    Example:
        >>> top_share([5.0, 3.0, 2.0, 0.0, -1.0], fraction=0.4)
        0.8
    """
    values = _scores(scores)
    _check_fraction("fraction", fraction)
    total = values[values > 0].sum()
    if values.size == 0 or total == 0:
        return 0.0
    count = max(1, round(fraction * values.size))
    top = np.sort(values)[::-1][:count]
    return float(top[top > 0].sum() / total)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _check_fraction(name: str, value) -> None:
    if not _is_number(value) or not 0 < value <= 1:
        raise ParameterError(name, value, "in (0, 1]")


def ccdf(scores) -> tuple[np.ndarray, np.ndarray]:
    """The positive scores, ascending, and their empirical CCDF ``P(X >= x)``, for log-log plots.

    Example:
        >>> x, p = ccdf([4.0, -1.0, 1.0, 2.0, 8.0])
        >>> x.tolist(), p.tolist()
        ([1.0, 2.0, 4.0, 8.0], [1.0, 0.75, 0.5, 0.25])
    """
    values = _scores(scores)
    x = np.sort(values[values > 0])
    return x, 1.0 - np.arange(x.size) / x.size


def plot_tail(scores, ax=None, fit: dict | None = None):
    """Log-log plot of the scores' CCDF, with the fitted power law of :func:`tail_fit` if given.

    Needs matplotlib (imported only here). Returns the axes.

    Example:
        >>> ax = plot_tail(scores, fit=tail_fit(scores))  # doctest: +SKIP
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError("plot_tail needs matplotlib: pip install matplotlib") from err
    x, p = ccdf(scores)
    if ax is None:
        _, ax = plt.subplots()
    ax.loglog(x, p, ".", markersize=3, label="positive scores")
    if fit is not None:
        tail = x[x >= fit["xmin"]]
        # The tail's CCDF is (x / xmin)^(1 - alpha), scaled by the share of scores in the tail.
        level = tail.size / max(x.size, 1)
        fitted = level * (tail / fit["xmin"]) ** (1 - fit["alpha"])
        ax.loglog(tail, fitted, "-", label=f"power law, alpha = {fit['alpha']:.2f}")
    ax.set_xlabel("influence score")
    ax.set_ylabel("P(score >= x)")
    ax.legend()
    return ax
