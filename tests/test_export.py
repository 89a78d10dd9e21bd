"""The static page (``InfluenceExplorer.to_html``, ``influencekit report``): escaping, errors,
and the page itself in a real browser (Debian's chromium under Playwright)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

import influencekit as ik
from influencekit import themes
from influencekit.cli import main
from influencekit.widgets import InfluenceExplorer
from influencekit.widgets.export import safe_json

from helpers.browser_pages import XSS, map_spread, open_page, page_data, problems


def _hostile_page(path, tokenizer):
    """A page whose corpus, ids, themes, layers, query and title all carry script payloads;
    token rows come from fake token scores (the explorer's cache, filled by hand)."""
    records = [
        {"id": f"id{n}{payload}", "text": f"quote {n} {payload}", "theme": payload}
        for n, payload in enumerate(XSS)
    ]
    train = ik.TextDataset.from_records(records, tokenizer)
    scores = np.arange(len(XSS) * 2, dtype=float).reshape(1, len(XSS), 2)
    result = ik.InfluenceResult(scores, ["h.0.<b>", "h.1.&amp;"], train.ids, [XSS[0]])
    queries = [{"prompt": XSS[2], "completion": XSS[3], "kind": XSS[0], "source": train.ids[1]}]
    found = themes.for_query(result, train, 0, top_k=4, n_clusters=2)
    explorer = InfluenceExplorer(result, train, "model", "factors", [found], queries=queries, k=4)
    for i in range(len(XSS)):  # stands in for token_scores: the page only needs the numbers
        explorer.data._tokens[0, i] = np.linspace(-1, 1, len(train[i].input_ids))
    return explorer.to_html(path, title=XSS[3], facts={XSS[1]: XSS[2]}, token_rows=4)


def test_every_text_is_escaped(tmp_path, tokenizer):
    text = _hostile_page(tmp_path / "p.html", tokenizer).read_text()
    assert text.count("<script") == 2  # the page's data and its own script, nothing else
    assert text.count("</script>") == 2
    assert "<img" not in text and 'onerror="' not in text and 'onmouseover="' not in text
    assert "&lt;script&gt;window.__xss = &#x27;script&#x27;&lt;/script&gt;" in text
    data = page_data(text)  # the JSON still reads back exactly
    rows = data["queries"][0]["table"]["rows"]
    assert {row["id"] for row in rows} == {f"id{n}{p}" for n, p in enumerate(XSS)}
    assert data["queries"][0]["matrix"]["layers"] == ["h.0.<b>", "h.1.&amp;"]


def test_safe_json_cannot_close_its_script_and_reads_back():
    value = {"t": "</script><!--", "b": b"\x00\xff", "amp": "a&b"}
    text = safe_json(value)
    assert "<" not in text and ">" not in text and "&" not in text
    back = json.loads(text)
    assert back["t"] == value["t"] and back["amp"] == "a&b" and back["b"] == {"$bytes": "AP8="}
    with pytest.raises(ValueError):
        safe_json({"x": float("nan")})  # no NaN leaves unflagged: shares travel as bytes


def test_the_page_holds_every_query_and_its_token_rows(tmp_path, tiny_trained):
    model, factors, result, train = tiny_trained
    explorer = InfluenceExplorer(result, train, model, factors, k=5)
    data = page_data(explorer.to_html(tmp_path / "p.html", token_rows=2).read_text())
    assert len(data["queries"]) == len(result.query_ids)
    for q, query in enumerate(data["queries"]):
        assert [r["id"] for r in query["table"]["rows"]] == [
            train.ids[i] for i, _ in result.top(q, 5)
        ]
        assert len(query["pair"]) == 1 + 5 and len(query["tokens"]) == 1 + 2
        first = query["tokens"][1]
        assert len(first["tokens"]) == len(train[result.top(q, 1)[0][0]].input_ids)
    with pytest.raises(ValueError, match="token_rows"):
        explorer.to_html(tmp_path / "p.html", token_rows=-1)


def test_the_report_command_writes_a_page_from_a_saved_result(tmp_path, tiny_trained, capsys):
    model, factors, result, train = tiny_trained
    result.save(tmp_path / "r.h5")
    factors.save(tmp_path / "f.h5")
    model.save_pretrained(tmp_path / "m")
    train.tokenizer.save_pretrained(tmp_path / "m")
    lines = [json.dumps({"id": ex.id, "text": ex.text, **ex.metadata}) for ex in train]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = ["report", str(tmp_path / "r.h5"), "--train", str(tmp_path / "train.jsonl")]
    assert main([*args, "--out", str(tmp_path / "plain.html"), "--rows", "7"]) == 0
    plain = page_data((tmp_path / "plain.html").read_text())
    assert len(plain["queries"][0]["table"]["rows"]) == 7
    assert "model=, factors=" in plain["no_tokens"]["message"]  # says how to get tokens
    extra = ["--model", str(tmp_path / "m"), "--factors", str(tmp_path / "f.h5")]
    assert main([*args, "--out", str(tmp_path / "tok.html"), "--max-length", "64", *extra]) == 0
    tokens = page_data((tmp_path / "tok.html").read_text())["queries"][0]["tokens"]
    assert len(tokens) == 4 and len(tokens[1]["tokens"]) > 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "x.html"), "--model", str(tmp_path / "m")]) == 2
    assert "both --model and --factors" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": 1}\n')
    bad = ["report", str(tmp_path / "r.h5"), "--train", str(tmp_path / "bad.jsonl")]
    assert main([*bad, "--out", str(tmp_path / "x.html")]) == 2
    assert 'bad.jsonl, line 2: no "text" string' in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


# -- in a real browser ------------------------------------------------------------------------


def test_demo_report_in_a_browser(browser, quick_demo, artifacts):
    """Pick a query, click a row, hover a token, use the layer heatmap and the Themes tab."""
    out, _ = quick_demo
    path = out / "report.html"
    result = ik.InfluenceResult.load(out / "result.h5")
    page, events = open_page(browser, path.resolve().as_uri())
    data = page_data(path.read_text())
    assert page.locator("#ik-query option").count() == len(ik.demo.QUERIES)
    page.select_option("#ik-query", "5")
    assert page.locator(".ik-header[data-query='5']").is_visible()
    assert not page.locator(".ik-header[data-query='0']").is_visible()
    rows = page.locator("#ik-table tr[data-row]")
    expected = [row["id"] for row in data["queries"][5]["table"]["rows"]]
    assert [rows.nth(r).locator(".ik-id").inner_text() for r in range(rows.count())] == expected
    rows.nth(1).click()
    assert "ik-selected" in rows.nth(1).get_attribute("class")
    assert page.locator("#ik-pair").inner_text().startswith(f"Per layer: #2 {expected[1]}")
    token = page.locator("#ik-tokens .ik-tok").nth(2)
    token.hover()
    tip = page.locator("#ik-tokens .ik-tip")
    assert tip.is_visible()
    shown_token, shown_score, _ = tip.inner_text().split("\n")
    assert f"{shown_token}: {shown_score.removeprefix('score ')}" == token.get_attribute("title")
    written = np.frombuffer(base64.b64decode(data["queries"][5]["tokens"][2]["scores"]["$bytes"]))
    assert float(shown_score.removeprefix("score ")) == pytest.approx(written[2], rel=1e-9)
    assert json.loads(shown_token) == data["queries"][5]["tokens"][2]["tokens"][2]
    page.screenshot(path=artifacts / "export-sequences.png", full_page=True)
    page.keyboard.press("ArrowDown")  # the table takes arrow keys
    assert page.locator("#ik-pair").inner_text().startswith(f"Per layer: #3 {expected[2]}")
    rows.nth(5).click()  # a row past the page's token rows: says so
    assert "top 3 rows" in page.locator("#ik-tokens").inner_text()
    page.click("[data-direction='-1']")  # the most negative sequences
    lowest = [result.train_ids[i] for i, _ in result.top(5, 20, largest=False)]
    assert [rows.nth(r).locator(".ik-id").inner_text() for r in range(rows.count())] == lowest
    rows.nth(0).click()
    assert page.locator("#ik-tokens .ik-tok").count() == len(
        data["queries"][5]["lowers"]["tokens"][1]["tokens"]
    )
    page.click("[data-direction='1']")
    assert rows.nth(0).locator(".ik-id").inner_text() == expected[0]

    page.click("[data-tab=layers]")
    heat = page.locator("#ik-matrix table.ik-heat")
    assert heat.locator("tr").count() == 1 + len(data["queries"][5]["matrix"]["layers"])
    heat.locator("td[data-column='4']").first.click()
    assert "ik-selected" in rows.nth(4).get_attribute("class")
    assert heat.locator("th.ik-grp").all_inner_texts() == ["lower", "middle", "upper"]
    colours = "cells => cells.map(e => e.style.background)"
    before = page.locator("#ik-matrix td").evaluate_all(colours)
    page.locator("#ik-matrix .ik-toggle input").check()  # each column on its own scale
    after = page.locator("#ik-matrix td").evaluate_all(colours)
    assert before != after and len(before) == len(after)
    page.screenshot(path=artifacts / "export-layers.png", full_page=True)

    page.click("[data-tab=themes]")
    cards = page.locator("#ik-themes .ik-cluster")
    themes = {**data.get("themes_common", {}), **data["queries"][5]["themes"]}
    assert cards.count() == len(themes["names"]) >= 2
    # titled by their terms, each with its representative member's text
    shown = cards.locator(".ik-cluster-head b").all_inner_texts()
    assert shown == themes["names"] and not any(n.startswith("cluster ") for n in shown)
    reps = [themes["snippets"][i] for i in themes["representatives"]]
    assert cards.locator(".ik-rep").all_inner_texts() == reps
    # how k was chosen, under the map; the map's bulk spread over both axes
    caption = page.locator("#ik-themes .ik-caption").inner_text()
    assert caption == themes["caption"] and "modularity" in caption
    assert min(map_spread(page.locator("#ik-themes"))) > 0.15
    cards.nth(0).click()
    members = page.locator("#ik-themes ol.ik-members li")
    sizes = base64.b64decode(data["queries"][5]["themes"]["sizes"]["$bytes"])
    assert members.count() == np.frombuffer(sizes, "<i4")[0]
    dot = page.locator("#ik-themes circle").last
    dot.hover()
    snippet = dot.locator("title").text_content()
    tip = page.locator("#ik-themes .ik-tip").inner_text()
    assert tip.startswith(snippet) and any(name in tip for name in themes["names"])
    page.screenshot(path=artifacts / "export-themes.png", full_page=True)
    assert problems(events) == []
    page.close()


def test_script_payloads_stay_inert_in_the_browser(browser, tmp_path, tokenizer, artifacts):
    path = _hostile_page(tmp_path / "hostile.html", tokenizer)
    page, events = open_page(browser, path.resolve().as_uri())
    for r in range(len(XSS)):
        page.locator("#ik-table tr[data-row]").nth(r).hover()
        page.locator("#ik-table tr[data-row]").nth(r).click()
        page.locator("#ik-tokens .ik-tok").first.hover()
    page.click("[data-tab=layers]")
    page.locator("#ik-matrix td").first.hover()
    page.click("[data-tab=themes]")
    page.locator("#ik-themes .ik-cluster").first.click()
    page.locator("#ik-themes circle").last.hover()
    assert page.evaluate("window.__xss") is None
    assert problems(events) == []
    # the payloads are on the page as text
    page.click("[data-tab=sequences]")
    table = page.inner_text("#ik-table")
    assert all(payload in table for payload in XSS)
    assert XSS[2] in page.inner_text(".ik-header[data-query='0']")
    assert page.title() == XSS[3]
    page.screenshot(path=artifacts / "export-hostile.png", full_page=True)
    page.close()
