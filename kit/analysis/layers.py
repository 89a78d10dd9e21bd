"""Layer attribution: which third of the network (lower, middle, upper blocks) carries a
query's influence.

Example:
    >>> layer_groups([f"h.{b}.mlp" for b in range(6)])
    {'lower': [0, 1], 'middle': [2, 3], 'upper': [4, 5]}
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .. import checks
from ..errors import ParameterError
from ..result import InfluenceResult
from ._checks import _check_int, _check_query, _check_result

GROUPS = ("lower", "middle", "upper")
# A module name's first all-digit component is its transformer block: "model.layers.3.mlp".
_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_number(name: str) -> int | None:
    """The transformer block of a module name: its first all-digit component (``None`` when
    it has none).

    Example:
        >>> block_number("transformer.h.3.mlp.c_fc"), block_number("lm_head")
        (3, None)
    """
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def layer_groups(layers: Sequence[str], *, n_blocks: int | None = None) -> dict[str, list[int]]:
    """Positions in ``layers`` of the ``"lower"``, ``"middle"`` and ``"upper"`` thirds.

    A layer's block is the first all-digit component of its module name
    (``transformer.h.3.mlp.c_fc`` is in block 3); all layers of a block stay together. With
    ``D`` blocks (``n_blocks``, by default the highest block number + 1), block ``b`` goes to
    the third holding its middle, ``floor(3 (b + 1/2) / D)``: the split is symmetric, e.g.
    4 blocks → ``[0] [1, 2] [3]``, 6 → two each, 12 → four each, 2 → lower and upper (middle
    empty), 1 → middle only. Every group is a key, perhaps with an empty list.

    A name without a block number (an input or output projection) goes to ``"lower"`` if it
    comes before every numbered name in ``layers`` and to ``"upper"`` otherwise: tracked
    layers are listed in model order, where such layers sit before or after the blocks.

    Example:
        >>> names = [f"transformer.h.{b}.mlp.{m}" for b in range(4) for m in ("c_fc", "c_proj")]
        >>> layer_groups(names)
        {'lower': [0, 1], 'middle': [2, 3, 4, 5], 'upper': [6, 7]}
    """
    if isinstance(layers, str) or not len(layers):
        raise ParameterError("layers", layers, "a non-empty list of module names")
    blocks = [block_number(name) for name in layers]
    numbered = [i for i, b in enumerate(blocks) if b is not None]
    if not numbered:
        raise ParameterError(
            "layers",
            list(layers),
            "module names with block numbers (like 'transformer.h.3.mlp.c_fc'): no name has a "
            "block number",
        )
    highest = max(blocks[i] for i in numbered)
    depth = highest + 1 if n_blocks is None else n_blocks
    if n_blocks is not None:
        _check_int("n_blocks", n_blocks, minimum=highest + 1)
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, block in enumerate(blocks):
        if block is None:
            group = "lower" if i < numbered[0] else "upper"
        else:
            # 3(2b + 1) is odd and 2D even, so no block ever sits on a boundary.
            group = GROUPS[3 * (2 * block + 1) // (2 * depth)]
        groups[group].append(i)
    return groups


def group_shares(result: InfluenceResult, q: int, k: int = 10) -> dict[str, float]:
    """Each third's part of query ``q``'s top-``k`` summed score (``layer_shares`` per group).

    The shares sum to 1 (all zero when the top ``k`` scores sum to zero); see
    :func:`layer_groups` for the split.

    Example:
        >>> import numpy as np
        >>> names = ["h.0.mlp", "h.1.mlp", "h.2.mlp"]
        >>> r = InfluenceResult(np.array([[[1.0, 1.0, 2.0]]]), names, ["a"], ["q"])
        >>> group_shares(r, 0)
        {'lower': 0.25, 'middle': 0.25, 'upper': 0.5}
    """
    _check_query(result, q)
    _check_int("k", k)
    shares = result.layer_shares(q, k)
    return {g: float(shares[idx].sum()) for g, idx in layer_groups(result.layers).items()}


def layer_profile(result: InfluenceResult, k: int = 10) -> np.ndarray:
    """``(n_queries, 3)``: every query's :func:`group_shares`, columns lower, middle, upper.

    Example:
        >>> import numpy as np
        >>> r = InfluenceResult(np.array([[[1.0, 3.0]], [[2.0, 2.0]]]), ["h.0.a", "h.1.a"],
        ...                     ["x"], ["q0", "q1"])
        >>> layer_profile(r).tolist()
        [[0.25, 0.0, 0.75], [0.5, 0.0, 0.5]]
    """
    _check_result(result)
    _check_int("k", k)
    groups = layer_groups(result.layers)
    shares = np.array([result.layer_shares(q, k) for q in range(len(result.query_ids))])
    shares = shares.reshape(len(result.query_ids), len(result.layers))
    return np.stack([shares[:, groups[g]].sum(axis=1) for g in GROUPS], axis=1)


def rerank_by_group(
    result: InfluenceResult, q: int, group: str, k: int = 10
) -> list[tuple[int, float]]:
    """Query ``q``'s top ``k`` sequences re-ranked by the summed scores of one group's layers.

    Returns ``(train_index, group score)``, highest group score first (ties keep the total
    score order). For a top-k result the choice is among its kept columns.

    Example:
        >>> import numpy as np
        >>> layer_scores = np.array([[[5.0, 0.0], [1.0, 3.0], [0.0, 1.0]]])
        >>> r = InfluenceResult(layer_scores, ["h.0.mlp", "h.1.mlp"], ["a", "b", "c"], ["q"])
        >>> rerank_by_group(r, 0, "upper", k=2)
        [(1, 3.0), (0, 0.0)]
    """
    _check_query(result, q)
    _check_int("k", k)
    checks.choice("group", group, GROUPS)
    groups = layer_groups(result.layers)
    if not groups[group]:
        raise ParameterError(
            "group",
            group,
            f"a group holding some of this result's layers (group {group!r} holds none; layer "
            f"positions by group: {groups})",
        )
    # The same top k as top() and layer_shares(): highest total first, ties by column.
    columns = result.columns(q, k)
    group_scores = result.layer_scores[q][np.ix_(columns, groups[group])].sum(axis=1)
    index = result.train_index(q, columns)
    order = np.argsort(-group_scores, kind="stable")
    return [(int(index[j]), float(group_scores[j])) for j in order]
