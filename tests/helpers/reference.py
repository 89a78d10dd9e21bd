"""The float64 brute-force reference the numerical tests compare the kit with.

Written from scratch, never calling the kit's numerical helpers: one sequence at a time
(batch size 1, no padding, no attention mask), ``torch.autograd.grad`` of the summed loss
with respect to the modules' own weights and biases, explicit covariance matrices,
``torch.linalg.eigh``, dense Kronecker products and dense solves (docs/math.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from influencekit.hooks import seed_for

from .tiny_models import make_model

F64 = torch.float64
RTOL = 1e-9


def assert_close(actual, expected, rtol=RTOL, what=""):
    """``|actual - expected| <= rtol × max|expected|`` elementwise (see the module docstring)."""
    # copies: a result's arrays are read-only, which torch warns about when sharing memory
    actual = torch.tensor(np.array(actual), dtype=F64)
    expected = torch.tensor(np.array(expected), dtype=F64)
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def float64_model(family: str, tokenizer) -> nn.Module:
    """A tiny model computing in float64 throughout.

    helpers.tiny_models builds eager attention, whose softmax runs in float32 for every family here
    but GPT-2 (``softmax(..., dtype=torch.float32)`` in ``eager_attention_forward``), so its
    gradients carry float32 rounding that depends on sequence length and thread count
    (~1e-8 relative between a padded batch and a lone sequence). SDPA stays in float64.
    """
    model = make_model(family, len(tokenizer), dtype=F64)
    model.set_attn_implementation("sdpa")
    return model


def linear_layers(model: nn.Module) -> list[str]:
    """Every nn.Linear / Conv1D except the LM head: what ``modules="all"`` should select."""
    head = model.get_output_embeddings()
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m is not head
    ]


def sampled_labels(logits: torch.Tensor, seed: int, index: int) -> list[int]:
    """The sampled-Fisher label at each position t = 0..T-2: inverse CDF of a seeded uniform."""
    gen = torch.Generator().manual_seed(seed_for(seed, index))
    u = torch.rand(logits.shape[0], generator=gen, dtype=F64)
    labels = []
    for t in range(logits.shape[0] - 1):
        cdf = torch.cumsum(torch.softmax(logits[t].detach().to(F64), -1), 0)
        labels.append(int(torch.nonzero(cdf >= u[t] * cdf[-1])[0]))
    return labels


@dataclass
class RefLayer:
    """One layer on one sequence: inputs ``a`` (T, d_in [+1]), output gradients ``s``
    (T, d_out), and the autograd weight gradient ``g`` (d_out, d_in [+1], bias last)."""

    a: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor


def reference_pass(model, names, ids, *, first=0, sample=None) -> dict[str, RefLayer]:
    """Forward and backward of ONE sequence, batch size 1, no padding.

    Loss ``Σ_{t=first}^{T-2} -log softmax(logits[t])[y_t]`` (a sum), with ``y_t = ids[t+1]``,
    or the sampled-Fisher label when ``sample=(seed, dataset_index)``.
    """
    modules = {name: model.get_submodule(name) for name in names}
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.update({name: (inp, out)}))
        for name, m in modules.items()
    ]
    try:
        logits = model(torch.tensor([list(ids)]), use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    labels = list(ids[1:]) if sample is None else sampled_labels(logits, *sample)
    loss = sum(-torch.log_softmax(logits[t], -1)[labels[t]] for t in range(first, len(ids) - 1))
    params = []
    for m in modules.values():
        params += [m.weight] + ([m.bias] if m.bias is not None else [])
    outputs = [seen[name][1] for name in names]
    grads = list(torch.autograd.grad(loss, outputs + params))
    s_list, param_grads = grads[: len(names)], grads[len(names) :]
    result = {}
    for name, s in zip(names, s_list, strict=True):
        m = modules[name]
        # first positional input, (1, T, d_in); OPT flattens its MLP input to (T, d_in)
        a = seen[name][0][0].detach().reshape(len(ids), -1)
        g = param_grads.pop(0)
        g = g.T if isinstance(m, Conv1D) else g  # Conv1D stores its weight as (d_in, d_out)
        if m.bias is not None:
            a = torch.cat([a, torch.ones(len(ids), 1, dtype=a.dtype)], dim=1)
            g = torch.cat([g, param_grads.pop(0)[:, None]], dim=1)
        result[name] = RefLayer(a, s.detach().reshape(len(ids), -1), g)
    return result


def query_pass(model, names, tokenizer, prompt, completion) -> dict[str, RefLayer]:
    """The query gradient: summed NLL of the completion tokens only (g_q = ∇(−log p(c|p)))."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return reference_pass(model, names, prompt_ids + completion_ids, first=len(prompt_ids) - 1)


@dataclass
class RefFactors:
    """Brute-force factors of one layer (every strategy's Λ)."""

    A: torch.Tensor
    S: torch.Tensor
    d_a: torch.Tensor
    q_a: torch.Tensor
    d_s: torch.Tensor
    q_s: torch.Tensor
    lam: dict[str, torch.Tensor]


def reference_factors(model, names, train, fisher, seed) -> dict[str, RefFactors]:
    """A, S (token means over all non-pad positions), eigh, and Λ for ekfac/kfac/diagonal."""
    passes = [
        reference_pass(model, names, ex.input_ids,
                       sample=(seed, ex.index) if fisher == "sampled" else None)
        for ex in train
    ]  # fmt: skip
    n_tokens = sum(len(ex.input_ids) for ex in train)
    out = {}
    for name in names:
        A = sum(torch.outer(a_t, a_t) for p in passes for a_t in p[name].a) / n_tokens
        S = sum(torch.outer(s_t, s_t) for p in passes for s_t in p[name].s) / n_tokens
        d_a, q_a = torch.linalg.eigh(A)
        d_s, q_s = torch.linalg.eigh(S)
        g = [p[name].g for p in passes]
        lam = {
            "ekfac": sum((q_s.T @ g_z @ q_a) ** 2 for g_z in g) / len(g),
            "kfac": torch.outer(d_s, d_a),
            "diagonal": sum(g_z**2 for g_z in g) / len(g),
        }
        out[name] = RefFactors(A, S, d_a, q_a, d_s, q_s, lam)
    return out


def dense_hessian(ref: RefFactors, strategy: str, damping: float | None) -> torch.Tensor:
    """``H = K diag(vec(Λ) + λ) Kᵀ`` with ``K = Q_S ⊗ Q_A`` (the identity for diagonal/identity).

    ``vec`` is row-major over (d_out, d_in) matrices, so ``K vec(X) = vec(Q_S X Q_Aᵀ)``.
    ``damping=None``: λ = 0.1 × mean(Λ); for identity (Λ = 0) λ = 1, a plain dot product.
    """
    shape = ref.lam["ekfac"].shape
    if strategy == "identity":
        lam = torch.zeros(shape, dtype=F64)
    else:
        lam = ref.lam[strategy]
    if damping is None:
        damping = 1.0 if strategy == "identity" else 0.1 * float(lam.mean())
    diagonal = lam.reshape(-1) + damping
    if strategy in ("diagonal", "identity"):
        return torch.diag(diagonal)
    K = torch.kron(ref.q_s, ref.q_a)
    return (K * diagonal) @ K.T  # K diag(.) Kᵀ without forming the diagonal matrix


def dense_solve(H: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``H⁻¹ vec(G)`` for each ``G`` of ``grads`` (n, d_out, d_in), by one dense solve."""
    x = torch.linalg.solve(H, grads.reshape(len(grads), -1).T)
    return x.T.reshape(grads.shape)
