"""LDS and the retraining harness (influencekit.validate.lds, .setting, .checkpoints).

1. The score itself: exactly additive measurements give LDS 1 (and −1 negated); ridge
   regression retrained in closed form on half-subsets is predicted by its exact influence
   (a retrain-free analytic case), and not by random scores.
2. The harness on a tiny GPT-2: it measures what a direct retrain measures, caches, resumes
   after an interruption without redoing runs, refuses a cache of another set-up, and never
   records a non-finite measurement.
3. Multi-checkpoint influence: learning-rate weights, weighted sums, checkpoints that are the
   training run's real snapshots.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from influencekit import InfluenceResult, TextDataset, fit_factors, score
from influencekit.errors import FileFormatError, MismatchError, NonFiniteError
from influencekit.tiny import TINY_CORPUS
from influencekit.training import Checkpoint, lr_at
from influencekit.validate import (
    SHIPPED_RUNS,
    Recipe,
    Retraining,
    checkpoint_results,
    combine_checkpoints,
    completion_log_probs,
    lds,
    load_setting,
    lr_weights,
    random_subsets,
    retrain,
)

TINY_RECIPE = Recipe(n_layer=1, n_embd=16, n_head=2, n_positions=32, epochs=2, batch_size=8)
QUERIES = [("The chef tastes the", " soup."), ("The crew lowers the", " anchor.")]


def _runs(subsets, measurements, n_queries=1):
    n = subsets.shape[1]
    queries = [{"id": f"q{k}", "prompt": "p", "completion": "c"} for k in range(n_queries)]
    return Retraining(
        subsets, list(range(measurements.shape[1])), [str(i) for i in range(n)], "fp", queries,
        {}, measurements=measurements,
    )  # fmt: skip


# -- the score --------------------------------------------------------------------------------


def test_random_subsets_are_seeded_half_subsets():
    a = random_subsets(20, 6, seed=3)
    assert a.shape == (6, 20) and (a.sum(1) == 10).all()
    assert np.array_equal(a, random_subsets(20, 6, seed=3))
    assert not np.array_equal(a, random_subsets(20, 6, seed=4))
    assert len({row.tobytes() for row in a}) == 6
    assert (random_subsets(20, 4, fraction=0.25).sum(1) == 5).all()
    for bad in ({"fraction": 1.0}, {"fraction": 0.0}):
        with pytest.raises(ValueError, match="fraction"):
            random_subsets(20, 4, **bad)
    with pytest.raises(ValueError, match="at least 2 subsets"):
        random_subsets(20, 1)


def test_additive_measurements_give_lds_one_and_noise_lowers_it():
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(2, 40))
    subsets = random_subsets(40, 30, seed=1)
    exact = (subsets @ tau.T)[:, None, :]  # (M, 1 seed, Q)
    assert lds(tau, _runs(subsets, exact, 2)).mean == pytest.approx(1.0)
    assert lds(-tau, _runs(subsets, exact, 2)).mean == pytest.approx(-1.0)
    noisy = exact + rng.normal(scale=3.0, size=exact.shape)
    assert 0.2 < lds(tau, _runs(subsets, noisy, 2)).mean < 0.95
    # Seeds averaged: the mean over seeds is the target; two halves give the seed agreement.
    seeds = exact + rng.normal(scale=3.0, size=(30, 4, 2))
    result = lds(tau, _runs(subsets, seeds, 2))
    assert result.seed_agreement.shape == (2,) and (result.seed_agreement < 1).all()
    assert result.mean > lds(tau, _runs(subsets, seeds[:, :1], 2)).mean


def test_ridge_regression_retrained_exactly_is_predicted_by_its_influence():
    """Retrain-free ground truth: ridge regression has a closed-form minimiser on any subset,
    and influence = x_qᵀ (XᵀX + λI)⁻¹ x_i r_i is its exact first-order response."""
    rng = np.random.default_rng(1)
    n, d, lam = 80, 6, 1.0
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + rng.normal(scale=1.0, size=n)
    x_q = rng.normal(size=(3, d))

    def fit(mask):
        xs, ys = x[mask], y[mask]
        return np.linalg.solve(xs.T @ xs + lam * np.eye(d), xs.T @ ys)

    subsets = random_subsets(n, 60, seed=2)
    half = subsets[0].sum() / n
    # The half-data models: their regulariser is λ on half the data, so influence is taken
    # at the matching full-data scale (λ / half).
    theta = np.linalg.solve(x.T @ x + lam / half * np.eye(d), x.T @ y)
    residual = y - x @ theta
    influence = x_q @ np.linalg.solve(x.T @ x + lam / half * np.eye(d), (x * residual[:, None]).T)
    measured = np.stack([x_q @ fit(s) for s in subsets])[:, None, :]
    runs = _runs(subsets, measured, 3)
    assert lds(influence, runs).mean > 0.8
    assert abs(lds(rng.normal(size=influence.shape), runs).mean) < 0.3


def test_undefined_and_non_finite_are_flagged():
    subsets = random_subsets(10, 5)
    runs = _runs(subsets, np.random.default_rng(0).normal(size=(5, 1, 2)), 2)
    scores = np.vstack([np.ones(10), np.arange(10.0)])  # query 0: every prediction equal
    out = lds(scores, runs)
    assert np.isnan(out.per_query[0]) and out.undefined == ["q0"]
    assert out.mean == out.per_query[1]
    scores[1, 3] = np.nan
    with pytest.raises(NonFiniteError, match=r"'q1'.*'3'"):
        lds(scores, runs)
    with pytest.raises(ValueError, match="shape"):
        lds(np.zeros((2, 9)), runs)
    result = InfluenceResult(np.zeros((2, 10, 1)), ["l"], [str(i) for i in range(10)], ["a", "b"])
    with pytest.raises(MismatchError, match="query_ids"):
        lds(result, runs)
    unfinished = _runs(subsets, np.full((5, 1, 2), np.nan), 2)
    with pytest.raises(ValueError, match="5 of 5 retraining runs not measured"):
        lds(np.ones((2, 10)), unfinished)


# -- the harness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_train(tokenizer):
    return TextDataset.from_texts(TINY_CORPUS, tokenizer, max_length=32)


class Counting:
    """A train_fn that counts its calls and can fail on a chosen one."""

    def __init__(self, fail_on: int | None = None, poison: bool = False):
        self.calls, self.fail_on, self.poison = 0, fail_on, poison

    def __call__(self, data, seed):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        model = TINY_RECIPE(data, seed)
        if self.poison:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")
                model.transformer.wte.weight[0, 0] = float("nan")
        return model


def test_harness_measures_what_a_direct_retrain_measures(tiny_train, tokenizer, tmp_path):
    subsets = random_subsets(len(tiny_train), 3, seed=0)
    runs = retrain(TINY_RECIPE, tiny_train, QUERIES, subsets, [0, 5], progress=False)
    assert runs.complete and runs.measurements.shape == (3, 2, 2)
    direct = TINY_RECIPE(tiny_train.subset(np.flatnonzero(subsets[2])), 5)
    assert np.array_equal(runs.measurements[2, 1], completion_log_probs(direct, QUERIES, tokenizer))
    assert (runs.measurements < 0).all()  # log-probabilities
    # Different seeds train different models.
    assert not np.allclose(runs.measurements[:, 0], runs.measurements[:, 1])


def test_harness_caches_resumes_and_refuses_other_setups(tiny_train, tmp_path):
    cache = tmp_path / "runs.h5"
    subsets = random_subsets(len(tiny_train), 3, seed=0)
    settings = TINY_RECIPE.settings()
    interrupted = Counting(fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        retrain(interrupted, tiny_train, QUERIES, subsets, [0, 1], cache=cache,
                settings=settings, progress=False)  # fmt: skip
    assert Retraining.load(cache).done.sum() == 3  # the three finished runs are kept
    resumed = Counting()
    runs = retrain(resumed, tiny_train, QUERIES, subsets, [0, 1], cache=cache,
                   settings=settings, progress=False)  # fmt: skip
    assert resumed.calls == 3 and runs.complete
    again = Counting()
    cached = retrain(again, tiny_train, QUERIES, subsets, [0, 1], cache=cache,
                     settings=settings, progress=False)  # fmt: skip
    assert again.calls == 0 and np.array_equal(cached.measurements, runs.measurements)
    assert (Retraining.load(cache).seconds > 0).all()
    with pytest.raises(MismatchError, match=r"runs\.h5.*seeds"):
        retrain(again, tiny_train, QUERIES, subsets, [0, 2], cache=cache, settings=settings)
    with pytest.raises(MismatchError, match="settings"):
        retrain(again, tiny_train, QUERIES, subsets, [0, 1], cache=cache, settings={"x": 1})
    with pytest.raises(MismatchError, match="queries"):
        retrain(again, tiny_train, QUERIES[:1], subsets, [0, 1], cache=cache, settings=settings)


def test_harness_never_records_a_non_finite_measurement(tiny_train, tmp_path):
    cache = tmp_path / "runs.h5"
    subsets = random_subsets(len(tiny_train), 2, seed=0)
    with pytest.raises(NonFiniteError, match="subset 0 with seed 0"):
        retrain(Counting(poison=True), tiny_train, QUERIES, subsets, [0], cache=cache,
                progress=False)  # fmt: skip
    assert not cache.exists()


def test_retraining_file_is_checked(tmp_path, tiny_trained):
    path = tmp_path / "result.h5"
    tiny_trained[2].save(path)
    with pytest.raises(FileFormatError, match=r"result\.h5.*influencekit\.retraining"):
        Retraining.load(path)


def test_validation_setting_holds_out_its_queries():
    setting = load_setting()
    assert len(setting.train) == 256 and len(setting.queries) == 16
    train_ids = set(setting.train.ids)
    assert not any(q.id in train_ids for q in setting.queries)
    themes = [q.metadata["theme"] for q in setting.queries]
    assert sorted(set(themes)) == sorted(["computers", "food", "sports", "love"])
    assert all(themes.count(t) == 4 for t in set(themes))
    assert all(len(q.encode(setting.tokenizer)[0]) <= 48 for q in setting.queries)


# -- multi-checkpoint -------------------------------------------------------------------------


def test_checkpoints_are_the_runs_snapshots_with_their_learning_rates(tiny_train):
    recipe = TINY_RECIPE
    model, snaps = recipe.train(tiny_train, seed=0, checkpoints=3)
    total = recipe.epochs * -(-len(tiny_train) // recipe.batch_size)
    assert [c.step for c in snaps] == [round(total * k / 3) for k in (1, 2, 3)]
    schedule = [lr_at(s, total, recipe.peak_lr, recipe.warmup) for s in range(total)]
    assert sum(c.lr_sum for c in snaps) == pytest.approx(sum(schedule))
    assert snaps[0].lr_sum == pytest.approx(sum(schedule[: snaps[0].step]))
    final = model.state_dict()
    assert all(torch.equal(final[k], snaps[-1].state[k]) for k in final)
    assert not torch.equal(final["lm_head.weight"], snaps[0].state["lm_head.weight"])
    weights = lr_weights(snaps)
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all()
    with pytest.raises(ValueError, match="positive total"):
        lr_weights([Checkpoint(1, 0.0, {})])


def test_combined_checkpoints_are_the_weighted_sum(tiny_train, tokenizer):
    model, snaps = TINY_RECIPE.train(tiny_train, seed=0, checkpoints=2)
    models = [c.load_into(copy.deepcopy(model)) for c in snaps]
    results = checkpoint_results(models, QUERIES, tiny_train, progress=False)
    final = score(model, fit_factors(model, tiny_train, "mlp", progress=False), QUERIES,
                  tiny_train, progress=False)  # fmt: skip
    np.testing.assert_allclose(results[-1].layer_scores, final.layer_scores, rtol=1e-5, atol=1e-9)
    fingerprints = {r.meta["model_fingerprint"] for r in results}
    assert len(fingerprints) == 2  # each checkpoint its own factors
    combined = combine_checkpoints(results, [0.3, 0.7])
    expected = 0.3 * results[0].layer_scores + 0.7 * results[1].layer_scores
    np.testing.assert_allclose(combined.layer_scores, expected)
    assert [c["weight"] for c in combined.meta["checkpoints"]] == [0.3, 0.7]
    only_final = combine_checkpoints(results, [0.0, 1.0])
    np.testing.assert_allclose(only_final.scores, results[1].scores)
    other = InfluenceResult(np.zeros((2, 3, 2)), results[0].layers, ["a", "b", "c"], ["0", "1"])
    with pytest.raises(MismatchError, match=r"checkpoint 1.*train_ids"):
        combine_checkpoints([results[0], other], [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight per result"):
        combine_checkpoints(results, [1.0])


def test_shipped_runs_match_the_setting_and_are_complete(tiny_train):
    """The shipped measurements belong to today's setting and recipe: a change to either must
    come with ``python benchmarks/validate.py --part lds`` rerun (it rewrites the file)."""
    setting, recipe = load_setting(), Recipe()
    runs = Retraining.load(SHIPPED_RUNS)
    expected = Retraining(
        random_subsets(len(setting.train), 64, seed=0), [0, 1, 2, 3], setting.train.ids,
        setting.train.fingerprint(),
        [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in setting.queries],
        recipe.settings(),
    )  # fmt: skip
    assert runs.differences(expected) == []
    assert runs.complete and np.isfinite(runs.measurements).all()
    untouched = Counting()
    again = retrain(untouched, setting.train, setting.queries, runs.subsets, runs.seeds,
                    cache=SHIPPED_RUNS, settings=recipe.settings(), progress=False)  # fmt: skip
    assert untouched.calls == 0 and np.array_equal(again.measurements, runs.measurements)
