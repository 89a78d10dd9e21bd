"""How a pass over data runs: one frozen settings object for fit, build and score.

:class:`RunSettings` holds what every pass of the model over data shares (batch size,
device, accumulation dtype, autocast dtype, progress bars), validated once when it is made,
and runs the capture loop (:func:`influencekit.hooks.capture_batches`) with them. Each public
entry point (``fit_factors``, ``GradientStore.build``, ``score``) takes these as keyword
arguments, makes one ``RunSettings`` and passes it down.

Example:
    >>> run = RunSettings(batch_size=4, dtype="float64")
    >>> run.batch_size, run.dtype
    (4, torch.float64)
    >>> RunSettings(batch_size=0)
    Traceback (most recent call last):
    ...
    influencekit.errors.ParameterError: batch_size must be an int >= 1, got 0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import checks, distributed
from .data import Batch
from .hooks import LayerIO, capture_batches
from .models import TrackedLayer, model_device, resolve_device


@dataclass(frozen=True)
class RunSettings:
    """Batch size, device, accumulation ``dtype`` (float32/float64), autocast ``amp_dtype``
    (bf16/fp16 forward, or None) and whether to show progress bars.

    ``device=None`` means wherever the model is; :meth:`on` resolves it for one model.
    """

    batch_size: int = 8
    device: torch.device | None = None
    dtype: torch.dtype = torch.float32
    amp_dtype: torch.dtype | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        canonical = {
            "batch_size": checks.count("batch_size", self.batch_size),
            "device": checks.device("device", self.device),
            "dtype": checks.accumulation_dtype("dtype", self.dtype),
            "amp_dtype": checks.amp_dtype("amp_dtype", self.amp_dtype),
            "progress": checks.flag("progress", self.progress),
        }
        for name, value in canonical.items():
            object.__setattr__(self, name, value)

    def on(self, model: nn.Module) -> RunSettings:
        """These settings for ``model``: its device when none was given, else the model is
        moved to the given device."""
        return dataclasses.replace(self, device=resolve_device(model, self.device))

    def replace(self, **changes) -> RunSettings:
        """A copy with ``changes`` (validated like the original)."""
        return dataclasses.replace(self, **changes)

    def n_batches(self, n_examples: int) -> int:
        return -(-n_examples // self.batch_size)

    def captures(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        batches: Iterable[Batch],
        *,
        desc: str,
        total: int | None = None,
        example_ids: Sequence[str] | Mapping[int, str] | None = None,
        targets: str = "real",
        seed: int = 0,
        progress: bool = True,
    ) -> Iterator[tuple[Batch, dict[str, LayerIO]]]:
        """Each batch's per-layer inputs and output gradients, captured with these settings.

        ``progress=False`` silences this pass whatever the settings say; under ``torchrun``
        only rank 0 shows a bar.
        """
        return capture_batches(
            model,
            layers,
            batches,
            device=self.device or model_device(model),
            total=total,
            desc=desc,
            progress=progress and self.progress and distributed.is_main(),
            example_ids=example_ids,
            targets=targets,
            seed=seed,
            dtype=self.dtype,
            amp_dtype=self.amp_dtype,
        )
