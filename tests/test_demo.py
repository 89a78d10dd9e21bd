"""The shipped corpus and models, and ``influencekit demo`` end to end."""

from __future__ import annotations

import html
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit import demo
from influencekit.cli import main
from influencekit.demo import train as demo_train
from influencekit.demo.derive_corpus import THEMES, derive, plain_text, split_fortunes
from influencekit.demo.pipeline import SETTINGS, demo_records

FORTUNES = Path("/usr/share/games/fortunes")


# -- the corpus -------------------------------------------------------------------------------


def test_corpus_records_are_themed_quotes():
    records = demo.load_records()
    assert 2000 <= len(records) <= 5000
    assert all(sorted(r) == ["id", "text", "theme"] for r in records)
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in records)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    counts = {t: sum(r["theme"] == t for r in records) for t in demo.theme_names()}
    assert len(counts) >= 8 and min(counts.values()) >= 40, counts
    assert set(counts) == set(THEMES)
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)  # no quote twice, even across themes


def test_the_shipped_corpus_holds_no_control_characters():
    records = demo.corpus.load_records()
    # whitespace is collapsed to single spaces; no other control character is left
    bad = [r["id"] for r in records if any(unicodedata.category(c) == "Cc" for c in r["text"])]
    assert bad == []


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("an _\bItalic word", "an Italic word"),  # underlined by overstrike
        ("B\bBo\bol\bld", "Bold"),  # bold by overstrike
        ("_\bN_\bO", "NO"),  # an underlined word, letter by letter
        ("\bstart", "start"),  # nothing before it to strike
        ("ring \x07 the \x1b[1mbell", "ring  the [1mbell"),  # other controls dropped
        ("tab\tand\nnewline", "tab\tand\nnewline"),  # whitespace kept (collapsed later)
    ],
)
def test_plain_text_shows_what_a_terminal_shows(raw, shown):
    assert plain_text(raw) == shown


def test_split_fortunes_strips_overstrikes():
    assert split_fortunes("a _\bN-1 pass\x07\n%\n") == ["a N-1 pass"]


def test_split_fortunes_collapses_whitespace_and_skips_empty_entries():
    raw = "first\tquote\n  -- someone\n%\n%\nsecond\n%\n"
    assert split_fortunes(raw) == ["first quote -- someone", "second"]


@pytest.mark.skipif(not FORTUNES.is_dir(), reason="Debian's fortunes package is not installed")
def test_derive_script_reproduces_the_shipped_file_byte_for_byte(tmp_path):
    out = tmp_path / "fortunes.jsonl.gz"
    derive(FORTUNES, out)
    assert out.read_bytes() == demo.corpus.CORPUS_PATH.read_bytes()


def test_load_corpus_limit_keeps_every_theme():
    _, tokenizer = demo.load_demo_model("small", device="cpu")
    train = demo.load_corpus(tokenizer, limit=36)
    assert len(train) == 36
    assert {ex.metadata["theme"] for ex in train} == set(demo.theme_names())


# -- the models -------------------------------------------------------------------------------


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_shipped_models_are_safetensors_and_small_enough():
    data = demo.corpus.DATA_DIR
    shipped = [p for p in data.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) <= 30 * 2**20
    for size in ("small", "large"):
        names = {p.name for p in demo.model_dir(size).iterdir()}
        assert "model.safetensors" in names and "config.json" in names
        assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_large_model_has_4_to_8_times_the_parameters():
    small, _ = demo.load_demo_model("small", device="cpu")
    large, _ = demo.load_demo_model("large", device="cpu")
    assert 4 <= _n_params(large) / _n_params(small) <= 8


@pytest.mark.parametrize("size", ["small", "large"])
def test_shipped_model_was_trained_on_the_corpus(size):
    """Its loss on corpus quotes is far below that of the same architecture freshly initialised."""
    model, tokenizer = demo.load_demo_model(size, device="cpu")
    fresh = demo_train.new_model(size, tokenizer, seed=1).eval()
    texts = [r["text"] for r in demo.load_records()[::97]]
    with torch.no_grad():
        trained = np.mean([_loss(model, tokenizer, t) for t in texts])
        untrained = np.mean([_loss(fresh, tokenizer, t) for t in texts])
    assert trained < untrained - 2.0, (trained, untrained)


def _loss(model, tokenizer, text: str) -> float:
    ids = torch.tensor([tokenizer(text)["input_ids"][: demo.MAX_LENGTH]])
    return float(model(input_ids=ids, labels=ids).loss)


def test_tokenizer_round_trips_any_text():
    _, tokenizer = demo.load_demo_model("small", device="cpu")
    for text in ["Radioactive cats have 18 half-lives.", "naïve café ✓ <script>", "\t x  y"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_training_is_deterministic():
    """Two runs of the training loop from the same seed give bit-identical weights."""
    _, tokenizer = demo.load_demo_model("small", device="cpu")
    records = demo.load_records()[:24]
    first = demo_train.train_model("small", tokenizer, epochs=1, records=records, log=None)
    second = demo_train.train_model("small", tokenizer, epochs=1, records=records, log=None)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    fresh = demo_train.new_model("small", tokenizer)
    assert not torch.equal(
        fresh.state_dict()["lm_head.weight"], first.state_dict()["lm_head.weight"]
    )


# -- the queries ------------------------------------------------------------------------------


def test_builtin_queries_restate_real_quotes():
    texts = {r["id"]: r["text"] for r in demo.load_records()}
    queries = ik.as_queries(demo.QUERIES)
    assert 18 <= len(queries) <= 26
    kinds = {q["kind"] for q in demo.QUERIES}
    assert kinds == {"fact", "paraphrase", "flip", "cross"}
    for q in demo.QUERIES:
        if q["kind"] == "fact":
            assert texts[q["source"]].startswith(q["prompt"] + q["completion"].rstrip()[:10])
        elif "source" in q:
            assert q["source"] in texts
    # each source quote is in the --quick slice too
    quick_ids = {r["id"] for r in demo_records(quick=True)}
    assert {q["source"] for q in demo.QUERIES if "source" in q} <= quick_ids


# -- influencekit demo --quick ----------------------------------------------------------------


def test_quick_demo_writes_every_output(quick_demo):
    out, printed = quick_demo
    n_train = len(demo_records(quick=True))
    factors = ik.Factors.load(out / "factors.h5")
    assert factors.strategy == "ekfac" and factors.meta["n_examples"] == n_train
    store = ik.GradientStore.open(out / "grads.h5")
    assert len(store) == n_train
    assert [r["codec"] for r in store.fidelity.choice] == store.layer_codecs
    result = ik.InfluenceResult.load(out / "result.h5")
    assert result.scores.shape == (len(demo.QUERIES), n_train)
    assert result.query_ids == [q["id"] for q in demo.QUERIES]
    assert result.meta["refine"] == SETTINGS["refine"]
    assert np.isfinite(result.scores).all() and np.abs(result.scores).max() > 0
    stages = json.loads((out / "stages.json").read_text())
    assert all(stages[s]["finished"] for s in ("factors", "store", "result"))
    # the summary: every query, its layer shares, and the paths written
    for q in demo.QUERIES:
        assert f"{q['id']}:" in printed
    assert "layer shares" in printed and "report.html" in printed
    assert printed.count("  themes: ") == len(demo.QUERIES)
    for name in ("factors.h5", "grads.h5", "result.h5", "report.html"):
        assert str(out / name) in printed


def test_report_holds_each_query_top_sequences(quick_demo):
    from helpers.browser_pages import page_data

    out, _ = quick_demo
    page = (out / "report.html").read_text(encoding="utf-8")
    result = ik.InfluenceResult.load(out / "result.h5")
    texts = {r["id"]: r["text"] for r in demo.load_records()}
    # nothing fetched: no external script, style, image or import (the SVG namespace is a name)
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:|@import|url\(", page)
    data = page_data(page)
    for q, query in enumerate(demo.QUERIES):
        header = page.split(f'<section class="ik-header" data-query="{q}" hidden>')[1]
        assert html.escape(query["prompt"]) in header.split("</section>")[0]
        view = data["queries"][q]
        rows = view["table"]["rows"]
        assert [r["id"] for r in rows] == [result.train_ids[i] for i, _ in result.top(q, 20)]
        assert all(r["full"] == texts[r["id"]] for r in rows)
        assert len(view["themes"]["snippets"]) == 30  # the themes of the top 30
        assert [len(t.get("tokens", [])) > 0 for t in view["tokens"]] == [False, True, True, True]


def test_rerun_reuses_every_stage_and_redoes_a_damaged_one(quick_demo, tmp_path):
    import shutil

    out, _ = quick_demo
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = ik.InfluenceResult.load(copy / "result.h5")
    run = demo.run_demo(copy, quick=True, progress=False, log=lambda _: None)
    assert run.reused == ["factors", "store", "result"]
    np.testing.assert_array_equal(run.result.layer_scores, before.layer_scores)
    # a damaged result file is not reused: it is recomputed, to the same scores
    (copy / "result.h5").write_bytes(b"not hdf5")
    run = demo.run_demo(copy, quick=True, progress=False, log=lambda _: None)
    assert run.reused == ["factors", "store"]
    np.testing.assert_allclose(run.result.layer_scores, before.layer_scores, rtol=1e-6)


def test_changed_inputs_invalidate_stages(quick_demo, tmp_path, monkeypatch):
    """Another refine setting changes the result key only: factors and store are reused."""
    import shutil

    from influencekit.demo import pipeline

    out, _ = quick_demo
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    monkeypatch.setitem(pipeline.SETTINGS, "refine", 5)
    run = demo.run_demo(copy, quick=True, progress=False, log=lambda _: None)
    assert run.reused == ["factors", "store"] and run.result.meta["refine"] == 5


def test_demo_rejects_an_unknown_model_size(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--model", "huge", "--quick"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="small, large"):
        demo.model_dir("huge")


def test_an_unfinished_store_is_resumed_not_rebuilt(quick_demo, tmp_path):
    """A store stage recorded as started but not finished (a killed run) is continued by the
    store's own resume: the committed part files are kept as they are."""
    import shutil

    out, _ = quick_demo
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stages = json.loads((copy / "stages.json").read_text())
    stages["store"]["finished"] = False
    (copy / "stages.json").write_text(json.dumps(stages))
    parts = sorted((copy / "grads.h5.d").glob("part-*.h5"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    run = demo.run_demo(copy, quick=True, progress=False, log=lambda _: None)
    assert "store" not in run.reused and "factors" in run.reused
    assert sorted((copy / "grads.h5.d").glob("part-*.h5")) == parts
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    assert json.loads((copy / "stages.json").read_text())["store"]["finished"]


def test_unreadable_stage_records_mean_recomputing(quick_demo, tmp_path):
    import shutil

    out, _ = quick_demo
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "stages.json").write_text("{not json")
    run = demo.run_demo(copy, quick=True, progress=False, log=lambda _: None)
    assert run.reused == []
    before = ik.InfluenceResult.load(out / "result.h5")
    np.testing.assert_allclose(run.result.layer_scores, before.layer_scores, rtol=1e-5)


def test_demo_into_an_unwritable_place_fails_with_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--quiet", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("influencekit demo: error:") and str(blocker) in err
    assert "Traceback" not in err


def test_an_interrupted_demo_says_how_to_continue(tmp_path, capsys, monkeypatch):
    from influencekit.demo import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit_factors", interrupted)
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "out")]) == 130
    assert "continues where it stopped" in capsys.readouterr().err
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert stages["factors"]["finished"] is False and not (tmp_path / "out" / "factors.h5").exists()
