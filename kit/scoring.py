"""Influence scores: preconditioned query gradients contracted with training gradients.

``I_l(q, z) = ⟨P_q, G_z⟩_F`` with ``P_q = (Ĝ_l + λ_l I)⁻¹ G_q`` (DESIGN.md §2). The query
gradient ``G_q`` is the gradient of the summed completion NLL (``-log p(completion | prompt)``);
training gradients use the real next tokens. Training gradients are computed here on the
fly, batch by batch, and never all held at once.

With ``query_rank=r`` each ``P_q`` is replaced by its rank-r truncated SVD ``U Σ Vᵀ`` and the
contraction becomes ``Σ_t (s_tᵀ U Σ)(Vᵀ a_t)``, never forming ``G_z`` (the paper's query
batching).

Example:
    >>> result = score(model, factors, queries, train)      # doctest: +SKIP
    >>> result.top(0, k=5)                                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .data import (
    Example,
    Query,
    TextDataset,
    as_queries,
    check_batch_size,
    collate,
    example_batches,
    length_order,
    query_batches,
)
from .errors import NonFiniteError
from .factors import Factors
from .hooks import (
    LayerIO,
    capture,
    capture_batches,
    check_accumulation_dtype,
    per_sequence_grads,
)
from .models import TrackedLayer, check_sequences_fit, resolve_device
from .result import InfluenceResult

LowRank = tuple[torch.Tensor, torch.Tensor]  # (U Σ: (Q, d_out, r), V: (Q, d_in, r))


def query_gradients(
    model: nn.Module,
    layers: list[TrackedLayer],
    queries: list[Query],
    tokenizer,
    *,
    batch_size: int = 8,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``G_q`` per layer, ``(n_queries, d_out, d_in [+1])``: gradients of ``-log p(c | p)``."""
    grads: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    batches = query_batches(queries, tokenizer, batch_size)
    for _, io in capture_batches(
        model,
        layers,
        batches,
        device=device,
        desc="query gradients",
        progress=progress,
        total=-(-len(queries) // batch_size),
        example_ids=[q.id for q in queries],
        dtype=dtype,
        amp_dtype=amp_dtype,
    ):
        for name, x in io.items():
            grads[name].append(per_sequence_grads(x))
    return {name: torch.cat(parts) for name, parts in grads.items()}


def precondition_all(
    factors: Factors, grads: dict[str, torch.Tensor], damping: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Apply each layer's ``(Ĝ + λI)⁻¹`` to its gradients."""
    return {name: factors.layers[name].precondition(g, damping[name]) for name, g in grads.items()}


def truncate_rank(p: torch.Tensor, rank: int) -> LowRank:
    """Rank-``rank`` truncated SVD of each matrix in ``p`` (Q, d_out, d_in) as ``(U Σ, V)``.

    Example:
        >>> us, v = truncate_rank(torch.eye(3)[None], 2)
        >>> (us @ v.transpose(1, 2)).diagonal(dim1=1, dim2=2).tolist()
        [[1.0, 1.0, 0.0]]
    """
    u, sigma, vh = torch.linalg.svd(p, full_matrices=False)
    r = min(rank, sigma.shape[-1])
    return u[..., :r] * sigma[..., None, :r], vh[..., :r, :].transpose(-1, -2)


def low_rank_form(p: torch.Tensor, rank: int) -> torch.Tensor | LowRank:
    """The rank-``rank`` approximation of ``p``, in whichever form is cheaper to contract.

    Per token, the factored form costs ``Q·r·(d_out + d_in)`` multiply-adds and the dense
    form (through ``G_z``) ``d_out·d_in`` whatever ``Q``: many queries or a high rank make the
    dense form cheaper. Both give the same scores up to rounding.
    """
    us, v = truncate_rank(p, rank)
    n_queries, d_out, d_in = p.shape
    if n_queries * us.shape[-1] * (d_out + d_in) < d_out * d_in:
        return us, v
    return us @ v.transpose(-1, -2)


def contract(io: LayerIO, preconditioned: torch.Tensor | LowRank) -> torch.Tensor:
    """``⟨P_q, G_z⟩`` for every query and sequence of a batch: ``(Q, B)``."""
    if isinstance(preconditioned, tuple):
        us, v = preconditioned
        left = torch.einsum("bto,qor->qbtr", io.s, us)
        right = torch.einsum("bti,qir->qbtr", io.a, v)
        return (left * right).sum(dim=(2, 3))
    # One (Q, O·I) × (O·I, B) matmul: much faster than the equivalent einsum on CPU.
    return preconditioned.flatten(1) @ per_sequence_grads(io).flatten(1).T


def score(
    model: nn.Module,
    factors: Factors,
    queries: Query | Iterable,
    train: TextDataset,
    *,
    damping: float | dict[str, float] | None = None,
    query_rank: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    tokenizer=None,
    progress: bool = True,
) -> InfluenceResult:
    """Influence of every training sequence on every query, per tracked layer.

    ``train`` is a :class:`TextDataset` (training gradients computed on the fly, streaming).
    ``damping``: ``None`` (``0.1 × mean(Λ)`` per layer), one float, or ``{layer: float}``.
    ``query_rank``: rank of the truncated SVD of each preconditioned query gradient.
    ``tokenizer`` defaults to ``train.tokenizer``.

    Example:
        >>> result = score(model, factors, [("The sky is", " blue")], train)  # doctest: +SKIP
        >>> result.scores.shape  # doctest: +SKIP
        (1, 120)
    """
    if not isinstance(train, TextDataset):
        raise TypeError(f"train must be a TextDataset, got {type(train).__name__}")
    _check_rank(query_rank)
    check_accumulation_dtype(dtype)
    check_batch_size(batch_size)
    queries = as_queries(queries)
    layers = factors.tracked_layers(model)
    tok = train.tokenizer if tokenizer is None else tokenizer
    check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    check_sequences_fit(model, (q.encode(tok)[0] for q in queries), "queries")
    device = resolve_device(model, device)
    lambdas = factors.damping_for(damping)
    opts = {"device": device, "dtype": dtype, "amp_dtype": amp_dtype, "progress": progress}
    grads = query_gradients(model, layers, queries, tok, batch_size=batch_size, **opts)
    pre = precondition_all(factors, grads, lambdas)
    if query_rank is not None:
        pre = {name: low_rank_form(p, query_rank) for name, p in pre.items()}
    layer_scores = np.zeros((len(queries), len(train), len(layers)))
    batches = example_batches(train, batch_size, length_order(train))  # little padding
    for batch, io in capture_batches(
        model,
        layers,
        batches,
        desc="training gradients",
        total=-(-len(train) // batch_size),
        example_ids=train.ids,
        **opts,
    ):
        part = torch.stack([contract(io[layer.name], pre[layer.name]) for layer in layers], -1)
        layer_scores[:, batch.indices, :] = part.double().cpu().numpy()  # one copy per batch
    meta = {
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "damping": lambdas,
        "query_rank": query_rank,
        "model_fingerprint": factors.fingerprint,
        "queries": [{"prompt": q.prompt, "completion": q.completion} for q in queries],
    }
    return InfluenceResult(
        layer_scores, [layer.name for layer in layers], train.ids, [q.id for q in queries], meta
    )


def _check_rank(query_rank) -> None:
    if query_rank is None:
        return
    if isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1:
        raise ValueError(f"query_rank must be an int >= 1 or None, got {query_rank!r}")


def token_scores(
    model: nn.Module,
    factors: Factors,
    query: Query | tuple | dict,
    example: Example,
    *,
    damping: float | dict[str, float] | None = None,
    per_layer: bool = False,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Influence of each token of one training sequence on one query.

    ``I_{l,t} = s_tᵀ P_q a_t`` at training position ``t``; the sum over tokens (and layers) is
    the pair's score. Returns ``(n_tokens,)``, or ``(n_tokens, n_layers)`` with ``per_layer``.

    Example:
        >>> ts = token_scores(model, factors, queries[0], train[3])   # doctest: +SKIP
        >>> ts.sum()                                                   # doctest: +SKIP
    """
    (query,) = as_queries([query])
    check_accumulation_dtype(dtype)
    layers = factors.tracked_layers(model)
    device = resolve_device(model, device)
    tok = tokenizer if tokenizer is not None else getattr(example, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "token_scores needs a tokenizer: pass tokenizer=, or an example taken from a "
            "TextDataset (train[i]), which carries its tokenizer"
        )
    check_sequences_fit(model, [example.input_ids, query.encode(tok)[0]], f"example {example.id}")
    grads = query_gradients(model, layers, [query], tok, device=device, dtype=dtype, progress=False)
    pre = precondition_all(factors, grads, factors.damping_for(damping))
    batch = collate([example.input_ids], [1], [example.index]).to(device)
    io = capture(model, layers, batch, dtype=dtype, example_ids={example.index: example.id})
    columns = [
        ((io[layer.name].s[0] @ pre[layer.name][0]) * io[layer.name].a[0]).sum(-1)
        for layer in layers
    ]
    table = torch.stack(columns, dim=-1).double().cpu().numpy()
    if not np.isfinite(table).all():
        raise NonFiniteError(
            f"non-finite token score for query {query.id!r}, example {example.id!r}"
        )
    return table if per_layer else table.sum(-1)
