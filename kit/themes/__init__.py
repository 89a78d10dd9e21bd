"""Themes: cluster training sequences (typically a query's most influential ones) by topic.

Four ways to say two sequences are alike, one clustering for all of them:

- ``"tfidf"``: their words (TF-IDF, reduced by truncated SVD when the vocabulary is large);
- ``"gradient"``: what the model took from them: the cosine of their per-layer training
  gradients, read from a gradient store (``store.gram``) or given as vectors or a Gram matrix;
- ``"embedding"``: how the model represents them: the mean hidden state of one layer;
- ``"influence"``: what they taught the model, in the space influence is measured in: their
  training gradients preconditioned by the curvature, ``(Ĝ + λI)^(-1/2) G`` per layer
  (:func:`influence_vectors`), so that two sequences are alike when up-weighting one would
  raise the other's likelihood the most for its size.

Each becomes one unit vector per sequence (for a Gram matrix: the rows of ``V sqrt(Λ)`` of
its cosine matrix, which reproduce it exactly). The sequences then form a graph, each joined
to its ``sqrt(n)`` most similar others, cut into k clusters spectrally; with
``n_clusters=None`` the k of greatest modularity wins, up to a ceiling that grows with the
data (:func:`ceiling`). Every cluster is described by its class-based TF-IDF terms (words
frequent in it and rare in the others), a title of the first three, its size and the member
nearest its centre.

Example:
    >>> texts = ["the cat sat on the mat", "a cat and a kitten", "my cat likes the mat",
    ...          "stocks fell on the market", "the market and stocks rose", "bonds and stocks"]
    >>> themes = cluster(texts, n_clusters=2)
    >>> same = themes.labels[0] == themes.labels[2] != themes.labels[3]
    >>> sorted(themes.sizes.tolist()), bool(same)
    ([3, 3], True)
    >>> "stocks" in themes.terms[themes.labels[3]]
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from .. import checks
from ..errors import DataError, ParameterError
from .clustering import MAP_SPREAD, MAX_CEILING, ceiling, partition, plane, representatives
from .vectors import (
    SKETCH,
    WORD,
    influence_vectors,
    mean_hidden_states,
    plain_text,
    stored_influence_vectors,
    unit_vectors,
)

__all__ = [
    "MAP_SPREAD",
    "MAX_CEILING",
    "METHODS",
    "SKETCH",
    "WORD",
    "Themes",
    "across",
    "ceiling",
    "class_tfidf_terms",
    "cluster",
    "for_query",
    "influence_vectors",
    "mean_hidden_states",
    "plain_text",
    "stored_influence_vectors",
]

METHODS = ("tfidf", "gradient", "embedding", "influence")
OPTIONS = ("max_clusters", "n_terms", "seed")  # for_query / across pass these on to cluster
TITLE_TERMS = 3  # terms in a cluster's title


@dataclass
class Themes:
    """The clusters of a list of texts.

    ``labels[i]`` is the cluster of text ``i``; ``terms[c]`` its top distinguishing words;
    ``sizes[c]`` its member count; ``representatives[c]`` the index of its member nearest the
    centre; ``titles[c]`` names it by its top terms; ``coords[i]`` places text ``i`` on a 2-D
    map (a t-SNE layout of the cosine distances of the vectors that were clustered, robustly
    scaled: the middle 90 % within ±1, outliers clipped at ±2), for plotting. From
    :func:`for_query` / :func:`across`: ``indices[i]`` is the training index of text ``i``,
    ``shares[c]`` the cluster's share of the query's positive influence, and
    ``matrix[q, c]`` that share per query. ``k_scores[k]`` is the modularity of the
    neighbour-graph partition into each number of clusters tried: with ``n_clusters=None``
    the evidence for the k chosen (:meth:`k_evidence` says it in words); ``silhouette`` is
    the cosine silhouette of the clusters found.
    """

    labels: np.ndarray
    terms: list[list[str]]
    sizes: np.ndarray
    representatives: list[int]
    texts: list[str]
    method: str
    silhouette: float | None = None
    k_scores: dict[int, float] = field(default_factory=dict)
    indices: np.ndarray | None = None
    shares: np.ndarray | None = None
    matrix: np.ndarray | None = None
    query_ids: list[str] = field(default_factory=list)
    coords: np.ndarray | None = None

    @property
    def n_clusters(self) -> int:
        return len(self.sizes)

    @property
    def titles(self) -> list[str]:
        """Each cluster's title: its top ``TITLE_TERMS`` distinguishing terms (``"cluster c"``
        when it has none), with the cluster number added where two titles would be equal.

        Example:
            >>> Themes(np.array([0, 1]), [["cat", "mat"], []], np.array([1, 1]), [0, 1],
            ...        ["a cat", "b"], "tfidf").titles
            ['cat · mat', 'cluster 1']
        """
        titles = [" · ".join(t[:TITLE_TERMS]) or f"cluster {c}" for c, t in enumerate(self.terms)]
        repeated = {t for t in titles if titles.count(t) > 1}
        return [f"{t} ({c})" if t in repeated else t for c, t in enumerate(titles)]

    def members(self, c: int) -> list[int]:
        """Positions (into ``texts``) of cluster ``c``'s members."""
        return np.flatnonzero(self.labels == c).tolist()

    def summary(self, width: int = 60) -> str:
        """One line per cluster: its title, size, influence share (if any) and representative,
        then how k was chosen.

        Example:
            >>> texts = ["red apple pie", "red apple tart", "blue sky", "blue sea"]
            >>> print(cluster(texts, n_clusters=2).summary())
            blue · sea · sky   n=2    | blue sky
            apple · red · pie  n=2    | red apple pie
            k = 2 (told)
        """
        titles = self.titles
        title_width = max(len(t) for t in titles)
        lines = []
        for c in range(self.n_clusters):
            share = f" {self.shares[c]:6.1%}" if self.shares is not None else ""
            text = self.texts[self.representatives[c]]
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"{titles[c]:<{title_width}}  n={self.sizes[c]:<4}{share} | {text}")
        return "\n".join([*lines, self.k_evidence()])

    def k_evidence(self) -> str:
        """How k was chosen, in words: the modularity of each k tried, or that k was told.

        Example:
            >>> Themes(np.array([0, 1, 2]), [[], [], []], np.array([1, 1, 1]), [0, 1, 2],
            ...        ["a", "b", "c"], "tfidf", k_scores={2: 0.31, 3: 0.4, 4: 0.38}).k_evidence()
            'k = 3 of 2..4 by neighbour-graph modularity (2: 0.31, 3: 0.40, 4: 0.38)'
        """
        if len(self.k_scores) <= 1:
            return f"k = {self.n_clusters} (told)"
        tried = sorted(self.k_scores)
        scores = ", ".join(f"{k}: {self.k_scores[k]:.2f}" for k in tried)
        return (
            f"k = {self.n_clusters} of {tried[0]}..{tried[-1]} by neighbour-graph modularity "
            f"({scores})"
        )


def cluster(
    texts: list[str],
    method: str = "tfidf",
    n_clusters: int | None = None,
    *,
    vectors: np.ndarray | None = None,
    gram: np.ndarray | None = None,
    store=None,
    factors=None,
    indices=None,
    max_clusters: int | None = None,
    n_terms: int = 8,
    seed: int = 0,
) -> Themes:
    """Cluster ``texts``; see the module docstring.

    ``method="tfidf"`` needs only the texts. The other methods need the sequences' vectors
    (``vectors``, ``(n, d)``) or their Gram matrix (``gram``, ``(n, n)``), or read them from
    the gradient ``store`` the texts are in (``indices``: their rows, default all):
    ``"gradient"`` its ``store.gram``, ``"influence"`` with ``factors`` their preconditioned
    gradients (:func:`stored_influence_vectors`). :func:`for_query` and :func:`across`
    fetch them for you.
    ``n_clusters=None`` picks k in ``2 .. max_clusters`` (default :func:`ceiling` of the
    number of texts) by the modularity of the texts' neighbour graph; ``Themes.k_scores``
    keeps the modularity of every k tried.

    Example:
        >>> vectors = np.eye(3)[[0, 0, 1]]   # two alike, one apart
        >>> cluster(["a b", "c d", "e f"], "gradient", 2, vectors=vectors).labels
        array([0, 0, 1])
    """
    texts = _check_texts(texts)
    _check_settings(method, n_clusters, max_clusters, n_terms, seed)
    if n_clusters is not None and n_clusters > len(texts):
        raise ParameterError("n_clusters", n_clusters, f"in 1..{len(texts)} (the texts) or None")
    if vectors is None and gram is None and store is not None:
        vectors, gram = _from_store(method, store, factors, indices, len(texts))
    vectors, gram = _check_vectors(method, vectors, gram, len(texts))
    # One BLAS/OpenMP thread: these problems are small, and on a busy machine more threads
    # made clustering 10-20x slower (benchmarks/widgets.py, the explorer's Themes tab).
    with threadpool_limits(limits=1):
        units = unit_vectors(texts, method, vectors, gram, seed)
        labels, silhouette, k_scores = partition(units, n_clusters, max_clusters, seed)
    k = int(labels.max()) + 1
    return Themes(
        labels=labels,
        terms=class_tfidf_terms(texts, labels, n_terms),
        sizes=np.bincount(labels, minlength=k),
        representatives=representatives(units, labels),
        texts=texts,
        method=method,
        silhouette=silhouette,
        k_scores=k_scores,
        coords=plane(units, seed),
    )


def for_query(
    result,
    dataset,
    q: int,
    top_k: int = 50,
    method: str = "tfidf",
    n_clusters: int | None = None,
    *,
    store=None,
    model=None,
    factors=None,
    **options,
) -> Themes:
    """Cluster query ``q``'s ``top_k`` most influential sequences; adds each cluster's share
    of their positive influence (``shares``) and their training indices (``indices``).

    ``method="gradient"`` reads their gradients from ``store`` (the store the result was
    scored against); ``"embedding"`` runs ``model`` over them (``options``: ``layer``);
    ``"influence"`` preconditions their gradients by ``factors``, computing them with
    ``model`` (:func:`influence_vectors`, exact) or, without one, reading them from ``store``
    (:func:`stored_influence_vectors`, as the store keeps them).

    Example:
        >>> themes = for_query(result, train, 0, top_k=50)   # doctest: +SKIP
        >>> print(themes.summary())                          # doctest: +SKIP
    """
    _check_request(method, n_clusters, top_k, store, model, factors, options)
    n_queries = len(result.query_ids)
    last = n_queries - 1
    checks.count("q", q, minimum=0, maximum=last, allowed=f"a query index in 0..{last}")
    top = result.top(q, top_k)
    indices = np.array([i for i, _ in top], dtype=np.int64)
    scores = np.array([s for _, s in top])
    sources = {"store": store, "model": model, "factors": factors}
    themes = _cluster_indices(result, dataset, indices, method, n_clusters, sources, options)
    themes.shares = _shares(themes.labels, scores, themes.n_clusters)
    themes.query_ids = [result.query_ids[q]]
    return themes


def across(
    result,
    dataset,
    top_k: int = 20,
    method: str = "tfidf",
    n_clusters: int | None = None,
    *,
    store=None,
    model=None,
    factors=None,
    **options,
) -> Themes:
    """Cluster the union of every query's ``top_k`` sequences; ``matrix[q, c]`` is the share
    of query ``q``'s positive top-``k`` influence that falls in cluster ``c``.

    Example:
        >>> themes = across(result, train, top_k=20)   # doctest: +SKIP
        >>> themes.matrix.shape                         # doctest: +SKIP
        (22, 7)
    """
    _check_request(method, n_clusters, top_k, store, model, factors, options)
    tops = [result.top(q, top_k) for q in range(len(result.query_ids))]
    indices = np.array(sorted({i for top in tops for i, _ in top}), dtype=np.int64)
    sources = {"store": store, "model": model, "factors": factors}
    themes = _cluster_indices(result, dataset, indices, method, n_clusters, sources, options)
    position = {int(i): p for p, i in enumerate(indices)}
    matrix = np.zeros((len(tops), themes.n_clusters))
    for q, top in enumerate(tops):
        labels = themes.labels[[position[i] for i, _ in top]]
        matrix[q] = _shares(labels, np.array([s for _, s in top]), themes.n_clusters)
    themes.matrix = matrix
    themes.query_ids = list(result.query_ids)
    return themes


def class_tfidf_terms(texts: list[str], labels: np.ndarray, n_terms: int = 8) -> list[list[str]]:
    """Each cluster's ``n_terms`` most distinguishing words by class-based TF-IDF.

    A cluster's term frequency (its word counts over its total) is weighted by
    ``log(1 + A / f_t)``, with ``A`` the mean word count per cluster and ``f_t`` the word's
    count over all clusters: frequent here and rare elsewhere ranks first.

    Example:
        >>> class_tfidf_terms(["red apple", "red cherry", "blue sky"], np.array([0, 0, 1]), 1)
        [['red'], ['blue']]
    """
    from sklearn.feature_extraction.text import CountVectorizer

    n_terms = checks.count("n_terms", n_terms)
    labels = np.asarray(labels)
    if labels.shape != (len(texts),) or not np.issubdtype(labels.dtype, np.integer):
        raise ParameterError("labels", labels, f"{len(texts)} int cluster labels, one per text")
    if not len(texts):
        return []
    k = int(labels.max()) + 1
    try:
        counts = CountVectorizer(
            stop_words="english", token_pattern=WORD, preprocessor=plain_text
        ).fit(texts)
    except ValueError:  # no words at all (only stop words, numbers or symbols)
        return [[] for _ in range(k)]
    words = counts.get_feature_names_out()
    per_text = counts.transform(texts)
    per_class = np.vstack([np.asarray(per_text[labels == c].sum(axis=0)) for c in range(k)])
    tf = per_class / np.maximum(per_class.sum(axis=1, keepdims=True), 1)
    idf = np.log(1 + per_class.sum(axis=1).mean() / np.maximum(per_class.sum(axis=0), 1))
    weight = tf * idf
    return [
        [str(words[j]) for j in np.argsort(-weight[c], kind="stable")[:n_terms] if weight[c, j] > 0]
        for c in range(k)
    ]


# -- internals --------------------------------------------------------------------------------


def _check_texts(texts) -> list[str]:
    """``texts`` as a list of strings: any non-empty iterable but one string."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise ParameterError("texts", texts, "a list of strings")
    listed = [str(t) for t in texts]
    if not listed:
        raise ParameterError("texts", texts, "a non-empty list of strings: no texts to cluster")
    return listed


def _check_settings(method, n_clusters, max_clusters, n_terms, seed) -> None:
    """The checks of :func:`cluster`'s settings that need no texts."""
    checks.choice("method", method, METHODS)
    checks.count("n_clusters", n_clusters, optional=True)
    checks.count("max_clusters", max_clusters, optional=True)
    checks.count("n_terms", n_terms)
    checks.count("seed", seed, minimum=0)


def _from_store(method, store, factors, indices, n):
    """``(vectors, gram)`` of the stored sequences ``indices`` (default all ``n``), for the
    methods that can read them from a store."""
    indices = list(range(len(store))) if indices is None else [int(i) for i in indices]
    if len(indices) != n:
        allowed = f"{n} store rows, one per text (the store holds {len(store)})"
        raise ParameterError("indices", indices if len(indices) < 10 else len(indices), allowed)
    if method == "gradient":
        return None, store.gram(indices)
    if method == "influence":
        if factors is None:
            raise ParameterError(
                "factors", None, "fitted factors: method='influence' from a store needs factors="
            )
        return stored_influence_vectors(store, factors, indices), None
    raise ParameterError(
        "store", store, f"not given for method={method!r}: only 'gradient' and 'influence' read one"
    )


def _check_vectors(method, vectors, gram, n):
    """``(vectors, gram)`` as float64 arrays (or ``None``), shaped for ``n`` texts."""
    if method == "tfidf":
        return None, None  # the texts' own words: vectors and gram are not used
    if gram is not None:
        matrix = _float_array("gram", gram, "an (n, n) matrix of numbers, one row per text")
        if matrix.shape != (n, n):
            allowed = f"({n}, {n}) for {n} texts, not of shape {matrix.shape}"
            raise ParameterError("gram", gram, allowed)
        return None, matrix
    if vectors is None:
        raise ParameterError(
            "vectors",
            vectors,
            f"an (n, d) array or gram= an (n, n) one: method={method!r} needs vectors= or "
            "gram= (or use for_query/across)",
        )
    array = _float_array("vectors", vectors, "an (n, d) array of numbers, one row per text")
    if array.ndim != 2 or array.shape[0] != n:
        allowed = f"an (n, d) array with one row per text ({n}), not of shape {array.shape}"
        raise ParameterError("vectors", vectors, allowed)
    return array, None


def _float_array(name: str, value, allowed: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(name, value, allowed) from None


def _check_request(method, n_clusters, top_k, store, model, factors, options) -> None:
    """The checks of :func:`for_query` and :func:`across`, before any scores are read."""
    checks.choice("method", method, METHODS)
    checks.count("top_k", top_k)
    checks.count("n_clusters", n_clusters, optional=True)
    allowed = OPTIONS + (("layer",) if method == "embedding" else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listing = ", ".join(repr(name) for name in allowed)
        raise ParameterError("options", unknown, f"keywords among {listing}")
    settings = {"max_clusters": None, "n_terms": 8, "seed": 0}
    settings.update((key, options[key]) for key in OPTIONS if key in options)
    _check_settings(method, n_clusters, **settings)
    if "layer" in options:
        checks.count("layer", options["layer"], minimum=None)
    if method == "gradient" and store is None:
        raise ParameterError(
            "store",
            store,
            "a GradientStore: method='gradient' needs store= (the store scored against)",
        )
    if method == "embedding" and model is None:
        raise ParameterError(
            "model", model, "a model: method='embedding' needs model= (to compute hidden states)"
        )
    if method == "influence" and (factors is None or (model is None and store is None)):
        missing = "factors" if factors is None else "model"
        raise ParameterError(
            missing,
            None,
            "fitted factors and a model or a store: method='influence' needs factors= and "
            "model= (gradients computed) or store= (gradients read) to precondition the "
            "sequences' gradients",
        )


def _cluster_indices(result, dataset, indices, method, n_clusters, sources, options):
    """Cluster the training sequences ``indices`` of ``result`` (texts from ``dataset``);
    ``sources``: the ``store``, ``model`` and ``factors`` the method may need."""
    store, model = sources["store"], sources["model"]
    by_id = {ex.id: ex for ex in dataset}
    ids = [result.train_ids[i] for i in indices]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"themes: training id {missing[0]!r} of the result is not in the dataset")
    texts = [by_id[i].text for i in ids]
    vectors = gram = None
    from_store = method == "gradient" or (method == "influence" and model is None)
    if from_store:
        stored = store.ids
        if [stored[i] for i in indices] != ids:
            raise DataError("themes: the store's ids differ from the result's at these indices")
        vectors, gram = _from_store(method, store, sources["factors"], indices, len(indices))
    elif method in ("embedding", "influence"):
        where = {ex_id: p for p, ex_id in enumerate(dataset.ids)}
        positions = [where[i] for i in ids]
        if method == "embedding":
            layer = options.pop("layer", -1)
            vectors = mean_hidden_states(model, dataset, positions, layer=layer)
        else:
            vectors = influence_vectors(model, sources["factors"], dataset, positions)
    themes = cluster(texts, method, n_clusters, vectors=vectors, gram=gram, **options)
    themes.indices = np.asarray(indices, dtype=np.int64)
    return themes


def _shares(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Each cluster's part of the positive influence in ``scores`` (zeros if there is none)."""
    positive = np.clip(scores, 0, None)
    total = positive.sum()
    sums = np.bincount(labels, weights=positive, minlength=k)
    return sums / total if total > 0 else np.zeros(k)
