"""Explorer responsiveness: Python and browser timings, and binary buffers against JSON lists.

Builds a synthetic ``InfluenceResult`` (50 queries x 10 000 training sequences x 8 GPT-2-named
layers, heavy-tailed seeded scores) with a dataset of seeded English-ish texts in 12 themes,
then measures, in one run:

- Python (``time.perf_counter``, median of several repeats): building the
  ``InfluenceExplorer``; switching query (``explorer.query = q``, each query's first visit);
  selecting a row (``explorer.select(r)``; no model, so no token scores); the first opening
  of the Themes tab (TF-IDF clustering of every query's top 20 with ``themes.across``, on a
  fresh explorer each repeat; again with one BLAS / OpenMP thread via ``threadpoolctl``, as
  k-means' and LAPACK's threads contend with other processes on a shared machine, which can
  multiply this step's time); a query switch with the Themes tab open; ``to_html`` of
  every query (and the page's size);
- what travels to the browser: the bytes of every binary buffer in the explorer's synced
  widget state, and in the update messages of one query switch (with each buffer's
  size), against the same arrays written as JSON lists (``json.dumps(array.tolist())``);
- the browser (headless Debian chromium via Playwright, the exported page from ``file://``):
  first render (navigation start until the table's rows are in the DOM and the next frame
  has run), a query switch (``#ik-query`` changed), a row click, opening the Themes tab,
  a query switch with the Themes tab open, and hovering points of the theme map. Each is
  timed in the page with ``performance.now()`` from the event until a
  ``requestAnimationFrame`` + ``setTimeout`` (the frame after the redraw, so up to one
  16 ms frame of alignment is included); ``layout ms`` is the same step until a forced
  synchronous layout, without waiting for the frame.

- a row click on the shipped small demo model (200 quotes, one query), which computes the
  pair's token scores, and the same click again, served from the explorer's cache
  (``--no-tokens`` skips it).

``budget`` is the median against a 100 ms interactive budget (median / 100 ms): below 1x
feels immediate. The machine is shared and noisy: read the medians and ratios, not single
timings, and expect a few ms of jitter.

``--profile`` adds a cProfile of each Python step slower than the budget (top functions by
own time, and influencekit's by cumulative time).

Usage:
    python benchmarks/widgets.py                      # 10 000 sequences x 50 queries (~1 min)
    python benchmarks/widgets.py --quick              # 1 000 sequences x 10 queries
    python benchmarks/widgets.py --train 20000 --queries 100 --repeats 7
    python benchmarks/widgets.py --no-browser --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import ipywidgets
import numpy as np
from threadpoolctl import threadpool_limits

from influencekit import InfluenceResult
from influencekit.data import Example
from influencekit.widgets import InfluenceExplorer

BUDGET_MS = 100.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAYERS = [f"transformer.h.{b}.mlp.{name}" for b in range(4) for name in ("c_fc", "c_proj")]
THEMES = {
    "computers": "computer software program code memory processor screen keyboard network "
    "server database compiler laptop algorithm",
    "food": "bread cheese soup kitchen recipe oven flavour garlic butter dinner sauce "
    "vegetables bakery spices",
    "law": "court judge lawyer contract statute verdict appeal evidence trial jury "
    "plaintiff ruling attorney justice",
    "sports": "football match goal player team coach league season stadium referee "
    "tournament score training victory",
    "music": "song guitar piano concert melody rhythm orchestra singer album chorus "
    "violin composer stage band",
    "weather": "rain storm cloud wind forecast thunder snow temperature sunshine humidity "
    "frost drought breeze climate",
    "finance": "market stocks bonds bank interest investor profit shares currency loan "
    "budget inflation trader dividend",
    "medicine": "doctor patient hospital vaccine disease surgery nurse treatment symptom "
    "clinic medicine diagnosis therapy virus",
    "travel": "journey train airport hotel passport luggage ticket border tourist "
    "harbour voyage map guide island",
    "space": "planet orbit rocket galaxy telescope astronaut moon comet satellite star "
    "nebula launch gravity cosmos",
    "gardening": "garden soil seeds flowers roses compost hedge tomato greenhouse spade "
    "bloom pruning lawn orchard",
    "history": "empire king castle battle century dynasty treaty ancient ruins "
    "revolution monarch archive chronicle war",
}
COMMON = (
    "the a of and to in on with for from by as that this it was is were be had they people "
    "often said every one day new old many small great long after before again always"
).split()


# -- synthetic data ---------------------------------------------------------------------------


def sentence_text(rng: np.random.Generator, theme: str) -> str:
    """60-300 characters of sentences mixing the theme's words with common ones."""
    words = THEMES[theme].split()
    target = int(rng.integers(60, 301))
    sentences, length = [], 0
    while length < target:
        n = int(rng.integers(5, 14))
        picks = [
            str(rng.choice(words)) if rng.random() < 0.45 else str(rng.choice(COMMON))
            for _ in range(n)
        ]
        sentence = " ".join(picks).capitalize() + "."
        sentences.append(sentence)
        length += len(sentence) + 1
    text = " ".join(sentences)
    if len(text) > 300:  # cut at a word boundary, keep at least 60 characters
        text = text[: text.rfind(" ", 60, 300)].rstrip(".,") + "."
    return text


def synthetic(n_train: int, n_queries: int, seed: int = 0):
    """``(result, dataset, queries)``: heavy-tailed scores, themed texts, query dicts."""
    rng = np.random.default_rng(seed)
    themes = list(THEMES)
    theme_of = rng.integers(0, len(themes), n_train)
    dataset = [
        Example(i, f"seq{i:05d}", sentence_text(rng, themes[t]), (), {"theme": themes[t]})
        for i, t in enumerate(theme_of)
    ]
    # Student-t (df 2) per pair, spread over layers with a per-layer scale, plus layer noise:
    # a few pairs score far above the rest, as real influence does.
    shared = rng.standard_t(2, (n_queries, n_train, 1))
    scale = rng.lognormal(0.0, 0.6, (1, 1, len(LAYERS)))
    layer_scores = shared * scale + 0.3 * rng.standard_t(3, (n_queries, n_train, len(LAYERS)))
    result = InfluenceResult(
        layer_scores,
        list(LAYERS),
        [ex.id for ex in dataset],
        [f"q{q:02d}" for q in range(n_queries)],
    )
    queries = []
    for q in range(n_queries):
        theme = themes[q % len(themes)]
        words = THEMES[theme].split()
        queries.append(
            {
                "id": f"q{q:02d}",
                "prompt": f"Tell me about the {words[q % len(words)]} and the",
                "completion": f" {words[(q + 3) % len(words)]}.",
                "theme": theme,
            }
        )
    return result, dataset, queries


# -- Python timings ---------------------------------------------------------------------------


def ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def profile(fn, lines: int = 10) -> str:
    """Top functions of one call of ``fn``: by own time, and influencekit's by cumulative."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(r"/(kit|widgets|store)/", lines)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def python_steps(result, dataset, queries, repeats: int, out: Path, do_profile: bool):
    """``({step: [ms, ...]}, page path, explorer with themes, profiles)``."""
    n_queries = len(queries)
    build = lambda: InfluenceExplorer(result, dataset, queries=queries)  # noqa: E731
    times: dict[str, list[float]] = {}
    profiles: dict[str, str] = {}

    times["python: build explorer"] = [ms(build) for _ in range(repeats)]

    explorer = build()
    visits = [q % n_queries for q in range(1, repeats + 1)]
    times["python: query switch (first visit)"] = [
        ms(lambda q=q: setattr(explorer, "query", q)) for q in visits
    ]
    revisits = [q % n_queries for q in range(repeats + 1, 1, -1)]
    times["python: query switch (revisit)"] = [
        ms(lambda q=q: setattr(explorer, "query", q)) for q in revisits
    ]
    ranks = [2 + r % 18 for r in range(repeats)]
    times["python: select row"] = [ms(lambda r=r: explorer.select(r)) for r in ranks]

    opened = []
    for _ in range(max(2, repeats // 2)):
        fresh = build()
        opened.append(ms(lambda fresh=fresh: setattr(fresh.tabs, "selected_index", 2)))
    times["python: open Themes tab (first)"] = opened
    # the same with one BLAS / OpenMP thread: on a busy machine, k-means' and LAPACK's
    # threads wait on each other, and this row shows the cost without that
    single = []
    with threadpool_limits(limits=1):
        for _ in range(max(2, repeats // 2)):
            other = build()
            single.append(ms(lambda other=other: setattr(other.tabs, "selected_index", 2)))
    times["python: open Themes tab, 1 thread"] = single
    themed = fresh  # its themes are clustered and its Themes tab is open
    times["python: query switch, Themes open"] = [
        ms(lambda q=q: setattr(themed, "query", q)) for q in visits
    ]

    page = out / "explorer.html"
    times["python: to_html (every query)"] = [
        ms(lambda: themed.to_html(page)) for _ in range(max(2, repeats // 2))
    ]

    if do_profile:
        steps = {
            "python: build explorer": build,
            "python: query switch (first visit)": lambda: setattr(explorer, "query", n_queries - 1),
            "python: open Themes tab (first)": lambda: setattr(build().tabs, "selected_index", 2),
            "python: query switch, Themes open": lambda: setattr(themed, "query", n_queries - 2),
            "python: to_html (every query)": lambda: themed.to_html(page),
        }
        for step, fn in steps.items():
            if statistics.median(times[step]) > BUDGET_MS:
                profiles[step] = profile(fn)
    return times, page, themed, profiles


# -- what travels to the browser --------------------------------------------------------------

DTYPES = {"sizes": "<i4", "assignment": "<i4", "highlight": "u1", "points": "<f4"}


def dtype_of(widget, key: str) -> str:
    """The element type of a binary trait (ThemeClusters has int32 and float32 ones)."""
    return DTYPES.get(key, "<f8") if type(widget).__name__ == "ThemeClusters" else "<f8"


def as_json_list(raw, dtype: str) -> int:
    """Bytes of ``raw`` written as a JSON list of numbers."""
    return len(json.dumps(np.frombuffer(bytes(raw), dtype).tolist()).encode())


def widget_tree(root) -> list:
    found, stack, seen = [], [root], set()
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        found.append(widget)
        stack.extend(getattr(widget, "children", ()))
    return found


def state_sizes(explorer) -> tuple[int, int, int]:
    """``(binary bytes, the same as JSON lists, buffers)`` over every widget's synced state."""
    binary = as_json = count = 0
    for widget in widget_tree(explorer):
        for key, value in widget.get_state().items():
            if isinstance(value, (bytes, memoryview)):
                binary += len(value)
                as_json += as_json_list(value, dtype_of(widget, key))
                count += 1
    return binary, as_json, count


def switch_messages(explorer, q: int) -> dict:
    """The update messages one query switch sends: their JSON, buffers and buffers as lists."""
    sent = []
    original = ipywidgets.Widget._send

    def record(widget, msg, buffers=None):
        sent.append((widget, msg, list(buffers or [])))
        return original(widget, msg, buffers=buffers)

    with mock.patch.object(ipywidgets.Widget, "_send", record):
        explorer.query = q
    sizes = {"messages": len(sent), "json": 0, "binary": 0, "as_json": 0, "buffers": 0}
    sizes["each"] = []  # "Class.trait binary/JSON-list bytes", largest first
    for widget, msg, buffers in sent:
        sizes["json"] += len(json.dumps(msg, default=str).encode())
        paths = msg.get("buffer_paths", [])
        for path, raw in zip(paths, buffers, strict=True):
            binary = len(memoryview(raw).cast("B"))
            listed = as_json_list(raw, dtype_of(widget, str(path[-1])))
            sizes["binary"] += binary
            sizes["as_json"] += listed
            sizes["buffers"] += 1
            sizes["each"].append((binary, f"{type(widget).__name__}.{path[-1]} {binary}/{listed}"))
    sizes["each"] = [text for _, text in sorted(sizes["each"], reverse=True)]
    return sizes


# -- the browser ------------------------------------------------------------------------------

# Set before the page's scripts run: notes when the table's first row enters the DOM, then
# when the frame after it has run.
FIRST_RENDER = """
window.__ik = {};
new MutationObserver((_, observer) => {
  if (!document.querySelector("#ik-table tr[data-row]")) return;
  observer.disconnect();
  window.__ik.rows = performance.now();
  requestAnimationFrame(() => setTimeout(() => { window.__ik.frame = performance.now(); }, 0));
}).observe(document, { childList: true, subtree: true });
"""

# Runs ACTION (a function body of no arguments) and times it to a forced layout and to the
# frame after; returns [layout ms, frame ms].
TIMED = """
async (action) => {
  const run = new Function(action);
  const t0 = performance.now();
  run();
  await Promise.resolve();  // the components redraw in a microtask
  await Promise.resolve();
  document.body.getBoundingClientRect();  // forced style and layout
  const layout = performance.now() - t0;
  await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
  return [layout, performance.now() - t0];
}
"""
SWITCH = """const s = document.getElementById("ik-query"); s.value = "{q}";
s.dispatchEvent(new Event("change", {{ bubbles: true }}));"""
CLICK_ROW = """document.querySelector("#ik-table tr[data-row='{r}']").click();"""
TAB = """document.querySelector("[data-tab={tab}]").click();"""
HOVER = """const dot = document.querySelectorAll("#ik-themes circle")[{i}];
const box = dot.getBoundingClientRect();
dot.dispatchEvent(new MouseEvent("mousemove", {{ bubbles: true,
  clientX: box.x + box.width / 2, clientY: box.y + box.height / 2 }}));"""


def browser_steps(page_path: Path, n_queries: int, repeats: int):
    """``({step: [(layout ms, frame ms), ...]}, page errors)``."""
    from playwright.sync_api import sync_playwright

    times: dict[str, list[tuple[float, float]]] = {}
    errors: list[str] = []
    url = page_path.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.add_init_script(FIRST_RENDER)
        first = []
        for _ in range(repeats):
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("window.__ik && window.__ik.frame", timeout=120_000)
            first.append(tuple(page.evaluate("[window.__ik.rows, window.__ik.frame]")))
            page.close()
        times["browser: first render"] = first

        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("window.__ik && window.__ik.frame", timeout=120_000)
        run = lambda action: tuple(page.evaluate(TIMED, action))  # noqa: E731
        visits = [q % n_queries for q in range(1, repeats + 1)]
        times["browser: query switch"] = [run(SWITCH.format(q=q)) for q in visits]
        clicks = []
        for k in range(repeats):  # alternate rows: clicking the selected row changes nothing
            clicks.append(run(CLICK_ROW.format(r=3 if k % 2 == 0 else 5)))
        times["browser: row click"] = clicks
        tabs = []
        for _ in range(repeats):
            tabs.append(run(TAB.format(tab="themes")))
            run(TAB.format(tab="sequences"))
        times["browser: open Themes tab"] = tabs
        run(TAB.format(tab="themes"))
        times["browser: query switch, Themes open"] = [
            run(SWITCH.format(q=q)) for q in reversed(visits)
        ]
        points = page.evaluate("document.querySelectorAll('#ik-themes circle').length")
        if points:
            times["browser: hover a theme point"] = [
                run(HOVER.format(i=(37 * k) % points)) for k in range(repeats)
            ]
        browser.close()
    return times, errors


# -- the table --------------------------------------------------------------------------------


def token_steps(repeats: int) -> dict:
    """A row click's token heatmap on the shipped small demo model: first time (one query
    gradient, one training forward/backward) and again (from the explorer's cache)."""
    import torch

    import influencekit as ik
    from influencekit.demo import QUERIES
    from influencekit.demo.corpus import MAX_LENGTH, load_records
    from influencekit.demo.pipeline import model_dir

    torch.set_num_threads(1)
    model, tokenizer = ik.load_model(model_dir("small"))
    train = ik.TextDataset.from_records(load_records()[:200], tokenizer, MAX_LENGTH)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    result = ik.score(model, factors, QUERIES[:1], train, progress=False)
    first, again = [], []
    for _ in range(repeats):
        explorer = InfluenceExplorer(result, train, model, factors, k=10)
        first.append(ms(lambda e=explorer: e.select(3)))
        explorer.select(1)
        again.append(ms(lambda e=explorer: e.select(3)))
    return {
        "python: row click, tokens computed": first,
        "python: row click, tokens cached": again,
    }


def print_table(python: dict, browser: dict) -> None:
    print(f"{'step':<38}{'median ms':>10}{'min ms':>9}{'budget':>8}{'layout ms':>11}")
    for step, values in python.items():
        median = statistics.median(values)
        print(f"{step:<38}{median:>10.1f}{min(values):>9.1f}{median / BUDGET_MS:>7.2f}x")
    for step, pairs in browser.items():
        frame = [f for _, f in pairs]
        median = statistics.median(frame)
        layout = statistics.median([x for x, _ in pairs])
        print(
            f"{step:<38}{median:>10.1f}{min(frame):>9.1f}{median / BUDGET_MS:>7.2f}x{layout:>11.1f}"
        )


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=None, help="sequences (default 10000)")
    parser.add_argument("--queries", type=int, default=None, help="queries (default 50)")
    parser.add_argument("--quick", action="store_true", help="1000 sequences x 10 queries")
    parser.add_argument("--repeats", type=int, default=5, help="timings per step (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-browser", action="store_true", help="skip the chromium timings")
    parser.add_argument("--profile", action="store_true", help="cProfile slow Python steps")
    parser.add_argument("--keep", type=Path, default=None, help="write the page here too")
    parser.add_argument("--no-tokens", action="store_true", help="skip the demo-model timing")
    args = parser.parse_args(argv)
    n_train = args.train or (1000 if args.quick else 10_000)
    n_queries = args.queries or (10 if args.quick else 50)
    if n_queries < 2 or n_train < 20:
        parser.error("need at least 2 queries and 20 training sequences")
    os.environ["INFLUENCEKIT_PROGRESS"] = "0"

    load = os.getloadavg()[0]
    started = time.perf_counter()
    result, dataset, queries = synthetic(n_train, n_queries, args.seed)
    print(
        f"{n_queries} queries x {n_train:,} sequences x {len(LAYERS)} layers, top 20 shown; "
        f"data made in {time.perf_counter() - started:.1f} s; {args.repeats} repeats, medians"
    )
    with tempfile.TemporaryDirectory() as tmp:
        python, page, explorer, profiles = python_steps(
            result, dataset, queries, args.repeats, Path(tmp), args.profile
        )
        if not args.no_tokens:
            python.update(token_steps(args.repeats))
        page_mb = page.stat().st_size / 1e6
        binary, as_json, buffers = state_sizes(explorer)
        switch = switch_messages(explorer, (explorer.query + 1) % n_queries)
        browser, errors = (
            ({}, []) if args.no_browser else browser_steps(page, n_queries, args.repeats)
        )
        if args.keep:
            args.keep.write_bytes(page.read_bytes())

    print()
    print_table(python, browser)
    print()
    print(f"page (to_html, {n_queries} queries): {page_mb:.2f} MB")
    print(
        f"synced state, all widgets (Themes open): {buffers} binary buffers, {kib(binary)}; "
        f"as JSON lists {kib(as_json)}: JSON/binary = {as_json / max(binary, 1):.2f}x"
    )
    print(
        f"one query switch (Themes open): {switch['messages']} update messages, "
        f"{kib(switch['json'])} JSON + {switch['buffers']} buffers {kib(switch['binary'])}; "
        f"buffers as JSON lists {kib(switch['as_json'])}: "
        f"JSON/binary = {switch['as_json'] / max(switch['binary'], 1):.2f}x"
    )
    print(f"  its buffers, bytes binary/as JSON list: {', '.join(switch['each'])}")
    now = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs; load average {load:.1f} at the start, {now:.1f} at the end")
    if errors:
        print(f"page errors ({len(errors)}): {errors[:3]}")
    for step, text in profiles.items():
        print(f"\n-- cProfile of {step} (> {BUDGET_MS:.0f} ms) --\n{text}")


if __name__ == "__main__":
    main()
