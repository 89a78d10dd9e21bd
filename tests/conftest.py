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
