"""Train the shipped demo models on the shipped corpus (run once; the weights ship).

    python -m influencekit.demo.train                 # tokenizer + both sizes, a few minutes each
    python -m influencekit.demo.train --size small    # one size (reuses the shipped tokenizer)

The tokenizer is a byte-level BPE trained here on the corpus with ``tokenizers``. Each model is
a GPT-2 trained from a seeded initialisation on exactly the sequences the demo scores (the
corpus tokenized to ``MAX_LENGTH`` tokens), so every training sequence the influence scores
rank was really seen in training. Batches come in a seeded order and PyTorch runs single
threaded, so a rerun on the same PyTorch build gives the same weights.

Example:
    >>> SIZES["large"]["n_embd"] // SIZES["small"]["n_embd"]
    2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import TextDataset
from ..tiny import build_tokenizer
from ..training import lr_at as schedule_lr
from ..training import new_gpt2, train_lm
from .corpus import DATA_DIR, MAX_LENGTH, load_records

VOCAB_SIZE = 3072
# "large" has ~4.6x the parameters of "small" (6x outside the embeddings), for the
# influence-vs-scale analysis; both train for the same number of epochs on the same batches.
SIZES = {
    "small": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "large": {"n_layer": 6, "n_embd": 256, "n_head": 8},
}
# Peak learning rate per size: the wider model needs a smaller one (at 2e-3 it ended at a
# corpus loss of 4.70 against the small model's 4.00; after 3 epochs 1e-3 gave 5.59, 2e-3 5.73).
PEAK_LR = {"small": 2e-3, "large": 1e-3}
EPOCHS, BATCH_SIZE, WARMUP, SEED = 12, 16, 100, 0


def train_tokenizer(texts: list[str]):
    """The demo's byte-level BPE (GPT-2 conventions, ``VOCAB_SIZE`` entries)."""
    return build_tokenizer(texts, vocab_size=VOCAB_SIZE)


def new_model(size: str, tokenizer, seed: int = SEED):
    """A freshly initialised GPT-2 of one of :data:`SIZES` (seeded)."""
    return new_gpt2(tokenizer, **SIZES[size], n_positions=MAX_LENGTH, seed=seed)


def lr_at(step: int, total: int, peak: float) -> float:
    """The demo's schedule: :func:`influencekit.training.lr_at` with ``WARMUP`` steps.

    Example:
        >>> lr_at(0, 1000, 1e-3), lr_at(99, 1000, 1e-3), round(lr_at(1000, 1000, 1e-3), 6)
        (1e-05, 0.001, 0.0001)
    """
    return schedule_lr(step, total, peak, WARMUP)


def train_model(
    size: str,
    tokenizer,
    *,
    epochs: int = EPOCHS,
    seed: int = SEED,
    records: list[dict] | None = None,
    log: Callable[[str], None] | None = print,
):
    """Train one size on ``records`` (default: the corpus); returns the model in eval mode."""
    data = TextDataset.from_records(records or load_records(), tokenizer, MAX_LENGTH)
    model = new_model(size, tokenizer, seed)
    started = time.perf_counter()

    def report(epoch: int, mean_loss: float) -> None:
        if log is not None:
            elapsed = time.perf_counter() - started
            log(f"{size}: epoch {epoch + 1}/{epochs} loss {mean_loss:.3f} ({elapsed:.0f} s)")

    train_lm(
        model, data, epochs=epochs, batch_size=BATCH_SIZE, peak_lr=PEAK_LR[size],
        warmup=WARMUP, seed=seed, log=report,
    )  # fmt: skip
    return model


def save(model, tokenizer, out_dir: Path) -> None:
    """A Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shipped demo models.")
    parser.add_argument("--size", choices=[*SIZES, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="folder of the model dirs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # thread count changes float summation order, hence the weights
    tokenizer = train_tokenizer([r["text"] for r in load_records()])
    for size in SIZES if args.size == "all" else [args.size]:
        save(train_model(size, tokenizer, epochs=args.epochs), tokenizer, args.out / size)
        print(f"wrote {args.out / size}")


if __name__ == "__main__":
    main()
