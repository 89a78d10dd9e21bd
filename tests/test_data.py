"""Tests for influencekit.data (datasets, queries, batches) and influencekit.tiny."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch
from tokenizers import processors

from influencekit.data import (
    Batch,
    Example,
    Query,
    TextDataset,
    as_queries,
    collate,
    example_batches,
    load_queries,
    query_batches,
)
from influencekit.errors import DataError, ParameterError
from influencekit.tiny import TINY_CORPUS, build_tokenizer

LONG_TEXT = " ".join(TINY_CORPUS[:3])


def write_lines(tmp_path, lines, name="data.jsonl"):
    """Write lines (str: JSON text as is; dict: dumped) joined by newlines; return the path."""
    path = tmp_path / name
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def token_ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


# ---------------------------------------------------------------------------------------------
# tiny


def test_tiny_corpus_is_a_list_of_short_sentences():
    assert 30 <= len(TINY_CORPUS) <= 50
    assert all(isinstance(t, str) and 10 < len(t) < 100 for t in TINY_CORPUS)
    assert len(set(TINY_CORPUS)) == len(TINY_CORPUS)


def test_build_tokenizer_is_gpt2_style(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.pad_token is None
    ids = token_ids(tokenizer, "The moon")
    # No special tokens added by default.
    assert ids == tokenizer("The moon", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    assert len(tokenizer) <= 300


def test_build_tokenizer_round_trips_unseen_characters(tokenizer):
    text = "Zebra café — 42 ünïcödé!"
    assert tokenizer.decode(token_ids(tokenizer, text)) == text


def test_build_tokenizer_is_deterministic(tokenizer):
    again = build_tokenizer(TINY_CORPUS)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert token_ids(again, LONG_TEXT) == token_ids(tokenizer, LONG_TEXT)


def test_build_tokenizer_rejects_no_texts():
    with pytest.raises(DataError, match="no texts"):
        build_tokenizer([])


# ---------------------------------------------------------------------------------------------
# from_jsonl: good input


def test_from_jsonl_reads_records_ids_and_metadata(tmp_path, tokenizer):
    path = write_lines(
        tmp_path,
        [
            {"text": TINY_CORPUS[0], "theme": "cooking"},
            "",
            {"text": TINY_CORPUS[10], "id": 7, "theme": "astronomy", "score": 0.5},
            "   ",
            {"text": TINY_CORPUS[20], "id": "sail"},
        ],
    )
    ds = TextDataset.from_jsonl(path, tokenizer)
    # Default id is the 1-based line number; blank lines are skipped but counted.
    assert ds.ids == ["1", "7", "sail"]
    assert [ex.index for ex in ds] == [0, 1, 2]
    assert ds[1].metadata == {"theme": "astronomy", "score": 0.5}
    assert ds[2].metadata == {}
    assert ds[0].text == TINY_CORPUS[0]
    assert ds[0].input_ids == tuple(token_ids(tokenizer, TINY_CORPUS[0]))
    assert ds.source == str(path)
    assert ds.max_length == 128


def test_from_jsonl_custom_fields(tmp_path, tokenizer):
    path = write_lines(tmp_path, [{"body": TINY_CORPUS[5], "key": "k1", "text": "other"}])
    ds = TextDataset.from_jsonl(path, tokenizer, text_field="body", id_field="key")
    assert ds.ids == ["k1"]
    assert ds[0].text == TINY_CORPUS[5]
    assert ds[0].metadata == {"text": "other"}


def test_from_jsonl_accepts_utf8_bom_and_crlf(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "Stars shine."}\r\n{"text": "Boats sail."}\r\n')
    ds = TextDataset.from_jsonl(path, tokenizer)
    assert [ex.text for ex in ds] == ["Stars shine.", "Boats sail."]


def test_from_jsonl_truncates_without_chunking(tmp_path, tokenizer):
    path = write_lines(tmp_path, [{"text": LONG_TEXT, "id": "a"}])
    full = token_ids(tokenizer, LONG_TEXT)
    ds = TextDataset.from_jsonl(path, tokenizer, max_length=10)
    assert len(full) > 10
    assert ds.ids == ["a"]
    assert ds[0].input_ids == tuple(full[:10])
    assert ds[0].text == LONG_TEXT  # the original text is kept


def test_chunking_splits_into_windows(tmp_path, tokenizer):
    path = write_lines(tmp_path, [{"text": LONG_TEXT, "id": "a", "m": 1}, {"text": "Hi there"}])
    full = token_ids(tokenizer, LONG_TEXT)
    size = 16
    ds = TextDataset.from_jsonl(path, tokenizer, max_length=size, chunk=True)
    n_windows = -(-len(full) // size)
    if len(full) % size == 1:
        n_windows -= 1
    assert ds.ids[:n_windows] == [f"a#{k}" for k in range(n_windows)]
    assert ds.ids[n_windows:] == ["2#0"]
    for k in range(n_windows):
        window = full[k * size : (k + 1) * size]
        assert ds[k].input_ids == tuple(window)
        assert ds[k].text == tokenizer.decode(window)
        assert ds[k].metadata == {"m": 1}
        assert ds[k].index == k
    assert all(len(ex.input_ids) <= size for ex in ds)


def test_chunking_drops_a_one_token_tail(tokenizer):
    full = token_ids(tokenizer, LONG_TEXT)
    size = len(full) - 1  # windows of size and 1 token
    ds = TextDataset.from_texts([LONG_TEXT], tokenizer, max_length=size, chunk=True)
    assert ds.ids == ["0#0"]
    assert ds[0].input_ids == tuple(full[:size])


def test_chunking_keeps_a_two_token_tail(tokenizer):
    full = token_ids(tokenizer, LONG_TEXT)
    size = len(full) - 2
    ds = TextDataset.from_texts([LONG_TEXT], tokenizer, max_length=size, chunk=True)
    assert ds.ids == ["0#0", "0#1"]
    assert ds[1].input_ids == tuple(full[size:])
    assert ds.n_tokens == len(full)


# ---------------------------------------------------------------------------------------------
# from_jsonl: bad input


def test_missing_file_names_the_path(tmp_path, tokenizer):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        TextDataset.from_jsonl(path, tokenizer)


def test_empty_file_has_no_records(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        TextDataset.from_jsonl(path, tokenizer)


def test_blank_lines_only_has_no_records(tmp_path, tokenizer):
    path = write_lines(tmp_path, ["", "  ", "\t"])
    with pytest.raises(DataError, match="no records"):
        TextDataset.from_jsonl(path, tokenizer)


def test_invalid_json_names_line_and_json_message(tmp_path, tokenizer):
    path = write_lines(tmp_path, [{"text": TINY_CORPUS[0]}, "{text: 'no quotes'}"])
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads("{text: 'no quotes'}")
    with pytest.raises(DataError) as err:
        TextDataset.from_jsonl(path, tokenizer)
    message = str(err.value)
    assert f"{path}, line 2" in message
    assert "invalid JSON" in message
    assert expected.value.msg in message


def test_line_that_is_not_an_object(tmp_path, tokenizer):
    path = write_lines(tmp_path, [{"text": TINY_CORPUS[0]}, "", '["a list"]'])
    with pytest.raises(DataError, match=r"line 3: expected a JSON object, got list"):
        TextDataset.from_jsonl(path, tokenizer)


def test_missing_text_field(tmp_path, tokenizer):
    path = write_lines(tmp_path, [{"text": TINY_CORPUS[0]}, {"body": "x", "id": 2}])
    with pytest.raises(DataError, match=r"line 2: field 'text' is missing") as err:
        TextDataset.from_jsonl(path, tokenizer)
    assert "'body'" in str(err.value)  # lists the fields that are there


@pytest.mark.parametrize("value", [3, None, ["a", "b"], {"t": "x"}])
def test_text_not_a_string(tmp_path, tokenizer, value):
    path = write_lines(tmp_path, [{"text": value}])
    with pytest.raises(DataError, match=r"line 1: field 'text' must be a string"):
        TextDataset.from_jsonl(path, tokenizer)


@pytest.mark.parametrize("value", ["", "   ", "\n\t "])
def test_empty_or_whitespace_text(tmp_path, tokenizer, value):
    path = write_lines(tmp_path, [{"text": TINY_CORPUS[0]}, {"text": value}])
    with pytest.raises(DataError, match=r"line 2: field 'text' is empty or only whitespace"):
        TextDataset.from_jsonl(path, tokenizer)


def test_text_of_one_token(tmp_path, tokenizer):
    assert len(token_ids(tokenizer, "a")) == 1
    path = write_lines(tmp_path, [{"text": "a"}])
    with pytest.raises(DataError, match=r"line 1: field 'text' gives 1 token\(s\).*at least 2"):
        TextDataset.from_jsonl(path, tokenizer)


def test_non_utf8_bytes_name_line_and_byte(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine line"}\n{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(DataError) as err:
        TextDataset.from_jsonl(path, tokenizer)
    message = str(err.value)
    assert f"{path}, line 2" in message
    assert "UTF-8" in message
    assert "byte 13" in message  # len(b'{"text": "caf') == 13


@pytest.mark.parametrize("max_length", [1, 0, -5])
def test_max_length_below_two(tmp_path, tokenizer, max_length):
    path = write_lines(tmp_path, [{"text": TINY_CORPUS[0]}])
    with pytest.raises(ParameterError, match=rf"max_length must be an int >= 2.*got {max_length}"):
        TextDataset.from_jsonl(path, tokenizer, max_length=max_length)
    with pytest.raises(ParameterError, match="max_length"):
        TextDataset.from_texts(TINY_CORPUS, tokenizer, max_length=max_length)
    with pytest.raises(ParameterError, match="max_length"):
        TextDataset.from_records([{"text": TINY_CORPUS[0]}], tokenizer, max_length=max_length)


def test_duplicate_ids_name_both_lines(tmp_path, tokenizer):
    path = write_lines(
        tmp_path,
        [{"text": TINY_CORPUS[0], "id": "x"}, {"text": TINY_CORPUS[1]}, {"text": "Hi", "id": "x"}],
    )
    with pytest.raises(DataError, match=r"line 3: duplicate id 'x' \(first used at .*line 1\)"):
        TextDataset.from_jsonl(path, tokenizer)


def test_duplicate_ids_after_string_conversion(tmp_path, tokenizer):
    # Line 2 has no id, so it defaults to "2", clashing with the integer id 2 on line 1.
    path = write_lines(tmp_path, [{"text": TINY_CORPUS[0], "id": 2}, {"text": TINY_CORPUS[1]}])
    with pytest.raises(DataError, match=r"line 2: duplicate id '2'.*line 1"):
        TextDataset.from_jsonl(path, tokenizer)


# ---------------------------------------------------------------------------------------------
# from_records and from_texts


def test_from_records_takes_a_generator(tokenizer):
    rows = ({"text": t, "theme": "sailing"} for t in TINY_CORPUS[20:23])
    ds = TextDataset.from_records(rows, tokenizer, max_length=32)
    assert ds.ids == ["0", "1", "2"]
    assert [ex.text for ex in ds] == TINY_CORPUS[20:23]
    assert all(ex.metadata == {"theme": "sailing"} for ex in ds)
    assert ds.source == "records"


def test_from_records_accepts_any_mapping(tokenizer):
    row = types.MappingProxyType({"text": TINY_CORPUS[3], "id": 9})
    assert TextDataset.from_records([row], tokenizer).ids == ["9"]


def test_from_records_metadata_is_a_copy(tokenizer):
    row = {"text": TINY_CORPUS[3], "tags": "x"}
    ds = TextDataset.from_records([row], tokenizer)
    row["tags"] = "changed"
    assert ds[0].metadata == {"tags": "x"}


def test_from_records_errors_name_the_position(tokenizer):
    rows = [{"text": TINY_CORPUS[0]}, {"txt": TINY_CORPUS[1]}]
    with pytest.raises(DataError, match=r"records\[1\]: field 'text' is missing"):
        TextDataset.from_records(rows, tokenizer)


def test_from_records_rejects_a_non_dict(tokenizer):
    with pytest.raises(DataError, match=r"records\[1\]: expected a dict, got str"):
        TextDataset.from_records([{"text": TINY_CORPUS[0]}, "just text"], tokenizer)


def test_from_records_empty(tokenizer):
    with pytest.raises(DataError, match="records: no records"):
        TextDataset.from_records(iter([]), tokenizer)


def test_from_records_duplicate_ids_name_both_positions(tokenizer):
    rows = [{"text": TINY_CORPUS[0], "id": "a"}, {"text": TINY_CORPUS[1], "id": "a"}]
    with pytest.raises(DataError, match=r"records\[1\]: duplicate id 'a'.*records\[0\]"):
        TextDataset.from_records(rows, tokenizer)


def test_from_texts_with_and_without_ids(tokenizer):
    ds = TextDataset.from_texts(TINY_CORPUS[:3], tokenizer)
    assert ds.ids == ["0", "1", "2"]
    assert ds.source == "texts"
    ds = TextDataset.from_texts(TINY_CORPUS[:3], tokenizer, ids=[10, "b", 3.5])
    assert ds.ids == ["10", "b", "3.5"]
    assert all(ex.metadata == {} for ex in ds)


def test_from_texts_ids_length_mismatch(tokenizer):
    with pytest.raises(DataError, match="3 texts but 2 ids"):
        TextDataset.from_texts(TINY_CORPUS[:3], tokenizer, ids=["a", "b"])


def test_from_texts_bad_items_name_the_position(tokenizer):
    with pytest.raises(DataError, match=r"texts\[1\]: field 'text' must be a string"):
        TextDataset.from_texts([TINY_CORPUS[0], 42], tokenizer)
    with pytest.raises(DataError, match=r"texts\[0\]: .*gives 1 token"):
        TextDataset.from_texts(["a"], tokenizer)
    with pytest.raises(DataError, match="texts: no records"):
        TextDataset.from_texts([], tokenizer)


# ---------------------------------------------------------------------------------------------
# TextDataset behaviour


@pytest.fixture
def corpus_ds(tokenizer):
    rows = [{"text": t, "id": f"s{i}", "theme": i // 10} for i, t in enumerate(TINY_CORPUS)]
    return TextDataset.from_records(rows, tokenizer, max_length=64)


def test_indexing(corpus_ds):
    n = len(corpus_ds)
    assert n == len(TINY_CORPUS)
    assert corpus_ds[-1].id == f"s{n - 1}"
    assert corpus_ds[torch.tensor(2)].id == "s2"
    for bad in (n, -n - 1):
        with pytest.raises(IndexError):
            corpus_ds[bad]
    with pytest.raises(TypeError):
        corpus_ds[1.0]
    assert isinstance(corpus_ds[0], Example)


def test_subset_reindexes_and_keeps_fields(corpus_ds):
    sub = corpus_ds.subset([12, 3, -1])
    assert isinstance(sub, TextDataset)
    assert sub.ids == ["s12", "s3", f"s{len(corpus_ds) - 1}"]
    assert [ex.index for ex in sub] == [0, 1, 2]
    assert sub[0].text == corpus_ds[12].text
    assert sub[0].input_ids == corpus_ds[12].input_ids
    assert sub[0].metadata == {"theme": 1}
    assert sub.max_length == corpus_ds.max_length
    assert corpus_ds[12].index == 12  # the original is untouched


def test_subset_rejects_repeats_and_bad_indices(corpus_ds):
    with pytest.raises(DataError, match="twice"):
        corpus_ds.subset([1, 1])
    with pytest.raises(IndexError):
        corpus_ds.subset([0, 999])


def test_slice_returns_a_subset(corpus_ds):
    sl = corpus_ds[5:11:2]
    assert isinstance(sl, TextDataset)
    assert sl.ids == ["s5", "s7", "s9"]
    assert [ex.index for ex in sl] == [0, 1, 2]
    assert corpus_ds[-2:].ids == [ex.id for ex in corpus_ds.examples[-2:]]


def test_n_tokens_and_ids(corpus_ds, tokenizer):
    assert corpus_ds.n_tokens == sum(len(token_ids(tokenizer, t)) for t in TINY_CORPUS)
    assert corpus_ds.ids == [f"s{i}" for i in range(len(TINY_CORPUS))]


def test_fingerprint(corpus_ds, tokenizer):
    fp = corpus_ds.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert corpus_ds[:].fingerprint() == fp
    rows = [{"text": t, "id": f"s{i}"} for i, t in enumerate(TINY_CORPUS)]
    # Metadata and source are not part of it...
    assert TextDataset.from_records(rows, tokenizer, max_length=64).fingerprint() == fp
    # ...but max_length, ids, token ids and order are.
    assert TextDataset.from_records(rows, tokenizer, max_length=65).fingerprint() != fp
    rows[0]["id"] = "other"
    assert TextDataset.from_records(rows, tokenizer, max_length=64).fingerprint() != fp
    assert corpus_ds.subset(range(len(corpus_ds) - 1, -1, -1)).fingerprint() != fp
    assert corpus_ds[:-1].fingerprint() != fp


def test_examples_are_hashable_and_frozen(corpus_ds):
    ex = corpus_ds[0]
    assert hash(ex) == hash(corpus_ds[:1][0])
    with pytest.raises(AttributeError):
        ex.id = "new"


# ---------------------------------------------------------------------------------------------
# Query.encode


def test_encode_concatenates_separate_tokenizations(tokenizer):
    q = Query("The captain steers", " the yacht toward the sea.", id="q1")
    ids, start = q.encode(tokenizer)
    prompt_ids = token_ids(tokenizer, q.prompt)
    completion_ids = tokenizer(q.completion, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + completion_ids
    assert start == len(prompt_ids)
    assert tokenizer.decode(ids[start:]) == q.completion


@pytest.fixture
def bos_tokenizer():
    """Like the tiny tokenizer but adds a BOS token, as Llama-style tokenizers do."""
    tok = build_tokenizer(TINY_CORPUS)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)]
    )
    return tok


def test_encode_gives_bos_to_the_prompt_only(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    ids, start = Query("The moon", " rises.").encode(bos_tokenizer)
    assert ids[0] == bos
    assert bos not in ids[1:]
    assert ids[start:] == bos_tokenizer(" rises.", add_special_tokens=False)["input_ids"]
    # With a BOS, an empty prompt still conditions the completion.
    ids, start = Query("", "Stars shine.").encode(bos_tokenizer)
    assert (ids[0], start) == (bos, 1)


def test_encode_empty_completion_names_the_query(tokenizer):
    with pytest.raises(DataError, match=r"query 'q7': the completion gives 0 tokens"):
        Query("The moon", "", id="q7").encode(tokenizer)


def test_encode_empty_prompt_names_the_query(tokenizer):
    with pytest.raises(DataError, match=r"query 'q8': the prompt gives 0 tokens.*conditions"):
        Query("", "The moon rises.", id="q8").encode(tokenizer)


# ---------------------------------------------------------------------------------------------
# load_queries


def test_load_queries(tmp_path):
    path = write_lines(
        tmp_path,
        [
            {"prompt": "The moon", "completion": " rises.", "theme": "astronomy"},
            "",
            {"prompt": "", "completion": "Sail on.", "id": 5},
        ],
    )
    queries = load_queries(path)
    assert queries == [
        Query("The moon", " rises.", "1", {"theme": "astronomy"}),
        Query("", "Sail on.", "5", {}),
    ]


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"completion": " x"}, r"line 2: field 'prompt' is missing"),
        ({"prompt": "p"}, r"line 2: field 'completion' is missing"),
        ({"prompt": 3, "completion": " x"}, r"line 2: field 'prompt' must be a string, got int"),
        ({"prompt": "p", "completion": None}, r"line 2: field 'completion' must be a string"),
        ({"prompt": "p", "completion": ""}, r"line 2: field 'completion' is empty"),
        ({"prompt": "p", "completion": " \n"}, r"line 2: field 'completion' is empty"),
        ({"prompt": "p", "completion": " y", "id": 1}, r"line 2: duplicate query id '1'.*line 1"),
    ],
)
def test_load_queries_bad_records(tmp_path, record, pattern):
    path = write_lines(tmp_path, [{"prompt": "a", "completion": " b"}, record])
    with pytest.raises(DataError, match=pattern):
        load_queries(path)


def test_load_queries_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_queries(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"line 1: invalid JSON"):
        load_queries(write_lines(tmp_path, ['{"prompt": "a",']))
    with pytest.raises(DataError, match="no records"):
        load_queries(write_lines(tmp_path, [""]))


# ---------------------------------------------------------------------------------------------
# as_queries


def test_as_queries_single_forms():
    q = Query("p", " c", id="mine")
    assert as_queries(q) == [q]
    assert as_queries({"prompt": "p", "completion": " c", "tag": 1}) == [
        Query("p", " c", "0", {"tag": 1})
    ]
    assert as_queries(("p", " c")) == [Query("p", " c", "0")]


def test_as_queries_list_of_mixed_forms():
    queries = as_queries(
        [("a", " b"), Query("c", " d", id="q"), {"prompt": "e", "completion": " f"}]
    )
    assert [q.id for q in queries] == ["0", "q", "2"]
    assert [q.completion for q in queries] == [" b", " d", " f"]


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ([("a", " b"), 42], r"queries\[1\]: expected a Query.*got int"),
        ([("a", " b", "c")], r"queries\[0\]: expected a Query.*got tuple"),
        ([{"prompt": "a"}], r"queries\[0\]: field 'completion' is missing"),
        ([("a", 3)], r"queries\[0\]: field 'completion' must be a string"),
        ("just a string", r"query: expected a Query.*got str"),
        ([], "empty"),
        ([Query("a", " b"), Query("c", " d")], r"queries\[1\]: duplicate query id '0'"),
    ],
)
def test_as_queries_rejects_bad_input(obj, pattern):
    with pytest.raises(DataError, match=pattern):
        as_queries(obj)


# ---------------------------------------------------------------------------------------------
# collate and batches


def test_collate_training_rows_by_hand():
    batch = collate([[5, 6, 7, 8], [9, 10]], label_starts=[1, 1], indices=[3, 8], pad_id=99)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 99, 99]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # Every position with a next token is scored; the last real token and pads are not.
    assert batch.label_mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert batch.indices == [3, 8]
    assert batch.lengths == [4, 2]
    assert batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.long
    assert batch.label_mask.dtype == torch.bool


def test_collate_query_rows_by_hand():
    # Row 0: prompt [1, 2, 3], completion [4, 5] -> predictions at t=2 (of 4) and t=3 (of 5).
    # Row 1: prompt [6], completion [7, 8, 9] -> t = 0, 1, 2.
    batch = collate([[1, 2, 3, 4, 5], [6, 7, 8, 9]], label_starts=[3, 1], indices=[0, 1])
    assert batch.label_mask.tolist() == [
        [False, False, True, True, False],
        [True, True, True, False, False],
    ]
    assert batch.input_ids[1, 4].item() == 0  # default pad filler


@pytest.mark.parametrize(
    ("seqs", "starts", "indices"),
    [
        ([[1, 2, 3]], [0], [0]),  # would score the first token, which has no context
        ([[1, 2, 3]], [3], [0]),  # scores nothing
        ([[1]], [1], [0]),
        ([[1, 2], [3, 4]], [1], [0, 1]),
        ([], [], []),
    ],
)
def test_collate_rejects_bad_arguments(seqs, starts, indices):
    with pytest.raises(DataError, match="collate"):
        collate(seqs, starts, indices)


def test_batch_to_returns_a_moved_copy():
    batch = collate([[1, 2, 3]], [1], [0])
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved is not batch
    assert torch.equal(moved.label_mask, batch.label_mask)
    assert moved.indices == [0] and moved.lengths == [3]


def test_example_batches(corpus_ds, tokenizer):
    batches = list(example_batches(corpus_ds, batch_size=16))
    assert [len(b.indices) for b in batches] == [16, 16, len(corpus_ds) - 32]
    assert [i for b in batches for i in b.indices] == list(range(len(corpus_ds)))
    for batch in batches:
        for row, i in enumerate(batch.indices):
            ids = corpus_ds[i].input_ids
            n = len(ids)
            assert batch.input_ids[row, :n].tolist() == list(ids)
            assert batch.label_mask[row].sum().item() == n - 1
            # No pad token set, so the filler is eos.
            assert (batch.input_ids[row, n:] == tokenizer.eos_token_id).all()


def test_example_batches_with_indices(corpus_ds):
    batches = list(example_batches(corpus_ds, batch_size=2, indices=[7, 3, 30]))
    assert [b.indices for b in batches] == [[7, 3], [30]]
    assert batches[1].lengths == [len(corpus_ds[30].input_ids)]
    with pytest.raises(ParameterError, match="batch_size"):
        next(example_batches(corpus_ds, batch_size=0))


def test_query_batches_score_only_completion_tokens(tokenizer):
    queries = as_queries([("The moon", " rises."), ("A chef", " tastes the stew."), ("Sail", "!")])
    batches = list(query_batches(queries, tokenizer, batch_size=2))
    assert [b.indices for b in batches] == [[0, 1], [2]]
    for batch in batches:
        for row, i in enumerate(batch.indices):
            completion = tokenizer(queries[i].completion, add_special_tokens=False)["input_ids"]
            scored = batch.label_mask[row].nonzero().flatten()
            # The targets of the scored positions are exactly the completion tokens.
            assert batch.input_ids[row, scored + 1].tolist() == completion


def test_batches_fill_with_the_pad_token_when_set():
    tok = build_tokenizer(TINY_CORPUS)
    tok.pad_token = "a"  # an ordinary token, so the id differs from eos (0)
    pad = tok.pad_token_id
    assert pad not in (None, tok.eos_token_id)
    ds = TextDataset.from_texts(["The moon rises.", LONG_TEXT], tok)
    batch = next(example_batches(ds, batch_size=2))
    assert batch.input_ids[0, batch.lengths[0] :].eq(pad).all()
    queries = [Query("The moon", " rises."), Query(LONG_TEXT, " end.")]
    batch = next(query_batches(queries, tok, batch_size=2))
    assert batch.input_ids[0, batch.lengths[0] :].eq(pad).all()
