"""Train a wide GPT-NeoX language model on Python's documentation, to measure stores on.

What it makes: a Pythia-shaped causal LM (4 layers, hidden 512, MLP 2048, 8 heads, rotary;
21M parameters, 8.4M of them in the MLPs, whose gradients a store keeps as 2048x513 and
512x2049 matrices with the bias) trained from a seeded initialisation on English prose from
Debian's ``python3.11-doc`` package, with its own 8192-entry byte-level BPE tokenizer. Next
to the model it writes the exact training records, a held-out set and held-out queries, so
stores can be built, scored and compared on one fixed setup.

Why: gradient-store compression must be judged on trained weights of realistic width. The
toy models elsewhere have at most 6M parameters and MLPs a few hundred wide, and freshly
initialised weights give gradients with flatter, easier spectra than trained ones.

Run (from the repository root, after ``apt-get install python3.11-doc``):

    python benchmarks/wide_model.py                        # about 55 minutes on 2 cores
    python benchmarks/wide_model.py --minutes 2 --out DIR  # a quick smoke run

It finishes within ``--minutes`` (default 55; deriving the corpus and tokenizer takes about
20 s, the saving and load check about 15 s): it times a few training steps and sizes the
training to the time left, as one pass over that many records of the pool or as many whole
passes over the pool as fit. If other work slows the steps down later, training stops at
the budget (``recipe.json`` then says the schedule did not complete). A rerun with the same
settings and corpus finds the finished model and exits at once.

Output, in ``$INFLUENCEKIT_CACHE/wide-model`` (``INFLUENCEKIT_CACHE`` defaults to
``~/.cache/influencekit``) or ``--out``: the model (``model.safetensors``, ``config.json``)
and tokenizer, loadable with ``influencekit.load_model``; ``train.jsonl`` (the records trained
on, each seen once per epoch), ``heldout.jsonl``, ``queries.jsonl`` (prompt and completion
halves of held-out paragraphs); ``recipe.json`` (every setting, corpus statistics and hashes,
losses, timings, library versions). The folder appears only once complete.

Example:
    >>> split_words("one two three four five", 3)
    ['one two three', 'four five']
"""

from __future__ import annotations

import os

# Read once, when torch and the BLAS libraries load: fixed here, so step times and the float
# summation order (hence the weights) do not depend on the caller's environment.
THREADS = 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["MKL_NUM_THREADS"] = str(THREADS)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterable, Sequence  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from html.parser import HTMLParser  # noqa: E402
from pathlib import Path  # noqa: E402

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import influencekit as ik  # noqa: E402
from influencekit.data import TextDataset, collate, padding_id  # noqa: E402
from influencekit.tiny import build_tokenizer  # noqa: E402
from influencekit.training import lr_at, train_lm  # noqa: E402

DOC_PACKAGE = "python3.11-doc"
DOC_ROOT = Path("/usr/share/doc/python3.11/html")
# Index, search and table-of-contents pages: lists of links, not running text.
SKIP_PAGES = ("contents.html", "genindex", "py-modindex.html", "search.html")
# Elements whose text is not prose: code, tables, navigation, in-page tables of contents.
SKIP_TAGS = {"pre", "table", "nav", "script", "style"}
SKIP_DIV_CLASSES = {"highlight", "toctree-wrapper", "contents", "sphinxsidebar", "related"}
PAD_TOKEN = "<|padding|>"
MAKER = "benchmarks/wide_model.py"
TRAIN_SHARE = 0.92  # of the time left for training: headroom for other work on the machine
FIXED_SECONDS = 45  # saving, hashing and the load check, measured at about 15 s
TIMED_STEPS = 4


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the output; a finished model with equal settings is reused."""

    minutes: float
    seed: int = 0
    doc_root: str = str(DOC_ROOT)
    # Corpus: paragraphs of at least min_words; records pack a page's consecutive paragraphs
    # until record_words (about 64-128 tokens), never past max_words.
    min_words: int = 12
    record_words: int = 56
    max_words: int = 92
    min_letter_share: float = 0.7
    heldout_records: int = 512
    queries: int = 32
    # Model and tokenizer: Pythia's shape and defaults (parallel residual, gelu, partial
    # rotary, untied embeddings), at width 512; or (--narrow) a Llama.
    arch: str = "gpt-neox"
    vocab_size: int = 8192
    layers: int = 4
    hidden: int = 512
    intermediate: int = 2048
    heads: int = 8
    max_positions: int = 256
    # Training: as many steps as the time allows (see plan_training).
    max_length: int = 128
    batch_size: int = 16
    peak_lr: float = 1e-3
    warmup_share: float = 0.05
    weight_decay: float = 0.01
    clip: float = 1.0
    threads: int = THREADS


# ---------------------------------------------------------------------------------------------
# Corpus: paragraphs of prose from the documentation's HTML pages


class ProseParser(HTMLParser):
    """The text of every ``<p>`` in a Sphinx page's main body, outside code, tables and
    tables of contents; navigation, sidebars and footers lie outside the body."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[tuple[str, str]] = []  # (tag, "body" | "skip" | "para" | "")
        self._parts: list[str] = []

    def _inside(self, kind: str) -> bool:
        return any(k == kind for _, k in self._stack)

    def _kind(self, tag: str, attrs: dict[str, str | None]) -> str:
        classes = set((attrs.get("class") or "").split())
        if tag == "div" and attrs.get("role") == "main":
            return "body"
        if tag in SKIP_TAGS or (tag == "div" and classes & SKIP_DIV_CLASSES):
            return "skip"
        if tag == "p" and self._inside("body") and not self._inside("skip"):
            return "para"
        return ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # Only elements Sphinx always closes are tracked, so the stack stays balanced.
        if tag in SKIP_TAGS or tag in ("div", "p"):
            kind = self._kind(tag, dict(attrs))
            if kind == "para":
                self._parts = []
            self._stack.append((tag, kind))

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _ in self._stack):
            return
        while self._stack:
            open_tag, kind = self._stack.pop()
            if kind == "para":
                self.paragraphs.append("".join(self._parts))
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        if self._inside("para") and not self._inside("skip"):
            self._parts.append(data)


def missing_docs_message(root: Path) -> str:
    return (
        f"{root} holds no HTML pages: install the documentation first, e.g.\n"
        f"    apt-get install -y {DOC_PACKAGE}\n"
        "(this script installs nothing itself)"
    )


def doc_pages(root: Path) -> list[Path]:
    """The documentation's HTML pages in path order, without indexes and Sphinx's own files."""
    if not root.is_dir():
        sys.exit(missing_docs_message(root))
    pages = sorted(
        p
        for p in root.rglob("*.html")
        if not any(part.startswith("_") for part in p.relative_to(root).parts)
        and not p.name.startswith(SKIP_PAGES)
    )
    if not pages:
        sys.exit(missing_docs_message(root))
    return pages


def clean_text(text: str) -> str:
    """NFC form, every non-printable character (newlines, tabs, controls) as a space, and
    whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def is_prose(text: str, settings: Settings) -> bool:
    """Long enough to be running text, and mostly letters (not a code fragment or a list)."""
    if len(text.split()) < settings.min_words:
        return False
    visible = [ch for ch in text if not ch.isspace()]
    return sum(ch.isalpha() for ch in visible) >= settings.min_letter_share * len(visible)


def page_paragraphs(path: Path, settings: Settings) -> list[str]:
    parser = ProseParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    cleaned = (clean_text(p) for p in parser.paragraphs)
    return [p for p in cleaned if is_prose(p, settings)]


def derive_paragraphs(settings: Settings) -> list[tuple[str, str]]:
    """``(page path, paragraph)`` over all pages in path order, each paragraph kept only at
    its first occurrence (the docs repeat notes and boilerplate across pages)."""
    root = Path(settings.doc_root)
    seen: set[str] = set()
    found = []
    for page in doc_pages(root):
        source = page.relative_to(root).as_posix()
        for paragraph in page_paragraphs(page, settings):
            if paragraph not in seen:
                seen.add(paragraph)
                found.append((source, paragraph))
    return found


def split_words(text: str, limit: int) -> list[str]:
    """``text`` cut into the fewest consecutive pieces of at most ``limit`` words, of equal
    size give or take one (so no piece is a stub of a few words)."""
    words = text.split()
    size = math.ceil(len(words) / max(1, math.ceil(len(words) / limit)))
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


def split_long(paragraph: str, limit: int) -> list[str]:
    """A paragraph of more than ``limit`` words as pieces of whole sentences of at most
    ``limit`` words (a longer sentence is cut by words), so no record is truncated much."""
    if len(paragraph.split()) <= limit:
        return [paragraph]
    pieces: list[str] = []
    current: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'`])", paragraph):
        if current and len(" ".join([*current, sentence]).split()) > limit:
            pieces.append(" ".join(current))
            current = []
        if len(sentence.split()) > limit:
            pieces.extend(split_words(sentence, limit))
        else:
            current.append(sentence)
    if current:
        pieces.append(" ".join(current))
    return pieces


def page_records(source: str, paragraphs: list[str], settings: Settings) -> list[dict]:
    """One page's paragraphs packed, in order, into records of about ``record_words``."""
    records: list[dict] = []
    window: list[str] = []

    def close() -> None:
        if window:
            text = "\n".join(window)
            records.append({"id": f"{source}#{len(records)}", "text": text, "source": source})
            window.clear()

    for paragraph in paragraphs:
        for piece in split_long(paragraph, settings.max_words):
            size = len(piece.split())
            if window and len("\n".join(window).split()) + size > settings.max_words:
                close()
            window.append(piece)
            if len("\n".join(window).split()) >= settings.record_words:
                close()
    close()
    return records


def derive_records(settings: Settings) -> list[dict]:
    """Every record of the corpus, pages in path order, each page's records in page order."""
    by_page: dict[str, list[str]] = {}
    for source, paragraph in derive_paragraphs(settings):
        by_page.setdefault(source, []).append(paragraph)
    return [r for source, paras in by_page.items() for r in page_records(source, paras, settings)]


def stable_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_heldout(records: list[dict], settings: Settings) -> tuple[list[dict], list[dict]]:
    """``(training pool, held-out)``: the held-out records are those with the lowest hash of
    their id, so the split does not depend on the order or the number of records."""
    chosen = set(sorted(stable_key(r["id"]) for r in records)[: settings.heldout_records])
    heldout = [r for r in records if stable_key(r["id"]) in chosen]
    pool = [r for r in records if stable_key(r["id"]) not in chosen]
    return pool, heldout


def make_queries(heldout: list[dict], settings: Settings) -> list[dict]:
    """Held-out single paragraphs of 16 to 64 words, cut in half by words: the prompt is the
    first half, the completion (with its leading space) the rest; from distinct pages."""
    candidates = sorted(
        (r for r in heldout if "\n" not in r["text"] and 16 <= len(r["text"].split()) <= 64),
        key=lambda r: stable_key(r["id"]),
    )
    queries: list[dict] = []
    pages: set[str] = set()
    for record in candidates:
        if record["source"] in pages or len(queries) == settings.queries:
            continue
        pages.add(record["source"])
        words = record["text"].split()
        half = len(words) // 2
        queries.append(
            {
                "id": f"q{len(queries):02d}",
                "prompt": " ".join(words[:half]),
                "completion": " " + " ".join(words[half:]),
                "source": record["source"],
                "record": record["id"],
            }
        )
    return queries


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pick_training(pool: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` records of the pool drawn with ``seed``, kept in pool order."""
    if count >= len(pool):
        return list(pool)
    picked = sorted(random.Random(seed).sample(range(len(pool)), count))
    return [pool[i] for i in picked]


# ---------------------------------------------------------------------------------------------
# Tokenizer and model


def train_tokenizer(texts: list[str], settings: Settings):
    """The project's byte-level BPE (eos ``<|endoftext|>``) plus a pad token of its own, as
    Pythia has, so padding is never confused with an end of text; ``vocab_size`` in all."""
    tokenizer = build_tokenizer(texts, vocab_size=settings.vocab_size - 1)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def new_model(tokenizer, settings: Settings) -> torch.nn.Module:
    """A freshly initialised GPT-NeoX (seeded) with Pythia's defaults at this width, or a
    Llama (``arch="llama"``: gated MLP, RMSNorm, rotary, untied embeddings)."""
    torch.manual_seed(settings.seed)
    if settings.arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=settings.hidden,
            num_hidden_layers=settings.layers,
            num_attention_heads=settings.heads,
            intermediate_size=settings.intermediate,
            max_position_embeddings=settings.max_positions,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        intermediate_size=settings.intermediate,
        max_position_embeddings=settings.max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Timing, planning and training


def seconds_per_step(tokenizer, data: TextDataset, settings: Settings) -> float:
    """Mean wall time of one ``train_lm`` step on real batches, after one warm-up step, on a
    throwaway model of the same shape."""
    model = new_model(tokenizer, settings)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))
    size = settings.batch_size
    warmup = data.subset(rows[:size].tolist())
    timed = data.subset(rows[size : size * (1 + TIMED_STEPS)].tolist())
    options = {"batch_size": size, "peak_lr": settings.peak_lr, "warmup": 1}
    train_lm(model, warmup, epochs=1, **options)
    started = time.perf_counter()
    train_lm(model, timed, epochs=1, **options)
    return (time.perf_counter() - started) / TIMED_STEPS


@dataclasses.dataclass
class Plan:
    step_seconds: float
    eval_seconds: float  # the held-out pass, estimated
    fitting_steps: int  # steps that fit in the time left
    steps: int  # steps planned: whole passes over ``records``
    records: int
    epochs: int


def plan_training(
    step_seconds: float, seconds_left: float, pool_size: int, heldout_size: int, s: Settings
) -> Plan:
    """As many steps as fit in the time left, after the held-out pass (a forward costs about a
    third of a step) and the saving: one pass over that many records, or as many whole passes
    over the pool as fit when it is smaller."""
    eval_seconds = math.ceil(heldout_size / s.batch_size) * step_seconds / 3
    train_seconds = max(0.0, (seconds_left - eval_seconds - FIXED_SECONDS) * TRAIN_SHARE)
    fitting = max(8, int(train_seconds / step_seconds))  # a smoke run still takes a few steps
    pool_steps = math.ceil(pool_size / s.batch_size)
    epochs = max(1, fitting // pool_steps)
    records = min(pool_size, fitting * s.batch_size)
    steps = epochs * math.ceil(records / s.batch_size)
    return Plan(step_seconds, eval_seconds, fitting, steps, records, epochs)


class OutOfTime(Exception):
    """Raised from the training hook when the time budget runs out mid-training."""


class LossReporter:
    """A forward hook that prints the mean training loss every ``every`` steps (``train_lm``
    itself reports only per epoch), with the learning rate and the time to go; it stops the
    training (raising :class:`OutOfTime`) once ``stop_at`` has passed, since other work on
    the machine can slow the steps down well after they were timed."""

    def __init__(self, plan: Plan, settings: Settings, warmup: int, stop_at: float) -> None:
        self.total, self.every = plan.steps, max(1, plan.steps // 40)
        self.settings, self.warmup, self.stop_at = settings, warmup, stop_at
        self.step, self.window, self.history = 0, [], []
        self.started = time.perf_counter()

    def __call__(self, module, args, output) -> None:
        if not module.training:
            return
        if time.perf_counter() > self.stop_at:
            # Raised after the forward, before the backward: the weights are those of the
            # last whole step.
            raise OutOfTime
        self.window.append(float(output.loss.detach()))
        self.step += 1
        if self.step % self.every == 0 or self.step == self.total:
            self.report()

    def report(self) -> None:
        elapsed = time.perf_counter() - self.started
        mean = sum(self.window) / len(self.window)
        lr = lr_at(self.step - 1, self.total, self.settings.peak_lr, self.warmup)
        left = elapsed / self.step * (self.total - self.step)
        self.history.append({"step": self.step, "loss": round(mean, 4), "seconds": round(elapsed)})
        print(
            f"  step {self.step:5d}/{self.total}  train loss {mean:.3f}  lr {lr:.2e}  "
            f"{elapsed / 60:5.1f} min, {left / 60:.1f} min to go",
            flush=True,
        )
        self.window = []


def train(model, data: TextDataset, plan: Plan, settings: Settings, stop_at: float):
    """Train with ``train_lm``; returns the reporter and whether the whole schedule ran."""
    warmup = max(1, round(settings.warmup_share * plan.steps))
    reporter = LossReporter(plan, settings, warmup, stop_at)
    handle = model.register_forward_hook(reporter)
    try:
        train_lm(
            model, data, epochs=plan.epochs, batch_size=settings.batch_size,
            peak_lr=settings.peak_lr, warmup=warmup, seed=settings.seed,
            weight_decay=settings.weight_decay, clip=settings.clip,
        )  # fmt: skip
    except OutOfTime:
        print(
            f"  out of time: stopped after step {reporter.step}/{plan.steps}, before the "
            "learning rate had fully decayed",
            flush=True,
        )
        return reporter, False
    finally:
        handle.remove()
    return reporter, True


# ---------------------------------------------------------------------------------------------
# Losses


@torch.no_grad()
def mean_token_loss(model, data: TextDataset, batch_size: int) -> float:
    """Next-token cross-entropy (nats) averaged over every predicted token of ``data``."""
    model.eval()
    pad_id, total, count = padding_id(data.tokenizer), 0.0, 0
    for start in range(0, len(data), batch_size):
        rows = list(range(start, min(start + batch_size, len(data))))
        batch = collate([data[i].input_ids for i in rows], [1] * len(rows), rows, pad_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = batch.input_ids.roll(-1, dims=1)  # the wrapped last column is never scored
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
        ).view_as(targets)
        total += float(nll[batch.label_mask].sum())
        count += int(batch.label_mask.sum())
    return total / count


def truncated_count(records: list[dict], tokenizer, max_length: int) -> int:
    """How many records have more than ``max_length`` tokens (their tail is not trained on)."""
    lengths = (len(ids) for ids in tokenizer([r["text"] for r in records])["input_ids"])
    return sum(n > max_length for n in lengths)


def token_counts(data: TextDataset) -> Counter:
    return Counter(t for ex in data.examples for t in ex.input_ids)


def unigram_entropy(counts: Counter) -> float:
    """Entropy (nats per token) of the training tokens' unigram distribution: the loss of the
    best model that ignores context."""
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def unigram_cross_entropy(counts: Counter, data: TextDataset, vocab: int) -> float:
    """The held-out predicted tokens' loss under the training unigram (add-one smoothed)."""
    n = sum(counts.values()) + vocab
    targets = [t for ex in data.examples for t in ex.input_ids[1:]]
    return -sum(math.log((counts[t] + 1) / n) for t in targets) / len(targets)


# ---------------------------------------------------------------------------------------------
# Output folder: reuse, staging and atomic publication


# --narrow: a Llama of narrow MLP (384 x 1024, 4 blocks) trained on records of at most 48
# tokens, where short gradients (rank <= 48) and narrow layers test a store's codec choice.
NARROW = {
    "arch": "llama",
    "hidden": 384,
    "intermediate": 1024,
    "heads": 6,
    "max_length": 48,
    "min_words": 8,
    "record_words": 24,
    "max_words": 34,
    "batch_size": 32,
}


def default_out(narrow: bool = False) -> Path:
    cache = os.environ.get("INFLUENCEKIT_CACHE") or "~/.cache/influencekit"
    return Path(cache).expanduser() / ("narrow-model" if narrow else "wide-model")


def read_recipe(out: Path) -> dict | None:
    try:
        return json.loads((out / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_reusable(recipe: dict | None, settings: Settings, corpus_sha256: str) -> bool:
    return (
        recipe is not None
        and recipe.get("finished") is True
        and recipe.get("settings") == dataclasses.asdict(settings)
        and recipe.get("corpus", {}).get("corpus_sha256") == corpus_sha256
    )


def check_replaceable(out: Path) -> None:
    """Refuse to replace a folder this script did not make (``--out`` pointing elsewhere)."""
    if out.exists() and any(out.iterdir()):
        recipe = read_recipe(out)
        if recipe is None or recipe.get("maker") != MAKER:
            sys.exit(f"{out} exists and was not made by {MAKER}; choose another --out")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Staging folders left by interrupted runs (their process is gone)."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def staging_folder(out: Path) -> Path:
    folder = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out`` by renames, so ``out`` is either the old
    folder, absent for an instant, or the complete new one; never a half-written model."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return sha256_bytes(data)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "influencekit": ik.__version__,
    }


# ---------------------------------------------------------------------------------------------
# The load check


def check_load(out: Path, queries: Sequence[dict]) -> dict:
    """Load the folder as users will, run one forward on a query and list the MLP gradients."""
    model, tokenizer = ik.load_model(out, device="cpu")
    text = queries[0]["prompt"] + queries[0]["completion"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        sys.exit(f"{out}: the loaded model gives non-finite logits")
    layers = ik.select_modules(model, "mlp")
    print(f"load check: ik.load_model({out}): {type(model).__name__}, logits {tuple(logits.shape)}")
    print(f"  parameters: {parameter_count(model):,}")
    for layer in layers:
        print(f"  {layer.name}: gradient {layer.grad_shape[0]} x {layer.grad_shape[1]}")
    return {
        "parameters": parameter_count(model),
        "mlp_gradients": {layer.name: list(layer.grad_shape) for layer in layers},
    }


# ---------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=55.0, help="time budget (default 55)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--narrow",
        action="store_true",
        help="a narrow Llama on 48-token records instead (default folder narrow-model)",
    )
    return parser.parse_args(argv)


def corpus_files(settings: Settings) -> tuple[list[dict], list[dict], list[dict], dict]:
    """``(pool, held-out, queries, statistics)`` derived from the documentation."""
    records = derive_records(settings)
    pool, heldout = split_heldout(records, settings)
    queries = make_queries(heldout, settings)
    stats = {
        "doc_pages": len({r["source"] for r in records}),
        "records": len(records),
        "pool_records": len(pool),
        "pool_words": sum(len(r["text"].split()) for r in pool),
        "pool_sha256": sha256_bytes(jsonl_bytes(pool)),
        "heldout_records": len(heldout),
        "queries": len(queries),
    }
    parts = (jsonl_bytes(pool), jsonl_bytes(heldout), jsonl_bytes(queries))
    stats["corpus_sha256"] = sha256_bytes(b"".join(sha256_bytes(p).encode() for p in parts))
    return pool, heldout, queries, stats


def report_losses(heldout_loss: float, entropy: float, unigram_heldout: float) -> bool:
    below = entropy - heldout_loss
    verdict = "clearly below" if below > 1.0 else "NOT clearly below"
    print(
        f"held-out loss {heldout_loss:.3f} nats/token; unigram entropy of the training tokens "
        f"{entropy:.3f} (the unigram's loss on the held-out tokens {unigram_heldout:.3f}): "
        f"{verdict} the unigram entropy, by {below:.3f} nats",
        flush=True,
    )
    return below > 1.0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.minutes * 60
    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()  # keep the log to one line per event
    settings = Settings(minutes=args.minutes, **(NARROW if args.narrow else {}))
    out = (args.out or default_out(args.narrow)).expanduser().resolve()

    pool, heldout, queries, stats = corpus_files(settings)
    print(
        f"corpus: {stats['doc_pages']} pages of {settings.doc_root} -> {stats['records']} records "
        f"({stats['pool_records']} training pool, {stats['heldout_records']} held out, "
        f"{stats['queries']} queries), {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    if is_reusable(read_recipe(out), settings, stats["corpus_sha256"]):
        print(f"{out} already holds a finished model of this recipe: reusing it")
        check_load(out, queries)
        return
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)

    tokenizer = train_tokenizer([r["text"] for r in pool], settings)
    pool_tokens = sum(len(ids) for ids in tokenizer([r["text"] for r in pool])["input_ids"])
    stats.update({"pool_tokens": pool_tokens, "vocab_size": len(tokenizer)})
    print(
        f"tokenizer: {len(tokenizer)} entries, pool {pool_tokens:,} tokens "
        f"({pool_tokens / stats['pool_words']:.2f} per word), "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )

    pool_data = TextDataset.from_records(pool, tokenizer, settings.max_length)
    heldout_data = TextDataset.from_records(heldout, tokenizer, settings.max_length)
    step_seconds = seconds_per_step(tokenizer, pool_data, settings)
    seconds_left = deadline - time.perf_counter()
    plan = plan_training(step_seconds, seconds_left, len(pool), len(heldout), settings)
    print(
        f"timing: {step_seconds:.2f} s per step of {settings.batch_size} x <= "
        f"{settings.max_length} tokens; {seconds_left / 60:.1f} min left, {plan.fitting_steps} "
        f"steps fit -> {plan.steps} steps: {plan.records} records, {plan.epochs} epoch(s)",
        flush=True,
    )

    train_records = pick_training(pool, plan.records, settings.seed)
    by_id = {ex.id: i for i, ex in enumerate(pool_data.examples)}
    train_data = pool_data.subset([by_id[r["id"]] for r in train_records])
    counts = token_counts(train_data)
    stats.update(
        {
            "train_records": len(train_data),
            "train_tokens": train_data.n_tokens,
            "train_truncated": truncated_count(train_records, tokenizer, settings.max_length),
            "train_distinct_tokens": len(counts),
            "heldout_tokens": heldout_data.n_tokens,
        }
    )
    model = new_model(tokenizer, settings)
    print(
        f"model: {type(model).__name__}, {parameter_count(model):,} parameters; training on "
        f"{stats['train_records']} records, {stats['train_tokens']:,} tokens",
        flush=True,
    )
    train_started = time.perf_counter()
    stop_at = deadline - plan.eval_seconds - FIXED_SECONDS
    reporter, completed = train(model, train_data, plan, settings, stop_at)
    train_seconds = time.perf_counter() - train_started

    heldout_loss = mean_token_loss(model, heldout_data, settings.batch_size)
    entropy = unigram_entropy(counts)
    unigram_heldout = unigram_cross_entropy(counts, heldout_data, len(tokenizer))
    beats_unigram = report_losses(heldout_loss, entropy, unigram_heldout)

    staging = staging_folder(out)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    hashes = {
        "train.jsonl": write_file(staging / "train.jsonl", jsonl_bytes(train_records)),
        "heldout.jsonl": write_file(staging / "heldout.jsonl", jsonl_bytes(heldout)),
        "queries.jsonl": write_file(staging / "queries.jsonl", jsonl_bytes(queries)),
        "model.safetensors": file_sha256(staging / "model.safetensors"),
    }
    loaded = check_load(staging, queries)
    recipe = {
        "maker": MAKER,
        "finished": True,
        "settings": dataclasses.asdict(settings),
        "corpus": {**stats, "sha256": hashes},
        "model": {"type": "GPTNeoXForCausalLM", **loaded},
        "training": {
            "step_seconds_measured": round(step_seconds, 3),
            "fitting_steps": plan.fitting_steps,
            "planned_steps": plan.steps,
            "steps": reporter.step,
            "schedule_completed": completed,
            "epochs": plan.epochs,
            "train_seconds": round(train_seconds),
        },
        "losses": {
            "train": reporter.history,
            "heldout_mean_per_token": round(heldout_loss, 4),
            "unigram_entropy": round(entropy, 4),
            "unigram_heldout_cross_entropy": round(unigram_heldout, 4),
            "clearly_below_unigram": beats_unigram,
        },
        "wall_seconds": round(time.perf_counter() - started),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    publish(staging, out)
    print(f"wrote {out} in {recipe['wall_seconds'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
