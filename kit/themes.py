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

from . import checks
from .errors import DataError, ParameterError

METHODS = ("tfidf", "gradient", "embedding", "influence")
SKETCH = 32  # influence vectors: a layer of more than SKETCH² entries is sketched to SKETCH²
OPTIONS = ("max_clusters", "n_terms", "seed")  # for_query / across pass these on to cluster
WORD = r"(?u)\b[a-zA-Z][a-zA-Z]+\b"  # words of 2+ letters: no numbers or punctuation
TITLE_TERMS = 3  # terms in a cluster's title
MAP_SPREAD = 2.0  # map coordinates: the bulk within ±1, outliers clipped at ±MAP_SPREAD
MAP_TSNE_MIN = 10  # from this many texts the map is a t-SNE layout, below it principal axes
MAX_CEILING = 30  # the most clusters tried by default, however many texts
PLATEAU = 0.01  # k scoring within 1 % of the best modularity counts as good as the best
GRAPH_BLOCK = 1024  # rows of the similarity matrix held at once when building the graph
GRAPH_MIN = 10  # fewer distinct texts than this are clustered by k-means, not a graph


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
        units = _unit_vectors(texts, method, vectors, gram, seed)
        labels, silhouette, k_scores = _partition(units, n_clusters, max_clusters, seed)
    k = int(labels.max()) + 1
    return Themes(
        labels=labels,
        terms=class_tfidf_terms(texts, labels, n_terms),
        sizes=np.bincount(labels, minlength=k),
        representatives=_representatives(units, labels),
        texts=texts,
        method=method,
        silhouette=silhouette,
        k_scores=k_scores,
        coords=_plane(units, seed),
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
        counts = CountVectorizer(stop_words="english", token_pattern=WORD).fit(texts)
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


def mean_hidden_states(
    model, dataset, indices=None, *, layer: int = -1, batch_size: int = 16, device=None
) -> np.ndarray:
    """``(n, hidden)``: each sequence's hidden state at ``layer`` averaged over its tokens.

    ``layer`` indexes ``output_hidden_states`` (0 = embeddings, -1 = the last block).

    Example:
        >>> vectors = mean_hidden_states(model, train, [0, 5, 9])   # doctest: +SKIP
    """
    import torch

    from .data import collate, padding_id
    from .models import resolve_device

    checks.count("layer", layer, minimum=None)  # an index into output_hidden_states
    batch_size = checks.count("batch_size", batch_size)
    device = checks.device("device", device)
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    examples = [dataset[i] for i in indices]
    device = resolve_device(model, device)
    pad = padding_id(dataset.tokenizer)
    out = []
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            ids = [ex.input_ids for ex in chunk]
            batch = collate(ids, [1] * len(ids), list(range(len(ids))), pad).to(device)
            hidden = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            ).hidden_states[layer]
            mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def influence_vectors(
    model,
    factors,
    dataset,
    indices=None,
    *,
    damping=None,
    sketch: int | None = SKETCH,
    seed: int = 0,
    batch_size: int = 8,
    device=None,
    dtype="float32",
) -> np.ndarray:
    """``(n, D)``: each sequence's training gradient in the curvature eigenbasis of every
    layer of ``factors``, divided by ``sqrt(Λ + λ)`` (:meth:`LayerFactors.whitened`): dot
    products of two rows are the influence of one sequence on the other,
    ``Σ_ℓ ⟨G_a, (Ĝ + λI)⁻¹ G_b⟩``, and their cosines the similarity ``method="influence"``
    clusters by. A layer of more than ``sketch²`` entries is compressed to ``sketch × sketch``
    by a fixed seeded Gaussian on each side (``P W Rᵀ``, ``E[PᵀP] = E[RᵀR] = I``: unbiased dot
    products); ``sketch=None`` keeps every entry.

    Example:
        >>> vectors = influence_vectors(model, factors, train, [0, 5, 9])  # doctest: +SKIP
        >>> cluster(texts, "influence", vectors=vectors)                    # doctest: +SKIP
    """
    import torch

    from .data import example_batches
    from .settings import RunSettings

    checks.count("sketch", sketch, optional=True)
    run = RunSettings(batch_size=batch_size, device=device, dtype=dtype, progress=False)
    run = run.on(model)
    layers = factors.tracked_layers(model)
    damping = factors.damping_for(damping)
    chosen = dataset.subset(range(len(dataset)) if indices is None else [int(i) for i in indices])
    shapes = {layer.name: layer.grad_shape for layer in layers}
    sides = _sketch_sides(shapes, sketch, seed, device=run.device, dtype=run.dtype)
    rows = []
    batches = example_batches(chosen, run.batch_size)
    for _, io in run.captures(model, layers, batches, desc="influence vectors", progress=False):
        parts = []
        for layer in layers:
            x = io[layer.name]
            w = factors.layers[layer.name].whitened(x.s, x.a, damping[layer.name])
            if layer.name in sides:
                left, right = sides[layer.name]
                w = left @ w @ right.T
            parts.append(w.flatten(1))
        rows.append(torch.cat(parts, dim=1).double().cpu().numpy())
    return np.concatenate(rows)


def stored_influence_vectors(
    store,
    factors,
    indices=None,
    *,
    damping=None,
    sketch: int | None = SKETCH,
    seed: int = 0,
    rows: int = 16,
) -> np.ndarray:
    """:func:`influence_vectors` of stored sequences, from their gradients as the store keeps
    them (decoded by its codec) instead of a model's forward and backward passes: the same
    vectors, sketched the same way, for a ``dense`` store or a ``lowrank`` one of full rank;
    for ``sparse`` and lower ranks, those of the stored approximations. ``indices``: store
    rows (default all); ``rows``: sequences decoded at a time per layer. ``kron`` and ``eig``
    stores keep projections of the gradients, which cannot be preconditioned.

    Example:
        >>> vectors = stored_influence_vectors(store, factors, [0, 5, 9])  # doctest: +SKIP
    """
    import torch

    from .lowrank import times_stack
    from .store.codecs import stored_tensor

    checks.count("sketch", sketch, optional=True)
    rows = checks.count("rows", rows)
    store.check(modules=factors.modules)
    kept = {name: layer.basis_fingerprint() for name, layer in factors.layers.items()}
    store.check_eigenbasis(kept)
    positions = {name: store.modules.index(name) for name in factors.modules}
    projected = [n for n, j in positions.items() if not hasattr(store.codecs[j], "decode")]
    if projected:
        raise ParameterError(
            "store",
            store.path,
            f"a store of whole gradients (dense, lowrank, sparse): its codec {store.codec!r} "
            f"keeps projections of layer {projected[0]}'s, which cannot be preconditioned; "
            "pass model= to compute them on the fly",
        )
    damping = factors.damping_for(damping)
    indices = list(range(len(store))) if indices is None else [int(i) for i in indices]
    shapes = {name: factors.layers[name].shape for name in factors.modules}
    sides = _sketch_sides(shapes, sketch, seed, device="cpu", dtype=torch.float64)
    blocks = []
    for lo in range(0, len(indices), rows):  # every layer of a few rows per read
        layers = store.rows(indices[lo : lo + rows], list(positions.values()))
        parts = []
        for name, arrays in zip(positions, layers, strict=True):
            codec, layer = store.codecs[positions[name]], factors.layers[name]
            stored = {key: stored_tensor(value, torch.float64) for key, value in arrays.items()}
            in_eigenbasis = getattr(codec, "eigenbasis", None) is not None
            w = layer.whiten(codec.decode(stored), damping[name], in_eigenbasis=in_eigenbasis)
            if name in sides:
                left, right = sides[name]
                w = times_stack(left, w) @ right.T
            parts.append(w.flatten(1))
        blocks.append(torch.cat(parts, dim=1))
    return torch.cat(blocks).numpy() if blocks else np.zeros((0, 0))


# -- internals --------------------------------------------------------------------------------


def _sketch_sides(shapes: dict, sketch: int | None, seed: int, *, device, dtype) -> dict:
    """``{layer: (P, R)}``: for each layer of more than ``sketch²`` entries, in order, the
    seeded Gaussian ``(sketch, d_out)`` and ``(sketch, d_in)`` sketches, scaled so that
    ``E[PᵀP] = I``; the same for the same shapes and seed, wherever the gradients come from."""
    import torch

    generator = torch.Generator().manual_seed(checks.count("seed", seed, minimum=0))
    sides = {}
    for name, (d_out, d_in) in shapes.items():
        if sketch is not None and d_out * d_in > sketch * sketch:
            sides[name] = [
                (torch.randn(sketch, d, generator=generator, dtype=torch.float64) / sketch**0.5).to(
                    device=device, dtype=dtype
                )
                for d in (d_out, d_in)
            ]
    return sides


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


def _unit_vectors(texts, method, vectors, gram, seed) -> np.ndarray:
    """One row per text, unit length, whose dot products are the cosine similarities."""
    if method == "tfidf":
        vectors = _tfidf(texts, seed)
    elif gram is not None:
        vectors = _from_gram(gram, len(texts))
    vectors = np.asarray(vectors, dtype=np.float64)
    if not np.isfinite(vectors).all():
        raise DataError("themes: the vectors or Gram matrix contain NaN or inf")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _tfidf(texts: list[str], seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        matrix = TfidfVectorizer(
            stop_words="english", token_pattern=WORD, sublinear_tf=True
        ).fit_transform(texts)
    except ValueError:  # nothing but stop words: every text alike
        return np.ones((len(texts), 1))
    # Short texts share few words: LSA (truncated SVD) lets synonyms' co-occurrence count.
    dims = min(100, matrix.shape[1] - 1, len(texts) - 1)
    if dims >= 2 and matrix.shape[1] > 100:
        return TruncatedSVD(dims, random_state=seed).fit_transform(matrix)
    return matrix.toarray()


def _from_gram(gram: np.ndarray, n: int) -> np.ndarray:
    """Rows ``V sqrt(Λ₊)`` of the cosine matrix of ``gram``: their dot products equal it."""
    if gram.shape != (n, n):
        raise ParameterError("gram", gram, f"({n}, {n}) for {n} texts, not of shape {gram.shape}")
    if not np.isfinite(gram).all():
        raise DataError("themes: the vectors or Gram matrix contain NaN or inf")
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    norms[norms == 0] = 1  # a zero gradient stays a zero row
    cosine = gram / np.outer(norms, norms)
    values, vecs = np.linalg.eigh((cosine + cosine.T) / 2)
    keep = values > 1e-10 * max(values.max(), 1e-300)
    return vecs[:, keep] * np.sqrt(values[keep])


def _partition(units: np.ndarray, n_clusters, max_clusters, seed: int):
    """Labels (renumbered by decreasing size), their cosine silhouette, and the modularity
    of every k tried (the evidence for the choice).

    The texts become a graph, each joined to its nearest neighbours (:func:`_neighbour_graph`);
    every k is a spectral partition of that graph, and with ``n_clusters=None`` the k of
    greatest modularity wins: the share of edges inside clusters beyond what random wiring
    with the same degrees would put there. Splitting a group that hangs together loses more
    edges than it gains, so unlike the silhouette on short texts it does not keep rising
    with k. Fewer than ``GRAPH_MIN`` distinct texts say too little for a graph: they are
    partitioned by k-means on the unit vectors, and scored the same way.
    """
    from sklearn.metrics import silhouette_score

    n = len(units)
    distinct = len(np.unique(units.round(12), axis=0))
    if n_clusters is None:
        top = ceiling(n) if max_clusters is None else max_clusters
        candidates = list(range(2, min(top, distinct - 1, n - 1) + 1)) or [1]
    else:
        candidates = [min(n_clusters, distinct)]
    graph = _neighbour_graph(units)
    # One embedding as wide as the default ceiling, whatever k is asked for: a k told is
    # then cut exactly as the same k found automatically.
    dims = max(max(candidates), ceiling(n))
    split = _spectral_splitter(graph, dims, seed) if distinct >= GRAPH_MIN else None
    partitions = {k: _split(units, k, split, seed) for k in candidates}
    scores = {k: _modularity(graph, labels) for k, labels in partitions.items() if k > 1}
    labels = partitions[_fewest_near_best(scores) if scores else candidates[0]]
    k = len(np.unique(labels))
    silhouette = float(silhouette_score(units, labels, metric="cosine")) if 1 < k < n else None
    order = np.argsort(-np.bincount(labels), kind="stable")  # cluster 0 = the largest
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return renumber[labels].astype(np.int64), silhouette, scores


def _fewest_near_best(scores: dict[int, float]) -> int:
    """The smallest k scoring within ``PLATEAU`` (relative) of the best: where modularity
    is flat, more clusters only cut groups that hang together as well whole.

    Example:
        >>> _fewest_near_best({2: 0.2, 3: 0.398, 4: 0.40, 5: 0.39})
        3
    """
    best = max(scores.values())
    return min(k for k, score in scores.items() if score >= best - PLATEAU * abs(best))


def ceiling(n: int) -> int:
    """The most clusters :func:`cluster` tries for ``n`` texts unless told otherwise:
    ``sqrt(n / 2)``, at least 2 and at most ``MAX_CEILING``: clusters of ``sqrt(2 n)``
    texts on average at the ceiling, few enough to read and each large enough to name.

    Example:
        >>> ceiling(50), ceiling(800), ceiling(100_000)
        (5, 20, 30)
    """
    return int(min(MAX_CEILING, max(2, round((n / 2) ** 0.5))))


def _neighbour_graph(units: np.ndarray):
    """The symmetric 0/1 graph joining each text to its ``round(sqrt(n))`` most similar
    (cosine) others, as a sparse matrix: wide enough that a theme's texts form one
    connected block, narrow enough that unrelated texts rarely touch."""
    from scipy import sparse

    n = len(units)
    neighbours = int(min(n - 1, max(1, round(n**0.5))))
    if neighbours < 1:
        return sparse.csr_matrix((n, n))
    nearest = np.empty((n, neighbours), dtype=np.int64)
    for lo in range(0, n, GRAPH_BLOCK):  # a block of rows at a time: memory O(n), not O(n²)
        similarity = units[lo : lo + GRAPH_BLOCK] @ units.T
        rows = np.arange(len(similarity))
        similarity[rows, lo + rows] = -np.inf  # not its own neighbour
        order = np.argpartition(-similarity, neighbours - 1, axis=1)
        nearest[lo : lo + GRAPH_BLOCK] = order[:, :neighbours]
    rows = np.repeat(np.arange(n), neighbours)
    graph = sparse.csr_matrix((np.ones(n * neighbours), (rows, nearest.ravel())), shape=(n, n))
    return ((graph + graph.T) > 0).astype(np.float64)


def _spectral_splitter(graph, k_max: int, seed: int) -> np.ndarray:
    """The graph's first ``k_max`` spectral coordinates (normalised Laplacian), each row
    scaled to unit length: k-means on the first k columns gives its k-way spectral cut."""
    import warnings

    from sklearn.manifold import spectral_embedding
    from sklearn.preprocessing import normalize

    with warnings.catch_warnings():  # a graph in pieces is fine: the pieces are clusters
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        coords = spectral_embedding(
            graph, n_components=max(k_max, 2), drop_first=False, random_state=seed
        )
    return normalize(coords)


def _split(units: np.ndarray, k: int, spectral, seed: int) -> np.ndarray:
    """k clusters: k-means on the spectral coordinates, or on the unit vectors when there
    are none (too few texts for a graph)."""
    from sklearn.cluster import KMeans

    if k == 1:
        return np.zeros(len(units), dtype=np.int64)
    points = units if spectral is None else spectral[:, :k]
    return KMeans(k, n_init=10, random_state=seed).fit_predict(points).astype(np.int64)


def _modularity(graph, labels: np.ndarray) -> float:
    """Newman's modularity of ``labels`` on ``graph``: the share of edge ends inside clusters
    minus the share expected if edges were placed at random keeping each text's degree.

    Example:
        >>> from scipy import sparse
        >>> two_pairs = sparse.csr_matrix(np.kron(np.eye(2), np.ones((2, 2))) - np.eye(4))
        >>> round(_modularity(two_pairs, np.array([0, 0, 1, 1])), 3)
        0.5
    """
    total = graph.sum()
    if total == 0:
        return 0.0
    degree = np.asarray(graph.sum(axis=1)).ravel()
    inside = 0.0
    for c in np.unique(labels):
        members = labels == c
        inside += graph[members][:, members].sum() / total - (degree[members].sum() / total) ** 2
    return float(inside)


def _plane(units: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` map coordinates of the unit vectors: a t-SNE layout of their cosine
    distances from ``MAP_TSNE_MIN`` texts on (it keeps each text near its neighbours and
    spreads the rest, where the two directions of greatest variance are often set by a few
    texts and squeeze the others into a speck), below that the two principal components;
    then scaled per axis so that the middle 90 % of the points span ±1 around the median,
    and clipped at ±``MAP_SPREAD``: far-out points neither squeeze the rest nor leave the map.

    Example:
        >>> units = np.eye(3)[[0, 0, 1, 1, 2]] + np.r_[:5][:, None] * 1e-3
        >>> bool(np.abs(_plane(units)).max() <= MAP_SPREAD)
        True
    """
    centred = units - units.mean(axis=0)
    if len(units) < 2 or not centred.any():
        return np.zeros((len(units), 2))
    if len(units) >= MAP_TSNE_MIN:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(units) - 1) / 3)  # about 3 neighbours per perplexity unit
        # 500 iterations, half scikit-learn's default, to keep the Themes tab quick: on the
        # demo's quotes the layout keeps neighbourhoods (trustworthiness 0.85-0.90, against
        # 0.61-0.63 for the principal plane; benchmarks/themes.py --demo).
        plane = TSNE(
            2, perplexity=perplexity, metric="cosine", init="pca", max_iter=500, random_state=seed
        ).fit_transform(units)
    else:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        plane = centred @ vt[:2].T
        plane = np.pad(plane, ((0, 0), (0, 2 - plane.shape[1])))  # one direction: a line
    offset = plane - np.median(plane, axis=0)
    spread = np.quantile(np.abs(offset), 0.9, axis=0)
    spread[spread == 0] = 1.0  # an axis where (almost) every point sits at the median
    return np.clip(offset / spread, -MAP_SPREAD, MAP_SPREAD)


def _representatives(units: np.ndarray, labels: np.ndarray) -> list[int]:
    """Per cluster, the member most similar (cosine) to the cluster's mean direction."""
    reps = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        centre = units[members].mean(axis=0)
        reps.append(int(members[np.argmax(units[members] @ centre)]))
    return reps


def _shares(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Each cluster's part of the positive influence in ``scores`` (zeros if there is none)."""
    positive = np.clip(scores, 0, None)
    total = positive.sum()
    sums = np.bincount(labels, weights=positive, minlength=k)
    return sums / total if total > 0 else np.zeros(k)
