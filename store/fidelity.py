"""How faithful a store's codecs are: their scores against exact ones, measured at build time.

On a seeded probe sample of training sequences, each probe query's exact score
``⟨P_q, G_z⟩`` (the dense gradient, preconditioned with the factors given to the build, or
plain gradients without factors) is compared with the score a codec gives from what it
stores (encoded, rounded to the store's dtype, contracted). The probe queries are other
training sequences cut as queries are (their last ``QUERY_TOKENS`` tokens a completion, the
rest its prompt: a query's gradient comes from few tokens, and few-token gradients are the
hard case for compression), or queries the caller gives.

A :class:`Probe` measures per layer, for any number of candidate codecs at once
(:meth:`Probe.layer_scores`): the build's default uses that to choose each layer's codec
(:mod:`influencekit.store.budget`), and :func:`measure` to record the chosen store's
:class:`Fidelity` in the manifest (``store.fidelity``, printed by ``influencekit info``).
Layers are probed in groups that fit the build's memory budget, one pass over the probe
sequences each.

This is a check of the compression alone, at the build's model and factors: it says
nothing of how well influence predicts retraining (``influencekit.validate`` does).

Example:
    >>> store = GradientStore.build("g.h5", model, train, factors=factors)  # doctest: +SKIP
    >>> print(store.fidelity)                                              # doctest: +SKIP
    Pearson 0.91 (min) / 0.95 (mean), top-10 overlap 0.86: 8 probe queries ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from influencekit import memory
from influencekit.data import TextDataset, collate, example_batches, query_batches
from influencekit.factors import LayerFactors
from influencekit.forms import QueryNeeds, query_form
from influencekit.lowrank import zero_pad
from influencekit.models import TrackedLayer
from influencekit.settings import RunSettings

from .codecs import CodecSpec, DenseCodec

PROBE_SEQUENCES = 64  # training sequences whose scores are compared
PROBE_QUERIES = 8  # probe queries (training sequences, unless queries are given)
QUERY_TOKENS = 16  # a probe query's completion: the last tokens of a training sequence
TOP_K = 10  # top-k overlap, at most a quarter of the probe sequences


@dataclass(frozen=True)
class Fidelity:
    """A store's scores against exact ones on a probe sample (see the module docstring).

    ``pearson_min``/``pearson_mean``: over the probe queries, of the Pearson correlation
    between exact and stored scores across the probe sequences (``None`` where the exact
    scores do not vary); ``top_overlap``: mean ``|top-k ∩ exact top-k| / k``. ``choice``:
    for a store whose codecs were chosen by the probe, per layer the codec chosen and each
    candidate's mean Pearson on that layer alone (None otherwise).
    """

    pearson_min: float | None
    pearson_mean: float | None
    top_overlap: float
    top_k: int
    n_sequences: int
    n_queries: int
    queries: str  # "training sequences" or "given queries"
    preconditioner: str  # e.g. "ekfac factors", or "none (plain gradients)"
    dtype: str  # the store's dtype the stored values were rounded to
    seed: int
    choice: list[dict] | None = None

    def __str__(self) -> str:
        if self.pearson_min is None:
            pearson = "Pearson undefined (exact scores constant)"
        else:
            pearson = f"Pearson {self.pearson_min:.3f} (min) / {self.pearson_mean:.3f} (mean)"
        return (
            f"{pearson}, top-{self.top_k} overlap {self.top_overlap:.2f}: {self.n_queries} "
            f"probe queries ({self.queries}) against exact scores of {self.n_sequences} "
            f"training sequences, preconditioned with {self.preconditioner}, "
            f"stored in {self.dtype}, seed {self.seed}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Fidelity:
        return cls(**data)


class Probe:
    """The probe of one build: which training sequences are probe queries and which are
    scored (seeded), the model, its tracked layers, the factors (or None) and the store's
    dtype, which stored values are rounded to.

    Example:
        >>> probe = Probe(model, layers, train, run, dtype="float16")  # doctest: +SKIP
        >>> exact, approx = probe.layer_scores({name: [codec]})[name]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        train: TextDataset,
        run: RunSettings,
        *,
        dtype: str,
        factors=None,
        queries=None,
        seed: int = 0,
    ) -> None:
        self.model, self.layers, self.train, self.run = model, layers, train, run
        self.dtype, self.factors, self.seed = dtype, factors, seed
        self.given = queries
        order = np.random.default_rng(seed).permutation(len(train)).tolist()
        if queries is None:  # queries and probe sequences disjoint: no self-influence
            n_queries = min(PROBE_QUERIES, max(1, len(order) // 4)) if len(order) > 1 else 1
            self.query_rows, rest = order[:n_queries], order[n_queries:] or order
            self.source = f"training sequences, the last {QUERY_TOKENS} tokens as completion"
        else:
            self.query_rows, rest = None, order
            self.source = "given queries"
        self.sequences = rest[:PROBE_SEQUENCES]
        self.n_queries = len(queries) if queries is not None else len(self.query_rows)

    @property
    def preconditioner(self) -> str:
        if self.factors is None:
            return "none (plain gradients)"
        return f"{self.factors.strategy} factors"

    def layer_factors(self, layer: TrackedLayer) -> tuple[LayerFactors, float]:
        """The layer's factors and default damping (an empty stand-in, damping 1, without
        factors: ``P_q`` is then the plain gradient)."""
        if self.factors is None:
            return LayerFactors(layer.name, layer.grad_shape), 1.0
        found = self.factors.layers[layer.name]
        return found, found.default_damping()

    def layer_cost(self, layer: TrackedLayer, n_candidates: int) -> int:
        """Bytes probing ``layer`` holds: its exact dense queries and up to as many per
        candidate, and its captured tokens for a batch."""
        d_out, d_in = layer.grad_shape
        item = torch.empty(0, dtype=self.run.dtype).element_size()
        forms = (1 + n_candidates) * self.n_queries * d_out * d_in * item
        return forms + 4 * item * self.run.batch_size * self.longest() * (d_out + d_in)

    def fixed_cost(self) -> int:
        """Bytes every group holds: the model's activations and one batch's dense gradients."""
        d = max(layer.grad_shape[0] * layer.grad_shape[1] for layer in self.layers)
        item = torch.empty(0, dtype=self.run.dtype).element_size()
        activations = memory.activation_bytes(self.model, self.run.batch_size, self.longest())
        return activations + 2 * self.run.batch_size * d * item

    def longest(self) -> int:
        rows = self.sequences + (self.query_rows or [])
        return max((len(self.train[i].input_ids) for i in rows), default=1)

    def groups(self, n_candidates: int, limit: int) -> list[list[TrackedLayer]]:
        """The tracked layers in groups whose probing fits ``limit`` bytes."""
        costs = [self.layer_cost(layer, n_candidates) for layer in self.layers]
        plan = memory.Plan(costs, self.fixed_cost(), limit)
        plan.warn_if_over("GradientStore.build (fidelity probe)")
        return [[self.layers[j] for j in group] for group in plan.groups]

    def layer_scores(
        self, candidates: dict[str, list], layers: list[TrackedLayer] | None = None
    ) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
        """For each layer named in ``candidates`` (one group: probed in one pass), its exact
        scores ``(Q, P)`` and each candidate codec's ``(Q, P)`` on the probe sequences.

        The codecs are attached to the layer's factors for the pass (:meth:`Codec.attach`)
        and let go after it."""
        layers = [layer for layer in (layers or self.layers) if layer.name in candidates]
        query_io = self._query_tokens(layers)
        forms = {
            layer.name: self._forms(layer, candidates[layer.name], query_io) for layer in layers
        }
        try:
            return self._scores(layers, candidates, forms)
        finally:
            for layer in layers:
                for codec in candidates[layer.name]:
                    codec.detach()

    def _scores(self, layers, candidates, forms):
        """One pass over the probe sequences: exact and candidate scores per layer."""
        n_probe = len(self.sequences)
        exact = {layer.name: np.zeros((self.n_queries, n_probe)) for layer in layers}
        approx = {
            layer.name: [np.zeros_like(exact[layer.name]) for _ in candidates[layer.name]]
            for layer in layers
        }
        row_of = {index: row for row, index in enumerate(self.sequences)}
        batches = example_batches(self.train, self.run.batch_size, self.sequences)
        for batch, io in self.run.captures(
            self.model, layers, batches, desc="fidelity", progress=False
        ):
            rows = [row_of[i] for i in batch.indices]
            for layer in layers:
                x = io[layer.name]
                full, codec_forms = forms[layer.name]
                dense = DenseCodec.create(CodecSpec("dense"), layer.grad_shape)
                exact[layer.name][:, rows] += _numpy(dense.contract(full, dense.encode(x.a, x.s)))
                for codec, form, out in zip(
                    candidates[layer.name], codec_forms, approx[layer.name], strict=True
                ):
                    kinds = codec.array_dtypes(self.dtype)
                    stored = {k: _rounded(v, kinds[k]) for k, v in codec.encode(x.a, x.s).items()}
                    out[:, rows] += _numpy(codec.contract(form, stored))
        return {layer.name: (exact[layer.name], approx[layer.name]) for layer in layers}

    def _query_tokens(self, layers: list[TrackedLayer]) -> dict:
        """Each layer's ``(a, s)`` of every probe query, zero-padded to one length."""
        if self.given is None:
            batches = _tails(self.train, self.query_rows, self.run.batch_size)
        else:
            batches = query_batches(self.given, self.train.tokenizer, self.run.batch_size)
        parts = {layer.name: [] for layer in layers}
        for _, io in self.run.captures(
            self.model, layers, batches, desc="fidelity queries", progress=False
        ):
            for name, x in io.items():
                parts[name].append((x.a, x.s))
        out = {}
        for name, pairs in parts.items():
            length = max(a.shape[1] for a, _ in pairs)
            out[name] = (
                torch.cat([zero_pad(a, length) for a, _ in pairs]),
                torch.cat([zero_pad(s, length) for _, s in pairs]),
            )
        return out

    def _forms(self, layer: TrackedLayer, codecs: list, query_io: dict):
        """The exact preconditioned queries (weights' basis, dense) and each codec's form of
        them, as scoring would give it (``query_rank="auto"``); the codecs attached."""
        a, s = query_io[layer.name]
        fitted, damping = self.layer_factors(layer)
        for codec in codecs:
            codec.attach(fitted if self.factors is not None else None)
        full = query_form(fitted, s, a, damping, QueryNeeds())
        forms = []
        for codec in codecs:
            needs = codec.query_needs(a.shape[0])
            plain = needs.basis == "weights" and needs.auto_rank == 0
            form = full if plain else query_form(fitted, s, a, damping, needs, "auto")
            forms.append(codec.compress_query(form))
        if self.factors is not None:
            fitted.release()
        return full, forms


def compare(probe: Probe, exact: np.ndarray, approx: np.ndarray, choice=None) -> Fidelity:
    """The :class:`Fidelity` of total scores ``approx`` against ``exact`` (both ``(Q, P)``)."""
    pearsons = [pearson(e, a) for e, a in zip(exact, approx, strict=True)]
    pearsons = [p for p in pearsons if p is not None]
    k = max(1, min(TOP_K, exact.shape[1] // 4))
    overlap = [
        len(set(np.argsort(-e)[:k].tolist()) & set(np.argsort(-a)[:k].tolist())) / k
        for e, a in zip(exact, approx, strict=True)
    ]
    complete = len(pearsons) == len(exact) and len(pearsons) > 0
    return Fidelity(
        pearson_min=min(pearsons) if complete else None,
        pearson_mean=float(np.mean(pearsons)) if complete else None,
        top_overlap=float(np.mean(overlap)),
        top_k=k,
        n_sequences=exact.shape[1],
        n_queries=exact.shape[0],
        queries=probe.source,
        preconditioner=probe.preconditioner,
        dtype=probe.dtype,
        seed=probe.seed,
        choice=choice,
    )


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's correlation of two score rows, None where either does not vary."""
    if np.std(x) > 0 and np.std(y) > 0:
        return float(np.corrcoef(x, y)[0, 1])
    return None


def _tails(train: TextDataset, positions: list[int], batch_size: int):
    """Batches of training sequences scored on their last ``QUERY_TOKENS`` tokens only."""
    for lo in range(0, len(positions), batch_size):
        chosen = positions[lo : lo + batch_size]
        ids = [train[i].input_ids for i in chosen]
        starts = [max(1, len(seq) - QUERY_TOKENS) for seq in ids]
        yield collate(ids, starts, list(range(lo, lo + len(chosen))))


def _rounded(value: torch.Tensor, kind: np.dtype) -> torch.Tensor:
    """A stored float array rounded to its on-disk dtype ``kind`` (and back); integer
    arrays as they are."""
    if not value.is_floating_point():
        return value
    return value.to(getattr(torch, kind.name)).to(value.dtype)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.double().cpu().numpy()
