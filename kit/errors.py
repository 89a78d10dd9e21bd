"""The kit's exceptions: one family, so notebook users can catch ``InfluenceKitError``.

Every message names the thing that is wrong (parameter, file and line, field, layer, example
id) and what is wrong with it, so a user never has to read a torch traceback to find bad
input. Each class also derives from the built-in exception a caller would expect
(``ValueError``, ``OSError``, ...), so ``except ValueError`` keeps working.

Example:
    >>> from influencekit.errors import DataError, ParameterError
    >>> try:
    ...     raise DataError("train.jsonl, line 3: field 'text' is missing")
    ... except ValueError as err:
    ...     print(err)
    train.jsonl, line 3: field 'text' is missing
    >>> str(ParameterError("batch_size", 0, "an int >= 1"))
    'batch_size must be an int >= 1, got 0'
"""

from __future__ import annotations

import numbers
import reprlib


class InfluenceKitError(Exception):
    """Base class of every error the kit raises on purpose."""


class ParameterError(InfluenceKitError, ValueError, TypeError):
    """A bad argument to a kit function: names the parameter, the value and what is allowed.

    It is a ``ValueError`` and, since a wrong type is a bad argument too, a ``TypeError``.
    ``parameter``, ``value`` and ``allowed`` are kept as attributes.
    """

    def __init__(self, parameter: str, value: object, allowed: str) -> None:
        self.parameter, self.value, self.allowed = parameter, value, allowed
        super().__init__(f"{parameter} must be {allowed}, got {describe(value)}")

    def __reduce__(self):  # picklable although __init__ takes three arguments
        return (type(self), (self.parameter, self.value, self.allowed))


class DataError(InfluenceKitError, ValueError):
    """A training or query file (or record) is malformed: names the file, line and field."""


class ModelError(InfluenceKitError, ValueError):
    """A model directory, module selection or fingerprint does not fit."""


class NonFiniteError(InfluenceKitError, FloatingPointError):
    """NaN or inf found in weights, activations or gradients: names the layer and example."""


class FileFormatError(InfluenceKitError, ValueError):
    """An influencekit HDF5 file is missing, truncated, corrupted or of another kind."""


class MissingFileError(InfluenceKitError, FileNotFoundError):
    """A file or folder the kit was pointed at does not exist: names the path."""


class MissingDependencyError(InfluenceKitError, ImportError):
    """An optional package a function needs is not installed: names it and how to get it."""


class OutOfRangeError(InfluenceKitError, IndexError):
    """An index past the end of a dataset, store or layer list: names the valid range."""


class MismatchError(InfluenceKitError, ValueError):
    """Files or objects made for different models, tokenizers, modules or settings meet.

    The message lists every difference, e.g. ``max_length: store 128, dataset 64``.
    """


class StoreWriteError(InfluenceKitError, OSError):
    """Writing a gradient store failed (a full disk, say); the committed part is intact."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def describe(value: object) -> str:
    """A short description of a value for a message: its repr for plain values (cut to about
    60 characters), ``a <TypeName>`` for anything else.

    Example:
        >>> describe(3), describe("x" * 100)[:12], describe(object())
        ('3', "'xxxxxxxxxxx", 'an object')
    """
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float, complex)):
        value = value.item() if hasattr(value, "item") else value  # numpy scalars
    if value is None or isinstance(value, (numbers.Number, str, bytes, list, tuple, dict)):
        return _short.repr(value)
    name = type(value).__name__
    if type(value).__module__.startswith("torch") and name == "dtype":
        return repr(value)
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
