"""Theme clustering measured: real corpora with known groups, and the shipped demo.

**Real corpora** (default; benchmarks/themes_corpora.py: Python library-reference paragraphs
by chapter, long; WordNet noun definitions by lexicographer file, short). Per corpus:

- per method, the k that ``themes.cluster`` chooses with ``n_clusters=None`` and the NMI
  against the labels there, the NMI told the true k, and the plain baseline told the true
  k (TF-IDF, LSA 50, k-means); the targets are automatic k at least 0.95x the baseline on
  both corpora and NMI >= 0.6 on the long paragraphs. Methods: ``tfidf``; with
  ``--embedding`` also the mean hidden states of the wide model's middle block
  (benchmarks/wide_model.py, trained on the Python documentation), alone and joined at
  half weight to the TF-IDF vectors;
- ``k-means + silhouette``: the kit's TF-IDF vectors clustered the simpler way, k-means
  with k by cosine silhouette (and told the true k), to show what the neighbour graph and
  its criterion change;
- ``supervised``: a ceiling, not a method: TF-IDF + logistic regression trained on the
  labels, 5-fold cross-validated. How far it stays below 1 says how separable the groups
  are by their words at all;
- the representation table: TF-IDF variants (raw term counts, no stop-word list, bigrams,
  words seen twice, other LSA dimensions, no LSA), each clustered by the kit, automatic
  and true k;
- last, the long-paragraph measurement repeated on ``--draws`` random sets of six
  chapters, so that the comparison does not rest on one choice of groups.

**Demo** (``--demo``): the shipped quotes against their ``theme`` labels, per method
(``tfidf``; ``gradient``, the cosine of the stored lowrank:8 gradients via ``store.gram``;
``embedding``, the shipped model's last-layer mean hidden state; ``influence``, training
gradients preconditioned by the demo's EK-FAC factors, ``themes.influence_vectors``,
sketched to 32 x 32 per layer, its seconds including computing them; ``influence
(store)``, the same from the demo store's lowrank:8 gradients,
``themes.stored_influence_vectors``), on three sets: the union of the 22 demo queries' top
50, every quote of four themes, and a seeded 600 of all twelve; with the agreement (NMI) of
the ``influence`` clusters with the ``tfidf`` and stored ones, the cosine between computed
and stored influence vectors, and the quality of the map (trustworthiness and spread of
the t-SNE layout against the principal plane, per query's themes and per set).

Usage:
    apt-get install python3.11-doc wordnet-base
    python benchmarks/themes.py               # real corpora; about 4 minutes on 2 cores
    python benchmarks/themes.py --embedding   # adds the wide model's hidden states
    python benchmarks/themes.py --demo        # shipped demo, small model (about 4 minutes)
    python benchmarks/themes.py --demo --model large
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics import normalized_mutual_info_score as nmi
from threadpoolctl import threadpool_limits
from transformers.utils import logging as hf_logging

import influencekit as ik
from influencekit import themes
from influencekit.demo.pipeline import run_demo

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package
import themes_corpora as corpora

DISTINCT = ("computers", "food", "law", "sports")


def text_sets(run, rng) -> dict[str, np.ndarray]:
    """Training indices of each set (the demo dataset is the whole corpus, in store order)."""
    union = sorted({i for q in range(len(run.queries)) for i, _ in run.result.top(q, 50)})
    theme = np.array([ex.metadata["theme"] for ex in run.train])
    distinct = np.flatnonzero(np.isin(theme, DISTINCT))
    sample = np.sort(rng.choice(len(run.train), 600, replace=False))
    return {"top-50 union": np.array(union), "4 themes": distinct, "all themes": sample}


def supervised_ceiling(texts: list[str], truth: list[str]) -> np.ndarray:
    """Cross-validated theme predictions of a TF-IDF + logistic regression classifier."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline

    classifier = make_pipeline(
        TfidfVectorizer(stop_words="english", sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=10),
    )
    folds = min(5, min(truth.count(t) for t in set(truth)))
    return cross_val_predict(classifier, texts, truth, cv=max(2, folds))


def demo(args) -> None:
    """The shipped quotes against their themes, per method (``--demo``)."""
    run = run_demo(args.out / args.model, size=args.model, log=lambda _: None)
    from influencekit import Factors, GradientStore, demo

    store = GradientStore.open(run.paths["store"])
    model, _ = demo.load_demo_model(args.model, device="cpu")
    factors = Factors.load(run.paths["factors"])
    sets = text_sets(run, np.random.default_rng(0))
    print(f"model {args.model}; NMI / ARI against the quotes' themes; k chosen -> clusters found")
    print(
        f"{'set':<14}{'n':>5}{'themes':>7}  {'method':<18}{'k':<7}{'found':>6}"
        f"{'NMI':>7}{'ARI':>7}{'seconds':>9}"
    )
    for name, indices in sets.items():
        texts = [run.train[i].text for i in indices]
        truth = [run.train[i].metadata["theme"] for i in indices]
        n_themes = len(set(truth))
        inputs = {
            "tfidf": {},
            "gradient": {"gram": store.gram(indices.tolist())},
            "embedding": {"vectors": themes.mean_hidden_states(model, run.train, indices)},
        }
        prepare = {}
        started = time.perf_counter()
        vectors = themes.influence_vectors(model, factors, run.train, indices)
        inputs["influence"] = {"vectors": vectors}
        prepare["influence"] = time.perf_counter() - started
        started = time.perf_counter()
        stored = themes.stored_influence_vectors(store, factors, indices)
        inputs["influence (store)"] = {"vectors": stored}
        prepare["influence (store)"] = time.perf_counter() - started
        found_at = {}
        for label, given in inputs.items():
            method = label.split()[0]
            for k_name, k in (("auto", None), ("themes", n_themes)):
                started = time.perf_counter()
                found = themes.cluster(texts, method, k, **given)
                seconds = time.perf_counter() - started + prepare.get(label, 0.0)
                found_at[label, k_name] = found.labels
                nmi = normalized_mutual_info_score(truth, found.labels)
                print(
                    f"{name:<14}{len(indices):>5}{n_themes:>7}  {label:<18}{k_name:<7}"
                    f"{found.n_clusters:>6}{nmi:>7.3f}"
                    f"{adjusted_rand_score(truth, found.labels):>7.3f}{seconds:>9.1f}"
                )
        for k_name in ("auto", "themes"):
            for other in ("tfidf", "influence (store)"):
                agree = normalized_mutual_info_score(
                    found_at["influence", k_name], found_at[other, k_name]
                )
                print(f"{name:<14}{'':>12}  influence vs {other} clusters (k={k_name}): "
                      f"NMI {agree:.3f}")  # fmt: skip
        cosine = np.sum(_unit(vectors) * _unit(stored), axis=1)
        print(f"{name:<14}{'':>12}  influence vectors, stored vs computed: median cosine "
              f"{np.median(cosine):.3f} (min {cosine.min():.3f})")  # fmt: skip
        predicted = supervised_ceiling(texts, truth)
        print(
            f"{name:<14}{len(indices):>5}{n_themes:>7}  {'supervised':<18}{'5-fold':<7}{'':>6}"
            f"{normalized_mutual_info_score(truth, predicted):>7.3f}"
            f"{adjusted_rand_score(truth, predicted):>7.3f}"
        )
    per_query = [[run.train[i].text for i in found.indices] for found in run.themes]
    print_map_quality(
        {
            f"per query ({len(per_query)}, median)": per_query,
            **{name: [[run.train[i].text for i in indices]] for name, indices in sets.items()},
        }
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)


def map_quality(texts: list[str]) -> dict[str, tuple[float, float]]:
    """Per map (the kit's t-SNE layout, and the principal plane it replaced, both robustly
    scaled): its trustworthiness (how many of each point's 10 nearest neighbours on the map
    are near in the TF-IDF space, 1 = all) and its spread (the middle half of the points'
    extent over the whole map's, the smaller of the two axes; near 0 = squeezed)."""
    from sklearn.manifold import trustworthiness

    units = themes.vectors.unit_vectors(texts, "tfidf", None, None, 0)
    layout = themes.clustering
    maps = {
        "t-SNE": layout.plane(units),
        "principal plane": layout.robust_scale(layout.principal_axes(units)),
    }
    found = {}
    for name, plane in maps.items():
        low, high = np.percentile(plane, [25, 75], axis=0)
        spread = float(np.min((high - low) / np.ptp(plane, axis=0)))
        neighbours = min(10, len(units) // 2 - 1)
        trust = trustworthiness(units, plane, n_neighbors=neighbours, metric="cosine")
        found[name] = (trust, spread)
    return found


def print_map_quality(sets: dict[str, list[str]]) -> None:
    """``map_quality`` of each set of texts; sets of many small lists give medians."""
    print("\nthe map of tfidf themes: trustworthiness (10 neighbours) and spread (middle half)")
    print(f"{'set':<28}{'map':<17}{'trust':>7}{'spread':>8}")
    for name, groups in sets.items():
        measured = [map_quality(texts) for texts in groups]
        for layout in measured[0]:
            trust = np.median([m[layout][0] for m in measured])
            spread = np.median([m[layout][1] for m in measured])
            print(f"{name:<28}{layout:<17}{trust:>7.3f}{spread:>8.3f}")


def silhouette_kmeans(units: np.ndarray, ceiling: int, k_true: int) -> tuple[np.ndarray, ...]:
    """K-means on ``units``: with k in 2..ceiling chosen by cosine silhouette, and told
    ``k_true``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    found = {
        k: KMeans(k, n_init=10, random_state=corpora.SEED).fit_predict(units)
        for k in range(2, max(ceiling, k_true) + 1)
    }
    chosen = max(
        range(2, ceiling + 1), key=lambda k: silhouette_score(units, found[k], metric="cosine")
    )
    return found[chosen], found[k_true]


def tfidf_variants(texts: list[str]) -> dict[str, np.ndarray]:
    """The kit's TF-IDF vectors and variations of one setting each."""

    def lsa(dims: int = 100, **changes) -> np.ndarray:
        settings = {"stop_words": "english", "token_pattern": themes.WORD, "sublinear_tf": True,
                    "preprocessor": themes.plain_text}  # fmt: skip
        matrix = TfidfVectorizer(**{**settings, **changes}).fit_transform(texts)
        if dims is None:
            return matrix.toarray()
        return TruncatedSVD(dims, random_state=corpora.SEED).fit_transform(matrix)

    return {
        "kit: log tf, stop words, LSA 100": lsa(),
        "raw term counts": lsa(sublinear_tf=False),
        "no stop-word list": lsa(stop_words=None),
        "words and bigrams": lsa(ngram_range=(1, 2)),
        "words seen twice": lsa(min_df=2),
        "LSA 30": lsa(30),
        "LSA 300": lsa(300),
        "no LSA": lsa(None),
    }


def wide_model_states(texts: list[str]) -> np.ndarray:
    """Mean hidden states of the wide model's middle block (benchmarks/wide_model.py)."""
    folder = Path(os.environ.get("INFLUENCEKIT_CACHE", Path.home() / ".cache" / "influencekit"))
    folder = folder / "wide-model"
    if not folder.is_dir():
        sys.exit(f"{folder}: no wide model; build it with python benchmarks/wide_model.py")
    model, tokenizer = ik.load_model(folder, device="cpu")
    data = ik.TextDataset.from_texts(texts, tokenizer, max_length=128)
    return themes.mean_hidden_states(model, data, layer=model.config.num_hidden_layers // 2)


def real_corpora(args) -> None:
    """Real text with known groups: automatic k against the baseline told k, per method."""
    from sklearn.preprocessing import normalize

    loaders = {
        "pydoc (long)": corpora.pydoc_paragraphs,
        "wordnet (short)": corpora.wordnet_definitions,
    }
    found_texts = {name: load() for name, load in loaders.items()}
    print(f"{'corpus':<17}{'n':>5}{'k':>3}  {'method':<24}{'auto k':>7}{'NMI auto':>9}"
          f"{'NMI @k':>8}{'base @k':>8}{'auto/base':>10}")  # fmt: skip
    variants = {}
    for name, (texts, labels) in found_texts.items():
        k = len(set(labels))
        base = nmi(labels, corpora.baseline(texts, k))
        methods = {"tfidf": ("tfidf", {})}
        if args.embedding:
            states = wide_model_states(texts)
            units = normalize(themes.vectors.tfidf_vectors(texts, corpora.SEED))
            joined = np.hstack([units, 0.5 * normalize(states - states.mean(axis=0))])
            methods["embedding (wide)"] = ("embedding", {"vectors": states})
            methods["tfidf + embedding"] = ("embedding", {"vectors": joined})
        row = f"{name:<17}{len(texts):>5}{k:>3}  "
        for label, (method, given) in methods.items():
            auto = themes.cluster(texts, method, **given)
            told = themes.cluster(texts, method, k, **given)
            found = nmi(labels, auto.labels)
            print(f"{row}{label:<24}{auto.n_clusters:>7}{found:>9.3f}"
                  f"{nmi(labels, told.labels):>8.3f}{base:>8.3f}{found / base:>9.2f}x")  # fmt: skip
        units = normalize(themes.vectors.tfidf_vectors(texts, corpora.SEED))
        by_silhouette, told_k = silhouette_kmeans(units, themes.ceiling(len(texts)), k)
        found = nmi(labels, by_silhouette)
        print(f"{row}{'k-means + silhouette':<24}{by_silhouette.max() + 1:>7}{found:>9.3f}"
              f"{nmi(labels, told_k):>8.3f}{base:>8.3f}{found / base:>9.2f}x")  # fmt: skip
        ceiling = nmi(labels, supervised_ceiling(texts, labels))
        print(f"{row}{'supervised (5-fold)':<24}{'':>7}{'':>9}{ceiling:>8.3f}")
        variants[name] = tfidf_variants(texts)
    print(
        "\nrepresentations, each clustered by the kit: NMI with automatic k (k) and at the true k"
    )
    print(f"{'representation':<34}" + "".join(f"{name:>24}" for name in found_texts))
    for variant in variants[next(iter(variants))]:
        cells = []
        for name, (texts, labels) in found_texts.items():
            vectors = variants[name][variant]
            auto = themes.cluster(texts, "embedding", vectors=vectors)
            told = themes.cluster(texts, "embedding", len(set(labels)), vectors=vectors)
            found, at_k = nmi(labels, auto.labels), nmi(labels, told.labels)
            cells.append(f"{found:.3f} ({auto.n_clusters:>2}) {at_k:.3f}")
        print(f"{variant:<34}" + "".join(f"{cell:>24}" for cell in cells))
    print("\ntargets: auto/base >= 0.95 on both corpora; NMI auto >= 0.6 on the long paragraphs")


def chapter_draws(draws: int, per_draw: int = 6, min_group: int = 50) -> None:
    """The long-paragraph measurement repeated on random sets of library chapters: whether
    the kit's lead over the baseline holds beyond the chapters chosen for the main table."""
    import random

    chapters = corpora.library_chapters()
    rng = random.Random(corpora.SEED + 1)
    print(f"\n{draws} random draws of {per_draw} library-reference chapters "
          f"(each with >= {min_group} long paragraphs)")  # fmt: skip
    print(f"{'chapters':<66}{'n':>5}{'auto k':>7}{'NMI auto':>9}{'base @k':>8}{'auto/base':>10}")
    ratios = []
    while len(ratios) < draws:
        chosen = tuple(sorted(rng.sample(chapters, per_draw)))
        texts, labels = corpora.pydoc_paragraphs(chapters=chosen)
        if min(labels.count(c) for c in chosen) < min_group:
            continue  # a chapter too small to be a theme; draw again
        base = nmi(labels, corpora.baseline(texts, per_draw))
        auto = themes.cluster(texts)
        found = nmi(labels, auto.labels)
        ratios.append(found / base)
        print(f"{' '.join(chosen):<66}{len(texts):>5}{auto.n_clusters:>7}{found:>9.3f}"
              f"{base:>8.3f}{found / base:>9.2f}x")  # fmt: skip
    print(f"auto/base over the draws: min {min(ratios):.2f}x, median {np.median(ratios):.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="the shipped demo, not real corpora")
    parser.add_argument("--embedding", action="store_true", help="add the wide model's states")
    parser.add_argument("--draws", type=int, default=6, help="random chapter sets (0: none)")
    parser.add_argument("--model", choices=["small", "large"], default="small")
    parser.add_argument("--out", type=Path, default=Path("benchmarks-demo"))
    args = parser.parse_args(argv)
    os.environ["INFLUENCEKIT_PROGRESS"] = "0"
    hf_logging.disable_progress_bar()
    with threadpool_limits(limits=1):
        if args.demo:
            demo(args)
        else:
            real_corpora(args)
            chapter_draws(args.draws)


if __name__ == "__main__":
    main()
