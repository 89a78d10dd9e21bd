"""A static, self-contained HTML report of an :class:`~influencekit.InfluenceResult`.

One file with its CSS and its few lines of JavaScript inlined: it opens from disk with no
network. Every piece of text from the corpus or the queries passes through
:func:`html.escape`, so a quote holding ``<script>`` shows those characters and never runs
them; the script only switches which query is shown and reads no text.

Example:
    >>> import numpy as np, tempfile, os
    >>> from influencekit import InfluenceResult, TextDataset
    >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
    >>> train = TextDataset.from_texts(TINY_CORPUS[:3], build_tokenizer(TINY_CORPUS))
    >>> result = InfluenceResult(np.ones((1, 3, 2)), ["l0", "l1"], train.ids, ["q"],
    ...                          {"queries": [{"prompt": "A <b>", "completion": " c"}]})
    >>> path = write_report(os.path.join(tempfile.mkdtemp(), "r.html"), result, train)
    >>> "A &lt;b&gt;" in open(path).read()
    True
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..h5io import temp_name

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#23395d;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
main{display:flex;gap:20px;padding:16px 24px}
nav{min-width:230px;max-width:260px}
nav label{font-weight:600;display:block;margin-bottom:6px}
nav select{width:100%;font-size:14px;padding:4px}
nav ol{padding-left:20px;font-size:13px}
nav a{color:#23395d}
.facts{font-size:13px;border-collapse:collapse;margin-top:14px}
.facts th{text-align:left;padding-right:8px;color:#555;font-weight:600;vertical-align:top}
section.query{flex:1;background:#fff;border:1px solid #ddd;border-radius:6px;padding:14px 18px;
  margin-bottom:16px}
body.js section.query{display:none}
body.js section.query.shown{display:block}
h2{font-size:17px;margin:0 0 6px}
h3{font-size:15px;margin:16px 0 0}
.prompt{font-family:ui-monospace,monospace;background:#f2f2f2;padding:6px 8px;border-radius:4px}
.completion{background:#ffe9a8}
.badge{display:inline-block;font-size:12px;background:#e8eef7;color:#23395d;border-radius:10px;
  padding:1px 8px;margin-right:4px}
table.top{border-collapse:collapse;width:100%;font-size:14px;margin-top:8px}
table.top th{text-align:left;border-bottom:2px solid #ccc;padding:4px 6px}
table.top td{border-bottom:1px solid #eee;padding:4px 6px;vertical-align:top}
td.id{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.source td{background:#eef8ee}
.layers{display:grid;grid-template-columns:auto minmax(120px,1fr) 50px;gap:2px 8px;font-size:12px;
  max-width:520px;margin:8px 0}
.bar{height:12px;background:#2b6cb0;border-radius:2px}
.bar.neg{background:#c53030}
.note{font-size:13px;color:#555}
.tokens{white-space:pre-wrap}
.tok{border-radius:2px}
"""

SCRIPT = """
document.body.classList.add('js');
const pick = document.getElementById('query-picker');
function show(id) {
  document.querySelectorAll('section.query').forEach(
    s => s.classList.toggle('shown', s.id === id));
  pick.value = id;
}
pick.addEventListener('change', () => show(pick.value));
document.querySelectorAll('nav a').forEach(a => a.addEventListener('click', e => {
  e.preventDefault(); show(a.getAttribute('href').slice(1));
}));
show(pick.value);
"""


def write_report(
    path: str | os.PathLike,
    result,
    dataset,
    *,
    queries: list[dict] | None = None,
    title: str = "influencekit report",
    k: int = 10,
    facts: dict[str, str] | None = None,
    themes: list | None = None,
    token_maps: list[dict[int, np.ndarray]] | None = None,
) -> Path:
    """Write one HTML page: per query, its top ``k`` training sequences and layer shares.

    ``dataset`` supplies the text (and ``theme`` metadata) of each training id in ``result``.
    ``queries`` (dicts with ``id``, ``prompt``, ``completion`` and optionally ``kind``,
    ``theme``, ``source``) default to the prompts recorded in ``result.meta``. ``facts`` are
    shown as a small table of the run's settings. ``themes`` (one
    :class:`influencekit.themes.Themes` per query, from ``themes.for_query``) adds each query's
    clusters with their influence shares. ``token_maps`` (per query, ``{training index: token
    scores}`` from :func:`influencekit.token_scores`) shows those rows token by token, coloured
    by each position's share of the pair's score, with the exact score in each token's
    ``title``. The file is written atomically.

    Example:
        >>> write_report("report.html", result, train, k=10)   # doctest: +SKIP
    """
    queries = _queries(result, queries)
    examples = _examples_by_id(result, dataset)
    for name, given in (("themes", themes), ("token_maps", token_maps)):
        if given is not None and len(given) != len(queries):
            raise DataError(f"write_report: {len(given)} {name} for {len(queries)} queries")
    tokenizer = getattr(dataset, "tokenizer", None)
    sections = [
        _section(
            result,
            q,
            query,
            examples,
            k,
            themes[q] if themes else None,
            _token_cells(token_maps[q], result, examples, tokenizer) if token_maps else {},
        )
        for q, query in enumerate(queries)
    ]
    options = "".join(
        f'<option value="q{q}">{escape(str(query.get("id", q)))}</option>'
        for q, query in enumerate(queries)
    )
    links = "".join(
        f'<li><a href="#q{q}">{escape(str(query.get("id", q)))}</a></li>'
        for q, query in enumerate(queries)
    )
    fact_rows = "".join(
        f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>"
        for name, value in (facts or {}).items()
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body>
<header><h1>{escape(title)}</h1>
<p>Which training sequences made the model give each completion? A positive score means
up-weighting that sequence in training raises the log-probability of the completion.</p>
</header>
<main>
<nav><label for="query-picker">Query</label>
<select id="query-picker">{options}</select>
<ol>{links}</ol>
<table class="facts">{fact_rows}</table></nav>
<div style="flex:1">{"".join(sections)}</div>
</main>
<script>{SCRIPT}</script>
</body></html>
"""
    path = Path(path)
    tmp = temp_name(path)
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_score(value: float) -> str:
    """Four significant digits with a sign, without exponents for everyday magnitudes.

    Example:
        >>> format_score(5508.2), format_score(-0.0123456), format_score(3.2e-9)
        ('+5508', '-0.01235', '+3.2e-09')
    """
    if value != 0 and not 1e-4 <= abs(value) < 1e7:
        return f"{value:+.2g}"
    return np.format_float_positional(
        value, precision=4, unique=False, fractional=False, trim="-", sign=True
    )


def _queries(result, queries: list[dict] | None) -> list[dict]:
    if queries is None:
        # score() records each query's prompt and completion; a hand-made result may not
        recorded = result.meta.get("queries") or [{}] * len(result.query_ids)
        queries = [{"id": qid, **rec} for qid, rec in zip(result.query_ids, recorded, strict=False)]
    if len(queries) != len(result.query_ids):
        raise DataError(
            f"write_report: {len(queries)} query descriptions for {len(result.query_ids)} "
            "queries in the result"
        )
    return queries


def _examples_by_id(result, dataset) -> dict:
    examples = {ex.id: ex for ex in dataset}
    missing = [i for i in result.train_ids if i not in examples]
    if missing:
        raise DataError(
            f"write_report: {len(missing)} training id(s) of the result are not in the dataset "
            f"{getattr(dataset, 'source', '')!r}, first {missing[0]!r}"
        )
    return examples


def _section(
    result, q: int, query: dict, examples: dict, k: int, found=None, tokens: dict | None = None
) -> str:
    top = result.top(q, k)
    # a share of the query's total positive influence needs every score, not just a top k
    positive = 0.0 if result.is_top_k else float(np.clip(result.scores[q], 0, None).sum())
    themes = query.get("theme") or []
    themes = [themes] if isinstance(themes, str) else list(themes)
    rows = []
    for rank, (i, value) in enumerate(top, start=1):
        ex = examples[result.train_ids[i]]
        share = f"{value / positive:.1%}" if positive > 0 and value > 0 else "–"
        css = ' class="source"' if ex.id == query.get("source") else ""
        rows.append(
            f"<tr{css}><td class='num'>{rank}</td><td class='num'>{format_score(value)}</td>"
            f"<td class='num'>{share}</td><td class='id'>{escape(ex.id)}</td>"
            f"<td>{escape(str(ex.metadata.get('theme', '')))}</td>"
            f"<td>{(tokens or {}).get(i) or escape(ex.text)}</td></tr>"
        )
    badges = "".join(
        f'<span class="badge">{escape(str(b))}</span>' for b in [query.get("kind"), *themes] if b
    )
    on_theme = ""
    if themes:
        hits = sum(examples[result.train_ids[i]].metadata.get("theme") in themes for i, _ in top)
        on_theme = f"<p class='note'>{hits} of the top {len(top)} come from the query's theme.</p>"
    source_note = _source_note(result, q, query.get("source"))
    completion = escape(query.get("completion", ""))
    return f"""<section class="query" id="q{q}">
<h2>{escape(str(query.get("id", q)))} {badges}</h2>
<p class="prompt">{escape(query.get("prompt", ""))}<span class="completion">{completion}</span></p>
{source_note}{on_theme}{_token_legend() if tokens else ""}
<div class="layers">{_layer_bars(result, q, k)}</div>
<table class="top"><thead><tr><th>#</th><th>score</th><th title="share of the query's total
positive influence">share</th><th>id</th><th>theme</th><th>text</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
{_themes_table(found)}
</section>"""


def _token_cells(token_map: dict, result, examples: dict, tokenizer) -> dict[int, str]:
    """Per training index, its text as token spans on one colour scale for the whole query
    (symmetric about zero), each span's ``title`` the token and its exact score."""
    if tokenizer is None or not token_map:
        return {}
    scale = max(float(np.abs(scores).max()) for scores in token_map.values()) or 1.0
    cells = {}
    for i, scores in token_map.items():
        ids = examples[result.train_ids[i]].input_ids
        if len(ids) != len(scores):
            raise DataError(
                f"write_report: {len(scores)} token scores for {len(ids)} tokens of training "
                f"id {result.train_ids[i]!r}"
            )
        spans = []
        for token_id, value in zip(ids, scores, strict=True):
            token = tokenizer.decode([int(token_id)])
            colour = "43,108,176" if value >= 0 else "197,48,48"
            alpha = min(1.0, abs(float(value)) / scale)
            title = f"{token!r}: {format_score(float(value))}"
            spans.append(
                f"<span class='tok' style='background:rgba({colour},{alpha:.2f})' "
                f"title='{escape(title)}'>{escape(token)}</span>"
            )
        cells[i] = f"<span class='tokens'>{''.join(spans)}</span>"
    return cells


def _token_legend() -> str:
    return (
        "<p class='note'>The top rows are shown token by token: "
        "<span class='tok' style='background:rgba(43,108,176,.8)'>blue</span> positions raise "
        "the completion's log-probability, <span class='tok' style='background:rgba(197,48,48,"
        ".8)'>red</span> ones lower it (darker = more; one scale per query). A position's score "
        "is that of the prediction made at it; hover a token for its exact score.</p>"
    )


def _themes_table(found) -> str:
    """The query's theme clusters, largest influence share first."""
    if found is None:
        return ""
    rows = []
    for c in np.argsort(-found.shares, kind="stable"):
        example = escape(found.texts[found.representatives[c]])
        rows.append(
            f"<tr><td class='num'>{found.shares[c]:.0%}</td><td class='num'>{found.sizes[c]}</td>"
            f"<td>{escape(', '.join(found.terms[c][:6]))}</td><td>{example}</td></tr>"
        )
    return (
        f"<h3>Themes of the top {len(found.labels)}</h3><table class='top themes'><thead><tr>"
        "<th title='share of their positive influence'>share</th><th>size</th><th>terms</th>"
        f"<th>representative</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _source_note(result, q: int, source: str | None) -> str:
    """Where the corpus quote a query restates ranks (scores of a top-k result only rank it
    when it is among the kept columns)."""
    if not source:
        return ""
    rank = ""
    if source in result.train_ids and not result.is_top_k:
        position = result.rank(q, result.train_ids.index(source))
        rank = f": rank {position:,} of {len(result.train_ids):,}"
    return (
        f"<p class='note'>Restates corpus quote <b>{escape(source)}</b>{rank} (green when in "
        "the list below).</p>"
    )


def _layer_bars(result, q: int, k: int) -> str:
    shares = result.layer_shares(q, k)
    widest = max(float(np.abs(shares).max()), 1e-12)
    cells = []
    for name, share in zip(result.layers, shares, strict=True):
        width = 100 * abs(share) / widest
        neg = " neg" if share < 0 else ""
        cells.append(
            f"<span title='{escape(name)}'>{escape(name)}</span>"
            f"<div><div class='bar{neg}' style='width:{width:.1f}%'></div></div>"
            f"<span class='num'>{share:.0%}</span>"
        )
    return "".join(cells)
