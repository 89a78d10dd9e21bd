"""The shipped demo corpus: 2,627 quotes in 12 themes from Debian's ``fortunes``.

See ``data/NOTICE.md`` for its origin and license and :mod:`.derive_corpus` for how it was made.

Example:
    >>> records = load_records()
    >>> len(records), sorted(records[0])
    (2627, ['id', 'text', 'theme'])
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..data import TextDataset

DATA_DIR = Path(__file__).parent / "data"
CORPUS_PATH = DATA_DIR / "fortunes.jsonl.gz"
MAX_LENGTH = 128  # tokens per sequence, for training the demo models and for scoring


def load_records() -> list[dict]:
    """The corpus as a list of ``{"id", "text", "theme"}`` dicts, in shipped order."""
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def theme_names() -> list[str]:
    """The corpus's theme labels (``"computers"``, ...), in shipped order."""
    return list(dict.fromkeys(r["theme"] for r in load_records()))


def load_corpus(tokenizer, *, limit: int | None = None) -> TextDataset:
    """The corpus as a :class:`TextDataset` (``theme`` in each example's metadata).

    ``limit`` keeps an even share of every theme (for quick runs), in shipped order.
    """
    records = load_records()
    if limit is not None and limit < len(records):
        records = even_sample(records, limit)
    return TextDataset.from_records(records, tokenizer, MAX_LENGTH)


def even_sample(records: list[dict], limit: int) -> list[dict]:
    """The first ``limit // n_themes`` records of every theme (the rest to the first themes)."""
    by_theme: dict[str, list[dict]] = {}
    for r in records:
        by_theme.setdefault(r["theme"], []).append(r)
    per_theme, extra = divmod(limit, len(by_theme))
    keep = {
        id(r)
        for t, (theme, rows) in enumerate(by_theme.items())
        for r in rows[: per_theme + (t < extra)]
    }
    return [r for r in records if id(r) in keep]
