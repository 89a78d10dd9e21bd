"""Theme clustering on real text with known groups: does ``themes.cluster`` find them?

(benchmarks/themes.py measures the same on the shipped fortunes and the demo's results.)

Two real corpora from Debian packages, each with its own labels (not the shipped fortunes):

- ``pydoc`` (long paragraphs): paragraphs of at least 250 characters from the Python 3.11
  library reference (``python3.11-doc``), labelled by the reference's chapter of the module
  page they come from: numeric and mathematical modules, file and directory access,
  internet protocols, structured markup, Tk, concurrent execution; up to 150 per chapter.
- ``wordnet`` (short texts): WordNet 3.0 noun definitions (``wordnet-base``), labelled by
  their lexicographer file: animal, body, food, plant, substance, time; 200 each.

Per corpus and method: the k that ``cluster`` chooses with ``n_clusters=None`` and the NMI
against the labels there, the NMI told the true k, and a plain baseline told the true k
(TF-IDF with English stop words, LSA to 50 dimensions, unit rows, k-means with 10 starts).
The targets: automatic k at least 0.95× the baseline on both corpora, and NMI ≥ 0.6 on the
long paragraphs.

Usage:
    apt-get install python3.11-doc wordnet-base
    python benchmarks/themes_corpora.py              # tfidf; about a minute on 2 CPU cores
    python benchmarks/themes_corpora.py --embedding  # adds the wide model's hidden states
                                                     # (benchmarks/wide_model.py, cached)
"""

from __future__ import annotations

import argparse
import html
import random
import re
import sys
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import normalized_mutual_info_score as nmi
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

import influencekit as ik

WORDNET = Path("/usr/share/wordnet/data.noun")
LEXICOGRAPHER_FILES = {5: "animal", 8: "body", 13: "food", 20: "plant", 27: "substance", 28: "time"}
PYDOC = Path("/usr/share/doc/python3.11/html/library")
CHAPTERS = ("numeric", "filesys", "internet", "markup", "tk", "concurrency")
SEED = 0


def wordnet_definitions(per_group: int = 200) -> tuple[list[str], list[str]]:
    """Noun definitions (the gloss before its examples) of six lexicographer files."""
    groups: dict[str, set[str]] = {name: set() for name in LEXICOGRAPHER_FILES.values()}
    for line in WORDNET.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # the licence header
        group = LEXICOGRAPHER_FILES.get(int(line.split(" ", 2)[1]))
        gloss = re.split(r';\s*"', line.split("|", 1)[1].strip())[0].strip(" ;")
        if group and len(gloss.split()) >= 3:
            groups[group].add(gloss)
    return _sampled(groups, per_group)


def pydoc_paragraphs(per_group: int = 150, min_chars: int = 250) -> tuple[list[str], list[str]]:
    """Long paragraphs of the module pages of six library-reference chapters."""
    groups: dict[str, set[str]] = {}
    for chapter in CHAPTERS:
        contents = (PYDOC / f"{chapter}.html").read_text(encoding="utf-8")
        contents = contents.split('class="toctree-wrapper', 1)[1]
        pages = sorted(set(re.findall(r'href="([a-z_.0-9]+)\.html"', contents)) - {chapter})
        found = set()
        for page in pages:
            path = PYDOC / f"{page}.html"
            if not path.exists():
                continue
            for raw in re.findall(r"<p>(.*?)</p>", path.read_text(encoding="utf-8"), re.S):
                text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", raw))).strip()
                if len(text) >= min_chars:
                    found.add(text)
        groups[chapter] = found
    return _sampled(groups, per_group)


def _sampled(groups: dict[str, set[str]], per_group: int) -> tuple[list[str], list[str]]:
    rng = random.Random(SEED)
    texts, labels = [], []
    for name, items in groups.items():
        for text in rng.sample(sorted(items), min(per_group, len(items))):
            texts.append(text)
            labels.append(name)
    return texts, labels


def baseline(texts: list[str], k: int) -> np.ndarray:
    """TF-IDF (English stop words), LSA to 50 dimensions, unit rows, k-means told k."""
    matrix = TfidfVectorizer(stop_words="english").fit_transform(texts)
    reduced = normalize(TruncatedSVD(50, random_state=SEED).fit_transform(matrix))
    return KMeans(k, n_init=10, random_state=SEED).fit_predict(reduced)


def embeddings(texts: list[str]) -> np.ndarray:
    """Mean hidden states of the wide model's middle block (benchmarks/wide_model.py)."""
    import torch

    folder = Path.home() / ".cache" / "influencekit" / "wide-model"
    if not folder.is_dir():
        sys.exit(f"{folder}: no wide model; build it with python benchmarks/wide_model.py")
    model, tokenizer = ik.load_model(folder, device="cpu")
    data = ik.TextDataset.from_texts(texts, tokenizer, max_length=128)
    layer = model.config.num_hidden_layers // 2
    with torch.no_grad():
        return ik.themes.mean_hidden_states(model, data, layer=layer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedding", action="store_true", help="also the wide model's states")
    args = parser.parse_args(argv)
    corpora = {
        "pydoc (long paragraphs)": pydoc_paragraphs,
        "wordnet (short texts)": wordnet_definitions,
    }
    print(f"{'corpus':<26} {'method':<10} {'n':>5} {'k':>3} {'auto k':>7} {'NMI auto':>9} "
          f"{'NMI @k':>7} {'baseline @k':>12} {'auto/base':>10}")  # fmt: skip
    for name, load in corpora.items():
        texts, labels = load()
        truth = np.unique(labels, return_inverse=True)[1]
        k = len(set(labels))
        with threadpool_limits(limits=1):
            base = nmi(truth, baseline(texts, k))
        methods = {"tfidf": {}}
        if args.embedding:
            methods["embedding"] = {"vectors": embeddings(texts)}
        for method, given in methods.items():
            auto = ik.themes.cluster(texts, method, seed=SEED, **given)
            told = ik.themes.cluster(texts, method, k, seed=SEED, **given)
            found = nmi(truth, auto.labels)
            print(
                f"{name:<26} {method:<10} {len(texts):>5} {k:>3} {auto.n_clusters:>7} "
                f"{found:>9.3f} {nmi(truth, told.labels):>7.3f} {base:>12.3f} "
                f"{found / base:>9.2f}x"
            )
    print("\ntargets: auto/base >= 0.95 on both corpora; NMI auto >= 0.6 on the long paragraphs")


if __name__ == "__main__":
    main()
