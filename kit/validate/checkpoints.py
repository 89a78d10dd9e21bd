"""Multi-checkpoint influence: influence summed over snapshots taken during training.

Influence functions linearise around the final weights, so a training sequence that mattered
early (before a phase of training that later changed what the model relies on) is invisible
to them. Summing influence over several checkpoints ``θ_c``, each with its *own* EK-FAC
factors and damping,

    I_multi(q, z) = Σ_c w_c · I_c(q, z),      w_c = η_c / Σ_c' η_c',

with ``η_c`` the learning rate summed over the steps since the previous checkpoint (how far
training moved under checkpoint ``c``'s geometry, as in TracIn), sees some of that history.
The weights sum to 1, so the combined score has the scale of one checkpoint's.

Example:
    >>> model, snaps = recipe.train(train, seed=0, checkpoints=4)            # doctest: +SKIP
    >>> models = [c.load_into(copy.deepcopy(model)) for c in snaps]          # doctest: +SKIP
    >>> results = checkpoint_results(models, queries, train)                 # doctest: +SKIP
    >>> combined = combine_checkpoints(results, lr_weights(snaps))          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from ..data import TextDataset
from ..errors import MismatchError, ParameterError
from ..factors import fit_factors
from ..result import InfluenceResult
from ..scoring import score
from ..training import Checkpoint


def lr_weights(checkpoints: Sequence[Checkpoint]) -> np.ndarray:
    """Each checkpoint's share of the summed learning rate (``lr_sum`` normalised to sum 1).

    Example:
        >>> lr_weights([Checkpoint(10, 3.0, {}), Checkpoint(20, 1.0, {})]).tolist()
        [0.75, 0.25]
    """
    sums = np.array([c.lr_sum for c in checkpoints], dtype=np.float64)
    if not len(sums) or (sums < 0).any() or sums.sum() <= 0:
        raise ParameterError(
            "checkpoints",
            f"lr_sum {sums.tolist()}",
            "a non-empty list with non-negative lr_sum and a positive total",
        )
    return sums / sums.sum()


def checkpoint_results(
    models: Sequence[nn.Module],
    queries,
    train: TextDataset,
    *,
    modules: str | list[str] = "mlp",
    strategy: str = "ekfac",
    damping: float | Mapping[str, float] | None = None,
    progress: bool = True,
    **score_options,
) -> list[InfluenceResult]:
    """One :class:`InfluenceResult` per checkpoint model: factors fitted on ``train`` at that
    checkpoint, then every training sequence scored there (``damping`` and
    ``score_options`` as in :func:`~influencekit.score`; the default damping is each
    checkpoint's own ``0.1 × mean(Λ)``)."""
    results = []
    for model in models:
        factors = fit_factors(model, train, modules, strategy=strategy, progress=progress)
        results.append(
            score(
                model, factors, queries, train, damping=damping, progress=progress, **score_options
            )
        )
    return results


def combine_checkpoints(
    results: Sequence[InfluenceResult], weights: Sequence[float]
) -> InfluenceResult:
    """``Σ_c weights[c] · results[c]``, layer by layer: one result with the checkpoints'
    shared layers, training ids and queries (``meta["checkpoints"]`` records the weights).

    Example:
        >>> a = InfluenceResult(np.ones((1, 2, 1)), ["l"], ["x", "y"], ["q"])
        >>> combine_checkpoints([a, a], [0.25, 0.75]).scores.tolist()
        [[1.0, 1.0]]
    """
    if len(results) != len(weights) or not results:
        raise ParameterError(
            "weights",
            f"{len(weights)} weights for {len(results)} results",
            "one weight per result (and at least one result)",
        )
    first = results[0]
    for c, r in enumerate(results[1:], start=1):
        diffs = [
            name
            for name in ("layers", "train_ids", "query_ids")
            if list(getattr(r, name)) != list(getattr(first, name))
        ]
        if r.is_top_k or first.is_top_k:
            diffs.append("top-k (combine full results only)")
        if diffs:
            raise MismatchError(f"checkpoint {c} differs from checkpoint 0 in {', '.join(diffs)}")
    total = sum(float(w) * r.layer_scores for w, r in zip(weights, results, strict=True))
    meta = dict(first.meta)
    meta["checkpoints"] = [
        {"weight": float(w), **{k: r.meta.get(k) for k in ("model_fingerprint", "damping")}}
        for w, r in zip(weights, results, strict=True)
    ]
    for key in ("model_fingerprint", "damping"):  # per checkpoint now
        meta.pop(key, None)
    return InfluenceResult(
        total,
        list(first.layers),
        list(first.train_ids),
        list(first.query_ids),
        meta,
        queries=first.queries,
    )
