"""Building one gradient store on several processes (``torchrun``): a shard per rank, stitched.

Under a process group, :func:`~influencekit.store.build.build` comes here. The result
is the store a single process would have built: the same examples in the same order, the
same parts (same boundaries, arrays equal bit for bit), because the work is split along the
single-process build's own parts:

1. Rank 0 opens or creates the main store exactly as one process would (configuration
   check, codec parameters drawn once from ``seed`` and recorded), holding its build lock
   until the end. Every rank then opens it read-only, checks that its own model and
   tokenizer are the store's, and lists the pending examples (ids not yet stored, in
   ``train`` order) cut into parts of ``part_size`` as a single process would. The ranks
   compare a digest of that list before any work starts.
2. The parts are dealt out in ``world`` contiguous shares (rank ``r`` gets the ``r``-th).
   Rank ``r`` encodes its share into its shard, ``grads.h5.shard-r-of-W.h5``: a manifest
   with the main store's configuration, uuid and codec parameters (read from the main
   store, never redrawn) and one part per planned part. Each part is written with its header
   in the *main* store (main uuid, final part number, index of its first example), since a
   part's header is checked against the store that names it. A shard commits part by
   part like any store, so a killed rank loses at most its part in flight; the same
   command resumes it.
3. Rank 0 checks every shard (configuration, codec parameters, part headers), hard-links
   its parts (copies them where links fail) into the main store's folder under their
   numbers, writes the main manifest once, naming them all, and removes the shards.

Crash safety is the single-process one. Until the main manifest is rewritten, the parts
linked into its folder are uncommitted strays that the next build removes; the shards are
intact and are stitched again. A shard that does not continue the agreed plan (built for
another state of the main store, other data, another number of processes, or already
stitched) is discarded and its share recomputed.

Example:
    >>> shard_path("run/grads.h5", 1, 2)
    PosixPath('run/grads.h5.shard-1-of-2.h5')
    >>> [rank_share(7, rank, 3) for rank in range(3)]    # 7 parts on 3 processes
    [range(0, 2), range(2, 4), range(4, 7)]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from influencekit.data import TextDataset
from influencekit.distributed import gather_rows, rank_and_world
from influencekit.errors import FileFormatError, MismatchError, StoreWriteError
from influencekit.h5io import temp_name
from influencekit.progress import progress_counter

from .layout import (
    Manifest,
    StoreConfig,
    check_part,
    fsync_dir,
    part_name,
    parts_dir,
    read_manifest,
    read_part_examples,
    write_manifest,
)
from .writing import (
    Encoder,
    build_lock,
    commit,
    part_examples,
    pending,
    record_fidelity,
    remove_uncommitted,
    tokens_digest,
)

T = TypeVar("T")


def shard_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` builds its shard of the store at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.shard-{rank}-of-{world}.h5")


def rank_share(n_parts: int, rank: int, world: int) -> range:
    """The planned parts rank ``rank`` encodes: the ``rank``-th of ``world`` contiguous
    shares, in sizes differing by at most one part."""
    return range(rank * n_parts // world, (rank + 1) * n_parts // world)


@dataclass(frozen=True)
class _Plan:
    """What every rank agrees on before any work: the pending parts and where they go."""

    parts_before: int  # parts of the main store when the build started
    examples_before: int
    part_size: int
    parts: list[list[int]]  # positions in ``train``, cut into parts as one process would

    def number(self, j: int) -> int:
        """The part number planned part ``j`` gets in the main store."""
        return self.parts_before + j

    def first(self, j: int) -> int:
        """The main-store index of planned part ``j``'s first example."""
        return self.examples_before + j * self.part_size


def build_sharded(
    path: Path,
    train: TextDataset,
    plan,
    codec: str | None,
    budget: int | None,
    dtype: str | None,
    part_size: int | None,
) -> None:
    """:func:`~influencekit.store.build.build` on every process of the group (arguments
    checked by it; ``plan`` is its :class:`~influencekit.store.build.BuildPlan`, which makes,
    chooses or reads back the store's codecs).

    Every rank calls it with the same arguments (its own model copy and device); every rank
    returns once the store is complete. An error on any rank is raised on every rank (the
    failing one raises its own; the others a :class:`StoreWriteError` naming it), never a hang.
    A new store's codecs are chosen, and its fidelity measured, by rank 0 alone.
    """
    path = Path(path)
    rank, world = rank_and_world()
    with contextlib.ExitStack() as held:

        def create() -> None:
            held.enter_context(build_lock(path))  # held by rank 0 until the end
            manifest = plan.open(codec, budget, dtype, part_size)
            if plan.fidelity and manifest.fidelity is None:  # measured by rank 0 alone
                found = plan.measure(plan.recorded(manifest), manifest.config.dtype)
                record_fidelity(path, manifest, found)
            for other in _shards(path):
                if not re.search(rf"\.shard-\d+-of-{world}\.h5$", other.name):
                    _remove_shard(other)  # left by a run on another number of processes

        _together(path, "opening the store", create if rank == 0 else None)
        recorded = read_manifest(path).config  # what rank 0 made: its codec and dtype
        config = plan.config(codec or recorded.codec, dtype or recorded.dtype)
        main, shares, digest = _together(path, "planning", lambda: _plan(path, config, train))
        _together(path, "agreeing on the pending examples", None, digest)
        mine = rank_share(len(shares.parts), rank, world)
        encoder = plan.encoder(plan.recorded(main), main.config.dtype)
        try:
            _together(
                path,
                "building its shard",
                lambda: _build_shard(path, rank, world, main, shares, mine, encoder, train),
            )
        finally:
            encoder.close()
        _together(
            path,
            "stitching the shards",
            (lambda: _stitch(path, main, shares, world)) if rank == 0 else None,
        )


def _together(path: Path, what: str, work: Callable[[], T] | None, digest: int = 0) -> T | None:
    """Run ``work`` here (nothing if None), then learn whether every rank succeeded.

    Every rank reaches the same collective whatever happened, so one rank's error stops
    all of them. ``digest``: an int64 that must be equal on every rank.
    """
    result, error = None, None
    try:
        if work is not None:
            result = work()
    except Exception as err:  # re-raised below, after the others have heard of it
        error = err
    flags = gather_rows(np.array([[int(error is not None), digest]], dtype=np.int64), axis=0)
    if error is not None:
        raise error
    failed = [rank for rank, flag in enumerate(flags[:, 0]) if flag]
    if failed:
        raise StoreWriteError(
            f"{path}: {what} failed on rank {', '.join(map(str, failed))} (its error is in its "
            "output); the store keeps its committed examples, and shards keep theirs: fix the "
            "cause and run the same build again to resume"
        )
    if len(set(flags[:, 1].tolist())) > 1:
        raise MismatchError(
            f"{path}: the processes do not agree on the examples to add (digests "
            f"{flags[:, 1].tolist()}): every rank must load the same training data"
        )
    return result


def _plan(path: Path, config: StoreConfig, train: TextDataset):
    """``(main manifest, plan, digest)``: the pending parts as this rank sees them."""
    main = read_manifest(path)
    diffs = main.config.differences(config, "store", "this process")
    if diffs:
        raise MismatchError(f"{path}: this process's model or data differ: " + "; ".join(diffs))
    todo = pending(path, main, train)
    step = main.part_size
    parts = [todo[lo : lo + step] for lo in range(0, len(todo), step)]
    plan = _Plan(len(main.part_counts), main.n_examples, step, parts)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{main.uuid} {plan.parts_before} {plan.examples_before} {step}".encode())
    for i in todo:
        h.update(train[i].id.encode() + b"\0" + tokens_digest(train[i].input_ids))
    return main, plan, int(np.frombuffer(h.digest(), dtype=np.int64)[0])


# -- one rank: its shard -----------------------------------------------------------------------


def _build_shard(
    path: Path,
    rank: int,
    world: int,
    main: Manifest,
    plan: _Plan,
    mine: range,
    encoder: Encoder,
    train: TextDataset,
) -> None:
    """Encode this rank's share of the parts into its shard, resuming what it already holds."""
    if not mine:
        return  # fewer parts than processes: nothing here (rank 0 removes any old shard)
    shard = shard_path(path, rank, world)
    total = sum(len(plan.parts[j]) for j in mine)
    with build_lock(shard):
        manifest = _open_shard(shard, main, plan, mine, train)
        desc = f"building store (rank 0 of {world})"
        with progress_counter(total, desc=desc, enabled=encoder.run.progress and rank == 0) as bar:
            bar.update(manifest.n_examples)
            for j in mine[len(manifest.part_counts) :]:
                positions = plan.parts[j]
                # headed for the main store: its number and first example there
                commit(
                    shard,
                    manifest,
                    part_examples(train, positions),
                    encoder.encode(train, positions),
                    number=plan.number(j),
                    first=plan.first(j),
                )
                bar.update(len(positions))


def _open_shard(shard: Path, main: Manifest, plan: _Plan, mine: range, train) -> Manifest:
    """The shard's committed manifest if it continues this plan, else a new empty shard."""
    if shard.exists():
        try:
            manifest = read_manifest(shard)
            problem = _differs_from_main(manifest, main) or _off_plan(
                shard, manifest, main, plan, mine, train
            )
        except FileFormatError as err:
            problem = str(err)
        if problem is None:
            remove_uncommitted(shard, len(manifest.part_counts))
            return manifest
        shard.unlink()  # stale: start this shard afresh
    remove_uncommitted(shard, 0)
    manifest = Manifest(
        main.config,
        main.uuid,
        main.part_size,
        main.layer_params,
        main.layer_tensors,
        [],
        main.tokenizer_files,
    )
    try:
        write_manifest(shard, manifest)
    except OSError as err:
        raise StoreWriteError(f"{shard}: cannot create this rank's shard ({err})") from err
    return manifest


def _differs_from_main(shard: Manifest, main: Manifest) -> str | None:
    """What makes a shard's manifest other than the main store's (None: nothing)."""
    problems = shard.config.differences(main.config, "shard", "store")
    for key in ("uuid", "part_size", "layer_params", "tokenizer_files"):
        if getattr(shard, key) != getattr(main, key):
            problems.append(f"{key} differs")
    for name, mine, theirs in zip(
        main.config.modules, shard.layer_tensors, main.layer_tensors, strict=False
    ):
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in theirs):
            problems.append(f"codec arrays of layer {name} differ")
    if len(shard.layer_tensors) != len(main.layer_tensors):
        problems.append("number of layers differs")
    return "; ".join(problems) or None


def _off_plan(shard, manifest: Manifest, main: Manifest, plan: _Plan, mine: range, train):
    """Why the shard's committed parts are not the first planned parts of ``mine`` (None:
    they are)."""
    if len(manifest.part_counts) > len(mine):
        return f"it holds {len(manifest.part_counts)} parts, this rank has {len(mine)}"
    folder = parts_dir(shard)
    for k, (j, count) in enumerate(zip(mine, manifest.part_counts, strict=False)):
        positions = plan.parts[j]
        if count != len(positions):
            return f"part {k} holds {count} examples, planned part {j} {len(positions)}"
        check_part(folder / part_name(k), main.uuid, plan.number(j), plan.first(j), count)
        stored = read_part_examples(folder / part_name(k))
        if stored.ids != [train[i].id for i in positions] or stored.input_ids != [
            list(train[i].input_ids) for i in positions
        ]:
            return f"part {k} holds other examples than planned part {j}"
    return None


# -- rank 0: stitching -------------------------------------------------------------------------


def _stitch(path: Path, main: Manifest, plan: _Plan, world: int) -> None:
    """Check every shard, link its parts into the main store, commit them in one manifest."""
    sources = []
    for rank in range(world):
        mine = rank_share(len(plan.parts), rank, world)
        if not mine:
            continue
        shard = shard_path(path, rank, world)
        manifest = read_manifest(shard)
        problem = _differs_from_main(manifest, main)
        if problem:
            raise MismatchError(
                f"{shard}: this shard was not built with the store's configuration and codec "
                f"parameters ({problem}); remove it and run the build again"
            )
        if len(manifest.part_counts) != len(mine):
            raise StoreWriteError(
                f"{shard}: holds {len(manifest.part_counts)} of its {len(mine)} parts; run the "
                "same build again to finish it"
            )
        for k, j in enumerate(mine):
            source = parts_dir(shard) / part_name(k)
            check_part(source, main.uuid, plan.number(j), plan.first(j), len(plan.parts[j]))
            sources.append(source)
    folder = parts_dir(path)
    try:
        for number, source in enumerate(sources, start=plan.parts_before):
            _link(source, folder / part_name(number))
        fsync_dir(folder)
        before = len(main.part_counts)
        main.part_counts.extend(len(positions) for positions in plan.parts)
        try:
            write_manifest(path, main)
        except BaseException:
            del main.part_counts[before:]
            raise
    except OSError as err:
        raise StoreWriteError(
            f"{path}: stitching the shards failed ({err}); the store keeps its "
            f"{main.n_examples} committed examples and the shards theirs. Free space (or fix "
            "the cause) and run the same build again."
        ) from err
    for shard in _shards(path):
        _remove_shard(shard)


def _link(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` through a temporary name: a hard link, else a copy."""
    tmp = temp_name(target)  # ``.part-NNNNNN.h5.tmp-PID``: removed by the next build if left
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or none that links
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
    os.replace(tmp, target)


def _shards(path: Path) -> list[Path]:
    """Every shard of the store at ``path`` on disk (a manifest, or a folder without one)."""
    pattern = re.compile(re.escape(path.name) + r"\.shard-\d+-of-\d+\.h5")
    found = set()
    for item in path.parent.iterdir():
        name = item.name[: -len(".d")] if item.name.endswith(".d") else item.name
        if pattern.fullmatch(name):
            found.add(path.with_name(name))
    return sorted(found)


def _remove_shard(shard: Path) -> None:
    """Remove a shard: its manifest first (what is left is uncommitted), then its folder."""
    shard.unlink(missing_ok=True)
    for tmp in shard.parent.glob(f".{shard.name}.tmp-*"):
        tmp.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(shard), ignore_errors=True)
