"""The static report page: escaping, errors, and a real browser (Debian's chromium)."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import influencekit as ik
from influencekit import themes
from influencekit.widgets.report import format_score, write_report

XSS = [
    "<script>window.__xss = 'script'</script>",
    '<img src="x" onerror="window.__xss = \'img\'">',
    "</script><script>window.__xss = 'close'</script>",
    '" onmouseover="window.__xss=\'attr\'" x="',
]


def _hostile_report(path: Path, tokenizer) -> Path:
    """A report whose corpus, ids, themes and query all carry script payloads."""
    records = [
        {"id": f"id{n}{payload}", "text": f"quote {n} {payload}", "theme": payload}
        for n, payload in enumerate(XSS)
    ]
    train = ik.TextDataset.from_records(records, tokenizer)
    scores = np.arange(len(XSS) * 2, dtype=float).reshape(1, len(XSS), 2)
    result = ik.InfluenceResult(scores, ["layer<0>", "layer&1"], train.ids, [XSS[0]])
    queries = [{"id": XSS[1], "prompt": XSS[2], "completion": XSS[3], "kind": XSS[0]}]
    facts = {XSS[1]: XSS[2]}
    found = themes.for_query(result, train, 0, top_k=4, n_clusters=2)
    tokens = [{i: np.linspace(-1, 1, len(train[i].input_ids)) for i, _ in result.top(0, 2)}]
    return write_report(
        path, result, train, queries=queries, k=4, facts=facts, title=XSS[3], themes=[found],
        token_maps=tokens,
    )  # fmt: skip


def test_every_text_is_escaped(tmp_path, tokenizer):
    page = _hostile_report(tmp_path / "r.html", tokenizer).read_text()
    assert page.count("<script>") == 1  # the page's own script, nothing else
    assert "<img" not in page and 'onerror="' not in page and 'onmouseover="' not in page
    assert "&lt;script&gt;window.__xss = &#x27;script&#x27;&lt;/script&gt;" in page
    assert "Themes of the top 4" in page  # the themes table (representatives) is escaped too
    assert page.count("class='tok' style") >= 2 * 8  # two rows shown token by token


def test_report_refuses_ids_missing_from_the_dataset(tmp_path, tokenizer):
    train = ik.TextDataset.from_texts(["a b c", "d e f"], tokenizer, ids=["a", "b"])
    result = ik.InfluenceResult(np.ones((1, 2, 1)), ["l"], ["a", "zzz"], ["q"])
    with pytest.raises(ik.DataError, match="'zzz'"):
        write_report(tmp_path / "r.html", result, train)
    assert not (tmp_path / "r.html").exists()


def test_token_rows_show_every_token_with_its_exact_score(tmp_path, tokenizer):
    train = ik.TextDataset.from_texts(
        ["the cat sat on the mat", "a b c"], tokenizer, ids=["a", "b"]
    )
    result = ik.InfluenceResult(np.array([[[2.0], [1.0]]]), ["l"], ["a", "b"], ["q"])
    n = len(train[0].input_ids)
    scores = np.arange(n, dtype=float) - 2.0
    page = write_report(tmp_path / "r.html", result, train, token_maps=[{0: scores}]).read_text()
    row = page.split("<tbody>")[1].split("</tr>")[0]
    titles = row.split("title='")[1:]
    assert len(titles) == n
    decoded = [tokenizer.decode([t]) for t in train[0].input_ids]
    for title, token, value in zip(titles, decoded, scores, strict=True):
        assert title.startswith(html.escape(f"{token!r}: {format_score(value)}"))
    # one scale, symmetric about zero: the largest |score| is fully dark, -2 a quarter as dark
    largest = float(np.abs(scores).max())
    assert "rgba(43,108,176,1.00)" in row and f"rgba(197,48,48,{2 / largest:.2f})" in row
    with pytest.raises(ik.DataError, match="3 token scores for"):
        write_report(tmp_path / "r.html", result, train, token_maps=[{0: np.zeros(3)}])
    with pytest.raises(ik.DataError, match="2 token_maps for 1 queries"):
        write_report(tmp_path / "r.html", result, train, token_maps=[{}, {}])


def test_report_refuses_a_wrong_number_of_query_descriptions(tmp_path, tokenizer):
    train = ik.TextDataset.from_texts(["a b c"], tokenizer, ids=["a"])
    result = ik.InfluenceResult(np.ones((1, 1, 1)), ["l"], ["a"], ["q"])
    with pytest.raises(ik.DataError, match="2 query descriptions for 1"):
        write_report(tmp_path / "r.html", result, train, queries=[{}, {}])


# -- in a real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("INFLUENCEKIT_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by Playwright; skipped where either is missing
    (unless ``INFLUENCEKIT_REQUIRE_BROWSER=1``, as in CI, where that is a failure)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        if REQUIRED:
            pytest.fail("browser tests required but chromium or playwright is missing")
        pytest.skip("needs Debian's chromium (apt-get install chromium) and playwright")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield launched
        launched.close()


def _open(browser, path: Path):
    """Open ``path`` from disk, recording console messages, page errors and any request that
    is not for the file itself (there must be none: the page is self-contained)."""
    page = browser.new_page()
    events = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: events["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on(
        "request",
        lambda r: None if r.url == path.as_uri() else events["requests"].append(r.url),
    )
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, events


def test_demo_report_renders_without_errors_and_switches_queries(browser, quick_demo):
    out, _ = quick_demo
    page, events = _open(browser, out / "report.html")
    assert events["errors"] == [] and events["requests"] == []
    assert not [m for m in events["console"] if m.startswith(("error", "warning"))]
    sections = page.locator("section.query")
    n = sections.count()
    assert n == len(ik.demo.QUERIES)
    visible = [i for i in range(n) if sections.nth(i).is_visible()]
    assert visible == [0]  # the script hides all but the picked query
    page.select_option("#query-picker", "q5")
    assert page.locator("#q5").is_visible() and not page.locator("#q0").is_visible()
    page.click("nav a[href='#q2']")
    assert page.locator("#q2").is_visible() and not page.locator("#q5").is_visible()
    assert page.input_value("#query-picker") == "q2"
    rows = page.locator("#q2 table.top:not(.themes) tbody tr")
    assert rows.count() == 10
    assert page.locator("#q2 table.themes tbody tr").count() >= 1
    token = page.locator("#q2 span.tokens span.tok").first
    token.hover()
    assert ": " in token.get_attribute("title")
    page.close()


def test_script_payloads_stay_inert_in_the_browser(browser, tmp_path, tokenizer):
    path = _hostile_report(tmp_path / "hostile.html", tokenizer)
    page, events = _open(browser, path)
    page.hover("table.top tbody tr")  # would fire an injected onmouseover
    assert page.evaluate("window.__xss") is None
    assert events["errors"] == [] and events["requests"] == []
    # the payloads are shown as text
    assert "<script>window.__xss = 'script'</script>" in page.inner_text("#q0")
    assert page.title() == XSS[3]
    page.close()


def test_a_top_k_result_reports_its_kept_rows_without_shares(tmp_path, tokenizer):
    texts = ["a b c", "d e f", "g h i"]
    train = ik.TextDataset.from_texts(texts, tokenizer, ids=["a", "b", "c"])
    kept = np.array([[[5.0], [2.0]]])  # query 0 keeps training rows 2 and 0
    result = ik.InfluenceResult(kept, ["l"], train.ids, ["q"], indices=np.array([[2, 0]]))
    page = write_report(tmp_path / "r.html", result, train, k=10).read_text()
    rows = page.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]
    assert len(rows) == 2 and "g h i" in rows[0] and "a b c" in rows[1]
    assert "%" not in page.split("<tbody>")[1].split("</tbody>")[0]  # no share of a partial sum
