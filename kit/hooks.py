"""Capturing each tracked layer's inputs ``a_t`` and output gradients ``s_t`` for a batch.

One forward and one backward per batch. The backward is taken with respect to the tracked
layers' *outputs* only: every parameter's ``requires_grad`` is switched off for the duration,
so autograd computes no weight gradient and never descends below the first tracked layer.
The per-sequence weight gradient is then ``G_z = sum_t s_t a_tᵀ`` (docs/math.md), formed by
the caller from the captured ``a`` and ``s`` — exactly what autograd would give per sequence.

The loss is a *sum* of next-token negative log-likelihoods over the scored positions
(``batch.label_mask``), so each sequence's ``s`` is the gradient of that sequence's own loss
whatever else is in the batch. Targets are the real next tokens, or tokens sampled from the
model's own predictive distribution (the true Fisher); sampling draws one uniform per position
from a generator seeded by (seed, example index), so it does not depend on batching.

Example:
    >>> io = capture(model, layers, batch)                  # doctest: +SKIP
    >>> grads = {name: per_sequence_grads(x) for name, x in io.items()}   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import Batch
from .errors import ModelError, NonFiniteError, ParameterError
from .models import TrackedLayer
from .progress import progress_bar

TARGETS = ("real", "sampled")


@dataclass
class LayerIO:
    """What one tracked layer saw in one batch, padding zeroed, in the accumulation dtype.

    ``a``: ``(B, T, d_in [+1])`` inputs, with a trailing 1 when the layer has a bias;
    ``s``: ``(B, T, d_out)`` gradients of the summed loss with respect to the layer output.
    """

    a: torch.Tensor
    s: torch.Tensor


def per_sequence_grads(io: LayerIO) -> torch.Tensor:
    """``G_z = sum_t s_t a_tᵀ`` for each sequence of the batch: ``(B, d_out, d_in [+1])``."""
    return torch.einsum("bto,bti->boi", io.s, io.a)


def seed_for(seed: int, index: int) -> int:
    """The generator seed for one example: a fixed mix of the run seed and its index."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def sample_targets(logp: torch.Tensor, batch: Batch, seed: int) -> torch.Tensor:
    """Next-token targets drawn from the model's predictive distribution ``exp(logp)``.

    Each example ``i`` gets ``len_i`` uniforms from its own generator (``seed_for(seed, i)``);
    the target at position ``t`` is the inverse-CDF draw from ``p(. | x_<=t)``.
    """
    targets = torch.zeros(logp.shape[:2], dtype=torch.long, device=logp.device)
    for row, (index, length) in enumerate(zip(batch.indices, batch.lengths, strict=True)):
        gen = torch.Generator().manual_seed(seed_for(seed, index))
        u = torch.rand(length, generator=gen, dtype=torch.float64).to(logp.device)
        cdf = logp[row, :length].exp().to(torch.float64).cumsum(-1)
        u = u * cdf[:, -1]  # rescale so rounding in the cdf never pushes u past its end
        drawn = torch.searchsorted(cdf, u[:, None]).squeeze(-1)
        targets[row, :length] = drawn.clamp_(max=logp.shape[-1] - 1)
    return targets


def summed_nll(
    logits: torch.Tensor, batch: Batch, targets: str = "real", seed: int = 0
) -> torch.Tensor:
    """Sum over the batch and over scored positions of ``-log p(target_{t+1} | x_<=t)``."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    if targets == "real":
        nxt = None  # label_log_probs' default: the real next token
    elif targets == "sampled":
        with torch.no_grad():
            nxt = sample_targets(logp.detach(), batch, seed)
    else:
        raise ParameterError("targets", targets, f"one of {', '.join(map(repr, TARGETS))}")
    return -label_log_probs(logp, batch, nxt).sum()


def label_log_probs(
    logp: torch.Tensor, batch: Batch, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ_t log p(target_{t+1})`` over each row's scored positions (``batch.label_mask``).

    ``logp``: ``(rows, positions, vocab)`` log-probabilities of the next token; ``targets``:
    the token each position is scored on (default: the real next token).

    Example:
        >>> from influencekit.data import collate
        >>> b = collate([[0, 1]], [1], [0])
        >>> logp = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
        >>> round(float(label_log_probs(logp, b)[0]), 4)
        -0.2877
    """
    if targets is None:  # the real next token; the wrapped last column is masked
        targets = torch.roll(batch.input_ids, shifts=-1, dims=1)
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)
    return (picked * batch.label_mask).sum(-1)


@contextlib.contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[None]:
    """Switch off every parameter's requires_grad; restore each flag afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Influence is taken at fixed weights: no dropout. Restores every submodule's mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _recording(layers: list[TrackedLayer]) -> Iterator[dict[str, tuple]]:
    """Forward hooks recording (input, output) per tracked layer; outputs made differentiable."""
    seen: dict[str, tuple] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            if name in seen:
                raise ModelError(
                    f"layer {name} ran twice in one forward: shared layers unsupported"
                )
            if not output.requires_grad:  # nothing upstream is tracked: start the graph here
                output = output.detach().requires_grad_()
            seen[name] = (inputs[0].detach(), output)
            return output

        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer.name)) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module,
    layers: list[TrackedLayer],
    batch: Batch,
    *,
    targets: str = "real",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    amp_dtype: torch.dtype | None = None,
    example_ids: Sequence[str] | Mapping[int, str] | None = None,
) -> dict[str, LayerIO]:
    """Run one forward and backward on ``batch`` and return each layer's ``a`` and ``s``.

    ``dtype`` is the accumulation dtype (float32 or float64) whatever the model's dtype;
    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast.
    ``example_ids`` maps example index to id, for error messages.
    Raises :class:`NonFiniteError` naming the layer and example if NaN/inf appears.
    """
    device = batch.input_ids.device
    amp = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    with _eval_mode(model), _no_param_grads(model), _recording(layers) as seen, torch.enable_grad():
        with amp:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = summed_nll(logits, batch, targets, seed)
        missing = [layer.name for layer in layers if layer.name not in seen]
        if missing:
            raise ModelError(f"layers {missing} did not run in the forward pass")
        outputs = [seen[layer.name][1] for layer in layers]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    mask = batch.attention_mask.to(dtype)[..., None]
    shape = tuple(batch.input_ids.shape)
    result = {}
    masked: set[int] = set()
    for layer, grad in zip(layers, grads, strict=True):
        # Some models (OPT) flatten (B, T, d) to (B*T, d) around their MLP: undo that.
        a = seen[layer.name][0].to(dtype).reshape(*shape, -1)
        if layer.has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if grad is None:  # the layer does not reach the loss (e.g. after the last scored token)
            s = a.new_zeros(*shape, layer.d_out)
        else:
            s = grad.to(dtype).reshape(*shape, -1)
        # Padding zeroed in place: the backward is over, nothing reads these activations
        # again, and layers that share an input (a gate and an up projection) share one
        # masked copy instead of holding two.
        for x in (a, s):
            if x.data_ptr() not in masked:
                x.mul_(mask)
                masked.add(x.data_ptr())
        result[layer.name] = LayerIO(a=a, s=s)
    _check_finite(result, batch, example_ids)
    return result


def _check_finite(result: dict[str, LayerIO], batch: Batch, example_ids) -> None:
    """One host sync per batch when all is finite; the culprit is located only on failure."""
    flags = [torch.isfinite(io.a).all() & torch.isfinite(io.s).all() for io in result.values()]
    if bool(torch.stack(flags).all()):
        return
    for name, io in result.items():
        for what, x in (("input activation", io.a), ("output gradient", io.s)):
            bad = ~torch.isfinite(x).flatten(1).all(dim=1)
            if bad.any():
                index = batch.indices[int(bad.nonzero()[0])]
                who = f"id {example_ids[index]!r}" if example_ids else f"index {index}"
                raise NonFiniteError(
                    f"layer {name}: non-finite {what} (NaN or inf) for example {who}; check "
                    "the model weights and, for fp16, try bf16 or fp32"
                )


def capture_batches(
    model: nn.Module,
    layers: list[TrackedLayer],
    batches: Iterable[Batch],
    *,
    device: torch.device,
    total: int | None = None,
    desc: str = "capturing",
    progress: bool = True,
    example_ids: Sequence[str] | Mapping[int, str] | None = None,
    **capture_options,
) -> Iterator[tuple[Batch, dict[str, LayerIO]]]:
    """``capture`` over many batches, moved to ``device`` (pinned, async on CUDA), with a bar."""
    for batch in progress_bar(batches, desc=desc, total=total, enabled=progress):
        batch = batch.to(device)
        yield batch, capture(model, layers, batch, example_ids=example_ids, **capture_options)
