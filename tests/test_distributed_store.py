"""``GradientStore.build`` under ``torchrun``: two gloo processes on CPU build one store.

Each build runs ``helpers/dist_store_child.py`` under ``python -m torch.distributed.run``
with two processes (a fresh process group per run, as a user would start it). Every
distributed store is compared with a single-process build made here from the same inputs
(``helpers.store_child.make_inputs``): same ids, texts, token ids, parts and configuration, and
arrays equal bit for bit, for ``dense`` and ``kron:8`` (seeded projections). Kills are
deterministic: the child's ``--die`` makes one rank SIGKILL itself at a chosen step.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.store import shards
from influencekit.store.layout import part_name, parts_dir, read_manifest, write_manifest
from influencekit.store.shards import rank_share, shard_path
from influencekit.tiny import TINY_CORPUS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers.store_child import make_inputs

HERE = pathlib.Path(__file__).resolve().parent
CHILD = HERE / "helpers" / "dist_store_child.py"
N = 20
PART_SIZE = 3  # 7 parts for 20 examples: rank 0 encodes parts 0-2, rank 1 parts 3-6
BATCH = 2
TIMEOUT = 180  # seconds per torchrun (about 6 s each here)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


@pytest.fixture(scope="module")
def inputs():
    """``(tokenizer, model, train)``: exactly what every rank of the child builds from."""
    return make_inputs(N)


def dataset(tokenizer, n: int) -> ik.TextDataset:
    """The child's training data for ``--examples n``."""
    ids = [f"ex{i:02d}" for i in range(n)]
    return ik.TextDataset.from_texts(TINY_CORPUS[:n], tokenizer, ids=ids)


def single_process(path, inputs, codec: str, sizes: list[int], part_size: int = PART_SIZE):
    """The reference: one process builds ``path``, once per dataset size in ``sizes``."""
    tokenizer, model, _ = inputs
    for n in sizes:
        store = ik.GradientStore.build(
            path,
            model,
            dataset(tokenizer, n),
            modules="mlp",
            codec=codec,
            part_size=part_size,
            batch_size=BATCH,
            seed=0,
            progress=False,
        )
    return store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run the child on two processes; ``(exit status, output)``. Nothing outlives it: the
    launcher and its workers share a new process group, killed at the end."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "--monitor-interval=0.1",
        str(CHILD),
        *map(str, args),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "INFLUENCEKIT_PROGRESS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=HERE.parent,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun ran over {timeout} s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind by a failed run
    return proc.returncode, out


def build_args(n: int, codec: str, path, part_size: int = PART_SIZE) -> list:
    return [
        "--examples",
        n,
        "--part-size",
        part_size,
        "--batch-size",
        BATCH,
        "--build",
        codec,
        path,
    ]


def assert_same_store(path, reference: ik.GradientStore) -> None:
    """The store at ``path`` is ``reference`` in everything but its uuid; no shard is left."""
    path = pathlib.Path(path)
    got = ik.GradientStore.open(path)
    assert got.config == reference.config
    assert got.manifest.part_size == reference.manifest.part_size
    assert got.manifest.part_counts == reference.manifest.part_counts
    assert got.manifest.layer_params == reference.manifest.layer_params
    assert got.manifest.tokenizer_files == reference.manifest.tokenizer_files
    for mine, theirs in zip(
        got.manifest.layer_tensors, reference.manifest.layer_tensors, strict=True
    ):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # e.g. kron projections
    ours, want = got.examples(), reference.examples()
    assert ours.ids == want.ids
    assert ours.texts == want.texts
    assert ours.metadata == want.metadata
    assert ours.input_ids == want.input_ids
    everything = list(range(len(reference)))
    for mine, theirs in zip(got.rows(everything), reference.rows(everything), strict=True):
        assert mine.keys() == theirs.keys()
        for key in theirs:
            np.testing.assert_array_equal(mine[key], theirs[key])
    left = sorted(p.name for p in path.parent.iterdir() if ".shard-" in p.name)
    assert left == [], f"shards left behind: {left}"
    strays = sorted(p.name for p in parts_dir(path).iterdir() if p.name.startswith("."))
    assert strays == []


def commits(log: pathlib.Path) -> list[tuple[int, int]]:
    """``(rank, part number)`` of each shard commit the child logged."""
    if not log.exists():
        return []
    return [tuple(map(int, line.split())) for line in log.read_text().split("\n") if line]


def test_shares_are_contiguous_and_balanced():
    for n_parts in range(12):
        for world in range(1, 6):
            shares = [rank_share(n_parts, rank, world) for rank in range(world)]
            assert [j for b in shares for j in b] == list(range(n_parts))
            assert max(len(b) for b in shares) - min(len(b) for b in shares) <= 1
    assert shard_path("run/g.h5", 1, 2).name == "g.h5.shard-1-of-2.h5"


def test_a_part_is_linked_or_else_copied(tmp_path, monkeypatch):
    source = tmp_path / "part.h5"
    source.write_bytes(b"immutable part")
    shards._link(source, tmp_path / "linked.h5")
    assert os.stat(tmp_path / "linked.h5").st_ino == os.stat(source).st_ino

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(shards.os, "link", no_links)
    shards._link(source, tmp_path / "copied.h5")
    assert (tmp_path / "copied.h5").read_bytes() == source.read_bytes()
    assert os.stat(tmp_path / "copied.h5").st_ino != os.stat(source).st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied.h5", "linked.h5", "part.h5"]


def test_a_shard_with_other_codec_parameters_is_named(tmp_path, inputs):
    main = single_process(tmp_path / "kron.h5", inputs, "kron:8", [4]).manifest
    assert shards._differs_from_main(main, main) is None
    redrawn = single_process(tmp_path / "other.h5", inputs, "kron:8", [4]).manifest
    redrawn.uuid = main.uuid
    assert shards._differs_from_main(redrawn, main) is None  # same seed: same projections
    redrawn.layer_tensors[1] = {k: v + 1e-12 for k, v in redrawn.layer_tensors[1].items()}
    problem = shards._differs_from_main(redrawn, main)
    assert problem == f"codec arrays of layer {main.config.modules[1]} differ"


def test_two_processes_build_the_single_process_store(tmp_path, inputs):
    dense, kron = tmp_path / "dense.h5", tmp_path / "kron.h5"
    status, out = torchrun(*build_args(N, "dense", dense), "--build", "kron:8", kron)
    assert status == 0, out[-4000:]
    # Both ranks print to one pipe: lines may interleave, so match anywhere.
    assert sorted(re.findall(r"DONE (\d+) (\d+)", out)) == [(r, str(N)) for r in "0011"]
    for codec, path in (("dense", dense), ("kron:8", kron)):
        reference = single_process(tmp_path / f"ref-{codec}.h5", inputs, codec, [N])
        assert_same_store(path, reference)


def test_a_killed_rank_resumes_its_shard(tmp_path, inputs):
    """Rank 1 dies after its first commit; then rank 0 dies mid-stitch; then a clean run
    finishes, recomputing nothing that a shard had committed."""
    path, part_size = tmp_path / "grads.h5", 2  # 10 parts: 0-4 on rank 0, 5-9 on rank 1
    logs = [tmp_path / f"commits-{i}.txt" for i in range(3)]
    args = build_args(N, "dense", path, part_size)

    status, out = torchrun(*args, "--commit-log", logs[0], "--die", "1:commit:1")
    assert status != 0, out[-4000:]
    assert len(ik.GradientStore.open(path)) == 0  # created by rank 0; nothing stitched yet
    assert [c for c in commits(logs[0]) if c[0] == 1] == [(1, 5)]
    shard = shard_path(path, 1, 2)
    assert read_manifest(shard).part_counts == [part_size]
    inode = os.stat(parts_dir(shard) / part_name(0)).st_ino
    # Rank 0 was stopped wherever it was: its shard holds some of its parts.
    shard0 = shard_path(path, 0, 2)
    done0 = len(read_manifest(shard0).part_counts) if shard0.exists() else 0

    status, out = torchrun(*args, "--commit-log", logs[1], "--die", "0:stitch")
    assert status != 0, out[-4000:]
    assert len(ik.GradientStore.open(path)) == 0  # the parts are linked, not committed
    assert (parts_dir(path) / part_name(9)).exists()
    assert [c for c in commits(logs[1]) if c[0] == 1] == [(1, j) for j in range(6, 10)]
    assert [c for c in commits(logs[1]) if c[0] == 0] == [(0, j) for j in range(done0, 5)]

    status, out = torchrun(*args, "--commit-log", logs[2])
    assert status == 0, out[-4000:]
    assert commits(logs[2]) == []  # only stitched: every shard was complete
    reference = single_process(tmp_path / "ref.h5", inputs, "dense", [N], part_size)
    assert_same_store(path, reference)
    assert os.stat(parts_dir(path) / part_name(5)).st_ino == inode  # linked, not recomputed


def test_appends_and_leftovers(tmp_path, inputs):
    """A second distributed build appends; stale shards are discarded; a third build adds
    nothing; a build with another codec is refused on every rank without a hang."""
    path, first = tmp_path / "grads.h5", 12
    status, out = torchrun(*build_args(first, "dense", path))
    assert status == 0, out[-4000:]
    # Leftovers a crash could leave: rank 0's shard after the stitch was committed (its
    # parts are hard links to the store's), a damaged manifest, a shard of a 3-process run.
    stale = shard_path(path, 0, 2)
    write_manifest(stale, read_manifest(path))
    parts_dir(stale).mkdir()
    committed = ik.GradientStore.open(path).part_paths()
    for number, part in enumerate(committed):
        os.link(part, parts_dir(stale) / part_name(number))
    shard_path(path, 1, 2).write_bytes(b"not an HDF5 file")
    parts_dir(shard_path(path, 2, 3)).mkdir()
    (parts_dir(shard_path(path, 2, 3)) / part_name(0)).write_bytes(b"half a part")
    inodes = [os.stat(p).st_ino for p in committed]

    status, out = torchrun(*build_args(N, "dense", path))
    assert status == 0, out[-4000:]
    reference = single_process(tmp_path / "ref.h5", inputs, "dense", [first, N])
    assert_same_store(path, reference)
    store = ik.GradientStore.open(path)
    assert [os.stat(p).st_ino for p in store.part_paths()[: len(committed)]] == inodes

    before = (store.manifest.uuid, [os.stat(p).st_ino for p in store.part_paths()])
    status, out = torchrun(*build_args(N, "dense", path))
    assert status == 0, out[-4000:]
    store = ik.GradientStore.open(path)
    assert (store.manifest.uuid, [os.stat(p).st_ino for p in store.part_paths()]) == before

    status, out = torchrun(*build_args(N, "kron:8", path), timeout=120)
    assert status != 0
    errors = dict(re.findall(r"ERROR (\d+) (\w+: .*)", out))
    assert errors["0"].startswith("MismatchError: ")
    assert "cannot continue this store, it was built differently: codec: " in errors["0"]
    assert errors["1"].startswith("StoreWriteError: ")  # rank 1 stops too, naming rank 0
    assert "opening the store failed on rank 0" in errors["1"]
    assert_same_store(path, reference)
