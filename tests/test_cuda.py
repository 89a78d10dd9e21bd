"""Every device path on CUDA against the same computation on the CPU; skipped without a GPU.

The tiny trained GPT-2 of tests/helpers/tiny_example.py, copied to ``cuda``:

1. ``fit_factors`` (eigendecompositions on the GPU in float64): the same covariances and Λ.
2. ``score`` on the fly, from a dense and a default (``sparse8``) store built on the GPU
   (blocks reach the GPU through page-locked memory), with ``refine``, and
   ``token_scores``: the CPU's scores to float32 rounding.
3. bf16: a bf16 model loaded with ``dtype="auto"`` and a float32 model under bf16 autocast
   rank like float32.
4. ``torchrun`` on one process (NCCL, as the kit picks where CUDA is visible) writes the
   single process's scores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.cli import main
from influencekit.fitting import eigh_on_device

from helpers.tiny_example import QUERIES, corpus_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
QUIET = {"progress": False}


def assert_scores_close(found, expected, rtol=1e-3):
    found, expected = np.asarray(found), np.asarray(expected)
    atol = rtol * float(np.abs(expected).max())
    np.testing.assert_allclose(found, expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def both(tiny_trained):
    """The tiny model and its factors on the CPU, the same model on the GPU, the data."""
    model, factors, result, train = tiny_trained
    return model, copy.deepcopy(model).to(CUDA), factors, result, train


def covariance(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (q * d) @ q.T  # eigenvectors' signs and order do not matter here


def test_eigh_on_device_matches_the_host():
    x = torch.randn(300, 300, dtype=torch.float64)
    x = x @ x.T
    values, vectors = eigh_on_device(x.to(CUDA))
    assert values.device.type == "cpu" and vectors.device.type == "cpu"
    torch.testing.assert_close(covariance(vectors, values), x, rtol=1e-9, atol=1e-9)


def test_fit_on_cuda_equals_cpu(both):
    cpu_model, gpu_model, _, _, train = both
    cpu = ik.fit_factors(cpu_model, train, "mlp", dtype="float64", **QUIET)
    gpu = ik.fit_factors(gpu_model, train, "mlp", dtype="float64", **QUIET)
    for name in cpu.modules:
        a, b = cpu.layers[name], gpu.layers[name]
        for q, d in (("q_a", "d_a"), ("q_s", "d_s")):
            want = covariance(getattr(a, q), getattr(a, d))
            got = covariance(getattr(b, q), getattr(b, d))
            # The model runs in float32 on both devices: activations differ by float32
            # rounding over a few layers of sums (u = 6e-8 times their length and depth,
            # ~1e-6 relative), which the float64 accumulation carries into A and S.
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max())
        torch.testing.assert_close(b.lam, a.lam, rtol=1e-4, atol=1e-6 * a.lam.abs().max())


def test_score_on_the_fly_on_cuda(both):
    _, gpu_model, factors, result, train = both
    found = ik.score(gpu_model, factors, QUERIES, train, **QUIET)
    assert_scores_close(found.layer_scores, result.layer_scores)


@pytest.mark.parametrize("codec", ["dense", None])
def test_store_built_and_scored_on_cuda(both, tmp_path, codec):
    cpu_model, gpu_model, factors, _, train = both
    options = {"factors": factors, "codec": codec, **QUIET}
    on_gpu = ik.GradientStore.build(tmp_path / "g.h5", gpu_model, train, **options)
    on_cpu = ik.GradientStore.build(tmp_path / "c.h5", cpu_model, train, **options)
    assert on_gpu.codec == on_cpu.codec
    want = ik.score(cpu_model, factors, QUERIES, on_cpu, **QUIET)
    for store in (on_gpu, on_cpu):  # GPU-built on the GPU, and a CPU-built store on the GPU
        got = ik.score(gpu_model, factors, QUERIES, store, **QUIET)
        for a, b in zip(got.scores, want.scores, strict=True):
            assert np.corrcoef(a, b)[0, 1] > 0.999
    refined = ik.score(gpu_model, factors, QUERIES, on_gpu, top_k=5, refine=10, **QUIET)
    exact = ik.score(cpu_model, factors, QUERIES, train, **QUIET)
    for q in range(len(QUERIES)):
        for index, value in refined.top(q, 5):
            assert value == pytest.approx(exact.scores[q, index], rel=1e-3, abs=1e-6)


def test_token_scores_on_cuda(both):
    _, gpu_model, factors, result, train = both
    tokens = ik.token_scores(gpu_model, factors, QUERIES[0], train[3])
    assert tokens.sum() == pytest.approx(result.scores[0, 3], rel=1e-3, abs=1e-6)


def test_bf16_on_cuda_ranks_like_float32(both, tmp_path):
    cpu_model, _, factors, result, train = both
    bf16 = copy.deepcopy(cpu_model).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path, safe_serialization=True)
    train.tokenizer.save_pretrained(tmp_path)
    loaded, _ = ik.load_model(tmp_path, device="cuda")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    scored = {
        "bf16 weights": ik.score(loaded, factors, QUERIES, train, **QUIET),
        "bf16 autocast": ik.score(
            copy.deepcopy(cpu_model).to(CUDA), factors, QUERIES, train,
            amp_dtype=torch.bfloat16, **QUIET,
        ),
    }  # fmt: skip
    for what, found in scored.items():
        assert np.isfinite(found.scores).all(), what
        for a, b in zip(found.scores, result.scores, strict=True):
            assert np.corrcoef(a, b)[0, 1] > 0.99, what


def test_torchrun_nccl_on_one_process(both, tmp_path):
    cpu_model, _, factors, _, train = both
    cpu_model.save_pretrained(tmp_path / "model")
    train.tokenizer.save_pretrained(tmp_path / "model")
    factors.save(tmp_path / "f.h5")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus_records()))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    args = ["score", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "t.jsonl")]
    args += ["--factors", str(tmp_path / "f.h5"), "--queries", str(tmp_path / "q.jsonl")]
    args += ["--max-length", "64", "--device", "cuda", "--quiet"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1"]
    command += ["-m", "influencekit.cli", *args, "--out", str(tmp_path / "r1.h5")]
    env = dict(os.environ, INFLUENCEKIT_PROGRESS="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "r0.h5")]) == 0
    one = ik.InfluenceResult.load(tmp_path / "r0.h5")
    run = ik.InfluenceResult.load(tmp_path / "r1.h5")
    assert_scores_close(run.layer_scores, one.layer_scores, rtol=1e-5)
