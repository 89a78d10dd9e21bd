"""Parameter checks: every public function validates its arguments here, once, up front.

Each check raises :class:`~influencekit.errors.ParameterError` naming the parameter, the
value given and what is allowed, before any model is run or file is written, and returns the
value in its canonical form (a ``torch.dtype`` for a dtype given as a string, say).

Example:
    >>> count("batch_size", 8)
    8
    >>> count("top_k", None, optional=True) is None
    True
    >>> accumulation_dtype("dtype", "float64")
    torch.float64
    >>> count("batch_size", 0)
    Traceback (most recent call last):
    ...
    influencekit.errors.ParameterError: batch_size must be an int >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping, Sequence

import torch

from .errors import ParameterError

# Accumulators (factors, captured a and s, scores) are float32 or float64, whatever the model.
ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Autocast dtypes for the forward pass (``amp_dtype``).
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def count(
    name: str,
    value,
    *,
    minimum: int | None = 1,
    maximum: int | None = None,
    optional: bool = False,
    allowed: str | None = None,
) -> int | None:
    """An int in ``minimum..maximum`` (either end open when None; ``None`` itself allowed
    when ``optional``); bools are refused. ``allowed`` words the message's "must be ..."
    where the bare range would say too little.

    Example:
        >>> count("q", 2, minimum=0, maximum=4), count("layer", -1, minimum=None)
        (2, -1)
    """
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        if allowed is None and minimum is not None and maximum is not None:
            allowed = f"an int in {minimum}..{maximum}"
        elif allowed is None and minimum is not None:
            allowed = f"an int >= {minimum}"
        elif allowed is None:
            allowed = "an int" if maximum is None else f"an int <= {maximum}"
        raise ParameterError(name, value, allowed + (" or None" if optional else ""))
    return int(value)


def number(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
    optional: bool = False,
    allowed: str | None = None,
) -> float | None:
    """A finite real number in ``[minimum, maximum]`` (``(minimum, maximum)`` when
    ``exclusive``; either end open when None; ``None`` itself allowed when ``optional``).
    ``allowed`` words the message's "must be ..." as :func:`count`'s does.

    Example:
        >>> number("b", 0.75, minimum=0, maximum=1), number("fraction", 1, minimum=0)
        (0.75, 1.0)
    """
    if value is None and optional:
        return None
    real = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if (
        not real
        or not math.isfinite(float(value))
        or (minimum is not None and (value <= minimum if exclusive else value < minimum))
        or (maximum is not None and (value >= maximum if exclusive else value > maximum))
    ):
        sign = (">", "<") if exclusive else (">=", "<=")
        bounds = [f"{sign[0]} {minimum}"] if minimum is not None else []
        bounds += [f"{sign[1]} {maximum}"] if maximum is not None else []
        if allowed is None:
            allowed = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ParameterError(name, value, allowed + (" or None" if optional else ""))
    return float(value)


def positive_number(name: str, value, *, optional: bool = False) -> float | None:
    """A finite real number > 0 (``None`` too when ``optional``)."""
    return number(name, value, minimum=0, exclusive=True, optional=optional)


def choice(name: str, value, choices: Collection[str]):
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def flag(name: str, value) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise ParameterError(name, value, "True or False")
    return value


def instance(name: str, value, types: type | tuple[type, ...], what: str):
    """An instance of ``types``, described as ``what`` in the message."""
    if not isinstance(value, types):
        raise ParameterError(name, value, what)
    return value


def _dtype(name: str, value, table: dict[str, torch.dtype], optional: bool) -> torch.dtype | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and value in table:
        return table[value]
    if isinstance(value, torch.dtype) and value in table.values():
        return value
    names = ", ".join(f"torch.{key}" for key in table)
    raise ParameterError(
        name, value, f"one of {names} (or its name as a string)" + (" or None" if optional else "")
    )


def accumulation_dtype(name: str, value) -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` (or ``"float32"`` / ``"float64"``)."""
    return _dtype(name, value, ACCUMULATION_DTYPES, optional=False)


def amp_dtype(name: str, value) -> torch.dtype | None:
    """``None`` (no autocast), ``torch.bfloat16`` or ``torch.float16`` (or their names)."""
    return _dtype(name, value, AMP_DTYPES, optional=True)


def storage_dtype(name: str, value, allowed: Sequence[str]) -> str:
    """A dtype name from ``allowed`` (a ``torch.dtype`` or numpy-style name) as that name."""
    text = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if not isinstance(text, str) or text not in allowed:
        listing = ", ".join(repr(a) for a in allowed)
        raise ParameterError(name, value, f"one of {listing} (a name or a torch.dtype)")
    return text


def device(name: str, value) -> torch.device | None:
    """``None`` or anything ``torch.device`` accepts (``"cpu"``, ``"cuda:1"``, a device)."""
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ParameterError(name, value, "None or a device such as 'cpu' or 'cuda:0'") from None


def damping(value, layers: Sequence[str], defaults: Mapping[str, float] | None = None):
    """Per-layer damping ``{layer: λ}``, each a finite number > 0, from one number for every
    layer, a mapping naming exactly ``layers``, or ``None`` for ``defaults`` (when given).

    Example:
        >>> damping(0.5, ["fc1", "fc2"])
        {'fc1': 0.5, 'fc2': 0.5}
        >>> damping(None, ["fc1"], {"fc1": 0.25}), damping({"fc1": 2}, ["fc1"])
        ({'fc1': 0.25}, {'fc1': 2.0})
    """
    names = list(layers)
    if isinstance(value, Mapping):  # any mapping, not only a dict
        unknown = sorted(set(value) - set(names))
        missing = [name for name in names if name not in value]
        if unknown or missing:
            raise ParameterError(
                "damping",
                value,
                f"a mapping naming exactly the layers {names} "
                f"(unknown: {unknown}, missing: {missing})",
            )
        given = {name: value[name] for name in names}
    elif value is None and defaults is not None:
        given = {name: defaults[name] for name in names}
    else:
        given = dict.fromkeys(names, value)
    resolved = {}
    for name, lam in given.items():
        if value is None and defaults is not None and not 0 < lam < math.inf:
            raise ParameterError(
                "damping", None, f"given: layer {name}'s default 0.1 × mean(Λ) is {lam}"
            )
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 < lam < math.inf:
            raise ParameterError("damping", lam, f"finite and > 0 (layer {name})")
        resolved[name] = float(lam)
    return resolved
