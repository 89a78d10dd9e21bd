"""Elias–Fano positions (store/codecs/positions.py): every width of low bits a layer can
take, several rows at once, against the positions themselves and a bit string written out
by hand from the definition."""

import numpy as np
import pytest
import torch

from influencekit.store.codecs.positions import EliasFano


def increasing(rng, n: int, k: int, rows: int) -> np.ndarray:
    """``rows`` sorted sets of ``k`` distinct positions among ``n``, the last one ``n - 1``."""
    return np.array(
        [sorted([*rng.choice(n - 1, size=k - 1, replace=False).tolist(), n - 1])
         for _ in range(rows)]
    )  # fmt: skip


@pytest.mark.parametrize("low", range(0, 25))
def test_round_trip_at_every_low_width(low):
    k = 7
    n = k * 2**low + 3  # floor(log2(n / k)) == low
    code = EliasFano(n, k)
    assert code.low == low
    positions = torch.from_numpy(increasing(np.random.default_rng(low), n, k, rows=5))
    packed = code.pack(positions)
    assert {key: tuple(v.shape) for key, v in packed.items()} == {
        key: (5, *shape) for key, shape in code.arrays().items()
    }
    assert all(v.dtype == torch.uint8 for v in packed.values())
    assert torch.equal(code.unpack(packed), positions)


def test_low_bits_capped_at_24():
    code = EliasFano(2**40, 2)
    assert code.low == 24
    positions = torch.tensor([[5, 2**40 - 1], [2**39, 2**39 + 1]])
    assert torch.equal(code.unpack(code.pack(positions)), positions)


def test_bits_as_the_definition_writes_them():
    # n = 40, k = 4: low = floor(log2(10)) = 3 bits each, high parts in unary over
    # k + ((n - 1) >> 3) + 1 = 9 bits
    code = EliasFano(40, 4)
    positions = [2, 9, 30, 39]
    high = np.zeros(16, dtype=np.uint8)
    for i, p in enumerate(positions):
        high[(p >> 3) + i] = 1  # the i-th one sits after (p >> 3) zeros
    low = np.zeros(16, dtype=np.uint8)
    for i, p in enumerate(positions):
        for b in range(3):
            low[3 * i + b] = (p >> b) & 1  # little-endian within and across bytes
    packed = code.pack(torch.tensor([positions]))
    assert packed["h"][0].tolist() == np.packbits(high, bitorder="little").tolist()
    assert packed["l"][0].tolist() == np.packbits(low, bitorder="little").tolist()
