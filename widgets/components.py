"""Standalone visuals on plain arrays: anywidget components with vanilla ES modules.

Each component is an ``anywidget.AnyWidget`` whose front end is a small ES module shipped in
``widgets/static`` (with ``common.js`` prepended: anywidget loads each module on its own).
Nothing is built or fetched at run time. Numeric arrays travel as binary buffers (``Bytes``
traits holding little-endian float64/float32/int32), text as lists of strings; the modules
put text on the page only through ``textContent``, so corpus text can never become markup.

Every component has a ``state(...)`` static method that validates its inputs and returns
the trait values; the constructor and :meth:`show` (update in place) both go through it,
and the static export serialises the same dictionaries.

Example:
    >>> import numpy as np
    >>> heat = TokenHeatmap(["The", " cat", " sat"], np.array([0.5, -0.25, 1.0]))
    >>> heat.tokens, np.frombuffer(heat.scores).tolist()
    (['The', ' cat', ' sat'], [0.5, -0.25, 1.0])
    >>> heat.show(["a"], [2.0]); heat.tokens
    ['a']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anywidget
import numpy as np
import traitlets

from ..analysis.layers import layer_groups
from ..errors import NonFiniteError, ParameterError

STATIC = Path(__file__).parent / "static"


def module_source(name: str) -> str:
    """The ES module of component ``name`` (``common.js`` + ``static/{name}.js``)."""
    return (
        (STATIC / "common.js").read_text("utf-8")
        + "\n"
        + (STATIC / f"{name}.js").read_text("utf-8")
    )


def stylesheet() -> str:
    """The components' CSS (every rule scoped under ``.ik``)."""
    return (STATIC / "widgets.css").read_text("utf-8")


def as_bytes(
    values, field: str, *, dtype=np.float64, shape: tuple | None = None, allow_nan: bool = False
) -> bytes:
    """``values`` as little-endian bytes of ``dtype``, checked for shape and finiteness.

    Example:
        >>> np.frombuffer(as_bytes([1, 2], "x"), "<f8").tolist()
        [1.0, 2.0]
    """
    array = np.asarray(values, dtype=dtype)
    if shape is not None and array.shape != shape:
        raise ParameterError(field, f"an array of shape {array.shape}", f"of shape {shape}")
    if array.dtype.kind == "f":
        bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise NonFiniteError(
                f"{field}: {int(bad.sum())} non-finite value(s), first at position {where}"
            )
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def group_names(layers: Sequence[str], groups=None) -> list[str]:
    """One group name per layer: given as a list, as ``{group: [positions]}`` (the form of
    :func:`influencekit.analysis.layer_groups`), or found from the names' block numbers
    (``""`` for every layer when they have none).

    Example:
        >>> group_names(["h.0.mlp", "h.1.mlp", "h.2.mlp"])
        ['lower', 'middle', 'upper']
    """
    if groups is None:
        try:
            groups = layer_groups(layers)
        except ValueError:  # no block numbers in the names: one ungrouped list
            return [""] * len(layers)
    if isinstance(groups, Mapping):
        names = [""] * len(layers)
        for name, positions in groups.items():
            for p in positions:
                names[p] = str(name)
        return names
    groups = [str(g) for g in groups]
    if len(groups) != len(layers):
        raise ParameterError(
            "groups", f"{len(groups)} names for {len(layers)} layers", "one name per layer"
        )
    return groups


class _Component(anywidget.AnyWidget):
    """Shared traits and the validate-then-set update of every component."""

    _css = stylesheet()
    title = traitlets.Unicode("").tag(sync=True)
    message = traitlets.Unicode("").tag(sync=True)  # shown when there is nothing to draw

    def __init__(self, *args, layout=None, **kwargs) -> None:
        """Takes the arguments of the subclass's ``state`` (and an ipywidgets ``layout``)."""
        extra = {} if layout is None else {"layout": layout}
        super().__init__(**type(self).state(*args, **kwargs), **extra)

    @staticmethod
    def state(*args, **kwargs) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(title={self.title!r})"

    def show(self, *args, **kwargs) -> None:
        """Replace what is shown (same arguments as the constructor); one message to the page."""
        self.apply(type(self).state(*args, **kwargs))

    def apply(self, state: dict) -> None:
        """Set the trait values of a ``state(...)`` dictionary together."""
        with self.hold_sync():
            for name, value in state.items():
                setattr(self, name, value)


class TokenHeatmap(_Component):
    """One sequence token by token, coloured by each token's signed score on a diverging,
    zero-centred scale (blue raises the completion's log-probability, red lowers it).

    Hovering a token shows it with its exact score (also in the span's ``title``) and sets
    ``hovered`` to its position.

    Example:
        >>> TokenHeatmap(["a", "b"], [0.1, -0.3], title="pair").scale
        0.0
    """

    _esm = module_source("token_heatmap")
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    scores = traitlets.Bytes(b"").tag(sync=True)
    scale = traitlets.Float(0.0).tag(sync=True)  # 0: the largest |score|
    hovered = traitlets.Int(-1).tag(sync=True)

    @staticmethod
    def state(tokens=(), scores=(), *, title: str = "", scale: float = 0.0, message: str = ""):
        tokens = [str(t) for t in tokens]
        if scale < 0 or not np.isfinite(scale):
            raise ParameterError("scale", scale, "a finite number >= 0")
        return {
            "tokens": tokens,
            "scores": as_bytes(scores, "scores", shape=(len(tokens),)),
            "scale": float(scale),
            "title": title,
            "message": message,
            "hovered": -1,
        }


class LayerBreakdown(_Component):
    """One bar per layer, diverging around zero, grouped lower / middle / upper with each
    group's total.

    Example:
        >>> bars = LayerBreakdown(["h.0.mlp", "h.1.mlp", "h.2.mlp"], [0.5, 0.3, 0.2])
        >>> bars.groups
        ['lower', 'middle', 'upper']
    """

    _esm = module_source("layer_breakdown")
    layers = traitlets.List(traitlets.Unicode()).tag(sync=True)
    values = traitlets.Bytes(b"").tag(sync=True)
    groups = traitlets.List(traitlets.Unicode()).tag(sync=True)
    percent = traitlets.Bool(False).tag(sync=True)

    @staticmethod
    def state(
        layers=(),
        values=(),
        *,
        groups=None,
        title: str = "",
        percent: bool = False,
        message: str = "",
    ) -> dict:
        layers = [str(name) for name in layers]
        return {
            "layers": layers,
            "values": as_bytes(values, "values", shape=(len(layers),)),
            "groups": group_names(layers, groups) if layers else [],
            "percent": bool(percent),
            "title": title,
            "message": message,
        }


class LayerHeatmap(_Component):
    """A layers × columns matrix (e.g. a query's top sequences) on one symmetric diverging
    scale; clicking a column sets ``selected``.

    Example:
        >>> LayerHeatmap(["h.0.mlp", "h.1.mlp"], np.ones((2, 3)), columns=["a", "b", "c"]).columns
        ['a', 'b', 'c']
    """

    _esm = module_source("layer_heatmap")
    layers = traitlets.List(traitlets.Unicode()).tag(sync=True)
    groups = traitlets.List(traitlets.Unicode()).tag(sync=True)
    columns = traitlets.List(traitlets.Unicode()).tag(sync=True)
    values = traitlets.Bytes(b"").tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    normalize = traitlets.Bool(False).tag(sync=True)  # each column on its own scale (a checkbox)

    @staticmethod
    def state(
        layers=(),
        values=None,
        *,
        columns=None,
        groups=None,
        title: str = "",
        selected: int = -1,
        message: str = "",
    ) -> dict:
        layers = [str(name) for name in layers]
        values = np.zeros((len(layers), 0)) if values is None else np.asarray(values, float)
        if values.ndim != 2 or values.shape[0] != len(layers):
            raise ParameterError(
                "values",
                f"an array of shape {values.shape}",
                f"2-D with one row per layer, expected ({len(layers)}, columns)",
            )
        columns = [str(c + 1) for c in range(values.shape[1])] if columns is None else columns
        if len(columns) != values.shape[1]:
            raise ParameterError(
                "columns",
                f"{len(columns)} labels for {values.shape[1]} columns",
                "one label per column of values",
            )
        return {
            "layers": layers,
            "groups": group_names(layers, groups) if layers else [],
            "columns": [str(c) for c in columns],
            "values": as_bytes(values, "values"),
            "selected": int(selected),
            "title": title,
            "message": message,
        }


class RankedTable(_Component):
    """Ranked training sequences; clicking a row (or the arrow keys) sets ``selected``.

    ``rows`` are dicts with ``id`` and ``text`` and optionally ``rank`` (default: position
    + 1), ``full`` (the whole text, shown on hover), ``theme``, ``cluster`` (a coloured chip;
    -1 for none) and ``marked`` (highlighted, e.g. the quote a query restates). ``shares``
    are each row's share of the query's positive influence; NaN shows as "–".

    Example:
        >>> table = RankedTable([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}], [2.0, 1.0])
        >>> [row["rank"] for row in table.rows], table.selected
        ([1, 2], -1)
    """

    _esm = module_source("ranked_table")
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    scores = traitlets.Bytes(b"").tag(sync=True)
    shares = traitlets.Bytes(b"").tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)

    @staticmethod
    def state(
        rows=(), scores=(), shares=None, *, title: str = "", selected: int = -1, message: str = ""
    ) -> dict:
        clean = []
        for r, row in enumerate(rows):
            missing = {"id", "text"} - set(row)
            if missing:
                lacks = ", ".join(sorted(missing))
                raise ParameterError(
                    "rows", rows, f"dicts with 'id' and 'text' (rows[{r}] lacks {lacks})"
                )
            clean.append(
                {
                    "rank": int(row.get("rank", r + 1)),
                    "id": str(row["id"]),
                    "text": str(row["text"]),
                    "full": str(row.get("full", row["text"])),
                    "theme": str(row.get("theme") or ""),
                    "cluster": int(row.get("cluster", -1)),
                    "marked": bool(row.get("marked", False)),
                }
            )
        n = len(clean)
        shares = np.full(n, np.nan) if shares is None else shares
        if not -1 <= selected < n:
            raise ParameterError("selected", selected, f"-1 or a row below {n}")
        return {
            "rows": clean,
            "scores": as_bytes(scores, "scores", shape=(n,)),
            "shares": as_bytes(shares, "shares", shape=(n,), allow_nan=True),
            "selected": int(selected),
            "title": title,
            "message": message,
        }


class ThemeClusters(_Component):
    """Clusters with their titles, terms, sizes, influence shares and a representative
    member, the selected cluster's members, and a 2-D map of the sequences coloured by
    cluster (hover a point for its text).

    ``points`` is ``(n, 2)``; ``assignment[i]`` the cluster of sequence ``i``; ``weights``
    (optional) each sequence's influence, which orders the member lists; ``highlight``
    (optional booleans) draws those points larger; ``caption`` is a line under the map (from
    :meth:`from_themes`: how the number of clusters was chosen). :meth:`from_themes` takes a
    :class:`influencekit.themes.Themes`.

    Example:
        >>> view = ThemeClusters(["cats", "stocks"], [["cat"], ["stock"]], [1, 1], [0.7, 0.3],
        ...                      np.array([[0, 0], [1, 1]]), [0, 1], ["a cat", "stocks fell"])
        >>> view.names, view.selected
        (['cats', 'stocks'], -1)
    """

    _esm = module_source("theme_clusters")
    names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    terms = traitlets.List(traitlets.List(traitlets.Unicode())).tag(sync=True)
    sizes = traitlets.Bytes(b"").tag(sync=True)
    shares = traitlets.Bytes(b"").tag(sync=True)
    points = traitlets.Bytes(b"").tag(sync=True)
    assignment = traitlets.Bytes(b"").tag(sync=True)
    snippets = traitlets.List(traitlets.Unicode()).tag(sync=True)
    representatives = traitlets.List(traitlets.Int()).tag(sync=True)
    weights = traitlets.Bytes(b"").tag(sync=True)
    highlight = traitlets.Bytes(b"").tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    caption = traitlets.Unicode("").tag(sync=True)

    @staticmethod
    def state(
        names=(),
        terms=(),
        sizes=(),
        shares=(),
        points=None,
        assignment=(),
        snippets=(),
        *,
        representatives=None,
        weights=None,
        highlight=None,
        title: str = "",
        selected: int = -1,
        message: str = "",
        caption: str = "",
    ) -> dict:
        k, n = len(names), len(snippets)
        representatives = [] if representatives is None else [int(i) for i in representatives]
        if representatives and (
            len(representatives) != k or not all(0 <= i < n for i in representatives)
        ):
            raise ParameterError(
                "representatives",
                representatives,
                f"one snippet number per cluster ({k}), each in 0..{n - 1}",
            )
        if len(terms) != k:
            raise ParameterError(
                "terms", f"{len(terms)} lists for {k} clusters", "one list of terms per cluster"
            )
        assignment = np.asarray(assignment, dtype=np.int64).reshape(-1)
        if len(assignment) != n:
            raise ParameterError(
                "assignment",
                f"{len(assignment)} labels for {n} snippets",
                "one cluster number per snippet",
            )
        if n and not 0 <= assignment.min() <= assignment.max() < k:
            raise ParameterError(
                "assignment",
                assignment.tolist(),
                f"one cluster number per snippet, and cluster numbers must be in 0..{k - 1}",
            )
        if not -1 <= selected < k:
            raise ParameterError("selected", selected, f"-1 or a cluster below {k}")
        points = np.zeros((n, 2)) if points is None else points
        return {
            "names": [str(x) for x in names],
            "terms": [[str(w) for w in ws] for ws in terms],
            "sizes": as_bytes(sizes, "sizes", dtype=np.int32, shape=(k,)),
            "shares": as_bytes(shares, "shares", shape=(k,), allow_nan=True),
            "points": as_bytes(points, "points", dtype=np.float32, shape=(n, 2)),
            "assignment": as_bytes(assignment, "assignment", dtype=np.int32),
            "snippets": [str(s) for s in snippets],
            "representatives": representatives,
            "weights": b"" if weights is None else as_bytes(weights, "weights", shape=(n,)),
            "highlight": b""
            if highlight is None
            else as_bytes(highlight, "highlight", dtype=np.uint8, shape=(n,)),
            "selected": int(selected),
            "title": title,
            "message": message,
            "caption": str(caption),
        }

    @classmethod
    def from_themes(
        cls, themes, *, shares=None, weights=None, highlight=None, title: str = "", width: int = 160
    ) -> ThemeClusters:
        """The clusters of a :class:`influencekit.themes.Themes` (``shares`` default to its own).

        Example:
            >>> from influencekit.themes import cluster
            >>> texts = ["the cat sat on the mat", "a cat and a kitten", "my cat's mat",
            ...          "stocks fell", "the market and stocks rose", "bonds, stocks"]
            >>> found = cluster(texts, n_clusters=2)
            >>> ThemeClusters.from_themes(found).names
            ['stocks · bonds · fell', 'cat · mat · kitten']
        """
        view = cls()
        view.apply(
            theme_state(
                themes,
                shares=shares,
                weights=weights,
                highlight=highlight,
                title=title,
                width=width,
            )
        )
        return view


def theme_state(
    themes, *, shares=None, weights=None, highlight=None, title: str = "", width: int = 160
) -> dict:
    """:meth:`ThemeClusters.state` of a :class:`~influencekit.themes.Themes`."""
    if shares is None:
        shares = themes.shares if themes.shares is not None else np.full(themes.n_clusters, np.nan)
    coords = themes.coords if themes.coords is not None else np.zeros((len(themes.texts), 2))
    return ThemeClusters.state(
        themes.titles,
        themes.terms,
        themes.sizes,
        shares,
        coords,
        themes.labels,
        [snippet(t, width) for t in themes.texts],
        representatives=themes.representatives,
        weights=weights,
        highlight=highlight,
        title=title,
        caption=themes.k_evidence(),
    )


def snippet(text: str, width: int = 160) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis.

    Example:
        >>> snippet("a  b\\nc", 10), snippet("x" * 12, 10)
        ('a b c', 'xxxxxxxxx…')
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
