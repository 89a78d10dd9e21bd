"""How a sparse codec writes the positions of the ``K`` entries it keeps among ``n``.

Two layouts, each a small class with the same four members (``arrays``, ``own_dtypes``,
``pack``, ``unpack``):

- :class:`EliasFano` (what new stores write): the increasing positions split into
  ``low = floor(log2(n / K))`` low bits, written as they are, and high parts written in
  unary in a bit vector of ``K + (n - 1) >> low + 1`` bits (Elias 1974, Fano 1971):
  about ``2 + log2(n / K)`` bits per position, whatever the ``n``. ``h`` and ``l`` are
  bytes (bits little-endian).
- :class:`PagedPositions` (stores written before): an offset within its page per position
  (pages of 256 with one-byte offsets, or of 65,536 with two-byte ones) and a count per page.
  It costs ``n / page`` counts whatever ``K``, which a wide layer cannot afford.

Example:
    >>> import torch
    >>> code = EliasFano(1000, 4)
    >>> packed = code.pack(torch.tensor([[3, 17, 500, 999]]))
    >>> code.unpack(packed).tolist(), code.bytes()
    ([[3, 17, 500, 999]], 6)
"""

from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor
# paged positions: an offset within a page, and a count per page. Pages of 256 entries take
# one byte per offset and two per count; pages of 65,536 two and four.
LAYOUTS = {2**8: (np.uint8, np.uint16), 2**16: (np.uint16, np.int32)}
BITS = torch.arange(8, dtype=torch.uint8)


class EliasFano:
    """``k`` increasing positions among ``n`` as Elias–Fano codes, one fixed-size row per
    example: ``h`` (the high parts in unary) and ``l`` (the low bits; absent when none)."""

    name = "elias-fano"

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = int(n), int(k)
        self.low = max(0, math.floor(math.log2(self.n / self.k))) if self.k else 0
        self.high_bits = self.k + ((self.n - 1) >> self.low) + 1

    def arrays(self) -> dict[str, tuple[int, ...]]:
        found = {"h": (-(-self.high_bits // 8),)}
        if self.low:
            found["l"] = (-(-self.k * self.low // 8),)
        return found

    def own_dtypes(self) -> dict[str, np.dtype]:
        return {name: np.dtype(np.uint8) for name in self.arrays()}

    def bytes(self) -> int:
        return sum(shape[0] for shape in self.arrays().values())

    def pack(self, positions: Tensor) -> dict[str, Tensor]:
        """Increasing positions ``(B, k)`` (int) as the byte rows ``h`` and ``l``."""
        positions = positions.long()
        rows, device = positions.shape[0], positions.device
        ones = (positions >> self.low) + torch.arange(self.k, device=device)  # unary marks
        bits = torch.zeros(rows, self.arrays()["h"][0] * 8, dtype=torch.uint8, device=device)
        bits.scatter_(1, ones, 1)
        out = {"h": _pack_bits(bits)}
        if self.low:
            low = positions & ((1 << self.low) - 1)
            shifts = torch.arange(self.low, device=device)
            low_bits = ((low[..., None] >> shifts) & 1).to(torch.uint8).flatten(1)
            width = self.arrays()["l"][0] * 8
            out["l"] = _pack_bits(torch.nn.functional.pad(low_bits, (0, width - low_bits.shape[1])))
        return out

    def unpack(self, stored: dict[str, Tensor]) -> Tensor:
        """The positions ``(B, k)`` (int64) from the byte rows ``h`` and ``l``."""
        h = stored["h"]
        rows, device = h.shape[0], h.device
        marks = _unpack_bits(h).nonzero()[:, 1].view(rows, self.k)  # each row has k ones
        high = marks - torch.arange(self.k, device=device)
        if not self.low:
            return high
        low_bits = _unpack_bits(stored["l"])[:, : self.k * self.low].view(rows, self.k, self.low)
        shifts = torch.arange(self.low, device=device)
        low = (low_bits.long() << shifts).sum(-1)
        return (high << self.low) | low


class PagedPositions:
    """``k`` increasing positions among ``n`` as offsets ``i`` within pages of ``page``
    entries and counts ``n`` per page (the layout stores written before Elias–Fano)."""

    name = "pages"

    def __init__(self, n: int, k: int, page: int | None = None) -> None:
        self.n, self.k = int(n), int(k)
        self.page = sparse_layout(self.k, self.n) if page is None else int(page)

    @property
    def pages(self) -> int:
        return -(-self.n // self.page)

    def arrays(self) -> dict[str, tuple[int, ...]]:
        return {"i": (self.k,), "n": (self.pages,)}

    def own_dtypes(self) -> dict[str, np.dtype]:
        offsets, counts = LAYOUTS[self.page]
        return {"i": np.dtype(offsets), "n": np.dtype(counts)}

    def bytes(self) -> int:
        dtypes = self.own_dtypes()
        return self.k * dtypes["i"].itemsize + self.pages * dtypes["n"].itemsize

    def pack(self, positions: Tensor) -> dict[str, Tensor]:
        """Increasing positions ``(B, k)`` as page offsets ``i`` and page counts ``n``."""
        pages = torch.div(positions, self.page, rounding_mode="floor")
        counts = torch.zeros(positions.shape[0], self.pages, dtype=torch.int64, device=pages.device)
        counts.scatter_add_(1, pages, torch.ones_like(pages))
        return {"i": (positions - pages * self.page).to(torch.int32), "n": counts.to(torch.int32)}

    def unpack(self, stored: dict[str, Tensor]) -> Tensor:
        """The positions ``(B, k)`` of stored page offsets and counts, in int32 (or int64
        where stored so)."""
        offsets, counts = stored["i"], stored["n"]
        dtype = torch.promote_types(offsets.dtype, torch.int32)
        # Each row's counts sum to k: one repeat over all rows lays out every entry's page.
        starts = torch.arange(counts.shape[1], dtype=dtype, device=counts.device) * self.page
        page = torch.repeat_interleave(
            starts.repeat(counts.shape[0]), counts.flatten(), output_size=offsets.numel()
        )
        return page.view_as(offsets) + offsets


def sparse_layout(entries: int, size: int) -> int:
    """The page size (a key of ``LAYOUTS``) that stores ``entries`` positions among ``size``
    in the fewest bytes: offsets of one byte pay once a layer keeps more than about 1/129
    of its entries.

    Example:
        >>> sparse_layout(4096, 2048 * 513), sparse_layout(27290, 2048 * 513)
        (65536, 256)
    """

    def cost(page: int) -> int:
        offset, count = (np.dtype(d).itemsize for d in LAYOUTS[page])
        return entries * offset + -(-size // page) * count

    return min(LAYOUTS, key=lambda page: (cost(page), -page))


def _pack_bits(bits: Tensor) -> Tensor:
    """0/1 bytes ``(B, 8m)`` as ``(B, m)`` bytes, the first bit of each eight the lowest."""
    weights = (1 << BITS.to(bits.device)).to(torch.uint8)
    return (bits.view(bits.shape[0], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(data: Tensor) -> Tensor:
    """``(B, m)`` bytes as their bits ``(B, 8m)``, the lowest of each byte first."""
    data = data.to(torch.uint8)
    return ((data[..., None] >> BITS.to(data.device)) & 1).flatten(1)
