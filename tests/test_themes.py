"""Theme clustering: planted themes are recovered, by words, by gradients, by hidden states
and by preconditioned gradients; the influence vectors against an explicit float64 inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

import influencekit as ik
from influencekit import themes

PLANTED = {
    "sea": "ship sail harbour anchor wave captain deck tide crew boat",
    "space": "star planet orbit rocket moon galaxy comet telescope astronaut nebula",
    "kitchen": "soup bread oven recipe salt butter flour chef pepper dough",
    "court": "judge lawyer verdict trial jury witness appeal sentence court evidence",
}
FILLER = "the a and it was then very so with of on in".split()


def planted_texts(n_per_theme: int = 15, seed: int = 0) -> tuple[list[str], list[str]]:
    """Short texts of 4 theme words among filler words; the theme is the label."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for theme, words in PLANTED.items():
        vocab = words.split()
        for _ in range(n_per_theme):
            chosen = list(rng.choice(vocab, 4, replace=False)) + list(rng.choice(FILLER, 4))
            rng.shuffle(chosen)
            texts.append(" ".join(chosen))
            labels.append(theme)
    return texts, labels


@pytest.mark.parametrize("n_clusters", [None, 4])
def test_tfidf_recovers_planted_themes(n_clusters):
    texts, labels = planted_texts()
    found = themes.cluster(texts, "tfidf", n_clusters)
    assert found.n_clusters == 4
    assert normalized_mutual_info_score(labels, found.labels) >= 0.9
    assert sorted(found.sizes.tolist()) == [15, 15, 15, 15]
    # each cluster's top terms are its theme's words
    for c in range(4):
        theme = labels[found.members(c)[0]]
        assert set(found.terms[c][:3]) <= set(PLANTED[theme].split()), (theme, found.terms[c])


def test_the_choice_of_k_shows_its_evidence():
    texts, _ = planted_texts()
    found = themes.cluster(texts, "tfidf", max_clusters=8)
    assert sorted(found.k_scores) == list(range(2, 9))  # every k tried, with its modularity
    assert max(found.k_scores, key=found.k_scores.get) == found.n_clusters == 4
    told = themes.cluster(texts, "tfidf", 3)
    assert list(told.k_scores) == [3]  # told k: only that k was scored
    vectors, _ = _grouped_vectors(3, 40, seed=0)
    found = themes.cluster([f"t{i}" for i in range(120)], "embedding", vectors=vectors)
    for k in found.k_scores:  # a k told is cut as the same k tried automatically
        told = themes.cluster(found.texts, "embedding", k, vectors=vectors)
        assert told.k_scores[k] == pytest.approx(found.k_scores[k])


def test_modularity_matches_its_definition():
    """Against the double sum over pairs, Q = Σ_ij [A_ij - d_i d_j / 2m] δ(c_i, c_j) / 2m."""
    from scipy import sparse

    rng = np.random.default_rng(3)
    upper = np.triu(rng.random((12, 12)) < 0.3, 1)
    adjacency = (upper | upper.T).astype(float)
    labels = rng.integers(0, 3, size=12)
    degree, total = adjacency.sum(axis=1), adjacency.sum()
    expected = sum(
        adjacency[i, j] - degree[i] * degree[j] / total
        for i in range(12)
        for j in range(12)
        if labels[i] == labels[j]
    )
    found = themes.clustering.modularity(sparse.csr_matrix(adjacency), labels)
    assert found == pytest.approx(expected / total)


def test_neighbour_graph_joins_each_text_to_its_nearest(monkeypatch):
    """Built a few rows at a time, it equals the graph of a full similarity sort."""
    monkeypatch.setattr(themes.clustering, "GRAPH_BLOCK", 7)  # several blocks, one cut short
    rng = np.random.default_rng(4)
    units = rng.normal(size=(30, 5))
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    similarity = units @ units.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, : round(30**0.5)]
    expected = np.zeros((30, 30), dtype=bool)
    expected[np.repeat(np.arange(30), nearest.shape[1]), nearest.ravel()] = True
    expected |= expected.T
    np.testing.assert_array_equal(themes.clustering.neighbour_graph(units).toarray() > 0, expected)


def _grouped_vectors(groups: int, per_group: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(groups), per_group)
    return rng.normal(size=(groups, 50))[truth] + 0.8 * rng.normal(size=(len(truth), 50)), truth


@pytest.mark.parametrize("groups", [2, 3, 5])
def test_k_stops_short_of_the_ceiling_when_there_are_fewer_groups(groups):
    vectors, truth = _grouped_vectors(groups, 300 // groups, seed=groups)
    texts = [f"text {i}" for i in range(len(truth))]
    found = themes.cluster(texts, "embedding", vectors=vectors)
    assert max(found.k_scores) == themes.ceiling(300) == 12  # every k up to the ceiling tried
    assert found.n_clusters == groups
    assert normalized_mutual_info_score(truth, found.labels) >= 0.9


def test_k_stops_short_of_the_ceiling_on_real_short_texts():
    """The shipped quotes of three themes: short texts, where the silhouette rises with k."""
    from influencekit.demo.corpus import load_records

    corpus = [r for r in load_records() if r["theme"] in ("food", "law", "sports")]
    found = themes.cluster([r["text"] for r in corpus], "tfidf")
    assert 2 <= found.n_clusters < themes.ceiling(len(corpus)) == max(found.k_scores)


def test_the_ceiling_grows_with_the_data_and_max_clusters_overrides_it():
    assert [themes.ceiling(n) for n in (3, 8, 50, 200, 800, 5000)] == [2, 2, 5, 10, 20, 30]
    texts, _ = planted_texts()
    assert max(themes.cluster(texts, "tfidf").k_scores) == themes.ceiling(60) == 5
    assert max(themes.cluster(texts, "tfidf", max_clusters=12).k_scores) == 12


def test_representative_is_a_member_near_the_centre():
    texts, _ = planted_texts()
    found = themes.cluster(texts, n_clusters=4)
    for c, rep in enumerate(found.representatives):
        assert found.labels[rep] == c


@pytest.mark.parametrize("method", ["gradient", "influence", "embedding"])
def test_vector_methods_recover_planted_directions_from_vectors_and_gram(method):
    """Vectors near 3 planted directions (with different norms: cosine must ignore scale)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 40))
    truth = np.repeat(np.arange(3), 12)
    vectors = centres[truth] + 0.3 * rng.normal(size=(36, 40))
    vectors *= rng.uniform(0.1, 10, size=(36, 1))
    texts = [f"text {i}" for i in range(36)]
    by_vectors = themes.cluster(texts, method, vectors=vectors)
    by_gram = themes.cluster(texts, method, gram=vectors @ vectors.T)
    for found in (by_vectors, by_gram):
        assert found.n_clusters == 3
        assert normalized_mutual_info_score(truth, found.labels) == pytest.approx(1.0)
    np.testing.assert_array_equal(by_vectors.labels, by_gram.labels)


def test_gram_embedding_reproduces_the_cosine_matrix():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(10, 4))  # rank 4 < n: the embedding must drop null directions
    units = themes.vectors.from_gram(vectors @ vectors.T, 10)
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(units @ units.T, (vectors @ vectors.T) / np.outer(norms, norms))


def test_class_tfidf_prefers_words_frequent_here_and_rare_elsewhere():
    texts = ["apple apple pie", "apple tart", "pie chart", "bar chart chart"]
    terms = themes.class_tfidf_terms(texts, np.array([0, 0, 1, 1]), n_terms=2)
    assert terms[0][0] == "apple" and terms[1][0] == "chart"


def test_titles_are_words_not_contraction_fragments():
    """Contractions are left out whole and possessives count as their word, so no title
    reads "don · ain · doesn"."""
    texts = [
        "Don't you know the cat's dinner ain't ready",
        "The cat doesn't eat, isn't it",
        "We're sure they'll sail; the ship's crew can't wait",
        "You've a ship, I'm told",
    ]
    terms = themes.class_tfidf_terms(texts, np.array([0, 0, 1, 1]), 3)
    fragments = {"don", "ain", "doesn", "isn", "re", "ll", "ve", "can", "t", "s"}
    assert not fragments & {word for cluster in terms for word in cluster}
    assert "cat" in terms[0] and "ship" in terms[1]


def test_bad_arguments_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="method must be one of"):
        themes.cluster(["a b"], "words")
    with pytest.raises(ik.ParameterError, match="no texts"):
        themes.cluster([])
    with pytest.raises(ValueError, match=r"n_clusters must be in 1\.\.2"):
        themes.cluster(["a b", "c d"], n_clusters=3)
    with pytest.raises(ValueError, match="needs vectors= or gram="):
        themes.cluster(["a b", "c d"], "gradient")
    with pytest.raises(ik.DataError, match="NaN"):
        themes.cluster(["a", "b", "c"], "gradient", vectors=np.array([[1.0], [np.nan], [2.0]]))
    with pytest.raises(ValueError, match=r"gram must be \(3, 3\)"):
        themes.cluster(["a", "b", "c"], "gradient", gram=np.eye(2))


def _planted_result(labels: list[str]):
    """A result whose query 0 prefers 'sea' texts and query 1 prefers 'court' texts."""
    n = len(labels)
    scores = np.zeros((2, n, 2))
    for i, theme in enumerate(labels):
        scores[0, i] = [2.0, 1.0] if theme == "sea" else [0.1, 0.0]
        scores[1, i] = [0.5, 0.5] if theme == "court" else [-0.1, 0.0]
    ids = [str(i) for i in range(n)]
    return ik.InfluenceResult(scores, ["l0", "l1"], ids, ["q-sea", "q-court"])


def test_for_query_shares_follow_the_planted_influence(tokenizer):
    texts, labels = planted_texts(10)
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=[str(i) for i in range(40)])
    result = _planted_result(labels)
    found = themes.for_query(result, train, 0, top_k=20, n_clusters=2)
    assert found.query_ids == ["q-sea"] and len(found.indices) == 20
    # the 10 sea texts carry 30 of the 31 units of positive influence in the top 20
    sea = found.labels[[labels[i] == "sea" for i in found.indices]]
    assert len(set(sea.tolist())) == 1
    assert found.shares[sea[0]] == pytest.approx(30 / 31)
    assert found.shares.sum() == pytest.approx(1.0)


def test_across_builds_a_query_by_theme_matrix(tokenizer):
    texts, labels = planted_texts(10)
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=[str(i) for i in range(40)])
    result = _planted_result(labels)
    found = themes.across(result, train, top_k=10, n_clusters=2)
    assert found.matrix.shape == (2, found.n_clusters)
    np.testing.assert_allclose(found.matrix.sum(axis=1), 1.0)
    # each query's top 10 is all one theme: all its influence lands in one cluster
    assert sorted(found.matrix.max(axis=1).tolist()) == [1.0, 1.0]
    assert found.matrix[0].argmax() != found.matrix[1].argmax()


def test_embedding_method_runs_the_model(tokenizer):
    from helpers.tiny_models import make_model

    texts, labels = planted_texts(5)
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=[str(i) for i in range(20)])
    model = make_model("gpt2", len(tokenizer))
    result = _planted_result(labels)
    found = themes.for_query(result, train, 0, top_k=12, method="embedding", model=model)
    assert found.method == "embedding" and len(found.labels) == 12
    vectors = themes.mean_hidden_states(model, train, found.indices[:3])
    assert vectors.shape == (3, model.config.n_embd) and np.isfinite(vectors).all()


def test_gradient_method_needs_the_store():
    result = ik.InfluenceResult(np.ones((1, 3, 1)), ["l"], ["a", "b", "c"], ["q"])
    with pytest.raises(ValueError, match="needs store="):
        themes.for_query(result, [], 0, method="gradient")


def test_gradient_method_reads_the_store_gram(tokenizer, tmp_path):
    """for_query(method="gradient") clusters by the cosine of the stored gradients of exactly
    the query's top sequences, and refuses a store whose ids are not the result's."""
    from helpers.tiny_models import make_model

    texts, _ = planted_texts(4)
    ids = [f"t{i}" for i in range(len(texts))]
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=ids)
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    store = ik.GradientStore.build(tmp_path / "g.h5", model, train, codec="dense", progress=False)
    result = ik.score(model, factors, [("The chef", " bakes bread.")], store, progress=False)
    found = themes.for_query(
        result, train, 0, top_k=10, method="gradient", n_clusters=3, store=store
    )
    expected = themes.cluster(
        [texts[i] for i in found.indices], "gradient", 3, gram=store.gram(found.indices.tolist())
    )
    np.testing.assert_array_equal(found.labels, expected.labels)
    assert found.shares.sum() == pytest.approx(1.0) or found.shares.sum() == 0.0
    other = ik.InfluenceResult(result.layer_scores, result.layers, ids[::-1], result.query_ids)
    with pytest.raises(ik.DataError, match="store's ids differ"):
        themes.for_query(other, train, 0, top_k=5, method="gradient", store=store)


# ---------------------------------------------------------------------------------------------
# method="influence": preconditioned training gradients


def test_influence_vectors_give_the_influence_of_one_sequence_on_another(tokenizer):
    """Dot products of influence vectors (unsketched) equal ``G_aᵀ (Ĝ + λI)⁻¹ G_b`` summed over
    layers, with ``G`` from autograd and ``Ĝ`` the dense EK-FAC matrix of the kit's factors."""
    from helpers.reference import float64_model, reference_pass

    model = float64_model("llama", tokenizer)
    texts, _ = planted_texts(2)
    train = ik.TextDataset.from_texts(texts, tokenizer, max_length=24)
    factors = ik.fit_factors(model, train, "mlp", dtype="float64", progress=False)
    vectors = themes.influence_vectors(model, factors, train, sketch=None, dtype="float64")
    damping = factors.damping_for(None)
    expected = np.zeros((len(train), len(train)))
    grads = [reference_pass(model, factors.modules, ex.input_ids) for ex in train]
    for name in factors.modules:
        layer = factors.layers[name]
        basis = torch.kron(layer.q_s, layer.q_a)  # vec(Q_S X Q_Aᵀ) = (Q_S ⊗ Q_A) vec(X)
        hessian = (basis * (layer.lam.flatten() + damping[name])) @ basis.T
        g = torch.stack([p[name].g.flatten() for p in grads])  # (n, d_out·d_in)
        expected += (g @ torch.linalg.solve(hessian, g.T)).numpy()
    np.testing.assert_allclose(
        vectors @ vectors.T, expected, rtol=1e-8, atol=1e-10 * abs(expected).max()
    )


def test_sketched_influence_vectors_are_unbiased(tokenizer):
    from helpers.tiny_models import make_model

    model = make_model("gpt2", len(tokenizer), dtype=torch.float64)
    texts, _ = planted_texts(1)
    train = ik.TextDataset.from_texts(texts, tokenizer, max_length=24)
    factors = ik.fit_factors(model, train, "mlp", dtype="float64", progress=False)
    exact = themes.influence_vectors(model, factors, train, sketch=None, dtype="float64")
    assert exact.shape[1] > 2 * 16 * 16  # these layers are larger than the sketch below
    sketched = [
        themes.influence_vectors(model, factors, train, sketch=16, seed=s, dtype="float64")
        for s in range(200)
    ]
    assert sketched[0].shape[1] == 2 * 2 * 16 * 16  # 2 blocks × 2 MLP layers × 16 × 16
    mean = np.mean([v @ v.T for v in sketched], axis=0)
    spread = np.std([v @ v.T for v in sketched], axis=0) / np.sqrt(len(sketched))
    truth = exact @ exact.T
    assert (np.abs(mean - truth) <= 4 * spread + 1e-9 * np.abs(truth).max()).all()


def test_for_query_by_influence(tokenizer):
    from helpers.tiny_models import make_model

    texts, labels = planted_texts(5)
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=[str(i) for i in range(20)])
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    result = _planted_result(labels)
    found = themes.for_query(
        result, train, 0, top_k=12, method="influence", model=model, factors=factors
    )
    assert found.method == "influence" and len(found.labels) == 12
    assert found.shares.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs factors= and model="):
        themes.for_query(result, train, 0, method="influence", model=model)


@pytest.fixture(scope="module")
def planted_fit(tokenizer):
    """12 planted texts (ids t0..t11), a tiny GPT-2 and its factors; tests only read them."""
    from helpers.tiny_models import make_model

    texts, _ = planted_texts(3)
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=[f"t{i}" for i in range(12)])
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    return texts, train, model, ik.fit_factors(model, train, "mlp", progress=False)


@pytest.mark.parametrize("codec", ["dense", "lowrank:16", "sparse"])
def test_stored_influence_vectors_equal_the_computed_ones(planted_fit, tmp_path, codec):
    """Read from a store that keeps whole gradients (dense, lowrank of a rank above the
    tokens', sparse keeping every entry in the factors' eigenbasis), the influence vectors
    are those computed with the model, sketch included."""
    texts, train, model, factors = planted_fit
    if codec == "sparse":  # as many entries as the largest layer has
        codec = f"sparse:{max(np.prod(layer.shape) for layer in factors.layers.values())}"
    store = ik.GradientStore.build(
        tmp_path / "g.h5", model, train, codec=codec, factors=factors, progress=False
    )
    computed = themes.influence_vectors(model, factors, train)
    stored = themes.stored_influence_vectors(store, factors, rows=5)  # blocks of rows
    assert stored.shape == computed.shape
    np.testing.assert_allclose(stored, computed, rtol=1e-4, atol=1e-5 * abs(computed).max())
    part = themes.stored_influence_vectors(store, factors, [7, 2])
    np.testing.assert_allclose(part, stored[[7, 2]], rtol=1e-12, atol=1e-12)
    found = themes.cluster(texts, "influence", store=store, factors=factors)
    expected = themes.cluster(texts, "influence", vectors=stored)
    np.testing.assert_array_equal(found.labels, expected.labels)


def test_influence_from_a_store_for_a_query_and_the_stores_that_cannot(planted_fit, tmp_path):
    texts, train, model, factors = planted_fit
    store = ik.GradientStore.build(tmp_path / "d.h5", model, train, codec="dense", progress=False)
    result = ik.score(model, factors, [("The chef", " bakes bread.")], store, progress=False)
    found = themes.for_query(
        result, train, 0, top_k=8, method="influence", store=store, factors=factors
    )
    vectors = themes.stored_influence_vectors(store, factors, found.indices)
    expected = themes.cluster([texts[i] for i in found.indices], "influence", vectors=vectors)
    np.testing.assert_array_equal(found.labels, expected.labels)
    projected = ik.GradientStore.build(
        tmp_path / "k.h5", model, train, codec="kron:4", progress=False
    )
    with pytest.raises(ik.ParameterError, match=r"cannot be preconditioned.*model="):
        themes.stored_influence_vectors(projected, factors)
    with pytest.raises(ik.ParameterError, match="indices must be 3 store rows"):
        themes.cluster(texts[:3], "influence", store=store, factors=factors)
    with pytest.raises(ik.ParameterError, match="needs factors="):
        themes.cluster(texts, "influence", store=store)
