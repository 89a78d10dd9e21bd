"""The demo's built-in queries: facts from the corpus, their paraphrases and word-order flips,
and prompts that cross two themes.

Each query is a dict ready for :func:`influencekit.as_queries`. Besides ``id``, ``prompt`` and
``completion`` it carries (as ``Query.metadata``) its ``kind`` (``fact``, ``paraphrase``,
``flip``, ``cross``), the ``theme`` or themes it belongs to, and for ``fact``/``paraphrase``/
``flip`` the ``source`` id of the corpus quote it restates. The grouping lets a reader see the
paper's finding for themselves: the verbatim fact finds its source quote; a paraphrase or a
flip with little token overlap, in a model this small, mostly does not.

Example:
    >>> len(QUERIES), sorted({q["kind"] for q in QUERIES})
    (22, ['cross', 'fact', 'flip', 'paraphrase'])
"""

from __future__ import annotations


def _q(qid, prompt, completion, kind, theme, source=None) -> dict:
    query = {"id": qid, "prompt": prompt, "completion": completion, "kind": kind, "theme": theme}
    if source is not None:
        query["source"] = source
    return query


QUERIES: list[dict] = [
    _q(
        "cs-fact",
        "A computer scientist is someone who",
        " fixes things that aren't broken.",
        "fact",
        "computers",
        "computers-0013",
    ),
    _q(
        "cs-para",
        "Someone who repairs what was never broken is called",
        " a computer scientist.",
        "paraphrase",
        "computers",
        "computers-0013",
    ),
    _q(
        "cs-flip",
        "Fixing things that aren't broken is what",
        " a computer scientist does.",
        "flip",
        "computers",
        "computers-0013",
    ),
    _q(
        "bath-fact",
        "The state law of Pennsylvania prohibits",
        " singing in the bathtub.",
        "fact",
        "law",
        "law-0183",
    ),
    _q(
        "bath-para",
        "In Pennsylvania it is against the law to",
        " sing while taking a bath.",
        "paraphrase",
        "law",
        "law-0183",
    ),
    _q(
        "bath-flip",
        "Singing in the bathtub is prohibited by",
        " the state law of Pennsylvania.",
        "flip",
        "law",
        "law-0183",
    ),
    _q(
        "truth-fact",
        "When in doubt,",
        " tell the truth. -- Mark Twain",
        "fact",
        "literature",
        "literature-0235",
    ),
    _q(
        "truth-para",
        "If you are unsure what to say, Mark Twain advises you to",
        " be honest.",
        "paraphrase",
        "literature",
        "literature-0235",
    ),
    _q("cats-fact", "Radioactive cats have", " 18 half-lives.", "fact", "science", "science-0382"),
    _q(
        "cats-flip",
        "Eighteen half-lives belong to",
        " radioactive cats.",
        "flip",
        "science",
        "science-0382",
    ),
    _q(
        "tennis-fact", "Love means nothing to", " a tennis player.", "fact", "sports", "sports-0084"
    ),
    _q(
        "tennis-flip",
        "To a tennis player, love means",
        " nothing.",
        "flip",
        "sports",
        "sports-0084",
    ),
    _q("teach-fact", "To teach is", " to learn twice.", "fact", "education", "education-0176"),
    _q(
        "teach-para",
        "Teaching something means learning it",
        " two times over.",
        "paraphrase",
        "education",
        "education-0176",
    ),
    _q(
        "medicine-fact",
        "Sometimes the best medicine is",
        " to stop taking something.",
        "fact",
        "medicine",
        "medicine-0058",
    ),
    _q("toast-fact", "If your bread is stale,", " make toast.", "fact", "food", "food-0083"),
    _q(
        "vote-fact",
        "Don't vote --",
        " it only encourages them!",
        "fact",
        "politics",
        "politics-0104",
    ),
    _q(
        "standards-fact",
        "If all else fails,",
        " lower your standards.",
        "fact",
        "work",
        "work-0168",
    ),
    # Cross-theme prompts: no single source; influence should come from both themes.
    _q(
        "lawyer-program",
        "The lawyer wrote a computer program",
        " and the judge found a bug.",
        "cross",
        ["law", "computers"],
    ),
    _q(
        "doctor-lunch",
        "The doctor told his patients to eat",
        " less bread and more vegetables.",
        "cross",
        ["medicine", "food"],
    ),
    _q(
        "teacher-vote",
        "The teacher asked the class to vote",
        " for the next president.",
        "cross",
        ["education", "politics"],
    ),
    _q(
        "love-song",
        "She wrote a love song",
        " about the football game.",
        "cross",
        ["love", "songs-poems", "sports"],
    ),
]
