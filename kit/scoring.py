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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import distributed
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
from .lowrank import LowRank
from .models import TrackedLayer, check_sequences_fit, resolve_device
from .result import InfluenceResult
from .store_scoring import TopK, combine, stream_store


def query_tokens(
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
) -> dict[str, LayerIO]:
    """Each query's per-token ``a`` and ``s`` per layer, ``(n_queries, T, d)``, zero-padded.

    ``G_q = Σ_t s_t a_tᵀ`` is the gradient of ``-log p(completion | prompt)``; kept in this
    factored form, it is rotated and preconditioned at a fraction of the dense cost.
    """
    parts: dict[str, list[LayerIO]] = {layer.name: [] for layer in layers}
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
            parts[name].append(x)
    length = max(x.a.shape[1] for x in parts[layers[0].name])
    return {
        name: LayerIO(
            a=torch.cat([_pad_tokens(x.a, length) for x in xs]),
            s=torch.cat([_pad_tokens(x.s, length) for x in xs]),
        )
        for name, xs in parts.items()
    }


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero rows up to ``length`` tokens (zero tokens add nothing to ``Σ_t s_t a_tᵀ``)."""
    missing = length - x.shape[1]
    return x if missing == 0 else torch.cat([x, x.new_zeros(x.shape[0], missing, x.shape[2])], 1)


def query_gradients(model, layers, queries, tokenizer, **options) -> dict[str, torch.Tensor]:
    """``G_q`` per layer, ``(n_queries, d_out, d_in [+1])``: gradients of ``-log p(c | p)``.

    Same arguments as :func:`query_tokens`.
    """
    tokens = query_tokens(model, layers, queries, tokenizer, **options)
    return {name: per_sequence_grads(x) for name, x in tokens.items()}


def precondition_all(
    factors: Factors, grads: dict[str, torch.Tensor], damping: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Apply each layer's ``(Ĝ + λI)⁻¹`` to its gradients."""
    return {name: factors.layers[name].precondition(g, damping[name]) for name, g in grads.items()}


def _preconditioned(factors: Factors, tokens: dict[str, LayerIO], damping, rank, need_dense):
    """Dense ``P_q`` per layer (when needed) and the form to contract (rank-r if asked)."""
    pre = forms = None
    if rank is None or need_dense:
        pre = {
            name: factors.layers[name].precondition_tokens(x.s, x.a, damping[name])
            for name, x in tokens.items()
        }
    if rank is None:
        forms = pre
    else:
        forms = {
            name: factors.layers[name].precondition_truncated(x.s, x.a, damping[name], rank)
            for name, x in tokens.items()
        }
    return pre, forms


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
    train,
    *,
    damping: float | Mapping[str, float] | None = None,
    query_rank: int | None = None,
    top_k: int | None = None,
    refine: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    tokenizer=None,
    progress: bool = True,
) -> InfluenceResult:
    """Influence of every training sequence on every query, per tracked layer.

    ``train`` is a :class:`TextDataset` (training gradients computed on the fly, streaming)
    or a :class:`~influencekit.store.GradientStore` (stored gradients, one pass over the file).
    ``damping``: ``None`` (``0.1 × mean(Λ)`` per layer), one float, or ``{layer: float}``.
    ``query_rank``: rank of the truncated SVD of each preconditioned query gradient.
    ``top_k``: keep only each query's ``k`` highest scores (a top-k result, see
    :class:`InfluenceResult`); memory then does not grow with the number of training sequences.
    ``refine`` (store only): rescore each query's top ``refine`` candidates exactly.
    With a ``lowrank`` store pass ``query_rank`` (e.g. 16): a full-rank query costs
    ``d_out·d_in`` per stored sequence and layer, a rank-r one ``r·R·(d_out + d_in)``
    (docs/store-format.md).
    ``tokenizer`` defaults to ``train.tokenizer`` (a dataset) or the store's own.

    Example:
        >>> result = score(model, factors, [("The sky is", " blue")], train)  # doctest: +SKIP
        >>> result.scores.shape  # doctest: +SKIP
        (1, 120)
    """
    from .store import GradientStore  # the store builds on this package: import late

    if not isinstance(train, (TextDataset, GradientStore)):
        raise TypeError(
            f"train must be a TextDataset or a GradientStore, got {type(train).__name__}"
        )
    _check_positive("query_rank", query_rank)
    _check_positive("top_k", top_k)
    _check_positive("refine", refine)
    if refine is not None and not isinstance(train, GradientStore):
        raise ValueError("refine= applies to a GradientStore; on-the-fly scores are already exact")
    check_accumulation_dtype(dtype)
    check_batch_size(batch_size)
    queries = as_queries(queries)
    layers = factors.tracked_layers(model)
    if isinstance(train, GradientStore):
        tok = train.tokenizer() if tokenizer is None else tokenizer
        train.check(model=model, tokenizer=tok, modules=factors.modules)
        if train.config.dtype == "float64":
            dtype = torch.float64  # a float64 store is scored in float64
    else:
        tok = train.tokenizer if tokenizer is None else tokenizer
        check_sequences_fit(model, (ex.input_ids for ex in train), f"training data {train.source}")
    check_sequences_fit(model, (q.encode(tok)[0] for q in queries), "queries")
    device = resolve_device(model, device)
    lambdas = factors.damping_for(damping)
    opts = {"device": device, "dtype": dtype, "amp_dtype": amp_dtype, "progress": progress}
    tokens = query_tokens(model, layers, queries, tok, batch_size=batch_size, **opts)
    pre, forms = _preconditioned(
        factors, tokens, lambdas, query_rank, need_dense=refine is not None
    )
    run = _Scoring(model, layers, batch_size, device, dtype, amp_dtype, progress)
    if isinstance(train, GradientStore):
        layer_scores, indices, refined = run.from_store(train, pre, forms, top_k, refine)
        train_ids = train.ids
    else:
        layer_scores, indices = run.on_the_fly(train, forms, top_k)
        train_ids, refined = train.ids, None
    meta = {
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "damping": lambdas,
        "query_rank": query_rank,
        "top_k": top_k,
        "refine": refine,
        "source": str(train.path) if isinstance(train, GradientStore) else train.source,
        "codec": train.codec if isinstance(train, GradientStore) else "exact (on the fly)",
        "model_fingerprint": factors.fingerprint,
        "queries": [{"prompt": q.prompt, "completion": q.completion} for q in queries],
    }
    if refined is not None:
        meta["refined"] = refined
    layer_names = [layer.name for layer in layers]
    return InfluenceResult(
        layer_scores, layer_names, train_ids, [q.id for q in queries], meta, indices
    )


@dataclass(frozen=True)
class _Scoring:
    """What both score paths share: the model, its layers and how to run it."""

    model: nn.Module
    layers: list[TrackedLayer]
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    amp_dtype: torch.dtype | None
    progress: bool

    def keeper(self, n_queries: int, n_train: int, top_k: int | None):
        n_layers = len(self.layers)
        if top_k is None:
            return np.zeros((n_queries, n_train, n_layers))
        return TopK(n_queries, top_k, n_layers)

    def on_the_fly(
        self, train: TextDataset, forms: dict, top_k: int | None, desc: str = "training gradients"
    ):
        """Training gradients computed batch by batch and contracted at once."""
        forms = {name: cheaper_form(p) for name, p in forms.items()}
        keep = self.keeper(_n_queries(forms), len(train), top_k)
        batches = example_batches(train, self.batch_size, length_order(train))  # little padding
        # under torchrun: every world-th batch (the same batches as one process makes)
        for batch, io in capture_batches(
            self.model,
            self.layers,
            distributed.my_share(batches),
            device=self.device,
            dtype=self.dtype,
            amp_dtype=self.amp_dtype,
            progress=self.progress and distributed.is_main(),
            desc=desc,
            total=distributed.share_count(-(-len(train) // self.batch_size)),
            example_ids=train.ids,
        ):
            part = [contract(io[layer.name], forms[layer.name]) for layer in self.layers]
            block = torch.stack(part, -1).double().cpu().numpy()  # one copy per batch
            if isinstance(keep, TopK):
                keep.add(np.asarray(batch.indices), block)
            else:
                keep[:, batch.indices, :] = block
        combine(keep)
        return (keep.layer_scores, keep.indices) if isinstance(keep, TopK) else (keep, None)

    def from_store(self, store, pre: dict, forms: dict, top_k, refine):
        """One streaming pass over the store, then the exact rescoring of ``refine`` candidates.

        Returns ``(layer_scores, indices or None, refined candidates or None)``.
        """
        codecs = [store.codecs[store.modules.index(layer.name)] for layer in self.layers]
        compressed = [
            codec.compress_query(forms[layer.name])
            for codec, layer in zip(codecs, self.layers, strict=True)
        ]
        n_queries = _n_queries(forms)
        width = None if top_k is None else max(top_k, refine or 0)
        keep = self.keeper(n_queries, len(store), width)
        stream_store(store, self.layers, compressed, keep, self.device, self.dtype, self.progress)
        if isinstance(keep, TopK):
            layer_scores, indices = keep.layer_scores, keep.indices
        else:
            layer_scores, indices = keep, None
        if refine is None:
            return layer_scores, indices, None
        # Candidates: each query's `refine` best compressed scores; their exact scores replace them.
        if indices is None:
            order = np.argsort(-layer_scores.sum(-1), axis=1, kind="stable")[:, :refine]
            candidates, columns = order, order
        else:
            candidates = indices[:, :refine]
            columns = np.broadcast_to(np.arange(candidates.shape[1]), candidates.shape)
        exact = self.exact_for(store, pre, candidates)
        rows = np.arange(n_queries)[:, None]
        layer_scores[rows, columns] = exact
        if isinstance(keep, TopK):
            keep.k = top_k
            keep.resort()
            layer_scores, indices = keep.layer_scores, keep.indices
        return layer_scores, indices, candidates.tolist()

    def exact_for(self, store, pre: dict, candidates: np.ndarray) -> np.ndarray:
        """Exact per-layer scores ``(Q, K, L)`` of each query's candidate stored examples.

        The candidates' gradients are recomputed from their stored token ids (only those rows
        are read), through the same loop as on-the-fly scoring.
        """
        union = sorted(set(candidates.flatten().tolist()))
        tok = store.tokenizer()
        rows = zip(union, store.token_ids(union), strict=True)
        examples = [
            Example(j, f"stored #{i}", "", tuple(ids), {}, tok) for j, (i, ids) in enumerate(rows)
        ]
        subset = TextDataset(examples, tok, store.config.max_length, f"{store.path} (refine)")
        exact, _ = self.on_the_fly(subset, pre, None, desc="refining")
        column = {index: j for j, index in enumerate(union)}
        picked = np.vectorize(column.__getitem__, otypes=[np.int64])(candidates)
        return exact[np.arange(len(candidates))[:, None], picked]


def _n_queries(forms: dict) -> int:
    first = next(iter(forms.values()))
    return (first[0] if isinstance(first, tuple) else first).shape[0]


def cheaper_form(p: torch.Tensor | LowRank) -> torch.Tensor | LowRank:
    """Rank-r factors ``(U Σ, V)`` or their product, whichever is cheaper to contract per token.

    Per token, the factored form costs ``Q·r·(d_out + d_in)`` multiply-adds and the dense
    form (through ``G_z``) ``d_out·d_in`` whatever ``Q``: many queries or a high rank make the
    dense form cheaper. Both give the same scores up to rounding.
    """
    if not isinstance(p, tuple):
        return p
    us, v = p
    n_queries, d_out, rank = us.shape
    if n_queries * rank * (d_out + v.shape[1]) < d_out * v.shape[1]:
        return p
    return us @ v.transpose(-1, -2)


def _check_positive(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")


def token_scores(
    model: nn.Module,
    factors: Factors,
    query: Query | tuple | dict,
    example: Example,
    *,
    damping: float | Mapping[str, float] | None = None,
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
