"""Values in 8 bits: float8 e4m3 (3 mantissa bits) times one float32 scale per row.

Each row is scaled so that its largest magnitude maps to e4m3's largest finite value, 448,
then rounded to the nearest e4m3 number (ties to even): a relative error of at most 2⁻⁴ per
value, and none in the scale, which float32 keeps exactly on disk. ``sparse8`` keeps its
values so (a row: one example's entries), ``lowrank8`` its factors (a row: one rank-1 term).

Example:
    >>> import torch
    >>> coded, scale = to_e4m3(torch.tensor([[1.0, -2.0, 0.5]]))
    >>> from_e4m3(coded, scale, torch.float32).tolist()
    [[1.0, -2.0, 0.5]]
"""

from __future__ import annotations

import torch

FLOAT8_MAX = 448.0  # the largest float8 e4m3 value: each row's largest maps to it
SCALE_BYTES = 4  # one float32 scale per row
# Every e4m3 bit pattern's value (float32 holds each exactly): on the CPU a lookup in this
# table decodes several times faster than torch's float8 conversion.
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(..., n)`` as e4m3 bit patterns (uint8) and a scale ``(..., 1)`` per row (in
    ``x``'s dtype, a float32 value); an all-zero row gets scale 1."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / FLOAT8_MAX).float().to(x.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).to(torch.float8_e4m3fn).view(torch.uint8), scale


def from_e4m3(coded: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The values of e4m3 bit patterns ``coded`` in ``dtype``, times ``scale`` (per row) when
    given."""
    coded = coded.to(torch.uint8)
    if coded.device.type == "cpu":
        values = torch.from_numpy(E4M3_VALUES[coded.numpy()]).to(dtype)
    else:
        values = coded.view(torch.float8_e4m3fn).to(dtype)
    return values if scale is None else values * scale.to(dtype)
