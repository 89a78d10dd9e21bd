"""The validation setting: a small GPT-2 trained from scratch on a slice of the shipped corpus.

Small enough to retrain hundreds of times on a laptop CPU (a half-subset run takes a few
seconds), real enough to have themes: :data:`N_TRAIN` quotes, an even share of
:data:`THEMES` from the demo corpus (``influencekit.demo``), a byte-level BPE of
:data:`VOCAB_SIZE` tokens trained on them, and :data:`N_QUERIES` held-out quotes of the same
themes split into prompt and completion. :class:`Recipe` is the training recipe, a callable
``recipe(dataset, seed) -> model`` ready for :func:`~influencekit.validate.lds.retrain`.

Example:
    >>> setting = load_setting()
    >>> len(setting.train), len(setting.queries)
    (256, 16)
    >>> Recipe().settings()["epochs"]
    20
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..data import Query, TextDataset
from ..demo.corpus import even_sample, load_records
from ..tiny import build_tokenizer
from ..training import Checkpoint, new_gpt2, train_lm

THEMES = ("computers", "food", "sports", "love")
N_TRAIN = 256  # 64 quotes per theme
N_QUERIES = 16  # 4 held-out quotes per theme
MAX_LENGTH = 64
VOCAB_SIZE = 512
QUERY_WORDS = 8  # held-out quotes of at least this many words ...
QUERY_TOKENS = 48  # ... and at most this many tokens make the queries
# The shipped retraining measurements (benchmarks/validate.py --part lds writes them): 64
# half-subsets x 4 seeds of Recipe() on load_setting(), so the LDS of new scores needs no
# retraining. Load with Retraining.load(SHIPPED_RUNS).
SHIPPED_RUNS = Path(__file__).parent / "data" / "lds_runs.h5"


@dataclass(frozen=True)
class Recipe:
    """How the validation model is trained: GPT-2 shape and optimiser schedule.

    Example:
        >>> Recipe(epochs=2).settings()["n_embd"]
        64
    """

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = MAX_LENGTH
    epochs: int = 20
    batch_size: int = 16
    peak_lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01

    def settings(self) -> dict:
        """The recipe as a JSON-ready dict (what a retraining cache must match)."""
        return asdict(self)

    def train(
        self, data: TextDataset, seed: int = 0, *, checkpoints: int = 0
    ) -> tuple[nn.Module, list[Checkpoint]]:
        """A model trained on ``data`` from ``seed``, and ``checkpoints`` snapshots of it
        evenly spaced over training (the last one at the final step)."""
        model = new_gpt2(
            data.tokenizer, n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
            n_positions=self.n_positions, seed=seed,
        )  # fmt: skip
        total = self.epochs * math.ceil(len(data) / self.batch_size)
        steps = [round(total * (c + 1) / checkpoints) for c in range(checkpoints)]
        snaps = train_lm(
            model, data, epochs=self.epochs, batch_size=self.batch_size, peak_lr=self.peak_lr,
            warmup=self.warmup, seed=seed, weight_decay=self.weight_decay, checkpoint_steps=steps,
        )  # fmt: skip
        return model, snaps

    def __call__(self, data: TextDataset, seed: int = 0) -> nn.Module:
        return self.train(data, seed)[0]


@dataclass
class Setting:
    """The validation data: its tokenizer, training set and held-out queries."""

    tokenizer: object
    train: TextDataset
    queries: list[Query]


def _as_query(record: dict) -> Query:
    """Split a quote after the first half of its words: the second half is the completion."""
    words = record["text"].split(" ")
    cut = len(words) // 2
    return Query(
        " ".join(words[:cut]),
        " " + " ".join(words[cut:]),
        id=record["id"],
        metadata={"theme": record["theme"]},
    )


def load_setting(themes=THEMES, n_train: int = N_TRAIN, n_queries: int = N_QUERIES) -> Setting:
    """The training quotes (an even share of ``themes``, shipped order), a tokenizer trained
    on them, and ``n_queries`` held-out quotes (an even share of the themes, the first after
    the training ones of :data:`QUERY_WORDS` words and :data:`QUERY_TOKENS` tokens at most)."""
    records = [r for r in load_records() if r["theme"] in themes]
    chosen = even_sample(records, n_train)
    taken = {r["id"] for r in chosen}
    tokenizer = build_tokenizer([r["text"] for r in chosen], vocab_size=VOCAB_SIZE)

    def fits(text: str) -> bool:
        return (
            len(text.split()) >= QUERY_WORDS and len(tokenizer(text)["input_ids"]) <= QUERY_TOKENS
        )

    held_out = even_sample(
        [r for r in records if r["id"] not in taken and fits(r["text"])], n_queries
    )
    train = TextDataset.from_records(chosen, tokenizer, MAX_LENGTH)
    return Setting(tokenizer, train, [_as_query(r) for r in held_out])
