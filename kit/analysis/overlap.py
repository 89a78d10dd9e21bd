"""Token overlap against abstraction: how much of a query's top influence comes from
sequences that share its words, and how much from sequences on its theme.

Example:
    >>> sorted(content_ngrams("The cat sat on the mat"))
    [('cat',), ('mat',), ('sat',)]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

from ..errors import DataError, ParameterError
from ..result import InfluenceResult
from ._checks import _check_dataset, _check_int, _check_query, _check_result, _query_text

# Alphabetic words of 3+ letters: scikit-learn's default word pattern (\b\w\w+\b) without
# digits, underscores and 2-letter words, so "abc123" or "of" never count as shared content.
_CONTENT_WORD = r"(?u)\b[^\W\d_]{3,}\b"


@functools.lru_cache(maxsize=8)
def _ngram_analyzer(n: int) -> Callable[[str], list[str]]:
    from sklearn.feature_extraction.text import CountVectorizer  # lazy: a slow import

    vectorizer = CountVectorizer(
        token_pattern=_CONTENT_WORD, stop_words="english", ngram_range=(n, n)
    )
    return vectorizer.build_analyzer()


def content_ngrams(text: str, n: int = 1) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams of the content words of ``text``.

    Content words are alphabetic words of 3+ letters not in scikit-learn's
    ``ENGLISH_STOP_WORDS``; stop words are dropped first, so n-grams run over content words
    only (as scikit-learn's analyzers do).

    Example:
        >>> sorted(content_ngrams("The cook chops 2 onions."))
        [('chops',), ('cook',), ('onions',)]
        >>> sorted(content_ngrams("The cook chops the onions.", n=2))
        [('chops', 'onions'), ('cook', 'chops')]
    """
    if not isinstance(text, str):
        raise ParameterError("text", text, "a string")
    _check_int("n", n)
    return {tuple(gram.split(" ")) for gram in _ngram_analyzer(n)(text)}


def _positive_share(top: list[tuple[int, float]], matches: Callable[[int], bool]) -> float:
    """Share of the positive scores in ``top`` held by the training indices ``matches`` takes."""
    positive = [(i, s) for i, s in top if s > 0]
    total = sum(s for _, s in positive)
    if total == 0:
        return 0.0
    return sum(s for i, s in positive if matches(i)) / total


def overlap_share(
    result: InfluenceResult,
    dataset: Sequence,
    q: int,
    *,
    top_k: int = 10,
    n: int = 1,
    query_text: str | None = None,
) -> float:
    """Share of query ``q``'s positive top-``top_k`` influence from sequences sharing its words.

    A sequence shares words when it has at least one content n-gram (:func:`content_ngrams`) of
    the query's prompt + completion (from ``result.queries`` unless ``query_text`` is
    given). Negative scores among the top ``top_k`` are left out; 0.0 when none is positive.
    A high share means the influence is mostly token overlap, a low one more abstract.

    Example:
        >>> import numpy as np
        >>> from influencekit import Example
        >>> train = [Example(0, "a", "The stew needs pepper.", (1, 2), {}),
        ...          Example(1, "b", "Rain fell all night.", (1, 2), {})]
        >>> r = InfluenceResult(np.array([[[3.0], [1.0]]]), ["h.0.mlp"], ["a", "b"], ["q"],
        ...                     queries=[{"prompt": "Add more", "completion": " pepper"}])
        >>> overlap_share(r, train, 0)
        0.75
    """
    _check_query(result, q)
    _check_int("top_k", top_k)
    _check_dataset(result, dataset)
    text = _query_text(result, q) if query_text is None else query_text
    grams = content_ngrams(text, n)
    return _positive_share(
        result.top(q, top_k),
        lambda i: not grams.isdisjoint(content_ngrams(dataset[i].text, n)),
    )


def _theme_set(themes) -> set:
    if isinstance(themes, str):
        return {themes}
    if isinstance(themes, Iterable):
        wanted = set(themes)
        if wanted and all(isinstance(t, str) for t in wanted):
            return wanted
    raise ParameterError("themes", themes, "a string or a non-empty list of strings")


def theme_share(
    result: InfluenceResult,
    dataset: Sequence,
    q: int,
    themes: str | Iterable[str],
    *,
    top_k: int = 10,
    field: str = "theme",
) -> float:
    """Share of query ``q``'s positive top-``top_k`` influence from sequences on ``themes``.

    A sequence is on theme when its ``metadata[field]`` (a string, or a list of them) is one of
    ``themes``. Same rules as :func:`overlap_share` otherwise.

    Example:
        >>> import numpy as np
        >>> from influencekit import Example
        >>> train = [Example(0, "a", "x", (1, 2), {"theme": "food"}),
        ...          Example(1, "b", "y", (1, 2), {"theme": "sea"})]
        >>> r = InfluenceResult(np.array([[[1.0], [4.0]]]), ["h.0.mlp"], ["a", "b"], ["q"])
        >>> theme_share(r, train, 0, "sea"), theme_share(r, train, 0, ["food", "law"])
        (0.8, 0.2)
    """
    _check_query(result, q)
    _check_int("top_k", top_k)
    _check_dataset(result, dataset)
    wanted = _theme_set(themes)
    if not any(field in ex.metadata for ex in dataset):
        raise DataError(f"field {field!r}: no training sequence has it in its metadata")

    def on_theme(i: int) -> bool:
        value = dataset[i].metadata.get(field)
        values = value if isinstance(value, (list, tuple)) else [value]
        return any(isinstance(v, str) and v in wanted for v in values)

    return _positive_share(result.top(q, top_k), on_theme)


def overlap_table(
    result: InfluenceResult,
    dataset: Sequence,
    *,
    top_k: int = 10,
    n: int = 1,
    themes: Sequence | None = None,
    field: str = "theme",
) -> list[dict]:
    """One row per query: ``{"query": id, "overlap": overlap_share, "theme": theme_share}``.

    ``themes``, if given, has one entry per query (a theme, a list of themes, or None for no
    theme share: ``"theme": None``); without it rows have no ``"theme"``.

    Example:
        >>> import numpy as np
        >>> from influencekit import Example
        >>> train = [Example(0, "a", "Stew with pepper.", (1, 2), {"theme": "food"})]
        >>> r = InfluenceResult(np.ones((1, 1, 1)), ["h.0.mlp"], ["a"], ["q"],
        ...                     queries=[{"prompt": "More", "completion": " pepper"}])
        >>> overlap_table(r, train, themes=["sea"])
        [{'query': 'q', 'overlap': 1.0, 'theme': 0.0}]
    """
    _check_result(result)
    _check_int("top_k", top_k)
    _check_int("n", n)
    if themes is not None and (isinstance(themes, str) or len(themes) != len(result.query_ids)):
        raise ParameterError(
            "themes", themes, f"a list with one entry per query ({len(result.query_ids)})"
        )
    rows = []
    for q, query_id in enumerate(result.query_ids):
        row = {"query": query_id, "overlap": overlap_share(result, dataset, q, top_k=top_k, n=n)}
        if themes is not None:
            theme = themes[q]
            row["theme"] = (
                None
                if theme is None
                else theme_share(result, dataset, q, theme, top_k=top_k, field=field)
            )
        rows.append(row)
    return rows
