"""Validation of influence scores against ground truths that do not use the kit's approximations.

:mod:`influencekit.validate.pbrf`: the proximal Bregman response function (Bae et al. 2022),
the quantity influence functions approximate, optimised directly on a small model.

Example:
    >>> from influencekit.validate import compare, pbrf_scores
    >>> truth = pbrf_scores(model, train, queries, [0, 1, 2], damping=1e-3)  # doctest: +SKIP
    >>> compare(result.scores[:, [0, 1, 2]], truth)["overall"]                 # doctest: +SKIP
"""

from .pbrf import (
    PBRFInfo,
    compare,
    kl_divergence,
    minimise_pbrf,
    pbrf_response,
    pbrf_scores,
)

__all__ = [
    "PBRFInfo",
    "compare",
    "kl_divergence",
    "minimise_pbrf",
    "pbrf_response",
    "pbrf_scores",
]
