"""Training small GPT-2 language models: the demo's shipped models and validation retraining.

One loop serves both: AdamW, seeded batch order, linear warm-up then cosine decay to a tenth
of the peak learning rate, gradient clipping. It can snapshot the weights at chosen steps
(the checkpoints of multi-checkpoint influence, :mod:`influencekit.validate.checkpoints`),
each with the learning rate summed over the steps since the previous snapshot.

Example:
    >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
    >>> from influencekit.data import TextDataset
    >>> tok = build_tokenizer(TINY_CORPUS)
    >>> model = new_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    >>> data = TextDataset.from_texts(TINY_CORPUS[:8], tok, max_length=32)
    >>> snaps = train_lm(model, data, epochs=2, batch_size=4, peak_lr=1e-3, warmup=1,
    ...                  checkpoint_steps=[2, 4])
    >>> [s.step for s in snaps], round(sum(s.lr_sum for s in snaps), 6)
    ([2, 4], 0.0031)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .data import Batch, TextDataset, collate, padding_id


def new_gpt2(tokenizer, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, seed: int = 0):
    """A freshly initialised ``GPT2LMHeadModel`` sized for ``tokenizer`` (seeded).

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> m = new_gpt2(build_tokenizer(TINY_CORPUS), n_layer=1, n_embd=16, n_head=2,
        ...              n_positions=32)
        >>> m.config.n_layer, m.config.vocab_size
        (1, 300)
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then cosine decay to a tenth of it.

    Example:
        >>> lr_at(0, 1000, 1e-3), lr_at(99, 1000, 1e-3), round(lr_at(1000, 1000, 1e-3), 6)
        (1e-05, 0.001, 0.0001)
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Step:
    """One optimiser step: its batch's rows, learning rate, number (from 1) and epoch."""

    rows: list[int]
    lr: float
    number: int
    epoch: int


def schedule(
    n: int, *, epochs: int, batch_size: int, peak_lr: float, warmup: int, seed: int = 0
) -> list[Step]:
    """Every step of :func:`train_lm` on ``n`` sequences: each epoch's batch order drawn from
    ``seed``, and the learning rate of :func:`lr_at`.

    Example:
        >>> steps = schedule(5, epochs=2, batch_size=2, peak_lr=1e-3, warmup=1)
        >>> len(steps), [len(s.rows) for s in steps[:3]], steps[3].epoch
        (6, [2, 2, 1], 1)
    """
    generator = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(n / batch_size)
    steps: list[Step] = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            lr = lr_at(len(steps), total, peak_lr, warmup)
            steps.append(Step(order[start : start + batch_size], lr, len(steps) + 1, epoch))
    return steps


def training_batch(data: TextDataset, rows: list[int]) -> Batch:
    """Rows ``rows`` of ``data`` as one training batch (every token after the first scored)."""
    return collate(
        [data[i].input_ids for i in rows], [1] * len(rows), rows, padding_id(data.tokenizer)
    )


@dataclass
class Checkpoint:
    """The weights after ``step`` optimiser steps; ``lr_sum``: the learning rates of the steps
    since the previous checkpoint, summed (how far training moved under this checkpoint's
    gradients, the natural weight for summing influence over checkpoints)."""

    step: int
    lr_sum: float
    state: dict[str, torch.Tensor]

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy these weights into ``model`` (same architecture) and return it in eval mode."""
        model.load_state_dict(self.state)
        return model.eval()


def train_lm(
    model: nn.Module,
    data: TextDataset,
    *,
    epochs: int,
    batch_size: int,
    peak_lr: float,
    warmup: int,
    seed: int = 0,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    checkpoint_steps: Iterable[int] = (),
    log: Callable[[int, float], None] | None = None,
) -> list[Checkpoint]:
    """Train ``model`` in place on every sequence of ``data`` for ``epochs`` epochs.

    Batches of ``batch_size`` come in an order drawn from ``seed`` each epoch; the loss is the
    mean next-token cross-entropy over the batch's real tokens. ``checkpoint_steps``: after
    which optimiser steps (counted from 1) to snapshot the weights. ``log(epoch, mean_loss)``
    is called after each epoch. The model is left in eval mode; returns the snapshots.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=weight_decay)
    steps = schedule(len(data), epochs=epochs, batch_size=batch_size, peak_lr=peak_lr,
                     warmup=warmup, seed=seed)  # fmt: skip
    steps_per_epoch = math.ceil(len(data) / batch_size)
    wanted, snaps, lr_since, running = set(checkpoint_steps), [], 0.0, 0.0
    model.train()
    for step in steps:
        batch = training_batch(data, step.rows)
        for group in optimizer.param_groups:
            group["lr"] = step.lr
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        running += loss.item()
        lr_since += step.lr
        if step.number in wanted:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            snaps.append(Checkpoint(step.number, lr_since, state))
            lr_since = 0.0
        if step.number % steps_per_epoch == 0:  # the epoch's last step
            if log is not None:
                log(step.epoch, running / steps_per_epoch)
            running = 0.0
    model.eval()
    return snaps
