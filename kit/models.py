"""Choosing which linear layers of a causal LM to track, and fingerprints of models.

A tracked layer is an ``nn.Linear`` (weight ``(d_out, d_in)``) or a ``transformers`` ``Conv1D``
(weight stored transposed, ``(d_in, d_out)``). Whatever the storage, the kit works with the
canonical gradient matrix ``G`` of shape ``(d_out, d_in + has_bias)``: the bias is the last
column, reached through a homogeneous coordinate (a constant 1 appended to the input).

Example:
    >>> import influencekit as ik
    >>> model, tok = ik.load_model("path/to/hf-dir")          # doctest: +SKIP
    >>> [layer.name for layer in ik.select_modules(model, "mlp")][:2]   # doctest: +SKIP
    ['transformer.h.0.mlp.c_fc', 'transformer.h.0.mlp.c_proj']
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError, NonFiniteError, ParameterError

try:  # transformers keeps GPT-2's transposed linear here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = None

# Path components that mark a layer as attention or feed-forward across GPT-2, Llama/Mistral/
# Qwen2, GPT-NeoX/Pythia, OPT and Phi naming. Attention words win: "attn.c_proj" is attention.
ATTENTION_WORDS = {"attn", "attention", "self_attn", "self_attention", "crossattention"}
MLP_WORDS = {"mlp", "feed_forward", "ffn"}
SELECTIONS = ("mlp", "attention", "all", "lora")
LORA_PARTS = {"lora_A", "lora_B"}  # PEFT's ModuleDicts of an adapted layer's low-rank linears
MLP_LEAVES = {
    "fc1",
    "fc2",
    "c_fc",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
}


@dataclass(frozen=True)
class TrackedLayer:
    """One linear map whose gradient the kit captures.

    Example:
        >>> layer = TrackedLayer("fc", nn.Linear(3, 2), transposed=False)
        >>> layer.d_in, layer.d_out, layer.has_bias, layer.grad_shape
        (3, 2, True, (2, 4))
    """

    name: str
    module: nn.Module
    transposed: bool  # True for Conv1D: y = x @ W + b with W of shape (d_in, d_out)

    @property
    def d_in(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + int(self.has_bias))

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A weight (as stored) and bias in the canonical ``(d_out, d_in [+1])`` layout: the
        weight, then the bias as the last column."""
        w = weight.T if self.transposed else weight
        return w if bias is None else torch.cat([w, bias[:, None]], dim=1)

    def from_matrix(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of :meth:`to_matrix`: ``(weight as stored, bias or None)``."""
        w = matrix[:, : self.d_in]
        return (w.T if self.transposed else w), (matrix[:, self.d_in] if self.has_bias else None)

    def weight_matrix(self) -> torch.Tensor:
        """This layer's own weight and bias in the canonical layout (detached)."""
        bias = self.module.bias.detach() if self.has_bias else None
        return self.to_matrix(self.module.weight.detach(), bias)

    def add_to_weights(self, delta: torch.Tensor) -> None:
        """Add a canonical-shape ``delta`` to the stored weight (and bias), in place."""
        dw, db = self.from_matrix(delta)
        with torch.no_grad():
            self.module.weight.add_(dw.to(self.module.weight.dtype))
            if db is not None:
                self.module.bias.add_(db.to(self.module.bias.dtype))


def is_trackable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and ``transformers`` ``Conv1D``."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def layer_role(name: str) -> str:
    """``"attention"``, ``"mlp"`` or ``"other"`` from a module's dotted name.

    Example:
        >>> layer_role("model.layers.0.self_attn.q_proj"), layer_role("model.decoder.layers.1.fc2")
        ('attention', 'mlp')
    """
    parts = name.split(".")
    if parts[-1] == "base_layer":  # the layer a PEFT adapter wraps: named by its own place
        parts = parts[:-1]
    if any(p in ATTENTION_WORDS for p in parts):
        return "attention"
    if any(p in MLP_WORDS for p in parts) or parts[-1] in MLP_LEAVES:
        return "mlp"
    return "other"


def is_lora(name: str) -> bool:
    """True for the low-rank linears of a PEFT LoRA adapter (``...lora_A.<adapter>``).

    Example:
        >>> is_lora("base_model.model.h.0.mlp.c_fc.lora_B.default"), is_lora("h.0.mlp.c_fc")
        (True, False)
    """
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in LORA_PARTS


def candidate_layers(model: nn.Module) -> list[TrackedLayer]:
    """Every trackable linear except the LM head, in the model's module order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if module is head or not is_trackable(module):
            continue
        found.append(TrackedLayer(name, module, transposed=not isinstance(module, nn.Linear)))
    return found


def select_modules(model: nn.Module, modules: str | list[str] = "mlp") -> list[TrackedLayer]:
    """Resolve a module selection to tracked layers.

    ``modules`` is ``"mlp"`` (each block's feed-forward linears), ``"attention"``, ``"all"``
    (every linear except embeddings and the LM head), ``"lora"`` (the ``lora_A`` and ``lora_B``
    linears of a PEFT LoRA adapter) or an explicit list of module names. On a model with an
    adapter, ``"mlp"``, ``"attention"`` and ``"all"`` are the base layers (their gradient is
    the merged weight's: the adapter's output adds to theirs). A selection that matches
    nothing raises :class:`ModelError` listing the candidates.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
        >>> [layer.name for layer in select_modules(m, "attention")]
        ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj']
    """
    candidates = candidate_layers(model)
    by_name = {layer.name: layer for layer in candidates}
    if not isinstance(modules, (str, list, tuple)):
        raise ParameterError("modules", modules, f"one of {SELECTIONS} or a list of names")
    if isinstance(modules, str):
        if modules not in SELECTIONS:
            if modules in by_name:  # a single module name is a one-element list
                return [by_name[modules]]
            raise _no_match(f"unknown module selection {modules!r}", candidates)
        if modules == "lora":
            chosen = [c for c in candidates if is_lora(c.name)]
            if not chosen:
                raise ModelError(
                    "modules='lora': this model has no LoRA adapter; load one with "
                    "ik.load_model(adapter_dir) (its adapter_config.json names the base)"
                )
            return chosen
        chosen = [
            c
            for c in candidates
            if not is_lora(c.name) and (modules == "all" or layer_role(c.name) == modules)
        ]
        if not chosen:
            raise _no_match(f"modules={modules!r} matches no layer of this model", candidates)
        return chosen
    names = list(modules)
    if not names:
        raise _no_match("modules=[] selects nothing", candidates)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise _no_match(f"unknown module name(s) {unknown}", candidates)
    if len(set(names)) != len(names):
        raise ModelError(f"modules lists a name twice: {names}")
    return [by_name[n] for n in names]


def _no_match(message: str, candidates: list[TrackedLayer]) -> ModelError:
    listing = ", ".join(c.name for c in candidates) or "(none: the model has no Linear/Conv1D)"
    return ModelError(f"{message}. Trackable layers: {listing}")


def check_finite_weights(layers: list[TrackedLayer]) -> None:
    """Raise :class:`NonFiniteError` naming the first tracked layer with NaN/inf weights."""
    for layer in layers:
        if not torch.isfinite(layer.weight_matrix()).all():
            raise NonFiniteError(f"layer {layer.name}: weight or bias holds NaN or inf")


def check_sequences_fit(model: nn.Module, sequences: Iterable[Sequence[int]], source: str) -> None:
    """Refuse token ids outside the vocabulary or sequences past learned position tables.

    Without this, either mistake surfaces as torch's bare "index out of range in self".
    """
    sequences = [seq for seq in sequences if len(seq)]
    lengths = [len(seq) for seq in sequences]
    max_id = max((max(seq) for seq in sequences), default=-1)
    vocab = model.get_input_embeddings().num_embeddings
    if max_id >= vocab:
        raise ModelError(
            f"{source}: token id {max_id} is outside the model's vocabulary of {vocab}; "
            "is the tokenizer the model's own?"
        )
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None)  # GPT-2's learned position table
    if getattr(config, "model_type", "") == "opt":
        limit = config.max_position_embeddings
    if limit is not None and lengths and max(lengths) > limit:
        raise ModelError(
            f"{source}: a sequence of {max(lengths)} tokens exceeds the model's {limit} "
            "positions; lower max_length"
        )


def model_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the model's weights, kept with factors and results.

    It hashes every parameter's name and shape and a strided sample of at most 4096 of its
    values rounded to bfloat16, so the same weights in fp32 or bf16 agree while any real
    change (a fine-tune, another checkpoint) does not.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> len(model_fingerprint(m))
        16
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, math.ceil(flat.numel() / 4096))
        sample = flat[::step].to("cpu", torch.bfloat16).view(torch.int16).numpy()
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def layers_fingerprint(layers: Sequence[TrackedLayer]) -> str:
    """A hash of the tracked layers' names, shapes and every weight (rounded to bfloat16).

    Unlike :func:`model_fingerprint`, which samples, this reads every tracked value, so even
    a one-weight change in a tracked layer is caught.

    Example:
        >>> layer = TrackedLayer("fc", torch.nn.Linear(2, 2), transposed=False)
        >>> len(layers_fingerprint([layer]))
        16
    """
    digest = hashlib.sha256()
    for layer in layers:
        digest.update(f"{layer.name}:{layer.grad_shape};".encode())
        for param in layer.module.parameters(recurse=False):
            values = param.detach().reshape(-1).to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the full tokenizer definition, or else its vocabulary.

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> len(tokenizer_fingerprint(build_tokenizer(TINY_CORPUS)))
        16
    """
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: vocabulary, merges, normalizer, pre-tokenizer
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id")}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``None`` keeps the model where it is; a device moves the model there first.

    Example:
        >>> resolve_device(torch.nn.Linear(2, 2), None)
        device(type='cpu')
    """
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if model_device(model) != device:
        model.to(device)
    return device
