"""The kit's exceptions: one family, so notebook users can catch ``InfluenceKitError``.

Every message names the thing that is wrong (file and line, field, layer, example id) and
what is wrong with it, so a user never has to read a torch traceback to find bad input.

Example:
    >>> from influencekit.errors import DataError
    >>> try:
    ...     raise DataError("train.jsonl, line 3: field 'text' is missing")
    ... except ValueError as err:
    ...     print(err)
    train.jsonl, line 3: field 'text' is missing
"""

from __future__ import annotations


class InfluenceKitError(Exception):
    """Base class of every error the kit raises on purpose."""


class DataError(InfluenceKitError, ValueError):
    """A training or query file (or record) is malformed: names the file, line and field."""


class ModelError(InfluenceKitError, ValueError):
    """A model directory, module selection or fingerprint does not fit."""


class NonFiniteError(InfluenceKitError, FloatingPointError):
    """NaN or inf found in weights, activations or gradients: names the layer and example."""


class FileFormatError(InfluenceKitError, ValueError):
    """An influencekit HDF5 file is missing, truncated, corrupted or of another kind."""


class MismatchError(InfluenceKitError, ValueError):
    """Files or objects made for different models, tokenizers, modules or settings meet.

    The message lists every difference, e.g. ``max_length: store 128, dataset 64``.
    """


class StoreWriteError(InfluenceKitError, OSError):
    """Writing a gradient store failed (a full disk, say); the committed part is intact."""
