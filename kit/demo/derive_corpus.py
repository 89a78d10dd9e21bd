"""Derive the demo corpus from Debian's ``fortunes`` collection (run once; the output ships).

    apt-get install fortunes
    python -m influencekit.demo.derive_corpus            # writes kit/demo/data/fortunes.jsonl.gz

Each fortune file holds quotes separated by lines of a single ``%``. The file a quote comes
from is its ``theme``: the ground truth the theme clustering is measured against. Quotes are
freed of terminal control codes (backspace overstrikes, bells), whitespace-normalised, kept
when between ``MIN_CHARS`` and ``MAX_CHARS`` long (so one fits in the demo's 128-token
window), de-duplicated across themes, and sampled to at most ``PER_THEME`` per theme with a
fixed seed, so the output is the same on every run.

Example:
    >>> split_fortunes("one\\n%\\ntwo  lines\\n here\\n%\\n")
    ['one', 'two lines here']
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import unicodedata
from pathlib import Path

from ..errors import MissingFileError

# The corpus's 12 themes: distinct subjects, each a whole fortune file.
THEMES = (
    "computers",
    "science",
    "politics",
    "work",
    "law",
    "food",
    "education",
    "love",
    "sports",
    "medicine",
    "literature",
    "songs-poems",
)
MIN_CHARS, MAX_CHARS, PER_THEME, SEED = 30, 360, 320, 0
BACKSPACE = "\x08"
DEFAULT_SRC = Path("/usr/share/games/fortunes")
DEFAULT_OUT = Path(__file__).parent / "data" / "fortunes.jsonl.gz"


def split_fortunes(raw: str) -> list[str]:
    """The quotes of one fortune file, terminal control codes removed (:func:`plain_text`)
    and whitespace runs collapsed to one space."""
    quotes = re.split(r"^%$", raw, flags=re.M)
    quotes = (re.sub(r"\s+", " ", plain_text(q)).strip() for q in quotes)
    return [q for q in quotes if q]


def plain_text(text: str) -> str:
    """``text`` as a page shows it: a character struck over another with a backspace
    (``_<BS>I`` underlines I, ``I<BS>I`` bolds it) is the character struck last, and every
    other control character but whitespace is dropped.

    Example:
        >>> plain_text("an _\\x08I and a B\\x08Bold \\x07bell")
        'an I and a Bold bell'
    """
    while BACKSPACE in text:
        struck = re.sub(f"[^{BACKSPACE}]{BACKSPACE}", "", text)
        if struck == text:  # backspaces with nothing before them to strike
            struck = text.replace(BACKSPACE, "")
        text = struck
    return "".join(c for c in text if c.isspace() or unicodedata.category(c) != "Cc")


def theme_records(src: Path, theme: str, seen: set[str]) -> list[dict]:
    """Up to ``PER_THEME`` records of one theme, in file order, skipping texts in ``seen``."""
    path = src / f"{theme}.u8" if (src / f"{theme}.u8").exists() else src / theme
    if not path.exists():
        raise MissingFileError(f"{path}: no fortune file for theme {theme!r}")
    kept = []
    for n, text in enumerate(split_fortunes(path.read_text(encoding="utf-8", errors="replace"))):
        if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            kept.append({"id": f"{theme}-{n:04d}", "text": text, "theme": theme})
    if len(kept) > PER_THEME:
        picked = sorted(random.Random(f"{SEED}:{theme}").sample(range(len(kept)), PER_THEME))
        kept = [kept[i] for i in picked]
    return kept


def derive(src: Path = DEFAULT_SRC, out: Path = DEFAULT_OUT) -> list[dict]:
    """Write the corpus as gzip'd JSONL (mtime 0, so the bytes are reproducible)."""
    seen: set[str] = set()
    records = [r for theme in THEMES for r in theme_records(src, theme, seen)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="fortune files folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    records = derive(args.src, args.out)
    counts = {t: sum(r["theme"] == t for r in records) for t in THEMES}
    print(f"wrote {len(records)} quotes to {args.out}: {counts}")


if __name__ == "__main__":
    main()
