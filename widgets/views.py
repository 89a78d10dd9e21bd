"""What the explorer shows, as plain data: one place for both the live widget and the page.

:class:`ExplorerData` turns a result and its dataset into the states of the components
(:mod:`influencekit.widgets.components`) for a query, a row or a pair: the ranked table, the
layer × sequence matrix, one pair's layer bars, its token heatmap (computed on demand with
:func:`influencekit.token_scores` and cached) and the query's theme clusters. The live
:class:`~influencekit.widgets.InfluenceExplorer` sets these states on its widgets; the static
export (:mod:`influencekit.widgets.export`) writes them into the page.

Example:
    >>> data = ExplorerData(result, train, model=model, factors=factors)   # doctest: +SKIP
    >>> data.table_state(0)["rows"][0]["id"]                                # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

from .. import checks
from ..data import Query
from ..errors import DataError, ParameterError
from ..result import InfluenceResult
from ..themes import Themes
from .components import (
    LayerBreakdown,
    LayerHeatmap,
    RankedTable,
    ThemeClusters,
    TokenHeatmap,
    group_names,
    snippet,
    theme_state,
)

NO_MODEL = "Per-token scores need the model and factors: InfluenceExplorer(..., model=, factors=)."


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


class ExplorerData:
    """The component states of a result: see the module docstring.

    ``queries`` (dicts with ``prompt``, ``completion`` and optionally ``kind``, ``theme``,
    ``source``, or :class:`~influencekit.Query` objects) default to the result's own
    (``result.queries``, recorded by ``score``). ``themes`` is one
    :class:`~influencekit.themes.Themes` for all queries (from ``themes.across``), a list with
    one per query (from ``themes.for_query``), or ``None`` to cluster every query's top ``k``
    by TF-IDF (``themes.across``) on first use.

    The methods that depend on the direction take ``largest``: ``True`` for the sequences
    that raise the completion's log-probability most, ``False`` for those that lower it most.
    """

    def __init__(
        self,
        result: InfluenceResult,
        dataset,
        *,
        model=None,
        factors=None,
        themes=None,
        queries: Sequence[dict | Query] | None = None,
        k: int = 20,
        width: int = 160,
    ) -> None:
        self.result = checks.instance("result", result, InfluenceResult, "an InfluenceResult")
        self.k = checks.count("k", k)
        self.width = checks.count("width", width)
        self.model, self.factors = model, factors
        self.queries = _queries(result, queries)
        self._themes = _checked_themes(themes, len(self.queries))
        self.examples = _examples_by_id(result, dataset)
        self.tokenizer = getattr(dataset, "tokenizer", None)
        self.groups = group_names(result.layers)
        self._tokens: dict[tuple[int, int], np.ndarray] = {}
        self._tops: dict[tuple[int, bool], list[tuple[int, int, float]]] = {}

    # -- queries -------------------------------------------------------------------------

    @property
    def n_queries(self) -> int:
        return len(self.queries)

    def query_label(self, q: int, width: int = 70) -> str:
        """``id: prompt → completion`` on one line, for the query picker."""
        query = self.queries[q]
        text = f"{query.get('prompt', '')}→{query.get('completion', '')}"
        return snippet(f"{query['id']}: {text}", width)

    def header_html(self, q: int) -> str:
        """The query's prompt and completion, badges and source note: escaped HTML."""
        query = self.queries[q]
        themes = query.get("theme") or []
        themes = [themes] if isinstance(themes, str) else list(themes)
        badges = "".join(
            f'<span class="ik-badge">{escape(str(b))}</span>'
            for b in [query.get("kind"), *themes]
            if b
        )
        return (
            f'<div class="ik-query"><b>{escape(str(query["id"]))}</b> {badges}'
            f'<p class="ik-prompt">{escape(str(query.get("prompt", "")))}'
            f'<span class="ik-completion">{escape(str(query.get("completion", "")))}</span></p>'
            f"{self._source_note(q)}</div>"
        )

    def _source_note(self, q: int) -> str:
        source = self.queries[q].get("source")
        if not source:
            return ""
        rank = ""
        if source in self.examples and not self.result.is_top_k:
            position = self.result.rank(q, self.result.train_ids.index(source))
            rank = f": rank {position:,} of {len(self.result.train_ids):,}"
        return (
            f'<p class="ik-note">Restates training sequence <b>{escape(str(source))}</b>{rank} '
            "(green when in the table).</p>"
        )

    # -- the ranked table and its layers -------------------------------------------------

    @property
    def can_lower(self) -> bool:
        """Whether the most negative sequences are known (a top-k result keeps only the top)."""
        return not self.result.is_top_k

    def top(self, q: int, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """``(column, training index, score)`` of query ``q``'s ``k`` highest scores
        (``largest``) or lowest, the most extreme first (:meth:`InfluenceResult.columns`)."""
        key = (q, checks.flag("largest", largest))
        if key not in self._tops:
            columns = self.result.columns(q, self.k, largest=largest)
            index = self.result.train_index(q, columns)
            row = self.result.scores[q]
            self._tops[key] = [
                (int(c), int(i), float(row[c])) for c, i in zip(columns, index, strict=True)
            ]
        return self._tops[key]

    def example(self, i: int):
        """The dataset example of training index ``i`` of the result."""
        return self.examples[self.result.train_ids[i]]

    def table_state(self, q: int, *, largest: bool = True) -> dict:
        top = self.top(q, largest=largest)
        sign = 1 if largest else -1
        # the query's whole influence in this direction: it needs every score, not a top k
        pulled = (
            0.0
            if self.result.is_top_k
            else float(np.clip(sign * self.result.scores[q], 0, None).sum())
        )
        clusters = self._cluster_of(q)
        source = self.queries[q].get("source")
        rows, shares = [], []
        for rank, (_, i, value) in enumerate(top, start=1):
            ex = self.example(i)
            rows.append(
                {
                    "rank": rank,
                    "id": ex.id,
                    "text": snippet(ex.text, self.width),
                    "full": ex.text,
                    "theme": str(ex.metadata.get("theme", "") or ""),
                    "cluster": clusters.get(i, -1),
                    "marked": ex.id == source,
                }
            )
            shares.append(sign * value / pulled if pulled > 0 and sign * value > 0 else np.nan)
        title = f"Top {len(top)} of {len(self.result.train_ids):,} training sequences"
        if not largest:
            title = f"The {len(top)} most negative of {len(self.result.train_ids):,} sequences"
            if self.result.meta.get("refined"):  # score(..., refine=K) rescored only the top K
                title += " (from the store's compressed gradients: only top ones were rescored)"
        return RankedTable.state(rows, [v for _, _, v in top], shares, title=title)

    def matrix_state(self, q: int, *, largest: bool = True) -> dict:
        top = self.top(q, largest=largest)
        values = self.result.layer_scores[q, [c for c, _, _ in top]].T
        labels = [f"#{r} {self.example(i).id}" for r, (_, i, _) in enumerate(top, start=1)]
        return LayerHeatmap.state(
            self.result.layers,
            values,
            columns=labels,
            groups=self.groups,
            title="Influence per layer of each top sequence (click a column)",
        )

    def pair_state(self, q: int, r: int, *, largest: bool = True) -> dict:
        """Layer bars of query ``q`` and its row ``r`` (``r < 0``: the top ``k`` together, as
        shares: :meth:`InfluenceResult.layer_shares`)."""
        if r < 0:
            return LayerBreakdown.state(
                self.result.layers,
                self.result.layer_shares(q, self.k, largest=largest),
                groups=self.groups,
                percent=True,
                title=f"Share per layer of the {self._which(q, largest)}'s summed influence",
            )
        column, i, _ = self.top(q, largest=largest)[r]
        return LayerBreakdown.state(
            self.result.layers,
            self.result.layer_scores[q, column],
            groups=self.groups,
            title=f"Per layer: #{r + 1} {self.example(i).id}",
        )

    def _which(self, q: int, largest: bool) -> str:
        n = len(self.top(q, largest=largest))
        return f"top {n}" if largest else f"{n} most negative"

    def selection(self, q: int, r: int, *, largest: bool = True) -> dict:
        """What is selected, as plain values a notebook can read."""
        base = {
            "query": q,
            "query_id": self.queries[q]["id"],
            "direction": "raises" if largest else "lowers",
        }
        if r < 0:
            return base
        _, i, value = self.top(q, largest=largest)[r]
        return {
            **base,
            "rank": r + 1,
            "train_index": i,
            "train_id": self.example(i).id,
            "score": value,
        }

    # -- tokens --------------------------------------------------------------------------

    @property
    def can_score_tokens(self) -> bool:
        return self.model is not None and self.factors is not None

    def token_values(self, q: int, i: int) -> np.ndarray:
        """Per-token scores of query ``q`` and training index ``i`` (computed once, cached)."""
        if (q, i) not in self._tokens:
            from ..scoring import token_scores

            query = self.queries[q]
            record = {"prompt": query["prompt"], "completion": query["completion"]}
            self._tokens[q, i] = token_scores(self.model, self.factors, record, self.example(i))
        return self._tokens[q, i]

    def token_state(self, q: int, r: int, *, largest: bool = True, compute: bool = True) -> dict:
        """The token heatmap of row ``r`` (a message instead when it cannot be shown)."""
        if r < 0:
            return TokenHeatmap.state(message="Click a row to see its tokens.")
        _, i, value = self.top(q, largest=largest)[r]
        ex = self.example(i)
        if not self.can_score_tokens:
            return TokenHeatmap.state(message=NO_MODEL)
        if not {"prompt", "completion"} <= set(self.queries[q]):
            return TokenHeatmap.state(
                message="This query's prompt and completion are not in the result: pass queries="
            )
        if not compute and (q, i) not in self._tokens:
            return TokenHeatmap.state(message="Token scores were not computed for this row.")
        scores = self.token_values(q, i)
        tokenizer = self.tokenizer or getattr(ex, "tokenizer", None)
        tokens = [tokenizer.decode([int(t)]) for t in ex.input_ids]
        return TokenHeatmap.state(
            tokens, scores, title=f"#{r + 1} {ex.id} token by token (score {format_score(value)})"
        )

    # -- themes --------------------------------------------------------------------------

    @property
    def has_themes(self) -> bool:
        """Whether the themes exist yet (given, or clustered on first use)."""
        return self._themes is not None

    def themes_for(self, q: int):
        """The :class:`~influencekit.themes.Themes` shown for query ``q``."""
        if self._themes is None:
            from ..themes import across

            self._themes = across(self.result, list(self.examples.values()), top_k=self.k)
        return self._themes[q] if isinstance(self._themes, list) else self._themes

    def _cluster_of(self, q: int) -> dict[int, int]:
        """Training index → cluster, for the sequences the themes cover."""
        if not self.has_themes:
            return {}
        found = self.themes_for(q)
        if found.indices is None:  # not from for_query / across: the Themes tab says so
            return {}
        return {int(i): int(c) for i, c in zip(found.indices, found.labels, strict=True)}

    def themes_state(self, q: int) -> dict:
        """The Themes view of query ``q``; a message instead when clustering fails."""
        try:
            return self._themes_state(q)
        except (ValueError, ArithmeticError) as err:  # DataError, ParameterError: ValueErrors
            return ThemeClusters.state(message=f"No themes: {err}")

    def _themes_state(self, q: int) -> dict:
        found = self.themes_for(q)
        if found.indices is None:
            raise ParameterError(
                "themes", found, "Themes from themes.for_query or themes.across (with indices)"
            )
        per_query = found.matrix is not None and len(found.matrix) == self.n_queries
        shares = found.matrix[q] if per_query else found.shares
        scores = dict((i, v) for _, i, v in self.top(q, largest=True))
        weights = [scores.get(int(i), 0.0) for i in found.indices]
        highlight = [int(int(i) in scores) for i in found.indices]
        what = "every query's" if per_query else "this query's"
        return theme_state(
            found,
            shares=shares,
            weights=weights,
            highlight=highlight,
            title=f"{found.n_clusters} themes among {what} top sequences ({found.method}); "
            "shares are of this query's positive influence",
            width=self.width,
        )


def _examples_by_id(result, dataset) -> dict:
    examples = {ex.id: ex for ex in dataset}
    missing = [i for i in result.train_ids if i not in examples]
    if missing:
        raise DataError(
            f"{len(missing)} training id(s) of the result are not in the dataset "
            f"{getattr(dataset, 'source', '')!r}, first {missing[0]!r}"
        )
    return examples


def _queries(result: InfluenceResult, queries) -> list[dict]:
    """One description per query of the result, as a dict holding the result's query id."""
    n = len(result.query_ids)
    if queries is None:
        # score() records each query's prompt and completion; a hand-made result may not
        queries = result.queries if result.queries is not None else [{}] * n
    elif isinstance(queries, (str, bytes, Mapping)) or not isinstance(queries, Sequence):
        raise ParameterError("queries", queries, "a list of dicts or Query objects, or None")
    if len(queries) != n:
        raise ParameterError(
            "queries", f"{len(queries)} query descriptions for {n} queries", f"one per query ({n})"
        )
    described = []
    for position, (qid, query) in enumerate(zip(result.query_ids, queries, strict=True)):
        if isinstance(query, Query):
            fields = {"prompt": query.prompt, "completion": query.completion, **query.metadata}
        elif isinstance(query, Mapping):
            fields = dict(query)
        else:
            raise ParameterError(
                "queries", queries, f"a list of dicts or Query objects (queries[{position}] is not)"
            )
        described.append({**fields, "id": qid})
    return described


def _checked_themes(themes, n_queries: int):
    """``None``, one :class:`Themes`, or a list of one per query."""
    if themes is None or isinstance(themes, Themes):
        return themes
    if isinstance(themes, list) and all(isinstance(found, Themes) for found in themes):
        if len(themes) != n_queries:
            raise ParameterError(
                "themes",
                f"{len(themes)} Themes for {n_queries} queries",
                f"a list of one Themes per query ({n_queries})",
            )
        return themes
    raise ParameterError(
        "themes",
        themes,
        "None, a Themes (from themes.across) or a list of one per query (themes.for_query)",
    )
