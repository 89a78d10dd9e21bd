"""``fit`` and ``score`` under ``torchrun --nproc_per_node=2`` (gloo, CPU), through the
unchanged CLI, against the same commands in one process.

The work is split by position (every other batch, every other store block) and the parts
are all-reduced or merged, so scores match a single process to the last bits wherever the
order of additions is unchanged (scoring) and to float64 rounding where it is not (the
factors' sums)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import influencekit as ik
from influencekit.cli import main

from helpers.tiny_example import QUERIES, corpus_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str, processes: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``influencekit ARGS`` under torchrun on 127.0.0.1 with ``processes`` CPU processes."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "influencekit.cli", *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", INFLUENCEKIT_PROGRESS="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def files(tiny_trained, tmp_path_factory):
    """The tiny model, its training data and queries as files, and single-process outputs."""
    model, _, _, train = tiny_trained
    root = tmp_path_factory.mktemp("dist")
    model.save_pretrained(root / "model")
    train.tokenizer.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus_records()))
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    common = ["--model", str(root / "model"), "--train", str(root / "train.jsonl")]
    common += ["--max-length", "64", "--batch-size", "4", "--quiet"]
    return root, common


def single(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def single_factors(files):
    """Factors fitted in one process (float64 accumulation): the reference, and the factors
    the scoring tests use."""
    root, common = files
    single("fit", *common, "--dtype", "float64", "--out", str(root / "f1.h5"))
    return root / "f1.h5"


def test_factors_fitted_on_two_processes_equal_one(files, single_factors):
    root, common = files
    done = torchrun("fit", *common, "--dtype", "float64", "--out", str(root / "f2.h5"))
    assert done.stdout.count("wrote") == 1  # rank 0 alone writes and reports
    one, two = ik.Factors.load(single_factors), ik.Factors.load(root / "f2.h5")
    assert one.meta == two.meta and one.modules == two.modules
    for name in one.modules:
        a, b = one.layers[name], two.layers[name]
        pairs = ((a.d_a, a.q_a, b.d_a, b.q_a), (a.d_s, a.q_s, b.d_s, b.q_s))
        for d1, q1, d2, q2 in ([t.numpy() for t in group] for group in pairs):
            # the covariances (eigenvectors are defined up to sign and within ties)
            c1, c2 = q1 @ np.diag(d1) @ q1.T, q2 @ np.diag(d2) @ q2.T
            assert np.allclose(c1, c2, rtol=1e-10, atol=1e-12 * float(abs(c1).max()))
        lam1, lam2 = a.lam.numpy(), b.lam.numpy()
        assert np.allclose(lam1, lam2, rtol=1e-8, atol=1e-10 * float(lam1.max()))


def test_scores_on_the_fly_on_two_processes_equal_one(files, single_factors):
    root, common = files
    factors = ["--factors", str(single_factors), "--queries", str(root / "q.jsonl")]
    score = ["score", *common, *factors]
    single(*score, "--out", str(root / "r1.h5"))
    torchrun(*score, "--out", str(root / "r2.h5"))
    one, two = ik.InfluenceResult.load(root / "r1.h5"), ik.InfluenceResult.load(root / "r2.h5")
    assert one.train_ids == two.train_ids and one.query_ids == two.query_ids
    assert np.array_equal(one.layer_scores, two.layer_scores)  # same batches, same sums
    single(*score, "--top-k", "5", "--out", str(root / "k1.h5"))
    torchrun(*score, "--top-k", "5", "--out", str(root / "k2.h5"))
    one, two = ik.InfluenceResult.load(root / "k1.h5"), ik.InfluenceResult.load(root / "k2.h5")
    assert np.array_equal(one.indices, two.indices)  # the merged top-k is the top-k
    assert np.array_equal(one.layer_scores, two.layer_scores)


def test_scores_from_a_store_on_two_processes_equal_one(files, single_factors):
    root, common = files
    # a store of several blocks, so that each process reads some
    single("build", *common, "--out", str(root / "s.h5"), "--codec", "kron:8", "--chunk-size", "7")
    assert len(list(ik.GradientStore.open(root / "s.h5").blocks())) > 2
    score = ["score", "--model", str(root / "model"), "--store", str(root / "s.h5")]
    score += ["--factors", str(single_factors), "--queries", str(root / "q.jsonl"), "--quiet"]
    for extra in ([], ["--top-k", "4"], ["--top-k", "4", "--refine", "6"]):
        single(*score, *extra, "--out", str(root / "t1.h5"))
        torchrun(*score, *extra, "--out", str(root / "t2.h5"))
        one = ik.InfluenceResult.load(root / "t1.h5")
        two = ik.InfluenceResult.load(root / "t2.h5")
        assert one.meta.get("refined") == two.meta.get("refined"), extra
        if one.is_top_k:
            assert np.array_equal(one.indices, two.indices), extra
        assert np.array_equal(one.layer_scores, two.layer_scores), extra


def test_the_build_command_on_two_processes_makes_the_single_process_store(files):
    root, common = files
    build = ["build", *common, "--codec", "kron:8", "--chunk-size", "7"]
    single(*build, "--out", str(root / "b1.h5"))
    torchrun(*build, "--out", str(root / "b2.h5"))
    one, two = ik.GradientStore.open(root / "b1.h5"), ik.GradientStore.open(root / "b2.h5")
    assert one.ids == two.ids and len(one.part_paths()) == len(two.part_paths())
    for (first1, arrays1), (first2, arrays2) in zip(one.blocks(), two.blocks(), strict=True):
        assert first1 == first2
        for layer1, layer2 in zip(arrays1, arrays2, strict=True):
            assert all(np.array_equal(layer1[k], layer2[k]) for k in layer1)


def test_the_demo_refuses_to_run_on_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--quick"]) == 2
    assert "run the demo in one process" in capsys.readouterr().err
