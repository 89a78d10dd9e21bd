"""The measurement every validation compares against: ``log p(completion | prompt)``.

It is the quantity whose change the kit's scores predict (a positive score: up-weighting the
training sequence raises it), measured here directly on a model, in float64 sums.

Example:
    >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
    >>> from influencekit.training import new_gpt2
    >>> tok = build_tokenizer(TINY_CORPUS)
    >>> model = new_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32).eval()
    >>> completion_log_probs(model, [("The moon", " shines.")], tok).shape
    (1,)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..data import Batch, as_queries, query_batches
from ..models import TrackedLayer, check_sequences_fit, resolve_device


def tracked_params(layers: list[TrackedLayer]) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": w, "<layer>.bias": b}`` of the tracked layers (detached): the
    parameters the validation ground truths vary, everything else frozen."""
    params = {}
    for layer in layers:
        params[f"{layer.name}.weight"] = layer.module.weight.detach()
        if layer.has_bias:
            params[f"{layer.name}.bias"] = layer.module.bias.detach()
    return params


def functional_logits(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch):
    """``model``'s logits on ``batch`` with ``params`` standing in for its own (by name)."""
    return functional_call(
        model,
        params,
        args=(),
        kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
        strict=False,
    ).logits


def label_log_probs(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``Σ_t log p(token_{t+1})`` over each row's scored positions (``batch.label_mask``).

    ``logp``: ``(rows, positions, vocab)`` log-probabilities of the next token.

    Example:
        >>> from influencekit.data import collate
        >>> b = collate([[0, 1]], [1], [0])
        >>> logp = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
        >>> round(float(label_log_probs(logp, b)[0]), 4) == round(float(np.log(0.75)), 4)
        True
    """
    following = torch.roll(batch.input_ids, shifts=-1, dims=1)
    picked = logp.gather(-1, following[..., None]).squeeze(-1)
    return (picked * batch.label_mask).sum(-1)


@torch.no_grad()
def completion_log_probs(
    model: nn.Module, queries, tokenizer, *, batch_size: int = 16, device=None
) -> np.ndarray:
    """``log p(completion | prompt)`` of every query under ``model``: shape ``(n_queries,)``.

    ``queries``: anything :func:`~influencekit.as_queries` accepts. The model is run in eval
    mode; the log-softmax is taken in float64 so long completions sum without loss.
    """
    queries = as_queries(queries)
    check_sequences_fit(model, (q.encode(tokenizer)[0] for q in queries), "queries")
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    out = []
    for batch in query_batches(queries, tokenizer, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out.append(label_log_probs(torch.log_softmax(logits.double(), -1), batch).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)
