"""Theme clustering against the shipped corpus's theme labels: NMI and ARI per method.

Clusters three sets of demo quotes with each method of ``influencekit.themes.cluster`` and
compares the clusters with the ground-truth ``theme`` of each quote:

- ``top-50 union``: the union of the 22 demo queries' 50 most influential quotes (from the
  demo's result, reused or computed by ``run_demo``);
- ``4 themes``: every quote of computers, food, law and sports;
- ``all themes``: a seeded sample of 600 quotes from all 12 themes.

Methods: ``tfidf`` (words), ``gradient`` (cosine of the stored lowrank:8 gradients, read with
``store.gram``: the demo store holds the whole corpus), ``embedding`` (mean last-layer
hidden state of the shipped model), ``influence`` (the quotes' training gradients
preconditioned by the demo's EK-FAC factors, ``themes.influence_vectors``, sketched to 32 × 32
per layer; its seconds include computing them), and the agreement (NMI) of the
``influence`` clusters with the ``tfidf`` ones.
``k=auto`` picks k by silhouette; ``k=themes`` gives the true number of themes.

A last row per set, ``supervised``, is a ceiling rather than a method: a TF-IDF + logistic
regression classifier trained on the theme labels, scored by 5-fold cross-validation. When
even it reaches only a low NMI, the themes are not separable by vocabulary, and no
unsupervised word-based clustering can do better.

Usage:
    python benchmarks/themes.py                 # small model (about 2 minutes with the demo)
    python benchmarks/themes.py --model large
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from transformers.utils import logging as hf_logging

from influencekit import themes
from influencekit.demo.pipeline import run_demo

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["small", "large"], default="small")
    parser.add_argument("--out", type=Path, default=Path("benchmarks-demo"))
    args = parser.parse_args(argv)
    os.environ["INFLUENCEKIT_PROGRESS"] = "0"
    hf_logging.disable_progress_bar()
    run = run_demo(args.out / args.model, size=args.model, log=lambda _: None)
    from influencekit import Factors, GradientStore, demo

    store = GradientStore.open(run.paths["store"])
    model, _ = demo.load_demo_model(args.model, device="cpu")
    factors = Factors.load(run.paths["factors"])
    sets = text_sets(run, np.random.default_rng(0))
    print(f"model {args.model}; NMI / ARI against the quotes' themes; k chosen -> clusters found")
    print(
        f"{'set':<14}{'n':>5}{'themes':>7}  {'method':<11}{'k':<7}{'found':>6}"
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
        started = time.perf_counter()
        vectors = themes.influence_vectors(model, factors, run.train, indices)
        inputs["influence"] = {"vectors": vectors}
        prepare = {"influence": time.perf_counter() - started}
        found_at = {}
        for method, given in inputs.items():
            for k_name, k in (("auto", None), ("themes", n_themes)):
                started = time.perf_counter()
                found = themes.cluster(texts, method, k, **given)
                seconds = time.perf_counter() - started + prepare.get(method, 0.0)
                found_at[method, k_name] = found.labels
                nmi = normalized_mutual_info_score(truth, found.labels)
                print(
                    f"{name:<14}{len(indices):>5}{n_themes:>7}  {method:<11}{k_name:<7}"
                    f"{found.n_clusters:>6}{nmi:>7.3f}"
                    f"{adjusted_rand_score(truth, found.labels):>7.3f}{seconds:>9.1f}"
                )
        for k_name in ("auto", "themes"):
            agree = normalized_mutual_info_score(
                found_at["influence", k_name], found_at["tfidf", k_name]
            )
            print(f"{name:<14}{'':>12}  influence vs tfidf clusters (k={k_name}): NMI {agree:.3f}")
        predicted = supervised_ceiling(texts, truth)
        print(
            f"{name:<14}{len(indices):>5}{n_themes:>7}  {'supervised':<11}{'5-fold':<7}{'':>6}"
            f"{normalized_mutual_info_score(truth, predicted):>7.3f}"
            f"{adjusted_rand_score(truth, predicted):>7.3f}"
        )


if __name__ == "__main__":
    main()
