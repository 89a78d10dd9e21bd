"""Shared pytest fixtures: everything is built offline, from the tiny corpus.

Fixtures used by one test module stay in that module; those used by several are here, with
the constants and plain helpers behind them in ``tests/helpers/``.
"""

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
    """Headless Debian chromium driven by Playwright (see ``helpers.browser_pages.launch``)."""
    from helpers.browser_pages import launch

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

    from helpers.tiny_example import QUERIES, corpus_records, train_tiny_model

    model, tokenizer = ik.load_model(train_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))
    train = ik.TextDataset.from_records(corpus_records(), tokenizer, max_length=64)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    result = ik.score(model, factors, QUERIES, train, progress=False)
    return model, factors, result, train


# ---------------------------------------------------------------------------------------------
# A float32 tiny Llama and its factors: the error paths (test_errors.py, test_factors.py,
# test_scoring.py). Module-scoped, so each module fits its own.


@pytest.fixture(scope="module")
def llama_train(tokenizer):
    import influencekit as ik

    from helpers.engines import TRAIN_IDS

    return ik.TextDataset.from_texts(TINY_CORPUS[:6], tokenizer, ids=TRAIN_IDS)


@pytest.fixture(scope="module")
def llama(tokenizer):
    """A float32 tiny Llama (untied embeddings). Tests copy it before changing any weight."""
    from helpers.tiny_models import make_model

    return make_model("llama", len(tokenizer), dtype=torch.float32)


@pytest.fixture(scope="module")
def llama_factors(llama, llama_train):
    import influencekit as ik

    return ik.fit_factors(llama, llama_train, "mlp", progress=False)


@pytest.fixture(scope="module")
def llama_factors_file(llama_factors, tmp_path_factory):
    return llama_factors.save(tmp_path_factory.mktemp("factors") / "factors.h5")


# ---------------------------------------------------------------------------------------------
# A float64 tiny GPT-2 (SDPA attention) and ten sequences: reproducibility, files and
# fingerprints (test_reproducible.py, test_factors.py, test_result.py)


@pytest.fixture(scope="module")
def gpt2_model(tokenizer):
    from helpers.engines import exact_model

    return exact_model("gpt2", len(tokenizer))


@pytest.fixture(scope="module")
def gpt2_train(tokenizer):
    import influencekit as ik

    from helpers.engines import TEXT_INDICES

    return ik.TextDataset.from_texts([TINY_CORPUS[i] for i in TEXT_INDICES], tokenizer)


@pytest.fixture(scope="module")
def gpt2_files(gpt2_model, gpt2_train, tmp_path_factory):
    """``(factors file, result file)`` saved from ``gpt2_model`` and ``gpt2_train``."""
    from helpers.engines import fit, score

    root = tmp_path_factory.mktemp("files")
    factors = fit(gpt2_model, gpt2_train)
    result = score(gpt2_model, factors, gpt2_train)
    return factors.save(root / "factors.h5"), result.save(root / "result.h5")


# ---------------------------------------------------------------------------------------------
# Eight sequences of different token lengths: every family end to end (test_families.py,
# test_hooks.py)


@pytest.fixture(scope="module")
def padded_train(tokenizer):
    import influencekit as ik

    from helpers.engines import PADDED_INDICES

    texts = [TINY_CORPUS[i] for i in PADDED_INDICES]
    ds = ik.TextDataset.from_texts(texts, tokenizer)
    assert len({len(ex.input_ids) for ex in ds}) > 4, "texts should differ in length"
    return ds


# ---------------------------------------------------------------------------------------------
# Gradient store worlds (helpers.store_worlds): a float32 world (12 sequences) and a float64
# world (10 short sequences), for test_store_scoring.py, test_codecs.py and test_reader.py


@pytest.fixture(scope="module")
def w32(tokenizer, tmp_path_factory):
    from helpers.store_worlds import F32, MAX_LENGTH, TRAIN_TEXTS, World

    world = World(tmp_path_factory.mktemp("w32"), tokenizer, TRAIN_TEXTS, MAX_LENGTH, F32)
    lengths = [len(ex.input_ids) for ex in world.train]
    assert len(set(lengths)) >= 10 and max(lengths) == MAX_LENGTH, lengths
    return world


@pytest.fixture(scope="module")
def w64(tokenizer, tmp_path_factory):
    from helpers.store_worlds import F64, SHORT_MAX_LENGTH, SHORT_TEXTS, World

    world = World(tmp_path_factory.mktemp("w64"), tokenizer, SHORT_TEXTS, SHORT_MAX_LENGTH, F64)
    lengths = [len(ex.input_ids) for ex in world.train]
    assert len(set(lengths)) >= 3 and max(lengths) == SHORT_MAX_LENGTH, lengths
    return world
