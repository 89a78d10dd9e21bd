"""``influencekit.demo``: the shipped corpus, the shipped models, and the demo that uses them.

- :func:`load_records` / :func:`load_corpus`: 2,627 quotes from Debian's ``fortunes`` in 12
  themes (:func:`theme_names`; ``data/NOTICE.md`` gives origin and license).
- :func:`load_demo_model`: a small (1.2M parameters) or large (5.6M) GPT-2 trained on that
  corpus by :mod:`influencekit.demo.train`, with its byte-level BPE tokenizer.
- :data:`QUERIES`: ~20 built-in queries (facts, paraphrases, word-order flips, cross-theme).
- :func:`run_demo`: what ``influencekit demo`` runs (factors → store → scores → report).

Example:
    >>> from influencekit import demo
    >>> model, tokenizer = demo.load_demo_model("small", device="cpu")
    >>> train = demo.load_corpus(tokenizer, limit=24)
    >>> len(train), sorted({ex.metadata["theme"] for ex in train})[:3]
    (24, ['computers', 'education', 'food'])
"""

from __future__ import annotations

from .corpus import MAX_LENGTH, load_corpus, load_records, theme_names
from .pipeline import DemoRun, model_dir, run_demo
from .queries import QUERIES


def load_demo_model(size: str = "small", *, device: str | None = None):
    """The shipped model of ``size`` (``small`` or ``large``) and its tokenizer.

    Example:
        >>> model, tokenizer = load_demo_model("large", device="cpu")   # doctest: +SKIP
    """
    from ..loading import load_model

    return load_model(model_dir(size), device=device)


__all__ = [
    "MAX_LENGTH",
    "QUERIES",
    "DemoRun",
    "load_corpus",
    "load_demo_model",
    "load_records",
    "model_dir",
    "run_demo",
    "theme_names",
]
