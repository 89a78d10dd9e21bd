"""Candidate prefilter for the no-store path: score only the sequences a text search finds
(Okapi BM25 on binary term presence, the paper's TF-IDF filter).

Example:
    >>> bm25_candidates([("The comet", " nears")], ["A comet.", "Rain.", "Comets!"], m=1)
    [array([0])]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .. import checks
from ..data import TextDataset, as_queries
from ..errors import DataError, ParameterError
from ..result import InfluenceResult
from ._checks import _check_int, _check_result


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
    _check_bm25(k1, b)
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
    _check_bm25(k1, b)
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
    _check_result(result)
    _check_int("k", k)
    if result.is_top_k:
        raise ParameterError(
            "result",
            "a top-k result",
            "a full result (scored without top_k) to know the top k",
        )
    if len(candidates) != len(result.query_ids):
        raise ParameterError(
            "candidates",
            f"candidates has {len(candidates)} entries, the result {len(result.query_ids)} queries",
            "one array of training indices per query of the result",
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
    from ..scoring import score  # scoring pulls in torch and the models: import when used

    checks.instance("train", train, TextDataset, "a TextDataset (its texts are searched)")
    _check_int("m", m)
    _check_bm25(k1, b)
    if "top_k" in score_kwargs:
        raise ParameterError(
            "top_k",
            score_kwargs["top_k"],
            "left out: score_prefiltered keeps each query's m candidates (leave out top_k)",
        )
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
        np.stack(layer_scores),
        part.layers,
        train.ids,
        part.query_ids,
        meta,
        np.stack(indices),
        queries=part.queries,
    )


def _check_bm25(k1, b) -> None:
    """``k1 >= 0`` and ``0 <= b <= 1``, both finite numbers."""
    why = " (BM25 scores need k1 >= 0 and 0 <= b <= 1)"
    checks.number("k1", k1, minimum=0, allowed="a finite number >= 0" + why)
    checks.number("b", b, minimum=0, maximum=1, allowed="in [0, 1]" + why)
