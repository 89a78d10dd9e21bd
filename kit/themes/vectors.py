"""How sequences become vectors for themes: TF-IDF of their words, a model's hidden states,
their training gradients preconditioned by the curvature (computed with the model, or read
from a gradient store), and the unit vectors all methods are clustered as.

Example:
    >>> units = unit_vectors(["a cat", "a dog"], "gradient", np.eye(2) * 3, None, 0)
    >>> units.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import re

import numpy as np

from .. import checks
from ..errors import DataError, ParameterError

SKETCH = 32  # influence vectors: a layer of more than SKETCH² entries is sketched to SKETCH²
WORD = r"(?u)\b[a-zA-Z][a-zA-Z]+\b"  # words of 2+ letters: no numbers or punctuation
CONTRACTION = re.compile(r"\b[a-z]+['’](?:t|re|ll|ve|m|d)\b")  # don't, they're, we'll, I'm
POSSESSIVE = re.compile(r"['’]s\b")  # the world's, it's


def plain_text(text: str) -> str:
    """``text`` as themes read its words: lower case, contractions left out whole (function
    words, whose fragments such as "don" or "doesn" would otherwise count as words) and
    possessives cut to their word.

    Example:
        >>> plain_text("Don't tell the World's cat, it's late")
        '  tell the world cat, it late'
    """
    return POSSESSIVE.sub("", CONTRACTION.sub(" ", text.lower()))


def mean_hidden_states(
    model, dataset, indices=None, *, layer: int = -1, batch_size: int = 16, device=None
) -> np.ndarray:
    """``(n, hidden)``: each sequence's hidden state at ``layer`` averaged over its tokens.

    ``layer`` indexes ``output_hidden_states`` (0 = embeddings, -1 = the last block).

    Example:
        >>> vectors = mean_hidden_states(model, train, [0, 5, 9])   # doctest: +SKIP
    """
    import torch

    from ..data import collate, padding_id
    from ..models import resolve_device

    checks.count("layer", layer, minimum=None)  # an index into output_hidden_states
    batch_size = checks.count("batch_size", batch_size)
    device = checks.device("device", device)
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    examples = [dataset[i] for i in indices]
    device = resolve_device(model, device)
    pad = padding_id(dataset.tokenizer)
    out = []
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            ids = [ex.input_ids for ex in chunk]
            batch = collate(ids, [1] * len(ids), list(range(len(ids))), pad).to(device)
            hidden = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            ).hidden_states[layer]
            mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def influence_vectors(
    model,
    factors,
    dataset,
    indices=None,
    *,
    damping=None,
    sketch: int | None = SKETCH,
    seed: int = 0,
    batch_size: int = 8,
    device=None,
    dtype="float32",
) -> np.ndarray:
    """``(n, D)``: each sequence's training gradient in the curvature eigenbasis of every
    layer of ``factors``, divided by ``sqrt(Λ + λ)`` (:meth:`LayerFactors.whitened`): dot
    products of two rows are the influence of one sequence on the other,
    ``Σ_ℓ ⟨G_a, (Ĝ + λI)⁻¹ G_b⟩``, and their cosines the similarity ``method="influence"``
    clusters by. A layer of more than ``sketch²`` entries is compressed to ``sketch × sketch``
    by a fixed seeded Gaussian on each side (``P W Rᵀ``, ``E[PᵀP] = E[RᵀR] = I``: unbiased dot
    products); ``sketch=None`` keeps every entry.

    Example:
        >>> vectors = influence_vectors(model, factors, train, [0, 5, 9])  # doctest: +SKIP
        >>> cluster(texts, "influence", vectors=vectors)                    # doctest: +SKIP
    """
    import torch

    from ..data import example_batches
    from ..settings import RunSettings

    checks.count("sketch", sketch, optional=True)
    run = RunSettings(batch_size=batch_size, device=device, dtype=dtype, progress=False)
    run = run.on(model)
    layers = factors.tracked_layers(model)
    damping = factors.damping_for(damping)
    chosen = dataset.subset(range(len(dataset)) if indices is None else [int(i) for i in indices])
    shapes = {layer.name: layer.grad_shape for layer in layers}
    sides = _sketch_sides(shapes, sketch, seed, device=run.device, dtype=run.dtype)
    rows = []
    batches = example_batches(chosen, run.batch_size)
    for _, io in run.captures(model, layers, batches, desc="influence vectors", progress=False):
        parts = []
        for layer in layers:
            x = io[layer.name]
            w = factors.layers[layer.name].whitened(x.s, x.a, damping[layer.name])
            parts.append(_sketched(w, sides.get(layer.name)))
        rows.append(torch.cat(parts, dim=1).double().cpu().numpy())
    return np.concatenate(rows)


def stored_influence_vectors(
    store,
    factors,
    indices=None,
    *,
    damping=None,
    sketch: int | None = SKETCH,
    seed: int = 0,
    rows: int = 16,
) -> np.ndarray:
    """:func:`influence_vectors` of stored sequences, from their gradients as the store keeps
    them (decoded by its codec) instead of a model's forward and backward passes: the same
    vectors, sketched the same way, for a ``dense`` store or a ``lowrank`` one of full rank;
    for ``sparse`` and lower ranks, those of the stored approximations. ``indices``: store
    rows (default all); ``rows``: sequences read and decoded at a time. ``kron`` and ``eig``
    stores keep projections of the gradients, which cannot be preconditioned.

    Example:
        >>> vectors = stored_influence_vectors(store, factors, [0, 5, 9])  # doctest: +SKIP
    """
    import torch

    from ..store.codecs import stored_tensor

    checks.count("sketch", sketch, optional=True)
    rows = checks.count("rows", rows)
    store.check(modules=factors.modules)
    kept = {name: layer.basis_fingerprint() for name, layer in factors.layers.items()}
    store.check_eigenbasis(kept)
    positions = {name: store.modules.index(name) for name in factors.modules}
    projected = [n for n, j in positions.items() if not store.codecs[j].keeps_whole]
    if projected:
        raise ParameterError(
            "store",
            store.path,
            f"a store of whole gradients (dense, lowrank, sparse): its codec {store.codec!r} "
            f"keeps projections of layer {projected[0]}'s, which cannot be preconditioned; "
            "pass model= to compute them on the fly",
        )
    damping = factors.damping_for(damping)
    indices = list(range(len(store))) if indices is None else [int(i) for i in indices]
    shapes = {name: factors.layers[name].shape for name in factors.modules}
    sides = _sketch_sides(shapes, sketch, seed, device="cpu", dtype=torch.float64)
    blocks = []
    for lo in range(0, len(indices), rows):  # every layer of a few rows per read
        layers = store.rows(indices[lo : lo + rows], list(positions.values()))
        parts = []
        for name, arrays in zip(positions, layers, strict=True):
            codec, layer = store.codecs[positions[name]], factors.layers[name]
            stored = {key: stored_tensor(value, torch.float64) for key, value in arrays.items()}
            in_eigenbasis = codec.eigenbasis is not None
            w = layer.whiten(codec.decode(stored), damping[name], in_eigenbasis=in_eigenbasis)
            parts.append(_sketched(w, sides.get(name)))
        blocks.append(torch.cat(parts, dim=1))
    return torch.cat(blocks).numpy() if blocks else np.zeros((0, 0))


def _sketch_sides(shapes: dict, sketch: int | None, seed: int, *, device, dtype) -> dict:
    """``{layer: (P, R)}``: for each layer of more than ``sketch²`` entries, in order, the
    seeded Gaussian ``(sketch, d_out)`` and ``(sketch, d_in)`` sketches, scaled so that
    ``E[PᵀP] = I``; the same for the same shapes and seed, wherever the gradients come from."""
    import torch

    generator = torch.Generator().manual_seed(checks.count("seed", seed, minimum=0))
    sides = {}
    for name, (d_out, d_in) in shapes.items():
        if sketch is not None and d_out * d_in > sketch * sketch:
            sides[name] = [
                (torch.randn(sketch, d, generator=generator, dtype=torch.float64) / sketch**0.5).to(
                    device=device, dtype=dtype
                )
                for d in (d_out, d_in)
            ]
    return sides


def _sketched(w, side):
    """Whitened gradients ``w`` ``(B, d_out, d_in)`` as rows: sketched to ``P w Rᵀ`` where the
    layer has sketches ``side = (P, R)`` (:func:`_sketch_sides`), else whole."""
    from ..lowrank import times_stack

    if side is not None:
        left, right = side
        w = times_stack(left, w) @ right.T
    return w.flatten(1)


def unit_vectors(texts, method, vectors, gram, seed) -> np.ndarray:
    """One row per text, unit length, whose dot products are the cosine similarities."""
    if method == "tfidf":
        vectors = tfidf_vectors(texts, seed)
    elif gram is not None:
        vectors = from_gram(gram, len(texts))
    vectors = np.asarray(vectors, dtype=np.float64)
    if not np.isfinite(vectors).all():
        raise DataError("themes: the vectors or Gram matrix contain NaN or inf")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def tfidf_vectors(texts: list[str], seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        matrix = TfidfVectorizer(
            stop_words="english", token_pattern=WORD, preprocessor=plain_text, sublinear_tf=True
        ).fit_transform(texts)
    except ValueError:  # nothing but stop words: every text alike
        return np.ones((len(texts), 1))
    # Short texts share few words: LSA (truncated SVD) lets synonyms' co-occurrence count.
    dims = min(100, matrix.shape[1] - 1, len(texts) - 1)
    if dims >= 2 and matrix.shape[1] > 100:
        return TruncatedSVD(dims, random_state=seed).fit_transform(matrix)
    return matrix.toarray()


def from_gram(gram: np.ndarray, n: int) -> np.ndarray:
    """Rows ``V sqrt(Λ₊)`` of the cosine matrix of ``gram``: their dot products equal it."""
    if gram.shape != (n, n):
        raise ParameterError("gram", gram, f"({n}, {n}) for {n} texts, not of shape {gram.shape}")
    if not np.isfinite(gram).all():
        raise DataError("themes: the vectors or Gram matrix contain NaN or inf")
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    norms[norms == 0] = 1  # a zero gradient stays a zero row
    cosine = gram / np.outer(norms, norms)
    values, vecs = np.linalg.eigh((cosine + cosine.T) / 2)
    keep = values > 1e-10 * max(values.max(), 1e-300)
    return vecs[:, keep] * np.sqrt(values[keep])
