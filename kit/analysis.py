"""The analyses of Grosse et al. (2023) as library functions over an :class:`InfluenceResult`.

- Token overlap vs abstraction: :func:`overlap_share`, :func:`theme_share`,
  :func:`overlap_table`: how much of a query's top influence comes from sequences that merely
  share its words, and how much from sequences on its theme.
- Layer attribution: :func:`layer_groups`, :func:`group_shares`, :func:`layer_profile`,
  :func:`rerank_by_group`: which third of the network (lower, middle, upper blocks) carries
  the influence.
- Influence distribution: :func:`tail_fit`, :func:`top_share`, :func:`ccdf`, :func:`plot_tail`:
  the heavy, power-law-like upper tail of the scores.
- Candidate prefilter: :func:`bm25_scores`, :func:`bm25_candidates`, :func:`prefilter_recall`,
  :func:`score_prefiltered`: score only the sequences a text search (Okapi BM25 on binary term
  presence, the paper's TF-IDF filter) finds, when no gradient store is at hand.

Needs scikit-learn and scipy; :func:`plot_tail` also needs matplotlib.

Example:
    >>> import numpy as np
    >>> top_share(np.array([8.0, 1.0, 1.0, -2.0]), fraction=0.25)
    0.8
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .data import TextDataset, as_queries
from .errors import DataError
from .result import InfluenceResult

GROUPS = ("lower", "middle", "upper")
MIN_TAIL = 10  # fewer tail points than this give no usable exponent

# Alphabetic words of 3+ letters: scikit-learn's default word pattern (\b\w\w+\b) without
# digits, underscores and 2-letter words, so "abc123" or "of" never count as shared content.
_CONTENT_WORD = r"(?u)\b[^\W\d_]{3,}\b"
# A module name's first all-digit component is its transformer block: "model.layers.3.mlp".
_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_query(result: InfluenceResult, q) -> None:
    n = len(result.query_ids)
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q < n:
        raise ValueError(f"q must be a query index in 0..{n - 1}, got {q!r}")


def _check_dataset(result: InfluenceResult, dataset: Sequence) -> None:
    """The dataset must be the one the result was scored on: same ids, same order."""
    ids = [ex.id for ex in dataset]
    if ids == result.train_ids:
        return
    if len(ids) != len(result.train_ids):
        raise DataError(
            f"dataset has {len(ids)} sequences but the result scored {len(result.train_ids)}; "
            f"pass the training set the result was scored on"
        )
    i = next(i for i, (a, b) in enumerate(zip(ids, result.train_ids, strict=True)) if a != b)
    raise DataError(
        f"dataset does not match the result: position {i} holds id {ids[i]!r}, the result "
        f"{result.train_ids[i]!r}"
    )


def _query_text(result: InfluenceResult, q: int) -> str:
    queries = result.meta.get("queries")
    if not isinstance(queries, list) or len(queries) != len(result.query_ids):
        raise DataError(
            "result.meta['queries'] is missing or does not list every query; pass query_text="
        )
    return queries[q]["prompt"] + queries[q]["completion"]


def _scores(scores, name: str = "scores") -> np.ndarray:
    """All entries of ``scores`` as a flat float array, refusing NaN/inf."""
    values = np.ravel(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds NaN or inf ({int((~np.isfinite(values)).sum())} entries)")
    return values


# ---------------------------------------------------------------------------------------------
# 1. Token overlap vs abstraction


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
        raise ValueError(f"text must be a string, got {type(text).__name__}")
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
    the query's prompt + completion (from ``result.meta["queries"]`` unless ``query_text`` is
    given). Negative scores among the top ``top_k`` are left out; 0.0 when none is positive.
    A high share means the influence is mostly token overlap, a low one more abstract.

    Example:
        >>> import numpy as np
        >>> from influencekit import Example
        >>> train = [Example(0, "a", "The stew needs pepper.", (1, 2), {}),
        ...          Example(1, "b", "Rain fell all night.", (1, 2), {})]
        >>> r = InfluenceResult(np.array([[[3.0], [1.0]]]), ["h.0.mlp"], ["a", "b"], ["q"],
        ...                     {"queries": [{"prompt": "Add more", "completion": " pepper"}]})
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
    raise ValueError(f"themes must be a string or a non-empty list of strings, got {themes!r}")


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
        ...                     {"queries": [{"prompt": "More", "completion": " pepper"}]})
        >>> overlap_table(r, train, themes=["sea"])
        [{'query': 'q', 'overlap': 1.0, 'theme': 0.0}]
    """
    if themes is not None and (isinstance(themes, str) or len(themes) != len(result.query_ids)):
        raise ValueError(
            f"themes must be a list with one entry per query ({len(result.query_ids)}), "
            f"got {themes!r}"
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


# ---------------------------------------------------------------------------------------------
# 2. Layer attribution


def _block_number(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def layer_groups(layers: Sequence[str], *, n_blocks: int | None = None) -> dict[str, list[int]]:
    """Positions in ``layers`` of the ``"lower"``, ``"middle"`` and ``"upper"`` thirds.

    A layer's block is the first all-digit component of its module name
    (``transformer.h.3.mlp.c_fc`` is in block 3); all layers of a block stay together. With
    ``D`` blocks (``n_blocks``, by default the highest block number + 1), block ``b`` goes to
    the third holding its middle, ``floor(3 (b + 1/2) / D)``: the split is symmetric, e.g.
    4 blocks → ``[0] [1, 2] [3]``, 6 → two each, 12 → four each, 2 → lower and upper (middle
    empty), 1 → middle only. Every group is a key, perhaps with an empty list.

    A name without a block number (an input or output projection) goes to ``"lower"`` if it
    comes before every numbered name in ``layers`` and to ``"upper"`` otherwise: tracked
    layers are listed in model order, where such layers sit before or after the blocks.

    Example:
        >>> names = [f"transformer.h.{b}.mlp.{m}" for b in range(4) for m in ("c_fc", "c_proj")]
        >>> layer_groups(names)
        {'lower': [0, 1], 'middle': [2, 3, 4, 5], 'upper': [6, 7]}
    """
    if isinstance(layers, str) or not len(layers):
        raise ValueError(f"layers must be a non-empty list of module names, got {layers!r}")
    blocks = [_block_number(name) for name in layers]
    numbered = [i for i, b in enumerate(blocks) if b is not None]
    if not numbered:
        raise ValueError(
            f"layers: no name has a block number (like 'transformer.h.3.mlp.c_fc'), "
            f"got {list(layers)[:4]}"
        )
    highest = max(blocks[i] for i in numbered)
    depth = highest + 1 if n_blocks is None else n_blocks
    if n_blocks is not None:
        _check_int("n_blocks", n_blocks, minimum=highest + 1)
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, block in enumerate(blocks):
        if block is None:
            group = "lower" if i < numbered[0] else "upper"
        else:
            # 3(2b + 1) is odd and 2D even, so no block ever sits on a boundary.
            group = GROUPS[3 * (2 * block + 1) // (2 * depth)]
        groups[group].append(i)
    return groups


def group_shares(result: InfluenceResult, q: int, k: int = 10) -> dict[str, float]:
    """Each third's part of query ``q``'s top-``k`` summed score (``layer_shares`` per group).

    The shares sum to 1 (all zero when the top ``k`` scores sum to zero); see
    :func:`layer_groups` for the split.

    Example:
        >>> import numpy as np
        >>> names = ["h.0.mlp", "h.1.mlp", "h.2.mlp"]
        >>> r = InfluenceResult(np.array([[[1.0, 1.0, 2.0]]]), names, ["a"], ["q"])
        >>> group_shares(r, 0)
        {'lower': 0.25, 'middle': 0.25, 'upper': 0.5}
    """
    _check_query(result, q)
    _check_int("k", k)
    shares = result.layer_shares(q, k)
    return {g: float(shares[idx].sum()) for g, idx in layer_groups(result.layers).items()}


def layer_profile(result: InfluenceResult, k: int = 10) -> np.ndarray:
    """``(n_queries, 3)``: every query's :func:`group_shares`, columns lower, middle, upper.

    Example:
        >>> import numpy as np
        >>> r = InfluenceResult(np.array([[[1.0, 3.0]], [[2.0, 2.0]]]), ["h.0.a", "h.1.a"],
        ...                     ["x"], ["q0", "q1"])
        >>> layer_profile(r).tolist()
        [[0.25, 0.0, 0.75], [0.5, 0.0, 0.5]]
    """
    _check_int("k", k)
    groups = layer_groups(result.layers)
    shares = np.array([result.layer_shares(q, k) for q in range(len(result.query_ids))])
    shares = shares.reshape(len(result.query_ids), len(result.layers))
    return np.stack([shares[:, groups[g]].sum(axis=1) for g in GROUPS], axis=1)


def rerank_by_group(
    result: InfluenceResult, q: int, group: str, k: int = 10
) -> list[tuple[int, float]]:
    """Query ``q``'s top ``k`` sequences re-ranked by the summed scores of one group's layers.

    Returns ``(train_index, group score)``, highest group score first (ties keep the total
    score order). For a top-k result the choice is among its kept columns.

    Example:
        >>> import numpy as np
        >>> layer_scores = np.array([[[5.0, 0.0], [1.0, 3.0], [0.0, 1.0]]])
        >>> r = InfluenceResult(layer_scores, ["h.0.mlp", "h.1.mlp"], ["a", "b", "c"], ["q"])
        >>> rerank_by_group(r, 0, "upper", k=2)
        [(1, 3.0), (0, 0.0)]
    """
    _check_query(result, q)
    _check_int("k", k)
    groups = layer_groups(result.layers)
    if group not in groups:
        raise ValueError(f"group must be one of {list(GROUPS)}, got {group!r}")
    if not groups[group]:
        raise ValueError(
            f"group {group!r} holds none of this result's layers (layer positions by group: "
            f"{groups})"
        )
    row = result.scores[q]
    # The same top k as top() and layer_shares(): highest total first, ties by column.
    columns = np.argsort(-row, kind="stable")[:k]
    group_scores = result.layer_scores[q][np.ix_(columns, groups[group])].sum(axis=1)
    index = result.indices[q] if result.is_top_k else np.arange(row.size)
    order = np.argsort(-group_scores, kind="stable")
    return [(int(index[columns[j]]), float(group_scores[j])) for j in order]


# ---------------------------------------------------------------------------------------------
# 3. Influence distribution


def tail_fit(scores, *, xmin: float | None = None, tail: float = 0.1) -> dict:
    """Power-law fit of the upper tail of the positive scores, tested against an exponential.

    ``xmin`` defaults to the ``1 - tail`` quantile of the positive scores; the fit uses every
    score ``x >= xmin``. The exponent is the continuous maximum-likelihood estimate of Clauset,
    Shalizi & Newman (2009), ``alpha = 1 + n / Σ ln(x / xmin)``, standard error
    ``(alpha - 1) / sqrt(n)``. The alternative is an exponential tail ``x - xmin ~ Exp(rate)``
    with ``rate = 1 / mean(x - xmin)`` (its MLE). ``loglik_ratio`` is ``R = Σ ln p_pl(x) -
    ln p_exp(x)``; ``p_value`` is Vuong's two-sided test of ``R / (σ sqrt(n))`` against a
    standard normal (σ: the pointwise differences' standard deviation). ``favours`` is
    ``"power law"`` (R > 0) or ``"exponential"`` (R < 0) when ``p_value <= 0.1``, else
    ``"neither"``. Raises ValueError with fewer than 10 tail points.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).pareto(1.5, 20_000) + 1.0  # density ∝ x^-2.5
        >>> fit = tail_fit(x)
        >>> round(fit["alpha"], 1), fit["n_tail"], fit["favours"]
        (2.5, 2000, 'power law')
    """
    positive = _scores(scores)
    positive = positive[positive > 0]
    if xmin is None:
        if not 0 < tail <= 1:
            raise ValueError(f"tail must be in (0, 1], got {tail!r}")
        if positive.size < MIN_TAIL:
            raise ValueError(
                f"scores: {positive.size} positive score(s); tail_fit needs at least {MIN_TAIL}"
            )
        xmin = float(np.quantile(positive, 1 - tail))
    elif not xmin > 0:
        raise ValueError(f"xmin must be > 0, got {xmin!r}")
    x = positive[positive >= xmin]
    n = x.size
    if n < MIN_TAIL:
        raise ValueError(
            f"scores: {n} positive score(s) >= xmin = {xmin:.4g}; tail_fit needs at least "
            f"{MIN_TAIL} (lower xmin or raise tail)"
        )
    log_ratio = np.log(x / xmin).sum()
    if log_ratio == 0:
        raise ValueError(f"scores: every tail score equals xmin = {xmin:.4g}; no slope to fit")
    alpha = 1 + n / log_ratio
    from scipy import stats  # lazy: a slow import

    # scipy's Pareto(b) has density ∝ x^-(b + 1), so b = alpha - 1.
    ll_power = stats.pareto.logpdf(x, alpha - 1, scale=xmin)
    ll_exp = stats.expon.logpdf(x, loc=xmin, scale=np.mean(x - xmin))
    diff = ll_power - ll_exp
    ratio = float(diff.sum())
    spread = float(diff.std())
    z = ratio / (spread * math.sqrt(n)) if spread > 0 else 0.0
    p_value = float(2 * stats.norm.sf(abs(z)))
    if p_value > 0.1:
        favours = "neither"
    else:
        favours = "power law" if ratio > 0 else "exponential"
    return {
        "alpha": float(alpha),
        "alpha_se": float((alpha - 1) / math.sqrt(n)),
        "xmin": float(xmin),
        "n_tail": int(n),
        "loglik_ratio": ratio,
        "p_value": p_value,
        "favours": favours,
    }


def top_share(scores, fraction: float = 0.01) -> float:
    """Share of the total positive influence held by the top ``fraction`` of sequences.

    ``scores`` is one query's row (all entries are taken); the top ``round(fraction × N)``
    sequences, at least 1, count with their positive scores. 0.0 when no score is positive.

    Example:
        >>> top_share([5.0, 3.0, 2.0, 0.0, -1.0], fraction=0.4)
        0.8
    """
    values = _scores(scores)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    total = values[values > 0].sum()
    if values.size == 0 or total == 0:
        return 0.0
    count = max(1, round(fraction * values.size))
    top = np.sort(values)[::-1][:count]
    return float(top[top > 0].sum() / total)


def ccdf(scores) -> tuple[np.ndarray, np.ndarray]:
    """The positive scores, ascending, and their empirical CCDF ``P(X >= x)``, for log-log plots.

    Example:
        >>> x, p = ccdf([4.0, -1.0, 1.0, 2.0, 8.0])
        >>> x.tolist(), p.tolist()
        ([1.0, 2.0, 4.0, 8.0], [1.0, 0.75, 0.5, 0.25])
    """
    values = _scores(scores)
    x = np.sort(values[values > 0])
    return x, 1.0 - np.arange(x.size) / x.size


def plot_tail(scores, ax=None, fit: dict | None = None):
    """Log-log plot of the scores' CCDF, with the fitted power law of :func:`tail_fit` if given.

    Needs matplotlib (imported only here). Returns the axes.

    Example:
        >>> ax = plot_tail(scores, fit=tail_fit(scores))  # doctest: +SKIP
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_tail needs matplotlib: pip install matplotlib") from err
    x, p = ccdf(scores)
    if ax is None:
        _, ax = plt.subplots()
    ax.loglog(x, p, ".", markersize=3, label="positive scores")
    if fit is not None:
        tail = x[x >= fit["xmin"]]
        # The tail's CCDF is (x / xmin)^(1 - alpha), scaled by the share of scores in the tail.
        level = tail.size / max(x.size, 1)
        fitted = level * (tail / fit["xmin"]) ** (1 - fit["alpha"])
        ax.loglog(tail, fitted, "-", label=f"power law, alpha = {fit['alpha']:.2f}")
    ax.set_xlabel("influence score")
    ax.set_ylabel("P(score >= x)")
    ax.legend()
    return ax


# ---------------------------------------------------------------------------------------------
# 4. Candidate prefilter (no store)


def _texts(dataset: Iterable) -> list[str]:
    texts = [item if isinstance(item, str) else item.text for item in dataset]
    if not texts:
        raise DataError("dataset: no training sequences")
    return texts


def bm25_scores(queries, dataset: Iterable, *, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """``(n_queries, n_train)`` Okapi BM25 scores with binary term frequency.

    Terms are scikit-learn ``CountVectorizer(binary=True, stop_words="english")`` words of the
    training texts (``dataset``: a :class:`TextDataset` or a list of strings); a query's text is
    its prompt + completion (``queries``: anything :func:`influencekit.as_queries` takes). With
    ``tf ∈ {0, 1}`` a shared term ``t`` adds ``idf(t) (k1 + 1) / (1 + k1 (1 - b + b |d| /
    avgdl))``, ``idf(t) = ln((N - df + 0.5) / (df + 0.5) + 1)``, where ``|d|`` is the number of
    distinct terms of sequence ``d`` (its length in the binary representation).

    Example:
        >>> s = bm25_scores([("The comet", " nears the sun")], ["A comet's tail.", "Rain."])
        >>> bool(s[0, 0] > 0), float(s[0, 1])
        (True, 0.0)
    """
    if not k1 >= 0 or not 0 <= b <= 1:
        raise ValueError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1!r}, b={b!r}")
    from sklearn.feature_extraction.text import CountVectorizer  # lazy: a slow import

    texts = [q.prompt + q.completion for q in as_queries(queries)]
    vectorizer = CountVectorizer(binary=True, stop_words="english")
    try:
        presence = vectorizer.fit_transform(_texts(dataset))  # (N, V), 0/1
    except ValueError as err:  # only stop words and 1-letter words
        raise DataError(f"dataset: no indexable words in the training texts ({err})") from None
    wanted = vectorizer.transform(texts)  # (Q, V), 0/1: each query term counted once
    n_docs = presence.shape[0]
    df = np.asarray(presence.sum(axis=0)).ravel()
    idf = np.log((n_docs - df + 0.5) / (df + 0.5) + 1)
    length = np.asarray(presence.sum(axis=1)).ravel()
    # With tf = 1 the saturation factor depends on the sequence only, not on the term.
    weight = (k1 + 1) / (1 + k1 * (1 - b + b * length / length.mean()))
    shared_idf = (wanted.multiply(idf).tocsr() @ presence.T).toarray()  # (Q, N)
    return shared_idf * weight


def bm25_candidates(
    queries, dataset: Iterable, m: int = 100, *, k1: float = 1.5, b: float = 0.75
) -> list[np.ndarray]:
    """Each query's ``m`` best training indices by :func:`bm25_scores` (all if ``m >= N``).

    Highest score first, ties by lower index; a query sharing no term gets the first ``m``.

    Example:
        >>> texts = ["Rain all night.", "A comet's tail.", "The sun rises.", "Comet and sun."]
        >>> [c.tolist() for c in bm25_candidates([("The comet", " nears the sun")], texts, 2)]
        [[3, 1]]
    """
    _check_int("m", m)
    scores = bm25_scores(queries, dataset, k1=k1, b=b)
    return [np.argsort(-row, kind="stable")[:m] for row in scores]


def prefilter_recall(
    candidates: Sequence[np.ndarray], result: InfluenceResult, k: int = 10
) -> np.ndarray:
    """Per query, the share of its exact top ``k`` that its candidates contain.

    ``result`` must be a full result (scored without ``top_k``) over the same training set;
    the share is ``|candidates ∩ exact top k| / k`` (``k`` capped at the training set size).

    Example:
        >>> import numpy as np
        >>> r = InfluenceResult(np.array([[[3.0], [2.0], [1.0]]]), ["h.0.mlp"], list("abc"), ["q"])
        >>> prefilter_recall([np.array([2, 0])], r, k=2).tolist()
        [0.5]
    """
    _check_int("k", k)
    if result.is_top_k:
        raise ValueError("result must be a full result (scored without top_k) to know the top k")
    if len(candidates) != len(result.query_ids):
        raise ValueError(
            f"candidates has {len(candidates)} entries, the result {len(result.query_ids)} queries"
        )
    recall = []
    for q, found in enumerate(candidates):
        exact = [i for i, _ in result.top(q, k)]
        recall.append(np.intersect1d(np.asarray(found), exact).size / len(exact))
    return np.array(recall)


def score_prefiltered(
    model,
    factors,
    queries,
    train: TextDataset,
    m: int = 100,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    **score_kwargs,
) -> InfluenceResult:
    """Score each query against its ``m`` BM25 candidates only (on the fly, exactly).

    The union of all queries' candidates (:func:`bm25_candidates`) is scored once with
    :func:`influencekit.score` (``score_kwargs`` go there; not ``top_k``); each query then
    keeps its own candidates. The result is top-k shaped over the full ``train``: ``indices``
    ``(Q, min(m, N))`` are each query's candidates by decreasing exact score (ties by lower
    index), with their exact ``layer_scores``; sequences outside the candidates are unscored.
    ``meta["prefilter"]`` records ``{"method": "bm25-binary", "m", "k1", "b"}``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from influencekit import TextDataset, fit_factors
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> tok = build_tokenizer(TINY_CORPUS)
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2,
        ...                                    vocab_size=len(tok))).eval()
        >>> train = TextDataset.from_texts(TINY_CORPUS, tok)
        >>> factors = fit_factors(model, train, progress=False)
        >>> r = score_prefiltered(model, factors, ("A comet", " nears the sun."), train, m=5,
        ...                       progress=False)
        >>> r.indices.shape, r.meta["prefilter"]["method"]
        ((1, 5), 'bm25-binary')
    """
    from .scoring import score  # scoring pulls in torch and the models: import when used

    if not isinstance(train, TextDataset):
        raise TypeError(
            f"train must be a TextDataset (its texts are searched), got {type(train).__name__}"
        )
    if "top_k" in score_kwargs:
        raise ValueError("score_prefiltered keeps each query's m candidates: leave out top_k")
    queries = as_queries(queries)
    candidates = bm25_candidates(queries, train, m, k1=k1, b=b)
    union = np.unique(np.concatenate(candidates))
    part = score(model, factors, queries, train.subset(union.tolist()), **score_kwargs)
    indices, layer_scores = [], []
    for q, found in enumerate(candidates):
        kept = part.layer_scores[q, np.searchsorted(union, found)]
        # Highest score first, equal scores by lower index: the order of a scored top-k result.
        order = np.lexsort((found, -kept.sum(-1)))
        indices.append(found[order])
        layer_scores.append(kept[order])
    meta = {
        **part.meta,
        "top_k": len(indices[0]),
        "prefilter": {"method": "bm25-binary", "m": m, "k1": k1, "b": b},
    }
    return InfluenceResult(
        np.stack(layer_scores), part.layers, train.ids, part.query_ids, meta, np.stack(indices)
    )
