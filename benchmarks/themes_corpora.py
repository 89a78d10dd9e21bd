"""Real corpora with known groups, for benchmarks/themes.py (no fortunes: real text, real
labels, from Debian packages).

- ``pydoc`` (long paragraphs): paragraphs of at least 250 characters from the Python 3.11
  library reference (``python3.11-doc``), labelled by the reference's chapter of the module
  page they come from: numeric and mathematical modules, file and directory access,
  internet protocols, structured markup, Tk, concurrent execution; up to 150 per chapter.
- ``wordnet`` (short texts): WordNet 3.0 noun definitions (``wordnet-base``), labelled by
  their lexicographer file: animal, body, food, plant, substance, time; 200 each.

``baseline`` is the plain method the kit must beat: TF-IDF with English stop words, LSA to
50 dimensions, unit rows, k-means told the true k.

Example:
    >>> texts, labels = wordnet_definitions(per_group=2)   # doctest: +SKIP
    >>> sorted(set(labels))                                # doctest: +SKIP
    ['animal', 'body', 'food', 'plant', 'substance', 'time']
"""

from __future__ import annotations

import html
import random
import re
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

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


def library_chapters() -> list[str]:
    """Every chapter of the library reference that lists module pages, in its order."""
    index = (PYDOC / "index.html").read_text(encoding="utf-8")
    names = dict.fromkeys(re.findall(r'href="([a-z]+)\.html"', index))
    return [
        name
        for name in names
        if (PYDOC / f"{name}.html").exists()
        and 'class="toctree-wrapper' in (PYDOC / f"{name}.html").read_text(encoding="utf-8")
    ]


def pydoc_paragraphs(
    per_group: int = 150, min_chars: int = 250, chapters: tuple[str, ...] = CHAPTERS
) -> tuple[list[str], list[str]]:
    """Long paragraphs of the module pages of the library-reference ``chapters``."""
    groups: dict[str, set[str]] = {}
    for chapter in chapters:
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
