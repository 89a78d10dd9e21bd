"""Training sequences, queries and padded batches.

A training record is one JSON object (or dict) with a text field; it becomes one training
sequence (or, with ``chunk=True``, several). A query is a prompt and a completion whose
completion tokens are the ones scored. Every error on bad input is a :class:`DataError` that
names the file and 1-based line (or the record position) and the field.

Example:
    >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
    >>> tok = build_tokenizer(TINY_CORPUS)
    >>> train = TextDataset.from_texts(TINY_CORPUS[:4], tok, max_length=16)
    >>> len(train), train[0].id
    (4, '0')
    >>> batch = next(example_batches(train, batch_size=2))
    >>> batch.input_ids.shape[0], batch.indices
    (2, [0, 1])
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import checks
from .errors import DataError, MissingFileError, OutOfRangeError

# A record as read: where it came from (for messages), its default id, and its fields.
_Located = tuple[str, str, Mapping[str, Any]]


@dataclass(frozen=True)
class Example:
    """One training sequence.

    ``metadata`` holds the record's fields other than text and id; it is left out of the hash
    so that examples stay hashable.

    Example:
        >>> ex = Example(0, "a", "hi there", (5, 6), {"source": "web"})
        >>> ex.id, len(ex.input_ids)
        ('a', 2)
    """

    index: int
    id: str
    text: str
    input_ids: tuple[int, ...]
    metadata: dict = field(hash=False)
    # The tokenizer that made input_ids, so token_scores can encode a query against it.
    tokenizer: Any = field(default=None, repr=False, compare=False, hash=False)


# ---------------------------------------------------------------------------------------------
# Reading JSONL


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where}: not valid UTF-8 at byte {err.start} of the line (0-based): {err.reason}"
        ) from None


def _parse_line(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Return ``(1-based line number, record)`` for every non-blank line of a JSONL file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"no such file: {path}")
    with open(path, "rb") as fh:
        # Bytes, decoded line by line, so a bad byte is reported with its line.
        raw_lines = fh.read().split(b"\n")
    records = []
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM some editors write
        where = f"{path}, line {number}"
        text = _decode_line(raw, where)
        if text.strip():
            records.append((number, _parse_line(text, where)))
    if not records:
        raise DataError(f"{path}: no records (the file is empty or has only blank lines)")
    return records


# ---------------------------------------------------------------------------------------------
# Validating training records


def _check_max_length(max_length: int) -> None:
    # >= 2: a sequence needs a token and the next token to predict
    checks.count("max_length", max_length, minimum=2)


def check_training_file(
    path: str | os.PathLike,
    *,
    max_length: int = 128,
    text_field: str = "text",
    id_field: str = "id",
) -> int:
    """Every check of :meth:`TextDataset.from_jsonl` that needs no tokenizer (the file, each
    line's JSON, the text field, unique ids, ``max_length``), so that a bad line is found
    before a model loads. Returns the number of records.

    Example:
        >>> check_training_file("train.jsonl")                       # doctest: +SKIP
        1200
    """
    _check_max_length(max_length)
    path = os.fspath(path)
    first_seen: dict[str, str] = {}
    records = _read_jsonl(path)
    for number, record in records:
        where = f"{path}, line {number}"
        _record_text(record, where, text_field)
        _check_new_id(str(record.get(id_field, number)), where, first_seen)
    return len(records)


def _check_new_id(rid: str, where: str, first_seen: dict[str, str]) -> None:
    if rid in first_seen:
        raise DataError(f"{where}: duplicate id {rid!r} (first used at {first_seen[rid]})")
    first_seen[rid] = where


def _record_text(record: Mapping, where: str, text_field: str) -> str:
    """The record's text field, checked to be a non-blank string."""
    if text_field not in record:
        present = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{where}: field {text_field!r} is missing (fields present: {present})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
        )
    if not text.strip():
        raise DataError(f"{where}: field {text_field!r} is empty or only whitespace")
    return text


def _record_ids(tokenizer, record: Mapping, where: str, text_field: str) -> list[int]:
    """The record's text, validated and tokenized with the tokenizer's default special tokens."""
    text = _record_text(record, where, text_field)
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    if len(ids) < 2:
        raise DataError(
            f"{where}: field {text_field!r} gives {len(ids)} token(s); a training sequence "
            f"needs at least 2 (a token and the next token to predict)"
        )
    return ids


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    # A 1-token tail has no next token to predict, so it could carry no loss.
    return [w for w in windows if len(w) >= 2]


def _build_examples(
    located: Iterable[_Located],
    tokenizer,
    max_length: int,
    chunk: bool,
    text_field: str,
    id_field: str,
) -> list[Example]:
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for where, default_id, record in located:
        ids = _record_ids(tokenizer, record, where, text_field)
        rid = str(record[id_field]) if id_field in record else default_id
        _check_new_id(rid, where, first_seen)
        meta = {k: v for k, v in record.items() if k not in (text_field, id_field)}
        if not chunk:
            # The full original text is kept even when its tokens were truncated.
            pieces = [(rid, record[text_field], ids[:max_length])]
        else:
            # Chunk texts are decoded, so each shows exactly the tokens of its window.
            windows = _windows(ids, max_length)
            pieces = [(f"{rid}#{k}", tokenizer.decode(w), w) for k, w in enumerate(windows)]
        for eid, text, window in pieces:
            examples.append(Example(len(examples), eid, text, tuple(window), dict(meta), tokenizer))
    return examples


# ---------------------------------------------------------------------------------------------
# The dataset


class TextDataset(collections.abc.Sequence):
    """Training sequences, one :class:`Example` per sequence, indexed 0..n-1.

    Build it with :meth:`from_jsonl`, :meth:`from_texts` or :meth:`from_records`.

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> tok = build_tokenizer(TINY_CORPUS)
        >>> ds = TextDataset.from_records([{"text": "A ship at sea.", "id": 7}], tok)
        >>> ds.ids, ds[-1].index, ds.source
        (['7'], 0, 'records')
    """

    def __init__(self, examples: list[Example], tokenizer, max_length: int, source: str) -> None:
        _check_max_length(max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.examples = list(examples)
        self.source = source

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        tokenizer,
        max_length: int = 128,
        *,
        chunk: bool = False,
        text_field: str = "text",
        id_field: str = "id",
    ) -> TextDataset:
        """Read a JSONL file, one JSON object per line; blank lines are skipped.

        Each record's ``text_field`` is tokenized with the tokenizer's default special tokens.
        With ``chunk=False`` it is truncated to ``max_length`` tokens; with ``chunk=True`` it is
        split into consecutive windows of ``max_length`` tokens with ids ``f"{id}#{k}"``, and a
        trailing window of fewer than 2 tokens is dropped (it has nothing to predict). The id
        defaults to the 1-based line number. Other fields go to ``Example.metadata``.

        Example:
            >>> ds = TextDataset.from_jsonl("train.jsonl", tok, max_length=64)  # doctest: +SKIP
        """
        _check_max_length(max_length)
        path = os.fspath(path)
        located = ((f"{path}, line {n}", str(n), rec) for n, rec in _read_jsonl(path))
        examples = _build_examples(located, tokenizer, max_length, chunk, text_field, id_field)
        return cls(examples, tokenizer, max_length, path)

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        tokenizer,
        max_length: int = 128,
        *,
        chunk: bool = False,
        text_field: str = "text",
        id_field: str = "id",
    ) -> TextDataset:
        """Build from any iterable of dicts (a list, a generator, a ``datasets.Dataset``).

        Same rules as :meth:`from_jsonl`; ids default to the 0-based position and errors name
        the position as ``records[i]``.

        Example:
            >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
            >>> tok = build_tokenizer(TINY_CORPUS)
            >>> rows = ({"text": t, "theme": "music"} for t in TINY_CORPUS[30:32])
            >>> ds = TextDataset.from_records(rows, tok)
            >>> ds.ids, ds[1].metadata
            (['0', '1'], {'theme': 'music'})
        """
        _check_max_length(max_length)
        examples = _build_examples(
            _locate(records, "records"), tokenizer, max_length, chunk, text_field, id_field
        )
        return cls(examples, tokenizer, max_length, "records")

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer,
        max_length: int = 128,
        *,
        ids: Iterable[Any] | None = None,
        chunk: bool = False,
    ) -> TextDataset:
        """Build from plain strings; ``ids`` (one per text) default to the 0-based position.

        Example:
            >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
            >>> tok = build_tokenizer(TINY_CORPUS)
            >>> TextDataset.from_texts(TINY_CORPUS[:2], tok, ids=["a", "b"]).ids
            ['a', 'b']
        """
        _check_max_length(max_length)
        texts = list(texts)
        records: list[dict] = [{"text": t} for t in texts]
        if ids is not None:
            ids = list(ids)
            if len(ids) != len(texts):
                raise DataError(f"texts: got {len(texts)} texts but {len(ids)} ids")
            records = [{"text": t, "id": i} for t, i in zip(texts, ids, strict=True)]
        examples = _build_examples(
            _locate(records, "texts"), tokenizer, max_length, chunk, "text", "id"
        )
        return cls(examples, tokenizer, max_length, "texts")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.subset(range(len(self))[key])
        return self.examples[self._position(key)]

    def _position(self, key) -> int:
        i = operator.index(key)  # numpy and torch integers too, but not floats
        n = len(self)
        if not -n <= i < n:
            raise OutOfRangeError(f"index {i} out of range for a dataset of {n} examples")
        return i % n

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """A new dataset of the given examples, re-indexed 0..n-1 (ids, text, metadata kept).

        Example:
            >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
            >>> ds = TextDataset.from_texts(TINY_CORPUS, build_tokenizer(TINY_CORPUS))
            >>> sub = ds.subset([5, 2])
            >>> sub.ids, sub[0].index
            (['5', '2'], 0)
        """
        picked = [self.examples[self._position(i)] for i in indices]
        ids = [ex.id for ex in picked]
        if len(set(ids)) != len(ids):
            raise DataError("subset: an index appears twice (example ids must stay unique)")
        examples = [dataclasses.replace(ex, index=k) for k, ex in enumerate(picked)]
        return TextDataset(examples, self.tokenizer, self.max_length, self.source)

    @property
    def ids(self) -> list[str]:
        """Every example's id, in order."""
        return [ex.id for ex in self.examples]

    @property
    def n_tokens(self) -> int:
        """Total number of tokens over all examples."""
        return sum(len(ex.input_ids) for ex in self.examples)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of ``max_length`` and every example's id and token ids.

        Two datasets with the same fingerprint give the same training sequences, so stored
        gradients or factors computed on one can be reused on the other.

        Example:
            >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
            >>> ds = TextDataset.from_texts(TINY_CORPUS, build_tokenizer(TINY_CORPUS))
            >>> len(ds.fingerprint()), ds.fingerprint() == ds[:].fingerprint()
            (64, True)
        """
        digest = hashlib.sha256(f"max_length={self.max_length}\n".encode())
        for ex in self.examples:
            # JSON quoting keeps ids containing separators from running into the token ids.
            digest.update(json.dumps([ex.id, list(ex.input_ids)]).encode() + b"\n")
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (
            f"TextDataset({len(self)} examples, {self.n_tokens} tokens, "
            f"max_length={self.max_length}, source={self.source!r})"
        )


def _locate(records: Iterable[Any], name: str) -> Iterator[_Located]:
    count = 0
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{name}[{i}]: expected a dict, got {type(record).__name__}")
        count += 1
        yield f"{name}[{i}]", str(i), record
    if count == 0:
        raise DataError(f"{name}: no records")


# ---------------------------------------------------------------------------------------------
# Queries


@dataclass(frozen=True)
class Query:
    """A prompt and the completion whose tokens are scored.

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> tok = build_tokenizer(TINY_CORPUS)
        >>> ids, start = Query("The chef tastes", " the stew").encode(tok)
        >>> ids[start:] == tok(" the stew", add_special_tokens=False)["input_ids"]
        True
    """

    prompt: str
    completion: str
    id: str = "0"
    metadata: dict = field(default_factory=dict, hash=False)

    def encode(self, tokenizer) -> tuple[list[int], int]:
        """Return ``(input_ids, completion_start)``.

        Prompt and completion are tokenized separately and concatenated, so the scored tokens
        are exactly the completion's own tokens: the prompt gets the tokenizer's default special
        tokens (a BOS, for tokenizers that add one), the completion none.
        """
        prompt_ids = [int(i) for i in tokenizer(self.prompt)["input_ids"]]
        completion_ids = [
            int(i) for i in tokenizer(self.completion, add_special_tokens=False)["input_ids"]
        ]
        if not completion_ids:
            raise DataError(f"query {self.id!r}: the completion gives 0 tokens")
        if not prompt_ids:
            raise DataError(
                f"query {self.id!r}: the prompt gives 0 tokens, so nothing conditions the first "
                f"completion token; give a non-empty prompt"
            )
        return prompt_ids + completion_ids, len(prompt_ids)


def _query_from_dict(record: Mapping, where: str, default_id: str) -> Query:
    for name in ("prompt", "completion"):
        if name not in record:
            raise DataError(f"{where}: field {name!r} is missing")
        if not isinstance(record[name], str):
            kind = type(record[name]).__name__
            raise DataError(f"{where}: field {name!r} must be a string, got {kind}")
    if not record["completion"].strip():
        raise DataError(f"{where}: field 'completion' is empty or only whitespace")
    qid = str(record["id"]) if "id" in record else default_id
    meta = {k: v for k, v in record.items() if k not in ("prompt", "completion", "id")}
    return Query(record["prompt"], record["completion"], qid, meta)


def _check_unique(queries: list[Query], wheres: list[str]) -> None:
    first_seen: dict[str, str] = {}
    for query, where in zip(queries, wheres, strict=True):
        if query.id in first_seen:
            raise DataError(
                f"{where}: duplicate query id {query.id!r} (first used at {first_seen[query.id]})"
            )
        first_seen[query.id] = where


def load_queries(path: str | os.PathLike) -> list[Query]:
    """Read queries from JSONL: ``prompt`` (a string, may be empty) and ``completion``.

    The id defaults to the 1-based line number; other fields go to ``Query.metadata``.

    Example:
        >>> queries = load_queries("queries.jsonl")  # doctest: +SKIP
    """
    path = os.fspath(path)
    numbered = _read_jsonl(path)
    wheres = [f"{path}, line {n}" for n, _ in numbered]
    queries = [_query_from_dict(rec, f"{path}, line {n}", str(n)) for n, rec in numbered]
    _check_unique(queries, wheres)
    return queries


def _to_query(item: Any, where: str, default_id: str) -> Query:
    if isinstance(item, Query):
        return item
    if isinstance(item, Mapping):
        return _query_from_dict(item, where, default_id)
    if isinstance(item, tuple) and len(item) == 2:
        return _query_from_dict({"prompt": item[0], "completion": item[1]}, where, default_id)
    raise DataError(
        f"{where}: expected a Query, a dict with 'prompt' and 'completion', or a "
        f"(prompt, completion) tuple; got {type(item).__name__}"
    )


def as_queries(obj: Any) -> list[Query]:
    """Turn a Query, a dict, a ``(prompt, completion)`` tuple, or a list of these into queries.

    Dicts and tuples without an id get their position as id ("0", "1", ...); Query objects keep
    theirs. Ids must be unique.

    Example:
        >>> qs = as_queries([("The moon", " rises."), {"prompt": "A", "completion": " b"}])
        >>> [q.id for q in qs], qs[0].completion
        (['0', '1'], ' rises.')
    """
    if not isinstance(obj, list):
        return [_to_query(obj, "query", "0")]
    if not obj:
        raise DataError("queries: the list is empty")
    wheres = [f"queries[{i}]" for i in range(len(obj))]
    queries = [_to_query(item, wheres[i], str(i)) for i, item in enumerate(obj)]
    _check_unique(queries, wheres)
    return queries


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Right-padded token ids with the masks that say which positions are real and scored.

    ``label_mask[b, t]`` is True iff the model's prediction at position ``t`` (of token
    ``t + 1``) counts in the loss.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    label_mask: torch.BoolTensor
    indices: list[int]
    lengths: list[int]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device``; to CUDA through pinned memory, so the
        copy overlaps compute."""
        device = torch.device(device)
        pinned = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)

        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.label_mask),
            list(self.indices),
            list(self.lengths),
        )


def _check_collate_args(sequences, label_starts, indices) -> None:
    if not sequences or not len(sequences) == len(label_starts) == len(indices):
        raise DataError(
            f"collate: need equally many sequences, label_starts and indices (at least one), "
            f"got {len(sequences)}, {len(label_starts)}, {len(indices)}"
        )
    for b, (seq, start) in enumerate(zip(sequences, label_starts, strict=True)):
        if not 1 <= start <= len(seq) - 1:
            raise DataError(
                f"collate: row {b} (index {indices[b]}) has {len(seq)} tokens and label_start "
                f"{start}; need 1 <= label_start <= length - 1 so at least one token is scored"
            )


def collate(
    sequences: list[Sequence[int]],
    label_starts: list[int],
    indices: list[int],
    pad_id: int = 0,
) -> Batch:
    """Pad sequences on the right into a :class:`Batch`.

    Row ``b`` scores tokens ``label_starts[b] .. len_b - 1``, i.e. ``label_mask[b, t]`` is True
    for ``label_starts[b] - 1 <= t <= len_b - 2``. Use 1 for training sequences (every token
    after the first) and the completion start for queries.

    Padding is always on the right: in a causal LM each real token then keeps its usual
    position ids and attends only to earlier real tokens, never to pads, so no position-id
    bookkeeping is needed. ``pad_id`` only fills; padded positions are masked out.

    Example:
        >>> b = collate([[5, 6, 7], [8, 9]], label_starts=[2, 1], indices=[0, 1])
        >>> b.label_mask.tolist()
        [[False, True, False], [True, False, False]]
    """
    _check_collate_args(sequences, label_starts, indices)
    lengths = [len(seq) for seq in sequences]
    shape = (len(sequences), max(lengths))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    label_mask = torch.zeros(shape, dtype=torch.bool)
    for b, (seq, start, n) in enumerate(zip(sequences, label_starts, lengths, strict=True)):
        input_ids[b, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[b, :n] = 1
        label_mask[b, start - 1 : n - 1] = True
    return Batch(input_ids, attention_mask, label_mask, list(indices), lengths)


def padding_id(tokenizer) -> int:
    """The id that fills padded positions (masked everywhere, so any valid id works)."""
    # Any valid id works since pads are masked; prefer the tokenizer's own pad, then eos.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def example_batches(
    dataset: TextDataset, batch_size: int, indices: Sequence[int] | None = None
) -> Iterator[Batch]:
    """Yield training batches (every next token scored) over ``indices`` (default: all).

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> ds = TextDataset.from_texts(TINY_CORPUS[:5], build_tokenizer(TINY_CORPUS))
        >>> [b.indices for b in example_batches(ds, 2)]
        [[0, 1], [2, 3], [4]]
    """
    checks.count("batch_size", batch_size)
    order = list(range(len(dataset)) if indices is None else indices)
    pad = padding_id(dataset.tokenizer)
    for lo in range(0, len(order), batch_size):
        examples = [dataset[i] for i in order[lo : lo + batch_size]]
        seqs = [ex.input_ids for ex in examples]
        yield collate(seqs, [1] * len(seqs), [ex.index for ex in examples], pad)


def length_order(dataset: TextDataset, indices: Sequence[int] | None = None) -> list[int]:
    """``indices`` (default: all) ordered longest first, ties kept in order.

    Batching sequences of similar length wastes little compute on padding.

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> ds = TextDataset.from_texts(["a b", "a b c d e", "a b c"], build_tokenizer(TINY_CORPUS))
        >>> length_order(ds)
        [1, 2, 0]
    """
    order = range(len(dataset)) if indices is None else indices
    return sorted(order, key=lambda i: -len(dataset[i].input_ids))


def query_batches(queries: list[Query], tokenizer, batch_size: int) -> Iterator[Batch]:
    """Yield query batches in which only completion tokens are scored; indices are positions.

    Example:
        >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
        >>> tok = build_tokenizer(TINY_CORPUS)
        >>> b = next(query_batches([Query("The moon", " shines.")], tok, 8))
        >>> int(b.label_mask.sum()) == len(tok(" shines.")["input_ids"])
        True
    """
    checks.count("batch_size", batch_size)
    pad = padding_id(tokenizer)
    for lo in range(0, len(queries), batch_size):
        encoded = [q.encode(tokenizer) for q in queries[lo : lo + batch_size]]
        seqs = [ids for ids, _ in encoded]
        starts = [start for _, start in encoded]
        yield collate(seqs, starts, list(range(lo, lo + len(seqs))), pad)
