"""The analyses of Grosse et al. (2023) as library functions over an :class:`InfluenceResult`.

- Token overlap vs abstraction: :func:`overlap_share`, :func:`theme_share`,
  :func:`overlap_table`: how much of a query's top influence comes from sequences that merely
  share its words, and how much from sequences on its theme.
- Layer attribution: :func:`block_number`, :func:`layer_groups`, :func:`group_shares`,
  :func:`layer_profile`, :func:`rerank_by_group`: which third of the network (lower, middle,
  upper blocks) carries the influence.
- Influence distribution: :func:`tail_fit`, :func:`top_share`, :func:`ccdf`, :func:`plot_tail`:
  the heavy, power-law-like upper tail of the scores.
- Candidate prefilter: :func:`bm25_scores`, :func:`bm25_candidates`, :func:`prefilter_recall`,
  :func:`score_prefiltered`: score only the sequences a text search (Okapi BM25 on binary term
  presence, the paper's TF-IDF filter) finds, when no gradient store is at hand.

One module per analysis (``overlap``, ``layers``, ``tails``, ``prefilter``); every public
function is importable from here. Needs scikit-learn and scipy; :func:`plot_tail` also needs
matplotlib.

Example:
    >>> import numpy as np
    >>> top_share(np.array([8.0, 1.0, 1.0, -2.0]), fraction=0.25)
    0.8
"""

from .layers import (
    GROUPS,
    block_number,
    group_shares,
    layer_groups,
    layer_profile,
    rerank_by_group,
)
from .overlap import content_ngrams, overlap_share, overlap_table, theme_share
from .prefilter import bm25_candidates, bm25_scores, prefilter_recall, score_prefiltered
from .tails import MIN_TAIL, ccdf, plot_tail, tail_fit, top_share

__all__ = [
    "GROUPS",
    "MIN_TAIL",
    "block_number",
    "bm25_candidates",
    "bm25_scores",
    "ccdf",
    "content_ngrams",
    "group_shares",
    "layer_groups",
    "layer_profile",
    "overlap_share",
    "overlap_table",
    "plot_tail",
    "prefilter_recall",
    "rerank_by_group",
    "score_prefiltered",
    "tail_fit",
    "theme_share",
    "top_share",
]
