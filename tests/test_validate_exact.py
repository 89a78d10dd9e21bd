"""Exact damped Gauss–Newton influence (influencekit.validate.exact).

1. Against a dense reference: on a 1-block GPT-2 with two small tracked layers, ``G`` is formed
   explicitly as the Hessian of the mean KL (float64) and ``g_qᵀ (G + Λ)⁻¹ ∇L(z)`` solved with
   ``torch.linalg.solve``; the CG answer must match to 1e-8.
2. Against PBRF: at ``epsilon=1e-4`` (symmetric) the PBRF response is the exact influence up to
   PBRF's own O(ε²) truncation and optimiser floor; the test also checks that its difference
   from the exact influence shrinks like ε², i.e. that the exact value is PBRF's ε → 0 limit.
3. EK-FAC factors as a preconditioner: same answer, fewer CG iterations (one tracked layer).
4. Bad input: a damping map naming a wrong layer, NaN weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call

import influencekit as ik
from influencekit.data import TextDataset, collate, padding_id, query_batches
from influencekit.errors import NonFiniteError
from influencekit.hooks import label_log_probs
from influencekit.tiny import TINY_CORPUS
from influencekit.training import new_gpt2
from influencekit.validate import Recipe, kl_divergence, pbrf_scores
from influencekit.validate.exact import SolveInfo, conjugate_gradient, exact_influence

from helpers.reference import query_pass, reference_pass

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
QUERIES = [("The chef tastes the", " soup."), ("The choir sings", " a song.")]
INDICES = [0, 9, 26]  # three themes of TINY_CORPUS


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A 1-block GPT-2 (n_embd=16) trained two epochs on TINY_CORPUS, and that corpus."""
    train = TextDataset.from_texts(TINY_CORPUS, tokenizer, max_length=32)
    recipe = Recipe(n_layer=1, n_embd=16, n_head=2, n_positions=32, epochs=2, batch_size=8)
    model, _ = recipe.train(train, 0)
    return model.eval(), train


def _dense_reference(model, train, queries, indices, layers, damping):
    """``g_qᵀ (G + Λ)⁻¹ ∇L(z)`` with ``G`` the dense Hessian of the mean KL at ``θ_s``."""
    model = copy.deepcopy(model).to(F64).eval()
    model.set_attn_implementation("eager")  # fused CPU attention has no double backward
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    owned = dict(model.named_parameters())
    shapes = [owned[n].shape for n in names]
    theta_s = torch.cat([owned[n].reshape(-1) for n in names])
    lam = torch.cat(
        [torch.full((owned[n].numel(),), damping[n.rsplit(".", 1)[0]], dtype=F64) for n in names]
    )

    def log_probs(flat, batch):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: x.view(s) for n, x, s in zip(names, pieces, shapes, strict=True)}
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        logits = functional_call(model, params, args=(), kwargs=kwargs, strict=False).logits
        return torch.log_softmax(logits, -1)

    pad = padding_id(train.tokenizer)
    everything = collate(
        [ex.input_ids for ex in train], [1] * len(train), list(range(len(train))), pad
    )
    ref = log_probs(theta_s, everything).detach()

    def mean_kl(flat):
        return kl_divergence(ref, log_probs(flat, everything), everything.label_mask) / len(train)

    gnh = torch.autograd.functional.hessian(mean_kl, theta_s)

    def gradient(batch):  # of the summed NLL of the batch's scored tokens
        x = theta_s.clone().requires_grad_()
        return torch.autograd.grad(-label_log_probs(log_probs(x, batch), batch).sum(), x)[0]

    grad_z = [gradient(collate([train[i].input_ids], [1], [i], pad)) for i in indices]
    grad_q = [gradient(b) for b in query_batches(ik.as_queries(queries), train.tokenizer, 1)]
    solved = torch.linalg.solve(gnh + torch.diag(lam), torch.stack(grad_z, 1))
    return (torch.stack(grad_q) @ solved).numpy()


def test_matches_dense_gauss_newton_solve(tokenizer):
    torch.manual_seed(0)
    train = TextDataset.from_texts(TINY_CORPUS[:12], tokenizer, max_length=32)
    model = new_gpt2(tokenizer, n_layer=1, n_embd=8, n_head=2, n_positions=32, seed=1)
    with torch.no_grad():  # move off the near-uniform initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layers = ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]  # 72 + 264 params
    damping = {layers[0]: 0.03, layers[1]: 0.1}  # distinct per layer; biases share them
    got, info = exact_influence(
        model, train, QUERIES, damping=damping, modules=layers, tol=1e-12, max_iter=1000,
        indices=[3, 7, 11], batch_size=5, return_info=True,
    )  # fmt: skip
    assert all(i.converged and i.residual < 1e-11 for i in info)
    want = _dense_reference(model, train, QUERIES, [3, 7, 11], layers, damping)
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_matches_pbrf_as_epsilon_goes_to_zero(tiny):
    model, train = tiny
    exact = exact_influence(model, train, QUERIES, damping=0.1, tol=1e-10, indices=INDICES)
    responses = {}
    for eps in (1e-3, 1e-4):
        responses[eps] = pbrf_scores(
            model, train, QUERIES, INDICES, damping=0.1, epsilon=eps, symmetric=True,
            tol=1e-10, steps=1000,
        )  # fmt: skip
    # The symmetric difference leaves an O(ε²) term, large here because ∇L(z) sums over tokens
    # (measured: 1.8e-2 relative at ε = 1e-3, so ≈ 1.8e-4 at 1e-4); below that, L-BFGS stops
    # at a gradient ratio ≈ 1e-4 since J = divergence/ε² loses ~8 digits in the KL's
    # cancellation. 1e-3 is ~5x the measured worst pair (1.8e-4): any error in G, the
    # damping or the gradients would show as O(1) here.
    np.testing.assert_allclose(responses[1e-4], exact, rtol=1e-3)

    # And the difference is PBRF's truncation: it falls ≈ 100x for a 10x smaller ε.
    def worst(r):
        return np.abs(r - exact).max() / np.abs(exact).max()

    assert worst(responses[1e-4]) < worst(responses[1e-3]) / 30


def test_ekfac_preconditioner_same_answer_fewer_iterations(tiny):
    model, train = tiny
    layer = "transformer.h.0.mlp.c_proj"  # one tracked layer: no cross-layer coupling to miss
    factors = ik.fit_factors(model, train, [layer], progress=False)
    damping = factors.damping_for(None)
    runs = {}
    for name, fitted in (("plain", None), ("ekfac", factors)):
        runs[name] = exact_influence(
            model, train, QUERIES, damping=damping, modules=[layer], factors=fitted, tol=1e-8,
            max_iter=500, indices=INDICES, return_info=True,
        )  # fmt: skip
    # CG's guarantee: the residual r each solve reports (recomputed from scratch) bounds its
    # error, ‖v_q − v*‖ ≤ r‖g_q‖/μ with μ ≥ λ (G is PSD), so the two solves' scores differ by
    # at most (r_plain + r_ekfac)·‖g_q‖‖∇L(z)‖/λ (both dot the same g_z). Rounding: residuals
    # good to a few ulps of ‖A v‖'s terms ≲ κ‖g_q‖, κ = ‖G + λ‖/λ with ‖G‖ ≈ max EK-FAC Λ
    # (×10 margin); each score is a dot product of n terms, good to n ulps of ‖v‖‖∇L(z)‖.
    model64 = copy.deepcopy(model).to(F64)
    g_q = np.array(
        [query_pass(model64, [layer], train.tokenizer, *q)[layer].g.norm() for q in QUERIES]
    )
    g_z = np.array(
        [reference_pass(model64, [layer], train[i].input_ids)[layer].g.norm() for i in INDICES]
    )
    lam = damping[layer]
    kappa = 10 * (float(factors.layers[layer].lam.max()) + lam) / lam
    n = int(np.prod(factors.layers[layer].shape))
    residuals = sum(np.array([i.residual for i in infos]) for _, infos in runs.values())
    rounding = 2 * EPS64 * (8 * kappa + n)
    bound = np.outer((residuals + rounding) * g_q, g_z) / lam
    gap = np.abs(runs["ekfac"][0] - runs["plain"][0])
    assert (gap <= bound).all(), (gap, bound)
    plain = [i.iterations for i in runs["plain"][1]]
    ekfac = [i.iterations for i in runs["ekfac"][1]]
    assert all(i.converged for _, infos in runs.values() for i in infos)
    # Measured 78/75 plain vs 39/38 preconditioned.
    assert all(e < 0.75 * p for e, p in zip(ekfac, plain, strict=True))


def test_unconverged_solve_is_returned_with_a_warning(tiny):
    model, train = tiny
    with pytest.warns(RuntimeWarning) as caught:
        _, info = exact_influence(
            model, train, QUERIES, damping=0.1, max_iter=2, indices=[0], return_info=True
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "query '1'" in messages[1] and "relative residual" in messages[1]
    assert [i.iterations for i in info] == [2, 2]
    assert not info[1].converged and info[1].residual > 1e-6


def test_indices_pick_columns_of_the_full_score_matrix(tiny):
    model, train = tiny
    full = exact_influence(
        model, train, QUERIES[:1], damping=1.0, modules=["transformer.h.0.mlp.c_proj"]
    )
    part = exact_influence(
        model, train, QUERIES[:1], damping=1.0, modules=["transformer.h.0.mlp.c_proj"],
        indices=[5, -1], batch_size=7,
    )  # fmt: skip
    assert full.shape == (1, len(train))
    np.testing.assert_allclose(part, full[:, [5, len(train) - 1]], rtol=1e-9)


def test_conjugate_gradient_on_a_small_system():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=F64)
    a = m @ m.T + 0.1 * torch.eye(6, dtype=F64)
    b = torch.randn(6, generator=gen, dtype=F64)
    x, info = conjugate_gradient(lambda v: a @ v, b, tol=1e-12, max_iter=100)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-12)
    assert info.converged and info.residual < 1e-11
    # The exact inverse as preconditioner: one step.
    inverse = torch.linalg.inv(a)
    _, info = conjugate_gradient(lambda v: a @ v, b, precondition=lambda r: inverse @ r, tol=1e-9)
    assert info.iterations == 1
    assert conjugate_gradient(lambda v: a @ v, torch.zeros(6, dtype=F64))[1] == SolveInfo(0, 0.0)


def test_bad_damping_is_refused(tiny):
    model, train = tiny
    wrong = {"transformer.h.0.mlp.c_fc": 0.1, "transformer.h.0.mlp.c_nope": 0.1}
    with pytest.raises(ValueError, match=r"unknown: \['transformer.h.0.mlp.c_nope'\]"):
        exact_influence(model, train, QUERIES, damping=wrong, indices=[0])
    with pytest.raises(ValueError, match="damping must be finite and > 0"):
        exact_influence(model, train, QUERIES, damping=0.0, indices=[0])
    factors = ik.fit_factors(model, train, ["transformer.h.0.mlp.c_proj"], progress=False)
    with pytest.raises(ik.errors.ModelError, match="factors cover"):
        exact_influence(model, train, QUERIES, damping=0.1, factors=factors, indices=[0])


def test_nan_weights_raise_non_finite_error(tiny):
    model, train = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.ln_f.weight[0] = float("nan")  # untracked: found through the query
    with pytest.raises(NonFiniteError, match="query '0'"):
        exact_influence(broken, train, QUERIES, damping=0.1, indices=[0])
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")  # tracked: named
    with pytest.raises(NonFiniteError, match=r"transformer\.h\.0\.mlp\.c_fc"):
        exact_influence(broken, train, QUERIES, damping=0.1, indices=[0])
