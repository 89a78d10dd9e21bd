"""Numerical reference tests: the kit against slow, obvious brute force, all in float64.

Every check compares influencekit with a reference written from scratch in
tests/helpers/reference.py, which never calls the kit's numerical helpers: one sequence at a
time (batch size 1, no padding, no attention mask), ``torch.autograd.grad`` of the summed
loss with respect to the modules' own weights and biases, explicit covariance matrices,
``torch.linalg.eigh``, dense Kronecker products (``torch.kron``) and dense solves. The math
is docs/math.md.

1. ``hooks.capture`` on a padded batch: per-sequence ``Σ_t s_t a_tᵀ`` equals the autograd
   gradient of the weight (and bias), Conv1D and Linear, with and without bias, real and
   sampled labels; ``a`` and ``s`` are exactly zero at padded positions.
2. ``fit_factors``: ``A``, ``S``, their eigenvalues and ``Λ`` equal the brute force for
   ``ekfac``, ``kfac`` and ``diagonal``, empirical and sampled Fisher.
3. ``score``: each layer score equals ``vec(G_q)ᵀ H⁻¹ vec(G_z)`` with the dense
   ``H = (Q_S ⊗ Q_A) diag(vec(Λ) + λ) (Q_S ⊗ Q_A)ᵀ`` built from the *reference* factors, for
   every strategy, default and explicit damping; ``scores`` is ``layer_scores`` summed.
4. ``token_scores``: ``s_tᵀ P_q a_t`` with an explicit ``P_q``; per layer and in total they sum
   to the pair score.
5. Scores do not depend on the tokenizer's padding side. (Batch size, which also covers the
   batching of the sampled-Fisher labels, is tested in test_reproducible.py.)
6. ``query_rank``: a rank at least ``min(d_out, d_in)`` changes nothing; a small rank equals
   the explicit truncated SVD of the reference ``P_q``.
7. Sign: a positive score means up-weighting the training sequence raises
   ``log p(completion | prompt)``, checked by a finite difference of the actual model.

Tolerances: ``rtol`` 1e-9 relative to the largest entry of the compared array (``atol =
rtol × max|expected|``), because some exact zeros come out as rounding noise of either sign
(the gradient of a key bias, which the attention softmax ignores; the direction of ``A`` along
which LayerNorm outputs have no component).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import influencekit as ik
from influencekit.data import example_batches
from influencekit.hooks import capture
from influencekit.tiny import TINY_CORPUS

from helpers.reference import (
    F64,
    assert_close,
    dense_hessian,
    dense_solve,
    float64_model,
    linear_layers,
    query_pass,
    reference_factors,
    reference_pass,
)

SEED = 5  # seed of the sampled-Fisher labels
# Eight training texts of different lengths (23 to 41 tokens; 41 is cut to 40), so that every
# batch of 2, 3 or 5 holds padding. About 250 tokens: more than any layer's d_in + 1 (65),
# so A and S have full rank and distinct eigenvalues (the eigenbasis is unique up to signs).
TRAIN_TEXTS = [TINY_CORPUS[i] for i in (12, 1, 20, 33, 28, 4, 11, 36)]
MAX_LENGTH = 40
QUERIES = [
    ("The chef tastes the stew", " and adds more pepper."),
    ("A comet", " grows a long tail when it nears the sun."),
]
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


# ---------------------------------------------------------------------------------------------
# Fixtures: one tiny model per family and its reference quantities, computed once


@pytest.fixture(scope="module")
def train(tokenizer):
    ds = ik.TextDataset.from_texts(TRAIN_TEXTS, tokenizer, max_length=MAX_LENGTH)
    assert [list(ex.input_ids) for ex in ds] == [
        tokenizer(text)["input_ids"][:MAX_LENGTH] for text in TRAIN_TEXTS
    ]
    lengths = [len(ex.input_ids) for ex in ds]
    assert len(set(lengths)) == len(lengths), lengths  # all different: every batch is padded
    return ds


class World:
    """A model with its reference factors (sampled Fisher), training and query gradients."""

    def __init__(self, family, tokenizer, train):
        self.model = float64_model(family, tokenizer)
        self.names = linear_layers(self.model)
        self.tokenizer = tokenizer
        self.factors = reference_factors(self.model, self.names, train, "sampled", SEED)
        self.train = [reference_pass(self.model, self.names, ex.input_ids) for ex in train]
        self.queries = [query_pass(self.model, self.names, tokenizer, *q) for q in QUERIES]
        self._solved = {}

    def solved(self, name, strategy, damping, which="train") -> torch.Tensor:
        """``H⁻¹ vec(G)`` for every training (``which="train"``) or query gradient of a layer."""
        key = (name, strategy, damping, which)
        if key not in self._solved:
            H = dense_hessian(self.factors[name], strategy, damping)
            grads = torch.stack([p[name].g for p in getattr(self, which)])
            self._solved[key] = dense_solve(H, grads)
        return self._solved[key]

    def preconditioned_query(self, name, q, strategy="ekfac", damping=None) -> torch.Tensor:
        """The explicit ``P_q = H⁻¹ G_q`` as a (d_out, d_in [+1]) matrix."""
        return self.solved(name, strategy, damping, "queries")[q]

    def layer_scores(self, strategy, damping=None) -> torch.Tensor:
        """Reference ``(n_queries, n_train, n_layers)``: ``vec(G_q)ᵀ x`` with ``H x = vec(G_z)``."""
        out = torch.zeros(len(self.queries), len(self.train), len(self.names), dtype=F64)
        for col, name in enumerate(self.names):
            x = self.solved(name, strategy, damping, "train")
            for q, qp in enumerate(self.queries):
                for i in range(len(self.train)):
                    out[q, i, col] = (qp[name].g * x[i]).sum()
        return out


@pytest.fixture(scope="module")
def world(tokenizer, train):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = World(family, tokenizer, train)
        return cache[family]

    return get


def fit(model, train, strategy="ekfac", fisher="sampled", batch_size=3, **kw):
    return ik.fit_factors(model, train, "all", strategy=strategy, fisher=fisher, seed=SEED,
                          max_examples=None, batch_size=batch_size, dtype=F64, progress=False,
                          **kw)  # fmt: skip


def kit_score(model, factors, train, batch_size=3, **kw):
    return ik.score(model, factors, QUERIES, train, batch_size=batch_size, dtype=F64,
                    progress=False, **kw)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. Captured per-sequence gradients


CAPTURE_FAMILIES = [
    "gpt2",  # Conv1D with bias
    "llama",  # Linear, no bias
    "qwen2",  # q/k/v Linear with bias, o_proj and MLP without
    "gpt_neox",
    "phi",
    "opt",  # flattens (B, T, d) to (B*T, d) around its MLP
]


@pytest.mark.parametrize("targets", ["real", "sampled"])
@pytest.mark.parametrize("family", CAPTURE_FAMILIES)
def test_capture_equals_autograd(family, targets, tokenizer, train):
    model = float64_model(family, tokenizer)
    names = linear_layers(model)
    layers = ik.select_modules(model, "all")
    assert [layer.name for layer in layers] == names
    batch = next(example_batches(train, len(train)))  # one batch, right-padded
    io = capture(model, layers, batch, targets=targets, seed=SEED, dtype=F64)
    for row, ex in enumerate(train):
        sample = (SEED, ex.index) if targets == "sampled" else None
        ref = reference_pass(model, names, ex.input_ids, sample=sample)
        n = len(ex.input_ids)
        for name in names:
            a, s = io[name].a[row], io[name].s[row]
            g = torch.einsum("to,ti->oi", s, a)
            assert layers[names.index(name)].grad_shape == tuple(ref[name].g.shape)
            assert_close(g, ref[name].g, what=f"{family} {name} row {row}: G")
            assert_close(a[:n], ref[name].a, what=f"{family} {name} row {row}: a")
            assert_close(s[:n], ref[name].s, what=f"{family} {name} row {row}: s")
            assert torch.count_nonzero(a[n:]) == 0, f"{name} row {row}: a at padding"
            assert torch.count_nonzero(s[n:]) == 0, f"{name} row {row}: s at padding"
    assert model.training is False
    assert all(p.requires_grad for p in model.parameters())  # flags restored


# ---------------------------------------------------------------------------------------------
# 2. Factors


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_factors_equal_brute_force(family, fisher, tokenizer, train):
    model = float64_model(family, tokenizer)
    names = linear_layers(model)
    ref = reference_factors(model, names, train, fisher, SEED)
    ekfac = fit(model, train, "ekfac", fisher)
    kfac = fit(model, train, "kfac", fisher)
    diagonal = fit(model, train, "diagonal", fisher)
    assert ekfac.modules == kfac.modules == diagonal.modules == names
    for name in names:
        r, k = ref[name], ekfac.layers[name]
        assert k.shape == tuple(r.lam["ekfac"].shape)
        # Distinct eigenvalues (relative gaps far above rounding; the smallest here are ~5e-9,
        # pairs of tiny eigenvalues), so each basis is unique up to signs and Λ is comparable.
        assert (r.d_a.diff() > 1e-10 * r.d_a.abs().max()).all()
        assert (r.d_s.diff() > 1e-10 * r.d_s.abs().max()).all()
        assert_close(k.q_a @ torch.diag(k.d_a) @ k.q_a.T, r.A, what=f"{name} A")
        assert_close(k.q_s @ torch.diag(k.d_s) @ k.q_s.T, r.S, what=f"{name} S")
        assert_close(k.d_a, r.d_a, what=f"{name} D_A")
        assert_close(k.d_s, r.d_s, what=f"{name} D_S")
        assert_close(k.lam, r.lam["ekfac"], what=f"{name} Λ ekfac")
        assert_close(kfac.layers[name].d_a, r.d_a, what=f"{name} kfac D_A")
        assert_close(kfac.layers[name].lam, r.lam["kfac"], what=f"{name} Λ kfac")
        assert_close(diagonal.layers[name].lam, r.lam["diagonal"], what=f"{name} Λ diagonal")
        assert diagonal.layers[name].q_a is None and diagonal.layers[name].q_s is None
    assert ekfac.fisher == fisher and ekfac.strategy == "ekfac"


# ---------------------------------------------------------------------------------------------
# 3. Scores against the dense inverse
#
# Sign convention (item 7 of the module docstring): the reference query gradient is the
# gradient of the summed completion NLL, g_q = ∇(−log p(c|p)), and the training gradient that
# of the summed training NLL, so g_qᵀ H⁻¹ ∇L(z) > 0 means up-weighting z (θ moves by
# −ε H⁻¹ ∇L(z)) raises log p(c|p). test_positive_score_raises_log_prob checks it directly.


@pytest.mark.parametrize("damping", [None, 0.003])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_score_equals_dense_inverse(family, strategy, damping, world, train):
    w = world(family)
    factors = fit(w.model, train, strategy)
    result = kit_score(w.model, factors, train, damping=damping)
    assert result.layers == w.names
    expected = w.layer_scores(strategy, damping)
    for col, name in enumerate(w.names):
        assert_close(result.layer_scores[..., col], expected[..., col], what=name)
    assert_close(result.scores, expected.sum(-1), rtol=1e-10, what="total")
    assert (result.scores == result.layer_scores.sum(-1)).all()
    if strategy == "identity" and damping is None:  # the plain gradient dot product
        for q, qp in enumerate(w.queries):
            for i, tp in enumerate(w.train):
                dots = [float((qp[n].g * tp[n].g).sum()) for n in w.names]
                assert_close(result.layer_scores[q, i], dots, what=f"identity q{q} z{i}")


# ---------------------------------------------------------------------------------------------
# 4. Per-token scores


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_token_scores(family, world, train, tokenizer):
    w = world(family)
    factors = fit(w.model, train, "ekfac")
    result = kit_score(w.model, factors, train)
    for q, query in enumerate(QUERIES):
        for i in (0, 4):
            per_layer = ik.token_scores(w.model, factors, query, train[i], tokenizer=tokenizer,
                                        per_layer=True, dtype=F64)  # fmt: skip
            total = ik.token_scores(w.model, factors, query, train[i], tokenizer=tokenizer,
                                    dtype=F64)  # fmt: skip
            assert per_layer.shape == (len(train[i].input_ids), len(w.names))
            assert_close(per_layer.sum(0), result.layer_scores[q, i], what="Σ_t per layer")
            assert_close(total.sum(), result.scores[q, i], what="Σ_t total")
            assert_close(total, per_layer.sum(-1), rtol=1e-12, what="total = Σ layers")
            for col, name in enumerate(w.names):
                P = w.preconditioned_query(name, q)
                tp = w.train[i][name]
                expected = [float(s_t @ P @ a_t) for s_t, a_t in zip(tp.s, tp.a, strict=True)]
                assert_close(per_layer[:, col], expected, what=f"{name} q{q} z{i} tokens")


# ---------------------------------------------------------------------------------------------
# 5. Independence of the padding side


def test_padding_side_independence(tokenizer, train):
    model = float64_model("qwen2", tokenizer)
    scores = {}
    for side in ("right", "left"):
        tok = copy.deepcopy(tokenizer)
        tok.padding_side = side
        ds = ik.TextDataset.from_texts(TRAIN_TEXTS, tok, max_length=MAX_LENGTH)
        assert [ex.input_ids for ex in ds] == [ex.input_ids for ex in train]
        factors = fit(model, ds, "ekfac", "sampled")
        scores[side] = kit_score(model, factors, ds, tokenizer=tok).layer_scores
    assert_close(scores["left"], scores["right"], rtol=1e-10, what="left vs right padding")


# ---------------------------------------------------------------------------------------------
# 6. Query batching: truncated SVD of the preconditioned query gradient


def test_query_rank(world, train):
    w = world("gpt2")
    factors = fit(w.model, train, "ekfac")
    full = kit_score(w.model, factors, train)
    largest_min = max(min(f.shape) for f in factors.layers.values())
    for rank in (largest_min, 10_000):
        truncated = kit_score(w.model, factors, train, query_rank=rank)
        assert_close(truncated.layer_scores, full.layer_scores, rtol=1e-10, what=f"rank {rank}")
    rank = 2
    result = kit_score(w.model, factors, train, query_rank=rank)
    for col, name in enumerate(w.names):
        for q in range(len(QUERIES)):
            U, sigma, Vh = torch.linalg.svd(w.preconditioned_query(name, q))
            P_r = U[:, :rank] @ torch.diag(sigma[:rank]) @ Vh[:rank]
            expected = [float((P_r * tp[name].g).sum()) for tp in w.train]
            assert_close(result.layer_scores[q, :, col], expected, what=f"{name} q{q} rank 2")
    assert not np.allclose(result.scores, full.scores)


# ---------------------------------------------------------------------------------------------
# 7. Sign: finite difference of log p(completion | prompt) along the influence direction


def log_prob(model, tokenizer, prompt, completion) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0], -1)
    return sum(float(logp[t, ids[t + 1]]) for t in range(len(prompt_ids) - 1, len(ids) - 1))


def shift_weights(model, names, deltas, scale):
    """Add ``scale × delta`` (canonical (d_out, d_in [+1])) to each layer's weight and bias."""
    with torch.no_grad():
        for name in names:
            m, d = model.get_submodule(name), deltas[name] * scale
            w = d[:, : m.weight.shape[0 if isinstance(m, Conv1D) else 1]]
            m.weight.add_(w.T if isinstance(m, Conv1D) else w)
            if m.bias is not None:
                m.bias.add_(d[:, -1])


def test_positive_score_raises_log_prob(world, train, tokenizer):
    """Up-weighting z by ε moves θ by −ε H⁻¹ ∇L(z) (the influence-function response), so
    d/dε log p(c|p) = −∇log p(c|p)ᵀ H⁻¹ ∇L(z) = g_qᵀ H⁻¹ ∇L(z) = I(q, z)."""
    w = world("gpt2")
    factors = fit(w.model, train, "ekfac")
    result = kit_score(w.model, factors, train)
    model = float64_model("gpt2", tokenizer)  # a copy whose weights we move
    eps = 1e-6
    for q, (prompt, completion) in enumerate(QUERIES):
        for i in range(len(train)):
            step = {n: -w.solved(n, "ekfac", None)[i] for n in w.names}
            shift_weights(model, w.names, step, eps)
            up = log_prob(model, tokenizer, prompt, completion)
            shift_weights(model, w.names, step, -2 * eps)
            down = log_prob(model, tokenizer, prompt, completion)
            shift_weights(model, w.names, step, eps)
            derivative = (up - down) / (2 * eps)
            assert_close(derivative, result.scores[q, i], rtol=1e-5, what=f"q{q} z{i}")
    assert (result.scores > 0).any() and (result.scores < 0).any()
