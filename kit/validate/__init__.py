"""Validation of influence scores against ground truths that do not use the kit's approximations.

- :mod:`~influencekit.validate.pbrf`: the proximal Bregman response function (Bae et al.
  2022), the quantity influence functions approximate, optimised directly on a small model.
- :mod:`~influencekit.validate.exact`: the exact damped Gauss–Newton influence (the ε → 0
  limit of PBRF) by conjugate gradient, with no EK-FAC approximation.
- :mod:`~influencekit.validate.lds`: the linear datamodeling score (Park et al. 2023):
  models retrained on random half-subsets, measured, and cached.
- :mod:`~influencekit.validate.checkpoints`: influence summed over training checkpoints.
- :mod:`~influencekit.validate.replay`: the exact metagradient of a query's measurement with
  respect to each training sequence's weight, by replaying training backwards.
- :mod:`~influencekit.validate.setting`: the small retrainable model and corpus slice that
  ``benchmarks/validate.py`` and ``notebooks/03_validation.ipynb`` measure.

Example:
    >>> from influencekit.validate import compare, pbrf_scores
    >>> truth = pbrf_scores(model, train, queries, [0, 1, 2], damping=1e-3)  # doctest: +SKIP
    >>> compare(result.scores[:, [0, 1, 2]], truth)["overall"]                 # doctest: +SKIP
    >>> lds(result, Retraining.load(SHIPPED_RUNS)).mean   # doctest: +SKIP
"""

from .checkpoints import (
    SavedCheckpoint,
    checkpoint_results,
    combine_checkpoints,
    combine_saved,
    lr_weights,
    save_checkpoint,
    saved_checkpoints,
)
from .exact import SolveInfo, conjugate_gradient, exact_influence
from .lds import LDS, Retraining, lds, random_subsets, retrain
from .measure import completion_log_probs
from .pbrf import (
    PBRFInfo,
    kl_divergence,
    minimise_pbrf,
    pbrf_response,
    pbrf_scores,
)
from .replay import Replay, metagradient_scores, replay_training
from .setting import SHIPPED_RUNS, Recipe, Setting, load_setting
from .stats import compare, spearman_columns

__all__ = [
    "LDS",
    "SHIPPED_RUNS",
    "PBRFInfo",
    "Recipe",
    "Replay",
    "Retraining",
    "SavedCheckpoint",
    "Setting",
    "SolveInfo",
    "checkpoint_results",
    "combine_checkpoints",
    "combine_saved",
    "compare",
    "completion_log_probs",
    "conjugate_gradient",
    "exact_influence",
    "kl_divergence",
    "lds",
    "load_setting",
    "lr_weights",
    "metagradient_scores",
    "minimise_pbrf",
    "pbrf_response",
    "pbrf_scores",
    "random_subsets",
    "replay_training",
    "retrain",
    "save_checkpoint",
    "saved_checkpoints",
    "spearman_columns",
]
