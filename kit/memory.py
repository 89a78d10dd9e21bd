"""Memory budgets: how many bytes a stage may use, and how its layers are grouped to stay under.

Fitting, building and scoring hold per-layer state whose size grows with the layers' widths
(covariances, eigenbases, preconditioned queries). Each takes ``max_memory=``: bytes, or a
string such as ``"8GiB"``; by default ``DEFAULT_SHARE`` of the memory free on the device the
stage runs on (the host's available memory, or the GPU's free memory). A stage estimates what
each tracked layer costs it and what it needs whatever the layers (:class:`Plan`), then
splits the layers into consecutive groups, each done in a pass of its own over the data, so
that one group's state and the fixed part stay under the budget. One group means one pass,
as without a budget; more groups cost one more pass over the data each.

The estimates are upper bounds of the arrays a stage allocates, in the dtype it allocates
them; the memory the model's own forward and backward take is estimated from its shapes
(:func:`activation_bytes`). ``benchmarks/scaling.py --probe 1b`` measures what the process
really holds against the budget.

Example:
    >>> parse_bytes("8GiB", "max_memory"), describe(3 * 2**30)
    (8589934592, '3.0 GiB')
    >>> plan = Plan([5, 5, 5, 5], fixed=2, limit=12)
    >>> plan.groups
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import ParameterError


class OverBudgetWarning(UserWarning):
    """A stage goes on with more memory than ``max_memory`` allows: one layer (or the
    stage's fixed part) needs more than the budget holds."""


DEFAULT_SHARE = 0.5  # of the free memory, when max_memory is not given
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(value, name: str = "budget") -> int:
    """``131072``, ``"128KiB"``, ``"660 KB"``, ``"1.5GiB"`` -> bytes (an int >= 1); a
    :class:`ParameterError` naming ``name`` otherwise.

    Example:
        >>> parse_bytes("128KiB"), parse_bytes(660_000), parse_bytes("1.5 MiB")
        (131072, 660000, 1572864)
    """
    allowed = "a number of bytes >= 1, as an int or a string such as '128KiB' or '8GiB'"
    if isinstance(value, bool):
        raise ParameterError(name, value, allowed)
    if isinstance(value, (int, np.integer)):
        if value < 1:
            raise ParameterError(name, value, allowed)
        return int(value)
    if isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if found and found.group(2).lower() in UNITS:
            count = float(found.group(1)) * UNITS[found.group(2).lower()]
            if count >= 1:
                return int(count)
    raise ParameterError(name, value, allowed)


def describe(n_bytes: float) -> str:
    """A byte count for people: ``"3.0 GiB"``, ``"512 KiB"``, ``"17 B"``.

    Example:
        >>> describe(1536), describe(17)
        ('1.5 KiB', '17 B')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}".replace(".0 KiB", " KiB")
    return f"{int(n_bytes)} B"


def free_bytes(device: torch.device | None = None) -> int:
    """Memory free now: on a CUDA ``device`` its free memory, else the host's available
    memory (``MemAvailable`` of ``/proc/meminfo``, or free pages where that is missing)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other Unixes
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to ask
        return 8 * 2**30


def max_memory(value, device: torch.device | None = None) -> int:
    """The byte budget of one stage: ``value`` parsed (:func:`parse_bytes`), or
    ``DEFAULT_SHARE`` of :func:`free_bytes` on ``device`` when ``value`` is None.

    Example:
        >>> max_memory("2GiB")
        2147483648
    """
    if value is None:
        return max(1, int(DEFAULT_SHARE * free_bytes(device)))
    return parse_bytes(value, "max_memory")


@dataclass
class Plan:
    """Consecutive groups of layers whose per-layer bytes ``costs`` fit, with ``fixed``
    bytes, under ``limit``. A layer that does not fit even alone makes a group of its own
    (``over`` then lists it: the stage goes on, over the budget, and says so with
    :meth:`warn_if_over`).

    Example:
        >>> Plan([4, 4, 10], fixed=1, limit=10).groups, Plan([4, 4, 10], 1, 10).over
        ([[0, 1], [2]], [2])
    """

    costs: Sequence[int]
    fixed: int
    limit: int
    groups: list[list[int]] = field(init=False)
    over: list[int] = field(init=False)

    def __post_init__(self) -> None:
        room = self.limit - self.fixed
        self.groups, self.over = [], []
        current, used = [], 0
        for j, cost in enumerate(self.costs):
            if current and used + cost > room:
                self.groups.append(current)
                current, used = [], 0
            current.append(j)
            used += cost
            if cost > room:
                self.over.append(j)
        if current:
            self.groups.append(current)

    def warn_if_over(self, stage: str) -> None:
        """Say (an :class:`OverBudgetWarning`) that ``stage`` goes on over the budget, and
        by how much, where a layer does not fit even alone.

        Example:
            >>> Plan([4], fixed=1, limit=100).warn_if_over("fit_factors")   # fits: silent
        """
        if not self.over:
            return
        worst = max(self.costs[j] for j in self.over) + self.fixed
        warnings.warn(
            f"{stage}: {len(self.over)} layer(s) need more than max_memory "
            f"({describe(self.limit)}): the largest with the stage's fixed part "
            f"({describe(self.fixed)}) takes about {describe(worst)}; going on over the budget",
            OverBudgetWarning,
            stacklevel=3,
        )

    @property
    def peak(self) -> int:
        """The largest group's bytes plus the fixed part: what the plan expects to hold."""
        return self.fixed + max((sum(self.costs[j] for j in g) for g in self.groups), default=0)


def activation_bytes(model: nn.Module, batch_size: int, length: int, dtype_bytes: int = 4) -> int:
    """An upper estimate of what one forward and backward of ``model`` on a batch of
    ``batch_size`` sequences of ``length`` tokens holds beyond its weights: per block the
    activations autograd keeps (about 16 values per hidden unit and token, and 4 per MLP
    unit) and the attention scores, plus three copies of the logits (values, their
    log-softmax and its gradient).

    Example:
        >>> import transformers as tf
        >>> cfg = tf.LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=2, num_attention_heads=2)
        >>> activation_bytes(tf.LlamaForCausalLM(cfg), 2, 10)
        61120
    """
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    inner = int(inner or 4 * hidden)
    blocks = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = batch_size * length
    per_token = blocks * (16 * hidden + 4 * inner) + 3 * vocab
    scores = 2 * blocks * heads * batch_size * length * length  # probabilities and gradient
    return math.ceil((tokens * per_token + scores) * dtype_bytes)
