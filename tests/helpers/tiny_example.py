"""A tiny end-to-end case for tests: a 2-block GPT-2 trained here, then influence on it.

It trains on :data:`influencekit.tiny.TINY_CORPUS` for a few seconds (deterministic, seeded),
saves a Hugging Face directory with safetensors weights, loads it back through
:func:`load_model` (the path a user's own model takes), fits EK-FAC factors and scores a few
queries. (The shipped demo, ``influencekit demo``, lives in :mod:`influencekit.demo`.)

Example:
    >>> result, train = run_example(progress=False)   # doctest: +SKIP
    >>> result.top(0, k=3)                                          # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from influencekit.data import TextDataset
from influencekit.fitting import fit_factors
from influencekit.loading import load_model
from influencekit.result import InfluenceResult
from influencekit.scoring import score
from influencekit.tiny import TINY_CORPUS, build_tokenizer

THEMES = ("cooking", "astronomy", "sailing", "music")  # TINY_CORPUS: ten sentences each
QUERIES = [
    {"id": "soup", "prompt": "The chef tastes the", "completion": " soup and adds salt."},
    {"id": "stars", "prompt": "On a clear night", "completion": " the stars shine."},
    {"id": "anchor", "prompt": "The crew lowers the", "completion": " anchor in the bay."},
    {"id": "choir", "prompt": "The choir sings", "completion": " a quiet melody."},
]


def corpus_records() -> list[dict]:
    """TINY_CORPUS as records with an ``id`` and a ``theme`` (kept as metadata)."""
    return [
        {"id": f"{THEMES[i // 10]}-{i % 10}", "text": text, "theme": THEMES[i // 10]}
        for i, text in enumerate(TINY_CORPUS)
    ]


def train_tiny_model(out_dir: str | Path, *, steps: int = 60, seed: int = 0) -> Path:
    """Train a tiny GPT-2 on TINY_CORPUS and save it (safetensors) with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TINY_CORPUS, vocab_size=400)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=64,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    data = TextDataset.from_texts(TINY_CORPUS, tokenizer, max_length=64)
    ids = [list(ex.input_ids) for ex in data]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    labels = input_ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out_dir = Path(out_dir)
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_example(
    out_dir: str | Path | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
) -> tuple[InfluenceResult, TextDataset]:
    """Train, fit and score; with ``out_dir``, keep the model, factors and result there."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own save/load bars would drown the table
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(out_dir) if out_dir is not None else Path(scratch)
        model_dir = train_tiny_model(root / "model")
        model, tokenizer = load_model(model_dir, device=device)
        train = TextDataset.from_records(corpus_records(), tokenizer, max_length=64)
        factors = fit_factors(model, train, "mlp", progress=progress)
        result = score(model, factors, QUERIES, train, progress=progress)
        if out_dir is not None:
            factors.save(root / "factors.h5")
            result.save(root / "result.h5")
    return result, train
