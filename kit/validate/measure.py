"""The measurement every validation compares against: ``log p(completion | prompt)``.

It is the quantity whose change the kit's scores predict (a positive score: up-weighting the
training sequence raises it), measured here directly on a model, in float64 sums. Also the
plumbing both ground truths (:mod:`.pbrf`, :mod:`.exact`) share: the tracked parameters they
vary, the model as a function of them, and the per-layer damping, validated once.

Example:
    >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
    >>> from influencekit.training import new_gpt2
    >>> tok = build_tokenizer(TINY_CORPUS)
    >>> model = new_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32).eval()
    >>> completion_log_probs(model, [("The moon", " shines.")], tok).shape
    (1,)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .. import checks
from ..data import Batch, as_queries, query_batches
from ..hooks import label_log_probs
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


def layer_damping(
    layers: list[TrackedLayer], damping: float | Mapping[str, float]
) -> dict[str, float]:
    """``{layer: λ}`` from one number or the kit's per-layer map, validated as everywhere in
    the kit (:func:`influencekit.checks.damping`): the map must name exactly the tracked
    layers, and every λ be a finite number > 0.

    Example:
        >>> from influencekit.models import TrackedLayer
        >>> layers = [TrackedLayer("fc", nn.Linear(2, 2), transposed=False)]
        >>> layer_damping(layers, 0.5)
        {'fc': 0.5}
    """
    return checks.damping(damping, [layer.name for layer in layers])


def param_damping(params: Mapping[str, torch.Tensor], lam: Mapping[str, float]) -> dict[str, float]:
    """Each parameter's λ: its layer's (``"<layer>.weight"`` and ``"<layer>.bias"`` share it)."""
    return {name: lam[name.rsplit(".", 1)[0]] for name in params}


def functional_logits(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch):
    """``model``'s logits on ``batch`` with ``params`` standing in for its own (by name)."""
    return functional_call(
        model,
        params,
        args=(),
        kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
        strict=False,
    ).logits


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
