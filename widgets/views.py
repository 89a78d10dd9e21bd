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

from html import escape

import numpy as np

from ..errors import DataError
from ..result import InfluenceResult
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

    ``queries`` (dicts with ``prompt``, ``completion`` and optionally ``id``, ``kind``,
    ``theme``, ``source``) default to what ``score`` recorded in ``result.meta``. ``themes`` is
    one :class:`~influencekit.themes.Themes` for all queries (from ``themes.across``), a list
    with one per query (from ``themes.for_query``), or ``None`` to cluster every query's top
    ``k`` by TF-IDF (``themes.across``) on first use.
    """

    def __init__(
        self,
        result: InfluenceResult,
        dataset,
        *,
        model=None,
        factors=None,
        themes=None,
        queries: list[dict] | None = None,
        k: int = 20,
        width: int = 160,
    ) -> None:
        if not isinstance(result, InfluenceResult):
            raise TypeError(f"result must be an InfluenceResult, got {type(result).__name__}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.result, self.k, self.width = result, k, width
        self.model, self.factors = model, factors
        self.examples = _examples_by_id(result, dataset)
        self.tokenizer = getattr(dataset, "tokenizer", None)
        self.queries = _queries(result, queries)
        self.groups = group_names(result.layers)
        if isinstance(themes, list) and len(themes) != len(self.queries):
            raise DataError(f"themes: {len(themes)} Themes for {len(self.queries)} queries")
        self._themes = themes
        self._tokens: dict[tuple[int, int], np.ndarray] = {}
        self._tops = {}
        # +1: the sequences that raise the completion's log-probability most; -1: lower it
        self.sign = 1

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

    def top(self, q: int, sign: int | None = None) -> list[tuple[int, int, float]]:
        """``(column, training index, score)`` of query ``q``'s ``k`` highest scores (``sign``
        +1, by default ``self.sign``) or lowest (-1), the most extreme first."""
        sign = self.sign if sign is None else sign
        if sign < 0 and not self.can_lower:
            raise ValueError("a top-k result keeps only each query's highest scores")
        if (q, sign) not in self._tops:
            row = self.result.scores[q]
            columns = np.argsort(-sign * row, kind="stable")[: self.k]
            index = self.result.indices[q] if self.result.is_top_k else np.arange(len(row))
            self._tops[q, sign] = [(int(c), int(index[c]), float(row[c])) for c in columns]
        return self._tops[q, sign]

    def example(self, i: int):
        """The dataset example of training index ``i`` of the result."""
        return self.examples[self.result.train_ids[i]]

    def table_state(self, q: int) -> dict:
        top, sign = self.top(q), self.sign
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
        if sign < 0:
            title = f"The {len(top)} most negative of {len(self.result.train_ids):,} sequences"
            if self.result.meta.get("refined"):  # score(..., refine=K) rescored only the top K
                title += " (from the store's compressed gradients: only top ones were rescored)"
        return RankedTable.state(rows, [v for _, _, v in top], shares, title=title)

    def matrix_state(self, q: int) -> dict:
        top = self.top(q)
        values = self.result.layer_scores[q, [c for c, _, _ in top]].T
        labels = [f"#{r} {self.example(i).id}" for r, (_, i, _) in enumerate(top, start=1)]
        return LayerHeatmap.state(
            self.result.layers,
            values,
            columns=labels,
            groups=self.groups,
            title="Influence per layer of each top sequence (click a column)",
        )

    def pair_state(self, q: int, r: int) -> dict:
        """Layer bars of query ``q`` and its row ``r`` (``r < 0``: the top ``k`` together, as
        shares)."""
        if r < 0:
            per_layer = self.result.layer_scores[q, [c for c, _, _ in self.top(q)]].sum(axis=0)
            total = per_layer.sum()
            shares = per_layer / total if total != 0 else np.zeros_like(per_layer)
            return LayerBreakdown.state(
                self.result.layers,
                shares,
                groups=self.groups,
                percent=True,
                title=f"Share per layer of the {self._which(q)}'s summed influence",
            )
        column, i, _ = self.top(q)[r]
        return LayerBreakdown.state(
            self.result.layers,
            self.result.layer_scores[q, column],
            groups=self.groups,
            title=f"Per layer: #{r + 1} {self.example(i).id}",
        )

    def _which(self, q: int) -> str:
        n = len(self.top(q))
        return f"top {n}" if self.sign > 0 else f"{n} most negative"

    def selection(self, q: int, r: int) -> dict:
        """What is selected, as plain values a notebook can read."""
        base = {
            "query": q,
            "query_id": self.queries[q]["id"],
            "direction": "raises" if self.sign > 0 else "lowers",
        }
        if r < 0:
            return base
        _, i, value = self.top(q)[r]
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

    def token_state(self, q: int, r: int, *, compute: bool = True) -> dict:
        """The token heatmap of row ``r`` (a message instead when it cannot be shown)."""
        if r < 0:
            return TokenHeatmap.state(message="Click a row to see its tokens.")
        _, i, value = self.top(q)[r]
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
        except (ValueError, ArithmeticError) as err:  # DataError is a ValueError
            return ThemeClusters.state(message=f"No themes: {err}")

    def _themes_state(self, q: int) -> dict:
        found = self.themes_for(q)
        if found.indices is None:
            raise DataError("themes: give Themes from themes.for_query or themes.across")
        per_query = found.matrix is not None and len(found.matrix) == self.n_queries
        shares = found.matrix[q] if per_query else found.shares
        scores = dict((i, v) for _, i, v in self.top(q, sign=1))
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


def _queries(result, queries: list[dict] | None) -> list[dict]:
    if queries is None:
        # score() records each query's prompt and completion; a hand-made result may not
        queries = result.meta.get("queries") or [{}] * len(result.query_ids)
    if len(queries) != len(result.query_ids):
        raise DataError(
            f"{len(queries)} query descriptions for {len(result.query_ids)} queries in the result"
        )
    return [
        {**dict(query), "id": qid} for qid, query in zip(result.query_ids, queries, strict=True)
    ]
