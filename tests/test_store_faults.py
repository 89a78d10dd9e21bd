"""The gradient store under faults: kill -9 mid-build, a reader during a build, a full disk,
appends, refused reuse, damaged files and the build lock.

Builds that must die at arbitrary moments run in other processes: ``helpers/store_child.py``
builds one deterministic store (a seeded tiny GPT-2, the TINY_CORPUS tokenizer, ids
``ex00..ex39``). To save ~4 s of imports per build, most builds are jobs of one
``store_child.py --serve`` fork server (module-scoped); each job is its own process, killed
with SIGKILL like any builder. Every resumed or appended store is compared, array by array,
with a clean build made here in the test process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pathlib
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit import h5io
from influencekit.data import Example
from influencekit.store.layout import part_name, parts_dir
from influencekit.tiny import TINY_CORPUS, build_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers.store_child import _fd_point, make_inputs
from helpers.tiny_models import make_model

HERE = pathlib.Path(__file__).resolve().parent
CHILD = HERE / "helpers" / "store_child.py"
N = 40
PART_SIZE = 3  # 14 parts for 40 examples: 13 of 3, one of 1
BATCH = 2  # a part of 3 is computed as a padded batch of 2 and a batch of 1
IDS = [f"ex{i:02d}" for i in range(N)]
QUERY = ("The moon", " rises over the sea.")
STORE_OPTIONS = {
    "modules": "mlp",
    "codec": "dense",
    "part_size": PART_SIZE,
    "batch_size": BATCH,
    "progress": False,
}


# ---------------------------------------------------------------------------------------------
# Fixtures: the child's inputs, clean reference stores, a fork server for child builds


@pytest.fixture(scope="module")
def inputs():
    """``(tokenizer, model, train)``: exactly what store_child.py builds from."""
    return make_inputs(N)


@pytest.fixture(scope="module")
def model(inputs):
    return inputs[1]


@pytest.fixture(scope="module")
def train(inputs):
    return inputs[2]


def build(path, model, train, **options):
    return ik.GradientStore.build(path, model, train, **{**STORE_OPTIONS, **options})


@pytest.fixture(scope="module")
def reference(model, train, tmp_path_factory):
    """Clean, uninterrupted builds here, by codec, as the child would make them."""
    folder = tmp_path_factory.mktemp("reference")
    return {
        codec: build(folder / f"{codec.replace(':', '')}.h5", model, train, codec=codec).path
        for codec in ("dense", "kron:4")
    }


class Job:
    """One build running in a worker process of the fork server."""

    def __init__(self, server: ChildServer, pid: int) -> None:
        self.server, self.pid, self.status = server, pid, None

    def poll(self) -> int | None:
        if self.status is None:
            self.server.collect(self, timeout=0)
        return self.status

    def wait(self, timeout: float = 120) -> int:
        if self.status is None:
            self.server.collect(self, timeout=timeout)
        assert self.status is not None, f"build {self.pid} still running after {timeout} s"
        return self.status

    def kill(self) -> int:
        """SIGKILL the worker (if it still runs); its exit status (-9 if the kill landed)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return self.wait()


class ChildServer:
    """``store_child.py --serve``: jobs are command lines of store_child.py, one at a time."""

    def __init__(self, log: pathlib.Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "wb"),  # closed with the process
            cwd=HERE.parent,
        )
        self.buffer = b""
        assert self.line(timeout=180) == "READY", self.diagnose()

    def diagnose(self) -> str:
        return f"fork server log:\n{self.log.read_text()[-3000:]}"

    def line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                return None
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError("the fork server died\n" + self.diagnose())
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def start(self, path, *args: str) -> Job:
        self.proc.stdin.write((json.dumps([str(path), *map(str, args)]) + "\n").encode())
        self.proc.stdin.flush()
        line = self.line(timeout=60)
        assert line and line.startswith("PID "), (line, self.diagnose())
        return Job(self, int(line.split()[1]))

    def collect(self, job: Job, timeout: float) -> None:
        line = self.line(timeout)
        if line is not None:
            word, pid, status = line.split()
            assert (word, int(pid)) == ("EXIT", job.pid), line
            job.status = int(status)

    @contextlib.contextmanager
    def job(self, path, *args: str):
        job = self.start(path, *args)
        try:
            yield job
        finally:
            job.kill()

    def run(self, path, *args: str) -> int:
        with self.job(path, *args) as job:
            return job.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ChildServer(tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------
# Reading a store two ways, and comparing stores


def stored_arrays(store: ik.GradientStore) -> list[dict[str, np.ndarray]]:
    """Every layer's arrays over all examples, read through ``blocks()`` (small blocks)."""
    pieces: list[dict[str, list]] = [{} for _ in store.modules]
    expect = 0
    for first, arrays in store.blocks(block_bytes=1):  # one row per block: many reads
        assert first == expect
        for layer, got in zip(pieces, arrays, strict=True):
            for key, value in got.items():
                layer.setdefault(key, []).append(value)
        expect += len(next(iter(arrays[0].values())))
    assert expect == len(store)
    return [{k: np.concatenate(v) for k, v in layer.items()} for layer in pieces]


def raw_parts(path) -> list[dict]:
    """Each committed part read with plain h5py: attributes and every dataset."""
    path = pathlib.Path(path)
    with h5py.File(path, "r") as f:
        counts = [int(c) for c in f["part_counts"][()]]
    parts = []
    for number, count in enumerate(counts):
        with h5py.File(parts_dir(path) / part_name(number), "r") as f:
            datasets = {}

            def keep(name, obj, datasets=datasets):
                if isinstance(obj, h5py.Dataset):
                    datasets[name] = obj[()]

            f.visititems(keep)
            for name in f["layers"]:
                for key, dset in f["layers"][name].items():
                    assert dset.fletcher32, f"{name}/{key} has no checksum"
            attrs = {k: int(f.attrs[k]) for k in ("number", "first", "count")}
            attrs["store_uuid"] = str(f.attrs["store_uuid"])
        assert attrs["count"] == count
        parts.append({"attrs": attrs, "datasets": datasets})
    return parts


def assert_same_store(path, clean, *, ids=IDS, same_parts=True) -> None:
    """``path`` holds exactly what the clean store ``clean`` holds: same examples in the same
    order, same token ids, bit-identical arrays (read through the library and with h5py)."""
    got, want = ik.GradientStore.open(path), ik.GradientStore.open(clean)
    assert got.ids == list(ids) == want.ids
    assert len(set(got.ids)) == len(got) == len(ids)  # no duplicate, none missing
    a, b = got.examples(), want.examples()
    assert a.input_ids == b.input_ids
    assert a.texts == b.texts
    assert a.metadata == b.metadata
    assert got.config == want.config
    assert got.manifest.part_size == want.manifest.part_size
    assert got.manifest.layer_params == want.manifest.layer_params
    assert got.manifest.tokenizer_files == want.manifest.tokenizer_files
    for mine, theirs in zip(got.manifest.layer_tensors, want.manifest.layer_tensors, strict=True):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    for layer, (mine, theirs) in enumerate(
        zip(stored_arrays(got), stored_arrays(want), strict=True)
    ):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype
            assert np.array_equal(mine[key], theirs[key]), f"layer {layer} array {key} differs"
    raw_got, raw_want = raw_parts(path), raw_parts(clean)
    if same_parts:
        assert got.manifest.part_counts == want.manifest.part_counts
        for number, (mine, theirs) in enumerate(zip(raw_got, raw_want, strict=True)):
            assert mine["attrs"]["store_uuid"] == got.manifest.uuid
            del mine["attrs"]["store_uuid"], theirs["attrs"]["store_uuid"]
            assert mine["attrs"] == theirs["attrs"]
            assert mine["datasets"].keys() == theirs["datasets"].keys()
            for name, value in mine["datasets"].items():
                assert np.array_equal(value, theirs["datasets"][name]), f"part {number}: {name}"
    else:  # other parts (an append): compare the concatenation of all parts
        for name in raw_want[0]["datasets"]:
            mine = np.concatenate([p["datasets"][name] for p in raw_got])
            theirs = np.concatenate([p["datasets"][name] for p in raw_want])
            assert np.array_equal(mine, theirs), name


def temp_files(folder) -> list[str]:
    return sorted(p.name for p in pathlib.Path(folder).rglob("*") if ".tmp-" in p.name)


def assert_parts_dir_clean(path, n_parts: int) -> None:
    """Exactly the lock and the committed parts: no temporary or uncommitted file."""
    expected = {"build.lock", *(part_name(k) for k in range(n_parts))}
    assert {p.name for p in parts_dir(path).iterdir()} == expected


def committed(path) -> int | None:
    """Examples named by the manifest now (None before it exists): a cheap peek."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["n_examples"])
    except FileNotFoundError:
        return None


def check_committed_prefix(path, clean, last: int) -> int:
    """After a kill: the store opens and holds a prefix of the clean ids, rows as the clean ones."""
    if not pathlib.Path(path).exists():  # killed before the first manifest was renamed
        with pytest.raises(FileNotFoundError):
            ik.GradientStore.open(path)
        assert not list(parts_dir(path).glob("part-*.h5"))
        assert last == 0
        return 0
    store = ik.GradientStore.open(path)
    n = len(store)
    assert n >= last, "committed examples went backwards"
    assert store.ids == IDS[:n]
    assert n % PART_SIZE == 0 or n == N
    want = ik.GradientStore.open(clean)
    assert store.examples().input_ids == want.examples().input_ids[:n]
    if n:
        for mine, theirs in zip(stored_arrays(store), stored_arrays(want), strict=True):
            for key in mine:
                assert np.array_equal(mine[key], theirs[key][:n])
    return n


# ---------------------------------------------------------------------------------------------
# 1. kill -9 at random moments, then resume: identical to a clean build


def test_kill9_at_random_moments_then_resume_equals_clean_build(server, reference, tmp_path):
    rng = random.Random(20240611)
    path = tmp_path / "grads.h5"
    clean = reference["dense"]
    slow = ("--delay", "0.02")  # ~0.2 s per commit: kills land inside commits
    history = []  # (how, status, committed after)
    last = 0

    # A fresh process killed while Python and torch start: the store is not touched yet.
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path)],
        cwd=HERE.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(rng.uniform(0.2, 1.0))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    last = check_committed_prefix(path, clean, last)
    history.append(("interpreter startup", -9, last))

    # Builds killed early: while they check the model, take the lock, write the first manifest.
    for _ in range(2):
        with server.job(path, *slow) as job:
            time.sleep(rng.uniform(0.0, 0.15))
            status = job.kill()
        last = check_committed_prefix(path, clean, last)
        history.append(("build startup", status, last))

    # Builds killed mid-build: wait for one or two more commits, then a random moment more.
    for _ in range(5):
        with server.job(path, *slow) as job:
            target = last + PART_SIZE * rng.randint(1, 2)
            deadline = time.monotonic() + 60
            while (committed(path) or 0) < target and job.poll() is None:
                assert time.monotonic() < deadline, "the build makes no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
            status = job.kill()
        before = last
        last = check_committed_prefix(path, clean, last)
        history.append(("mid-build", status, last))
        assert last > before or status != -9

    kills = [h for h in history if h[1] == -signal.SIGKILL]
    mid_build = [h for h in kills if h[0] == "mid-build" and 0 < h[2] < N]
    assert len(kills) >= 5, history
    assert len(mid_build) >= 3, history

    assert server.run(path) == 0
    assert_same_store(path, clean)
    assert_parts_dir_clean(path, 14)  # no temp part, no uncommitted part left behind
    # (A temp manifest beside grads.h5, left by a kill mid-manifest-write, is the subject of
    # test_no_temp_manifest_left_after_kill_and_resume: random kills may or may not leave one.)


# The commit steps at which a builder can die, each hit exactly once in a chain of runs (kron
# codec: its projections live in the manifest), with the examples committed afterwards.
CRASH_CHAIN = [
    ("part-write:2", 0),  # 1st run: the first part half built (in memory: no file yet)
    ("part-tmp:2", 3),  # temp part 1 complete, not renamed
    ("part-dir:2", 6),  # part 2 renamed into place, the manifest naming it not yet written
    ("manifest-tmp:2", 9),  # part 3 renamed, its manifest written to a temp file, not renamed
    ("manifest-dir:1", 12),  # part 4's manifest renamed (committed), then killed
]


def test_kill9_at_each_commit_step_then_resume_equals_clean_build(server, reference, tmp_path):
    path = tmp_path / "grads.h5"
    clean = reference["kron:4"]
    last = 0
    for point, expected in CRASH_CHAIN:
        assert server.run(path, "--codec", "kron:4", "--die", point) == -signal.SIGKILL, point
        last = check_committed_prefix(path, clean, last)
        assert last == expected, point
        leftovers = {p.name for p in parts_dir(path).iterdir()}
        if point.startswith("part-write"):  # parts are built in memory: nothing on disk yet
            assert not any(part_name(last // PART_SIZE) in name for name in leftovers)
        if point.startswith("part-tmp"):  # the killed write left its complete temp file
            assert any(
                name.startswith(f".{part_name(last // PART_SIZE)}.tmp-") for name in leftovers
            )
        if point.startswith(("part-dir", "manifest-tmp")):  # a renamed, uncommitted part
            assert part_name(last // PART_SIZE) in leftovers
    assert server.run(path, "--codec", "kron:4") == 0
    assert_same_store(path, clean)
    assert_parts_dir_clean(path, 14)


def test_no_temp_manifest_left_after_kill_and_resume(server, inputs, tmp_path):
    """A builder killed while writing the manifest leaves ``.grads.h5.tmp-PID`` beside it;
    the next build cleans temp parts in grads.h5.d/ but never this file."""
    _, model, train = inputs
    path = tmp_path / "grads.h5"
    assert server.run(path, "--n", "6", "--die", "manifest-tmp:1") == -signal.SIGKILL
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".grads.h5.tmp-")]
    store = build(path, model, train[:6])  # the resume completes...
    assert store.ids == IDS[:6]
    assert temp_files(tmp_path) == []  # ...and should leave no temporary file anywhere


# ---------------------------------------------------------------------------------------------
# 2. A reader while a build runs


def test_reader_during_build_sees_growing_committed_prefixes(server, inputs, reference, tmp_path):
    _, model, train = inputs
    path = tmp_path / "grads.h5"
    clean = ik.GradientStore.open(reference["dense"])
    clean_arrays = stored_arrays(clean)
    seen, refused = [], False
    with server.job(path, "--delay", "0.02") as job:
        deadline = time.monotonic() + 120
        while job.poll() is None:
            assert time.monotonic() < deadline
            try:
                store = ik.GradientStore.open(path)
            except FileNotFoundError:  # before the first manifest
                assert not seen
                time.sleep(0.01)
                continue
            n = len(store)
            assert not seen or n >= seen[-1], "a later open saw fewer examples"
            assert store.ids == IDS[:n]
            assert store.examples().input_ids == clean.examples().input_ids[:n]
            rows = 0
            for first, arrays in store.blocks():
                count = len(arrays[0]["g"])
                for mine, theirs in zip(arrays, clean_arrays, strict=True):
                    assert np.array_equal(mine["g"], theirs["g"][first : first + count])
                rows += count
            assert rows == n
            seen.append(n)
            if 0 < n < N and not refused:  # a second builder meanwhile is refused
                with pytest.raises(ik.StoreWriteError, match="another process is building"):
                    build(path, model, train)
                refused = True
        assert job.status == 0
    assert refused
    mid = sorted({n for n in seen if 0 < n < N})
    assert len(mid) >= 3, seen  # the reads really happened during the build
    assert_same_store(path, reference["dense"])


# ---------------------------------------------------------------------------------------------
# 3. A full disk


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device (injected: {what})")


def fail_part_midwrite(monkeypatch, folder: pathlib.Path) -> list:
    """Part 2's temp file write fails after half its bytes reached the disk (ENOSPC)."""
    seen = []

    class HalfWriter(io.FileIO):
        def write(self, data):
            view = memoryview(data)
            written = super().write(view[: len(view) // 2])
            seen.append(written)
            raise _enospc("part 2, mid-write")

    def fake_open(file, mode="r", *args, **kwargs):
        name = pathlib.Path(file).name
        if mode == "wb" and name.startswith(f".{part_name(2)}.tmp-"):
            return HalfWriter(file, "wb")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(h5io, "open", fake_open, raising=False)
    return seen


def fail_fsync(monkeypatch, point: str, number: int) -> list:
    """The ``number``-th fsync of a ``point`` file fails (a full disk seen at fsync)."""
    real, seen = os.fsync, []

    def fsync(fd):
        if _fd_point(fd) == point:
            seen.append(os.fstat(fd).st_size)
            if len(seen) == number:
                raise _enospc(point)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("where", ["part-midwrite", "part-fsync", "manifest-fsync"])
def test_disk_full_keeps_committed_examples_and_resumes(
    monkeypatch, inputs, reference, tmp_path, where
):
    _, model, train = inputs
    path = tmp_path / "grads.h5"
    folder = parts_dir(path)
    if where == "part-midwrite":
        seen = fail_part_midwrite(monkeypatch, folder)
    elif where == "part-fsync":
        seen = fail_fsync(monkeypatch, "part-tmp", 3)  # part 2's temp file
    else:
        # manifest writes: 1 creation, 2 the fidelity record, 3-4 parts 0-1, 5 part 2
        seen = fail_fsync(monkeypatch, "manifest-tmp", 5)
    with pytest.raises(ik.StoreWriteError) as info:
        build(path, model, train)
    assert seen and seen[-1] > 0  # the failure came after bytes were written
    message = str(info.value)
    assert str(path) in message
    assert "part 2" in message
    assert "keeps its 6 committed examples" in message
    assert "No space left on device" in message
    assert isinstance(info.value, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()

    assert temp_files(tmp_path) == []
    store = ik.GradientStore.open(path)
    assert store.ids == IDS[:6]
    assert check_committed_prefix(path, reference["dense"], 0) == 6

    build(path, model, train)  # space freed: the same call resumes
    assert_same_store(path, reference["dense"])
    assert_parts_dir_clean(path, 14)


def test_disk_full_while_creating_the_store_is_a_store_write_error(inputs, tmp_path):
    """The first manifest (an empty store) is written outside _commit's error handling."""
    _, model, train = inputs
    path = tmp_path / "grads.h5"
    with pytest.MonkeyPatch.context() as patch:
        fail_fsync(patch, "manifest-tmp", 1)
        with pytest.raises(OSError) as info:
            build(path, model, train[:6])
    assert not path.exists()
    assert temp_files(tmp_path) == []
    assert build(path, model, train[:6]).ids == IDS[:6]  # the retry works
    assert isinstance(info.value, ik.StoreWriteError), f"bare {type(info.value).__name__}"
    assert str(path) in str(info.value)


# Under RLIMIT_FSIZE=40000 a manifest (~28 kB) still fits but a part (~85 kB) does not.
FSIZE = ("--fsize-after", "2", "--fsize", "40000")


def test_real_write_failure_file_size_limit(server, inputs, reference, tmp_path):
    """A real failing write (EFBIG from RLIMIT_FSIZE, set after 2 commits) in a worker."""
    _, model, train = inputs
    path = tmp_path / "grads.h5"
    report = tmp_path / "message.txt"
    assert server.run(path, *FSIZE, "--message-file", report) == 3
    message = report.read_text()
    assert "writing part 2 failed" in message
    assert "keeps its 6 committed examples" in message
    assert "too large" in message.lower()
    assert temp_files(tmp_path) == []
    assert check_committed_prefix(path, reference["dense"], 0) == 6
    build(path, model, train)  # the limit was the builder's own: here it resumes
    assert_same_store(path, reference["dense"])


def test_real_write_failure_exits_with_its_error_status(tmp_path):
    """The process that got StoreWriteError from a real failed write must exit normally.

    store_child.py, like the CLI, catches StoreWriteError and returns status 3; HDF5 objects
    of the failed temp part stay open, and the interpreter dies with SIGSEGV at exit.
    """
    path = tmp_path / "grads.h5"
    done = subprocess.run(
        [sys.executable, str(CHILD), str(path), *FSIZE],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "keeps its 6 committed examples" in done.stderr
    assert len(ik.GradientStore.open(path)) == 6
    assert done.returncode == 3, f"exit status {done.returncode}: {done.stderr[-600:]}"


# ---------------------------------------------------------------------------------------------
# 4. Appending


@pytest.mark.parametrize("codec", ["dense", "kron:4"])
def test_append_equals_clean_build(inputs, tmp_path, codec):
    """batch_size=1: a sequence's gradient does not depend on which part it falls in."""
    _, model, train = inputs
    clean = build(tmp_path / "clean.h5", model, train, codec=codec, batch_size=1).path
    path = tmp_path / "grads.h5"
    first = build(path, model, train[:20], codec=codec, batch_size=1)
    assert first.ids == IDS[:20]
    store = build(path, model, train, codec=codec, batch_size=1)
    assert store.manifest.part_counts == [3] * 6 + [2] + [3] * 6 + [2]
    assert_same_store(path, clean, same_parts=False)
    again = build(path, model, train, codec=codec, batch_size=1)  # nothing left to do
    assert again.manifest.part_counts == store.manifest.part_counts


def test_append_with_batching_is_close_to_clean_build(inputs, reference, tmp_path):
    _, model, train = inputs
    path = tmp_path / "grads.h5"
    build(path, model, train[:20])
    store = build(path, model, train)
    assert store.ids == IDS
    clean = ik.GradientStore.open(reference["dense"])
    assert store.examples().input_ids == clean.examples().input_ids
    for mine, theirs in zip(stored_arrays(store), stored_arrays(clean), strict=True):
        np.testing.assert_allclose(mine["g"], theirs["g"], rtol=1e-5, atol=1e-5)


def test_reused_id_with_other_text_is_refused(inputs, tmp_path):
    tokenizer, model, train = inputs
    path = tmp_path / "grads.h5"
    build(path, model, train[:6])
    before = path.read_bytes()
    texts = list(TINY_CORPUS[:8])
    texts[3] = "A completely different sentence about ships."
    changed = ik.TextDataset.from_texts(texts, tokenizer, ids=IDS[:8])
    with pytest.raises(ik.MismatchError, match=r"'ex03'.*different tokens"):
        build(path, model, changed)
    assert path.read_bytes() == before
    assert ik.GradientStore.open(path).ids == IDS[:6]


def test_duplicate_ids_are_refused(inputs, tmp_path):
    tokenizer, model, train = inputs
    with pytest.raises(ik.DataError, match="duplicate id 'ex01'"):
        ik.TextDataset.from_texts(TINY_CORPUS[:3], tokenizer, ids=["ex00", "ex01", "ex01"])
    path = tmp_path / "grads.h5"
    build(path, model, train[:6])
    before = path.read_bytes()
    dupe = train[4]
    examples = [*train[:6].examples, Example(6, dupe.id, "Another text.", (5, 6, 7), {})]
    twice = ik.TextDataset(examples, tokenizer, train.max_length, "dupes")
    with pytest.raises(ik.DataError, match=r"'ex04' appears twice"):
        build(path, model, twice)
    assert path.read_bytes() == before
    assert ik.GradientStore.open(path).ids == IDS[:6]


# ---------------------------------------------------------------------------------------------
# 5. Refused reuse: another model, tokenizer, modules, max_length, codec


@pytest.fixture(scope="module")
def small_store(inputs, tmp_path_factory):
    """Six examples, dense, the module's model."""
    _, model, train = inputs
    return build(tmp_path_factory.mktemp("small") / "grads.h5", model, train[:6]).path


@pytest.fixture
def small_copy(small_store, tmp_path):
    target = tmp_path / "grads.h5"
    shutil.copy(small_store, target)
    shutil.copytree(parts_dir(small_store), parts_dir(target))
    return target


@pytest.fixture(scope="module")
def other_model(inputs):
    tokenizer = inputs[0]
    torch.manual_seed(1)
    return make_model("gpt2", len(tokenizer), seed=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def other_tokenizer():
    return build_tokenizer(TINY_CORPUS[20:])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("model", ["model_fingerprint", "weights_fingerprint"]),
        ("tokenizer", ["tokenizer_fingerprint"]),
        ("modules", ["modules", "shapes"]),
        ("max_length", ["max_length: store 128, this build 64"]),
        ("codec", ["codec: store 'dense', this build 'kron:4'"]),
        ("dtype", ["dtype: store 'float32', this build 'float64'"]),
        ("seed", ["seed: store 0, this build 1"]),
    ],
)
def test_resume_with_other_settings_is_refused(
    inputs, other_model, other_tokenizer, small_copy, change, named
):
    tokenizer, model, train = inputs
    data, options = train[:8], {}
    if change == "model":
        model = other_model
    elif change == "tokenizer":
        data = ik.TextDataset.from_texts(TINY_CORPUS[:8], other_tokenizer, ids=IDS[:8])
    elif change == "modules":
        options["modules"] = "all"
    elif change == "max_length":
        data = ik.TextDataset.from_texts(TINY_CORPUS[:8], tokenizer, 64, ids=IDS[:8])
    else:
        options[change] = {"codec": "kron:4", "dtype": "float64", "seed": 1}[change]
    before = small_copy.read_bytes()
    listing = sorted(p.name for p in parts_dir(small_copy).iterdir())
    with pytest.raises(ik.MismatchError) as info:
        build(small_copy, model, data, **options)
    message = str(info.value)
    assert str(small_copy) in message and "built differently" in message
    for text in named:
        assert text in message
    fields = ("model_fingerprint", "tokenizer_fingerprint", "modules", "max_length", "codec")
    for field in fields:  # only what differs is listed
        if not any(field in text for text in named):
            assert f"{field}:" not in message
    assert small_copy.read_bytes() == before  # nothing written
    assert sorted(p.name for p in parts_dir(small_copy).iterdir()) == listing
    assert ik.GradientStore.open(small_copy).ids == IDS[:6]


@pytest.fixture(scope="module")
def factors(inputs):
    _, model, train = inputs
    return ik.fit_factors(model, train[:6], "mlp", progress=False)


@pytest.fixture(scope="module")
def other_factors(inputs, other_model):
    return ik.fit_factors(other_model, inputs[2][:6], "mlp", progress=False)


def test_intact_store_scores_like_on_the_fly(inputs, factors, small_store):
    """The control for the refusals and damage below: the undamaged store scores."""
    _, model, train = inputs
    result = ik.score(model, factors, [QUERY], ik.GradientStore.open(small_store), progress=False)
    exact = ik.score(model, factors, [QUERY], train[:6], progress=False)
    assert result.train_ids == IDS[:6]
    np.testing.assert_allclose(result.scores, exact.scores, rtol=1e-4, atol=1e-3)


def test_score_store_with_another_model_is_refused(other_model, other_factors, small_store):
    store = ik.GradientStore.open(small_store)
    with pytest.raises(ik.MismatchError) as info:
        ik.score(other_model, other_factors, [QUERY], store, progress=False)
    message = str(info.value)
    assert "model" in message
    assert store.config.model_fingerprint in message
    assert ik.model_fingerprint(other_model) in message


def test_score_with_factors_of_another_model_is_refused(inputs, other_factors, small_store):
    model = inputs[1]
    with pytest.raises(ik.ModelError, match="refit"):
        ik.score(model, other_factors, [QUERY], ik.GradientStore.open(small_store), progress=False)


def test_score_with_another_tokenizer_is_refused(inputs, factors, other_tokenizer, small_store):
    store = ik.GradientStore.open(small_store)
    with pytest.raises(ik.MismatchError, match="tokenizer"):
        ik.score(inputs[1], factors, [QUERY], store, tokenizer=other_tokenizer, progress=False)


def test_score_with_factors_of_modules_the_store_lacks(inputs, factors, tmp_path):
    _, model, train = inputs
    one = ["transformer.h.0.mlp.c_fc"]
    store = build(tmp_path / "one.h5", model, train[:6], modules=one)
    assert store.modules == one
    with pytest.raises(ik.MismatchError) as info:
        ik.score(model, factors, [QUERY], store, progress=False)
    message = str(info.value)
    assert "lacks" in message and "transformer.h.1.mlp.c_proj" in message


# ---------------------------------------------------------------------------------------------
# 6. Damaged files


@pytest.fixture(scope="module")
def twin_store(inputs, tmp_path_factory):
    """A store built exactly like small_store (so: another uuid)."""
    _, model, train = inputs
    return build(tmp_path_factory.mktemp("twin") / "grads.h5", model, train[:6]).path


def score_store(path, model, factors):
    return ik.score(model, factors, [QUERY], ik.GradientStore.open(path), progress=False)


def assert_refused(path, named, model, factors, *, error=ik.FileFormatError, also=()) -> None:
    """Opening/reading/scoring raises ``error`` naming ``named``: no scores come back."""
    with pytest.raises(error) as info:
        score_store(path, model, factors)
    message = str(info.value)
    assert str(named) in message
    for text in also:
        assert text in message


def part(path, number: int) -> pathlib.Path:
    return parts_dir(path) / part_name(number)


def flip_chunk_bytes(file: pathlib.Path, dataset: str, at: int | None = None) -> None:
    """Invert 4 bytes of the first chunk of ``dataset``, at byte ``at`` of it (default: middle).

    Fletcher-32 sums 16-bit words modulo 65535, so it cannot tell 0x0000 from 0xFFFF: the
    flipped bytes must not be all 0x00 or all 0xFF (the -1 padding of input_ids, say).
    """
    with h5py.File(file, "r") as f:
        dset = f[dataset]
        assert dset.fletcher32
        chunk = dset.id.get_chunk_info(0)
    start = chunk.byte_offset + (chunk.size // 2 if at is None else at)
    data = bytearray(file.read_bytes())
    assert any(b not in (0x00, 0xFF) for b in data[start : start + 4])
    for i in range(4):
        data[start + i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_truncated_part_is_named_on_open(inputs, factors, small_copy):
    file = part(small_copy, 1)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ik.FileFormatError, match=re.escape(str(file))):
        ik.GradientStore.open(small_copy)
    assert_refused(small_copy, file, inputs[1], factors)


@pytest.mark.parametrize("layer", ["0000", "0002"])
def test_flipped_bytes_in_a_gradient_chunk(inputs, factors, small_copy, layer):
    file = part(small_copy, 1)
    flip_chunk_bytes(file, f"layers/{layer}/g")
    store = ik.GradientStore.open(small_copy)  # headers are intact
    with pytest.raises(ik.FileFormatError) as info:
        list(store.blocks())
    assert str(file) in str(info.value) and f"/layers/{layer}" in str(info.value)
    assert_refused(small_copy, file, inputs[1], factors, also=[f"/layers/{layer}"])


@pytest.mark.parametrize("dataset", ["input_ids", "n_tokens"])
def test_flipped_bytes_in_stored_tokens(inputs, factors, small_copy, dataset):
    file = part(small_copy, 0)
    flip_chunk_bytes(file, f"examples/{dataset}", at=4)  # the second value of the first row
    with pytest.raises(ik.FileFormatError, match=re.escape(str(file))):
        ik.GradientStore.open(small_copy).examples()
    assert_refused(small_copy, file, inputs[1], factors, also=[dataset])


@pytest.mark.parametrize(
    ("dataset", "old", "new"), [("ids", b"ex04", b"ez04"), ("text", b"Garlic", b"Garlix")]
)
def test_flipped_byte_in_stored_strings_is_detected(inputs, small_copy, dataset, old, new):
    """Ids, texts and metadata are variable-length strings: no checksum covers them."""
    _, model, train = inputs
    file = part(small_copy, 1)
    data = file.read_bytes()
    assert data.count(old) == 1
    file.write_bytes(data.replace(old, new))  # one byte differs
    try:
        examples = ik.GradientStore.open(small_copy).examples()
    except ik.FileFormatError as err:
        assert str(file) in str(err)
        return
    found = examples.ids if dataset == "ids" else examples.texts[3]
    # With a damaged id, a resume even stores 'ex04' a second time (its gradient is
    # already there, under 'ez04').
    resumed = build(small_copy, model, train[:6]).ids
    pytest.fail(f"damaged {dataset} read without error: {found}; after a resume: {resumed}")


def test_flipped_bytes_in_a_manifest_projection(inputs, tmp_path):
    _, model, train = inputs
    path = build(tmp_path / "kron.h5", model, train[:3], codec="kron:4").path
    with h5py.File(path, "r") as f:
        key = next(f"layers/0001/{k}" for k in f["layers/0001"])
    flip_chunk_bytes(path, key)
    with pytest.raises(ik.FileFormatError, match=re.escape(str(path)) + ".*" + key):
        ik.GradientStore.open(path)


@pytest.mark.parametrize("group", ["layers/0001", "layers", "examples"])
def test_part_missing_a_group(inputs, factors, small_copy, group):
    file = part(small_copy, 1)
    with h5py.File(file, "r+") as f:
        del f[group]
    assert_refused(small_copy, file, inputs[1], factors)


@pytest.mark.parametrize("entry", ["layers/0001", "part_counts", "tokenizer"])
def test_manifest_missing_an_entry(inputs, factors, small_copy, entry):
    with h5py.File(small_copy, "r+") as f:
        del f[entry]
    if entry == "tokenizer":  # opens; scoring needs the store's tokenizer
        assert_refused(small_copy, small_copy, inputs[1], factors, also=["tokenizer"])
    else:
        with pytest.raises(ik.FileFormatError, match=re.escape(str(small_copy))):
            ik.GradientStore.open(small_copy)
        assert_refused(small_copy, small_copy, inputs[1], factors, also=[entry])


def test_missing_part_file(inputs, factors, small_copy):
    file = part(small_copy, 1)
    file.unlink()
    assert_refused(small_copy, file, inputs[1], factors, also=["part 1", "missing"])


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_manifest(inputs, factors, small_copy, fraction):
    data = small_copy.read_bytes()
    small_copy.write_bytes(data[: int(len(data) * fraction)])
    assert_refused(small_copy, small_copy, inputs[1], factors)


def test_part_of_another_store_swapped_in(inputs, factors, small_copy, twin_store):
    shutil.copy(part(twin_store, 1), part(small_copy, 1))
    with h5py.File(small_copy, "r") as f:
        uuid = str(f.attrs["uuid"])
    with h5py.File(twin_store, "r") as f:
        twin_uuid = str(f.attrs["uuid"])
    assert uuid != twin_uuid
    assert_refused(small_copy, part(small_copy, 1), inputs[1], factors, also=[uuid, twin_uuid])


def test_part_of_the_same_store_in_the_wrong_place(inputs, factors, small_copy):
    shutil.copy(part(small_copy, 0), part(small_copy, 1))
    assert_refused(
        small_copy,
        part(small_copy, 1),
        inputs[1],
        factors,
        also=["expected part 1", "found part 0"],
    )


@pytest.mark.parametrize("content", [b"", b"not an HDF5 file\n", bytes(range(256)) * 64])
@pytest.mark.parametrize("which", ["manifest", "part"])
def test_file_that_is_not_hdf5(inputs, factors, small_copy, content, which):
    file = small_copy if which == "manifest" else part(small_copy, 1)
    file.write_bytes(content)
    assert_refused(small_copy, file, inputs[1], factors)


def test_manifest_replaced_by_another_influencekit_file(inputs, factors, small_copy):
    ik.InfluenceResult(np.ones((1, 2, 1)), ["l"], ["a", "b"], ["q"]).save(small_copy)
    assert_refused(
        small_copy,
        small_copy,
        inputs[1],
        factors,
        also=["influencekit.store", "influencekit.result"],
    )


def test_part_files_without_manifest(inputs, small_copy):
    _, model, train = inputs
    small_copy.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(small_copy))):
        ik.GradientStore.open(small_copy)
    with pytest.raises(ik.FileFormatError, match=r"remove .* to start afresh"):
        build(small_copy, model, train[:6])
    assert not small_copy.exists()


# ---------------------------------------------------------------------------------------------
# 7. The build lock


def test_build_refused_while_another_holds_the_lock(inputs, small_copy, tmp_path):
    _, model, train = inputs
    fresh = tmp_path / "fresh.h5"
    for path in (small_copy, fresh):
        parts_dir(path).mkdir(exist_ok=True)
        before = path.read_bytes() if path.exists() else None
        with open(parts_dir(path) / "build.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ik.StoreWriteError) as info:
                build(path, model, train[:9])
            message = str(info.value)
            assert str(path) in message and "another process is building" in message
            assert (path.read_bytes() if path.exists() else None) == before
        # the lock released, the same build goes through
        assert build(path, model, train[:9]).ids == IDS[:9]
