"""Codecs: how each training gradient ``G_z`` of one layer is kept, and how queries meet it.

Every codec is a :class:`~influencekit.store.codecs.base.Codec` (the contract, with what
each member means) registered below, one line each:

- ``dense``: ``G_z`` itself; exact (:mod:`.dense`);
- ``kron:K``, ``eig:K``: ``P_out G_z P_inᵀ`` for random or leading-eigenvector projections
  (:mod:`.projection`);
- ``lowrank:R``, ``lowrank8:R``: rank-``R`` factors of ``G_z``, in the store's dtype or in
  8 bits (:mod:`.lowrank`);
- ``sparse:K``, ``sparse8:K``: the ``K`` entries of ``G_z`` in a window of the curvature
  eigenbasis whose whitened energy is largest, values in the store's dtype or in 8 bits
  (:mod:`.sparse`, positions in :mod:`.positions`).

A store may keep each layer with its own codec: its ``codec`` string is then one spec per
layer, comma-separated (:func:`layer_specs`).

Example:
    >>> codec = make_codec(parse_codec("kron:8"), (3, 5), seed=0, layer_index=0)
    >>> codec.arrays(), sorted(CODECS)
    ({'c': (3, 5)}, ['dense', 'eig', 'kron', 'lowrank', 'lowrank8', 'sparse', 'sparse8'])
"""

from __future__ import annotations

import numpy as np
import torch

from influencekit.errors import ParameterError

from .base import CHECKSUM_BYTES, Codec, CodecSpec
from .dense import DenseCodec
from .lowrank import LowRank8Codec, LowRankCodec
from .positions import LAYOUTS, EliasFano, PagedPositions, sparse_layout
from .projection import EigCodec, KronCodec, orthogonal_rows, projection_seed
from .sparse import STANDARD_BASIS, Sparse8Codec, SparseCodec, choose_window, largest

# The registry: a codec's kind -> its class. A new codec is one class and one entry here.
CODECS: dict[str, type[Codec]] = {
    codec.kind: codec
    for codec in (
        DenseCodec,
        KronCodec,
        LowRankCodec,
        LowRank8Codec,
        EigCodec,
        SparseCodec,
        Sparse8Codec,
    )
}
KINDS = tuple(CODECS)


def parse_codec(text: str) -> CodecSpec:
    """Parse one codec spec (``dense``, ``kron:K``, ``lowrank:R``, ``eig:K``, ``sparse:K``,
    ``sparse8:K``), with a clear error otherwise.

    Example:
        >>> parse_codec("lowrank:8")
        CodecSpec(kind='lowrank', size=8)
    """
    forms = ", ".join(kind if not cls.sized else f"{kind}:K" for kind, cls in CODECS.items())
    allowed = f"one of {forms} (K an integer >= 1), e.g. sparse8:4096"
    if not isinstance(text, str):
        raise ParameterError("codec", text, allowed)
    kind, colon, size = text.strip().partition(":")
    found = CODECS.get(kind)
    if found is not None and not found.sized and not colon:
        return CodecSpec(kind)
    if found is not None and found.sized and size.isdigit() and int(size) >= 1:
        return CodecSpec(kind, int(size))
    raise ParameterError("codec", text, allowed)


def layer_specs(codec: str, n_layers: int) -> list[CodecSpec]:
    """The spec of each of ``n_layers`` layers from a store's ``codec`` string: one spec
    for every layer, or one per layer, comma-separated.

    Example:
        >>> [str(s) for s in layer_specs("sparse8:40,lowrank:2", 2)]
        ['sparse8:40', 'lowrank:2']
    """
    parts = codec.split(",")
    if len(parts) == 1:
        return [parse_codec(parts[0])] * n_layers
    if len(parts) != n_layers:
        raise ParameterError(
            "codec", codec, f"one spec, or one per layer ({n_layers}), comma-separated"
        )
    return [parse_codec(part) for part in parts]


def joined_specs(specs: list[CodecSpec]) -> str:
    """The ``codec`` string of a store with these per-layer specs (one when all agree).

    Example:
        >>> joined_specs([CodecSpec("dense")] * 2)
        'dense'
        >>> joined_specs([CodecSpec("kron", 2), CodecSpec("dense")])
        'kron:2,dense'
    """
    texts = [str(spec) for spec in specs]
    return texts[0] if len(set(texts)) == 1 else ",".join(texts)


def codec_class(spec: CodecSpec) -> type[Codec]:
    return CODECS[spec.kind]


def make_codec(
    spec: CodecSpec,
    shape: tuple[int, int],
    *,
    seed: int = 0,
    layer_index: int = 0,
    factors=None,
    damping: float | None = None,
) -> Codec:
    """A new store's codec of one layer with gradient ``shape`` ``(d_out, d_in)``
    (:meth:`Codec.create`): ``factors``, the layer's
    :class:`~influencekit.factors.LayerFactors`, for the codecs that keep gradients in
    its eigenbasis."""
    if CODECS[spec.kind].needs_factors and factors is None:
        raise ParameterError("factors", None, f"fitted ekfac or kfac factors for codec {spec}")
    return CODECS[spec.kind].create(
        spec, shape, seed=seed, layer_index=layer_index, factors=factors, damping=damping
    )


def restore_codec(
    spec: CodecSpec, shape: tuple[int, int], tensors: dict, params: dict | None = None
) -> Codec:
    """A layer codec as a store recorded it (projections read back, never redrawn)."""
    return CODECS[spec.kind].restore(spec, tuple(shape), params or {}, tensors)


def recorded_codecs(codec: str, shapes, tensors, params=None) -> list[Codec]:
    """The codecs a store recorded: its ``codec`` string, per-layer shapes, codec arrays and
    parameters."""
    specs = layer_specs(codec, len(shapes))
    params = params or [None] * len(shapes)
    return [
        restore_codec(spec, shape, arrays, layer_params)
        for spec, shape, arrays, layer_params in zip(specs, shapes, tensors, params, strict=True)
    ]


def stored_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A stored array as codecs compute with it (on the CPU): floats in ``dtype``, integers
    as they are, uint16 positions widened to int32 (which torch indexes with).

    Example:
        >>> stored_tensor(np.arange(3, dtype=np.uint16), torch.float32).dtype
        torch.int32
    """
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    tensor = torch.from_numpy(array)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


__all__ = [
    "CHECKSUM_BYTES",
    "CODECS",
    "KINDS",
    "LAYOUTS",
    "STANDARD_BASIS",
    "Codec",
    "CodecSpec",
    "DenseCodec",
    "EigCodec",
    "EliasFano",
    "KronCodec",
    "LowRank8Codec",
    "LowRankCodec",
    "PagedPositions",
    "Sparse8Codec",
    "SparseCodec",
    "choose_window",
    "codec_class",
    "joined_specs",
    "largest",
    "layer_specs",
    "make_codec",
    "orthogonal_rows",
    "parse_codec",
    "projection_seed",
    "recorded_codecs",
    "restore_codec",
    "sparse_layout",
    "stored_tensor",
]
