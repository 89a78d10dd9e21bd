"""``influencekit.store``: the HDF5 gradient store (compressed per-layer training gradients).

Training gradients are computed once, compressed per layer by a codec (``dense``,
``kron:K``, ``lowrank:R``, ``eig:K``) and kept on disk; every later batch of queries is
scored from the store in one streaming pass. See docs/store-format.md.

Example:
    >>> import influencekit as ik
    >>> store = ik.GradientStore.build("run/g.h5", model, train)  # doctest: +SKIP
    >>> result = ik.score(model, factors, queries, store)  # doctest: +SKIP
"""

from .build import build_store
from .codecs import CodecSpec, parse_codec
from .reader import GradientStore

__all__ = ["CodecSpec", "GradientStore", "build_store", "parse_codec"]
