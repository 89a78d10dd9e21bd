"""The command line end to end: fit, score, info and the built-in demo."""

import json

import h5py
import numpy as np
import pytest

import influencekit as ik
from influencekit.cli import main

from helpers.tiny_example import QUERIES, corpus_records, train_tiny_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_tiny_model(root / "model", steps=20)
    with open(root / "train.jsonl", "w") as f:
        for record in corpus_records():
            f.write(json.dumps(record) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for query in QUERIES:
            f.write(json.dumps(query) + "\n")
    return root


def test_fit_score_info(workdir, capsys):
    common = [
        "--model",
        str(workdir / "model"),
        "--train",
        str(workdir / "train.jsonl"),
        "--max-length",
        "64",
        "--quiet",
    ]
    assert main(["fit", *common, "--out", str(workdir / "f.h5"), "--fisher", "empirical"]) == 0
    assert (
        main(
            [
                "score",
                *common,
                "--factors",
                str(workdir / "f.h5"),
                "--queries",
                str(workdir / "queries.jsonl"),
                "--out",
                str(workdir / "r.h5"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "query 'soup'" in printed and "wrote" in printed

    # The files agree with the Python API run on the same inputs.
    model, tok = ik.load_model(workdir / "model")
    train = ik.TextDataset.from_jsonl(workdir / "train.jsonl", tok, max_length=64)
    factors = ik.fit_factors(model, train, "mlp", fisher="empirical", progress=False)
    expected = ik.score(
        model, factors, ik.load_queries(workdir / "queries.jsonl"), train, progress=False
    )
    saved = ik.InfluenceResult.load(workdir / "r.h5")
    np.testing.assert_allclose(saved.scores, expected.scores, rtol=1e-5)
    assert saved.train_ids == train.ids and saved.layers == factors.modules

    # Plain h5py reads the outputs too.
    with h5py.File(workdir / "r.h5") as f:
        assert f["scores"].shape == (len(QUERIES), len(train))

    assert main(["info", str(workdir / "f.h5")]) == 0
    assert "influencekit.factors" in capsys.readouterr().out


def test_errors_are_one_line(workdir, capsys):
    code = main(
        [
            "fit",
            "--model",
            str(workdir / "model"),
            "--train",
            str(workdir / "nope.jsonl"),
            "--out",
            str(workdir / "x.h5"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "Traceback" not in err
    assert (
        main(
            [
                "fit",
                "--model",
                str(workdir / "model"),
                "--train",
                str(workdir / "train.jsonl"),
                "--out",
                str(workdir / "x.h5"),
                "--modules",
                "no.such.layer",
                "--quiet",
            ]
        )
        == 2
    )
    assert "Trackable layers" in capsys.readouterr().err
    assert not (workdir / "x.h5").exists()


def test_demo_finds_same_theme_sentences(tmp_path):
    """End-to-end sanity: a cooking query is most influenced by cooking sentences, etc."""
    from helpers.tiny_example import run_example

    result, train = run_example(tmp_path, progress=False)
    for q, theme in ((0, "cooking"), (1, "astronomy"), (2, "sailing")):
        share: dict[str, float] = {}
        for i, value in result.top(q, k=10):
            if value > 0:
                name = train[i].metadata["theme"]
                share[name] = share.get(name, 0.0) + value
        assert max(share, key=share.get) == theme, (result.query_ids[q], share)


def test_build_then_score_from_the_store(workdir, capsys):
    """`build` writes a store; `score --store` equals the Python API on the same store."""
    model_args = ["--model", str(workdir / "model"), "--quiet"]
    train_args = ["--train", str(workdir / "train.jsonl"), "--max-length", "64"]
    store = workdir / "grads.h5"
    assert main(["fit", *model_args, *train_args, "--out", str(workdir / "fs.h5")]) == 0
    build = ["build", *model_args, *train_args, "--out", str(store), "--codec", "lowrank:4"]
    assert main(build) == 0
    assert "GradientStore" in capsys.readouterr().out
    assert main(build) == 0  # a second run finds everything stored: nothing to do
    score = [
        "score",
        *model_args,
        "--factors",
        str(workdir / "fs.h5"),
        "--store",
        str(store),
        "--queries",
        str(workdir / "queries.jsonl"),
        "--out",
        str(workdir / "rs.h5"),
        "--top-k",
        "5",
        "--refine",
        "8",
    ]
    assert main(score) == 0
    printed = capsys.readouterr().out
    assert "query 'soup'" in printed and "wrote" in printed

    model, _ = ik.load_model(workdir / "model")
    expected = ik.score(
        model,
        ik.Factors.load(workdir / "fs.h5"),
        ik.load_queries(workdir / "queries.jsonl"),
        ik.GradientStore.open(store),
        top_k=5,
        refine=8,
        progress=False,
    )
    saved = ik.InfluenceResult.load(workdir / "rs.h5")
    np.testing.assert_array_equal(saved.indices, expected.indices)
    np.testing.assert_allclose(saved.scores, expected.scores, rtol=1e-6)
    assert main(["info", str(store)]) == 0
    assert "influencekit.store" in capsys.readouterr().out


def test_build_by_budget_with_factors_prints_the_fidelity(workdir, capsys):
    """`build --budget --factors` chooses each layer's codec within the budget (what the
    files take per sequence, the manifest included) and prints the store's fidelity;
    `--no-fidelity` records none; a bad budget is refused before the model loads."""
    model_args = ["--model", str(workdir / "model"), "--quiet"]
    train_args = ["--train", str(workdir / "train.jsonl"), "--max-length", "64"]
    factors = workdir / "fb.h5"
    assert main(["fit", *model_args, *train_args, "--out", str(factors)]) == 0
    store = workdir / "budget.h5"
    build = ["build", *model_args, *train_args, "--factors", str(factors), "--out", str(store)]
    assert main([*build, "--budget", "24KiB"]) == 0
    printed = capsys.readouterr().out
    opened = ik.GradientStore.open(store)
    assert opened.bytes_per_example() <= 24 * 1024
    assert {c.partition(":")[0] for c in opened.layer_codecs} <= {"sparse8", "lowrank", "lowrank8"}
    assert [r["codec"] for r in opened.fidelity.choice] == opened.layer_codecs
    assert f"fidelity: Pearson {opened.fidelity.pearson_min:.3f}" in printed
    plain = workdir / "plain.h5"
    cmd = ["build", *model_args, *train_args, "--out", str(plain), "--no-fidelity"]
    assert main([*cmd, "--codec", "kron:4"]) == 0
    assert ik.GradientStore.open(plain).fidelity is None
    capsys.readouterr()
    bad = ["build", "--model", str(workdir / "no-such-model"), *train_args, "--out", "x.h5"]
    assert main([*bad, "--budget", "lots"]) == 2
    assert "budget must be" in capsys.readouterr().err


def test_score_needs_exactly_one_source(workdir, capsys):
    args = ["score", "--model", str(workdir / "model"), "--factors", "f.h5"]
    args += ["--queries", str(workdir / "queries.jsonl"), "--out", "r.h5", "--quiet"]
    assert main(args) == 2
    assert "exactly one of --store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def factors_file(workdir):
    model, tok = ik.load_model(workdir / "model")
    train = ik.TextDataset.from_jsonl(workdir / "train.jsonl", tok, max_length=64)
    return ik.fit_factors(model, train, "mlp", progress=False).save(workdir / "api-f.h5")


@pytest.fixture
def unloadable_model(workdir, tmp_path):
    """A model directory that passes every cheap check but whose weights cannot load: any
    error about other inputs proves they were checked before the model was loaded."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in (workdir / "model").iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    return broken


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--out", "f.h5"],
        ["build", "--out", "s.h5"],
        ["score", "--factors", "FACTORS", "--queries", "QUERIES", "--out", "r.h5"],
    ],
)
def test_a_bad_training_line_is_found_before_the_model_loads(
    command, workdir, factors_file, unloadable_model, tmp_path, capsys
):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a fine first line"}\n{"text": 3}\n')
    given = {"FACTORS": str(factors_file), "QUERIES": str(workdir / "queries.jsonl")}
    command = [given.get(c, str(tmp_path / c) if c.endswith(".h5") else c) for c in command]
    args = [*command, "--model", str(unloadable_model), "--train", str(bad), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2" in err and "must be a string" in err, err
    assert "could not load the weights" not in err


def test_bad_queries_and_model_dtype_are_found_before_the_model_loads(
    workdir, factors_file, unloadable_model, tmp_path, capsys
):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"prompt": "no completion"}\n')
    common = ["--model", str(unloadable_model), "--train", str(workdir / "train.jsonl")]
    out = ["--factors", str(factors_file), "--out", str(tmp_path / "r.h5"), "--quiet"]
    assert main(["score", *common, "--queries", str(queries), *out]) == 2
    err = capsys.readouterr().err
    assert "q.jsonl, line 1" in err and "could not load the weights" not in err, err
    dtype = ["--model-dtype", "float8", "--queries", str(workdir / "queries.jsonl")]
    assert main(["score", *common, *dtype, *out]) == 2
    err = capsys.readouterr().err
    assert "dtype" in err and "could not load the weights" not in err, err
