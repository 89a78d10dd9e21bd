"""Keepers: where scores go while training gradients stream past, block by block.

Scoring meets training examples a block at a time (a batch computed on the fly, or a block
read from a store) and hands each block of per-layer scores ``(Q, B, L)`` to a keeper:

- :class:`AllScores` keeps every score, ``(Q, N, L)``;
- :class:`TopK` keeps each query's ``k`` highest, so memory does not grow with ``N``.

Both answer the same questions afterwards: :meth:`best` (each query's highest-scoring
training indices, the candidates ``refine`` rescores), :meth:`replace` (put exact scores in
their place) and :meth:`final` (the layer scores and, for a top-k keeper, the indices).
Under ``torchrun`` each process keeps its share and :meth:`combine` puts them together.

Example:
    >>> keep = TopK(n_queries=1, k=2, n_layers=1)
    >>> keep.add(np.array([0, 1, 2]), np.array([[[1.0], [5.0], [3.0]]]))
    >>> keep.add(np.array([3]), np.array([[[4.0]]]))
    >>> layer_scores, indices = keep.final()
    >>> indices.tolist(), layer_scores[..., 0].tolist()
    ([[1, 3]], [[5.0, 4.0]])
"""

from __future__ import annotations

import numpy as np

from . import distributed


class AllScores:
    """Every score: ``(n_queries, n_train, n_layers)``, zero until its block arrives.

    Example:
        >>> keep = AllScores(1, 3, 1)
        >>> keep.add(np.array([2, 0]), np.array([[[7.0], [1.0]]]))
        >>> keep.best(1).tolist(), keep.final()[0][..., 0].tolist()
        ([[2]], [[1.0, 0.0, 7.0]])
    """

    def __init__(self, n_queries: int, n_train: int, n_layers: int) -> None:
        self.layer_scores = np.zeros((n_queries, n_train, n_layers))

    def add(self, indices: np.ndarray, block: np.ndarray, layers: list[int] | None = None) -> None:
        """Put a block ``(Q, B, L)`` of the training ``indices`` ``(B,)`` in place; with
        ``layers``, the block holds only those layers' columns."""
        if layers is None:
            self.layer_scores[:, indices] = block
        else:
            self.layer_scores[np.ix_(np.arange(block.shape[0]), indices, layers)] = block

    def combine(self) -> None:
        """Sum every process's array (each is zero where another process scored)."""
        distributed.all_sum_numpy(self.layer_scores)

    def best(self, k: int) -> np.ndarray:
        """``(Q, min(k, N))`` training indices of each query's highest scores, best first."""
        totals = self.layer_scores.sum(-1)
        return np.argsort(-totals, axis=1, kind="stable")[:, :k]

    def replace(self, indices: np.ndarray, layer_scores: np.ndarray) -> None:
        """Overwrite query ``q``'s scores of training ``indices[q]`` by ``layer_scores[q]``."""
        rows = np.arange(len(indices))[:, None]
        self.layer_scores[rows, indices] = layer_scores

    def final(self, k: int | None = None) -> tuple[np.ndarray, None]:
        """``(layer_scores, None)``: every score is kept, so there are no indices."""
        return self.layer_scores, None


class TopK:
    """Each query's ``k`` highest scores seen so far, with their per-layer parts."""

    def __init__(self, n_queries: int, k: int, n_layers: int) -> None:
        self.k = k
        self.indices = np.zeros((n_queries, 0), dtype=np.int64)
        self.layer_scores = np.zeros((n_queries, 0, n_layers))

    def add(self, indices: np.ndarray, block: np.ndarray, layers: list[int] | None = None) -> None:
        """Merge a block ``(Q, B, L)`` of scores of the training ``indices`` ``(B,)`` (every
        layer: a top-k keeper takes whole blocks)."""
        assert layers is None or len(layers) == self.layer_scores.shape[-1]
        new = np.broadcast_to(indices, block.shape[:2])
        self._keep(
            np.concatenate([self.indices, new], axis=1),
            np.concatenate([self.layer_scores, block], axis=1),
            self.k,
        )

    def _keep(self, indices: np.ndarray, layer_scores: np.ndarray, k: int) -> None:
        totals = layer_scores.sum(-1)
        # Highest score first; equal scores by lower index, so the result is deterministic.
        order = np.lexsort((indices, -totals), axis=-1)[:, :k]
        self.indices = np.take_along_axis(indices, order, 1)
        self.layer_scores = np.take_along_axis(layer_scores, order[..., None], 1)

    def combine(self) -> None:
        """Merge every process's top-k into the overall top-k (on every process)."""
        if distributed.active():
            self._keep(
                distributed.gather_rows(self.indices),
                distributed.gather_rows(self.layer_scores),
                self.k,
            )

    def best(self, k: int) -> np.ndarray:
        """``(Q, min(k, kept))`` training indices of each query's highest scores, best first."""
        return self.indices[:, :k]

    def replace(self, indices: np.ndarray, layer_scores: np.ndarray) -> None:
        """Overwrite query ``q``'s scores of training ``indices[q]`` (kept ones, as
        :meth:`best` gives them) by ``layer_scores[q]``, and sort again."""
        match = self.indices[:, None, :] == indices[:, :, None]  # (Q, K, kept)
        assert match.any(-1).all(), "replace takes indices that best() gave"
        rows = np.arange(len(indices))[:, None]
        self.layer_scores[rows, match.argmax(-1)] = layer_scores
        self._keep(self.indices, self.layer_scores, self.k)

    def final(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(layer_scores, indices)`` of each query's ``k`` best (default: all kept)."""
        if k is not None and k < self.indices.shape[1]:
            self._keep(self.indices, self.layer_scores, k)
        return self.layer_scores, self.indices


class AllThenTopK(AllScores):
    """Every score while layers arrive in groups (a query's total is known only once the
    last group is in), then each query's ``k`` highest, as :class:`TopK` gives them."""

    def __init__(self, n_queries: int, k: int, n_layers: int, n_train: int) -> None:
        super().__init__(n_queries, n_train, n_layers)
        self.k = k

    def final(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        top = TopK(self.layer_scores.shape[0], min(k or self.k, self.k), self.layer_scores.shape[2])
        top.add(np.arange(self.layer_scores.shape[1]), self.layer_scores)
        return top.final()


def keeper(
    n_queries: int, n_train: int, n_layers: int, top_k: int | None, grouped: bool = False
) -> AllScores | TopK:
    """:class:`AllScores`, or :class:`TopK` when only each query's ``top_k`` are wanted
    (:class:`AllThenTopK` when layers arrive in groups, ``grouped``)."""
    if top_k is None:
        return AllScores(n_queries, n_train, n_layers)
    if grouped:
        return AllThenTopK(n_queries, top_k, n_layers, n_train)
    return TopK(n_queries, top_k, n_layers)
