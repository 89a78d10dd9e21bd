"""Scoring queries against a gradient store: one streaming pass, optional top-k and refine.

Each query gradient is preconditioned in full dimension (``P_q``, EK-FAC), optionally cut to
rank ``r`` (``query_rank``), then compressed by each layer's codec exactly as the stored
gradients were, and contracted with the stored arrays block by block. Memory holds one block
of the store plus the scores kept: all of them, or each query's running top-k (``top_k``).

``refine=K`` (in :mod:`influencekit.scoring`) then recomputes the exact gradients of each
query's top-K candidates from the token ids the store keeps and replaces their scores by
exact ones with the full ``P_q``: the compressed store finds the candidates, the exact pass
ranks them.

Example:
    >>> result = score(model, factors, queries, store, top_k=20, refine=50)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from . import distributed
from .models import TrackedLayer
from .progress import progress_counter


class TopK:
    """Each query's ``k`` highest scores seen so far, with their per-layer parts.

    Example:
        >>> keep = TopK(n_queries=1, k=2, n_layers=1)
        >>> keep.add(np.array([0, 1, 2]), np.array([[[1.0], [5.0], [3.0]]]))
        >>> keep.add(np.array([3]), np.array([[[4.0]]]))
        >>> keep.indices.tolist(), keep.layer_scores[..., 0].tolist()
        ([[1, 3]], [[5.0, 4.0]])
    """

    def __init__(self, n_queries: int, k: int, n_layers: int) -> None:
        self.k = k
        self.indices = np.zeros((n_queries, 0), dtype=np.int64)
        self.layer_scores = np.zeros((n_queries, 0, n_layers))

    def add(self, indices: np.ndarray, block: np.ndarray) -> None:
        """Merge a block ``(Q, B, L)`` of scores of the training ``indices`` ``(B,)``."""
        new = np.broadcast_to(indices, block.shape[:2])
        indices = np.concatenate([self.indices, new], axis=1)
        layer_scores = np.concatenate([self.layer_scores, block], axis=1)
        self._keep(indices, layer_scores)

    def _keep(self, indices: np.ndarray, layer_scores: np.ndarray) -> None:
        totals = layer_scores.sum(-1)
        # Highest score first; equal scores by lower index, so the result is deterministic.
        order = np.lexsort((indices, -totals), axis=-1)[:, : self.k]
        self.indices = np.take_along_axis(indices, order, 1)
        self.layer_scores = np.take_along_axis(layer_scores, order[..., None], 1)

    def resort(self) -> None:
        """Sort again after some scores were replaced (by refine)."""
        self._keep(self.indices, self.layer_scores)

    def gather(self) -> None:
        """Merge every process's top-k into the overall top-k (on every process)."""
        if distributed.active():
            self._keep(
                distributed.gather_rows(self.indices), distributed.gather_rows(self.layer_scores)
            )


def stream_store(
    store,
    layers: list[TrackedLayer],
    queries_by_layer: list,
    keep: TopK | np.ndarray,
    device: torch.device,
    compute: torch.dtype,
    progress: bool,
) -> None:
    """Contract every stored block with the compressed queries; feed ``(first, (Q, B, L))``.

    ``keep`` is a :class:`TopK` or a dense ``(Q, N, L)`` array (filled in place). Under
    ``torchrun`` each process reads every ``world``-th block, and the scores are then
    combined (summed, or the top-k merged), so every process ends with all of them.
    """
    positions = [store.modules.index(layer.name) for layer in layers]
    codecs = [store.codecs[p] for p in positions]
    rank, world = distributed.rank_and_world()
    with progress_counter(len(store), desc="scoring store", enabled=progress and rank == 0) as bar:
        for first, arrays in store.blocks(positions, every=(rank, world)):
            parts = []
            for codec, query, stored in zip(codecs, queries_by_layer, arrays, strict=True):
                tensors = {k: to_device(v, device, compute) for k, v in stored.items()}
                parts.append(codec.contract(query, tensors))
            block = torch.stack(parts, -1).double().cpu().numpy()  # one copy per block
            if isinstance(keep, TopK):
                keep.add(np.arange(first, first + block.shape[1]), block)
            else:
                keep[:, first : first + block.shape[1]] = block
            bar.update(block.shape[1] * world)  # rank 0's pace stands for every process's
    combine(keep)


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A block read from HDF5 onto ``device``; to a GPU through page-locked memory, so the
    copy runs asynchronously (the CUDA path is written but not run in this project's CI)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def combine(keep: TopK | np.ndarray) -> None:
    """Put the processes' shares of ``keep`` together (nothing to do in one process): the
    top-k lists are merged; a dense array, zero where another process scored, is summed."""
    if isinstance(keep, TopK):
        keep.gather()
    else:
        distributed.all_sum_numpy(keep)
