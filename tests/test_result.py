"""Tests of kit/result.py: ``InfluenceResult`` construction, files and round trips.

1. Construction refuses non-finite scores (naming the query, training id and layer) and
   arrays of the wrong shape.
2. ``save``/``load`` round-trip exactly: scores, ids, layers, meta, queries and ``top``, also
   with non-ASCII ids and meta and extreme values; queries are typed records.
3. Files that are not result files, truncated ones and ones missing a dataset raise
   FileFormatError naming the file (the files start from ``gpt2_files``).

Elsewhere: top-k and refined results (``indices``, their save and load) in
test_store_scoring.py; what the analysis and the widgets do with a result in
test_analysis.py and test_widgets.py.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import h5py
import numpy as np
import pytest

import influencekit as ik

from helpers.engines import assert_bad_file, fit, score

# ---------------------------------------------------------------------------------------------
# 1. Construction


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_result_with_nonfinite_layer_score_names_query_train_and_layer(bad):
    layer_scores = np.zeros((2, 3, 2))
    layer_scores[1, 2, 0] = bad
    with pytest.raises(ik.NonFiniteError) as info:
        ik.InfluenceResult(layer_scores, ["mlp.a", "mlp.b"], ["x", "y", "z"], ["q0", "q1"])
    message = str(info.value)
    assert "'q1'" in message and "'z'" in message and "mlp.a" in message


def test_result_with_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"shape \(3, 2, 2\)"):
        ik.InfluenceResult(np.zeros((3, 2, 2)), ["a", "b"], ["x", "y", "z"], ["q0", "q1"])


# ---------------------------------------------------------------------------------------------
# 2. Round trips


def test_result_round_trips_exactly(gpt2_model, gpt2_train, tmp_path):
    factors = fit(gpt2_model, gpt2_train)
    result = score(gpt2_model, factors, gpt2_train, query_rank=2)
    loaded = ik.InfluenceResult.load(result.save(tmp_path / "result.h5"))
    assert np.array_equal(loaded.layer_scores, result.layer_scores)
    assert loaded.layer_scores.dtype == np.float64
    assert (loaded.layers, loaded.train_ids, loaded.query_ids) == (
        result.layers,
        result.train_ids,
        result.query_ids,
    )
    assert loaded.meta == result.meta
    assert loaded.queries == result.queries and result.queries is not None
    assert loaded.top(1, k=4) == result.top(1, k=4)

    values = np.array([[[0.1, -2.5e-300], [np.pi, 1e300]]])
    meta = {"note": "ü", "x": [1, None]}
    odd = ik.InfluenceResult(values, ["l0", "l1"], ["naïve-1", "Ω/2"], ["q 😀"], meta)
    back = ik.InfluenceResult.load(odd.save(tmp_path / "odd.h5"))
    assert np.array_equal(back.layer_scores, odd.layer_scores)
    assert (back.train_ids, back.query_ids, back.meta) == (odd.train_ids, odd.query_ids, odd.meta)


def test_queries_are_typed_records_kept_in_the_file(tmp_path):
    """``result.queries``: one ``Query`` per query id, with its metadata; on disk still
    ``meta["queries"]``, so files of either shape load alike."""
    values = np.zeros((2, 3, 1))
    queries = [ik.Query("The moon", " rises", "own-id", {"kind": "fact", "n": np.int64(3)}),
               {"prompt": "A ship", "completion": " sails", "theme": ["sea"]}]  # fmt: skip
    result = ik.InfluenceResult(values, ["l"], ["a", "b", "c"], ["q0", "q1"], queries=queries)
    assert [q.id for q in result.queries] == ["q0", "q1"]  # the result's ids win
    assert result.queries[1] == ik.Query("A ship", " sails", "q1", {"theme": ["sea"]})
    assert "queries" not in result.meta
    back = ik.InfluenceResult.load(result.save(tmp_path / "q.h5"))
    assert back.queries[0] == ik.Query("The moon", " rises", "q0", {"kind": "fact", "n": 3})
    assert back.queries[1] == result.queries[1]
    with h5py.File(tmp_path / "q.h5") as f:  # the file keeps them where it always did
        assert json.loads(f.attrs["meta"])["queries"][1]["prompt"] == "A ship"
    in_meta = {"queries": [{"prompt": "p", "completion": " c"}] * 2}  # as a file has them
    from_meta = ik.InfluenceResult(values, ["l"], ["a", "b", "c"], ["q0", "q1"], in_meta)
    assert [q.prompt for q in from_meta.queries] == ["p", "p"] and from_meta.meta == {}
    with pytest.raises(ik.ParameterError, match="queries"):
        ik.InfluenceResult(values, ["l"], ["a", "b", "c"], ["q0", "q1"], queries=queries[:1])


# ---------------------------------------------------------------------------------------------
# 3. Bad files


def copy(path: pathlib.Path, tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    target = tmp_path / name
    shutil.copy(path, target)
    return target


def test_files_that_are_not_result_files(gpt2_files, tmp_path):
    loader = ik.InfluenceResult.load
    text = tmp_path / "notes.h5"
    text.write_text("just some text, not HDF5\n")
    assert_bad_file(loader, text)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    assert_bad_file(loader, empty)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    assert_bad_file(loader, plain)
    factors_path, _ = gpt2_files
    assert_bad_file(loader, factors_path)  # the other kind of influencekit file


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95, -1])
def test_truncated_result_files(gpt2_files, tmp_path, fraction):
    source = gpt2_files[1]
    data = source.read_bytes()
    cut = len(data) - 1 if fraction == -1 else int(len(data) * fraction)
    path = tmp_path / f"truncated-{source.name}"
    path.write_bytes(data[:cut])
    assert_bad_file(ik.InfluenceResult.load, path)


def test_result_missing_a_dataset(gpt2_files, tmp_path):
    path = copy(gpt2_files[1], tmp_path, "no-scores.h5")
    with h5py.File(path, "a") as f:
        del f["layer_scores"]
    assert_bad_file(ik.InfluenceResult.load, path)
