"""The live explorer in a real browser: a notebook served by Voilà on 127.0.0.1 (a kernel
behind the page), driven by Playwright in Debian's chromium.

The corpus is the tiny example's with script payloads planted in some texts, ids and themes;
the explorer has the trained tiny model and its factors, so clicking a row makes the kernel
compute that pair's token scores. A label in the notebook prints ``explorer.selection``,
which shows that what the page clicked reached Python.
"""

from __future__ import annotations

import json

import nbformat
import pytest

import influencekit as ik

from helpers.browser_pages import XSS, map_spread
from helpers.tiny_example import QUERIES, corpus_records

NOTEBOOK = """
import json
import ipywidgets as w
from transformers.utils import logging
logging.disable_progress_bar()
import influencekit as ik
from influencekit.widgets import InfluenceExplorer

model, tokenizer = ik.load_model("model")
train = ik.TextDataset.from_jsonl("train.jsonl", tokenizer, max_length=64)
factors = ik.Factors.load("factors.h5")
result = ik.InfluenceResult.load("result.h5")
explorer = InfluenceExplorer(result, train, model=model, factors=factors, k=8)
said = w.Label(layout=w.Layout(width="100%")).add_class("picked")
explorer.observe(lambda change: setattr(said, "value", json.dumps(change["new"])), "selection")
w.VBox([explorer, said])
"""


@pytest.fixture(scope="module")
def served(tiny_trained, tmp_path_factory):
    """Voilà serving the notebook; yields ``(url, result, train)``."""
    live = pytest.importorskip("helpers.live")  # needs voila (test extras)
    model, factors, _, tiny_train = tiny_trained
    folder = tmp_path_factory.mktemp("live")
    records = corpus_records()
    for n, payload in enumerate(XSS):  # payloads in the texts, ids and themes of a few records
        records[3 * n].update(id=f"{records[3 * n]['id']}{payload}", theme=payload)
        records[3 * n]["text"] += f" {payload}"
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train = ik.TextDataset.from_jsonl(folder / "train.jsonl", tiny_train.tokenizer, 64)
    result = ik.score(model, factors, QUERIES, train, progress=False)
    result.save(folder / "result.h5")
    factors.save(folder / "factors.h5")
    model.save_pretrained(folder / "model")
    tiny_train.tokenizer.save_pretrained(folder / "model")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK)])
    nbformat.write(notebook, folder / "explore.ipynb")
    with live.voila_server(folder / "explore.ipynb") as url:
        yield url, result, train


def test_live_explorer_round_trips_through_the_kernel(browser, served, artifacts, tiny_trained):
    from helpers import live

    url, result, train = served
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    events = live.watch(page)
    rows = live.open_widgets(page, url, ".ik-ranked tr[data-row]")
    ids = lambda: [rows.nth(r).locator(".ik-id").inner_text() for r in range(rows.count())]  # noqa: E731
    assert ids() == [train.ids[i] for i, _ in result.top(0, 8)]

    # pick a query in the ipywidgets dropdown: the kernel refills the table
    page.locator(".widget-dropdown select").select_option(index=2)
    expected = [train.ids[i] for i, _ in result.top(2, 8)]
    page.wait_for_function(
        "ids => [...document.querySelectorAll('.ik-ranked .ik-id')].map(e => e.textContent)"
        ".join('|') === ids.join('|')",
        arg=expected,
    )
    # click a row: the kernel computes its token scores; the selection reaches Python
    rows.nth(1).click()
    picked = page.locator(".picked")
    page.wait_for_function("() => document.querySelector('.picked').textContent.includes('rank')")
    selection = json.loads(picked.inner_text())
    assert selection["query"] == 2 and selection["rank"] == 2
    assert selection["train_id"] == expected[1]
    token = page.locator(".ik-tokens .ik-tok").nth(1)
    token.wait_for(state="visible", timeout=60_000)
    i = selection["train_index"]
    assert page.locator(".ik-tokens .ik-tok").count() == len(train[i].input_ids)
    token.hover()
    tip = page.locator(".ik-tokens .ik-tip")
    tip.wait_for(state="visible")
    shown_token, shown_score, _ = tip.inner_text().split("\n")
    assert f"{shown_token}: {shown_score.removeprefix('score ')}" == token.get_attribute("title")
    model, factors, _, _ = tiny_trained  # the kernel's scores are the kit's token_scores
    reference = ik.token_scores(model, factors, QUERIES[2], train[i])
    assert float(shown_score.removeprefix("score ")) == pytest.approx(reference[1], rel=1e-5)
    assert json.loads(shown_token) == train.tokenizer.decode([train[i].input_ids[1]])
    assert page.locator(".ik-layers .ik-bar-row").count() == len(result.layers)
    page.screenshot(path=artifacts / "live-sequences.png", full_page=True)

    # the most negative sequences (an ipywidgets ToggleButtons), then back
    match = (
        "ids => [...document.querySelectorAll('.ik-ranked .ik-id')].map(e => e.textContent)"
        ".join('|') === ids.join('|')"
    )
    page.locator("button", has_text="most negative").click()
    page.wait_for_function(match, arg=[train.ids[i] for i, _ in result.top(2, 8, largest=False)])
    page.locator("button", has_text="most positive").click()
    page.wait_for_function(match, arg=expected)

    # the Themes tab: clustered in the kernel on first open
    page.locator(".lm-TabBar-tab", has_text="Themes").click()
    cards = page.locator(".ik-themes .ik-cluster")
    cards.first.wait_for(state="visible", timeout=60_000)
    titles = cards.locator(".ik-cluster-head b").all_inner_texts()
    assert len(titles) >= 2 and not any(t.startswith("cluster ") for t in titles)
    assert cards.locator(".ik-rep").count() == len(titles)  # each with its representative
    assert "modularity" in page.locator(".ik-themes .ik-caption").inner_text()
    assert min(map_spread(page.locator(".ik-themes"))) > 0.15
    cards.first.click()
    page.locator(".ik-themes ol.ik-members li").first.wait_for(state="visible")
    dot = page.locator(".ik-themes circle").last
    dot.hover()
    assert (
        page.locator(".ik-themes .ik-tip")
        .inner_text()
        .startswith(dot.locator("title").text_content())
    )
    page.screenshot(path=artifacts / "live-themes.png", full_page=True)

    # hostile text: every row carrying a payload, in every query, hovered and clicked
    page.locator(".lm-TabBar-tab", has_text="Sequences").click()
    seen = 0
    for q in range(len(QUERIES)):
        page.locator(".widget-dropdown select").select_option(index=q)
        page.wait_for_function(
            "id => document.querySelector('.ik-ranked .ik-id').textContent === id",
            arg=train.ids[result.top(q, 1)[0][0]],
        )
        for r, row_id in enumerate(ids()):
            if any(payload in row_id for payload in XSS):
                rows.nth(r).hover()
                rows.nth(r).click()
                seen += 1
    assert seen >= 2
    assert page.evaluate("window.__xss") is None
    assert events["errors"] == [] and events["foreign"] == []
    assert not [m for m in events["console"] if m.startswith("error")]
    page.close()
