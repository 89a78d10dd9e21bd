"""The notebooks in ``notebooks/`` run top to bottom, headless, without an error."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def _run(name: str, workdir: Path, **options) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": workdir}},
        **options,
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    return notebook


def _text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The kernel is a new process: give it one torch thread, like the tests (tiny models run
    fastest so, and two spinning OpenMP threads beside another busy process crawl)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_quickstart_runs_and_shows_results(tmp_path):
    notebook = _run("01_quickstart.ipynb", tmp_path)
    printed = _text(notebook)
    assert "600 training sequences" in printed
    assert "GradientStore(" in printed
    assert "sum of token scores" in printed
    for name in ("factors.h5", "grads.h5", "result.h5", "report.html"):
        assert (tmp_path / f"quickstart-{name}").exists()


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    """Outputs are made in CI, not stored: a stored output could go stale unnoticed."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None
    assert "widgets" not in notebook.metadata  # no saved widget state either


def test_analysis_notebook_runs_and_plots(tmp_path):
    notebook = _run("02_analysis.ipynb", tmp_path)
    printed = _text(notebook)
    assert "small: 369 training quotes" in printed and "large: 369 training quotes" in printed
    assert "mean recall of the exact top 10" in printed
    assert "alpha" in printed and "favours" in printed
    for png in ("overlap-vs-theme.png", "tail.png"):
        assert (tmp_path / png).stat().st_size > 1000


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _buffer(model: dict, name: str, dtype: str) -> np.ndarray:
    """A binary trait of a saved widget model (ipywidgets sends bytes as buffers, which
    nbclient stores base64-encoded beside the state, keyed by their path)."""
    (buffer,) = [b for b in model.get("buffers", []) if b["path"] == [name]]
    return np.frombuffer(base64.b64decode(buffer["data"]), dtype=dtype)


def test_explorer_notebook_runs_and_saves_widget_state(tmp_path):
    """03 runs headless; the widget state nbclient records (what a notebook saved with its
    widgets holds) has the explorer, its drop-down and the standalone anywidget components."""
    # nbclient records state from every comm_open / comm_msg "update" that the kernel sends
    # on iopub while a cell runs (binary traits as base64 buffers) and writes the last
    # state of every model to the notebook's metadata when execution ends.
    notebook = _run("04_explorer.ipynb", tmp_path, store_widget_state=True)
    nbformat.validate(notebook)
    nbformat.write(notebook, tmp_path / "04_explorer.executed.ipynb")  # kept to look at

    models = notebook.metadata["widgets"][WIDGET_STATE]["state"]
    by_name: dict[str, list[dict]] = {}
    for model in models.values():
        by_name.setdefault(model["model_name"], []).append(model)
    anywidgets = [m for m in by_name["AnyModel"] if m["model_module"] == "anywidget"]
    assert all(m["state"]["_esm"] for m in anywidgets)  # the front-end modules travel along

    # the standalone TokenHeatmap: its tokens as a list, its scores as one float64 each
    heatmaps = [m for m in anywidgets if m["state"].get("tokens")]
    assert any("by token" in m["state"]["title"] for m in heatmaps)
    for m in heatmaps:
        scores = _buffer(m, "scores", "<f8")
        assert len(scores) == len(m["state"]["tokens"]) and np.isfinite(scores).all()
    # ThemeClusters, the standalone one and the explorer's Themes tab (opened in the notebook)
    clusters = [m for m in anywidgets if m["state"].get("names")]
    assert len(clusters) >= 2
    for m in clusters:
        labels = _buffer(m, "assignment", "<i4")
        assert len(labels) == len(m["state"]["snippets"])
        assert labels.max() < len(m["state"]["names"])
    for key in ("layers", "rows", "columns"):  # LayerBreakdown, RankedTable, LayerHeatmap
        assert any(key in m["state"] for m in anywidgets), key

    # the explorer: its synced selection is what the notebook selected last
    (explorer,) = [m["state"] for m in by_name["VBoxModel"] if "selection" in m["state"]]
    cell = next(c for c in notebook.cells if "explorer.query = 3" in c.source)
    shown = ast.literal_eval(cell.outputs[-1]["data"]["text/plain"])
    assert shown["query"] == explorer["query"] == 3 and shown["rank"] == 2
    assert explorer["selection"] == shown
    (picker,) = [m["state"] for m in by_name["DropdownModel"]]
    assert picker["index"] == 3 and len(picker["_options_labels"]) == 22

    page = tmp_path / "explorer.html"
    assert page.stat().st_size > 10_000
    assert "bath-fact" in page.read_text("utf-8")


def test_validation_notebook_runs_and_plots(tmp_path):
    notebook = _run("03_validation.ipynb", tmp_path)
    printed = _text(notebook)
    assert "64 half-subsets x 4 seeds = 256 retrained models" in printed
    for strategy in ("ekfac", "kfac", "diagonal", "identity"):
        assert f"\n{strategy:<10}" in printed
    assert "ekfac + lowrank:4" in printed and "LR-weighted sum" in printed
    assert "ekfac     vs exact over 256 sequences: Pearson" in printed
    for png in ("lds.png", "lds-scatter.png", "lds-checkpoints.png", "exact-vs-ekfac.png"):
        assert (tmp_path / png).stat().st_size > 1000
