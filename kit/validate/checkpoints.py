"""Multi-checkpoint influence: influence summed over snapshots taken during training.

Influence functions linearise around the final weights, so a training sequence that mattered
early (before a phase of training that later changed what the model relies on) is invisible
to them. Summing influence over several checkpoints ``θ_c``, each with its *own* EK-FAC
factors and damping,

    I_multi(q, z) = Σ_c w_c · I_c(q, z),      w_c = η_c / Σ_c' η_c',

with ``η_c`` the learning rate summed over the steps since the previous checkpoint (how far
training moved under checkpoint ``c``'s geometry, as in TracIn), sees some of that history.
The weights sum to 1, so the combined score has the scale of one checkpoint's.

Checkpoints saved during a ``transformers`` Trainer run by
:class:`influencekit.integrations.InfluenceCallback` (one folder each: weights, factors, the
step and ``η_c``) are read back by :func:`saved_checkpoints` and combined by
:func:`combine_saved`.

Example:
    >>> model, snaps = recipe.train(train, seed=0, checkpoints=4)            # doctest: +SKIP
    >>> models = [c.load_into(copy.deepcopy(model)) for c in snaps]          # doctest: +SKIP
    >>> results = checkpoint_results(models, queries, train)                 # doctest: +SKIP
    >>> combined = combine_checkpoints(results, lr_weights(snaps))          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..data import TextDataset
from ..errors import FileFormatError, MismatchError, MissingFileError, ParameterError
from ..factors import Factors
from ..fitting import fit_factors
from ..result import InfluenceResult
from ..scoring import score
from ..training import Checkpoint

CHECKPOINT_FILE = "checkpoint.json"  # step, lr_sum, epoch: what makes a folder a checkpoint
WEIGHTS_FILE = "weights.safetensors"
FACTORS_FILE = "factors.h5"
STORE_FILE = "store.h5"


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


# ---------------------------------------------------------------------------------------------
# Checkpoints saved to folders during a training run


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint folder: the weights after ``step`` optimiser steps, the factors fitted
    there, and ``lr_sum``, the learning rate summed over the steps since the previous one."""

    folder: Path
    step: int
    lr_sum: float
    epoch: float | None = None

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy these weights into ``model`` (the run's architecture); return it in eval mode."""
        from safetensors.torch import load_model

        try:
            missing, unexpected = load_model(model, self.folder / WEIGHTS_FILE, strict=False)
        except Exception as err:
            raise FileFormatError(f"{self.folder / WEIGHTS_FILE}: {err}") from err
        if missing or unexpected:
            raise MismatchError(
                f"{self.folder / WEIGHTS_FILE}: weights of another model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        return model.eval()

    def factors(self) -> Factors:
        return Factors.load(self.folder / FACTORS_FILE)

    def store(self):
        """The gradient store built at this checkpoint, or ``None``."""
        from ..store import GradientStore

        path = self.folder / STORE_FILE
        return GradientStore.open(path) if path.exists() else None


def save_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    factors: Factors,
    *,
    step: int,
    lr_sum: float,
    epoch: float | None = None,
) -> SavedCheckpoint:
    """Write one checkpoint folder (weights as safetensors, factors, then ``checkpoint.json``
    last: a folder without it is an interrupted write, which :func:`saved_checkpoints` skips).

    Example:
        >>> save_checkpoint("run/influence/step-000100", model, factors, step=100,
        ...                 lr_sum=0.05)                                    # doctest: +SKIP
    """
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / WEIGHTS_FILE))  # shared (tied) tensors once
    factors.save(folder / FACTORS_FILE)
    record = {"step": int(step), "lr_sum": float(lr_sum), "epoch": epoch}
    partial = folder / (CHECKPOINT_FILE + ".partial")
    partial.write_text(json.dumps(record) + "\n", encoding="utf-8")
    partial.replace(folder / CHECKPOINT_FILE)
    return SavedCheckpoint(folder, int(step), float(lr_sum), epoch)


def saved_checkpoints(folder: str | os.PathLike) -> list[SavedCheckpoint]:
    """Every checkpoint saved under ``folder`` (one sub-folder each), in step order.

    Example:
        >>> [c.step for c in saved_checkpoints("run/influence")]          # doctest: +SKIP
        [100, 200, 300]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such folder of saved checkpoints")
    found = []
    for record_path in sorted(folder.glob(f"*/{CHECKPOINT_FILE}")):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            step, lr_sum = int(record["step"]), float(record["lr_sum"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FileFormatError(f"{record_path}: not a checkpoint record ({err})") from err
        found.append(SavedCheckpoint(record_path.parent, step, lr_sum, record.get("epoch")))
    if not found:
        raise MissingFileError(f"{folder}: holds no saved checkpoint ({CHECKPOINT_FILE})")
    return sorted(found, key=lambda c: c.step)


def combine_saved(
    model: nn.Module,
    folder: str | os.PathLike,
    queries,
    train: TextDataset | None = None,
    *,
    stores: bool = True,
    progress: bool = True,
    **score_options,
) -> InfluenceResult:
    """Multi-checkpoint influence of a training run saved under ``folder``: each checkpoint's
    weights loaded into a copy of ``model``, scored with its own factors (against its own
    store where one was built and ``stores`` is true, else on the fly over ``train``), and
    combined with weights ``lr_sum / Σ lr_sum`` (:func:`lr_weights`).

    Example:
        >>> result = combine_saved(model, "run/influence", queries, train)   # doctest: +SKIP
    """
    saved = saved_checkpoints(folder)
    weights = lr_weights(saved)
    results = []
    for checkpoint in saved:
        source = checkpoint.store() if stores else None
        if source is None:
            if train is None:
                raise ParameterError(
                    "train", None, f"a TextDataset ({checkpoint.folder} holds no {STORE_FILE})"
                )
            source = train
        at = checkpoint.load_into(copy.deepcopy(model))
        results.append(
            score(at, checkpoint.factors(), queries, source, progress=progress, **score_options)
        )
    return combine_checkpoints(results, weights)
