"""The explorer as one self-contained HTML page: ``InfluenceExplorer.to_html``.

The page inlines the components' ES modules, their CSS, a small driver (``static/page.js``)
and every query's component states as JSON (binary arrays base64-encoded), so it opens from
``file://`` with no network. Text reaches the page in two ways only: escaped by
:func:`html.escape` (query headers, picker, facts) or as JSON data that the modules put on
the page with ``textContent``. The JSON is made safe inside ``<script>`` by writing ``<``,
``>`` and ``&`` as ``\\u`` escapes, so a ``</script>`` in the corpus cannot end it.

Example:
    >>> explorer = InfluenceExplorer(result, train, model=model, factors=factors)  # doctest: +SKIP
    >>> explorer.to_html("report.html")                                           # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import os
from html import escape
from pathlib import Path

from .. import checks
from ..errors import FileFormatError, ParameterError
from ..h5io import temp_name
from .components import STATIC, TokenHeatmap, module_source, stylesheet
from .views import NO_MODEL, ExplorerData

# page slot → component module (page.js calls them by these names)
MODULES = {
    "table": "ranked_table",
    "tokens": "token_heatmap",
    "pair": "layer_breakdown",
    "matrix": "layer_heatmap",
    "themes": "theme_clusters",
}

PAGE_CSS = """
body{margin:0;background:#fafafa}
.ik-page-head{background:#23395d;color:#fff;padding:12px 22px}
.ik-page-head h1{margin:0;font-size:19px}
.ik-page-head p{margin:4px 0 0;opacity:.85}
main{padding:12px 22px;max-width:1400px}
.ik-picker{display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.ik-picker select{font-size:14px;padding:3px;max-width:100%}
.ik-direction button{font:inherit;font-size:13px;border:1px solid #bbb;background:#eee;
  padding:3px 10px;cursor:pointer}
.ik-direction button[aria-pressed=true]{background:#23395d;color:#fff;border-color:#23395d}
nav.ik-tabs{margin-top:10px;border-bottom:1px solid #ccc}
nav.ik-tabs button{font:inherit;border:1px solid #ccc;border-bottom:none;background:#eee;
  padding:5px 14px;cursor:pointer;border-radius:4px 4px 0 0}
nav.ik-tabs button[aria-selected=true]{background:#fff;font-weight:600}
.ik-panel{background:#fff;border:1px solid #ccc;border-top:none;padding:10px 14px}
.ik-sequences{display:flex;gap:16px;flex-wrap:wrap}
#ik-table{flex:1 1 55%;min-width:360px}
.ik-detail{flex:1 1 38%;min-width:320px}
table.ik-facts{font-size:12px;border-collapse:collapse;margin:8px 0}
table.ik-facts th{text-align:left;padding-right:8px;color:#555;font-weight:600}
"""

INTRO = (
    "Which training sequences made the model give each completion? A positive score means "
    "up-weighting that sequence in training raises the completion's log-probability."
)


def write_html(
    path: str | os.PathLike,
    data: ExplorerData,
    *,
    title: str = "influencekit explorer",
    facts: dict[str, str] | None = None,
    token_rows: int = 3,
) -> Path:
    """Write ``data`` (every query) as one page; see the module docstring."""
    checks.count("token_rows", token_rows, minimum=0)
    queries = [_query_payload(data, q, token_rows) for q in range(data.n_queries)]
    # Themes shared by every query (from themes.across) would repeat their texts and map in
    # each query: what all queries have in common is written once.
    common, themes = _split_common([query["themes"] for query in queries])
    for query, own in zip(queries, themes, strict=True):
        query["themes"] = own
    payload = {
        "queries": queries,
        "themes_common": common,
        "no_tokens": TokenHeatmap.state(
            message=(
                f"Token scores are in this page for each query's top {token_rows} rows; "
                "InfluenceExplorer computes any row's in a notebook."
            )
            if data.can_score_tokens
            else NO_MODEL
        ),
    }
    page = _page(data, payload, title, facts or {})
    path = Path(path)
    tmp = temp_name(path)
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _query_payload(data: ExplorerData, q: int, token_rows: int) -> dict:
    """Query ``q``'s views: its most positive sequences, its most negative ones (``lowers``,
    when the result has every score) and its themes."""
    payload = {"themes": data.themes_state(q)}  # first: the table's chips need the themes
    payload.update(_direction_payload(data, q, token_rows, largest=True))
    if data.can_lower:
        payload["lowers"] = _direction_payload(data, q, token_rows, largest=False)
    return payload


def _direction_payload(data: ExplorerData, q: int, token_rows: int, *, largest: bool) -> dict:
    """Query ``q``'s table, matrix, layer bars and token rows in one direction."""
    rows = range(len(data.top(q, largest=largest)))
    token_rows = token_rows if data.can_score_tokens else 0
    return {
        "table": data.table_state(q, largest=largest),
        "matrix": data.matrix_state(q, largest=largest),
        "pair": [data.pair_state(q, r, largest=largest) for r in [-1, *rows]],
        "tokens": [data.token_state(q, r, largest=largest) for r in [-1, *rows[:token_rows]]],
    }


def _split_common(states: list[dict]) -> tuple[dict, list[dict]]:
    """The values every state has in common, and each state without them.

    Example:
        >>> _split_common([{"a": 1, "b": 2}, {"a": 1, "b": 3}])
        ({'a': 1}, [{'b': 2}, {'b': 3}])
    """
    first, rest = states[0], states[1:]
    common = {k: v for k, v in first.items() if all(k in s and s[k] == v for s in rest)}
    return common, [{k: v for k, v in s.items() if k not in common} for s in states]


def safe_json(payload) -> str:
    """JSON for a ``<script type="application/json">``: bytes as ``{"$bytes": base64}`` and
    ``<``, ``>``, ``&`` escaped, so nothing in it can close the script element.

    Example:
        >>> safe_json({"t": "</script>", "b": b"\\x00"})
        '{"t": "\\\\u003c/script\\\\u003e", "b": {"$bytes": "AA=="}}'
    """

    def encode(value):
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        raise ParameterError("payload", value, "JSON values or bytes (to write into the page)")

    text = json.dumps(payload, default=encode, allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _scripts() -> str:
    """Each component module as an expression yielding its ``{ render }``, then the driver."""
    parts = []
    for slot, name in MODULES.items():
        source = module_source(name)
        if source.count("export default { render };") != 1:
            raise FileFormatError(
                f"static/{name}.js must end with one 'export default {{ render }};'"
            )
        body = source.replace("export default { render };", "return { render };")
        parts.append(f"{slot}: (() => {{\n{body}\n}})()")
    modules = "const MODULES = {\n" + ",\n".join(parts) + "\n};\n"
    return modules + (STATIC / "page.js").read_text("utf-8")


def _direction_buttons(data: ExplorerData) -> str:
    """The most positive / most negative switch (only when the result has every score)."""
    if not data.can_lower:
        return ""
    return (
        '<span class="ik-direction" role="group" aria-label="which sequences">'
        '<button type="button" data-direction="1" aria-pressed="true">most positive</button>'
        '<button type="button" data-direction="-1" aria-pressed="false">most negative</button>'
        "</span>"
    )


def _page(data: ExplorerData, payload: dict, title: str, facts: dict[str, str]) -> str:
    options = "".join(
        f'<option value="{q}">{escape(data.query_label(q, 110))}</option>'
        for q in range(data.n_queries)
    )
    headers = "".join(
        f'<section class="ik-header" data-query="{q}" hidden>{data.header_html(q)}</section>'
        for q in range(data.n_queries)
    )
    fact_rows = "".join(
        f"<tr><th>{escape(str(name))}</th><td>{escape(str(value))}</td></tr>"
        for name, value in facts.items()
    )
    tabs = "".join(
        f'<button type="button" role="tab" data-tab="{name}" '
        f'aria-selected="{str(name == "sequences").lower()}">{label}</button>'
        for name, label in (("sequences", "Sequences"), ("layers", "Layers"), ("themes", "Themes"))
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{stylesheet()}{PAGE_CSS}</style></head>
<body class="ik">
<header class="ik-page-head"><h1>{escape(title)}</h1><p>{INTRO}</p></header>
<main>
<div class="ik-picker"><label for="ik-query"><b>Query</b></label>
<select id="ik-query">{options}</select>{_direction_buttons(data)}</div>
{headers}
<table class="ik-facts">{fact_rows}</table>
<nav class="ik-tabs" role="tablist">{tabs}</nav>
<div class="ik-panel" data-panel="sequences"><div class="ik-sequences">
<div id="ik-table"></div><div class="ik-detail"><div id="ik-tokens"></div><div id="ik-pair"></div>
</div></div></div>
<div class="ik-panel" data-panel="layers" hidden><div id="ik-matrix"></div></div>
<div class="ik-panel" data-panel="themes" hidden><div id="ik-themes"></div></div>
</main>
<script type="application/json" id="ik-data">{safe_json(payload)}</script>
<script>
{_scripts()}
</script>
</body></html>
"""
