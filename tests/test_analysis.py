"""The paper's analyses (``influencekit.analysis``) against slow, obvious references.

1. Token overlap and themes: planted shares worked out by hand, full and top-k results.
2. Layer groups: 1, 2, 4, 5, 6 and 12 blocks (GPT-2 and Llama names), unnumbered names;
   group shares and re-ranking against loops over the raw layer scores.
3. Tail: the power-law MLE recovers a known Pareto exponent and prefers the power law there,
   the exponential for exponential samples; every statistic against a loop reference.
4. BM25 (binary tf) against a loop over a hand tokenizer; recall by hand; prefiltered scoring
   on a tiny float64 GPT-2 against exact full scores.
"""

from __future__ import annotations

import math
import pathlib
import re
import sys

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

import influencekit as ik
from influencekit import analysis as an
from influencekit.errors import DataError
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers.tiny_models import make_model


def full_result(layer_scores, layers=("h.0.mlp", "h.1.mlp"), meta=None) -> ik.InfluenceResult:
    layer_scores = np.asarray(layer_scores, dtype=np.float64)
    n_queries, n_train, _ = layer_scores.shape
    return ik.InfluenceResult(
        layer_scores,
        list(layers),
        [f"t{i}" for i in range(n_train)],
        [f"q{q}" for q in range(n_queries)],
        dict(meta or {}),
    )


def top_k_of(result: ik.InfluenceResult, k: int) -> ik.InfluenceResult:
    """The top-k result that ``score(..., top_k=k)`` would give for ``result``."""
    order = np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in result.scores])
    layer_scores = np.take_along_axis(result.layer_scores, order[..., None], 1)
    return ik.InfluenceResult(
        layer_scores,
        result.layers,
        result.train_ids,
        result.query_ids,
        result.meta,
        order,
        queries=result.queries,
    )


# ---------------------------------------------------------------------------------------------
# 1. Token overlap and themes

TEXTS = [
    ("The chef tastes the stew and adds more pepper.", "cooking"),
    ("Fresh bread rises slowly in a warm kitchen.", "cooking"),
    ("The sailors raise the mainsail at dawn.", "sailing"),
    ("A comet grows a long tail near the sun.", "astronomy"),
    ("Pepper the sailors with questions.", ["sailing", "cooking"]),
    ("Jazz musicians improvise a solo.", "music"),
]
QUERY_TEXTS = [
    {"prompt": "The chef adds", "completion": " pepper to the soup."},
    {"prompt": "The sailors", "completion": " raise the sail."},
]
# Totals per query; layer 0 carries twice layer 1 so both layers matter.
TOTALS = np.array([[4.0, 3.0, -2.0, 2.0, 1.0, 0.5], [1.0, -1.0, 5.0, 0.0, 2.0, 3.0]])


@pytest.fixture(scope="module")
def themed(tokenizer):
    records = [{"id": f"t{i}", "text": t, "theme": th} for i, (t, th) in enumerate(TEXTS)]
    dataset = ik.TextDataset.from_records(records, tokenizer)
    layer_scores = np.stack([TOTALS * 2 / 3, TOTALS / 3], axis=-1)
    return dataset, full_result(layer_scores, meta={"queries": QUERY_TEXTS})


def test_content_ngrams_keeps_lowercased_alphabetic_content_words():
    text = "The Chef's 2 knives: abc123, an ox, and soup_pot; the chef adds PEPPER."
    assert an.content_ngrams(text) == {("chef",), ("knives",), ("adds",), ("pepper",)}
    assert an.content_ngrams(text, n=2) == {
        ("chef", "knives"),
        ("knives", "chef"),
        ("chef", "adds"),
        ("adds", "pepper"),
    }
    assert an.content_ngrams("It is what it is.") == set()
    assert all(w not in ENGLISH_STOP_WORDS for (w,) in an.content_ngrams(TEXTS[0][0]))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        an.content_ngrams("chef", n=0)
    with pytest.raises(ValueError, match="text must be a string"):
        an.content_ngrams(None)


def test_overlap_share_planted_by_hand(themed):
    dataset, result = themed
    # q0 words {chef, adds, pepper, soup}: shared by t0 and t4. Top 3 = t0 4, t1 3, t3 2.
    assert an.overlap_share(result, dataset, 0, top_k=3) == pytest.approx(4 / 9)
    # All six: positives 4 + 3 + 2 + 1 + 0.5 = 10.5 (t2's -2 left out); t0 4 + t4 1.
    assert an.overlap_share(result, dataset, 0, top_k=6) == pytest.approx(5 / 10.5)
    # Bigrams: only t0 shares ("adds", "pepper").
    assert an.overlap_share(result, dataset, 0, top_k=6, n=2) == pytest.approx(4 / 10.5)
    # q1 words {sailors, raise, sail}: t2 and t4. Top 3 = t2 5, t5 3, t4 2.
    assert an.overlap_share(result, dataset, 1, top_k=3) == pytest.approx(7 / 10)
    assert an.overlap_share(result, dataset, 1, top_k=6) == pytest.approx(7 / 11)
    assert an.overlap_share(result, dataset, 0, top_k=3, query_text="warm bread") == (
        pytest.approx(3 / 9)
    )
    # A top-k result keeps the same top sequences: same shares; top_k past k uses what is kept.
    top3 = top_k_of(result, 3)
    assert an.overlap_share(top3, dataset, 0, top_k=3) == pytest.approx(4 / 9)
    assert an.overlap_share(top3, dataset, 1, top_k=10) == pytest.approx(7 / 10)


def test_theme_share_planted_by_hand(themed):
    dataset, result = themed
    assert an.theme_share(result, dataset, 0, "cooking", top_k=3) == pytest.approx(7 / 9)
    # t4 is tagged ["sailing", "cooking"]: it counts for either.
    assert an.theme_share(result, dataset, 0, "cooking", top_k=6) == pytest.approx(8 / 10.5)
    assert an.theme_share(result, dataset, 1, "sailing", top_k=3) == pytest.approx(7 / 10)
    assert an.theme_share(result, dataset, 1, ["sailing", "music"], top_k=3) == pytest.approx(1)
    assert an.theme_share(result, dataset, 1, ("law",), top_k=3) == 0.0
    assert an.theme_share(top_k_of(result, 3), dataset, 0, "cooking") == pytest.approx(7 / 9)


def test_shares_are_zero_without_positive_influence(themed):
    dataset, result = themed
    negative = full_result(-np.abs(result.layer_scores), meta={"queries": QUERY_TEXTS})
    assert an.overlap_share(negative, dataset, 0) == 0.0
    assert an.theme_share(negative, dataset, 1, "sailing") == 0.0


def test_overlap_table_rows(themed):
    dataset, result = themed
    rows = an.overlap_table(result, dataset, top_k=3, themes=["cooking", None])
    assert [sorted(row) for row in rows] == [["overlap", "query", "theme"]] * 2
    assert [row["query"] for row in rows] == ["q0", "q1"]
    assert [row["overlap"] for row in rows] == pytest.approx([4 / 9, 7 / 10])
    assert rows[0]["theme"] == pytest.approx(7 / 9) and rows[1]["theme"] is None
    plain = an.overlap_table(result, dataset, top_k=6, n=2)
    assert plain == [{"query": "q0", "overlap": pytest.approx(4 / 10.5)},
                     {"query": "q1", "overlap": pytest.approx(5 / 11)}]  # fmt: skip


def test_overlap_errors_name_the_argument(themed, tokenizer):
    dataset, result = themed
    with pytest.raises(ValueError, match=r"q must be a query index in 0\.\.1"):
        an.overlap_share(result, dataset, 2)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        an.overlap_share(result, dataset, 0, top_k=0)
    with pytest.raises(DataError, match="dataset has 5 sequences but the result scored 6"):
        an.overlap_share(result, dataset[:5], 0)
    with pytest.raises(DataError, match="position 0 holds id 't1'"):
        an.overlap_share(result, dataset.subset([1, 0, 2, 3, 4, 5]), 0)
    with pytest.raises(DataError, match=r"meta\['queries'\].*query_text="):
        an.overlap_share(full_result(result.layer_scores), dataset, 0)
    with pytest.raises(DataError, match="field 'topic'"):
        an.theme_share(result, dataset, 0, "cooking", field="topic")
    with pytest.raises(ValueError, match="themes must be a string or a non-empty list"):
        an.theme_share(result, dataset, 0, [])
    with pytest.raises(ValueError, match="themes must be a list with one entry per query"):
        an.overlap_table(result, dataset, themes=["cooking"])


# ---------------------------------------------------------------------------------------------
# 2. Layer groups, group shares, re-ranking

EXPECTED_THIRDS = {  # blocks -> (lower, middle, upper) block numbers, worked out by hand
    1: ([], [0], []),
    2: ([0], [], [1]),
    3: ([0], [1], [2]),
    4: ([0], [1, 2], [3]),
    5: ([0, 1], [2], [3, 4]),
    6: ([0, 1], [2, 3], [4, 5]),
    12: ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]),
}


def gpt2_names(n_blocks: int) -> list[str]:
    return [f"transformer.h.{b}.mlp.{m}" for b in range(n_blocks) for m in ("c_fc", "c_proj")]


def llama_names(n_blocks: int) -> list[str]:
    projections = ("gate_proj", "up_proj", "down_proj")
    return [f"model.layers.{b}.mlp.{p}" for b in range(n_blocks) for p in projections]


@pytest.mark.parametrize("n_blocks", sorted(EXPECTED_THIRDS))
@pytest.mark.parametrize("names", [gpt2_names, llama_names])
def test_layer_groups_thirds(n_blocks, names):
    layers = names(n_blocks)
    groups = an.layer_groups(layers)
    assert list(groups) == ["lower", "middle", "upper"]
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(layers)))
    for group, blocks in zip(an.GROUPS, EXPECTED_THIRDS[n_blocks], strict=True):
        expected = [i for i, name in enumerate(layers) if int(name.split(".")[2]) in blocks]
        assert groups[group] == expected, (n_blocks, group)
    # Listed in another order: each layer still goes with its block.
    shuffled = layers[::-1]
    for group, idx in an.layer_groups(shuffled).items():
        assert {shuffled[i] for i in idx} == {layers[i] for i in groups[group]}


def test_layer_groups_unnumbered_names_and_depth():
    layers = ["model.decoder.project_in", *gpt2_names(3), "model.decoder.project_out"]
    assert an.layer_groups(layers) == {"lower": [0, 1, 2], "middle": [3, 4], "upper": [5, 6, 7]}
    # Blocks 0..2 of a 12-block model are all in the lower third.
    assert an.layer_groups(gpt2_names(3), n_blocks=12) == {
        "lower": [0, 1, 2, 3, 4, 5],
        "middle": [],
        "upper": [],
    }
    with pytest.raises(ValueError, match="n_blocks must be an int >= 3"):
        an.layer_groups(gpt2_names(3), n_blocks=2)
    with pytest.raises(ValueError, match="no name has a block number"):
        an.layer_groups(["lm_head", "transformer.wte"])
    with pytest.raises(ValueError, match="non-empty list of module names"):
        an.layer_groups([])


@pytest.fixture(scope="module")
def six_blocks() -> ik.InfluenceResult:
    rng = np.random.default_rng(3)
    return full_result(rng.normal(size=(3, 20, 12)) + 0.3, layers=gpt2_names(6))


def manual_top_columns(total: np.ndarray, k: int) -> list[int]:
    return sorted(range(len(total)), key=lambda i: (-total[i], i))[:k]


def test_group_shares_are_manual_sums(six_blocks):
    result = six_blocks
    thirds = {"lower": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "upper": [8, 9, 10, 11]}
    for q in range(3):
        columns = manual_top_columns(result.scores[q], 5)
        per_layer = [sum(result.layer_scores[q, i, layer] for i in columns) for layer in range(12)]
        total = sum(per_layer)
        got = an.group_shares(result, q, k=5)
        assert sum(got.values()) == pytest.approx(1.0)
        for group, layers in thirds.items():
            assert got[group] == pytest.approx(sum(per_layer[i] for i in layers) / total)
        # A top-k result keeping at least k columns gives the same shares.
        assert an.group_shares(top_k_of(result, 8), q, k=5) == pytest.approx(got)
    profile = an.layer_profile(result, k=5)
    assert profile.shape == (3, 3)
    expected = [[an.group_shares(result, q, 5)[g] for g in an.GROUPS] for q in range(3)]
    np.testing.assert_allclose(profile, expected)


def test_group_shares_on_two_blocks_leave_middle_empty():
    result = full_result(np.array([[[1.0, 3.0], [0.0, -1.0]]]))
    assert an.group_shares(result, 0, k=1) == {"lower": 0.25, "middle": 0.0, "upper": 0.75}


def test_rerank_by_group_matches_manual_argsort(six_blocks):
    result = six_blocks
    layers_of = {"lower": range(0, 4), "middle": range(4, 8), "upper": range(8, 12)}
    for q in range(3):
        columns = manual_top_columns(result.scores[q], 7)
        for group, layers in layers_of.items():
            group_score = {i: sum(result.layer_scores[q, i, layer] for layer in layers)
                           for i in columns}  # fmt: skip
            # Ties (none here) would keep the total-score order.
            expected = sorted(columns, key=lambda i: -group_score[i])
            got = an.rerank_by_group(result, q, group, k=7)
            assert [i for i, _ in got] == expected
            assert [s for _, s in got] == pytest.approx([group_score[i] for i in expected])
            # On a top-k result: the same training indices, mapped through result.indices.
            on_top_k = an.rerank_by_group(top_k_of(result, 10), q, group, k=7)
            assert [i for i, _ in on_top_k] == expected
            assert [s for _, s in on_top_k] == pytest.approx([s for _, s in got])


def test_rerank_by_group_errors():
    two_blocks = full_result(np.ones((1, 3, 2)))
    with pytest.raises(ValueError, match="group 'middle' holds none"):
        an.rerank_by_group(two_blocks, 0, "middle")
    with pytest.raises(ValueError, match="group must be one of"):
        an.rerank_by_group(two_blocks, 0, "top")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        an.group_shares(two_blocks, 0, k=0)


# ---------------------------------------------------------------------------------------------
# 3. The tail of the distribution


def tail_reference(scores, tail: float) -> dict:
    """The same statistics by loops and closed-form densities (math.erfc for the p-value)."""
    positive = sorted(s for s in scores if s > 0)
    xmin = float(np.quantile(positive, 1 - tail))
    x = [s for s in positive if s >= xmin]
    n = len(x)
    alpha = 1 + n / sum(math.log(v / xmin) for v in x)
    rate = 1 / (sum(v - xmin for v in x) / n)
    diffs = []
    for v in x:
        log_power = math.log((alpha - 1) / xmin) - alpha * math.log(v / xmin)
        log_exp = math.log(rate) - rate * (v - xmin)
        diffs.append(log_power - log_exp)
    mean = sum(diffs) / n
    sigma = math.sqrt(sum((d - mean) ** 2 for d in diffs) / n)
    z = sum(diffs) / (sigma * math.sqrt(n))
    return {
        "alpha": alpha,
        "alpha_se": (alpha - 1) / math.sqrt(n),
        "xmin": xmin,
        "n_tail": n,
        "loglik_ratio": sum(diffs),
        "p_value": math.erfc(abs(z) / math.sqrt(2)),
    }


def test_tail_fit_recovers_a_pareto_exponent():
    rng = np.random.default_rng(2023)
    # numpy's pareto(a) + 1 is a Pareto with xmin 1 and density ∝ x^-(a + 1).
    samples = 0.01 * (rng.pareto(1.5, 20_000) + 1.0)
    fit = an.tail_fit(samples)
    assert abs(fit["alpha"] - 2.5) < 0.1, fit
    assert fit["n_tail"] == 2000 and fit["favours"] == "power law" and fit["loglik_ratio"] > 0
    assert fit["alpha_se"] == pytest.approx(1.5 / math.sqrt(2000), rel=0.1)
    everything = an.tail_fit(samples, xmin=0.01)
    assert everything["n_tail"] == 20_000 and abs(everything["alpha"] - 2.5) < 0.05
    # Negative scores are ignored: adding them changes nothing.
    mixed = np.concatenate([samples, -samples[:5000]])
    assert an.tail_fit(mixed, xmin=0.01) == pytest.approx(everything)


def test_tail_fit_prefers_the_exponential_for_exponential_samples():
    samples = np.random.default_rng(7).exponential(2.0, 20_000)
    fit = an.tail_fit(samples)
    assert fit["favours"] == "exponential", fit
    assert fit["loglik_ratio"] < 0 and fit["p_value"] < 1e-3


def test_tail_fit_statistics_against_loops():
    samples = np.random.default_rng(5).lognormal(0.0, 1.0, size=(4, 60))  # any 2-D shape
    got = an.tail_fit(samples, tail=0.25)
    expected = tail_reference(samples.ravel().tolist(), 0.25)
    assert got.pop("favours") in ("power law", "exponential", "neither")
    assert got == pytest.approx(expected, rel=1e-9)


def test_tail_fit_errors():
    with pytest.raises(ValueError, match="needs at least 10"):
        an.tail_fit(np.arange(1.0, 8.0))
    with pytest.raises(ValueError, match=r"5 positive score\(s\) >= xmin = 55"):
        an.tail_fit(np.arange(1.0, 60.0), xmin=55.0)
    with pytest.raises(ValueError, match="xmin must be > 0"):
        an.tail_fit(np.arange(1.0, 60.0), xmin=0.0)
    with pytest.raises(ValueError, match="tail must be in"):
        an.tail_fit(np.arange(1.0, 60.0), tail=1.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        an.tail_fit([1.0, np.nan] * 20)
    with pytest.raises(ValueError, match="no slope"):
        an.tail_fit(np.ones(30), xmin=1.0)


def test_top_share_by_hand():
    scores = [10.0, 5.0, 3.0, 2.0, 0.0, -4.0, -1.0, 0.0, 0.0, 0.0]  # positive total 20
    assert an.top_share(scores, 0.1) == 0.5
    assert an.top_share(scores, 0.2) == 0.75
    assert an.top_share(scores, 0.01) == 0.5  # at least one sequence
    assert an.top_share(scores, 1.0) == 1.0
    assert an.top_share(np.array(scores)[::-1], 0.3) == 0.9  # order does not matter
    assert an.top_share([-1.0, 0.0], 0.5) == 0.0
    with pytest.raises(ValueError, match="fraction must be in"):
        an.top_share(scores, 0.0)


def test_ccdf_is_the_empirical_tail_probability():
    scores = np.random.default_rng(1).normal(size=500)
    x, p = an.ccdf(scores)
    assert np.all(x > 0) and x.size == (scores > 0).sum()
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(p) < 0)
    assert p[0] == 1.0 and p[-1] == pytest.approx(1 / x.size)
    for i in range(0, x.size, 37):  # scores are distinct: P(X >= x_i) exactly
        assert p[i] == pytest.approx(np.mean(scores[scores > 0] >= x[i]))
    empty_x, empty_p = an.ccdf([-1.0, 0.0])
    assert empty_x.size == empty_p.size == 0


def test_plot_tail_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        an.plot_tail(np.arange(1.0, 30.0))


def test_plot_tail_draws_the_ccdf_and_the_fit():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    samples = np.random.default_rng(0).pareto(1.5, 2000) + 1.0
    ax = an.plot_tail(samples, fit=an.tail_fit(samples))
    assert len(ax.lines) == 2 and ax.get_xscale() == ax.get_yscale() == "log"


# ---------------------------------------------------------------------------------------------
# 4. BM25 prefilter

BM25_TEXTS = [
    "The cook chops the onions before the soup goes on the stove.",
    "Fresh bread rises slowly in a warm kitchen.",
    "The chef tastes the stew and adds more pepper.",
    "The chef tastes the stew and adds more pepper.",  # a duplicate: tied scores
    "It is what it is.",  # no term at all
    "Soup, soup and more soup: the cook loves soup.",  # repeated terms count once
    "The sailors raise the mainsail as the wind picks up.",
    "A steady breeze fills the sails and the boat heels over.",
    "The captain steers the yacht toward the open sea.",
    "The chef's onions and pepper soup, on a warm stove, for the sailors.",
]
BM25_QUERIES = [
    ("The chef adds", " pepper to the onion soup."),
    ("The sailors", " raise the sails in the wind."),
    ("Quantum", " chromodynamics."),  # shares no term with any text
]


def bm25_reference(query_text: str, texts: list[str], k1: float, b: float) -> list[float]:
    """Okapi BM25 with tf ∈ {0, 1}, term by term, with a hand tokenizer."""

    def terms(text: str) -> set[str]:
        words = re.findall(r"(?u)\b\w\w+\b", text.lower())
        return {w for w in words if w not in ENGLISH_STOP_WORDS}

    docs = [terms(t) for t in texts]
    n_docs = len(docs)
    avgdl = sum(len(d) for d in docs) / n_docs
    scores = []
    for doc in docs:
        total = 0.0
        for term in terms(query_text):
            tf = 1 if term in doc else 0
            df = sum(term in other for other in docs)
            if tf:
                idf = math.log((n_docs - df + 0.5) / (df + 0.5) + 1)
                total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(total)
    return scores


@pytest.mark.parametrize(("k1", "b"), [(1.5, 0.75), (1.2, 0.0), (0.5, 1.0)])
def test_bm25_against_a_loop(tokenizer, k1, b):
    dataset = ik.TextDataset.from_texts(BM25_TEXTS, tokenizer)
    got = an.bm25_scores(BM25_QUERIES, dataset, k1=k1, b=b)
    assert got.shape == (3, len(BM25_TEXTS))
    for q, (prompt, completion) in enumerate(BM25_QUERIES):
        expected = bm25_reference(prompt + completion, BM25_TEXTS, k1, b)
        np.testing.assert_allclose(got[q], expected, rtol=1e-12, atol=1e-15)
    for m in (1, 4, 10, 50):
        candidates = an.bm25_candidates(BM25_QUERIES, dataset, m, k1=k1, b=b)
        for q, (prompt, completion) in enumerate(BM25_QUERIES):
            expected = bm25_reference(prompt + completion, BM25_TEXTS, k1, b)
            ranked = sorted(range(len(BM25_TEXTS)), key=lambda i: (-expected[i], i))[:m]
            assert candidates[q].tolist() == ranked, (q, m)
    # Plain strings work too, and give the same ranking.
    np.testing.assert_array_equal(an.bm25_scores(BM25_QUERIES, BM25_TEXTS, k1=k1, b=b), got)


def test_bm25_ties_and_query_without_shared_terms():
    candidates = an.bm25_candidates(BM25_QUERIES, BM25_TEXTS, 4)
    assert candidates[0][:2].tolist() in ([2, 3], [9, 2])  # the duplicates stay in index order
    assert list(candidates[0]).index(2) < list(candidates[0]).index(3)
    assert candidates[2].tolist() == [0, 1, 2, 3]  # all zero: index order
    assert an.bm25_candidates(BM25_QUERIES[0], BM25_TEXTS, 2)[0].tolist() == (
        candidates[0][:2].tolist()
    )
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        an.bm25_candidates(BM25_QUERIES, BM25_TEXTS, 0)
    with pytest.raises(DataError, match="no indexable words"):
        an.bm25_candidates(BM25_QUERIES, ["It is what it is.", "a b c"], 1)
    with pytest.raises(ValueError, match="need k1 >= 0 and 0 <= b <= 1"):
        an.bm25_scores(BM25_QUERIES, BM25_TEXTS, b=2.0)


def test_prefilter_recall_by_hand():
    totals = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=float)
    result = full_result(totals[..., None], layers=["h.0.mlp"])
    candidates = [np.array([0, 5, 2]), np.array([5, 4])]
    # Exact top 3: q0 {0, 1, 2} -> 2 of 3; q1 {5, 4, 3} -> 2 of 3.
    np.testing.assert_allclose(an.prefilter_recall(candidates, result, k=3), [2 / 3, 2 / 3])
    np.testing.assert_allclose(an.prefilter_recall(candidates, result, k=1), [1.0, 1.0])
    # k past the training set: the whole set is the top.
    np.testing.assert_allclose(an.prefilter_recall(candidates, result, k=10), [0.5, 1 / 3])
    with pytest.raises(ValueError, match="full result"):
        an.prefilter_recall(candidates, top_k_of(result, 2), k=2)
    with pytest.raises(ValueError, match="candidates has 1 entries"):
        an.prefilter_recall(candidates[:1], result)


# ---------------------------------------------------------------------------------------------
# Prefiltered scoring on a tiny float64 GPT-2

TRAIN_TEXTS = [TINY_CORPUS[i] for i in (12, 1, 20, 33, 28, 4, 11, 36, 0, 15, 25, 39, 9, 14)]
QUERIES = [
    ("The chef tastes the stew", " and adds more pepper."),
    ("A comet", " grows a long tail when it nears the sun."),
    ("The sailors raise", " the mainsail at dawn."),
]
F64 = torch.float64


class TinyWorld:
    def __init__(self, tokenizer):
        self.train = ik.TextDataset.from_texts(TRAIN_TEXTS, tokenizer, max_length=40)
        self.model = make_model("gpt2", len(tokenizer), dtype=F64)
        self.factors = ik.fit_factors(
            self.model, self.train, "mlp", dtype=F64, batch_size=4, progress=False
        )
        self.exact = self.prefiltered(None)

    def prefiltered(self, m: int | None) -> ik.InfluenceResult:
        options = {"dtype": F64, "batch_size": 3, "progress": False}
        if m is None:
            return ik.score(self.model, self.factors, QUERIES, self.train, **options)
        return an.score_prefiltered(self.model, self.factors, QUERIES, self.train, m, **options)


@pytest.fixture(scope="module")
def tiny(tokenizer) -> TinyWorld:
    return TinyWorld(tokenizer)


def test_score_prefiltered_with_every_candidate_is_the_exact_ranking(tiny):
    n = len(tiny.train)
    result = tiny.prefiltered(n)
    assert result.is_top_k and result.indices.shape == (3, n)
    assert result.train_ids == tiny.train.ids and result.layers == tiny.exact.layers
    for q in range(3):
        row = tiny.exact.scores[q]
        assert result.indices[q].tolist() == sorted(range(n), key=lambda i: (-row[i], i))
        np.testing.assert_allclose(
            result.layer_scores[q], tiny.exact.layer_scores[q, result.indices[q]], rtol=1e-9
        )
        top, exact_top = result.top(q, 5), tiny.exact.top(q, 5)
        assert [i for i, _ in top] == [i for i, _ in exact_top]
        assert [s for _, s in top] == pytest.approx([s for _, s in exact_top], rel=1e-9)
    assert (tiny.exact.scores > 0).any() and (tiny.exact.scores < 0).any()  # not vacuous


def test_score_prefiltered_keeps_each_querys_own_candidates(tiny, tmp_path):
    m = 3
    candidates = an.bm25_candidates(QUERIES, tiny.train, m)
    assert len(np.unique(np.concatenate(candidates))) < len(tiny.train)  # a real subset
    result = tiny.prefiltered(m)
    assert result.indices.shape == (3, m)
    for q in range(3):
        assert sorted(result.indices[q]) == sorted(candidates[q])
        np.testing.assert_allclose(
            result.layer_scores[q], tiny.exact.layer_scores[q, result.indices[q]], rtol=1e-9
        )
        assert np.all(np.diff(result.scores[q]) <= 0)
    assert result.meta["prefilter"] == {"method": "bm25-binary", "m": 3, "k1": 1.5, "b": 0.75}
    assert (result.queries[1].prompt, result.queries[1].completion) == QUERIES[1]
    loaded = ik.InfluenceResult.load(result.save(tmp_path / "prefiltered.h5"))
    assert loaded.meta["prefilter"] == result.meta["prefilter"]
    np.testing.assert_array_equal(loaded.indices, result.indices)
    # The analyses run on it: recall against the exact scores, overlap of its top sequences.
    recall = an.prefilter_recall(candidates, tiny.exact, k=3)
    assert recall.shape == (3,) and np.all((recall >= 0) & (recall <= 1))
    rows = an.overlap_table(result, tiny.train, top_k=3)
    assert [row["query"] for row in rows] == ["0", "1", "2"]


def test_score_prefiltered_refuses_top_k_and_a_store(tiny):
    with pytest.raises(ValueError, match="leave out top_k"):
        an.score_prefiltered(tiny.model, tiny.factors, QUERIES, tiny.train, 3, top_k=2)
    with pytest.raises(TypeError, match="train must be a TextDataset"):
        an.score_prefiltered(tiny.model, tiny.factors, QUERIES, TRAIN_TEXTS, 3)
