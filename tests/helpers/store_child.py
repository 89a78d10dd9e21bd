"""A subprocess that builds a small, deterministic gradient store (for test_store_faults.py).

Usage::

    python tests/helpers/store_child.py STORE_PATH [--codec dense] [--n 40] [--part-size 3]
        [--batch 2] [--delay SECONDS] [--die POINT:N] [--fsize-after PARTS --fsize BYTES]
        [--message-file FILE]
    python tests/helpers/store_child.py --serve   # a fork server: the same builds, one per line

The store is always the same one: a seeded tiny GPT-2, the tokenizer trained on TINY_CORPUS,
the first ``--n`` sentences of TINY_CORPUS with ids ``ex00``, ``ex01``, ... The test module
imports :func:`make_inputs` to build the identical reference store in its own process.

No library code is changed; the hooks below only wrap functions inside this process:

``--delay``   sleep that long at each step of a commit where a kill is interesting: while a
              part is half built (twice per part), and before each fsync (a
              temp file fully written but not yet renamed; a part renamed but not yet named by
              the manifest; a manifest renamed). So a kill from outside lands mid-commit often.
``--die P:N`` SIGKILL this process at the N-th occurrence of point P (a deterministic crash):
              ``part-write`` (a part half built, twice per part), ``part-tmp`` (temp part complete,
              not renamed), ``part-dir`` (part renamed, manifest not yet written),
              ``manifest-tmp`` (temp manifest complete, not renamed; N=1 is the empty manifest
              written at creation), ``manifest-dir`` (manifest renamed).
``--fsize-after K --fsize B``  after K parts are committed, limit the size of any file this
              process writes to B bytes (RLIMIT_FSIZE, SIGXFSZ ignored), so that the next
              part's write really fails (EFBIG) while a manifest still fits.

Exit status: 0 after a complete build (prints ``DONE <n examples>``), 3 on StoreWriteError
(message on stderr, and in ``--message-file`` if given).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import time

# Run by path, this folder (tests/helpers) is on sys.path but tests/ is not: put it there, so
# that ``helpers.tiny_models`` imports as it does in the test process.
TESTS = pathlib.Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

MODEL_SEED = 0
# The tokenizer is trained with a thread pool before workers are forked (--serve).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_inputs(n: int = 40, *, seed: int = MODEL_SEED):
    """``(tokenizer, model, train)``: the same in every process."""
    import torch

    import influencekit as ik
    from influencekit.tiny import TINY_CORPUS, build_tokenizer

    from helpers.tiny_models import make_model

    torch.set_num_threads(1)
    tokenizer = build_tokenizer(TINY_CORPUS)
    torch.manual_seed(seed)
    model = make_model("gpt2", len(tokenizer), seed=seed, dtype=torch.float32)
    ids = [f"ex{i:02d}" for i in range(n)]
    train = ik.TextDataset.from_texts(TINY_CORPUS[:n], tokenizer, ids=ids)
    return tokenizer, model, train


def _fd_point(fd: int) -> str | None:
    """Which commit step an fsync of ``fd`` is (from the path it refers to)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    name = os.path.basename(target)
    if name.startswith(".part-") and ".tmp-" in name:
        return "part-tmp"
    if name.startswith("."):
        return "manifest-tmp"
    if name.endswith(".h5.d"):
        return "part-dir"
    if os.path.isdir(target):
        return "manifest-dir"
    return None


def install_hooks(delay: float, die: str | None) -> None:
    from influencekit.store import layout

    die_point, die_at = (None, 0)
    if die:
        die_point, count = die.split(":")
        die_at = int(count)
    seen: dict[str, int] = {}

    def reached(point: str | None) -> None:
        if point is None:
            return
        seen[point] = seen.get(point, 0) + 1
        if point == die_point and seen[point] == die_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if delay:
            time.sleep(delay)

    real_rows = layout.chunk_rows

    def chunk_rows(row_bytes, count):  # called twice inside write_part, the part half built
        reached("part-write")
        return real_rows(row_bytes, count)

    layout.chunk_rows = chunk_rows

    real_fsync = os.fsync

    def fsync(fd):
        reached(_fd_point(fd if isinstance(fd, int) else fd.fileno()))
        return real_fsync(fd)

    os.fsync = fsync


def limit_file_size_after(parts: int, limit: int) -> None:
    import resource

    from influencekit.store import build

    real_commit = build.commit
    done = {"n": 0}

    def commit(*args, **kwargs):
        if done["n"] == parts:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        real_commit(*args, **kwargs)
        done["n"] += 1

    build.commit = commit


def build_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--codec", default="dense")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--part-size", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--die", default=None)
    parser.add_argument("--fsize-after", type=int, default=None)
    parser.add_argument("--fsize", type=int, default=None)
    parser.add_argument("--message-file", default=None)
    return parser.parse_args(argv)


def run_build(args: argparse.Namespace, model, tokenizer) -> int:
    """One build as ``args`` says (hooks installed in this process); the exit status."""
    import influencekit as ik
    from influencekit.tiny import TINY_CORPUS

    ids = [f"ex{i:02d}" for i in range(args.n)]
    train = ik.TextDataset.from_texts(TINY_CORPUS[: args.n], tokenizer, ids=ids)
    install_hooks(args.delay, args.die)
    if args.fsize_after is not None:
        limit_file_size_after(args.fsize_after, args.fsize)
    try:
        store = ik.GradientStore.build(
            args.path,
            model,
            train,
            modules="mlp",
            codec=args.codec,
            batch_size=args.batch,
            part_size=args.part_size,
            seed=0,
            progress=False,
        )
    except ik.StoreWriteError as err:
        print(f"StoreWriteError: {err}", file=sys.stderr, flush=True)
        if args.message_file:
            pathlib.Path(args.message_file).write_text(str(err))
        return 3
    print(f"DONE {len(store)}", flush=True)
    return 0


def serve() -> int:
    """Fork server: import and set up once, then run each job (one line of build arguments,
    JSON list, on stdin) in a forked worker. Prints ``PID <pid>`` when a worker starts and
    ``EXIT <pid> <status>`` (negative: killed by that signal) when it ends; one job at a time.

    A worker is an ordinary process as far as the store is concerned: SIGKILL it, and it dies
    mid-write like any builder. It saves the test ~4 s of imports per build.
    """
    import json
    import traceback

    tokenizer, model, _ = make_inputs()
    print("READY", flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        args = build_args(json.loads(line))
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                sys.stdout = sys.stderr  # only the server talks on stdout
                code = run_build(args, model, tokenizer)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        return serve()
    args = build_args(argv)
    tokenizer, model, _ = make_inputs()
    return run_build(args, model, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
