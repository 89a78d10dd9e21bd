"""Loading a causal LM as users have it: a local directory, a hub id already in the local
Hugging Face cache, or a PEFT (LoRA) adapter over its base model. Safetensors only.

Every check that needs no weights (the folder, its files, the adapter's fit to its base)
runs before the weights load, so a mistake costs seconds, not a model load.

Example:
    >>> import influencekit as ik
    >>> model, tok = ik.load_model("path/to/hf-dir")                        # doctest: +SKIP
    >>> model, tok = ik.load_model("EleutherAI/pythia-160m")                # doctest: +SKIP
    >>> model, tok = ik.load_model("run/lora-adapter", base="path/to/base")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from . import checks
from .errors import MissingDependencyError, MissingFileError, ModelError, ParameterError
from .models import TrackedLayer, is_trackable

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# what a download (download=True) fetches: configs, tokenizers and safetensors, never pickles
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    revision: str | None = None,
    base: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode (no dropout).

    ``name_or_path``: a local Hugging Face model directory; a hub id such as
    ``"EleutherAI/pythia-160m"``, found in the local Hugging Face cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; ``revision`` picks a branch, tag or
    commit); or a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``), loaded over ``base`` or else the base its config names.

    ``dtype="auto"`` keeps the checkpoint's own dtype (a bf16 checkpoint stays bf16, and no
    float32 copy is ever made); a dtype or its name converts. The kit accumulates in float32
    whatever the weights' dtype. ``device=None`` picks CUDA when a GPU is visible, else the
    CPU; on a GPU the weights load straight onto it where ``transformers`` allows.
    Nothing is downloaded unless ``download=True`` (then ``transformers`` fetches the
    safetensors and configs of a hub id missing from the cache). Pickled weights (``.bin``,
    ``.pt``) are refused: loading them can run arbitrary code.

    Example:
        >>> model, tokenizer = load_model("runs/tiny-model")   # doctest: +SKIP
    """
    dtype = model_dtype(dtype)
    device = checks.device("device", device)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(download, bool):
        raise ParameterError("download", download, "True or False")
    root = resolve_model(name_or_path, revision=revision, download=download)
    if (root / ADAPTER_CONFIG).is_file():
        model, tokenizer = _load_adapter(root, base, dtype, device, download)
    elif base is not None:
        raise ParameterError(
            "base", base, f"given only with an adapter directory ({ADAPTER_CONFIG})"
        )
    else:
        model, tokenizer = _load_checkpoint(check_model_dir(root), dtype, device)
    return model.to(device=device).eval(), tokenizer


def model_dtype(value) -> str | torch.dtype:
    """``"auto"`` or a floating dtype (or its name) to load weights in.

    Example:
        >>> model_dtype("bfloat16"), model_dtype("auto")
        (torch.bfloat16, 'auto')
    """
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.removeprefix("torch.") in MODEL_DTYPES:
        return MODEL_DTYPES[value.removeprefix("torch.")]
    if isinstance(value, torch.dtype) and value in MODEL_DTYPES.values():
        return value
    names = ", ".join(repr(k) for k in MODEL_DTYPES)
    raise ParameterError("dtype", value, f"'auto' or one of {names} (a name or a torch.dtype)")


def hub_cache() -> Path:
    """The Hugging Face hub cache this process would use, read from the environment now.

    Example:
        >>> hub_cache().name
        'hub'
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def resolve_model(name_or_path, *, revision: str | None = None, download: bool = False) -> Path:
    """The local folder of ``name_or_path``: the directory itself, or a hub id's snapshot in
    the local cache (fetched first only with ``download=True``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: expected a Hugging Face model directory, found a file")
        if revision is not None:
            raise ParameterError("revision", revision, "given only with a hub id, not a directory")
        return path
    name = os.fspath(name_or_path)
    if not HUB_ID.fullmatch(name) or name.endswith((".", "/")):
        raise MissingFileError(f"{name}: no such model directory")
    return _snapshot(name, revision, download)


def _snapshot(repo_id: str, revision: str | None, download: bool) -> Path:
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=not download,
            allow_patterns=DOWNLOAD_PATTERNS,
        )
    except Exception as err:  # huggingface_hub's several "not found" and network errors
        at = "" if revision is None else f" at revision {revision!r}"
        how = "could not be downloaded" if download else "is not in the Hugging Face cache"
        raise MissingFileError(
            f"{repo_id}: no such model directory, and hub model {repo_id!r}{at} {how} "
            f"({cache}); fetch it once with `hf download {repo_id}` or pass download=True "
            f"({type(err).__name__})"
        ) from err
    return Path(folder)


def check_model_dir(root: Path) -> Path:
    """``root`` if it holds a config, safetensors weights and tokenizer files; else a
    :class:`ModelError` saying what is missing."""
    if not (root / "config.json").is_file():
        raise ModelError(f"{root}: no config.json, so this is not a Hugging Face model directory")
    if not list(root.glob("*.safetensors")):
        pickled = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelError(
                f"{root}: holds only pickled weights ({', '.join(pickled)}); influencekit loads "
                "safetensors only, since unpickling can run arbitrary code. Convert once with "
                "model.save_pretrained(dir, safe_serialization=True) in a trusted environment."
            )
        raise ModelError(f"{root}: no *.safetensors weight file found")
    if not _has_tokenizer(root):
        raise ModelError(
            f"{root}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer with tokenizer.save_pretrained(dir) next to the model"
        )
    return root


def _has_tokenizer(root: Path) -> bool:
    return any((root / name).is_file() for name in TOKENIZER_FILES)


def _load_checkpoint(root: Path, dtype, device: torch.device) -> tuple[nn.Module, object]:
    """The model (in ``dtype``) and tokenizer of a checked model directory. Weights go
    straight to a GPU where ``transformers`` can place them (no copy of the whole model in
    host memory first), else to the CPU."""
    from transformers import AutoModelForCausalLM

    weights = ", ".join(sorted(p.name for p in root.glob("*.safetensors")))
    # safetensors, tokenizers and json raise their own exception types: name the file instead.
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            root,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
            **{_dtype_keyword(): dtype},
            **_placement(device),
        )
    except Exception as err:
        raise ModelError(f"{root}: could not load the weights ({weights}): {err}") from err
    if info.get("missing_keys"):
        # from_pretrained would fill these with random values: influence on them is meaningless.
        raise ModelError(f"{root}: the weights lack {sorted(info['missing_keys'])}")
    return model, _load_tokenizer(root)


def _load_tokenizer(root: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root, local_files_only=True)
    except Exception as err:
        raise ModelError(f"{root}: could not load the tokenizer: {err}") from err


def _placement(device: torch.device) -> dict:
    """``device_map`` for one GPU where ``transformers`` takes it without ``accelerate``
    (version 5 on) or ``accelerate`` is installed; nothing for the CPU."""
    if device.type != "cuda":
        return {}
    import importlib.util

    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5 or importlib.util.find_spec("accelerate"):
        return {"device_map": {"": str(device)}}
    return {}


def _dtype_keyword() -> str:
    """``from_pretrained``'s name for the dtype: ``dtype`` from transformers 4.56 on."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# ---------------------------------------------------------------------------------------------
# PEFT adapters


def _load_adapter(
    root: Path, base, dtype, device: torch.device, download: bool
) -> tuple[nn.Module, object]:
    """A PEFT adapter directory over its base model, checked against the base before loading."""
    config = _adapter_config(root)
    weights = _adapter_weights(root)
    base = base if base is not None else config.get("base_model_name_or_path")
    if not base:
        raise ModelError(
            f"{root / ADAPTER_CONFIG}: names no base model (base_model_name_or_path); pass base="
        )
    try:
        from peft import PeftModel
    except ImportError as err:
        raise MissingDependencyError(
            f"{root}: loading a LoRA adapter needs peft: pip install 'influencekit[peft]'"
        ) from err
    try:
        base_root = check_model_dir(
            resolve_model(base, revision=config.get("revision"), download=download)
        )
    except (MissingFileError, ModelError) as err:
        raise type(err)(f"{root}: the adapter's base model {base}: {err}") from err
    model, tokenizer = _load_checkpoint(base_root, dtype, device)
    check_adapter_fits(weights, model, base)
    try:
        model = PeftModel.from_pretrained(model, root, is_trainable=False)
    except Exception as err:
        raise ModelError(f"{root}: could not load the adapter over {base}: {err}") from err
    if _has_tokenizer(root):  # an adapter may ship its own tokenizer (added tokens)
        tokenizer = _load_tokenizer(root)
    return model, tokenizer


def _adapter_config(root: Path) -> dict:
    path = root / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON adapter config ({err})") from err
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(config).__name__}")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise ModelError(f"{path}: peft_type {kind!r}; influencekit tracks LoRA adapters only")
    return config


def _adapter_weights(root: Path) -> Path:
    path = root / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(
            f"{root}: holds only pickled adapter weights ({', '.join(pickled)}); influencekit "
            f"loads {ADAPTER_WEIGHTS} only, since unpickling can run arbitrary code. Save the "
            "adapter with save_pretrained(dir, safe_serialization=True) in a trusted environment."
        )
    raise ModelError(f"{root}: no {ADAPTER_WEIGHTS}")


def check_adapter_fits(weights: Path, model: nn.Module, base) -> None:
    """Every LoRA matrix in ``weights`` (read from its header, not loaded) targets a linear
    layer of ``model`` with matching sizes; else a :class:`ModelError` naming the tensor, the
    layer and both shapes."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:
        raise ModelError(f"{weights}: not a readable safetensors file ({err})") from err
    for key, shape in shapes.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.\w+)?\.weight", key)
        if match is None:
            continue  # biases, embeddings' lora_embedding_A/B, saved modules: PEFT checks them
        target, side = match.groups()
        module = modules.get(target)
        if module is None or not is_trackable(module):
            raise ModelError(
                f"{weights}: {key} adapts {target}, which base model {base} has no linear layer "
                "named; the adapter was made for another base model"
            )
        layer = TrackedLayer(target, module, transposed=not isinstance(module, nn.Linear))
        want, found = (layer.d_in, shape[1]) if side == "lora_A" else (layer.d_out, shape[0])
        if want != found:
            raise ModelError(
                f"{weights}: {key} has shape {shape}, which does not fit {target} of base model "
                f"{base} ((d_out, d_in) = {(layer.d_out, layer.d_in)}); the adapter was made for "
                "another base model"
            )
