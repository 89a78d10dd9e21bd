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
- with ``--live`` (off by default: a few minutes), the LIVE widget through a real kernel:
  the result (``result.save``), the dataset as training JSONL (id, text, theme) and the
  queries (JSON) go into a temporary folder with a notebook that loads them without a model
  (``InfluenceResult.load``; ``Example(index, id, text, (), {"theme": ...})`` per JSONL
  line) and shows ``InfluenceExplorer(result, examples, queries=queries)`` and a ``.picked``
  label that an ``explorer.observe(..., "selection")`` callback fills with the selection's
  JSON. Voilà serves it on 127.0.0.1 (``tests/helpers/live.py``'s ``voila_server``, offline) and
  chromium opens it ``--repeats`` times; each load starts a fresh kernel and runs the
  cell, then times, once per load: ``first render`` (navigation start until the table's
  rows are visible: kernel start, imports, the cell's run, the page's scripts, the widgets'
  state over the websocket; reported on its own row, with a breakdown below the table), a
  ``query switch`` (an option of the ipywidgets dropdown picked until the first
  ``.ik-ranked .ik-id`` is that query's top id, computed here from the result), a ``row
  click`` (``tr[data-row='2']`` until ``.picked`` reads ``"rank": 3``: Python answered),
  the first opening of the Themes tab (until a ``.ik-themes .ik-cluster`` is visible: the
  kernel clusters then) and a query switch with the Themes tab open (until the table shows
  the new top id). All are timed IN THE PAGE with ``performance.now()``: from a capturing
  listener for the input event the widget reacts to (``change`` for the dropdown, ``click``
  for a row, ``pointerdown`` for a Lumino tab; Playwright's own latency is not counted)
  until a MutationObserver first sees the condition hold (the DOM updated; the next frame
  is in the breakdown). The breakdown splits each round trip (medians, ms): input event →
  the update message sent on the websocket (the page logs every frame through a wrapped
  ``WebSocket``); → the kernel starts handling it (inbound transport: Jupyter server, ZMQ);
  → the kernel sends the reply the check waits for (the RankedTable's, the ``.picked``
  Label's or the ThemeClusters' update: Python compute and serialisation); → that reply's
  frame arrives (outbound transport: ipykernel's IOPub thread, ZMQ, the server, the
  websocket; a page busy drawing an earlier message delays it too); → DOM changed
  (ipywidgets' and the component's JavaScript); DOM → next frame; and the kernel's whole
  handling of the update (``kernel``), the page's update messages (``updates``), and the
  frames and KiB that came before the DOM changed. The kernel side comes from the
  notebook, which wraps ``ipywidgets.Widget._handle_msg`` and ``_send`` and stamps them
  with ``time.time()`` into a hidden label; the page puts them on its clock with
  ``performance.timeOrigin`` (one machine, one clock). The first render's breakdown: the
  page's first byte, HTML done (Voilà sends the rest once the cell has run), the kernel
  websocket open, rows in the DOM and visible, and the cell's own imports, loading,
  reading and building. Console errors, page errors and requests off 127.0.0.1 are
  printed when there are any. Needs voila (test extras), psutil and
  tests/helpers/live.py; when they cannot be imported the live rows are skipped with a note.

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
    python benchmarks/widgets.py --live --no-tokens   # + the live widget in Voilà (~3 min)
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
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


# -- the live widget, through a kernel --------------------------------------------------------

# The notebook Voilà runs: the saved result and the dataset as JSONL, no model or tokenizer.
# Its first lines instrument the kernel for the breakdown (before any widget exists: each
# widget binds ``_handle_msg`` when its comm opens): for each update from the page, the
# wall-clock span of its handling (the observers, the state sent back, its serialisation)
# and when each widget's reply left (``_send``), in a hidden label sent after each update.
LIVE_NOTEBOOK = """\
import time

started = time.perf_counter()
import json

import ipywidgets as w

import influencekit as ik
from influencekit.data import Example
from influencekit.widgets import InfluenceExplorer

trace = {"n": 0, "spans": [], "sent": [], "imports": (time.perf_counter() - started) * 1e3}
kernel_ms = w.Label(layout=w.Layout(display="none")).add_class("kernel-ms")
handle, send = w.Widget._handle_msg, w.Widget._send


def timed_handle(self, msg):
    if msg["content"]["data"].get("method") != "update":
        return handle(self, msg)
    trace["sent"] = []
    started = time.time() * 1e3
    try:
        return handle(self, msg)
    finally:
        trace["n"] += 1
        trace["spans"] = [*trace["spans"][-7:], [started, time.time() * 1e3]]
        kernel_ms.value = json.dumps(trace)


def timed_send(self, msg, buffers=None):
    if self is not kernel_ms:
        trace["sent"].append([time.time() * 1e3, type(self).__name__])
    return send(self, msg, buffers=buffers)


w.Widget._handle_msg, w.Widget._send = timed_handle, timed_send

started = time.perf_counter()
result = ik.InfluenceResult.load("result.h5")
trace["load result"] = (time.perf_counter() - started) * 1e3
started = time.perf_counter()
with open("train.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
examples = [
    Example(i, r["id"], r["text"], (), {"theme": r["theme"]}) for i, r in enumerate(records)
]
with open("queries.json", encoding="utf-8") as f:
    queries = json.load(f)
trace["read dataset"] = (time.perf_counter() - started) * 1e3
started = time.perf_counter()
explorer = InfluenceExplorer(result, examples, queries=queries)
trace["build explorer"] = (time.perf_counter() - started) * 1e3
kernel_ms.value = json.dumps(trace)
picked = w.Label(layout=w.Layout(width="100%")).add_class("picked")
explorer.observe(lambda change: setattr(picked, "value", json.dumps(change["new"])), "selection")
w.VBox([explorer, picked, kernel_ms])
"""

# Set before Voilà's scripts run: logs every kernel websocket frame ([time, "in"/"out",
# bytes]) and the socket's opening, and notes when the table's first row is in the DOM, when
# it is visible, and when the frame after that has run.
LIVE_INIT = """
window.__live = { ws: [] };
(() => {
  const log = window.__live.ws;
  const size = (d) => (typeof d === "string" ? d.length : (d.byteLength ?? d.size ?? 0));
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("open", () => { window.__live.socket ??= performance.now(); });
      this.addEventListener("message", (e) => log.push([performance.now(), "in", size(e.data)]));
    }
    send(data) {
      log.push([performance.now(), "out", size(data)]);
      return super.send(data);
    }
  };
  new MutationObserver((_, observer) => {
    const row = document.querySelector(".ik-ranked tr[data-row]");
    if (!row) return;
    window.__live.rows ??= performance.now();
    if (!row.getClientRects().length) return;
    observer.disconnect();
    window.__live.visible = performance.now();
    requestAnimationFrame(() => setTimeout(() => { window.__live.frame = performance.now(); }, 0));
  }).observe(document, { childList: true, subtree: true, attributes: true });
})();
"""

# Arms one timed step: the first TRIGGER event (captured on window, so before any handler)
# starts the clock; a MutationObserver checks CHECK (a function body of ``arg``) on every
# DOM change after it, and notes the first time it holds and the frame after; the websocket
# frames in between come along. ``window.__step`` resolves to it all.
ARM = """
({ trigger, check, arg }) => {
  const holds = new Function("arg", check);
  const ws = window.__live.ws;
  const step = { start: null, from: ws.length };
  const onEvent = () => { step.start ??= performance.now(); };
  window.addEventListener(trigger, onEvent, true);
  window.__step = new Promise((resolve, reject) => {
    let done = false;
    const observer = new MutationObserver(() => {
      if (done || step.start === null || !holds(arg)) return;
      done = true;
      step.dom = performance.now();
      observer.disconnect();
      clearTimeout(timer);
      window.removeEventListener(trigger, onEvent, true);
      requestAnimationFrame(() => setTimeout(() => {
        step.frame = performance.now();
        step.ws = ws.slice(step.from);
        resolve(step);
      }, 0));
    });
    observer.observe(document.body,
      { childList: true, subtree: true, characterData: true, attributes: true });
    const timer = setTimeout(() => {
      observer.disconnect();
      reject(new Error(`not done in 180 s: ${check}`));
    }, 180000);
  });
  window.__step.catch(() => {});  // reported when awaited, not as an unhandled rejection
}
"""
TOP_ID = (
    "const c = document.querySelector('.ik-ranked .ik-id'); return !!c && c.textContent === arg;"
)
PICKED = "const p = document.querySelector('.picked'); return !!p && p.textContent.includes(arg);"
CLUSTERS = (
    "const c = document.querySelector('.ik-themes .ik-cluster');"
    "return !!c && c.getClientRects().length > 0;"
)
KERNEL = "JSON.parse(document.querySelector('.kernel-ms')?.textContent || '{\"n\": -1}')"
# Waits until no websocket frame has come for QUIET ms (the step's trailing messages).
SETTLED = """
async (quiet) => {
  const ws = window.__live.ws;
  for (;;) {
    const n = ws.length;
    await new Promise((done) => setTimeout(done, quiet));
    if (ws.length === n) return;
  }
}
"""


SETUP = ("imports", "load result", "read dataset", "build explorer")  # timed in the notebook


def write_live(folder: Path, result, dataset, queries) -> Path:
    """The result, the dataset as training JSONL, the queries and the notebook in ``folder``."""
    import nbformat

    result.save(folder / "result.h5")
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for ex in dataset:
            f.write(json.dumps({"id": ex.id, "text": ex.text, "theme": ex.metadata["theme"]}))
            f.write("\n")
    (folder / "queries.json").write_text(json.dumps(queries), encoding="utf-8")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LIVE_NOTEBOOK)])
    nbformat.write(notebook, folder / "explore.ipynb")
    return folder / "explore.ipynb"


def split_step(step: dict, kernel: dict, updates: int, origin: float, reply: str) -> dict:
    """Where one step's time went (ms). Page times are ``performance.now()``; the kernel's
    wall-clock stamps (``time.time()``) are put on the same clock with the page's
    ``performance.timeOrigin`` (one machine, one clock). The reply is the websocket frame
    that arrived last before the DOM changed, sent by the kernel's last ``reply`` widget
    (while handling the step's last update: ``updates`` is how many the page sent)."""
    start, dom = step["start"], step["dom"]
    sent = next((t for t, way, _ in step["ws"] if way == "out" and t >= start), float("nan"))
    frames = [(t, size) for t, way, size in step["ws"] if way == "in" and sent <= t <= dom]
    arrived = frames[-1][0] if frames else float("nan")
    spans = [(a - origin, z - origin) for a, z in kernel["spans"][-updates:]]
    began = spans[0][0]
    left = max((t - origin for t, name in kernel["sent"] if name == reply), default=float("nan"))
    return {
        "event→sent": sent - start,
        "→kernel": began - sent,
        "→reply out": left - began,
        "→arrived": arrived - left,
        "→DOM": dom - arrived,
        "DOM→frame": step["frame"] - dom,
        "kernel": sum(z - a for a, z in spans),
        "updates": updates,
        "msgs": len(frames),
        "KiB": sum(size for _, size in frames) / 1024,
    }


def timed_step(page, trigger: str, check: str, arg, reply: str, target, option=None):
    """``(ms from the input event until CHECK held, its split)`` of one step: arm, select
    ``option`` (an index) of the ``target`` locator or click it, wait for the page; then for
    the kernel's trace of it (``reply``: the widget class whose update CHECK waits for)."""
    page.evaluate(SETTLED, 300)
    before = page.evaluate(KERNEL)
    page.evaluate(ARM, {"trigger": trigger, "check": check, "arg": arg})
    if option is None:
        target.click()
    else:
        target.select_option(index=option)
    step = page.evaluate("window.__step")
    page.wait_for_function(f"n => {KERNEL}.n > n", arg=before["n"], polling="raf", timeout=60_000)
    page.evaluate(SETTLED, 300)  # every update handled and its trace sent
    kernel = page.evaluate(KERNEL)
    origin = page.evaluate("performance.timeOrigin")
    updates = kernel["n"] - before["n"]
    return step["dom"] - step["start"], split_step(step, kernel, updates, origin, reply)


def live_steps(result, dataset, queries, repeats: int):
    """``({step: [ms, ...]}, {step: [split, ...]}, first-render details, problems)``, or
    ``None`` when the live helpers (tests/helpers/live.py: Voilà, psutil) cannot be imported."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    try:
        from playwright.sync_api import sync_playwright

        from helpers import live
    except ImportError as err:
        print(f"--live skipped: {err}")
        return None

    n_queries = len(queries)
    top_id = [result.train_ids[result.top(q, 1)[0][0]] for q in range(n_queries)]

    def other_query(now: int, after: int) -> int:
        """The first query from ``after`` on whose top sequence differs from query ``now``'s."""
        for q in (x % n_queries for x in range(after, after + n_queries)):
            if q != now and top_id[q] != top_id[now]:
                return q
        raise RuntimeError("every query has the same top sequence")

    times: dict[str, list[float]] = {}
    splits: dict[str, list[dict]] = {}
    first: list[dict] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        notebook = write_live(Path(tmp), result, dataset, queries)
        with live.voila_server(notebook) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_init_script(LIVE_INIT)
            for k in range(repeats):  # each load of the page starts a kernel and runs the cell
                page = context.new_page()
                events = live.watch(page)
                page.goto(url, wait_until="commit", timeout=300_000)
                live.wait_for_widgets(page, ".ik-ranked tr[data-row]", timeout=300)
                page.wait_for_function("window.__live.frame", timeout=60_000)
                page.wait_for_function(f"{KERNEL}.n >= 0", timeout=60_000)
                loaded = page.evaluate(
                    "() => { const nav = performance.getEntriesByType('navigation')[0];"
                    "return { ...window.__live, ws: undefined, byte: nav.responseStart,"
                    "html: nav.domContentLoadedEventEnd }; }"
                )
                loaded["kernel"] = page.evaluate(KERNEL)
                first.append(loaded)

                picker = page.locator(".widget-dropdown select")
                q = other_query(0, 1 + k)
                q2 = other_query(q, q + 7)
                row = page.locator(".ik-ranked tr[data-row='2']")
                tab = page.locator(".lm-TabBar-tab", has_text="Themes")
                steps = [  # a click on a row counts from "click", on a tab from "pointerdown"
                    ("live: query switch", "change", TOP_ID, top_id[q], "RankedTable", picker, q),
                    ("live: row click", "click", PICKED, '"rank": 3', "Label", row, None),
                    ("live: open Themes tab (first)", "pointerdown", CLUSTERS, None,
                     "ThemeClusters", tab, None),
                    ("live: query switch, Themes open", "change", TOP_ID, top_id[q2],
                     "RankedTable", picker, q2),
                ]  # fmt: skip
                for name, *how in steps:
                    took, split = timed_step(page, *how)
                    times.setdefault(name, []).append(took)
                    splits.setdefault(name, []).append(split)
                problems += [f"page error: {e}" for e in events["errors"]]
                problems += [m for m in events["console"] if m.startswith("error")]
                problems += [f"request off 127.0.0.1: {u}" for u in events["foreign"]]
                page.close()
            browser.close()
    times = {
        "live: first render (kernel + run)": [x["visible"] for x in first],
        **times,
    }
    return times, splits, first, problems


def print_live(splits: dict, first: list[dict], problems: list[str]) -> None:
    """Where the live steps' time goes (medians), and the page's problems."""
    med = statistics.median
    kernel = [x["kernel"] for x in first]
    print(
        "live first render, from navigation (page clock, medians): "
        f"first byte {med([x['byte'] for x in first]):.0f} ms, "
        f"HTML done {med([x['html'] for x in first]):.0f} ms, "
        f"kernel socket open {med([x['socket'] for x in first]):.0f} ms, "
        f"rows in DOM {med([x['rows'] for x in first]):.0f} ms, "
        f"visible {med([x['visible'] for x in first]):.0f} ms, "
        f"next frame {med([x['frame'] for x in first]):.0f} ms; in the kernel: "
        + ", ".join(f"{key} {med([k[key] for k in kernel]):.0f} ms" for key in SETUP)
    )
    columns = list(next(iter(splits.values()))[0])
    print("live round trips, medians in ms (the page's clock; see the module docstring):")
    widths = [max(9, len(c) + 2) for c in columns]
    print(f"{'  step':<38}" + "".join(f"{c:>{n}}" for c, n in zip(columns, widths, strict=True)))
    for step, parts in splits.items():
        cells = [med([p[c] for p in parts]) for c in columns]
        row = "".join(f"{v:>{n}.1f}" for v, n in zip(cells, widths, strict=True))
        print(f"  {step:<36}{row}")
    if problems:
        print(f"live page problems ({len(problems)}, each once with its count):")
        for text, count in collections.Counter(problems).most_common():
            print(f"  {count}x {text}")


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


def print_table(python: dict, browser: dict, live: dict | None = None) -> None:
    print(f"{'step':<38}{'median ms':>10}{'min ms':>9}{'budget':>8}{'layout ms':>11}")
    for step, values in {**python, **(live or {})}.items():
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
    parser.add_argument(
        "--live", action="store_true", help="also time the live widget through Voilà (minutes)"
    )
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
    live = live_steps(result, dataset, queries, args.repeats) if args.live else None

    print()
    print_table(python, browser, live[0] if live else None)
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
    if live:
        print_live(*live[1:])
    for step, text in profiles.items():
        print(f"\n-- cProfile of {step} (> {BUDGET_MS:.0f} ms) --\n{text}")


if __name__ == "__main__":
    main()
