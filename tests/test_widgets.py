"""Widget state and traits: the components and the explorer, driven from Python the way the
page drives them (setting ``selected`` is what a click does)."""

from __future__ import annotations

import numpy as np
import pytest
import traitlets
from ipywidgets.widgets.widget import _remove_buffers

import influencekit as ik
from influencekit.errors import NonFiniteError
from influencekit.widgets import (
    InfluenceExplorer,
    LayerBreakdown,
    LayerHeatmap,
    RankedTable,
    ThemeClusters,
    TokenHeatmap,
)
from influencekit.widgets.views import NO_MODEL

LAYERS = [f"transformer.h.{b}.mlp.{m}" for b in range(3) for m in ("c_fc", "c_proj")]


def floats(data: bytes) -> list[float]:
    return np.frombuffer(data, "<f8").tolist()


# -- components -------------------------------------------------------------------------------


def test_arrays_travel_as_binary_buffers_not_json_lists():
    heat = TokenHeatmap(["a", "b", "c"], [0.5, -1.0, 2.0])
    _, paths, buffers = _remove_buffers(heat.get_state())
    assert ["scores"] in paths
    assert floats(bytes(buffers[paths.index(["scores"])])) == [0.5, -1.0, 2.0]
    clusters = ThemeClusters(["x"], [["w"]], [2], [1.0], np.ones((2, 2)), [0, 0], ["s", "t"])
    _, paths, _ = _remove_buffers(clusters.get_state())
    assert {"points", "assignment", "sizes", "shares"} <= {p[0] for p in paths}


def test_every_component_trait_a_page_reads_is_synced():
    for cls in (TokenHeatmap, LayerBreakdown, LayerHeatmap, RankedTable, ThemeClusters):
        state = cls.state()
        synced = set(cls().keys)
        assert set(state) <= synced, cls.__name__


def test_token_heatmap_checks_its_arrays():
    heat = TokenHeatmap(["a", "b"], [1.0, 2.0], title="t")
    heat.show(["x"], [3.0])
    assert heat.tokens == ["x"] and floats(heat.scores) == [3.0] and heat.title == ""
    with pytest.raises(ValueError, match=r"scores must be of shape \(2,\)"):
        TokenHeatmap(["a", "b"], [1.0])
    with pytest.raises(
        NonFiniteError, match=r"scores: 1 non-finite value\(s\), first at position \(1,\)"
    ):
        heat.show(["a", "b"], [1.0, np.nan])
    assert heat.tokens == ["x"]  # a refused update changes nothing
    with pytest.raises(ValueError, match="scale"):
        TokenHeatmap(["a"], [1.0], scale=-1)


def test_layer_breakdown_groups_layers_into_thirds():
    bars = LayerBreakdown(LAYERS, np.arange(6.0))
    assert bars.groups == ["lower"] * 2 + ["middle"] * 2 + ["upper"] * 2
    assert LayerBreakdown(["a", "b"], [1, 2]).groups == ["", ""]  # no block numbers
    given = LayerBreakdown(["a", "b"], [1, 2], groups={"first": [0], "second": [1]})
    assert given.groups == ["first", "second"]
    with pytest.raises(ValueError, match="1 names for 2 layers"):
        LayerBreakdown(["a", "b"], [1, 2], groups=["g"])


def test_layer_heatmap_is_row_major_layers_by_columns():
    values = np.arange(6.0).reshape(2, 3)
    heat = LayerHeatmap(["h.0.x", "h.1.x"], values)
    assert heat.columns == ["1", "2", "3"] and floats(heat.values) == values.ravel().tolist()
    with pytest.raises(ValueError, match=r"expected \(2, columns\)"):
        LayerHeatmap(["h.0.x", "h.1.x"], np.ones((3, 2)))
    with pytest.raises(ValueError, match="2 labels for 3 columns"):
        LayerHeatmap(["h.0.x", "h.1.x"], values, columns=["a", "b"])


def test_ranked_table_rows_and_selection():
    table = RankedTable([{"id": 1, "text": "x"}, {"id": "b", "text": "y", "cluster": 2}], [2, 1])
    assert table.rows[0] == {
        "rank": 1,
        "id": "1",
        "text": "x",
        "full": "x",
        "theme": "",
        "cluster": -1,
        "marked": False,
    }
    assert np.isnan(floats(table.shares)).all()  # no shares given: shown as "–"
    with pytest.raises(ValueError, match=r"rows\[0\] lacks text"):
        RankedTable([{"id": "a"}], [1.0])
    with pytest.raises(ValueError, match="selected must be -1 or a row below 2"):
        RankedTable([{"id": "a", "text": ""}, {"id": "b", "text": ""}], [1, 1], selected=2)
    with pytest.raises(NonFiniteError, match="scores"):
        RankedTable([{"id": "a", "text": ""}], [np.inf])


def test_theme_clusters_from_themes_and_checks():
    texts = ["a cat sat", "a cat ran", "the cat slept", "stocks fell", "stocks rose", "bonds"]
    found = ik.themes.cluster(texts, n_clusters=2)
    view = ThemeClusters.from_themes(found, title="t")
    assert view.names == found.titles and view.snippets == texts
    assert view.representatives == found.representatives
    for c, title in enumerate(view.names):  # titled by the cluster's own top terms
        assert title.split(" · ") == found.terms[c][:3]
        assert found.labels[view.representatives[c]] == c
    assert np.frombuffer(view.assignment, "<i4").tolist() == found.labels.tolist()
    assert np.allclose(np.frombuffer(view.points, "<f4").reshape(-1, 2), found.coords, atol=1e-6)
    with pytest.raises(ValueError, match=r"cluster numbers must be in 0\.\.1"):
        ThemeClusters(["x", "y"], [[], []], [1, 1], [0, 0], None, [0, 2], ["a", "b"])
    with pytest.raises(ValueError, match="1 lists for 2 clusters"):
        ThemeClusters(["x", "y"], [[]], [1, 1], [0, 0], None, [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"representatives.*one snippet number per cluster"):
        ThemeClusters.state(["x", "y"], [[], []], [1, 1], [0, 0], None, [0, 1], ["a", "b"],
                            representatives=[0, 5])  # fmt: skip


def test_theme_titles_are_unique_and_fall_back_to_numbers():
    found = ik.themes.Themes(
        np.array([0, 1, 2]), [["cat", "mat"], ["cat", "mat"], []], np.array([1, 1, 1]),
        [0, 1, 2], ["a", "b", "c"], "tfidf",
    )  # fmt: skip
    assert found.titles == ["cat · mat (0)", "cat · mat (1)", "cluster 2"]


@pytest.mark.parametrize("n_far", [3, 12])
def test_the_map_stays_readable_with_outliers(n_far):
    # 60 sequences pointing one way with a little spread, a few pointing elsewhere: on the
    # plain principal-component plane the 60 sit in a speck at one end, 1/20 of the map's width
    rng = np.random.default_rng(0)
    bulk = np.eye(20)[0] + 0.05 * rng.standard_normal((60, 20))
    far = np.eye(20)[1] + 0.05 * rng.standard_normal((n_far, 20))
    texts = [f"text {i}" for i in range(60 + n_far)]
    coords = ik.themes.cluster(texts, "embedding", 2, vectors=np.vstack([bulk, far])).coords
    assert np.abs(coords).max() <= ik.themes.MAP_SPREAD  # outliers clipped to the map
    width = coords.max(axis=0) - coords.min(axis=0)
    spread = np.quantile(np.abs(coords[:60] - np.median(coords[:60], axis=0)), 0.9, axis=0)
    assert (spread / width > 0.2).all(), (spread, width)  # the 60 fill the map


def test_themes_place_alike_texts_close_on_the_map():
    texts = ["a cat sat", "a cat sat down", "my cat sat", "stocks fell", "stocks fell fast"]
    coords = ik.themes.cluster(texts, n_clusters=2).coords
    near = np.linalg.norm(coords[0] - coords[1])
    far = np.linalg.norm(coords[0] - coords[3])
    assert coords.shape == (5, 2) and near < far


# -- the explorer -----------------------------------------------------------------------------


@pytest.fixture
def small(tokenizer):
    """A hand-made result: 2 queries × 6 sequences × 6 layers, with a negative score."""
    rng = np.random.default_rng(0)
    texts = [
        f"sequence {n} about {topic}"
        for n, topic in enumerate("cats cats dogs dogs sea sea".split())
    ]
    records = [{"id": f"s{n}", "text": t, "theme": t.split()[-1]} for n, t in enumerate(texts)]
    train = ik.TextDataset.from_records(records, tokenizer)
    scores = rng.normal(size=(2, 6, 6))
    scores[0, 3] -= 5  # s3 pulls the other way
    queries = [
        {"prompt": "p0", "completion": " c0", "source": "s1"},
        {"prompt": "p1", "completion": " c1"},
    ]
    result = ik.InfluenceResult(scores, LAYERS, train.ids, ["q0", "q1"], {"queries": queries})
    return result, train


def test_explorer_shows_the_top_k_of_the_picked_query(small):
    result, train = small
    explorer = InfluenceExplorer(result, train, k=4)
    top = result.top(0, 4)
    assert [row["id"] for row in explorer.table.rows] == [train.ids[i] for i, _ in top]
    assert floats(explorer.table.scores) == pytest.approx([s for _, s in top])
    positive = np.clip(result.scores[0], 0, None).sum()
    expected = [s / positive if s > 0 else np.nan for _, s in top]
    assert floats(explorer.table.shares) == pytest.approx(expected, nan_ok=True)
    assert [row["marked"] for row in explorer.table.rows] == [i == 1 for i, _ in top]
    # layer × top-sequence heatmap: one row per layer, one column per top sequence
    matrix = np.frombuffer(explorer.matrix.values).reshape(6, 4)
    assert np.allclose(matrix, result.layer_scores[0, [i for i, _ in top]].T)
    # before any click: the top 4's layer shares, and no tokens
    assert floats(explorer.pair.values) == pytest.approx(result.layer_shares(0, 4).tolist())
    assert explorer.pair.percent and explorer.tokens.tokens == []
    assert explorer.selection == {"query": 0, "query_id": "q0", "direction": "raises"}
    assert "rank" in explorer.header.value and "s1" in explorer.header.value


def test_a_click_on_a_row_fills_the_selection_and_the_pair_views(small):
    result, train = small
    explorer = InfluenceExplorer(result, train, k=4)
    explorer.table.selected = 2  # what a click on the third row sends from the page
    i, value = result.top(0, 4)[2]
    assert explorer.selection == {
        "query": 0,
        "query_id": "q0",
        "direction": "raises",
        "rank": 3,
        "train_index": i,
        "train_id": train.ids[i],
        "score": pytest.approx(value),
    }
    assert floats(explorer.pair.values) == pytest.approx(result.layer_scores[0, i].tolist())
    assert explorer.pair.groups == ["lower"] * 2 + ["middle"] * 2 + ["upper"] * 2
    assert explorer.matrix.selected == 2
    assert explorer.tokens.message == NO_MODEL  # no model given: said, not hidden
    explorer.matrix.selected = 0  # a click on the heatmap's first column follows too
    assert explorer.table.selected == 0 and explorer.selection["rank"] == 1


def test_picking_another_query_resets_the_views(small):
    result, train = small
    explorer = InfluenceExplorer(result, train, k=3)
    explorer.select(2)
    explorer.picker.value = 1  # the dropdown, as the page changes it
    assert explorer.query == 1 and explorer.table.selected == -1
    assert explorer.selection == {"query": 1, "query_id": "q1", "direction": "raises"}
    assert [row["id"] for row in explorer.table.rows] == [train.ids[i] for i, _ in result.top(1, 3)]
    explorer.query = 0
    assert explorer.picker.value == 0
    with pytest.raises(traitlets.TraitError, match=r"query must be in 0\.\.1"):
        explorer.query = 2
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.3"):
        explorer.select(4)


def test_the_most_negative_sequences_of_a_query(small):
    result, train = small
    explorer = InfluenceExplorer(result, train, k=3)
    explorer.direction.value = -1  # the "most negative" button
    bottom = result.top(0, 3, largest=False)
    assert [row["id"] for row in explorer.table.rows] == [train.ids[i] for i, _ in bottom]
    assert train.ids[3] == explorer.table.rows[0]["id"]  # s3 was pushed the other way
    negative = np.clip(-result.scores[0], 0, None).sum()
    expected = [-s / negative if s < 0 else np.nan for _, s in bottom]
    assert floats(explorer.table.shares) == pytest.approx(expected, nan_ok=True)
    columns = [i for i, _ in bottom]  # a full result: columns are training indices
    summed = result.layer_scores[0, columns].sum(axis=0)
    assert floats(explorer.pair.values) == pytest.approx((summed / summed.sum()).tolist())
    assert explorer.select(1)["direction"] == "lowers" and explorer.selection["train_index"] == 3
    explorer.query = 1  # the direction stays as picked
    assert [row["id"] for row in explorer.table.rows] == [
        train.ids[i] for i, _ in result.top(1, 3, largest=False)
    ]


def test_the_themes_tab_clusters_on_first_open(small):
    result, train = small
    explorer = InfluenceExplorer(result, train, k=6)
    assert explorer.themes.names == []  # nothing computed until the tab opens
    explorer.tabs.selected_index = 2
    names = explorer.themes.names
    assert len(names) >= 2
    shares = floats(explorer.themes.shares)
    assert sum(shares) == pytest.approx(1.0)
    assert all(row["cluster"] >= 0 for row in explorer.table.rows)  # chips once clustered
    explorer.themes.selected = 1  # a click on a cluster card
    assert explorer.themes.selected == 1
    explorer.query = 1  # another query: shares recomputed for it
    assert len(floats(explorer.themes.shares)) == len(names)


def test_given_themes_per_query_are_used(small):
    result, train = small
    found = [ik.themes.for_query(result, train, q, top_k=4, n_clusters=2) for q in range(2)]
    explorer = InfluenceExplorer(result, train, themes=found, k=4)
    explorer.tabs.selected_index = 2
    assert floats(explorer.themes.shares) == pytest.approx(found[0].shares.tolist())
    with pytest.raises(ik.ParameterError, match="1 Themes for 2 queries"):
        InfluenceExplorer(result, train, themes=found[:1])


def test_a_top_k_result_shows_its_kept_rows_without_shares(tokenizer):
    train = ik.TextDataset.from_texts(["a b c", "d e f", "g h i"], tokenizer, ids=["a", "b", "c"])
    kept = np.array([[[5.0], [2.0]]])  # query 0 keeps training rows 2 and 0
    result = ik.InfluenceResult(kept, ["l"], train.ids, ["q"], indices=np.array([[2, 0]]))
    explorer = InfluenceExplorer(result, train)
    assert [row["id"] for row in explorer.table.rows] == ["c", "a"]
    assert np.isnan(floats(explorer.table.shares)).all()  # no share of a partial sum
    assert explorer.select(1)["train_index"] == 2
    assert explorer.direction.disabled  # the lowest scores were not kept


def test_the_explorer_refuses_what_does_not_fit(small, tokenizer):
    result, train = small
    with pytest.raises(ik.DataError, match="'s5'"):
        InfluenceExplorer(result, train.subset(range(5)))
    with pytest.raises(ik.ParameterError, match="3 query descriptions for 2"):
        InfluenceExplorer(result, train, queries=[{}, {}, {}])
    with pytest.raises(TypeError, match="InfluenceResult"):
        InfluenceExplorer(result.scores, train)


def test_token_heatmap_of_a_pair_on_a_trained_model(tiny_trained, monkeypatch):
    """With model and factors a click shows the pair's tokens; their scores are
    ``token_scores`` (summing to the pair's score) and are computed once per pair."""
    import influencekit.scoring

    model, factors, result, train = tiny_trained
    explorer = InfluenceExplorer(result, train, model, factors, k=5)
    calls = []
    original = influencekit.scoring.token_scores
    monkeypatch.setattr(
        influencekit.scoring, "token_scores", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    explorer.select(2)
    i = explorer.selection["train_index"]
    assert "".join(explorer.tokens.tokens) == train[i].text
    scores = np.frombuffer(explorer.tokens.scores)
    assert scores.sum() == pytest.approx(result.scores[0, i], rel=1e-3)
    expected = original(model, factors, result.queries[0], train[i])
    assert np.allclose(scores, expected)
    explorer.select(1)
    explorer.select(2)  # back to the same pair: from the cache
    assert len(calls) == 2


def test_a_nan_token_score_is_flagged_not_drawn(small, monkeypatch):
    import influencekit.scoring

    result, train = small
    nans = lambda model, factors, query, ex, **kw: np.full(len(ex.input_ids), np.nan)  # noqa: E731
    monkeypatch.setattr(influencekit.scoring, "token_scores", nans)
    explorer = InfluenceExplorer(result, train, "model", "factors", k=3)
    explorer.select(1)
    assert explorer.tokens.tokens == [] and "Token scores failed" in explorer.tokens.message
    assert "non-finite" in explorer.tokens.message


def test_tokens_need_the_query_text(small):
    result, train = small
    bare = ik.InfluenceResult(result.layer_scores, result.layers, result.train_ids, ["q0", "q1"])
    explorer = InfluenceExplorer(bare, train, "model", "factors", k=3)
    explorer.select(1)
    assert "pass queries=" in explorer.tokens.message


def test_themes_that_cannot_be_made_are_said_not_raised(small):
    result, train = small
    found = ik.themes.cluster(["a b", "c d"], n_clusters=2)  # no training indices
    explorer = InfluenceExplorer(result, train, themes=found, k=3)
    explorer.tabs.selected_index = 2
    assert explorer.themes.names == [] and "for_query or themes.across" in explorer.themes.message
