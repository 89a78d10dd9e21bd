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
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import checks, distributed, memory
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
from .forms import QueryNeeds, query_form
from .hooks import LayerIO
from .keep import AllScores, keeper
from .lowrank import (
    LowRank,
    QueryForm,
    factored_inner,
    max_factored_rank,
    zero_pad,
)
from .models import TrackedLayer, check_sequences_fit
from .result import InfluenceResult
from .settings import RunSettings
from .store import GradientStore
from .store.codecs import CodecSpec, DenseCodec
from .store.reader import BLOCK_BYTES
from .store.scoring import compressed_queries, stored_scores

Scores = Iterator[tuple[np.ndarray, np.ndarray]]  # (training indices (B,), scores (Q, B, L))
QUERY_RANKS = ("auto", "full")  # or an int >= 1


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
    max_memory: int | str | None = None,
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
    ``max_memory``: bytes (or ``"8GiB"``) scoring may hold on its device, default half the
    memory free there: the layers' preconditioned queries are made and met in groups that
    fit, one pass over the training gradients per group (one pass when all fit). Each
    layer's factors are read (from a factors file) only while its queries are made.

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
    if max_memory is not None:
        memory.parse_bytes(max_memory, "max_memory")
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
    width = None if top_k is None else max(top_k, refine or 0)
    kept = len(queries) * len(layers) * 8 * (len(source) if width is None else 2 * width)
    groups = plan_groups(
        model, factors, layers, queries, tokenizer, source, run, max_memory, kept=kept
    )

    keep = keeper(len(queries), len(source), len(layers), width, grouped=len(groups) > 1)
    ranks = {}
    for group in groups:
        chosen = [layers[j] for j in group]
        tokens = query_tokens(model, chosen, queries, tokenizer, run)
        forms = query_forms(factors, tokens, lambdas, query_rank, source)
        ranks.update({n: f.rank if isinstance(f, LowRank) else "full" for n, f in forms.items()})
        for indices, block in source.scores(model, chosen, forms, run):
            keep.add(indices, block, group)
        del tokens, forms
    keep.combine()
    meta = {
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "damping": lambdas,
        "query_rank": query_rank,
        "query_ranks": {layer.name: ranks[layer.name] for layer in layers},
        "top_k": top_k,
        "refine": refine,
        "source": source.source,
        "codec": source.codec,
        "model_fingerprint": factors.fingerprint,
        "layer_groups": len(groups),
    }
    if refine is not None:  # exact scores, with the full-rank P_q, replace the candidates'
        candidates = keep.best(refine)
        exact = np.zeros((*candidates.shape, len(layers)))
        for group in groups:
            chosen = [layers[j] for j in group]
            tokens = query_tokens(model, chosen, queries, tokenizer, run)
            full = preconditioned(factors, tokens, lambdas)  # weights' basis, untruncated
            exact[..., group] = source.exact_scores(model, chosen, full, run, candidates)
            del tokens, full
        keep.replace(candidates, exact)
        meta["refined"] = candidates.tolist()
    layer_scores, indices = keep.final(top_k)
    names = [layer.name for layer in layers]
    ids = [q.id for q in queries]
    return InfluenceResult(layer_scores, names, source.ids, ids, meta, indices, queries)


def plan_groups(model, factors, layers, queries, tokenizer, source, run, max_memory, kept=0):
    """The groups of layers ``score`` takes in turn under ``max_memory`` (indices into
    ``layers``). Per layer: its preconditioned queries in the form the source needs, with
    the intermediates of making them, and what the source holds for it while it streams.
    Fixed: the model's activations for a batch, one layer's factors read from a file, and
    the ``kept`` bytes of the scores themselves."""
    limit = memory.max_memory(max_memory, run.device)
    item = torch.empty(0, dtype=run.dtype).element_size()
    n = len(queries)
    longest = max(len(q.encode(tokenizer)[0]) for q in queries)
    costs = [source.layer_bytes(layer, n, item, run) for layer in layers]
    factor_bytes = max(
        (factors.layers[layer.name].nbytes() for layer in layers if factors.path), default=0
    )
    fixed = memory.activation_bytes(model, run.batch_size, max(longest, source.longest()))
    fixed += factor_bytes + source.fixed_bytes(layers, n, item, run) + kept
    plan = memory.Plan(costs, fixed, limit)
    plan.warn_if_over("score")
    return plan.groups


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
    ids, where they are, what form each layer's queries must take, and what it holds."""

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

    def longest(self) -> int:
        return max((len(ex.input_ids) for ex in self.dataset), default=1)

    def needs(self, layer: TrackedLayer, n_queries: int) -> QueryNeeds:
        """Queries in the weights' basis, exact under ``"auto"`` (a truncated query would
        only add error); a truncated one stays factored where meeting the token pairs of
        the longest sequence that way is cheaper than through the dense ``G_z``."""
        rank = max_factored_rank(n_queries, self.longest(), layer.grad_shape)
        return QueryNeeds(factored_rank=rank)

    def layer_bytes(self, layer: TrackedLayer, n_queries: int, item: int, run) -> int:
        """Dense queries and their making (three copies), and a batch's captured tokens."""
        d_out, d_in = layer.grad_shape
        return item * (
            3 * n_queries * d_out * d_in + 4 * run.batch_size * self.longest() * (d_out + d_in)
        )

    def fixed_bytes(self, layers, n_queries: int, item: int, run) -> int:
        """One layer's dense gradients of a batch, met one layer at a time."""
        return (
            item
            * run.batch_size
            * max(layer.grad_shape[0] * layer.grad_shape[1] for layer in layers)
        )

    def scores(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        forms: dict[str, QueryForm],
        run: RunSettings,
        desc: str = "training gradients",
    ) -> Scores:
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
        kept = [name for name in factors.modules if self._codec(name).eigenbasis is not None]
        # only layers kept in an eigenbasis: hashing a basis reads all of Q_S and Q_A
        self.store.check_eigenbasis(
            {name: factors.layers[name].basis_fingerprint() for name in kept}
        )
        return tokenizer

    def _codec(self, name: str):
        return self.store.codecs[self.store.modules.index(name)]

    def settings(self, run: RunSettings) -> RunSettings:
        """A float64 store is scored in float64."""
        return run.replace(dtype=torch.float64) if self.store.config.dtype == "float64" else run

    def longest(self) -> int:
        return 1  # nothing is captured but the queries

    def needs(self, layer: TrackedLayer, n_queries: int) -> QueryNeeds:
        """What layer ``layer``'s codec asks of its queries."""
        return self._codec(layer.name).query_needs(n_queries)

    def layer_bytes(self, layer: TrackedLayer, n_queries: int, item: int, run) -> int:
        """The layer's queries in its codec's form, and their making (dense in the
        eigenbasis of its window, or of the whole layer, before they are compressed)."""
        codec = self._codec(layer.name)
        window = getattr(codec, "window_shape", layer.grad_shape)
        kept = window[0] * window[1] if codec.eigenbasis is not None else np.prod(layer.grad_shape)
        return int(item * 3 * n_queries * kept)

    def fixed_bytes(self, layers, n_queries: int, item: int, run) -> int:
        """The store blocks read at once, and their decoded copies."""
        return 4 * BLOCK_BYTES

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


def contract_tokens(io: LayerIO, form: QueryForm) -> torch.Tensor:
    """``⟨P_q, G_z⟩`` for every query and sequence of a batch, ``(Q, B)``, from the tokens.

    ``G_z = Σ_t s_t a_tᵀ`` is exact both as the dense matrix (the ``dense`` codec's encoding)
    and as its ``T`` token factor pairs, which a rank-r query meets without forming it.
    """
    if isinstance(form, LowRank):
        return factored_inner(form, io.s, io.a)
    codec = DenseCodec.create(CodecSpec("dense"), tuple(form.shape[1:]))
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
    needs = QueryNeeds(factored_rank=rank or 0)
    return {
        name: _released(
            factors.layers[name],
            query_form(factors.layers[name], x.s, x.a, damping[name], needs, rank or "full"),
        )
        for name, x in tokens.items()
    }


def query_forms(
    factors: Factors,
    tokens: dict[str, LayerIO],
    damping: dict[str, float],
    query_rank: int | str,
    source,
) -> dict[str, QueryForm]:
    """Each layer's preconditioned queries in the form ``source`` contracts them in
    (:func:`~influencekit.forms.query_form`, as ``source.needs`` asks). Each layer's factors
    read from a file are let go once its queries are made."""
    out: dict[str, QueryForm] = {}
    for name, x in tokens.items():
        layer = factors.layers[name]
        needs = source.needs(_Layer(name, layer.shape), x.a.shape[0])
        out[name] = _released(layer, query_form(layer, x.s, x.a, damping[name], needs, query_rank))
    return out


@dataclass(frozen=True)
class _Layer:
    """A layer's name and gradient shape, as ``needs`` asks them."""

    name: str
    grad_shape: tuple[int, int]


def _released(layer, form: QueryForm) -> QueryForm:
    """``form``, after ``layer`` let go of what it read from its file."""
    layer.release()
    return form


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
    batch = collate([example.input_ids], [1], [example.index])
    ((_, io),) = run.captures(
        model, layers, [batch], desc="", example_ids={example.index: example.id}
    )
    columns = []
    for layer in layers:  # one layer's dense P_q at a time
        pre = preconditioned(factors, {layer.name: tokens[layer.name]}, lambdas)[layer.name]
        x = io[layer.name]
        columns.append(((x.s[0] @ pre[0]) * x.a[0]).sum(-1))
        del pre
    table = torch.stack(columns, dim=-1).double().cpu().numpy()
    if not np.isfinite(table).all():
        raise NonFiniteError(
            f"non-finite token score for query {query.id!r}, example {example.id!r}"
        )
    return table if per_layer else table.sum(-1)
