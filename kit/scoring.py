"""Influence scores: preconditioned query gradients contracted with training gradients.

``I_l(q, z) = ⟨P_q, G_z⟩_F`` with ``P_q = (Ĝ_l + λ_l I)⁻¹ G_q`` (docs/math.md). The query
gradient ``G_q`` is the gradient of the summed completion NLL (``-log p(completion | prompt)``);
training gradients use the real next tokens.

One loop serves every source of training gradients: a :class:`OnTheFly` source computes
them from a :class:`~influencekit.TextDataset` batch by batch, a :class:`Stored` source reads
them from a :class:`~influencekit.GradientStore` block by block; either hands blocks of
per-layer scores to a keeper (:mod:`influencekit.keep`: every score, or each query's top k).
``refine=K`` then rescores each query's K best stored candidates exactly, from the token ids
the store keeps: the compressed store finds the candidates, the exact pass ranks them.

With ``query_rank=r`` each ``P_q`` is replaced by its rank-r truncated SVD ``U Σ Vᵀ``
(:class:`~influencekit.lowrank.LowRank`), contracted without forming ``G_z`` where that is
cheaper (the paper's query batching). The default, ``query_rank="auto"``, cuts each layer's
queries to the smallest rank that keeps ``AUTO_ENERGY`` of their squared norm only where the
training gradients' form then contracts them more cheaply (a ``lowrank`` store, when that
rank is small enough), and keeps them exact everywhere else (on the fly, and ``dense``,
``kron``, ``eig`` stores).

Example:
    >>> result = score(model, factors, queries, train)      # doctest: +SKIP
    >>> result.top(0, k=5)                                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from . import checks, distributed
from .data import (
    Example,
    Query,
    TextDataset,
    as_queries,
    collate,
    example_batches,
    length_order,
    query_batches,
)
from .errors import NonFiniteError, ParameterError
from .factors import Factors
from .hooks import LayerIO
from .keep import AllScores, keeper
from .lowrank import (
    LowRank,
    QueryForm,
    as_dense,
    factored_inner,
    max_factored_rank,
    truncate,
    zero_pad,
)
from .models import TrackedLayer, check_sequences_fit
from .result import InfluenceResult
from .settings import RunSettings
from .store import GradientStore
from .store.codecs import DenseCodec
from .store.scoring import compressed_queries, stored_scores

Scores = Iterator[tuple[np.ndarray, np.ndarray]]  # (training indices (B,), scores (Q, B, L))
QUERY_RANKS = ("auto", "full")  # or an int >= 1
# query_rank="auto" keeps this share of each query's squared norm. On the wide trained model
# (benchmarks/wide_model.py) 0.99 keeps Pearson against exact within 0.005 of full-rank
# queries with a lowrank:8 store (ranks 50-77, 3x faster); 0.999 needs ranks 163-270, too
# high for a factored contraction to pay.
AUTO_ENERGY = 0.99


def score(
    model: nn.Module,
    factors: Factors,
    queries: Query | Iterable,
    train: TextDataset | GradientStore,
    *,
    damping: float | Mapping[str, float] | None = None,
    query_rank: int | str | None = "auto",
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
    ``query_rank``: ``"auto"`` (the default: the smallest rank keeping ``AUTO_ENERGY`` of
    each preconditioned query gradient's squared norm, only where the store's codec
    contracts rank-r queries more cheaply, e.g. ``lowrank``; exact queries otherwise),
    ``"full"`` (or ``None``: never truncated) or an int ``r`` (the rank-r truncated SVD
    everywhere). The ranks used are recorded in ``result.meta["query_ranks"]``.
    ``top_k``: keep only each query's ``k`` highest scores (a top-k result, see
    :class:`InfluenceResult`); memory then does not grow with the number of training sequences.
    ``refine`` (store only): rescore each query's top ``refine`` candidates exactly.
    Against a ``lowrank`` store a full-rank query costs ``d_out·d_in`` per stored sequence
    and layer, a rank-r one ``r·R·(d_out + d_in)`` (docs/store-format.md).
    ``dtype``: accumulation dtype (``torch.float32`` or ``torch.float64``; a float64 store
    is scored in float64); ``amp_dtype``: autocast for the forward (bf16/fp16).
    ``tokenizer`` defaults to ``train.tokenizer`` (the dataset's, or the store's own).

    Example:
        >>> result = score(model, factors, [("The sky is", " blue")], train)  # doctest: +SKIP
        >>> result.scores.shape  # doctest: +SKIP
        (1, 120)
    """
    checks.instance("factors", factors, Factors, "Factors (from fit_factors or Factors.load)")
    source = gradient_source(train)
    query_rank = _query_rank(query_rank)
    top_k = checks.count("top_k", top_k, optional=True)
    refine = checks.count("refine", refine, optional=True)
    if refine is not None and not isinstance(source, Stored):
        raise ParameterError(
            "refine", refine, "None when train is a TextDataset (on-the-fly scores are exact)"
        )
    run = RunSettings(batch_size, device, dtype, amp_dtype, progress)
    queries = as_queries(queries)
    layers = factors.tracked_layers(model)
    tokenizer = source.check(model, factors, tokenizer)
    check_sequences_fit(model, (q.encode(tokenizer)[0] for q in queries), "queries")
    run = source.settings(run).on(model)
    lambdas = factors.damping_for(damping)
    tokens = query_tokens(model, layers, queries, tokenizer, run)
    forms = query_forms(factors, tokens, lambdas, query_rank, source)

    width = None if top_k is None else max(top_k, refine or 0)
    keep = keeper(len(queries), len(source), len(layers), width)
    for indices, block in source.scores(model, layers, forms, run):
        keep.add(indices, block)
    keep.combine()
    meta = {
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "damping": lambdas,
        "query_rank": query_rank,
        "query_ranks": {
            name: f.rank if isinstance(f, LowRank) else "full" for name, f in forms.items()
        },
        "top_k": top_k,
        "refine": refine,
        "source": source.source,
        "codec": source.codec,
        "model_fingerprint": factors.fingerprint,
    }
    if refine is not None:  # exact scores, with the full-rank P_q, replace the candidates'
        candidates = keep.best(refine)
        full = preconditioned(factors, tokens, lambdas)  # in the weights' basis, untruncated
        keep.replace(candidates, source.exact_scores(model, layers, full, run, candidates))
        meta["refined"] = candidates.tolist()
    layer_scores, indices = keep.final(top_k)
    names = [layer.name for layer in layers]
    ids = [q.id for q in queries]
    return InfluenceResult(layer_scores, names, source.ids, ids, meta, indices, queries)


def _query_rank(value) -> int | str:
    """``"auto"``, ``"full"`` (``None`` too) or an int >= 1."""
    if value is None or value in QUERY_RANKS:
        return "full" if value is None else value
    allowed = "'auto', 'full', None or an int >= 1"
    return checks.count("query_rank", value, allowed=allowed)


def gradient_source(train) -> OnTheFly | Stored:
    """The source of training gradients ``score`` reads: a dataset or a store."""
    if isinstance(train, TextDataset):
        return OnTheFly(train)
    if isinstance(train, GradientStore):
        return Stored(train)
    raise ParameterError("train", train, "a TextDataset or a GradientStore")


class _Source:
    """What ``score`` asks of every source of training gradients: how many sequences, their
    ids, and where they are (a ``TextDataset`` and a ``GradientStore`` answer alike)."""

    def __init__(self, sequences: TextDataset | GradientStore) -> None:
        self.sequences = sequences
        self.source = sequences.source

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def ids(self) -> list[str]:
        return self.sequences.ids


class OnTheFly(_Source):
    """Training gradients computed from a dataset, batch by batch, and contracted at once."""

    codec = "exact (on the fly)"

    def __init__(self, dataset: TextDataset) -> None:
        super().__init__(dataset)
        self.dataset = dataset

    def check(self, model: nn.Module, factors: Factors, tokenizer):
        """Refuse sequences the model cannot take; the tokenizer to encode queries with."""
        sequences = (ex.input_ids for ex in self.dataset)
        check_sequences_fit(model, sequences, f"training data {self.source}")
        return self.dataset.tokenizer if tokenizer is None else tokenizer

    def settings(self, run: RunSettings) -> RunSettings:
        return run

    def max_factored_rank(self, name: str, n_queries: int) -> int:
        """None: queries stay exact on the fly (a truncated query would only add error)."""
        return 0

    def in_eigenbasis(self, name: str) -> bool:
        """Training gradients on the fly are met in the weights' own basis."""
        return False

    def scores(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        forms: dict[str, QueryForm],
        run: RunSettings,
        desc: str = "training gradients",
    ) -> Scores:
        longest = max((len(ex.input_ids) for ex in self.dataset), default=1)
        forms = {layer.name: _cheaper(forms[layer.name], longest, layer) for layer in layers}
        # Longest first: little padding per batch. Under torchrun every world-th batch (the
        # same batches one process makes).
        batches = example_batches(self.dataset, run.batch_size, length_order(self.dataset))
        for batch, io in run.captures(
            model,
            layers,
            distributed.my_share(batches),
            desc=desc,
            total=distributed.share_count(run.n_batches(len(self.dataset))),
            example_ids=self.dataset.ids,
        ):
            part = [contract_tokens(io[layer.name], forms[layer.name]) for layer in layers]
            yield np.asarray(batch.indices), torch.stack(part, -1).double().cpu().numpy()


class Stored(_Source):
    """Training gradients read from a store (compressed per layer by its codecs)."""

    def __init__(self, store: GradientStore) -> None:
        super().__init__(store)
        self.store = store
        self.codec = store.codec

    def check(self, model: nn.Module, factors: Factors, tokenizer):
        """Refuse a model, tokenizer, layers or eigenbasis the store was not built with."""
        tokenizer = self.store.tokenizer if tokenizer is None else tokenizer
        self.store.check(model=model, tokenizer=tokenizer, modules=factors.modules)
        kept = [name for name in factors.modules if self.in_eigenbasis(name)]
        # only layers kept in an eigenbasis: hashing a basis reads all of Q_S and Q_A
        self.store.check_eigenbasis(
            {name: factors.layers[name].basis_fingerprint() for name in kept}
        )
        return tokenizer

    def settings(self, run: RunSettings) -> RunSettings:
        """A float64 store is scored in float64."""
        return run.replace(dtype=torch.float64) if self.store.config.dtype == "float64" else run

    def max_factored_rank(self, name: str, n_queries: int) -> int:
        """The highest query rank layer ``name``'s codec contracts more cheaply than dense."""
        codec = self.store.codecs[self.store.modules.index(name)]
        return codec.max_factored_rank(n_queries)

    def in_eigenbasis(self, name: str) -> bool:
        """Whether layer ``name`` is kept in the curvature eigenbasis (``sparse``)."""
        codec = self.store.codecs[self.store.modules.index(name)]
        return getattr(codec, "eigenbasis", None) is not None

    def scores(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        forms: dict[str, QueryForm],
        run: RunSettings,
    ) -> Scores:
        names = [layer.name for layer in layers]
        queries = compressed_queries(self.store, names, [forms[name] for name in names])
        return stored_scores(
            self.store, names, queries, device=run.device, dtype=run.dtype, progress=run.progress
        )

    def exact_scores(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        forms: dict[str, torch.Tensor],
        run: RunSettings,
        candidates: np.ndarray,
    ) -> np.ndarray:
        """Exact per-layer scores ``(Q, K, L)`` of each query's candidate stored examples.

        The candidates' gradients are recomputed from their stored token ids (only those rows
        are read), through the same loop as on-the-fly scoring.
        """
        union = sorted(set(candidates.flatten().tolist()))
        tok = self.store.tokenizer
        rows = zip(union, self.store.token_ids(union), strict=True)
        examples = [
            Example(j, f"stored #{i}", "", tuple(ids), {}, tok) for j, (i, ids) in enumerate(rows)
        ]
        subset = TextDataset(examples, tok, self.store.config.max_length, f"{self.source} (refine)")
        keep = AllScores(len(candidates), len(union), len(layers))
        for indices, block in OnTheFly(subset).scores(model, layers, forms, run, "refining"):
            keep.add(indices, block)
        keep.combine()
        column = {index: j for j, index in enumerate(union)}
        picked = np.vectorize(column.__getitem__, otypes=[np.int64])(candidates)
        return keep.final()[0][np.arange(len(candidates))[:, None], picked]


def _cheaper(form: QueryForm, n_tokens: int, layer: TrackedLayer) -> QueryForm:
    """A rank-r query kept as factors where that contraction with ``n_tokens`` token pairs
    is cheaper than through the dense ``G_z``; else its dense product."""
    if isinstance(form, LowRank) and form.rank <= max_factored_rank(
        form.n_queries, n_tokens, layer.grad_shape
    ):
        return form
    return as_dense(form)


def contract_tokens(io: LayerIO, form: QueryForm) -> torch.Tensor:
    """``⟨P_q, G_z⟩`` for every query and sequence of a batch, ``(Q, B)``, from the tokens.

    ``G_z = Σ_t s_t a_tᵀ`` is exact both as the dense matrix (the ``dense`` codec's encoding)
    and as its ``T`` token factor pairs, which a rank-r query meets without forming it.
    """
    if isinstance(form, LowRank):
        return factored_inner(form, io.s, io.a)
    codec = DenseCodec(tuple(form.shape[1:]))
    return codec.contract(form, codec.encode(io.a, io.s))


def query_tokens(
    model: nn.Module,
    layers: list[TrackedLayer],
    queries: list[Query],
    tokenizer,
    run: RunSettings,
) -> dict[str, LayerIO]:
    """Each query's per-token ``a`` and ``s`` per layer, ``(n_queries, T, d)``, zero-padded.

    ``G_q = Σ_t s_t a_tᵀ`` is the gradient of ``-log p(completion | prompt)``; kept in this
    factored form, it is rotated and preconditioned at a fraction of the dense cost.
    """
    parts: dict[str, list[LayerIO]] = {layer.name: [] for layer in layers}
    for _, io in run.captures(
        model,
        layers,
        query_batches(queries, tokenizer, run.batch_size),
        desc="query gradients",
        total=run.n_batches(len(queries)),
        example_ids=[q.id for q in queries],
    ):
        for name, x in io.items():
            parts[name].append(x)
    length = max(x.a.shape[1] for x in parts[layers[0].name])
    return {
        name: LayerIO(
            a=torch.cat([zero_pad(x.a, length) for x in xs]),
            s=torch.cat([zero_pad(x.s, length) for x in xs]),
        )
        for name, xs in parts.items()
    }


def preconditioned(
    factors: Factors,
    tokens: dict[str, LayerIO],
    damping: dict[str, float],
    rank: int | None = None,
) -> dict[str, QueryForm]:
    """Each layer's ``P_q = (Ĝ + λI)⁻¹ G_q`` from the query tokens: dense, or its rank-``rank``
    truncated SVD as :class:`~influencekit.lowrank.LowRank`."""
    out: dict[str, QueryForm] = {}
    for name, x in tokens.items():
        layer = factors.layers[name]
        if rank is None:
            out[name] = layer.precondition_tokens(x.s, x.a, damping[name])
        else:
            out[name] = layer.precondition_truncated(x.s, x.a, damping[name], rank)
    return out


def query_forms(
    factors: Factors,
    tokens: dict[str, LayerIO],
    damping: dict[str, float],
    query_rank: int | str,
    source,
) -> dict[str, QueryForm]:
    """Each layer's preconditioned queries in the form ``source`` contracts them in.

    Where the source keeps that layer in the curvature eigenbasis (a ``sparse`` store), the
    queries stay there (``(Ĝ + λI)⁻¹ G_q`` rotated, never rotated back). Elsewhere, in the
    weights' basis: ``"full"``, exact; an int ``r``, the rank-r truncated SVD;
    ``"auto"``, cut to the smallest rank keeping ``AUTO_ENERGY`` of their squared norm where
    ``source`` contracts that rank more cheaply than exact dense queries
    (``source.max_factored_rank``), exact elsewhere. Deciding costs the singular values of
    each query in the eigenbasis, not the vectors.
    """
    out: dict[str, QueryForm] = {}
    rank = query_rank if isinstance(query_rank, int) else None
    for name, x in tokens.items():
        layer = factors.layers[name]
        kept_in_basis = source.in_eigenbasis(name)
        in_basis = layer.in_eigenbasis(x.s, x.a, damping[name], query_last=kept_in_basis)
        if kept_in_basis:
            out[name] = in_basis if rank is None else truncate(in_basis, rank=rank)
        elif rank is not None:
            out[name] = layer.truncated_from_eigenbasis(in_basis, rank)
        else:
            max_rank = source.max_factored_rank(name, x.a.shape[0])
            low = None
            if query_rank == "auto" and max_rank >= 1:
                low = layer.truncated_from_eigenbasis(
                    in_basis, energy=AUTO_ENERGY, max_rank=max_rank
                )
            out[name] = layer.from_eigenbasis(in_basis) if low is None else low
    return out


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
    checks.instance("factors", factors, Factors, "Factors (from fit_factors or Factors.load)")
    checks.instance("example", example, Example, "an Example (such as train[i])")
    checks.flag("per_layer", per_layer)
    run = RunSettings(batch_size=1, device=device, dtype=dtype, progress=False)
    (query,) = as_queries([query])
    tok = tokenizer if tokenizer is not None else example.tokenizer
    if tok is None:
        raise ParameterError(
            "tokenizer",
            None,
            "given: token_scores needs a tokenizer (pass tokenizer=, or an example taken from "
            "a TextDataset, train[i], which carries its tokenizer)",
        )
    lambdas = factors.damping_for(damping)
    layers = factors.tracked_layers(model)
    run = run.on(model)
    check_sequences_fit(model, [example.input_ids, query.encode(tok)[0]], f"example {example.id}")
    tokens = query_tokens(model, layers, [query], tok, run)
    pre = preconditioned(factors, tokens, lambdas)
    batch = collate([example.input_ids], [1], [example.index])
    ((_, io),) = run.captures(
        model, layers, [batch], desc="", example_ids={example.index: example.id}
    )
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
