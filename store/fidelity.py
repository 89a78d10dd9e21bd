"""How faithful a store's codec is: its scores against exact ones, measured at build time.

On a seeded probe sample of training sequences, each probe query's exact score
``⟨P_q, G_z⟩`` (the dense gradient, preconditioned with the factors given to the build, or
plain gradients without factors) is compared with the score the codec gives from what it
stores (encoded, rounded to the store's dtype, contracted). The probe queries are other
training sequences cut as queries are (their last ``QUERY_TOKENS`` tokens a completion, the
rest its prompt: a query's gradient comes from few tokens, and few-token gradients are the
hard case for compression), or queries the caller gives. The result, a :class:`Fidelity`, is kept
in the manifest: ``store.fidelity`` returns it and ``influencekit info`` prints it.

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

from influencekit.data import TextDataset, collate, example_batches, query_batches
from influencekit.lowrank import zero_pad
from influencekit.models import TrackedLayer
from influencekit.settings import RunSettings

from .codecs import DenseCodec, array_dtypes

PROBE_SEQUENCES = 64  # training sequences whose scores are compared
PROBE_QUERIES = 8  # probe queries (training sequences, unless queries are given)
QUERY_TOKENS = 16  # a probe query's completion: the last tokens of a training sequence
TOP_K = 10  # top-k overlap, at most a quarter of the probe sequences


@dataclass(frozen=True)
class Fidelity:
    """A codec's scores against exact ones on a probe sample (see the module docstring).

    ``pearson_min``/``pearson_mean``: over the probe queries, of the Pearson correlation
    between exact and stored scores across the probe sequences (``None`` where the exact
    scores do not vary); ``top_overlap``: mean ``|top-k ∩ exact top-k| / k``.
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


def measure(
    model: nn.Module,
    layers: list[TrackedLayer],
    codecs: list,
    train: TextDataset,
    run: RunSettings,
    *,
    dtype: str,
    factors=None,
    queries=None,
    seed: int = 0,
) -> Fidelity | None:
    """The fidelity of ``codecs`` (one per layer of ``layers``) on a probe of ``train``.

    ``queries``: probe queries (``Query`` records); default: ``PROBE_QUERIES`` training
    sequences. ``dtype``: the store's, which stored values are rounded to. None for an
    empty ``train``.
    """
    if len(train) == 0:
        return None
    order = np.random.default_rng(seed).permutation(len(train)).tolist()
    if queries is None:  # queries and probe sequences disjoint: no self-influence in a probe
        n_queries = min(PROBE_QUERIES, max(1, len(order) // 4)) if len(order) > 1 else 1
        chosen, rest = order[:n_queries], order[n_queries:] or order
        query_io = _tokens(run, model, layers, _tails(train, chosen, run.batch_size))
        source = f"training sequences, the last {QUERY_TOKENS} tokens as completion"
    else:
        batches = query_batches(queries, train.tokenizer, run.batch_size)
        query_io = _tokens(run, model, layers, batches)
        n_queries, rest, source = len(queries), order, "given queries"
    probe = rest[:PROBE_SEQUENCES]
    exact_forms, codec_forms = _query_forms(layers, codecs, query_io, factors)
    exact = np.zeros((n_queries, len(probe)))
    approx = np.zeros_like(exact)
    row_of = {index: row for row, index in enumerate(probe)}
    for batch, io in run.captures(
        model,
        layers,
        example_batches(train, run.batch_size, probe),
        desc="fidelity",
        progress=False,
    ):
        rows = [row_of[i] for i in batch.indices]
        for layer, codec, full, form in zip(layers, codecs, exact_forms, codec_forms, strict=True):
            x = io[layer.name]
            dense = DenseCodec(tuple(full.shape[1:]))
            exact[:, rows] += dense.contract(full, dense.encode(x.a, x.s)).double().cpu().numpy()
            kinds = array_dtypes(codec, dtype)
            stored = {k: _rounded(v, kinds[k]) for k, v in codec.encode(x.a, x.s).items()}
            approx[:, rows] += (
                codec.contract(codec.compress_query(form), stored).double().cpu().numpy()
            )
    return _compare(exact, approx, source, factors, dtype, seed)


def _tails(train: TextDataset, positions: list[int], batch_size: int):
    """Batches of training sequences scored on their last ``QUERY_TOKENS`` tokens only."""
    for lo in range(0, len(positions), batch_size):
        chosen = positions[lo : lo + batch_size]
        ids = [train[i].input_ids for i in chosen]
        starts = [max(1, len(seq) - QUERY_TOKENS) for seq in ids]
        yield collate(ids, starts, list(range(lo, lo + len(chosen))))


def _tokens(run, model, layers, batches) -> dict:
    """Each layer's ``(a, s)`` of every sequence in ``batches``, zero-padded to one length."""
    parts = {layer.name: [] for layer in layers}
    for _, io in run.captures(model, layers, batches, desc="fidelity queries", progress=False):
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


def _query_forms(layers, codecs, query_io, factors):
    """Per layer: the exact preconditioned queries (weights' basis, dense) and the form the
    codec meets (the same, or in the curvature eigenbasis for ``sparse``)."""
    exact, forms = [], []
    for layer, codec in zip(layers, codecs, strict=True):
        a, s = query_io[layer.name]
        if factors is None:
            full = s.transpose(1, 2) @ a
            exact.append(full)
            forms.append(full)
            continue
        fitted = factors.layers[layer.name]
        in_basis = fitted.in_eigenbasis(s, a, fitted.default_damping())
        full = fitted.from_eigenbasis(in_basis)
        exact.append(full)
        forms.append(in_basis if getattr(codec, "eigenbasis", None) is not None else full)
    return exact, forms


def _rounded(value: torch.Tensor, kind: np.dtype) -> torch.Tensor:
    """A stored float array rounded to its on-disk dtype ``kind`` (and back); integer
    arrays as they are."""
    if not value.is_floating_point():
        return value
    return value.to(getattr(torch, kind.name)).to(value.dtype)


def _compare(exact, approx, source, factors, dtype, seed) -> Fidelity:
    pearsons = []
    for e, a in zip(exact, approx, strict=True):
        if np.std(e) > 0 and np.std(a) > 0:
            pearsons.append(float(np.corrcoef(e, a)[0, 1]))
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
        queries=source,
        preconditioner="none (plain gradients)"
        if factors is None
        else f"{factors.strategy} factors",
        dtype=dtype,
        seed=seed,
    )
