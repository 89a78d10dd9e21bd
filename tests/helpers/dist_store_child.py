"""A ``torchrun`` worker that builds gradient stores on several processes (for
test_distributed_store.py).

Usage::

    python -m torch.distributed.run --nproc_per_node=2 ... tests/helpers/dist_store_child.py \\
        --examples 20 --part-size 3 --batch-size 2 --build dense OUT.h5 [--build kron:8 OUT2.h5] \\
        [--commit-log FILE] [--die RANK:POINT[:N]]

Every rank makes the same inputs as ``store_child.make_inputs`` (a seeded tiny GPT-2, the
tokenizer trained on TINY_CORPUS, the first ``--examples`` sentences with ids ``ex00``, ...), starts
the gloo process group from torchrun's environment and calls ``GradientStore.build`` for
each ``--build CODEC PATH`` in turn, like a user's script would. (Option names are chosen so that
none abbreviates one of torchrun's own: it would take them.) No library code is changed;
the hooks below only wrap functions inside this process:

``--commit-log FILE``  append ``<rank> <part number>`` to FILE after each shard commit (the part's
                number in the main store), so a test can tell which parts were computed.
``--die R:P[:N]``  rank R SIGKILLs itself at point P: ``commit`` (after its N-th shard commit,
                default 1) or ``stitch`` (rank 0 only: the shards' parts linked into the main
                store's folder, its manifest not yet rewritten).

Prints ``DONE <rank> <examples>`` per build, or ``ERROR <rank> <type>: <message>`` (then
raises it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys

# Run by path, this folder (tests/helpers) is on sys.path but tests/ is not: put it there, so
# that ``helpers.store_child`` imports as it does in the test process.
TESTS = pathlib.Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def install_hooks(rank: int, log: str | None, die: str | None) -> None:
    from influencekit.store import shards

    who, point, at = None, None, 1
    if die:
        fields = die.split(":")
        who, point = int(fields[0]), fields[1]
        at = int(fields[2]) if len(fields) > 2 else 1
    commits = {"n": 0}

    def kill_if(reached: str) -> None:
        if rank == who and point == reached:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    real_commit = shards.commit

    def commit(shard, manifest, examples, arrays, *, number, first):
        real_commit(shard, manifest, examples, arrays, number=number, first=first)
        if log:
            with open(log, "a") as out:
                out.write(f"{rank} {number}\n")
        commits["n"] += 1
        if commits["n"] == at:
            kill_if("commit")

    shards.commit = commit

    real_fsync_dir = shards.fsync_dir  # in shards, called only once the parts are linked

    def fsync_dir(folder):
        real_fsync_dir(folder)
        kill_if("stitch")

    shards.fsync_dir = fsync_dir


def say(line: str) -> None:
    """One write per line: both ranks print to the same pipe, and a short write is atomic."""
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--part-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--build", nargs=2, action="append", metavar=("CODEC", "PATH"))
    parser.add_argument("--commit-log", default=None)
    parser.add_argument("--die", default=None)
    args = parser.parse_args(argv)

    import influencekit as ik
    from influencekit.distributed import barrier, init_from_env, rank_and_world

    from helpers.store_child import make_inputs

    init_from_env()
    rank, world = rank_and_world()
    assert world > 1, "run me under torchrun with more than one process"
    _, model, train = make_inputs(args.examples)
    install_hooks(rank, args.commit_log, args.die)
    for codec, path in args.build:
        try:
            store = ik.GradientStore.build(
                path,
                model,
                train,
                modules="mlp",
                codec=codec,
                batch_size=args.batch_size,
                part_size=args.part_size,
                seed=0,
                progress=False,
            )
        except Exception as err:
            say(f"ERROR {rank} {type(err).__name__}: {err}")
            raise
        say(f"DONE {rank} {len(store)}")
    # Leave without tearing the process group down: gloo's threads can abort the process at
    # teardown (SIGABRT, "terminate called without an active exception") now and then,
    # which would fail a build that succeeded. After the barrier no rank needs another.
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
