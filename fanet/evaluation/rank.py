"""Single-query re-ID ranking metrics (CMC and mAP), computed query-chunk by query-chunk.

The protocol is the Market-1501 one used by torchreid / fast-reid (``eval_market1501``):

* for every query, gallery images with the same person id AND the same camera id are removed
  ("junk"), the query is then ranked against what is left;
* queries without any correct match left are skipped; if no query is valid, ``ValueError``;
* CMC[k] = fraction of valid queries whose first correct match is within the top k+1;
* AP is non-interpolated: the mean, over the correct matches, of the precision at each of them.

Rankings use a *stable* argsort, so gallery items at exactly equal distance are ranked by gallery
index (torchreid's default numpy argsort leaves their order unspecified). With that order, CMC
values are bitwise equal to torchreid's (float32, like torchreid) and per-query AP values equal
up to float64 summation-order rounding (~1e-16). One deliberate difference: when fewer than
``max_rank`` gallery items remain for a query after junk removal, its CMC row is extended with its
last value (1) instead of producing a ragged array.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fanet.evaluation.distance import (
    as_float32_features,
    cosine_distance_chunk,
    row_chunks,
    row_norms,
    to_numpy,
)
from fanet.evaluation.rerank import DEFAULT_K1, DEFAULT_K2, DEFAULT_LAMBDA

DEFAULT_CHUNK_SIZE = 256


def _as_label_vector(labels: np.ndarray | torch.Tensor, name: str, expected_length: int) -> np.ndarray:
    array = to_numpy(labels, name)
    if array.ndim != 1 or array.shape[0] != expected_length:
        raise ValueError(
            f"{name} must be a 1-D array of {expected_length} values (one per image), got shape {array.shape}"
        )
    return array


def _encode_pair(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels of any dtype to compact int32 codes shared by query and gallery (cheap gathers)."""
    _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    codes = codes.astype(np.int32).reshape(-1)
    return codes[: query_labels.shape[0]], codes[query_labels.shape[0] :]


class RankAccumulator:
    """Accumulates CMC counts and per-query AP from distance rows fed in arbitrary query chunks.

    Only one chunk of argsort indices (int32) and a few chunk-sized boolean masks exist at a time,
    so memory is O(chunk_size x num_gallery) whatever the number of queries.
    """

    def __init__(
        self,
        q_pids: np.ndarray | torch.Tensor,
        g_pids: np.ndarray | torch.Tensor,
        q_camids: np.ndarray | torch.Tensor,
        g_camids: np.ndarray | torch.Tensor,
        max_rank: int = 50,
    ) -> None:
        q_pid_array = to_numpy(q_pids, "q_pids")
        g_pid_array = to_numpy(g_pids, "g_pids")
        if q_pid_array.ndim != 1 or g_pid_array.ndim != 1:
            raise ValueError(f"q_pids and g_pids must be 1-D, got shapes {q_pid_array.shape}, {g_pid_array.shape}")
        self.num_query = q_pid_array.shape[0]
        self.num_gallery = g_pid_array.shape[0]
        if self.num_query == 0 or self.num_gallery == 0:
            raise ValueError(
                f"need at least one query and one gallery image, got {self.num_query} and {self.num_gallery}"
            )
        q_cam_array = _as_label_vector(q_camids, "q_camids", self.num_query)
        g_cam_array = _as_label_vector(g_camids, "g_camids", self.num_gallery)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if self.num_gallery < max_rank:
            warnings.warn(
                f"max_rank={max_rank} exceeds the gallery size; using max_rank={self.num_gallery}",
                stacklevel=3,
            )
            max_rank = self.num_gallery
        self.max_rank = max_rank
        self.q_pids, self.g_pids = _encode_pair(q_pid_array, g_pid_array)
        self.q_camids, self.g_camids = _encode_pair(q_cam_array, g_cam_array)
        # A negative camera ID means "unknown" (custom data without cameras): such an image is never
        # "the same camera" as another, so no match of it is discarded as junk.
        if np.issubdtype(q_cam_array.dtype, np.number):
            self.q_camids[q_cam_array < 0] = -1
        if np.issubdtype(g_cam_array.dtype, np.number):
            self.g_camids[g_cam_array < 0] = -2
        # hit_counts[r] = number of valid queries whose first correct match sits at (0-based) rank r.
        self.hit_counts = np.zeros(max_rank, dtype=np.int64)
        self.average_precisions = np.full(self.num_query, np.nan, dtype=np.float64)
        self.seen = np.zeros(self.num_query, dtype=bool)

    def add(self, row_start: int, distances: np.ndarray | torch.Tensor) -> None:
        """Rank gallery items for queries ``row_start .. row_start + len(distances) - 1``."""
        if isinstance(distances, torch.Tensor):
            distance_tensor = distances.detach().cpu()
        else:
            array = np.asarray(distances)
            if not array.flags.writeable:
                array = array.copy()  # torch.from_numpy refuses (warns on) read-only buffers
            distance_tensor = torch.from_numpy(np.ascontiguousarray(array))
        num_rows = distance_tensor.shape[0]
        if distance_tensor.dim() != 2 or distance_tensor.shape[1] != self.num_gallery:
            raise ValueError(
                f"distance chunk must have shape (rows, {self.num_gallery}), got {tuple(distance_tensor.shape)}"
            )
        if row_start < 0 or row_start + num_rows > self.num_query:
            raise ValueError(f"rows {row_start}..{row_start + num_rows} outside 0..{self.num_query}")
        if distance_tensor.is_floating_point() and bool(torch.isnan(distance_tensor).any()):
            raise ValueError("distance matrix contains NaN values")

        # Stable sort: ties are broken by gallery index, deterministically (torch's is faster than numpy's).
        order = torch.argsort(distance_tensor, dim=1, stable=True).to(torch.int32).numpy()
        rows = slice(row_start, row_start + num_rows)
        matches = self.g_pids[order] == self.q_pids[rows, None]
        junk = matches & (self.g_camids[order] == self.q_camids[rows, None])
        good = matches & ~junk
        del order, matches

        good_rows, good_cols = np.nonzero(good)  # row-major: columns ascend within each row
        junk_rows, junk_cols = np.nonzero(junk)
        del good, junk
        # Rank of a correct match once junk is removed = its position minus the junk placed before it.
        # Junk is rare, so count it with a binary search on flat positions instead of a full cumsum.
        flat_good = good_rows.astype(np.int64) * self.num_gallery + good_cols
        flat_junk = junk_rows.astype(np.int64) * self.num_gallery + junk_cols
        junk_before = np.searchsorted(flat_junk, flat_good) - np.searchsorted(
            flat_junk, good_rows.astype(np.int64) * self.num_gallery
        )
        kept_rank = good_cols.astype(np.int64) + 1 - junk_before  # 1-based rank among kept items

        num_correct = np.bincount(good_rows, minlength=num_rows)
        first_of_row = np.concatenate([[0], np.cumsum(num_correct)[:-1]])
        hit_number = np.arange(good_rows.shape[0]) - first_of_row[good_rows] + 1  # 1-based
        precision_sum = np.bincount(good_rows, weights=hit_number / kept_rank, minlength=num_rows)

        valid = num_correct > 0
        average_precisions = np.full(num_rows, np.nan)
        average_precisions[valid] = precision_sum[valid] / num_correct[valid]
        self.average_precisions[rows] = average_precisions
        self.seen[rows] = True

        first_rank = kept_rank[first_of_row[valid]] - 1  # 0-based rank of each valid query's first hit
        self.hit_counts += np.bincount(first_rank[first_rank < self.max_rank], minlength=self.max_rank)

    def result(self) -> tuple[np.ndarray, float, int]:
        """Return ``(cmc, mAP, num_valid_queries)`` over all rows added so far (all must be added)."""
        if not self.seen.all():
            missing = int((~self.seen).sum())
            raise ValueError(f"{missing} query rows were never ranked")
        valid = ~np.isnan(self.average_precisions)
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError(
                "no query has a valid match: every query pid is absent from the gallery "
                "or only appears under the same camera"
            )
        # Same arithmetic as torchreid: float32 sum of 0/1 CMC rows (exact counts) / number of queries.
        cmc = np.cumsum(self.hit_counts).astype(np.float32) / float(num_valid)
        mean_ap = float(np.mean(self.average_precisions[valid]))
        return cmc, mean_ap, num_valid


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: np.ndarray | torch.Tensor,
    g_pids: np.ndarray | torch.Tensor,
    q_camids: np.ndarray | torch.Tensor,
    g_camids: np.ndarray | torch.Tensor,
    max_rank: int = 50,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, float]:
    """Single-query CMC and mAP from a (num_query, num_gallery) distance matrix (smaller = closer).

    Returns ``(cmc, mAP)`` with ``cmc`` a float32 array of length ``max_rank`` (clamped to the
    gallery size). Queries are ranked ``chunk_size`` rows at a time.
    """
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu()
    elif not isinstance(distmat, np.ndarray):
        distmat = to_numpy(distmat, "distmat")
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(distmat.shape)}")
    num_query, num_gallery = distmat.shape
    q_pid_array = _as_label_vector(q_pids, "q_pids", num_query)
    g_pid_array = _as_label_vector(g_pids, "g_pids", num_gallery)
    accumulator = RankAccumulator(q_pid_array, g_pid_array, q_camids, g_camids, max_rank)
    for start, stop in row_chunks(num_query, chunk_size):
        accumulator.add(start, distmat[start:stop])
    cmc, mean_ap, _ = accumulator.result()
    return cmc, mean_ap


@dataclass(frozen=True)
class RankMetrics:
    """Result of :func:`evaluate_features`. ``cmc[k]`` is the rank-(k+1) accuracy."""

    cmc: np.ndarray
    mAP: float
    num_valid_queries: int

    def rank(self, k: int) -> float:
        """Rank-k accuracy (k is 1-based); NaN when k exceeds the computed CMC length."""
        return float(self.cmc[k - 1]) if 1 <= k <= len(self.cmc) else float("nan")

    @property
    def rank1(self) -> float:
        return self.rank(1)

    @property
    def rank5(self) -> float:
        return self.rank(5)

    @property
    def rank10(self) -> float:
        return self.rank(10)

    @property
    def rank20(self) -> float:
        return self.rank(20)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mAP": self.mAP,
            "rank1": self.rank1,
            "rank5": self.rank5,
            "rank10": self.rank10,
            "rank20": self.rank20,
            "num_valid_queries": self.num_valid_queries,
        }


def evaluate_features(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    q_pids: np.ndarray | torch.Tensor,
    g_pids: np.ndarray | torch.Tensor,
    q_camids: np.ndarray | torch.Tensor,
    g_camids: np.ndarray | torch.Tensor,
    *,
    max_rank: int = 50,
    rerank: bool = False,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> RankMetrics:
    """CMC/mAP of cosine-distance retrieval, optionally after k-reciprocal re-ranking.

    Features are l2-normalised internally. Distances are produced ``chunk_size`` query rows at a
    time (float32) and reduced to ranks immediately, so the full query x gallery matrix never
    exists. With ``rerank=True`` the distances are those of
    :class:`fanet.evaluation.rerank.KReciprocalReranker` (k1, k2, lambda_value as in Zhong et al.).
    """
    query = as_float32_features(query_features, "query_features")
    gallery = as_float32_features(gallery_features, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery feature dims differ: {query.shape[1]} vs {gallery.shape[1]}")
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    q_pid_array = _as_label_vector(q_pids, "q_pids", num_query)
    g_pid_array = _as_label_vector(g_pids, "g_pids", num_gallery)
    accumulator = RankAccumulator(q_pid_array, g_pid_array, q_camids, g_camids, max_rank)

    if rerank:
        from fanet.evaluation.rerank import KReciprocalReranker  # heavy (faiss) import only when used

        reranker = KReciprocalReranker(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
        for start, distances in reranker.distance_chunks(chunk_size):
            accumulator.add(start, distances)
        del reranker
    else:
        gallery_norms = row_norms(gallery)
        with torch.inference_mode():
            for start, stop in row_chunks(num_query, chunk_size):
                accumulator.add(start, cosine_distance_chunk(query[start:stop], gallery, gallery_norms))
    cmc, mean_ap, num_valid = accumulator.result()
    return RankMetrics(cmc=cmc, mAP=mean_ap, num_valid_queries=num_valid)
