"""From unit vectors to themes: a neighbour graph cut spectrally into k clusters, the k of
greatest modularity, each cluster's most central member, and a 2-D map of the vectors.

Example:
    >>> noise = np.random.default_rng(0).normal(scale=0.1, size=(30, 3))
    >>> units = np.eye(3)[np.repeat([0, 1, 2], 10)] + noise   # 3 groups of 10
    >>> units /= np.linalg.norm(units, axis=1, keepdims=True)
    >>> labels, _, scores = partition(units, None, None, seed=0)
    >>> sorted(np.bincount(labels).tolist()), sorted(scores), max(scores, key=scores.get)
    ([10, 10, 10], [2, 3, 4], 3)
"""

from __future__ import annotations

import numpy as np

MAP_SPREAD = 2.0  # map coordinates: the bulk within ±1, outliers clipped at ±MAP_SPREAD
MAP_TSNE_MIN = 10  # from this many texts the map is a t-SNE layout, below it principal axes
MAX_CEILING = 30  # the most clusters tried by default, however many texts
PLATEAU = 0.01  # k scoring within 1 % of the best modularity counts as good as the best
GRAPH_BLOCK = 1024  # rows of the similarity matrix held at once when building the graph
GRAPH_MIN = 10  # fewer distinct texts than this are clustered by k-means, not a graph


def partition(units: np.ndarray, n_clusters, max_clusters, seed: int):
    """Labels (renumbered by decreasing size), their cosine silhouette, and the modularity
    of every k tried (the evidence for the choice).

    The texts become a graph, each joined to its nearest neighbours (:func:`neighbour_graph`);
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
    graph = neighbour_graph(units)
    # One embedding as wide as the default ceiling, whatever k is asked for: a k told is
    # then cut exactly as the same k found automatically.
    dims = max(max(candidates), ceiling(n))
    split = _spectral_splitter(graph, dims, seed) if distinct >= GRAPH_MIN else None
    partitions = {k: _split(units, k, split, seed) for k in candidates}
    scores = {k: modularity(graph, labels) for k, labels in partitions.items() if k > 1}
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


def neighbour_graph(units: np.ndarray):
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


def modularity(graph, labels: np.ndarray) -> float:
    """Newman's modularity of ``labels`` on ``graph``: the share of edge ends inside clusters
    minus the share expected if edges were placed at random keeping each text's degree.

    Example:
        >>> from scipy import sparse
        >>> two_pairs = sparse.csr_matrix(np.kron(np.eye(2), np.ones((2, 2))) - np.eye(4))
        >>> round(modularity(two_pairs, np.array([0, 0, 1, 1])), 3)
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


def plane(units: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` map coordinates of the unit vectors: a t-SNE layout of their cosine
    distances from ``MAP_TSNE_MIN`` texts on (it keeps each text near its neighbours and
    spreads the rest, where the two directions of greatest variance are often set by a few
    texts and squeeze the others into a speck), below that the two principal components;
    then scaled per axis so that the middle 90 % of the points span ±1 around the median,
    and clipped at ±``MAP_SPREAD``: far-out points neither squeeze the rest nor leave the map.

    Example:
        >>> units = np.eye(3)[[0, 0, 1, 1, 2]] + np.r_[:5][:, None] * 1e-3
        >>> bool(np.abs(plane(units)).max() <= MAP_SPREAD)
        True
    """
    if len(units) < 2 or not (units - units.mean(axis=0)).any():
        return np.zeros((len(units), 2))
    if len(units) < MAP_TSNE_MIN:
        return robust_scale(principal_axes(units))
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(units) - 1) / 3)  # about 3 neighbours per perplexity unit
    # 500 iterations, half scikit-learn's default, to keep the Themes tab quick: on the
    # demo's quotes the layout keeps neighbourhoods (trustworthiness 0.85-0.90, against
    # 0.61-0.63 for the principal plane; benchmarks/themes.py --demo).
    layout = TSNE(
        2, perplexity=perplexity, metric="cosine", init="pca", max_iter=500, random_state=seed
    ).fit_transform(units)
    return robust_scale(layout)


def principal_axes(units: np.ndarray) -> np.ndarray:
    """``(n, 2)``: the vectors' coordinates along their two directions of greatest variance
    (a zero column where there is only one)."""
    centred = units - units.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = centred @ vt[:2].T
    return np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))


def robust_scale(points: np.ndarray) -> np.ndarray:
    """``points`` scaled per axis so that the middle 90 % span ±1 around the median, and
    clipped at ±``MAP_SPREAD``."""
    offset = points - np.median(points, axis=0)
    spread = np.quantile(np.abs(offset), 0.9, axis=0)
    spread[spread == 0] = 1.0  # an axis where (almost) every point sits at the median
    return np.clip(offset / spread, -MAP_SPREAD, MAP_SPREAD)


def representatives(units: np.ndarray, labels: np.ndarray) -> list[int]:
    """Per cluster, the member most similar (cosine) to the cluster's mean direction."""
    reps = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        centre = units[members].mean(axis=0)
        reps.append(int(members[np.argmax(units[members] @ centre)]))
    return reps
