"""Tests of how a store is chosen and what it knows of itself: store/budget.py (a byte
budget per sequence picks the codec and its size), store/fidelity.py (the codec's scores
against exact ones, measured at build, recorded, reloaded and printed), and the manifest's
format version (a store written before the fidelity record opens and scores the same).

1. Budgets: parsing, the choice (dense when it fits, sparse with factors, lowrank without),
   a refused budget below anything useful, and the bytes of the built store measured from
   its files never above the budget.
2. Fidelity: exact codecs measure 1; a lossy codec's record equals the Pearson correlation
   of ``ik.score`` on the store against on-the-fly scores over the same probe (an
   independent path: the scorer, not the probe's own contraction); ``fidelity=False``;
   given queries; ``influencekit info`` prints it.
3. Format: a version-1 manifest (no fidelity record) opens and scores identically; a newer
   version is refused naming the file.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import influencekit as ik
from influencekit.cli import main as cli_main
from influencekit.store.budget import choose_codec, default_budget, parse_bytes
from influencekit.store.fidelity import PROBE_SEQUENCES, QUERY_TOKENS, Fidelity

from helpers.store_worlds import QUERIES, assert_rel

# ---------------------------------------------------------------------------------------------
# 1. Budgets


@pytest.mark.parametrize(
    ("text", "expected"),
    [(4096, 4096), ("128KiB", 131072), ("660 KB", 660_000), ("1.5MiB", 1_572_864), ("7", 7)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", [0, -5, "lots", "12 parsecs", "", True, 3.5, None])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ik.ParameterError, match="budget"):
        parse_bytes(bad)


def test_choose_codec_fits_the_budget():
    shapes = [(2048, 513), (512, 2049)] * 4  # a wide model's MLP layers
    spec, dtype = choose_codec(None, "128KiB", None, shapes, sparse=True)
    assert spec.kind == "sparse8"
    # per layer: K values (1 byte), K offsets (2 bytes), a scale and 17 page counts (4 bytes
    # each), and a 4-byte checksum for each of the 4 arrays
    assert 8 * (spec.size * 3 + 4 + 17 * 4 + 16) <= 131072
    assert 8 * ((spec.size + 1) * 3 + 4 + 17 * 4 + 16) > 131072
    spec, dtype = choose_codec(None, "128KiB", "float16", shapes, sparse=True)
    assert (spec.kind, dtype) == ("sparse", "float16")  # values in the dtype asked for
    assert 8 * (spec.size * 4 + 17 * 4 + 12) <= 131072 < 8 * ((spec.size + 1) * 4 + 17 * 4 + 12)
    spec, dtype = choose_codec(None, "128KiB", None, shapes, sparse=False)
    assert spec.kind == "lowrank" and 8 * (spec.size * 2561 * 2 + 8) <= 131072
    assert 8 * ((spec.size + 1) * 2561 * 2 + 8) > 131072
    # the default budget: lowrank:8 in float32; float32 halves the entries of float16
    assert default_budget(shapes) == 8 * (8 * 2561 * 4 + 8)  # and two checksums per layer
    k8 = choose_codec(None, None, None, shapes, sparse=True)[0].size
    k16 = choose_codec(None, None, "float16", shapes, sparse=True)[0].size
    k32 = choose_codec(None, None, "float32", shapes, sparse=True)[0].size
    # one-byte offsets at these sizes: 2 bytes per entry (8-bit), 3 (float16), 5 (float32)
    assert 1.45 * k16 < k8 < 1.5 * k16 and 0.55 * k16 < k32 < 0.6 * k16
    # a budget that holds the exact gradient gets it
    small = [(16, 65), (64, 17)]
    exact = 16 * 65 * 2 + 64 * 17 * 2 + 2 * 4  # float16 values, a checksum per layer
    assert str(choose_codec(None, exact, None, small, sparse=True)[0]) == "dense"
    assert str(choose_codec(None, exact - 1, None, small, sparse=True)[0]) != "dense"
    # a forced codec wins, and a budget beside it is refused
    assert choose_codec("kron:8", None, None, shapes, sparse=True) == (
        ik.store.parse_codec("kron:8"),
        "float32",
    )
    with pytest.raises(ik.ParameterError, match="budget"):
        choose_codec("kron:8", "1MiB", None, shapes, sparse=True)


def test_too_small_budget_is_refused_before_anything_is_written(w32, tmp_path):
    path = tmp_path / "tiny.h5"
    with pytest.raises(ik.ParameterError, match=r"budget must be at least \d+ bytes") as info:
        ik.GradientStore.build(path, w32.model, w32.train, factors=w32.factors, budget=100)
    assert "sparse8:64" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("with_factors", [True, False])
def test_built_store_respects_its_budget_on_disk(w32, tmp_path, with_factors):
    """Bytes of gradient data per sequence, measured from the part files' datasets (HDF5
    storage, checksums included), stay within the budget."""
    budget = 3000
    factors = w32.factors if with_factors else None
    store = ik.GradientStore.build(tmp_path / "b.h5", w32.model, w32.train, factors=factors,
                                   budget=budget, progress=False)  # fmt: skip
    assert store.codec.startswith("sparse8:" if with_factors else "lowrank:")
    assert store.bytes_per_example() <= budget
    on_disk = 0
    for part in store.part_paths():
        with h5py.File(part, "r") as f:
            for group in f["layers"].values():
                on_disk += sum(group[key].id.get_storage_size() for key in group)
    assert on_disk / len(store) <= budget, on_disk / len(store)
    assert on_disk / len(store) >= 0.9 * store.bytes_per_example()  # the arrays are all there


def test_a_store_is_continued_with_its_own_codec(w32, tmp_path):
    """Without codec or budget, continuing a store keeps the codec and dtype it was built
    with (whatever the default would choose now); an explicit other codec is refused."""
    path = tmp_path / "c.h5"
    options = {"factors": w32.factors, "progress": False}
    ik.GradientStore.build(path, w32.model, w32.train[:6], codec="lowrank:3", **options)
    store = ik.GradientStore.build(path, w32.model, w32.train, **options)
    assert (store.codec, store.config.dtype, len(store)) == ("lowrank:3", "float32", 12)
    with pytest.raises(ik.MismatchError, match="codec"):
        ik.GradientStore.build(path, w32.model, w32.train, codec="lowrank:4", **options)


# ---------------------------------------------------------------------------------------------
# 2. Fidelity


def test_exact_codec_fidelity_is_one(w32):
    fidelity = w32.store("dense").fidelity
    assert isinstance(fidelity, Fidelity)
    assert fidelity.pearson_min == pytest.approx(1, abs=1e-6)
    assert fidelity.top_overlap == 1
    assert fidelity.preconditioner == "ekfac factors" and fidelity.dtype == "float32"
    # twelve sequences: a quarter are the probe queries, the rest the probe sequences
    assert (fidelity.n_queries, fidelity.n_sequences) == (3, 9)
    assert f"last {QUERY_TOKENS} tokens" in fidelity.queries


def test_fidelity_equals_the_scorers_correlation(w32):
    """With the three test queries as probe: the record equals the Pearson correlation of
    ``ik.score`` on the store against on-the-fly scores (every sequence is in the probe)."""
    assert len(w32.train) <= PROBE_SEQUENCES
    store = w32.store("lowrank:1", fidelity_queries=QUERIES, seed=5)
    fidelity = store.fidelity
    assert fidelity.queries == "given queries" and fidelity.n_queries == len(QUERIES)
    assert fidelity.n_sequences == len(w32.train) and fidelity.seed == 5
    stored = w32.score(store, query_rank="full").scores
    pearsons = [np.corrcoef(e, s)[0, 1] for e, s in zip(w32.exact.scores, stored, strict=True)]
    assert 0 < min(pearsons) < 0.999  # lossy, and not useless
    assert fidelity.pearson_min == pytest.approx(min(pearsons), abs=1e-5)
    assert fidelity.pearson_mean == pytest.approx(np.mean(pearsons), abs=1e-5)
    reopened = ik.GradientStore.open(store.path).fidelity
    assert reopened == fidelity


def test_no_fidelity_when_asked(w32, tmp_path):
    store = ik.GradientStore.build(tmp_path / "n.h5", w32.model, w32.train, codec="kron:4",
                                   fidelity=False, progress=False)  # fmt: skip
    assert store.fidelity is None
    with pytest.raises(ik.ParameterError, match="fidelity"):
        ik.GradientStore.build(tmp_path / "m.h5", w32.model, w32.train, fidelity="yes")


def test_info_prints_the_fidelity(w32, capsys):
    store = w32.store("lowrank:2")
    assert cli_main(["info", str(store.path)]) in (0, None)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("fidelity:"))
    assert f"Pearson {store.fidelity.pearson_min:.3f} (min)" in line
    assert "probe queries" in line


# ---------------------------------------------------------------------------------------------
# 3. Format versions


def test_version_one_store_opens_and_scores_the_same(w32, tmp_path):
    store = ik.GradientStore.build(tmp_path / "v.h5", w32.model, w32.train, codec="lowrank:3",
                                   progress=False)  # fmt: skip
    before = w32.score(store).layer_scores
    with h5py.File(store.path, "r+") as f:  # as the kit wrote manifests before the record
        assert int(f.attrs["version"]) == 2
        f.attrs["version"] = 1
        del f.attrs["fidelity"]
    old = ik.GradientStore.open(store.path)
    assert old.fidelity is None
    assert_rel(w32.score(old).layer_scores, before, 0, what="version 1")
    with h5py.File(store.path, "r+") as f:
        f.attrs["version"] = 3
    with pytest.raises(ik.FileFormatError, match=r"v\.h5: format version 3 is newer"):
        ik.GradientStore.open(store.path)
