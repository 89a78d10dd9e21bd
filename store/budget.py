"""Choosing a store's codec: from a byte budget per sequence, or the default.

The rule follows the fidelity-per-byte table of ``benchmarks/store.py --wide`` on a trained
model (docs/store-format.md): with fitted factors, ``sparse8:K`` (the entries of the
gradient in the curvature eigenbasis that scores depend on most, values in 8 bits) keeps
the ranking best at every budget measured; 8-bit values lose nothing measurable against
float32 there, and buy a third more entries than float16. Given an explicit ``dtype``,
``sparse:K`` with values in it. Without factors, ``lowrank:R``. A budget that holds the
exact gradient in the store's dtype gets ``dense``. ``K`` (or ``R``) is the largest that
fits: every layer takes ``min(K, d_out·d_in)`` entries, so small layers are kept whole and
the bytes they leave go to the large ones.

Without ``codec`` or ``budget`` the budget is what ``lowrank:8`` in float32 takes on the
tracked layers, ``32·Σ(d_out + d_in)`` bytes (and 8 per layer for checksums).

``sparse`` is chosen only up to ``SPARSE_MAX_ENTRIES`` tracked weights: scoring meets it
with every query dense in the eigenbasis, all layers at once (4 bytes per weight and
query: 8 queries of a 1B model's MLP layers would take 26 GB), and its encoding rotates
every token, about one more forward and backward in multiply-adds (docs/scaling.md).
Beyond that, ``lowrank:R``; ``codec="sparse:K"`` still forces it.

Example:
    >>> spec, dtype = choose_codec(None, 131072, None, [(2048, 513)] * 8, sparse=True)
    >>> str(spec), dtype
    ('sparse8:5432', 'float16')
    >>> str(choose_codec(None, "128KiB", None, [(2048, 513)] * 8, sparse=False)[0])
    'lowrank:3'
"""

from __future__ import annotations

import re

import numpy as np

from influencekit.errors import ParameterError

from .codecs import LAYOUTS, CodecSpec, parse_codec, sparse_layout

DEFAULT_RANK = 8  # the default budget: lowrank:8 in float32
MIN_ENTRIES = 64  # a sparse layer keeps at least this many entries (below: refused)
SPARSE_MAX_ENTRIES = 2**28  # tracked weights up to which a chosen codec may be sparse
BUDGET_DTYPE = "float16"  # values of a budget-chosen store, unless dtype= says otherwise
SCALE_BYTES = 4  # sparse8: one float32 scale per example and layer
CHECKSUM_BYTES = 4  # HDF5's fletcher32 per chunk of each array: at most this per example
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}
UNITS["gib"] = 2**30


def parse_bytes(value) -> int:
    """``131072``, ``"128KiB"``, ``"660 KB"``, ``"1.5MiB"`` -> bytes (an int >= 1).

    Example:
        >>> parse_bytes("128KiB"), parse_bytes(660_000)
        (131072, 660000)
    """
    allowed = "a number of bytes >= 1, as an int or a string such as '128KiB' or '660KB'"
    if isinstance(value, bool):
        raise ParameterError("budget", value, allowed)
    if isinstance(value, (int, np.integer)):
        if value < 1:
            raise ParameterError("budget", value, allowed)
        return int(value)
    if isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if found and found.group(2).lower() in UNITS:
            count = float(found.group(1)) * UNITS[found.group(2).lower()]
            if count >= 1:
                return int(count)
    raise ParameterError("budget", value, allowed)


def default_budget(shapes: list[tuple[int, int]]) -> int:
    """Bytes per sequence of ``lowrank:8`` in float32 on layers of these gradient shapes
    (with its two arrays' checksums, as every budget counts them)."""
    return _bytes(CodecSpec("lowrank", DEFAULT_RANK), shapes, "float32")


def choose_codec(
    codec: str | None,
    budget,
    dtype: str | None,
    shapes: list[tuple[int, int]],
    *,
    sparse: bool,
) -> tuple[CodecSpec, str]:
    """The codec and the store dtype of a build: ``codec`` when given (``dtype`` default
    float32), else the best that fits ``budget`` bytes per sequence (default
    :func:`default_budget`; ``dtype`` default float16). ``sparse``: whether factors are at
    hand for a ``sparse`` store (used up to ``SPARSE_MAX_ENTRIES`` tracked weights)."""
    if codec is not None:
        if budget is not None:
            raise ParameterError("budget", budget, "None when codec= is given (it forces one)")
        return parse_codec(codec), dtype or "float32"
    limit = default_budget(shapes) if budget is None else parse_bytes(budget)
    explicit = dtype is not None  # values in that dtype (sparse), else in 8 bits (sparse8)
    sparse = sparse and sum(d_out * d_in for d_out, d_in in shapes) <= SPARSE_MAX_ENTRIES
    dtype = dtype or BUDGET_DTYPE
    if _bytes(CodecSpec("dense"), shapes, dtype) <= limit:
        return CodecSpec("dense"), dtype
    kind = ("sparse" if explicit else "sparse8") if sparse else "lowrank"
    size = _largest(lambda n: _bytes(CodecSpec(kind, n), shapes, dtype), limit)
    minimum = MIN_ENTRIES if sparse else 1
    if size < minimum:
        need = _bytes(CodecSpec(kind, minimum), shapes, dtype)
        raise ParameterError(
            "budget",
            budget,
            f"at least {need} bytes per sequence for {len(shapes)} layers in {dtype} "
            f"({kind}:{minimum}); smaller stores lose the ranking",
        )
    return CodecSpec(kind, size), dtype


def _bytes(spec: CodecSpec, shapes: list[tuple[int, int]], dtype: str) -> int:
    """Bytes per sequence of ``sparse:K``, ``sparse8:K`` or ``lowrank:R`` on these layers
    (as the codecs' ``arrays`` say: K values (one byte each for sparse8, and a scale), K
    offsets and a count per page of positions in the layer's cheaper layout;
    R·(d_out + d_in) values; or ``dense``), with each array's checksum, so that the files
    never hold more."""
    value = 1 if spec.kind == "sparse8" else np.dtype(dtype).itemsize
    total = 0
    for d_out, d_in in shapes:
        if spec.kind == "dense":
            total += d_out * d_in * value + CHECKSUM_BYTES
        elif spec.kind in ("sparse", "sparse8"):
            entries = min(spec.size, d_out * d_in)
            page = sparse_layout(entries, d_out * d_in)
            offset, count = (np.dtype(d).itemsize for d in LAYOUTS[page])
            total += entries * (value + offset) + -(-d_out * d_in // page) * count
            total += 3 * CHECKSUM_BYTES
            total += SCALE_BYTES + CHECKSUM_BYTES if spec.kind == "sparse8" else 0
        else:
            total += min(spec.size, d_out, d_in) * (d_out + d_in) * value + 2 * CHECKSUM_BYTES
    return total


def _largest(cost, limit: int) -> int:
    """The largest size ``n >= 0`` with ``cost(n) <= limit`` (``cost`` non-decreasing)."""
    if cost(1) > limit:
        return 0
    lo, hi = 1, 2
    while cost(hi) <= limit and hi < 2**40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # cost(lo) fits, cost(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid)
    return lo
