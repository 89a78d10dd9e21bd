"""Running under ``torchrun``: which share of the work is this process's, and how the shares
are put back together.

The kit never starts a process group itself from Python code: call
``torch.distributed.init_process_group`` (or run the ``influencekit`` CLI under
``torchrun``, which does it: :func:`init_from_env`) and every entry point notices. Work is
split by *position*: batches, store blocks or examples ``i`` with ``i % world == rank``, so
each process sees the same batches a single process would (equal per-example results) and
sums are all-reduced. With one process every helper is a no-op.

Example:
    >>> rank_and_world()
    (0, 1)
    >>> list(my_share(range(5)))
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes shared files and prints."""
    return rank_and_world()[0] == 0


def my_share(items: Iterable) -> Iterator:
    """The items at positions ``rank, rank + world, ...`` (all of them in one process)."""
    rank, world = rank_and_world()
    for position, item in enumerate(items):
        if position % world == rank:
            yield item


def share_count(n: int) -> int:
    """How many of ``n`` positions :func:`my_share` gives this process."""
    rank, world = rank_and_world()
    return len(range(rank, n, world))


def barrier() -> None:
    if active():
        dist.barrier()


def _device_for_collectives(tensor: torch.Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo works on CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place; returns it."""
    if not active():
        return tensor
    where = _device_for_collectives(tensor)
    if tensor.device == where:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(where)
    dist.all_reduce(moved)
    tensor.copy_(moved)
    return tensor


def all_sum_numpy(array: np.ndarray) -> np.ndarray:
    """Sum a float64 or int64 numpy array over every process, in place; returns it."""
    if active():
        all_sum(torch.from_numpy(array))  # shares memory with ``array``
    return array


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every process gets rank ``src``'s ``tensor`` (same shape and dtype everywhere)."""
    if not active():
        return tensor
    where = _device_for_collectives(tensor)
    moved = tensor.to(where) if tensor.device != where else tensor
    dist.broadcast(moved, src)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def gather_rows(array: np.ndarray, axis: int = 1) -> np.ndarray:
    """Concatenate every process's ``array`` along ``axis`` in rank order (lengths along
    ``axis`` may differ; the other dimensions must agree)."""
    if not active():
        return array
    world = dist.get_world_size()
    array = np.ascontiguousarray(np.moveaxis(array, axis, 0))
    length = torch.tensor([array.shape[0]], dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length.to(_device_for_collectives(length)))
    longest = int(max(int(x) for x in lengths))
    padded = np.zeros((longest, *array.shape[1:]), dtype=array.dtype)
    padded[: array.shape[0]] = array
    mine = torch.from_numpy(padded).to(_device_for_collectives(length))
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    pieces = [e.cpu().numpy()[: int(n)] for e, n in zip(every, lengths, strict=True)]
    return np.moveaxis(np.concatenate(pieces, axis=0), 0, axis)


def init_from_env(device: str | None = None) -> str | None:
    """Start the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    once: NCCL with ``device = cuda:<LOCAL_RANK>`` where CUDA is available (unless
    ``device`` is given), gloo on CPU otherwise. Returns the device to use.

    Example:
        >>> init_from_env() is None   # not under torchrun: nothing to do
        True
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        device = f"cuda:{local}" if device in (None, "cuda") else device
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device
