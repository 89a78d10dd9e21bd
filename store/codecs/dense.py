"""``dense``: the exact gradient ``G_z`` ``(d_out, d_in)`` per example.

Example:
    >>> import torch
    >>> from influencekit.store.codecs import CodecSpec
    >>> codec = DenseCodec.create(CodecSpec("dense"), (2, 3))
    >>> a, s = torch.randn(1, 4, 3), torch.randn(1, 4, 2)
    >>> torch.allclose(codec.encode(a, s)["g"][0], s[0].T @ a[0])
    True
"""

from __future__ import annotations

import numpy as np
import torch

from influencekit.lowrank import QueryForm, as_dense

from .base import Codec, CodecSpec, checksums

Tensor = torch.Tensor


class DenseCodec(Codec):
    """The exact gradient ``G_z`` per example."""

    kind = "dense"
    sized = False
    keeps_whole = True

    def arrays(self) -> dict[str, tuple[int, ...]]:
        return {"g": self.shape}

    def encode_bytes(self, batch: int, length: int, item: int) -> int:
        return (
            super().encode_bytes(batch, length, item) + batch * self.shape[0] * self.shape[1] * item
        )

    def encode(self, a: Tensor, s: Tensor) -> dict[str, Tensor]:
        return {"g": torch.einsum("bto,bti->boi", s, a)}

    def compress_query(self, p: QueryForm) -> Tensor:
        return as_dense(p)

    def contract(self, query: Tensor, stored: dict[str, Tensor]) -> Tensor:
        # One (Q, O·I) × (O·I, B) matmul: much faster than the equivalent einsum on CPU.
        return query.flatten(1) @ stored["g"].flatten(1).T

    def gram(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """``⟨G_a, G_b⟩`` for every pair of stored examples, ``(Ba, Bb)``; exact."""
        return a["g"].flatten(1) @ b["g"].flatten(1).T

    def decode(self, stored: dict[str, Tensor]) -> Tensor:
        """The stored gradients as ``(B, d_out, d_in)`` matrices, in the standard basis."""
        return stored["g"]

    @classmethod
    def create(cls, spec, shape, *, seed=0, layer_index=0, factors=None, damping=None):
        return cls(spec, shape, {}, {})

    @classmethod
    def restore(cls, spec, shape, params, tensors):
        return cls(spec, shape, params, tensors)

    @classmethod
    def bytes_for(cls, size: int, shape: tuple[int, int], dtype: str) -> int:
        return shape[0] * shape[1] * np.dtype(dtype).itemsize + checksums({"g": 0})

    @classmethod
    def exact_size(cls, shape, n_tokens):
        return 0


__all__ = ["CodecSpec", "DenseCodec"]
