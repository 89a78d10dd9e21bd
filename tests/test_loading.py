"""Tests for influencekit.loading: ``load_model`` from a directory, the hub cache, in bf16.

1. Round trips: weights and tokenizer of local directories (sharded or not), dtypes.
2. Refusals, before any weight loads where possible: missing folders and files, pickles,
   truncated or incomplete checkpoints.
3. Hub ids: a model in a fake Hugging Face cache layout (refs, snapshots) loads by id with
   ``HF_HUB_OFFLINE=1``, by branch and by commit; an id not in the cache is one line naming
   the id and the cache searched.
4. bf16 checkpoints: kept in bf16 (``dtype="auto"``), sharded, scored within bf16 tolerance
   of float32, and loaded without a float32 copy (peak memory of a child process).

LoRA adapter directories: tests/test_lora.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.tiny import TINY_CORPUS

from helpers.tiny_models import make_model

TEXTS = ["The moon rises.", "Fresh bread rises slowly.", "Zebras & quokkas: 42!"]


def save_model_dir(path, model, tokenizer):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A saved tiny gpt2 and llama directory, with the float32 models they were saved from."""
    out = {}
    for family in ("gpt2", "llama"):
        model = make_model(family, len(tokenizer), dtype=torch.float32)
        path = tmp_path_factory.mktemp(f"saved-{family}")
        out[family] = (save_model_dir(path, model, tokenizer), model)
    return out


# ---------------------------------------------------------------------------------------------
# load_model: round trips


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_model_round_trips_weights_and_tokenizer(saved, tokenizer, family):
    path, original = saved[family]
    model, tok = ik.load_model(path)
    assert type(model) is type(original)
    assert not model.training, "load_model must return the model in eval mode"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    want, got = original.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    for text in [*TEXTS, TINY_CORPUS[0]]:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert tok.decode(tok(TEXTS[2])["input_ids"]) == TEXTS[2]
    assert ik.model_fingerprint(model) == ik.model_fingerprint(original)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_model_dtype_option(saved, family):
    path, original = saved[family]
    model, _ = ik.load_model(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not model.training
    for name, param in original.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], param.double()), name


def test_load_model_accepts_str_path_and_sharded_safetensors(tmp_path, tokenizer):
    model = make_model("llama", len(tokenizer), dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    loaded, _ = ik.load_model(str(tmp_path))
    assert ik.model_fingerprint(loaded) == ik.model_fingerprint(model)


def test_load_model_prefers_safetensors_when_a_pickle_is_also_present(tmp_path, tokenizer):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    save_model_dir(tmp_path, model, tokenizer)
    # A pickle with different weights next to the safetensors file must be ignored.
    other = make_model("gpt2", len(tokenizer), dtype=torch.float32, seed=1)
    torch.save(other.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, _ = ik.load_model(tmp_path)
    assert ik.model_fingerprint(loaded) == ik.model_fingerprint(model)


# ---------------------------------------------------------------------------------------------
# load_model: refusals


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pt"])
def test_load_model_refuses_pickled_weights(tmp_path, tokenizer, weights_name):
    model = make_model("gpt2", len(tokenizer), dtype=torch.float32)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / weights_name)
    with pytest.raises(ik.ModelError) as info:
        ik.load_model(tmp_path)
    message = str(info.value)
    assert "safetensors" in message
    assert weights_name in message
    assert str(tmp_path) in message


def test_load_model_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ik.load_model(missing)


def test_load_model_refuses_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a directory")
    with pytest.raises(ik.ModelError, match=r"model\.safetensors.*found a file"):
        ik.load_model(path)


def test_load_model_refuses_dir_without_config(tmp_path, saved):
    src, _ = saved["gpt2"]
    for item in src.iterdir():
        if item.name != "config.json":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    with pytest.raises(ik.ModelError, match=r"config\.json"):
        ik.load_model(tmp_path)


def test_load_model_refuses_empty_dir(tmp_path):
    with pytest.raises(ik.ModelError) as info:
        ik.load_model(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "config.json" in str(info.value)


def test_load_model_refuses_dir_without_any_weights(tmp_path, tokenizer):
    make_model("gpt2", len(tokenizer)).config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ik.ModelError, match=r"safetensors"):
        ik.load_model(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_model_refuses_dir_without_tokenizer(tmp_path, tokenizer, family):
    make_model(family, len(tokenizer), dtype=torch.float32).save_pretrained(
        tmp_path, safe_serialization=True
    )
    with pytest.raises(ik.ModelError, match="tokenizer"):
        ik.load_model(tmp_path)


def test_load_model_truncated_safetensors_names_the_file(tmp_path, saved):
    src, _ = saved["gpt2"]
    for item in src.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ik.ModelError, match=r"model\.safetensors"):
        ik.load_model(tmp_path)


def test_load_model_refuses_checkpoint_with_missing_weights(tmp_path, saved):
    from safetensors.torch import load_file, save_file

    src, _ = saved["llama"]
    for item in src.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ik.ModelError, match=r"model\.layers\.1\.mlp\.down_proj"):
        ik.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# Hub ids in the local Hugging Face cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache, repo_id: str, source, branch: str = "main"):
    """``source``'s files laid out as the hub cache keeps a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / branch).write_text(COMMIT)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_hub_id_loads_from_the_cache(saved, tmp_path, offline, revision):
    path, original = saved["llama"]
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", path)
    offline.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tok = ik.load_model("tiny-org/tiny-llama", revision=revision, device="cpu")
    assert ik.model_fingerprint(model) == ik.model_fingerprint(original)
    assert tok(TEXTS[0])["input_ids"] == saved_tokenizer(path)(TEXTS[0])["input_ids"]


def saved_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_hub_cache_under_hf_home(saved, tmp_path, offline):
    path, original = saved["gpt2"]
    fake_hub_cache(tmp_path / "home" / "hub", "tiny-gpt2", path)
    offline.setenv("HF_HOME", str(tmp_path / "home"))
    model, _ = ik.load_model("tiny-gpt2", device="cpu")
    assert ik.model_fingerprint(model) == ik.model_fingerprint(original)


def test_hub_id_not_in_the_cache_names_the_id_and_the_cache(tmp_path, offline):
    offline.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ik.MissingFileError) as info:
        ik.load_model("EleutherAI/pythia-160m")
    message = str(info.value)
    assert "'EleutherAI/pythia-160m'" in message and str(tmp_path / "hub") in message
    assert "not in the Hugging Face cache" in message and "\n" not in message


def test_hub_revision_not_in_the_cache_is_named(saved, tmp_path, offline):
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", saved["llama"][0])
    offline.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ik.MissingFileError, match="at revision 'v2'"):
        ik.load_model("tiny-org/tiny-llama", revision="v2")


def test_revision_of_a_local_directory_is_refused(saved):
    with pytest.raises(ik.ParameterError, match="revision"):
        ik.load_model(saved["llama"][0], revision="main")


@pytest.mark.parametrize("dtype", ["float8", torch.int8, "half-ish"])
def test_bad_dtype_is_refused_before_any_load(dtype, tmp_path):
    with pytest.raises(ik.ParameterError, match="dtype"):
        ik.load_model(tmp_path / "not-even-there", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# bf16 checkpoints


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved in bf16 as several safetensors shards, and its weights in float32."""
    model = make_model("llama", len(tokenizer), dtype=torch.float32, hidden=32)
    path = tmp_path_factory.mktemp("bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(
        path, safe_serialization=True, max_shard_size="60KB"
    )
    tokenizer.save_pretrained(path)
    return path


def test_bf16_sharded_checkpoint_stays_bf16(bf16_dir):
    assert len(list(bf16_dir.glob("*.safetensors"))) > 1
    assert (bf16_dir / "model.safetensors.index.json").is_file()
    model, _ = ik.load_model(bf16_dir, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    as_float32, _ = ik.load_model(bf16_dir, dtype="float32", device="cpu")
    assert {p.dtype for p in as_float32.parameters()} == {torch.float32}
    for (name, p), q in zip(model.named_parameters(), as_float32.parameters(), strict=True):
        assert torch.equal(p.float(), q), name  # the same values, only widened


def test_bf16_model_scores_within_bf16_tolerance_of_float32(bf16_dir, tokenizer):
    train = ik.TextDataset.from_texts(TINY_CORPUS[:12], tokenizer, max_length=40)
    queries = [("The chef tastes the stew", " and adds salt."), ("A comet", " has a tail.")]
    scores = {}
    for dtype in ("auto", "float32"):
        model, _ = ik.load_model(bf16_dir, dtype=dtype, device="cpu")
        factors = ik.fit_factors(model, train, "mlp", progress=False)
        scores[dtype] = ik.score(model, factors, queries, train, progress=False).scores
    assert np.isfinite(scores["auto"]).all()
    # bf16 keeps 8 significant bits (rounding 2^-9): activations and gradients of two blocks
    # carry a few such roundings; the float32 accumulators keep the sums from adding more
    err = np.abs(scores["auto"] - scores["float32"]).max() / np.abs(scores["float32"]).max()
    assert err < 0.05, err
    for a, b in zip(scores["auto"], scores["float32"], strict=True):
        assert np.corrcoef(a, b)[0, 1] > 0.99


PEAK_CHILD = """
import json, sys
import torch, transformers, influencekit as ik

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the present size: the load's own peak follows
before = status("VmRSS:")
model, _ = ik.load_model(sys.argv[1], dtype=sys.argv[2], device="cpu")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": status("VmHWM:") - before, "bytes": size}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_loading_bf16_never_makes_a_float32_copy(tmp_path, tokenizer):
    # ~38M parameters: 75 MB in bf16, 150 MB in float32, far above the noise of a process
    model = make_model("llama", len(tokenizer), dtype=torch.bfloat16, hidden=1024, layers=4)
    save_model_dir(tmp_path, model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    found = {}
    for dtype in ("auto", "float32"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_CHILD, str(tmp_path), dtype],
            capture_output=True,
            text=True,
            check=True,
        )
        found[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    size = found["auto"]["bytes"]
    assert size == 2 * n_params  # kept in bf16
    # The bf16 weights and the file pages they are read through take up to twice their size;
    # a float32 copy held beside the bf16 weights would take three times (1 + 2).
    assert found["auto"]["peak"] < 2.5 * size, found
    assert found["float32"]["peak"] >= 2 * size, found  # the measure does see a float32 copy
