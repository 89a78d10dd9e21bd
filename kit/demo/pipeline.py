"""``influencekit demo``: the shipped model and corpus, end to end, with stages reused on rerun.

Stages: load the shipped model and corpus → fit EK-FAC factors → build the gradient store →
score the built-in queries → write ``report.html``. Each finished stage is recorded in
``DIR/stages.json`` under a key: the SHA-256 of everything its output depends on (model
fingerprint, dataset fingerprint, settings, the keys of the stages it reads). A rerun reuses a
stage whose key matches and whose file still opens, and redoes it otherwise; an interrupted
store build resumes where it stopped (the store itself is crash-safe).

Example:
    >>> run = run_demo("demo-out", quick=True, progress=False)   # doctest: +SKIP
    >>> run.result.top(0, k=3)                                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import themes
from ..analysis.layers import block_number
from ..data import TextDataset, as_queries
from ..errors import InfluenceKitError, ParameterError
from ..factors import Factors
from ..fitting import fit_factors
from ..h5io import temp_name
from ..loading import load_model
from ..models import model_fingerprint
from ..result import InfluenceResult
from ..scoring import score
from ..store import GradientStore
from ..store.layout import parts_dir
from .corpus import DATA_DIR, MAX_LENGTH, even_sample, load_records
from .queries import QUERIES

SIZES = ("small", "large")
QUICK_EXAMPLES = 360  # --quick: an even share of every theme, plus the queries' sources
SETTINGS = {
    "modules": "mlp",
    "strategy": "ekfac",
    "fisher": "sampled",
    "seed": 0,
    "codec": None,  # the kit's default: each layer's codec chosen on the build's probe
    "refine": 100,  # rescore each query's 100 best candidates exactly (see docs/demo.md)
    "batch_size": 8,
}
TOP_K = 10  # rows per query in the summary
REPORT_ROWS = 20  # rows per query in the report's table
THEME_TOP_K = 30  # sequences per query clustered into themes (TF-IDF)
TOKEN_ROWS = 3  # per query, the top sequences shown token by token in the report
OUTPUTS = {
    "factors": "factors.h5",
    "store": "grads.h5",
    "result": "result.h5",
    "report": "report.html",
    "stages": "stages.json",
}


@dataclass
class DemoRun:
    """What a demo run made: the dataset, the result and the paths it wrote."""

    out: Path
    size: str
    quick: bool
    train: TextDataset
    result: InfluenceResult
    queries: list[dict]
    paths: dict[str, Path]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    themes: list = field(default_factory=list)  # per query: influencekit.themes.Themes
    codec: str = ""  # the store's codec string (one spec, or one per layer)


def default_out(size: str = "small", quick: bool = False) -> Path:
    """``influencekit-demo`` (+ ``-large``, ``-quick``) in the working directory."""
    return Path("influencekit-demo" + ("-large" if size == "large" else "") + ("-quick" * quick))


def model_dir(size: str = "small") -> Path:
    """The shipped Hugging Face directory of one model size."""
    if size not in SIZES:
        raise ParameterError("size", size, f"a model size, one of {', '.join(SIZES)}")
    return DATA_DIR / size


def demo_records(quick: bool) -> list[dict]:
    """The corpus, or for ``quick`` an even share per theme plus every query's source quote."""
    records = load_records()
    if not quick:
        return records
    sources = {q["source"] for q in QUERIES if "source" in q}
    keep = {r["id"] for r in even_sample(records, QUICK_EXAMPLES)} | sources
    return [r for r in records if r["id"] in keep]


def run_demo(
    out: str | os.PathLike | None = None,
    *,
    quick: bool = False,
    size: str = "small",
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoRun:
    """Fit, build, score and report on the shipped model and corpus; see the module docstring.

    Example:
        >>> run = run_demo("demo-out", quick=True, progress=False)   # doctest: +SKIP
        >>> sorted(run.paths)                                         # doctest: +SKIP
        ['factors', 'report', 'result', 'stages', 'store']
    """
    out = Path(out) if out is not None else default_out(size, quick)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / filename for name, filename in OUTPUTS.items()}
    stages = _Stages(paths["stages"], log)

    started = time.perf_counter()
    model, tokenizer = load_model(model_dir(size), device=device)
    train = TextDataset.from_records(demo_records(quick), tokenizer, MAX_LENGTH)
    queries = as_queries(QUERIES)
    stages.seconds["load"] = time.perf_counter() - started
    log(
        f"model {size} ({_n_params(model):,} parameters), {len(train)} training sequences, "
        f"{len(queries)} queries"
    )
    inputs = {"model": model_fingerprint(model), "train": train.fingerprint()}
    opts = {"device": device, "progress": progress, "batch_size": SETTINGS["batch_size"]}
    factors_key = _key("factors", inputs, "modules", "strategy", "fisher", "seed")
    # the store keeps gradients in the factors' eigenbasis: new factors, a new store
    store_key = _key("store", {**inputs, "factors": factors_key}, "modules", "codec", "seed")
    result_key = _key("result", {"in": [factors_key, store_key], "q": QUERIES}, "refine")

    factors = stages.run(
        "factors",
        factors_key,
        paths["factors"],
        lambda path: fit_factors(
            model,
            train,
            SETTINGS["modules"],
            strategy=SETTINGS["strategy"],
            fisher=SETTINGS["fisher"],
            seed=SETTINGS["seed"],
            **opts,
        ).save(path),
        Factors.load,
    )
    store = stages.run(
        "store",
        store_key,
        paths["store"],
        lambda path: GradientStore.build(
            path,
            model,
            train,
            modules=factors.modules,
            codec=SETTINGS["codec"],
            factors=factors,
            seed=SETTINGS["seed"],
            **opts,
        ),
        GradientStore.open,
        resumable=True,  # an interrupted build continues where it stopped
    )
    result = stages.run(
        "result",
        result_key,
        paths["result"],
        lambda path: score(model, factors, queries, store, refine=SETTINGS["refine"], **opts).save(
            path
        ),
        InfluenceResult.load,
    )
    run = DemoRun(out, size, quick, train, result, QUERIES, paths, stages.seconds, stages.reused)
    run.codec = store.codec
    started = time.perf_counter()
    run.themes = [
        themes.for_query(result, train, q, top_k=THEME_TOP_K) for q in range(len(QUERIES))
    ]
    stages.seconds["themes"] = time.perf_counter() - started
    started = time.perf_counter()
    write_demo_report(run, model, factors)  # token rows are computed here, for the page
    stages.seconds["report"] = time.perf_counter() - started
    return run


def _codecs(codec: str) -> str:
    """A store's codec string in short: one spec for all layers, or each with its count.

    Example:
        >>> _codecs("lowrank8:31"), _codecs("sparse8:9,lowrank8:2,sparse8:9")
        ('lowrank8:31', 'sparse8:9 on 2 layers, lowrank8:2 on 1 layers')
    """
    counts = Counter(codec.split(","))
    if len(counts) == 1:
        return codec
    return ", ".join(f"{spec} on {n} layers" for spec, n in counts.items())


def write_demo_report(run: DemoRun, model=None, factors=None) -> Path:
    """``report.html`` for a demo run: the explorer's static page (:mod:`influencekit.widgets`),
    with each query's top ``TOKEN_ROWS`` shown token by token when ``model`` and ``factors``
    are given."""
    from ..widgets import InfluenceExplorer

    title = f"influencekit demo: {run.size} model{' (quick)' if run.quick else ''}"
    facts = {
        "model": f"shipped GPT-2 '{run.size}'",
        "training sequences": f"{len(run.train):,} fortunes quotes in "
        f"{len({ex.metadata.get('theme') for ex in run.train})} themes",
        "factors": f"{SETTINGS['strategy']} ({SETTINGS['fisher']} Fisher) on {SETTINGS['modules']}",
        "store": f"codec {_codecs(run.codec)}, top {SETTINGS['refine']} rescored exactly",
        "themes": f"TF-IDF clusters of each query's top {THEME_TOP_K}",
    }
    explorer = InfluenceExplorer(
        run.result,
        run.train,
        model,
        factors,
        run.themes or None,
        queries=run.queries,
        k=REPORT_ROWS,
    )
    return explorer.to_html(run.paths["report"], title=title, facts=facts, token_rows=TOKEN_ROWS)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _key(stage: str, inputs: dict, *settings: str) -> str:
    """SHA-256 of a stage's inputs and the named entries of :data:`SETTINGS`."""
    chosen = {name: SETTINGS[name] for name in settings}
    text = json.dumps({"stage": stage, **inputs, **chosen}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _Stages:
    """``stages.json``: which stage outputs are finished, and for which inputs (key)."""

    def __init__(self, path: Path, log: Callable[[str], None]) -> None:
        self.path = path
        self.log = log
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}
        try:
            self.done = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            self.done = {}  # unreadable bookkeeping only costs recomputation

    def run(self, name: str, key: str, path: Path, make, load, *, resumable: bool = False):
        """``load(path)``, after making it with ``make(path)`` unless it was already made
        under ``key`` and still loads."""
        record = self.done.get(name, {})
        if record.get("key") == key and record.get("finished"):
            try:
                loaded = load(path)
            except (InfluenceKitError, OSError):
                pass  # damaged or deleted since: make it again
            else:
                self.reused.append(name)
                self.seconds[name] = 0.0
                self.log(f"{name}: reusing {path} (inputs unchanged)")
                return loaded
        interrupted = record.get("key") == key and not record.get("finished")
        if not (resumable and interrupted):
            _remove(path)  # made for other inputs, or damaged since: start over
        self._record(name, {"key": key, "finished": False})
        started = time.perf_counter()
        make(path)
        self.seconds[name] = time.perf_counter() - started
        self._record(name, {"key": key, "finished": True, "seconds": round(self.seconds[name], 2)})
        self.log(f"{name}: wrote {path} in {self.seconds[name]:.1f} s")
        return load(path)

    def _record(self, name: str, record: dict) -> None:
        self.done[name] = record
        tmp = temp_name(self.path)
        tmp.write_text(json.dumps(self.done, indent=1))
        os.replace(tmp, self.path)


def _remove(path: Path) -> None:
    """Delete a demo output, with a store's part folder."""
    path.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(path), ignore_errors=True)


def summary(run: DemoRun, k: int = 3) -> str:
    """The terminal summary: per query its top ``k`` sequences with scores, where its source
    quote ranks, the share of the top list from its theme, and the layer shares per block."""
    from ..widgets.views import format_score

    result, train = run.result, run.train
    ranks = source_ranks(run)
    lines = []
    for q, query in enumerate(run.queries):
        top = result.top(q, TOP_K)
        on_theme = top_theme_share(run, q)
        lines.append(
            f"\n[{query['kind']}] {query['id']}: {query['prompt']!r} -> {query['completion']!r}"
        )
        found = (
            f"source {query['source']} ranks {ranks[query['id']]}; " if "source" in query else ""
        )
        blocks = block_shares(result, q)
        lines.append(
            f"  {found}top {TOP_K}: {on_theme:.0%} from its theme; layer shares "
            + " ".join(f"{name}={share:.0%}" for name, share in blocks.items())
        )
        for rank, (i, value) in enumerate(top[:k], start=1):
            ex = train[i]
            text = ex.text if len(ex.text) <= 70 else ex.text[:67] + "..."
            lines.append(f"  {rank}. {format_score(value):>8}  {ex.id:<18} {text}")
        if run.themes:
            lines.append("  themes: " + theme_line(run.themes[q]))
    return "\n".join(lines)


def theme_line(found, n: int = 3) -> str:
    """The ``n`` clusters with the largest influence shares: share and first terms each."""
    order = np.argsort(-found.shares, kind="stable")[:n]
    return " · ".join(f"{found.shares[c]:.0%} {', '.join(found.terms[c][:3])}" for c in order)


def top_theme_share(run: DemoRun, q: int) -> float:
    """The fraction of query ``q``'s top ``TOP_K`` quotes whose theme is one of the query's."""
    query = run.queries[q]
    themes = query["theme"] if isinstance(query["theme"], list) else [query["theme"]]
    top = run.result.top(q, TOP_K)
    return float(np.mean([run.train[i].metadata.get("theme") in themes for i, _ in top]))


def source_ranks(run: DemoRun) -> dict[str, int]:
    """For each query restating a corpus quote: that quote's rank (1 = most influential)."""
    column = {train_id: i for i, train_id in enumerate(run.result.train_ids)}
    return {
        query["id"]: run.result.rank(q, column[query["source"]])
        for q, query in enumerate(run.queries)
        if query.get("source") in column
    }


def block_shares(result: InfluenceResult, q: int) -> dict[str, float]:
    """:meth:`InfluenceResult.layer_shares` of the top ``TOP_K``, summed per transformer block
    (``h0``, ``h1``, ...: :func:`influencekit.analysis.block_number`; a layer name without a
    block number stands alone)."""
    shares: dict[str, float] = {}
    for name, share in zip(result.layers, result.layer_shares(q, TOP_K), strict=True):
        number = block_number(name)
        block = name if number is None else f"h{number}"
        shares[block] = shares.get(block, 0.0) + float(share)
    return shares
