"""``InfluenceExplorer``: a query's influence by sequence, layer, token and theme, in Jupyter.

An ipywidgets 8 layout (query picker, tabs) around the anywidget components of
:mod:`influencekit.widgets.components`; what each shows comes from
:class:`~influencekit.widgets.views.ExplorerData`. Picking a query refills the table, the
layer × sequence heatmap and the themes; clicking a row (or a heatmap column) shows that
pair's layer bars and, with ``model`` and ``factors``, its tokens (computed once, cached).
``explorer.selection`` is a synced trait holding what was clicked.

Example:
    >>> explorer = InfluenceExplorer(result, train, model=model, factors=factors)  # doctest: +SKIP
    >>> explorer                      # in a notebook cell: shows the explorer  # doctest: +SKIP
    >>> explorer.selection            # after clicking a row                     # doctest: +SKIP
    {'query': 0, 'query_id': 'q0', 'rank': 1, 'train_index': 17, 'train_id': '17', ...}
    >>> explorer.to_html("report.html")                                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import ipywidgets as w
import traitlets

from .. import checks
from ..data import Query
from ..errors import InfluenceKitError
from ..result import InfluenceResult
from .components import LayerBreakdown, LayerHeatmap, RankedTable, ThemeClusters, TokenHeatmap
from .views import ExplorerData

TABS = ("Sequences", "Layers", "Themes")


class InfluenceExplorer(w.VBox):
    """Explore ``result`` (scored against ``dataset``) query by query; see the module docstring.

    ``model`` and ``factors`` enable the per-token heatmap; ``themes`` is one ``Themes`` from
    ``themes.across``, a list of one per query from ``themes.for_query``, or ``None`` (TF-IDF
    clusters of every query's top ``k``, made when the Themes tab is first opened).
    ``queries`` (dicts with ``prompt``, ``completion``, optionally ``kind``, ``theme``,
    ``source``, or ``Query`` objects) default to the result's own (``result.queries``).
    The direction switch (``largest``) picks the most positive or the most negative sequences.
    """

    query = traitlets.Int(0).tag(sync=True)
    selection = traitlets.Dict().tag(sync=True)

    def __init__(
        self,
        result: InfluenceResult,
        dataset,
        model=None,
        factors=None,
        themes=None,
        *,
        queries: list[dict | Query] | None = None,
        k: int = 20,
        **kwargs,
    ) -> None:
        self.data = ExplorerData(
            result, dataset, model=model, factors=factors, themes=themes, queries=queries, k=k
        )
        self.picker = w.Dropdown(
            options=[(self.data.query_label(q), q) for q in range(self.data.n_queries)],
            description="Query",
            layout=w.Layout(width="min(100%, 720px)"),
        )
        self.direction = w.ToggleButtons(
            options=[("most positive", 1), ("most negative", -1)],
            tooltips=[
                "the sequences whose up-weighting raises the completion's log-probability most",
                "those that lower it most (not kept by a top-k result)",
            ],
            disabled=not self.data.can_lower,
            style={"button_width": "110px"},
        )
        self.header = w.HTML()
        self.table = RankedTable()
        self.tokens = TokenHeatmap()
        self.pair = LayerBreakdown()
        self.matrix = LayerHeatmap()
        self.themes = ThemeClusters(message="Open this tab to cluster the top sequences.")
        detail = w.VBox(
            [self.tokens, self.pair], layout=w.Layout(flex="1 1 40%", min_width="320px")
        )
        self.table.layout = w.Layout(flex="1 1 55%", min_width="360px")
        sequences = w.HBox([self.table, detail], layout=w.Layout(flex_flow="row wrap"))
        self.tabs = w.Tab(children=[sequences, self.matrix, self.themes], titles=TABS)
        controls = w.HBox([self.picker, self.direction], layout=w.Layout(flex_flow="row wrap"))
        super().__init__([controls, self.header, self.tabs], **kwargs)
        self.add_class("ik-explorer")
        self._themes_query = None  # the query the Themes tab was last filled for
        self.picker.observe(lambda change: setattr(self, "query", change["new"]), "value")
        self.direction.observe(lambda change: self._turn(), "value")
        self.table.observe(lambda change: self._select(change["new"]), "selected")
        self.matrix.observe(lambda change: self._follow_column(change["new"]), "selected")
        self.tabs.observe(lambda change: self._refresh_themes(), "selected_index")
        self._show_query(0)

    @traitlets.validate("query")
    def _check_query(self, proposal) -> int:
        if not 0 <= proposal["value"] < self.data.n_queries:
            raise traitlets.TraitError(f"query must be in 0..{self.data.n_queries - 1}")
        return proposal["value"]

    @traitlets.observe("query")
    def _on_query(self, change) -> None:
        self._show_query(change["new"])

    @property
    def largest(self) -> bool:
        """Whether the most positive sequences are shown (the direction switch's +1), rather
        than the most negative (-1)."""
        return self.direction.value > 0

    def _show_query(self, q: int) -> None:
        self.picker.value = q
        self.header.value = self.data.header_html(q)
        self._refresh_themes(fill_table=False)  # first: the table shows their clusters
        self.table.apply(self.data.table_state(q, largest=self.largest))  # selected back to -1
        self.matrix.apply(self.data.matrix_state(q, largest=self.largest))
        self._select(-1)

    def _turn(self) -> None:
        """Show the query's most positive or most negative sequences, as the switch says."""
        self._show_query(self.query)

    def _select(self, r: int) -> None:
        """Show row ``r`` of the table (-1: none) in the detail views and ``selection``."""
        if self.table.selected != r:
            self.table.selected = r  # its observer comes back here, once, to do the rest
            return
        q, largest = self.query, self.largest
        self.matrix.selected = r
        self.selection = self.data.selection(q, r, largest=largest)
        self.pair.apply(self.data.pair_state(q, r, largest=largest))
        if r >= 0 and self.data.can_score_tokens:
            self.tokens.show(message="Computing token scores…")
        try:
            self.tokens.apply(self.data.token_state(q, r, largest=largest))
        except (InfluenceKitError, ValueError) as err:  # shown, not raised into the kernel log
            self.tokens.show(message=f"Token scores failed: {err}")

    def _follow_column(self, c: int) -> None:
        if c != self.table.selected:
            self._select(c)

    def _refresh_themes(self, fill_table: bool = True) -> None:
        """Fill the Themes tab for the current query, if it is open and not yet filled."""
        if self.tabs.selected_index != TABS.index("Themes") or self._themes_query == self.query:
            return
        if not self.data.has_themes:
            self.themes.show(message="Clustering the top sequences…")  # once, under a second
        self.themes.apply(self.data.themes_state(self.query))
        self._themes_query = self.query
        if fill_table:  # the table's cluster chips exist once the themes do
            state = self.data.table_state(self.query, largest=self.largest)
            self.table.apply({**state, "selected": self.table.selected})

    def select(self, rank: int) -> dict:
        """Select the sequence at ``rank`` (1-based) of the current query, as a click would.

        Example:
            >>> explorer.select(1)["train_id"]   # doctest: +SKIP
        """
        n = len(self.data.top(self.query, largest=self.largest))
        self._select(checks.count("rank", rank, minimum=1, maximum=n, allowed=f"in 1..{n}") - 1)
        return self.selection

    def to_html(
        self,
        path: str | os.PathLike,
        *,
        title: str = "influencekit explorer",
        facts: dict[str, str] | None = None,
        token_rows: int = 3,
    ) -> Path:
        """Write the explorer as one self-contained HTML page (works offline from ``file://``).

        Every query is in the page; the token heatmap is included for each query's top
        ``token_rows`` rows (when the explorer has a model and factors). ``facts`` are shown
        as a small table of settings. Written atomically.

        Example:
            >>> explorer.to_html("report.html", token_rows=3)   # doctest: +SKIP
        """
        from .export import write_html

        return write_html(path, self.data, title=title, facts=facts, token_rows=token_rows)
