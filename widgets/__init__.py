"""Jupyter widgets and static pages for influence results.

- :class:`InfluenceExplorer`: pick a query; its top training sequences, each one's tokens
  and layers, the layer × sequence heatmap and the themes; ``to_html`` writes it as a page.
- Standalone components on plain arrays: :class:`TokenHeatmap`, :class:`LayerBreakdown`,
  :class:`LayerHeatmap`, :class:`RankedTable`, :class:`ThemeClusters`.

Example:
    >>> from influencekit.widgets import InfluenceExplorer   # doctest: +SKIP
    >>> InfluenceExplorer(result, train, model=model, factors=factors)   # doctest: +SKIP
"""

from .components import LayerBreakdown, LayerHeatmap, RankedTable, ThemeClusters, TokenHeatmap
from .explorer import InfluenceExplorer
from .views import ExplorerData, format_score

__all__ = [
    "ExplorerData",
    "InfluenceExplorer",
    "LayerBreakdown",
    "LayerHeatmap",
    "RankedTable",
    "ThemeClusters",
    "TokenHeatmap",
    "format_score",
]
