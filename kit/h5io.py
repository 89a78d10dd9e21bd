"""Small HDF5 helpers shared by factors and results: atomic writes and checked reads.

Files are written to a temporary sibling and renamed into place, so a crash or a full disk
never leaves a half-written file under the real name. Reads check the ``format`` and
``version`` root attributes and turn h5py's low-level errors into messages naming the file.
No pickles anywhere: only numeric arrays, strings and JSON text attributes.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.h5")
    >>> with atomic_h5(path) as f:
    ...     f.attrs.update({"format": "demo", "version": 1})
    >>> with open_h5(path, "demo", 1) as f:
    ...     int(f.attrs["version"])
    1
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from .errors import FileFormatError, InfluenceKitError, MissingFileError

UTF8 = h5py.string_dtype("utf-8")  # variable-length UTF-8 strings: text without pickles


def temp_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through (``.name.tmp-PID``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_h5(path: str | Path, *, in_memory: bool = False) -> Iterator[h5py.File]:
    """Open ``path`` for writing through a temporary file renamed into place on success.

    ``in_memory=True`` builds the whole file in memory and writes its bytes with plain file
    I/O: a failed write (a full disk) is then an ordinary ``OSError`` that leaves HDF5 in a
    clean state (HDF5 can crash at exit after a write error on a file it has open).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        if in_memory:
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as f:
                yield f
            with open(tmp, "wb") as raw:
                raw.write(buffer.getbuffer())
                raw.flush()
                os.fsync(raw.fileno())  # on disk before the rename makes it visible
        else:
            with h5py.File(tmp, "w") as f:
                yield f
            with open(tmp, "rb+") as raw:  # flush to disk before the rename makes it visible
                os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_h5(path: str | Path, kind: str, version: int) -> Iterator[h5py.File]:
    """Open an influencekit file of the given kind for reading, or raise FileFormatError.

    Any low-level failure while reading (a truncated file, damaged metadata, bad JSON in an
    attribute) becomes a FileFormatError that names the file.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            _check_kind(f, path, kind, version)
            yield f
    except InfluenceKitError:
        raise
    except KeyError as err:
        raise FileFormatError(f"{path}: missing entry {err}") from err
    except (OSError, RuntimeError, TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: damaged or not readable as HDF5 ({err})") from err


def _check_kind(f: h5py.File, path: Path, kind: str, version: int) -> None:
    found = f.attrs.get("format")
    if found != kind:
        raise FileFormatError(f"{path}: expected an {kind} file, found format={found!r}")
    if int(f.attrs.get("version", -1)) > version:
        raise FileFormatError(
            f"{path}: format version {f.attrs.get('version')} is newer than this "
            f"influencekit reads ({version}); upgrade influencekit"
        )


def read_array(group: h5py.Group, key: str, path: str | Path) -> np.ndarray:
    """Read a whole dataset, naming the file and dataset if its checksum or bytes are bad."""
    try:
        return group[key][()]
    except (OSError, KeyError) as err:
        raise FileFormatError(f"{path}: cannot read {group.name}/{key} ({err})") from err
