"""Tests of store/reader.py: ``GradientStore`` reading a store back.

What is checked, against float64 references computed independently of the store code:

1. ``gram``: with ``dense``, the Gram of the per-sequence weight gradients from
   ``torch.autograd`` (sum of token losses, bias as the last input column), summed over
   layers, to 1e-9; a float32 store of the same model to float32 rounding. ``lowrank:R``
   with ``R >=`` every sequence's token count equals the dense Gram; a small ``R`` equals
   the Gram of its explicit reconstructions ``uᵀ v`` (and differs from dense). ``kron`` and
   ``eig``: the inner products of the stored ``c`` arrays, read with plain h5py.
2. Every Gram is exactly symmetric, positive semi-definite, and the sum of its per-layer
   Grams; repeated and unsorted indices pick rows and columns of the full Gram.
3. ``rows``: requested order, repeats, chosen layers only; IndexError for bad indices or
   layers; a damaged chunk, or a part missing one array, raises FileFormatError naming the
   part file (from ``rows``, ``gram`` and scoring alike).
4. ``blocks``: rows 0..N-1 once, in order, bounded by the block size; tiny blocks give the
   same scores. ``token_ids`` reads just the asked rows.
5. ``dataset()`` and ``tokenizer()`` give back the training set and tokenizer.

Elsewhere: the codecs themselves in test_codecs.py; scoring from a store in
test_store_scoring.py; damaged, truncated and foreign store files in test_store_faults.py.
"""

from __future__ import annotations

import pathlib
import shutil

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.store.reader import GradientStore
from influencekit.tiny import TINY_CORPUS

from helpers import store_worlds
from helpers.store_worlds import (
    QUERIES,
    SHORT_MAX_LENGTH,
    SHORT_TEXTS,
    autograd_weight_grads,
    top_order,
)
from helpers.tiny_models import make_model

F64 = torch.float64
CHUNK = 3  # 10 examples -> 4 parts (3, 3, 3, 1)


class World:
    """A float64 tiny GPT-2, ten short sequences (5..12 tokens), its factors and stores."""

    def __init__(self, folder: pathlib.Path, tokenizer) -> None:
        self.folder = folder
        self.train = ik.TextDataset.from_texts(SHORT_TEXTS, tokenizer, SHORT_MAX_LENGTH)
        self.model = make_model("gpt2", len(tokenizer), dtype=F64)
        self.factors = ik.fit_factors(
            self.model, self.train, "mlp", dtype=F64, batch_size=4, progress=False
        )
        self._stores: dict[tuple[str, str], ik.GradientStore] = {}

    def store(self, codec: str, dtype: str = "float64") -> ik.GradientStore:
        key = (codec, dtype)
        if key not in self._stores:
            path = self.folder / f"{codec.replace(':', '')}-{dtype}.h5"
            self._stores[key] = ik.GradientStore.build(
                path, self.model, self.train, codec=codec, dtype=dtype, factors=self.factors,
                part_size=CHUNK, batch_size=3, progress=False,
            )  # fmt: skip
        return self._stores[key]

    def max_tokens(self) -> int:
        return max(len(ex.input_ids) for ex in self.train)


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    w = World(tmp_path_factory.mktemp("gram"), tokenizer)
    assert w.max_tokens() == SHORT_MAX_LENGTH
    return w


@pytest.fixture(scope="module")
def exact_gram(world):
    """Σ_layers ⟨G_a, G_b⟩ from autograd per-sequence gradients, float64, (n, n)."""
    names = world.store("dense").modules
    flat = []
    for ex in world.train:
        grads = autograd_weight_grads(world.model, names, ex.input_ids)
        flat.append(torch.cat([grads[name].flatten() for name in names]))
    x = torch.stack(flat).numpy()
    return x @ x.T


def read_all(store: ik.GradientStore) -> list[dict[str, np.ndarray]]:
    """Every layer's stored arrays, rows 0..N-1, read from the part files with plain h5py."""
    pieces: list[dict[str, list]] = [{} for _ in store.modules]
    for path in store.part_paths():
        with h5py.File(path, "r") as f:
            for j, layer in enumerate(pieces):
                for name, dset in f[f"layers/{j:04d}"].items():
                    layer.setdefault(name, []).append(dset[()])
    return [{name: np.concatenate(v) for name, v in layer.items()} for layer in pieces]


def flat_gram(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x @ x.T


def assert_rel(actual, expected, rtol, what=""):
    """``|actual - expected| <= rtol × max|expected|`` elementwise."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    atol = rtol * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=what)


def check_gram_properties(store: ik.GradientStore) -> np.ndarray:
    """Symmetric, PSD, the sum of per-layer Grams; repeats index the full Gram."""
    n = len(store)
    full = store.gram(list(range(n)))
    assert full.shape == (n, n) and full.dtype == np.float64
    np.testing.assert_array_equal(full, full.T)
    eig = np.linalg.eigvalsh(full)
    assert eig.min() >= -1e-9 * eig.max(), (store.codec, eig)
    per_layer = sum(store.gram(list(range(n)), positions=[j]) for j in range(len(store.modules)))
    assert_rel(per_layer, full, 1e-12, what=f"{store.codec}: layer sum")
    asked = [7, 2, 7, 0, 9]  # unsorted, repeated, across parts
    sub = store.gram(asked)  # a smaller matmul than the full one: equal up to rounding
    assert_rel(sub, full[np.ix_(asked, asked)], 1e-12, what=f"{store.codec}: repeats")
    assert sub[0, 0] == sub[0, 2] == sub[2, 2]  # a repeat is a copy of its row and column
    assert store.gram([]).shape == (0, 0)
    return full


# ---------------------------------------------------------------------------------------------
# 1-2. gram against independent references


def test_dense_gram_equals_autograd(world, exact_gram):
    store = world.store("dense")
    assert len(store.part_paths()) == 4
    full = check_gram_properties(store)
    assert_rel(full, exact_gram, 1e-9, what="dense float64")
    # The comparison is not vacuous: the gradients are far from orthogonal or parallel.
    norms = np.sqrt(np.diag(exact_gram))
    cosine = exact_gram / np.outer(norms, norms)
    off = cosine[~np.eye(len(cosine), dtype=bool)]
    assert np.abs(off).max() > 0.1 and off.min() < 0.99
    # A float32 store: float32 rounding of the stored gradients only.
    assert_rel(world.store("dense", "float32").gram(list(range(len(store)))), exact_gram, 1e-5,
               what="dense float32")  # fmt: skip


def test_lowrank_gram(world, exact_gram):
    exact = world.store(f"lowrank:{world.max_tokens()}")
    assert_rel(check_gram_properties(exact), exact_gram, 1e-9, what="lowrank, R >= tokens")

    small = world.store("lowrank:3")
    full = check_gram_properties(small)
    n = len(small)
    reconstructed = []
    for j, arrays in enumerate(small.rows(list(range(n)))):
        u, v = arrays["u"].astype(np.float64), arrays["v"].astype(np.float64)
        assert u.shape == (n, 3, small.codecs[j].shape[0])
        reconstructed.append((u.transpose(0, 2, 1) @ v).reshape(n, -1))  # explicit d_out × d_in
    assert_rel(full, flat_gram(np.concatenate(reconstructed, axis=1)), 1e-10, what="lowrank:3")
    err = np.abs(full - exact_gram).max() / np.abs(exact_gram).max()
    assert err > 1e-4, f"lowrank:3 is an approximation here, relative error {err:.1e}"


@pytest.mark.parametrize("codec", ["kron:8", "eig:8"])
def test_projection_gram_equals_stored_c(world, exact_gram, codec):
    store = world.store(codec)
    full = check_gram_properties(store)
    stored = read_all(store)
    assert all(list(layer) == ["c"] for layer in stored)
    expected = flat_gram(
        np.concatenate([layer["c"].reshape(len(store), -1) for layer in stored], 1)
    )
    assert_rel(full, expected, 1e-12, what=codec)
    for j, layer in enumerate(stored):
        assert_rel(store.gram(list(range(len(store))), positions=[j]), flat_gram(layer["c"]), 1e-12,
                   what=f"{codec} layer {j}")  # fmt: skip
    assert np.abs(full - exact_gram).max() > 1e-4 * np.abs(exact_gram).max()  # compressed


# ---------------------------------------------------------------------------------------------
# 3. rows, and damaged parts


@pytest.mark.parametrize("codec", ["dense", "lowrank:3"])
def test_rows_order_repeats_and_layers(world, codec):
    store = world.store(codec)
    everything = read_all(store)
    n = len(store)
    asked = [n - 1, 0, 5, 3, 3, 1, 5]  # unsorted, repeated, across parts
    for layers in (None, [2, 0], [1]):
        got = store.rows(asked, layers)
        positions = range(len(store.modules)) if layers is None else layers
        assert len(got) == len(positions)
        for arrays, j in zip(got, positions, strict=True):
            assert sorted(arrays) == sorted(everything[j])
            for name, value in arrays.items():
                assert value.dtype == store.dtype
                np.testing.assert_array_equal(value, everything[j][name][asked])
    empty = store.rows([], [0])
    assert [v.shape[0] for v in empty[0].values()] == [0] * len(empty[0])
    for bad in ([n], [-1], [0, n + 3]):
        with pytest.raises(IndexError):
            store.rows(bad)
        with pytest.raises(IndexError):
            store.gram(bad)
    for bad_layers in ([len(store.modules)], [-1]):
        with pytest.raises(IndexError):
            store.rows([0], bad_layers)


def test_damaged_chunk_is_named(world, tmp_path):
    source = world.store("dense").path
    path = tmp_path / source.name
    shutil.copy(source, path)
    shutil.copytree(source.with_name(source.name + ".d"), path.with_name(path.name + ".d"))
    store = ik.GradientStore.open(path)
    part = store.part_paths()[1]  # examples 3, 4, 5
    with h5py.File(part, "r") as f:
        chunk = f["layers/0001/g"].id.get_chunk_info(0)
    data = bytearray(part.read_bytes())
    start = chunk.byte_offset + chunk.size // 2
    for i in range(4):
        data[start + i] ^= 0xA5  # not a 0x0000 <-> 0xFFFF swap, which Fletcher-32 misses
    part.write_bytes(bytes(data))
    store.rows([0, 9])  # other parts read fine
    store.rows([4], positions=[0])  # and so does an intact layer of the damaged part
    for call in (lambda: store.rows([9, 4]), lambda: store.gram([4, 0])):
        with pytest.raises(ik.FileFormatError) as info:
            call()
        assert str(part) in str(info.value) and "/layers/0001" in str(info.value)


def test_a_part_missing_one_array_is_named_by_every_reader(world, tmp_path):
    """Deleting only ``v`` of one layer (the group stays) must not surface as a KeyError from
    scoring: the streaming reader checks each layer's arrays against its codec too."""
    source = world.store("lowrank:3").path
    path = tmp_path / source.name
    shutil.copy(source, path)
    shutil.copytree(source.with_name(source.name + ".d"), path.with_name(path.name + ".d"))
    store = ik.GradientStore.open(path)
    part = store.part_paths()[1]
    with h5py.File(part, "r+") as f:
        del f["layers/0001/v"]
    queries = [("The chef tastes the", " soup.")]
    calls = (
        lambda: ik.score(world.model, world.factors, queries, store, progress=False),
        lambda: store.rows([4]),
        lambda: store.gram([4, 0]),
    )
    for call in calls:
        with pytest.raises(ik.FileFormatError) as info:
            call()
        assert str(part) in str(info.value) and "/layers/0001" in str(info.value)


# ---------------------------------------------------------------------------------------------
# 4-5. blocks, token_ids, dataset() and tokenizer(), on the stores of the w32 world


def test_blocks_cover_rows_once_in_order(w32, monkeypatch):
    store = w32.store("dense")
    n, per_example = len(store), store.gradient_bytes()
    expected_bytes = sum(
        int(np.prod(w32.factors.layers[m].shape)) for m in store.modules
    ) * 4  # fmt: skip
    assert per_example == expected_bytes
    everything = [arrays for _, arrays in store.blocks()]
    reference = [
        np.concatenate([arrays[j]["g"] for arrays in everything]) for j in range(len(store.modules))
    ]
    assert [len(r) for r in reference] == [n] * len(store.modules)
    # Blocks hold whole HDF5 chunks (a chunk is never read twice), so at least one chunk.
    chunk = max(h5py.File(p)["/"].attrs["chunk_rows"] for p in store.part_paths())
    for block_bytes in (1, per_example, 2 * per_example + 1, 3 * per_example, 10**9):
        rows_max = max(chunk, block_bytes // per_example)
        seen, pieces = [], [[] for _ in store.modules]
        for first, arrays in store.blocks(block_bytes=block_bytes):
            rows = {len(a["g"]) for a in arrays}
            assert len(rows) == 1, rows
            (count,) = rows
            assert 1 <= count <= rows_max
            assert count * per_example <= max(block_bytes, chunk * per_example)
            seen.extend(range(first, first + count))
            for j, a in enumerate(arrays):
                assert a["g"].shape[1:] == tuple(w32.factors.layers[store.modules[j]].shape)
                pieces[j].append(a["g"])
        assert seen == list(range(n)), (block_bytes, seen)
        for j, piece in enumerate(pieces):
            np.testing.assert_array_equal(np.concatenate(piece), reference[j])
    # A subset of layers, by position.
    for first, arrays in store.blocks([2, 0], block_bytes=per_example):
        assert len(arrays) == 2
        rows = len(arrays[0]["g"])
        np.testing.assert_array_equal(arrays[0]["g"], reference[2][first : first + rows])
        np.testing.assert_array_equal(arrays[1]["g"], reference[0][first : first + rows])

    # Scores streamed one chunk at a time equal the default blocks' scores.
    default = w32.score(store)
    calls = []

    def tiny_blocks(layers=None, **kw):
        calls.append(layers)
        return GradientStore.blocks(store, layers, block_bytes=1)

    monkeypatch.setattr(store, "blocks", tiny_blocks)
    tiny = w32.score(store, top_k=5)
    whole = w32.score(store)
    assert calls, "score did not stream through store.blocks"
    # float32 matmuls of 1 row round differently from those of 5: equal up to float32 rounding.
    # (the scores' tolerance: relative, plus absolute in units of the largest score)
    store_worlds.assert_rel(whole.layer_scores, default.layer_scores, 1e-5, what="block_bytes=1")
    for q in range(len(QUERIES)):
        order = top_order(default.scores[q], 5)
        np.testing.assert_array_equal(tiny.indices[q], order)


def test_token_ids_reads_just_the_asked_rows(w32):
    """refine reads its candidates' token ids row by row: they equal the full listing."""
    store = w32.store("dense")
    everything = store.examples().input_ids
    asked = [len(store) - 1, 0, 3, 3, 1]  # unsorted, repeated, across parts
    assert store.token_ids(asked) == [everything[i] for i in asked]
    assert store.token_ids([]) == []
    with pytest.raises(IndexError):
        store.token_ids([len(store)])


def test_store_dataset_and_tokenizer(w32, tokenizer, tmp_path):
    records = [
        {"text": TINY_CORPUS[i], "id": f"ex-{i}" if i % 2 else i, "theme": theme, "rank": r,
         "tags": [theme, "t"], "weight": 0.5 * r, "note": None}
        for r, (i, theme) in enumerate([(0, "cooking"), (13, "astronomy"), (21, "sailing"),
                                        (30, "music"), (12, "astronomy"), (5, "cooking")])
    ]  # fmt: skip
    records.append({"text": "Ünïcode ☃ sails — beyond the corpus, twice over " * 3, "id": "ü"})
    train = ik.TextDataset.from_records(records, tokenizer, max_length=24)
    assert any(len(ex.input_ids) == 24 for ex in train)  # one is truncated
    path = tmp_path / "grads.h5"
    built = ik.GradientStore.build(path, w32.model, train, part_size=3, batch_size=2,
                                   progress=False)  # fmt: skip
    for store in (built, ik.GradientStore.open(path)):
        assert len(store) == len(train) and store.ids == train.ids
        for ds in (store.dataset(), store.dataset(tokenizer)):
            assert len(ds) == len(train) and ds.max_length == train.max_length
            assert ds.ids == train.ids
            for mine, theirs in zip(ds, train, strict=True):
                assert mine.index == theirs.index
                assert mine.id == theirs.id and mine.text == theirs.text
                assert tuple(mine.input_ids) == tuple(theirs.input_ids)
                assert mine.metadata == theirs.metadata
        assert store.dataset()[2].metadata["theme"] == "sailing"
        rebuilt = store.tokenizer
        texts = [r["text"] for r in records] + ["", " leading space", "x\ny\tz", "🚢 ⛵"]
        for text in texts:
            assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]
            ids = tokenizer(text)["input_ids"]
            assert rebuilt.decode(ids) == tokenizer.decode(ids)
        assert rebuilt.eos_token_id == tokenizer.eos_token_id
        assert len(rebuilt) == len(tokenizer)
    # The dataset read back scores like the original one (on the fly).
    factors = ik.fit_factors(w32.model, train, "mlp", batch_size=4, progress=False)
    a = w32.score(train, factors=factors)
    b = w32.score(built.dataset(), factors=factors)
    np.testing.assert_array_equal(a.layer_scores, b.layer_scores)
    assert b.train_ids == a.train_ids
