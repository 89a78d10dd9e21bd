"""Scoring against a store: already-preconditioned queries contracted with stored gradients.

The caller (:func:`influencekit.score`) preconditions each query gradient ``P_q`` (in full
dimension, or as rank-r factors); here each layer's codec compresses it exactly as the
stored gradients were compressed, and every block of the store is contracted with it in one
streaming pass. Memory holds one block of the store at a time; the scores go to the caller
block by block. No curvature is computed here: the store knows nothing of EK-FAC.

Example:
    >>> queries = compressed_queries(store, names, forms)                  # doctest: +SKIP
    >>> for indices, block in stored_scores(store, names, queries, device=cpu):  # doctest: +SKIP
    ...     block.shape                                    # (queries, len(indices), layers)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from influencekit import distributed
from influencekit.lowrank import QueryForm
from influencekit.progress import progress_counter

from .codecs import stored_tensor


def compressed_queries(store, names: list[str], forms: list[QueryForm]) -> list[QueryForm]:
    """Each layer's preconditioned queries ``forms[j]`` compressed by the codec of layer
    ``names[j]`` exactly as the stored gradients were: what :func:`stored_scores` takes."""
    codecs = [store.codecs[store.modules.index(name)] for name in names]
    return [codec.compress_query(p) for codec, p in zip(codecs, forms, strict=True)]


def stored_scores(
    store,
    names: list[str],
    queries: list[QueryForm],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(training indices (B,), per-layer scores (Q, B, L))`` for every block of ``store``.

    ``names``: the layers to score (in this order), each held by the store; ``queries[j]``:
    layer ``names[j]``'s queries from :func:`compressed_queries`. Under ``torchrun`` each
    process reads every ``world``-th block: the caller combines the processes' scores.
    """
    positions = [store.modules.index(name) for name in names]
    codecs = [store.codecs[p] for p in positions]
    rank, world = distributed.rank_and_world()
    with progress_counter(len(store), desc="scoring store", enabled=progress and rank == 0) as bar:
        for first, arrays in store.blocks(positions, every=(rank, world)):
            parts = []
            for codec, query, stored in zip(codecs, queries, arrays, strict=True):
                tensors = {k: to_device(v, device, dtype) for k, v in stored.items()}
                parts.append(codec.contract(query, tensors))
            block = torch.stack(parts, -1).double().cpu().numpy()  # one copy per block
            yield np.arange(first, first + block.shape[1]), block
            bar.update(block.shape[1] * world)  # rank 0's pace stands for every process's


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A block read from HDF5 onto ``device``; to a GPU through page-locked memory, so the
    copy runs asynchronously."""
    tensor = stored_tensor(array, dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device=device, non_blocking=True)
    return tensor.to(device=device)
