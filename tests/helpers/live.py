"""Notebooks served live by Voilà, for widget tests in a real browser (Debian's chromium).

The report tests open a static file; widget tests need a kernel behind the page, so that a
click in chromium reaches Python and Python's answer reaches the page. ``voila_server`` runs
Voilà on 127.0.0.1 with no token, no browser and no network (the two font-awesome CDN links
of Voilà's "lab" template are dropped: its own bundle carries the fonts), and
``open_widgets`` opens the page and waits until the notebook has run and drawn its widgets::

    with voila_server(tmp_path / "demo.ipynb") as url:
        events = watch(page)
        button = open_widgets(page, url, ".counter button")
        button.click()
        assert not events["errors"] and not events["foreign"]
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from jupyter_core.paths import jupyter_path

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

#: Where Voilà (with ``--show_tracebacks=True``) shows the traceback of a failed cell.
CELL_ERROR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
LOCAL = ("http://127.0.0.1:", "ws://127.0.0.1:", "blob:http://127.0.0.1:", "data:")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _offline_lab_template(root: Path) -> None:
    """Voilà's "lab" page template less its CDN links, under ``root`` (first on JUPYTER_PATH,
    so it shadows the installed one; the template's other files are found as before)."""
    found = [Path(d, "index.html.j2") for d in jupyter_path("voila", "templates", "lab")]
    original = next(p for p in found if p.is_file())
    kept = [line for line in original.read_text().splitlines() if "cdn.jsdelivr.net" not in line]
    target = root / "voila" / "templates" / "lab"
    target.mkdir(parents=True)
    (target / "index.html.j2").write_text("\n".join(kept) + "\n")


def _answers(port: int) -> bool:
    """Whether Voilà answers HTTP (any status: asking for "/" would start a kernel)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/voila/static/")
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


def _stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM Voilà's process group (Voilà then shuts its kernels down), SIGKILL it after
    ``grace`` seconds, then kill any kernel left: each kernel has a session of its own."""
    try:
        kernels = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kernels = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for kernel in kernels:
        with contextlib.suppress(psutil.NoSuchProcess):
            kernel.kill()


@contextlib.contextmanager
def voila_server(notebook: Path, *, timeout: float = 120, options: tuple = ()) -> Iterator[str]:
    """Serve ``notebook`` with Voilà on a free port of 127.0.0.1; yield the page's URL.

    Each load of the page starts a kernel and runs the notebook in it: the kernelspec
    "python3", whose ``python`` jupyter_client maps to ``sys.executable``, so the kernel runs
    in this venv, with one OpenMP/MKL thread. Voilà's output goes to ``<notebook>.voila.log``
    beside the notebook; its tail is in the error if Voilà exits or is not up in ``timeout``
    seconds. On exit Voilà and its kernels are stopped, whatever happened. ``options`` are
    more Voilà flags (``("--theme=dark",)``).
    """
    notebook = Path(notebook).resolve()
    log_path = notebook.with_suffix(".voila.log")
    port = _free_port()
    templates = Path(tempfile.mkdtemp(prefix="voila-templates-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(templates), env.get("JUPYTER_PATH")]))
    cmd = [
        sys.executable, "-m", "voila", notebook.name, "--no-browser", "--template=lab",
        "--Voila.ip=127.0.0.1", f"--port={port}", "--Voila.port_retries=0",
        "--show_tracebacks=True", *options,
    ]  # fmt: skip
    try:
        _offline_lab_template(templates)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=notebook.parent, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not _answers(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                    rc = proc.poll()
                    state = f"not up in {timeout}s" if rc is None else f"exited ({rc})"
                    raise RuntimeError(f"voila {state}; {log_path}:\n{tail}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/"
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(templates, ignore_errors=True)


def wait_for_widgets(page: Page, selector: str, timeout: float = 120) -> Locator:
    """Wait until the notebook has run and ``selector`` is drawn; return its locator. If a
    cell raised instead (Voilà then stops and shows the traceback), fail with the traceback."""
    error = page.locator(CELL_ERROR).filter(has_text="Traceback (most recent call last)")
    page.locator(selector).or_(error).first.wait_for(state="visible", timeout=timeout * 1000)
    if error.count():
        raise AssertionError(f"a notebook cell failed in Voilà:\n{error.first.inner_text()}")
    return page.locator(selector)


def open_widgets(page: Page, url: str, selector: str, timeout: float = 120) -> Locator:
    """Open the Voilà page and wait for ``selector`` (see ``wait_for_widgets``). The page
    loads only once every cell has run, so a plain ``page.goto`` times out on slow cells."""
    page.goto(url, wait_until="commit", timeout=timeout * 1000)
    return wait_for_widgets(page, selector, timeout)


def watch(page: Page) -> dict[str, list[str]]:
    """Record, from now on, the page's console messages (``"type: text"``), its errors
    (uncaught exceptions, failed requests) and its requests to anywhere but 127.0.0.1."""
    events: dict[str, list[str]] = {"console": [], "errors": [], "foreign": []}
    page.on("console", lambda m: events["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on("requestfailed", lambda r: events["errors"].append(f"{r.url}: {r.failure}"))

    def foreign(url: str) -> None:
        if not url.startswith(LOCAL):
            events["foreign"].append(url)

    page.on("request", lambda r: foreign(r.url))
    page.on("websocket", lambda w: foreign(w.url))
    return events
