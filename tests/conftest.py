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
