"""Influence during a ``transformers`` Trainer run: checkpoints for multi-checkpoint influence.

:class:`InfluenceCallback` fits EK-FAC factors on a sample of the training set at chosen
steps (and, if asked, at each epoch's end and with a gradient store), and saves each with
the model's weights, its step, and the learning rate summed over the steps since the
previous one. :func:`influencekit.validate.checkpoints.combine_saved` turns the saved
folders into multi-checkpoint influence. Training itself is left exactly as it was: the
fit runs in eval mode without parameter gradients, and every random generator's state is
restored afterwards, so the loss curve is the same with and without the callback.

Example:
    >>> from influencekit.integrations import InfluenceCallback
    >>> callback = InfluenceCallback(train, steps=[100, 200, 300])          # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
    >>> result = ik.validate.combine_saved(model, callback.folder, queries, train)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from . import checks, distributed
from .data import TextDataset
from .errors import ParameterError
from .fitting import fit_factors
from .validate.checkpoints import STORE_FILE, save_checkpoint

FOLDER = "influence"  # under the run's output_dir


class InfluenceCallback(TrainerCallback):
    """Save EK-FAC checkpoints of a Trainer run, for multi-checkpoint influence.

    ``train``: the training sequences as a :class:`~influencekit.TextDataset` (the same text
    the Trainer sees); factors are fitted on ``max_examples`` of them, a seeded random sample.
    ``steps``: optimizer steps after which to save; ``every_epoch``: also at each epoch's end.
    ``store=True`` also builds a gradient store of all of ``train`` at each checkpoint
    (``store_options`` go to :meth:`GradientStore.build <influencekit.GradientStore.build>`).
    ``folder``: where checkpoints go (default ``<output_dir>/influence``), one sub-folder
    ``step-NNNNNN`` each. ``modules``, ``strategy``, ``batch_size`` as for ``fit_factors``.

    Example:
        >>> callback = InfluenceCallback(train, steps=[50, 100], max_examples=128)  # doctest: +SKIP
    """

    def __init__(
        self,
        train: TextDataset,
        *,
        steps: Iterable[int] = (),
        every_epoch: bool = False,
        modules: str | list[str] = "mlp",
        strategy: str = "ekfac",
        max_examples: int | None = 256,
        store: bool = False,
        store_options: dict | None = None,
        folder: str | os.PathLike | None = None,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        checks.instance("train", train, TextDataset, "a TextDataset")
        self.train = train
        self.steps = {checks.count("steps", s) for s in steps}
        self.every_epoch = checks.flag("every_epoch", every_epoch)
        if not self.steps and not self.every_epoch:
            raise ParameterError("steps", list(steps), "at least one step, or every_epoch=True")
        self.modules, self.strategy = modules, strategy
        n = len(train) if max_examples is None else checks.count("max_examples", max_examples)
        self.sample = _sample(len(train), n, seed)
        self.store = checks.flag("store", store)
        self.store_options = dict(store_options or {})
        self.folder = None if folder is None else Path(folder)
        self.batch_size, self.seed, self.progress = batch_size, seed, progress
        self.lr_sum = 0.0  # learning rates of the steps since the last checkpoint
        self.saved: list[Path] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.folder is None:
            self.folder = Path(args.output_dir) / FOLDER

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # after the step, before the scheduler's: the rate this step was taken with
        self.lr_sum += float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self._save(model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every_epoch and not self._saved_at(state.global_step):
            self._save(model, state)

    def _saved_at(self, step: int) -> bool:
        return bool(self.saved) and self.saved[-1].name == _name(step)

    def _save(self, model, state) -> None:
        with _untouched_training(model):
            sample = self.train.subset(self.sample)
            factors = fit_factors(
                model,
                sample,
                self.modules,
                strategy=self.strategy,
                seed=self.seed,
                batch_size=self.batch_size,
                progress=self.progress,
            )
            folder = self.folder / _name(state.global_step)
            if distributed.is_main():
                step, lr_sum, epoch = state.global_step, self.lr_sum, state.epoch
                save_checkpoint(folder, model, factors, step=step, lr_sum=lr_sum, epoch=epoch)
            if self.store:
                from .store import GradientStore

                GradientStore.build(
                    folder / STORE_FILE,
                    model,
                    self.train,
                    factors=factors,
                    progress=self.progress,
                    **self.store_options,
                )
        self.saved.append(folder)
        self.lr_sum = 0.0


def _name(step: int) -> str:
    return f"step-{step:06d}"


def _sample(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``n`` positions, a seeded random sample in increasing order (all if k ≥ n)."""
    if k >= n:
        return list(range(n))
    picked = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return sorted(int(i) for i in picked)


@contextlib.contextmanager
def _untouched_training(model) -> Iterator[None]:
    """Leave the training run as it was: every random generator's state (dropout and data
    order draw from them), the module modes and the parameters' ``.grad``."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for p, grad in grads:
            p.grad = grad
        for m, mode in modes:
            m.training = mode
