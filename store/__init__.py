"""``influencekit.store``: the HDF5 gradient store (compressed per-layer training gradients).

Training gradients are computed once, compressed per layer by a codec (``dense``,
``kron:K``, ``lowrank:R``, ``eig:K``) and kept on disk; every later batch of queries is
scored from the store in one streaming pass. :meth:`GradientStore.build` and
:meth:`GradientStore.open` are the ways in. See docs/store-format.md.

Inside, each module uses only those before it: ``layout`` (the files) ← ``codecs`` ←
``writing`` (lock, open-or-create, pending, commit) ← ``shards`` ← ``build`` ← ``reader``
(:class:`GradientStore`) ← ``scoring`` (contracting preconditioned queries with a store).

Example:
    >>> import influencekit as ik
    >>> store = ik.GradientStore.build("run/g.h5", model, train)  # doctest: +SKIP
    >>> result = ik.score(model, factors, queries, store)  # doctest: +SKIP
"""

from .codecs import CodecSpec, parse_codec
from .reader import GradientStore

__all__ = ["CodecSpec", "GradientStore", "parse_codec"]
