"""Progress bars: tqdm's notebook-aware bar, silenced by ``progress=False`` or an env var.

Set ``INFLUENCEKIT_PROGRESS=0`` to silence every bar (CI logs, batch jobs).

Example:
    >>> for _ in progress_bar(range(3), desc="demo", enabled=False):
    ...     pass
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bars_enabled(enabled: bool = True) -> bool:
    """False when the caller or the environment (``INFLUENCEKIT_PROGRESS=0``) says so."""
    return enabled and os.environ.get("INFLUENCEKIT_PROGRESS", "1") not in ("0", "false", "no")


def progress_bar(
    items: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar (text in a terminal, a widget in Jupyter)."""
    return iter(tqdm(items, desc=desc, total=total, disable=not bars_enabled(enabled), leave=False))


def progress_counter(total: int, *, desc: str, enabled: bool = True) -> tqdm:
    """A bar advanced by hand (``bar.update(n)``); use it as a context manager."""
    return tqdm(total=total, desc=desc, disable=not bars_enabled(enabled), leave=False)
