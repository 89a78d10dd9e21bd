"""Choosing a store's codecs: a byte budget per sequence, split over the layers, each layer
taking the candidate codec that keeps its scores best on the build's probe.

The budget is what a sequence may take **on disk**: its gradients, and what every part keeps
of it besides (token ids, id, text, metadata, checksums, HDF5's own records), which
:func:`example_overhead` estimates from the training data. What is left for gradients is
split over the layers equally, a layer never taking more than its exact form costs (the rest
goes to the others). Each layer's share is then spent on every candidate (:func:`candidates`):

- ``sparse8:K`` (with an explicit ``dtype``: ``sparse:K``, values in it), the entries of
  the gradient in a window of the curvature eigenbasis that scores depend on most, when the
  layer has fitted factors with an eigenbasis; in the standard basis otherwise;
- ``lowrank8:R`` (8-bit factors: at the same bytes twice the rank of float16 ones, and
  more faithful on every layer measured), or with an explicit ``dtype`` ``lowrank:R`` in it;
- ``dense`` or an exact ``lowrank`` when one fits: exact, so taken at once.

The probe (:class:`~influencekit.store.fidelity.Probe`) scores every candidate on each layer
alone, against the layer's exact scores, and each layer keeps the one with the highest mean
Pearson (:func:`choose`). The choice is recorded with the store's fidelity.

Without ``codec`` or ``budget``, each layer's share is what ``lowrank:8`` in float32 takes,
``32·(d_out + d_in)`` bytes, at most ``LAYER_CAP``: about 60 KiB per block of a Llama-3.2-1B
(48 MLP layers, 0.94 MiB per sequence), and the former default on narrow models.

Example:
    >>> shares(100, [10**6, 30, 10**6])
    [35, 30, 35]
    >>> parse_bytes("128KiB")
    131072
"""

from __future__ import annotations

import json

import numpy as np

from influencekit.errors import ParameterError
from influencekit.memory import parse_bytes as _parse_bytes

from .codecs import (
    CODECS,
    CodecSpec,
    LowRankCodec,
    make_codec,
    parse_codec,
)
from .codecs.base import CHECKSUM_BYTES
from .layout import tokenizer_files

DEFAULT_RANK = 8  # the default share: lowrank:8 in float32, ...
LAYER_CAP = 20 * 2**10  # ... at most this many bytes per layer
BUDGET_DTYPE = "float16"  # values of a budget-chosen store, unless dtype= says otherwise
MIN_ENTRIES = 64  # a sparse layer keeps at least this many entries
PART_RECORD_BYTES = 1500  # HDF5's records of one dataset of a part (header, chunk index)
TEXT_RECORD_BYTES = 48  # a variable-length string's heap record beyond its bytes (3 per example)
MANIFEST_BYTES = 64 * 2**10  # a manifest's attributes and HDF5 records, about


def parse_bytes(value) -> int:
    """``131072``, ``"128KiB"``, ``"660 KB"``, ``"1.5MiB"`` -> bytes (an int >= 1).

    Example:
        >>> parse_bytes("128KiB"), parse_bytes(660_000)
        (131072, 660000)
    """
    return _parse_bytes(value, "budget")


def default_budget(shapes: list[tuple[int, int]]) -> int:
    """Gradient bytes per sequence of the default: per layer what ``lowrank:8`` takes in
    float32 (its checksums included), at most ``LAYER_CAP``."""
    return sum(
        min(LowRankCodec.bytes_for(DEFAULT_RANK, shape, "float32"), LAYER_CAP) for shape in shapes
    )


def example_overhead(
    train, shapes: list[tuple[int, int]], per_part: int, shares: list[int] | None = None
) -> int:
    """Bytes a store keeps per example besides its gradients, an upper estimate from
    ``train``: token ids (int32, compressed at most to nothing), the token count, the id,
    text and metadata strings (JSON, as a part writes them) with their heap records, HDF5's
    records of every dataset of a part shared over ``per_part`` examples, and the manifest
    (the tokenizer's files and each layer's codec arrays: a window's indices, or the test
    matrix of the largest rank its gradient ``shares`` allow) shared over ``train``'s
    examples."""
    n = max(1, len(train))
    n_layers = len(shapes)
    tokenizer = sum(len(content) for content in tokenizer_files(train.tokenizer).values())
    shares = shares or [LAYER_CAP] * n_layers
    codec_arrays = sum(
        4 * (d_out + d_in) + 8 * d_in * (share // (d_out + d_in) + 8)
        for (d_out, d_in), share in zip(shapes, shares, strict=True)
    )
    manifest = (tokenizer + codec_arrays + MANIFEST_BYTES) / n
    text = sum(
        len(ex.id.encode()) + len(ex.text.encode())
        + len(json.dumps(dict(ex.metadata), sort_keys=True).encode())
        for ex in train
    ) / n  # fmt: skip
    tokens = sum(4 * len(ex.input_ids) for ex in train) / n
    records = (4 * n_layers + 5) * PART_RECORD_BYTES / max(1, per_part)
    return int(np.ceil(text + 3 * TEXT_RECORD_BYTES + tokens + 4 + records + manifest))


def shares(total: int, caps: list[int]) -> list[int]:
    """``total`` bytes split over layers as equally as their ``caps`` allow (a capped layer
    takes its cap; what it leaves goes to the others).

    Example:
        >>> shares(90, [100, 10, 100])
        [40, 10, 40]
    """
    out = [0] * len(caps)
    left, open_ = total, sorted(range(len(caps)), key=lambda j: caps[j])
    while open_:
        even = left // len(open_)
        j = open_[0]
        if caps[j] <= even:
            out[j] = caps[j]
            left -= caps[j]
            open_.pop(0)
            continue
        for j in open_:
            out[j] = even
        break
    return out


def exact_bytes(shape: tuple[int, int], dtype: str, longest: int) -> int:
    """The most a layer's share can use: the bytes of its exact form (``dense``, or
    ``lowrank`` at the longest sequence's tokens, whichever is smaller).

    Example:
        >>> exact_bytes((100, 50), "float16", 4), exact_bytes((100, 50), "float16", 99)
        (1208, 10004)
    """
    dense = CODECS["dense"].bytes_for(0, shape, dtype)
    return min(dense, LowRankCodec.bytes_for(min(longest, *shape), shape, dtype))


def candidates(
    share: int,
    shape: tuple[int, int],
    *,
    dtype: str,
    explicit_dtype: bool,
    longest: int,
    seed: int,
    layer_index: int,
    factors=None,
) -> list:
    """The codecs one layer can take in ``share`` bytes per sequence, made for this build
    and detached (the probe attaches them): an exact one alone when one fits (``dense``, or
    ``lowrank:R`` with ``R`` at least the ``longest`` sequence's tokens), else ``sparse8:K``
    and ``lowrank8:R`` (with ``explicit_dtype``: ``sparse:K`` and ``lowrank:R``, values in
    it), each as large as fits. Empty when none fits (fewer than ``MIN_ENTRIES`` entries
    and not even rank 1)."""
    exact_rank = min(longest, *shape)
    if CODECS["dense"].bytes_for(0, shape, dtype) <= share:
        return [make_codec(CodecSpec("dense"), shape)]
    if LowRankCodec.bytes_for(exact_rank, shape, dtype) <= share:
        spec = CodecSpec("lowrank", exact_rank)
        return [make_codec(spec, shape, seed=seed, layer_index=layer_index)]
    found: list = []
    kind = "sparse" if explicit_dtype else "sparse8"
    sparse = _largest_sparse(kind, share, shape, dtype, factors, seed, layer_index)
    if sparse is not None:
        found.append(sparse)
    for kind in ("lowrank",) if explicit_dtype else ("lowrank8",):
        cls = CODECS[kind]
        rank = min(_largest(lambda r, c=cls: c.bytes_for(r, shape, dtype), share), exact_rank)
        if rank >= 1:
            spec = CodecSpec(kind, rank)
            found.append(make_codec(spec, shape, seed=seed, layer_index=layer_index))
    for codec in found:
        codec.detach()
    return found


def _largest_sparse(kind, share, shape, dtype, factors, seed, layer_index):
    """The largest ``kind:K`` that fits ``share`` in the window it then takes (the window
    depends on ``K``, its positions' bytes on the window: two rounds settle it)."""
    cls = CODECS[kind]
    fitted = factors if factors is not None else None
    window = shape
    codec = None
    for _ in range(3):
        k = min(
            _largest(lambda n, w=window: cls.bytes_for(n, w, dtype), share), shape[0] * shape[1]
        )
        if k < min(MIN_ENTRIES, shape[0] * shape[1]):
            return None
        codec = make_codec(
            CodecSpec(kind, k), shape, seed=seed, layer_index=layer_index, factors=fitted
        )
        if codec.window_shape == window:
            break
        window = codec.window_shape
    if cls.bytes_for(codec.entries, codec.window_shape, dtype) > share:
        return None
    return codec


def choose(scores: dict[str, tuple[np.ndarray, list[np.ndarray]]], codecs: dict[str, list]):
    """Each layer's codec: the candidate whose scores on the probe have the highest mean
    Pearson with the layer's exact ones (the first where none is defined). Returns ``({name:
    codec}, {name: record})``, the record saying what each candidate scored."""
    from .fidelity import pearson

    chosen, records = {}, {}
    for name, options in codecs.items():
        exact, approx = scores[name]
        means = []
        for found in approx:
            values = [pearson(e, a) for e, a in zip(exact, found, strict=True)]
            values = [v for v in values if v is not None]
            means.append(float(np.mean(values)) if values else None)
        best = max(range(len(options)), key=lambda j: -np.inf if means[j] is None else means[j])
        chosen[name] = options[best]
        records[name] = {
            "layer": name,
            "codec": str(options[best].spec),
            "candidates": {str(c.spec): m for c, m in zip(options, means, strict=True)},
        }
    return chosen, records


def fixed_spec(codec: str | None, budget, dtype: str | None):
    """``(spec, dtype)`` of a forced codec (``dtype`` default float32), after refusing a
    budget beside it."""
    if budget is not None:
        raise ParameterError("budget", budget, "None when codec= is given (it forces one)")
    return parse_codec(codec), dtype or "float32"


def least_bytes(shape: tuple[int, int], dtype: str) -> int:
    """The fewest bytes any candidate of a layer takes: rank 1, or ``MIN_ENTRIES`` entries
    (8-bit, positions among the whole layer), whichever is less."""
    rank_one = min(CODECS[kind].bytes_for(1, shape, dtype) for kind in ("lowrank", "lowrank8"))
    return min(rank_one, _min_sparse(shape), exact_bytes(shape, dtype, 1))


def too_small(budget, gradient_bytes: int, overhead: int, shapes) -> ParameterError:
    """The error for a budget that leaves some layer no codec at all."""
    need = sum(least_bytes(s, BUDGET_DTYPE) for s in shapes)
    return ParameterError(
        "budget",
        budget,
        f"at least {need + overhead} bytes per sequence: {len(shapes)} layers need "
        f"{need} for their gradients (rank 1, or {MIN_ENTRIES} entries each) and each "
        f"sequence keeps about {overhead} bytes besides; {gradient_bytes} were left",
    )


def _min_sparse(shape) -> int:
    return CODECS["sparse8"].bytes_for(MIN_ENTRIES, shape, BUDGET_DTYPE)


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


__all__ = ["CHECKSUM_BYTES", "default_budget", "parse_bytes", "shares"]
