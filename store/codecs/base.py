"""The codec contract: what every way of keeping a layer's training gradients declares.

A codec keeps each training gradient ``G_z`` ``(d_out, d_in)`` of one layer as a few fixed-
shape arrays per example, and says how a preconditioned query meets them. Each codec is one
subclass of :class:`Codec` and one line in the registry (``CODECS`` in
:mod:`influencekit.store.codecs`); ``tests/test_codec_contract.py`` runs every registered
codec through the same checks (exact at its exact size, unbiased where random, the bytes on
disk equal to the bytes it reports, ``decode`` against ``gram``, stored files read back).

What a codec declares:

- class attributes: ``kind`` (its name in ``kind:size`` specs), ``sized`` (whether it takes
  a size), ``needs_factors`` (encoding needs fitted factors: an eigenbasis), ``keeps_whole``
  (its arrays are the whole gradient, maybe approximated, not a projection: ``decode``
  gives them back), ``unbiased`` (a random codec whose estimate is exact in expectation);
- :meth:`arrays` and :meth:`own_dtypes`: the arrays stored per example and the dtype of
  those that do not take the store's;
- :meth:`query_needs`: the form queries must come in (:class:`~influencekit.forms.QueryNeeds`);
- the four operations: :meth:`encode` (tokens to arrays), :meth:`compress_query` (a query in
  its form to what meets the arrays), :meth:`contract` (scores), :meth:`gram` (inner products
  of stored gradients); :meth:`decode` where ``keeps_whole``;
- construction: :meth:`create` (a new store's codec, drawing its random parts from the seed
  or reading its basis from the factors), :meth:`restore` (as a store recorded it),
  :meth:`attach` (give a restored codec what it needs to encode again), and
  :meth:`bytes_for` / :meth:`exact_size` (its cost and exactness without building one).

Example:
    >>> from influencekit.store.codecs import CODECS, parse_codec
    >>> codec = CODECS["dense"].create(parse_codec("dense"), (3, 5))
    >>> codec.arrays(), codec.example_bytes("float32")
    ({'g': (3, 5)}, 60)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from influencekit.forms import QueryNeeds
from influencekit.lowrank import QueryForm

Tensor = torch.Tensor
CHECKSUM_BYTES = 4  # HDF5's fletcher32: 4 bytes per chunk of every array


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec string: ``kind`` and its size (``K`` or ``R``; 0 for ``dense``)."""

    kind: str
    size: int = 0

    def __str__(self) -> str:
        return self.kind if self.size == 0 else f"{self.kind}:{self.size}"


class Codec(ABC):
    """One layer's way of keeping training gradients (see the module docstring).

    ``shape``: the gradient's ``(d_out, d_in)``; ``params``: JSON-able parameters recorded
    in the store's manifest per layer; ``tensors``: arrays recorded there (projections, a
    test matrix, an eigen-window), read back, never redrawn.
    """

    kind: ClassVar[str]
    sized: ClassVar[bool] = True
    needs_factors: ClassVar[bool] = False
    keeps_whole: ClassVar[bool] = False
    unbiased: ClassVar[bool] = False

    def __init__(
        self, spec: CodecSpec, shape: tuple[int, int], params: dict, tensors: dict[str, Tensor]
    ) -> None:
        self.spec = spec
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = dict(params)
        self.tensors = dict(tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec}, shape={self.shape})"

    # -- what is stored ----------------------------------------------------------------------

    @abstractmethod
    def arrays(self) -> dict[str, tuple[int, ...]]:
        """Array name -> its shape per example."""

    def own_dtypes(self) -> dict[str, np.dtype]:
        """The arrays kept in a dtype of their own whatever the store's (integer positions,
        8-bit values); the others take the store's float dtype."""
        return {}

    def array_dtypes(self, dtype) -> dict[str, np.dtype]:
        """The on-disk dtype of each array in a store of float ``dtype``."""
        own = self.own_dtypes()
        return {name: np.dtype(own.get(name, dtype)) for name in self.arrays()}

    def example_bytes(self, dtype) -> int:
        """Bytes one example takes in these arrays (float ``dtype``; own dtypes their own),
        checksums not included."""
        kinds = self.array_dtypes(dtype)
        return sum(
            int(np.prod(shape)) * kinds[name].itemsize for name, shape in self.arrays().items()
        )

    def encode_bytes(self, batch: int, length: int, item: int) -> int:
        """Bytes encoding one batch of ``batch`` sequences of ``length`` tokens holds (what
        :meth:`attach` gave included), ``item`` bytes per number: by default the batch's
        captured tokens twice over."""
        return 2 * batch * length * sum(self.shape) * item

    @property
    def eigenbasis(self) -> str | None:
        """The fingerprint of the curvature eigenbasis gradients are kept in (queries must
        come in the same one); None for codecs in the weights' own basis."""
        return None

    # -- queries and the four operations ------------------------------------------------------

    def query_needs(self, n_queries: int) -> QueryNeeds:
        """The form ``n_queries`` preconditioned queries must come in: dense in the weights'
        basis unless a codec says otherwise."""
        return QueryNeeds()

    @abstractmethod
    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        """A batch's arrays from its tokens: ``a`` ``(B, T, d_in)``, ``s`` ``(B, T, d_out)``
        (padding zeroed); each array ``(B, *shape)``."""

    @abstractmethod
    def compress_query(self, p: QueryForm) -> QueryForm:
        """A query in the form :meth:`query_needs` asked for, as it meets the arrays."""

    @abstractmethod
    def contract(self, query: QueryForm, stored: dict[str, Tensor]) -> Tensor:
        """``⟨P_q, G_z⟩`` (or its estimate from what is kept) for every query and stored
        example: ``(Q, B)``."""

    @abstractmethod
    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨G_a, G_b⟩`` (or its estimate) between two batches of stored examples,
        ``(Ba, Bb)``, without forming ``d_out × d_in`` matrices where it can."""

    def decode(self, stored: dict[str, Tensor]) -> QueryForm:
        """The kept gradients as matrices ``(B, d_out, d_in)`` (or their factors), in the
        basis they are kept in: only codecs that keep whole gradients have one."""
        raise NotImplementedError(f"{self.kind} keeps projections, not whole gradients")

    # -- construction ----------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def create(
        cls, spec: CodecSpec, shape: tuple[int, int], *, seed: int = 0, layer_index: int = 0,
        factors=None, damping: float | None = None,
    ) -> Codec:  # fmt: skip
        """A new store's codec for one layer: random parts drawn from ``seed`` and
        ``layer_index``; ``factors`` (the layer's :class:`~influencekit.LayerFactors`) and
        ``damping`` where :attr:`needs_factors`."""

    @classmethod
    @abstractmethod
    def restore(
        cls, spec: CodecSpec, shape: tuple[int, int], params: dict, tensors: dict[str, Tensor]
    ) -> Codec:
        """The codec a store recorded (reads, scores, decodes; encodes too unless it
        :attr:`needs_factors`, then :meth:`attach` first)."""

    def check_factors(self, factors=None) -> None:
        """Refuse factors other than the ones the store was built with, where the codec
        depends on them (raises :class:`~influencekit.MismatchError` saying what differs)."""
        return None  # most codecs do not depend on them

    def attach(self, factors=None) -> None:
        """Give a restored codec what encoding needs beyond what the store records (the
        layer's factors, checked to be the ones the store was built with)."""
        return None  # most codecs encode from what the store records alone

    def detach(self) -> None:
        """Drop what :meth:`attach` gave (the codec still reads and scores)."""
        return None

    @classmethod
    @abstractmethod
    def bytes_for(cls, size: int, shape: tuple[int, int], dtype: str) -> int:
        """Bytes per example of ``kind:size`` on a layer of ``shape`` in a ``dtype`` store,
        one checksum per array included: what a byte budget counts."""

    @classmethod
    def exact_size(cls, shape: tuple[int, int], n_tokens: int) -> int | None:
        """The smallest size at which the codec keeps every gradient of ``n_tokens`` tokens
        exactly (up to the store's rounding), or None if no size does."""
        return None


def checksums(codec_arrays: dict) -> int:
    """The checksum bytes of one example's arrays (one per array, an upper bound: HDF5
    keeps one per chunk of many examples)."""
    return CHECKSUM_BYTES * len(codec_arrays)
