"""Re-ID evaluation: single-query CMC/mAP and k-reciprocal re-ranking, memory-bounded.

* :func:`evaluate_rank` — CMC and mAP from a (query x gallery) distance matrix (Market-1501 /
  torchreid protocol), ranked chunk by chunk.
* :func:`evaluate_features` — cosine-distance evaluation straight from features, never holding the
  full distance matrix; ``rerank=True`` applies k-reciprocal re-ranking. Returns :class:`RankMetrics`.
* :func:`re_ranking` — re-ranked (query x gallery) distances via the sparse, FAISS-kNN based
  :class:`KReciprocalReranker` (use its ``distance_chunks`` for very large sets);
  :func:`re_ranking_dense` — the O(N^2)-memory reference formulation, for small inputs.
"""

from fanet.evaluation.distance import cosine_distance
from fanet.evaluation.rank import RankAccumulator, RankMetrics, evaluate_features, evaluate_rank
from fanet.evaluation.rerank import KReciprocalReranker, re_ranking, re_ranking_dense

__all__ = [
    "KReciprocalReranker",
    "RankAccumulator",
    "RankMetrics",
    "cosine_distance",
    "evaluate_features",
    "evaluate_rank",
    "re_ranking",
    "re_ranking_dense",
]
