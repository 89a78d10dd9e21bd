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


class EliasFano:
    """``k`` increasing positions among ``n`` as Elias–Fano codes, one fixed-size row per
    example: ``h`` (the high parts in unary) and ``l`` (the low bits; absent when none)."""

    name = "elias-fano"

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = int(n), int(k)
        # at most 24 low bits: a field then lies within the 4 bytes it starts in
        self.low = min(24, max(0, math.floor(math.log2(self.n / self.k)))) if self.k else 0
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
        found = positions.detach().cpu().numpy().astype(np.int64, copy=False)
        rows = found.shape[0]
        width = self.arrays()["h"][0] * 8
        bits = np.zeros(rows * width, dtype=np.uint8)
        marks = (found >> self.low) + np.arange(self.k)  # the unary marks of the high parts
        bits[(marks + (np.arange(rows) * width)[:, None]).ravel()] = 1
        out = {"h": np.packbits(bits.reshape(rows, width), axis=1, bitorder="little")}
        if self.low:
            low = found & ((1 << self.low) - 1)
            out["l"] = _packed_fields(low, self.low, self.arrays()["l"][0])
        return {key: torch.from_numpy(value).to(positions.device) for key, value in out.items()}

    def unpack(self, stored: dict[str, Tensor]) -> Tensor:
        """The positions ``(B, k)`` (int64) from the byte rows ``h`` and ``l`` (decoded on
        the host: a scan of the unary bits for their ones, and the low bits by arithmetic)."""
        h = _host_bytes(stored["h"])
        rows = h.shape[0]
        bits = np.unpackbits(h, axis=1, bitorder="little")
        ones = np.flatnonzero(bits).reshape(rows, self.k)  # each row holds exactly k ones
        high = ones - (np.arange(rows) * bits.shape[1])[:, None] - np.arange(self.k)
        if self.low:
            high = (high << self.low) | _low_bits(_host_bytes(stored["l"]), self.k, self.low)
        return torch.from_numpy(high).to(stored["h"].device)


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


def _host_bytes(data: Tensor) -> np.ndarray:
    """Stored bytes as a host uint8 array (no copy for host tensors already uint8)."""
    return data.detach().cpu().numpy().astype(np.uint8, copy=False)


def _packed_fields(fields: np.ndarray, bits: int, n_bytes: int) -> np.ndarray:
    """Fields ``(B, k)`` of ``bits`` bits each as ``n_bytes`` little-endian bytes per row:
    by shifts where a byte holds whole fields (1, 2, 4 or 8 bits), else bit by bit."""
    rows, k = fields.shape
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = np.zeros((rows, n_bytes * per_byte), dtype=np.uint8)
        padded[:, :k] = fields
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        return (padded.reshape(rows, n_bytes, per_byte) << shifts).sum(-1, dtype=np.uint8)
    flat = np.zeros((rows, n_bytes * 8), dtype=np.uint8)
    flat[:, : k * bits] = ((fields[..., None] >> np.arange(bits)) & 1).reshape(rows, -1)
    return np.packbits(flat, axis=1, bitorder="little")


def _low_bits(data: np.ndarray, k: int, bits: int) -> np.ndarray:
    """``k`` fields of ``bits`` (at most 24) bits each from little-endian bytes ``(B, m)``:
    by shifts where a byte holds whole fields (1, 2, 4 or 8 bits), else each field read from
    the four bytes it starts in."""
    rows = data.shape[0]
    if 8 % bits == 0:
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        fields = (data[:, :, None] >> shifts) & ((1 << bits) - 1)
        return fields.reshape(rows, -1)[:, :k].astype(np.int64)
    start = np.arange(k, dtype=np.int64) * bits  # each field's first bit
    padded = np.zeros((rows, data.shape[1] + 4), dtype=np.int64)
    padded[:, : data.shape[1]] = data
    first = start >> 3
    word = padded[:, first] | padded[:, first + 1] << 8 | padded[:, first + 2] << 16
    word |= padded[:, first + 3] << 24
    return (word >> (start & 7)) & ((1 << bits) - 1)
