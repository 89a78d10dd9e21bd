"""Bounded memory: factors kept in float32 and read a layer at a time, and every stage
planned into groups of layers under ``max_memory``, giving what one group gives.

1. The plan: groups of consecutive layers under a budget; ``max_memory`` parsed or taken
   as a share of the free memory.
2. ``fit_factors``: float32 at rest by default (decomposed in float64), ranking like
   float64 factors (scores Pearson ≥ 0.9999 on the tiny model); a small ``max_memory``
   fits in several groups and gives the same factors bit for bit, written to ``path=``
   and read back lazily; the batch size (of the given one and its halvings) that makes the
   fewest groups is taken (the same factors up to rounding), and a layer over the budget
   even at one sequence warns; factors that cannot fit without
   ``path=`` are refused, naming it.
3. Lazily read factors: nothing read until used, ``release`` forgets, ``window`` reads a
   sub-block equal to slicing the whole; the host eigendecomposition (LAPACK ``dsyevr``)
   against the definition.
4. ``GradientStore.build`` and ``score`` (from a store and on the fly, with ``top_k`` and
   ``refine``) under a small ``max_memory``: several groups, the same arrays and scores, and
   a warning that a layer goes over the budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.fitting import _plan_at, eigh_on_device, fit_plan
from influencekit.memory import OverBudgetWarning, Plan, max_memory, parse_bytes
from influencekit.models import select_modules
from influencekit.settings import RunSettings
from influencekit.tiny import TINY_CORPUS

from helpers.tiny_models import make_model

QUERIES = [("The ship left", " the harbour at dawn."), ("The oven must be", " hot.")]
SMALL = 60_000  # bytes: below one layer's share on the tiny model, so one layer per group


@pytest.fixture(scope="module")
def world(tokenizer):
    model = make_model("llama", len(tokenizer), dtype=torch.float32, hidden=24)
    train = ik.TextDataset.from_texts(TINY_CORPUS[:16], tokenizer, max_length=32)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    return model, train, factors


# ---------------------------------------------------------------------------------------------
# 1. The plan


def test_plan_groups_consecutive_layers_under_the_budget():
    assert Plan([3, 3, 3, 3], fixed=1, limit=7).groups == [[0, 1], [2, 3]]
    assert Plan([3, 3, 3, 3], fixed=1, limit=100).groups == [[0, 1, 2, 3]]
    plan = Plan([2, 9, 2], fixed=1, limit=5)  # a layer over the budget: alone, and said
    assert plan.groups == [[0], [1], [2]] and plan.over == [1]
    assert plan.peak == 10


def test_max_memory_parsed_or_a_share_of_the_free_memory(world, tmp_path):
    model, train, factors = world
    assert max_memory("2GiB") == 2**31 and max_memory(1000) == 1000
    assert 0 < max_memory(None) < 2**50
    with pytest.raises(ik.ParameterError, match="max_memory"):
        parse_bytes("lots", "max_memory")
    with pytest.raises(ik.ParameterError, match="max_memory"):
        ik.fit_factors(model, train, max_memory=-1)
    with pytest.raises(ik.ParameterError, match="max_memory"):
        ik.score(model, factors, QUERIES, train, max_memory="lots")
    with pytest.raises(ik.ParameterError, match="max_memory"):
        ik.GradientStore.build(tmp_path / "x.h5", model, train, max_memory=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 2. Fitting


def test_factors_are_float32_and_rank_like_float64(world):
    model, train, factors = world
    layer = factors.layers[factors.modules[0]]
    assert all(
        getattr(layer, k).dtype == torch.float32 for k in ("q_a", "d_a", "q_s", "d_s", "lam")
    )
    f64 = ik.fit_factors(model, train, "mlp", dtype=torch.float64, progress=False)
    assert f64.layers[f64.modules[0]].lam.dtype == torch.float64
    a = ik.score(model, factors, QUERIES, train, progress=False).scores
    b = ik.score(model, f64, QUERIES, train, dtype=torch.float64, progress=False).scores
    for x, y in zip(a, b, strict=True):
        assert np.corrcoef(x, y)[0, 1] >= 0.9999


def fit_plan_at(model, train, budget, batch_size=8):
    """``fit_factors``' plan for the tiny world at ``budget`` bytes, and its batch size."""
    layers = select_modules(model, "mlp")
    longest = max(len(ex.input_ids) for ex in train)
    run = RunSettings(batch_size=batch_size).on(model)
    plan, run = fit_plan(model, layers, "ekfac", run, longest, budget, keep=False)
    return plan, run.batch_size


def test_a_small_budget_fits_in_groups_the_same_factors(world, tmp_path):
    """At one batch size (one sequence: no smaller one to choose), groups of layers give the
    factors of one pass bit for bit."""
    model, train, factors = world
    whole, _ = fit_plan_at(model, train, 2**40, batch_size=1)
    budget = whole.fixed + max(whole.costs)  # one layer per group
    plan, _ = fit_plan_at(model, train, budget, batch_size=1)
    assert len(plan.groups) == len(factors.modules) and not plan.over
    held = ik.fit_factors(model, train, "mlp", progress=False, batch_size=1)
    path = tmp_path / "f.h5"
    grouped = ik.fit_factors(model, train, "mlp", progress=False, max_memory=budget, path=path,
                             batch_size=1)  # fmt: skip
    assert grouped.path == path and path.is_file()
    for name in factors.modules:
        lazy, one = grouped.layers[name], held.layers[name]
        assert not lazy._arrays  # read from the file only when asked
        for key in ("q_a", "d_a", "q_s", "d_s", "lam"):
            assert torch.equal(getattr(lazy, key), getattr(one, key)), (name, key)
        assert lazy.default_damping() == one.default_damping()
        assert lazy.basis_fingerprint() == one.basis_fingerprint()


def test_the_batch_that_makes_the_fewest_passes_is_taken(world):
    """A smaller batch holds fewer activations and leaves room for more layers per group
    (two passes each): of the given batch size and its halvings, the plan takes the one
    with the fewest groups, the largest of those."""
    model, train, _ = world
    layers = select_modules(model, "mlp")
    longest = max(len(ex.input_ids) for ex in train)

    def at(size, room):  # the plan at exactly this batch size
        return _plan_at(model, layers, "ekfac", RunSettings(batch_size=size).on(model),
                        longest, room, False)  # fmt: skip

    sizes = (8, 4, 2, 1)
    rooms = [at(b, 2**40).fixed + k * max(at(b, 2**40).costs) for b in sizes for k in (1, 2, 3)]
    taken = set()
    for room in rooms:
        plan, batch_size = fit_plan_at(model, train, room)
        fitting = [b for b in sizes if not at(b, room).over]
        assert fitting and not plan.over
        fewest = min(len(at(b, room).groups) for b in fitting)
        assert len(plan.groups) == fewest
        assert batch_size == max(b for b in fitting if len(at(b, room).groups) == fewest)
        taken.add(batch_size)
    assert len(taken) > 1  # the rooms tried make different choices


def test_a_layer_over_the_budget_at_one_sequence_warns(world, tmp_path):
    model, train, factors = world
    with pytest.warns(OverBudgetWarning, match=f"fit_factors: {len(factors.modules)} layer"):
        plan, batch_size = fit_plan_at(model, train, SMALL)
    assert batch_size == 1 and plan.over
    # The sums over tokens do not depend on the batch: the same factors up to rounding.
    with pytest.warns(OverBudgetWarning):
        small = ik.fit_factors(
            model, train, "mlp", progress=False, max_memory=SMALL, path=tmp_path / "f.h5"
        )
    a = ik.score(model, factors, QUERIES, train, progress=False).scores
    b = ik.score(model, small, QUERIES, train, progress=False).scores
    for x, y in zip(a, b, strict=True):
        assert np.corrcoef(x, y)[0, 1] >= 0.9999


def test_factors_that_do_not_fit_need_a_path(world):
    model, train, _ = world
    with pytest.raises(ik.ParameterError, match="path") as info:
        ik.fit_factors(model, train, "mlp", progress=False, max_memory=SMALL)
    assert "max_memory" in str(info.value)


# ---------------------------------------------------------------------------------------------
# 3. Lazy factors


def test_lazy_layers_read_release_and_window(world, tmp_path):
    _, _, factors = world
    path = factors.save(tmp_path / "f.h5")
    loaded = ik.Factors.load(path)
    name = loaded.modules[1]
    layer, held = loaded.layers[name], factors.layers[name]
    assert layer.nbytes() == held.nbytes() > 0 and not layer._arrays
    assert torch.equal(layer.lam, held.lam) and "lam" in layer._arrays
    layer.release()
    assert not layer._arrays
    rows, cols = torch.tensor([3, 0, 5]), torch.tensor([7, 2])
    like = torch.empty(0)
    got = layer.window(rows, cols, like)
    want = (held.q_s[:, rows], held.q_a[:, cols], held.lam[rows][:, cols])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert not layer._arrays  # a window is read without holding the whole arrays


def test_host_eigendecomposition_against_its_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    sym = x @ x.T
    values, vectors = eigh_on_device(sym)
    assert torch.equal(sym, x @ x.T)  # the input is left alone unless overwrite=True
    # float64 LAPACK: backward error a small multiple of n·u·‖A‖
    scale = 60 * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(sym, 2))
    assert float((vectors @ torch.diag(values) @ vectors.T - sym).abs().max()) < 10 * scale
    assert float((vectors.T @ vectors - torch.eye(60, dtype=torch.float64)).abs().max()) < 1e-12
    assert bool((values[1:] >= values[:-1]).all())


# ---------------------------------------------------------------------------------------------
# 4. Build and score in groups


def test_build_and_score_in_groups_give_the_same(world, tmp_path):
    model, train, factors = world
    whole = ik.GradientStore.build(tmp_path / "a.h5", model, train, factors=factors,
                                   progress=False)  # fmt: skip
    with pytest.warns(OverBudgetWarning, match=r"GradientStore\.build"):  # and says so
        grouped = ik.GradientStore.build(tmp_path / "b.h5", model, train, factors=factors,
                                         progress=False, max_memory=SMALL)  # fmt: skip
    assert grouped.layer_codecs == whole.layer_codecs
    everyone = list(range(len(train)))
    for j in range(len(whole.modules)):
        (a,), (b,) = whole.rows(everyone, [j]), grouped.rows(everyone, [j])
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for source in (whole, train):
        plain = ik.score(model, factors, QUERIES, source, progress=False)
        with pytest.warns(OverBudgetWarning, match="score: .* layer"):
            small = ik.score(model, factors, QUERIES, source, progress=False, max_memory=SMALL)
        assert plain.meta["layer_groups"] == 1 and small.meta["layer_groups"] > 1
        np.testing.assert_array_equal(small.layer_scores, plain.layer_scores)
    top = ik.score(model, factors, QUERIES, whole, progress=False, top_k=3, refine=5)
    with pytest.warns(OverBudgetWarning):
        top_small = ik.score(model, factors, QUERIES, whole, progress=False, top_k=3, refine=5,
                             max_memory=SMALL)  # fmt: skip
    np.testing.assert_array_equal(top_small.indices, top.indices)
    np.testing.assert_allclose(top_small.layer_scores, top.layer_scores, rtol=1e-6, atol=0)
