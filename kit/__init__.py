"""influencekit: which training data made the model say this?

EK-FAC influence functions (Grosse et al. 2023) for Hugging Face causal LMs.

Example:
    >>> import influencekit as ik
    >>> model, tokenizer = ik.load_model("path/to/hf-dir")  # doctest: +SKIP
    >>> train = ik.TextDataset.from_jsonl("train.jsonl", tokenizer)  # doctest: +SKIP
    >>> factors = ik.fit_factors(model, train, modules="mlp")  # doctest: +SKIP
    >>> result = ik.score(model, factors, [("The sky is", " blue")], train)  # doctest: +SKIP
    >>> result.top(0, k=5)  # doctest: +SKIP
"""

from . import analysis, demo, themes  # demo: the shipped corpus and models (uses the rest)
from .data import Example, Query, TextDataset, as_queries, load_queries
from .errors import (
    DataError,
    FileFormatError,
    InfluenceKitError,
    MismatchError,
    ModelError,
    NonFiniteError,
    StoreWriteError,
)
from .factors import Factors, LayerFactors, fit_factors
from .models import load_model, model_fingerprint, select_modules
from .result import InfluenceResult
from .scoring import score, token_scores
from .store import GradientStore

__version__ = "0.7.0"

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
    "ModelError",
    "NonFiniteError",
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
]
