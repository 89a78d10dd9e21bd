"""influencekit: which training data made the model say this?

EK-FAC influence functions (Grosse et al. 2023) for Hugging Face causal LMs.

Example:
    >>> import influencekit as ik
    >>> model, tokenizer = ik.load_model("path/to/hf-dir")  # doctest: +SKIP
    >>> train = ik.TextDataset.from_jsonl("train.jsonl", tokenizer)  # doctest: +SKIP
    >>> factors = ik.fit_factors(model, train, modules="mlp")  # doctest: +SKIP
    >>> result = ik.score(model, factors, [("The sky is", " blue")], train)  # doctest: +SKIP
    >>> result.top(0, k=5)  # doctest: +SKIP

``ik.widgets`` (Jupyter) and ``ik.validate`` (ground truths) are imported on first use, so
``import influencekit`` does not load ipywidgets. docs/architecture.md maps the package.
"""

import importlib

from . import analysis, demo, themes  # demo: the shipped corpus and models (uses the rest)
from .data import Example, Query, TextDataset, as_queries, load_queries
from .errors import (
    DataError,
    FileFormatError,
    InfluenceKitError,
    MismatchError,
    MissingDependencyError,
    MissingFileError,
    ModelError,
    NonFiniteError,
    OutOfRangeError,
    ParameterError,
    StoreWriteError,
)
from .factors import Factors, LayerFactors
from .fitting import fit_factors
from .loading import load_model
from .models import model_fingerprint, select_modules
from .result import InfluenceResult
from .scoring import score, token_scores
from .store import GradientStore

__version__ = "0.7.0"

LAZY_SUBPACKAGES = ("widgets", "validate")


def __getattr__(name: str):
    """``ik.widgets`` and ``ik.validate``, imported the first time they are asked for."""
    if name in LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataError",
    "Example",
    "Factors",
    "FileFormatError",
    "GradientStore",
    "InfluenceKitError",
    "InfluenceResult",
    "LayerFactors",
    "MismatchError",
    "MissingDependencyError",
    "MissingFileError",
    "ModelError",
    "NonFiniteError",
    "OutOfRangeError",
    "ParameterError",
    "Query",
    "StoreWriteError",
    "TextDataset",
    "analysis",
    "as_queries",
    "demo",
    "fit_factors",
    "load_model",
    "load_queries",
    "model_fingerprint",
    "score",
    "select_modules",
    "themes",
    "token_scores",
    "validate",
    "widgets",
]
