"""Shared pytest fixtures: everything is built offline, from the tiny corpus."""

from __future__ import annotations

import pytest
import torch

from influencekit.tiny import TINY_CORPUS, build_tokenizer

# The test models are tiny: one thread is fastest and keeps timings steady on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on TINY_CORPUS (GPT-2 style: no special tokens added).

    Session-scoped because training takes a moment; tests must not modify it.
    """
    return build_tokenizer(TINY_CORPUS)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``influencekit demo --quick`` run once through the CLI: ``(out_dir, printed text)``.

    Session-scoped: the demo, report and browser tests all read the same run.
    """
    import contextlib
    import io

    from influencekit.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["demo", "--quick", "--out", str(out), "--quiet"])
    assert status == 0, printed.getvalue()
    return out, printed.getvalue()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by Playwright (see ``browser_pages.launch``)."""
    from browser_pages import launch

    with launch() as launched:
        yield launched


@pytest.fixture(scope="session")
def artifacts():
    """Where browser tests leave screenshots: ``$INFLUENCEKIT_ARTIFACTS`` or ``test-artifacts``."""
    import os
    from pathlib import Path

    default = Path(__file__).resolve().parent.parent / "test-artifacts"
    folder = Path(os.environ.get("INFLUENCEKIT_ARTIFACTS", default))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """``(model, factors, result, train)`` of the tiny example: a 2-block GPT-2 trained on
    TINY_CORPUS, EK-FAC factors and the four example queries scored on the fly."""
    import influencekit as ik

    from tiny_example import QUERIES, corpus_records, train_tiny_model

    model, tokenizer = ik.load_model(train_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))
    train = ik.TextDataset.from_records(corpus_records(), tokenizer, max_length=64)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    result = ik.score(model, factors, QUERIES, train, progress=False)
    return model, factors, result, train
