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
from influencekit.store.budget import (
    LAYER_CAP,
    candidates,
    default_budget,
    exact_bytes,
    parse_bytes,
    shares,
)
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


def test_shares_split_equally_within_caps():
    assert shares(90, [100, 10, 100]) == [40, 10, 40]
    assert shares(10**6, [5, 7]) == [5, 7]  # more than every layer can use
    assert 1000 - 4 < sum(shares(1000, [400, 999, 999, 50])) <= 1000  # whole bytes each


def test_default_budget_is_lowrank8_float32_at_most_the_layer_cap():
    wide, narrow = (2048, 513), (64, 17)
    assert default_budget([narrow]) == 8 * (64 + 17) * 4 + 8  # values and two checksums
    assert default_budget([wide, narrow]) == LAYER_CAP + 8 * (64 + 17) * 4 + 8
    # Llama-3.2-1B's MLP: 48 layers within about 1 MiB per sequence, 64 KiB per block
    assert default_budget([(8192, 2048), (8192, 2048), (2048, 8192)] * 16) <= 2**20
    assert 3 * LAYER_CAP < 64 * 2**10


@pytest.mark.parametrize("explicit", [False, True])
def test_candidates_fit_their_share(w32, explicit):
    """Every candidate takes at most the share (as budgets count bytes, checksums included):
    sparse (in the factors' eigenbasis) and lowrank, with 8-bit forms unless a dtype is
    given; an exact codec alone where one fits."""
    name = w32.factors.modules[0]
    shape = w32.factors.layers[name].shape
    share = 600
    found = candidates(
        share, shape, dtype="float16", explicit_dtype=explicit, longest=30, seed=0,
        layer_index=0, factors=w32.factors.layers[name],
    )  # fmt: skip
    kinds = [c.kind for c in found]
    assert kinds == (["sparse", "lowrank"] if explicit else ["sparse8", "lowrank8"])
    for codec in found:
        window = getattr(codec, "window_shape", shape)
        assert type(codec).bytes_for(codec.spec.size, window, "float16") <= share
        assert codec.example_bytes("float16") <= share
    assert found[0].eigenbasis == w32.factors.layers[name].basis_fingerprint()
    exact = exact_bytes(shape, "float16", 30)
    (alone,) = candidates(exact, shape, dtype="float16", explicit_dtype=explicit, longest=30,
                          seed=0, layer_index=0)  # fmt: skip
    assert alone.spec.kind in ("dense", "lowrank") and alone.exact_size(shape, 30) is not None
    assert candidates(10, shape, dtype="float16", explicit_dtype=explicit, longest=30, seed=0,
                      layer_index=0) == []  # fmt: skip


def test_the_choice_takes_each_layers_best_candidate(w32, tmp_path):
    """A budget-chosen store records, per layer, every candidate's mean Pearson on the probe
    and the codec with the highest; the store's codec string names them in layer order."""
    store = ik.GradientStore.build(tmp_path / "c.h5", w32.model, w32.train, factors=w32.factors,
                                   budget=25000, progress=False)  # fmt: skip
    choice = store.fidelity.choice
    assert [record["layer"] for record in choice] == store.modules
    for record, codec in zip(choice, store.layer_codecs, strict=True):
        scores = record["candidates"]
        assert record["codec"] == codec == max(scores, key=lambda c: scores[c])
    assert store.manifest.budget == 25000 and store.manifest.chosen_by == "budget"


def test_the_manifest_says_what_chose_the_codecs(w32, tmp_path):
    """Forced, chosen within a budget (above) or by default: a reader can tell them apart."""
    data = w32.train[:6]
    default = ik.GradientStore.build(tmp_path / "d.h5", w32.model, data, factors=w32.factors,
                                     progress=False)  # fmt: skip
    assert default.manifest.chosen_by == "default" and default.manifest.budget is None
    assert default.fidelity.choice is not None
    forced = ik.GradientStore.build(tmp_path / "f.h5", w32.model, data, codec="lowrank:2",
                                    progress=False)  # fmt: skip
    assert forced.manifest.chosen_by == "codec" and forced.manifest.budget is None
    assert forced.fidelity.choice is None
    more = ik.GradientStore.build(default.path, w32.model, w32.train, factors=w32.factors,
                                  progress=False)  # fmt: skip
    assert len(more) == len(w32.train) and more.manifest.chosen_by == "default"


def test_too_small_budget_is_refused_before_anything_is_written(w32, tmp_path):
    path = tmp_path / "tiny.h5"
    with pytest.raises(ik.ParameterError, match=r"budget must be at least \d+ bytes") as info:
        ik.GradientStore.build(path, w32.model, w32.train, factors=w32.factors, budget=100)
    assert "rank 1, or 64 entries" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("with_factors", [True, False])
def test_built_store_respects_its_budget_on_disk(w32, tmp_path, with_factors):
    """What the store's files take on disk per sequence (manifest and parts) is what it
    reports, and within the budget."""
    budget = 25000
    factors = w32.factors if with_factors else None
    store = ik.GradientStore.build(tmp_path / "b.h5", w32.model, w32.train, factors=factors,
                                   budget=budget, progress=False)  # fmt: skip
    files = [store.path, *store.part_paths()]
    on_disk = sum(path.stat().st_size for path in files)
    assert store.bytes_per_example() == round(on_disk / len(store))
    assert store.bytes_per_example() <= budget
    kinds = {codec.partition(":")[0] for codec in store.layer_codecs}
    assert kinds <= ({"sparse8", "lowrank", "lowrank8", "dense"})
    if not with_factors:  # sparse without factors: the standard basis
        assert all(c.eigenbasis is None for c in store.codecs)


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
    with pytest.raises(ik.MismatchError, match="budget: store none"):
        ik.GradientStore.build(path, w32.model, w32.train, budget="1MiB", **options)


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
    ``ik.score`` on the store (its default ``query_rank="auto"``, as the probe forms its
    queries) against on-the-fly scores (every sequence is in the probe)."""
    assert len(w32.train) <= PROBE_SEQUENCES
    store = w32.store("lowrank:1", fidelity_queries=QUERIES, seed=5)
    fidelity = store.fidelity
    assert fidelity.queries == "given queries" and fidelity.n_queries == len(QUERIES)
    assert fidelity.n_sequences == len(w32.train) and fidelity.seed == 5
    stored = w32.score(store, query_rank="auto").scores
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
        assert int(f.attrs["version"]) == 3
        f.attrs["version"] = 1
        del f.attrs["fidelity"]
    old = ik.GradientStore.open(store.path)
    assert old.fidelity is None
    assert_rel(w32.score(old).layer_scores, before, 0, what="version 1")
    with h5py.File(store.path, "r+") as f:
        f.attrs["version"] = 4
    with pytest.raises(ik.FileFormatError, match=r"v\.h5: format version 4 is newer"):
        ik.GradientStore.open(store.path)
