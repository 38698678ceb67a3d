"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), in a dense reference form and in a memory-bounded sparse form.

Notation (all N = Q + G query and gallery images are pooled, d = original distance):

* ``N(p, k)``: the k+1 nearest images of p (p itself included, as it is its own nearest image);
* ``R(p, k) = {g in N(p, k) : p in N(g, k)}``: the k-reciprocal neighbours;
* ``R*(p)``: R(p, k1) expanded with ``R(q, round(k1/2))`` for each q in R(p, k1) whose set shares
  more than 2/3 of its members with R(p, k1);
* ``V[p, g] = exp(-d(p, g)) / sum_{g' in R*(p)} exp(-d(p, g'))`` for g in R*(p), 0 elsewhere;
* local query expansion: ``V[p] <- mean of V[g] over the k2 nearest images g of p``;
* Jaccard distance ``dJ(p, g) = 1 - sum_k min(V[p,k], V[g,k]) / sum_k max(V[p,k], V[g,k])``, which
  is ``1 - m / (2 - m)`` with ``m = sum_k min(...)`` because every row of V sums to 1;
* final distance ``(1 - lambda) * dJ + lambda * d``.

Conventions of this implementation (shared by the dense and sparse forms):

* ``d`` is the cosine distance of the features, divided by each row's maximum over all N images.
  For l2-normalised features the cosine distance is half the squared Euclidean distance, so after
  the row normalisation this is the row-normalised squared Euclidean distance of the public
  reference code of the paper.
* The expansion test is a strict ``>`` 2/3 (as in the widely used public code; the paper writes >=).
* V is stored in float32 (the public code uses float16).

Why the sparse form is exact: every quantity above only needs the (k1+1)-nearest-neighbour lists
(``R``, ``R*`` membership, query expansion), the distances from p to the members of R*(p) (a few
dozen dot products per image), each row's maximum distance (one farthest-neighbour search), and V,
which is sparse by construction: two images with disjoint V supports have Jaccard distance exactly
1. So :class:`KReciprocalReranker` reproduces :func:`re_ranking_dense` up to float rounding, as long
as the kNN lists are in the same order (ties between exactly equal distances may be broken
differently by FAISS and by a stable argsort; that is the only approximation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fanet.evaluation.distance import NORM_EPS, as_float32_features, l2_normalize, row_chunks

DEFAULT_K1 = 20
DEFAULT_K2 = 6
DEFAULT_LAMBDA = 0.3


def _check_parameters(k1: int, k2: int, lambda_value: float, num_images: int) -> None:
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    if not 1 <= k2 <= k1 + 1:
        raise ValueError(f"k2 must be between 1 and k1 + 1 = {k1 + 1}, got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    if num_images <= k1:
        raise ValueError(f"re-ranking needs more than k1={k1} query+gallery images, got {num_images}")


def _pooled_normalized_features(
    query_features: np.ndarray | torch.Tensor, gallery_features: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, int]:
    """l2-normalised [query; gallery] features as one float32 (N, dim) array, built chunk by chunk."""
    query = as_float32_features(query_features, "query_features")
    gallery = as_float32_features(gallery_features, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery feature dims differ: {query.shape[1]} vs {gallery.shape[1]}")
    num_query = query.shape[0]
    pooled = np.empty((num_query + gallery.shape[0], query.shape[1]), dtype=np.float32)
    for offset, part in ((0, query), (num_query, gallery)):
        for start, stop in row_chunks(part.shape[0], 8192):
            pooled[offset + start : offset + stop] = l2_normalize(part[start:stop]).numpy()
    return pooled, num_query


def re_ranking_dense(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
) -> np.ndarray:
    """Reference re-ranking with dense (N, N) matrices; returns the (Q, G) final distance.

    Memory is O(N^2): meant for small inputs and for checking :class:`KReciprocalReranker`.
    """
    features, num_query = _pooled_normalized_features(query_features, gallery_features)
    num_images = features.shape[0]
    _check_parameters(k1, k2, lambda_value, num_images)

    distance = 1.0 - features @ features.T
    distance /= np.maximum(distance.max(axis=1, keepdims=True), NORM_EPS)
    ranking = np.argsort(distance, axis=1, kind="stable")
    half_k1 = int(np.around(k1 / 2))

    def reciprocal_neighbours(image: int, k: int) -> np.ndarray:
        forward = ranking[image, : k + 1]
        backward = ranking[forward, : k + 1]
        return forward[(backward == image).any(axis=1)]

    weights = np.zeros((num_images, num_images), dtype=np.float32)
    for image in range(num_images):
        own = reciprocal_neighbours(image, k1)
        expansion = [own]
        for candidate in own:
            candidate_set = reciprocal_neighbours(candidate, half_k1)
            if len(np.intersect1d(candidate_set, own)) > 2.0 / 3.0 * len(candidate_set):
                expansion.append(candidate_set)
        members = np.unique(np.concatenate(expansion))
        member_weights = np.exp(-distance[image, members])
        weights[image, members] = member_weights / member_weights.sum()

    if k2 > 1:
        weights = np.stack([weights[ranking[image, :k2]].mean(axis=0) for image in range(num_images)])

    overlap = np.stack([np.minimum(weights[query], weights[num_query:]).sum(axis=1) for query in range(num_query)])
    jaccard = 1.0 - overlap / (2.0 - overlap)
    final = (1.0 - lambda_value) * jaccard + lambda_value * distance[:num_query, num_query:]
    return final.astype(np.float32)


@dataclass
class _SparseRows:
    """Compressed sparse rows: row r holds ``indices/values[indptr[r]:indptr[r + 1]]``."""

    indptr: np.ndarray  # int64, (num_rows + 1,)
    indices: np.ndarray  # int32
    values: np.ndarray  # float32

    @property
    def num_rows(self) -> int:
        return self.indptr.shape[0] - 1

    @classmethod
    def from_sorted_triplets(cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_rows: int) -> _SparseRows:
        counts = np.bincount(rows, minlength=num_rows)
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), values.astype(np.float32))


def _concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths  # where each range begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - offsets, lengths)


def _exact_neighbours(
    features: np.ndarray, num_neighbours: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact kNN (ids, cosine distances) and each row's farthest cosine distance, via FAISS.

    Inner product on l2-normalised rows is the cosine similarity; the farthest image of x is the
    nearest (largest inner product) to -x, so one more k=1 search gives every row's maximum.
    """
    import faiss  # imported lazily: only re-ranking needs it

    num_images, dim = features.shape
    index = faiss.IndexFlatIP(dim)
    index.add(features)
    neighbour_ids = np.empty((num_images, num_neighbours), dtype=np.int32)
    neighbour_distances = np.empty((num_images, num_neighbours), dtype=np.float32)
    farthest_distances = np.empty(num_images, dtype=np.float32)
    for start, stop in row_chunks(num_images, batch_size):
        batch = features[start:stop]
        similarities, ids = index.search(batch, num_neighbours)
        neighbour_ids[start:stop] = ids
        neighbour_distances[start:stop] = 1.0 - similarities
        negated_similarities, _ = index.search(-batch, 1)  # = -min_j <x, x_j>
        farthest_distances[start:stop] = 1.0 + negated_similarities[:, 0]
    index.reset()
    return neighbour_ids, neighbour_distances, farthest_distances


def _reciprocal_mask(neighbour_ids: np.ndarray, chunk_size: int) -> np.ndarray:
    """mask[p, t] is True when image p is among the neighbours of its t-th neighbour (same width)."""
    mask = np.empty(neighbour_ids.shape, dtype=bool)
    for start, stop in row_chunks(neighbour_ids.shape[0], chunk_size):
        backward = neighbour_ids[neighbour_ids[start:stop]]  # (rows, width, width)
        own_ids = np.arange(start, stop, dtype=neighbour_ids.dtype)[:, None, None]
        mask[start:stop] = (backward == own_ids).any(axis=2)
    return mask


def _pair_distances(features: np.ndarray, left: np.ndarray, right: np.ndarray, batch: int = 4096) -> np.ndarray:
    distances = np.empty(left.shape[0], dtype=np.float32)
    for start, stop in row_chunks(left.shape[0], batch):
        products = np.einsum("ij,ij->i", features[left[start:stop]], features[right[start:stop]])
        distances[start:stop] = 1.0 - products
    return distances


def _k_reciprocal_weights(
    features: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_distances: np.ndarray,
    row_max: np.ndarray,
    k1: int,
    chunk_size: int,
) -> _SparseRows:
    """Sparse V: exp(-d) weights over each image's expanded k-reciprocal set R*, rows summing to 1."""
    num_images = features.shape[0]
    half_k1 = int(np.around(k1 / 2))
    half_ids = neighbour_ids[:, : half_k1 + 1]
    # R(p, k1) and R(p, k1/2) as fixed-width rows padded with -1.
    reciprocal = np.where(_reciprocal_mask(neighbour_ids, chunk_size), neighbour_ids, -1)
    half_mask = _reciprocal_mask(half_ids, chunk_size)
    half_reciprocal = np.where(half_mask, half_ids, -1)
    half_sizes = half_mask.sum(axis=1)
    del half_mask

    rows_out, cols_out, values_out = [], [], []
    for start, stop in row_chunks(num_images, chunk_size):
        own = reciprocal[start:stop]  # (rows, k1+1)
        own_valid = own >= 0
        candidate_ids = np.where(own_valid, own, 0)
        candidate_sets = half_reciprocal[candidate_ids]  # (rows, k1+1, half+1)
        member_valid = (candidate_sets >= 0) & own_valid[:, :, None]
        in_own = (candidate_sets[..., None] == own[:, None, None, :]).any(axis=3) & member_valid
        accepted = own_valid & (in_own.sum(axis=2) > 2.0 / 3.0 * half_sizes[candidate_ids])
        expansion = np.concatenate(
            [own, np.where(accepted[:, :, None], candidate_sets, -1).reshape(own.shape[0], -1)], axis=1
        )
        expansion.sort(axis=1)
        expansion[:, 1:][expansion[:, 1:] == expansion[:, :-1]] = -1  # drop duplicates
        valid = expansion >= 0

        # Distances of members that are in p's kNN list come from the search; others are recomputed.
        own_neighbours = neighbour_ids[start:stop]
        equal = expansion[:, :, None] == own_neighbours[:, None, :]
        distances = np.take_along_axis(neighbour_distances[start:stop], equal.argmax(axis=2), axis=1)
        missing_rows, missing_cols = np.nonzero(valid & ~equal.any(axis=2))
        distances[missing_rows, missing_cols] = _pair_distances(
            features, missing_rows + start, expansion[missing_rows, missing_cols]
        )
        weights = np.exp(-distances / np.maximum(row_max[start:stop, None], NORM_EPS))
        weights[~valid] = 0.0
        totals = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)

        local_rows, positions = np.nonzero(valid)
        rows_out.append(local_rows + start)
        cols_out.append(expansion[local_rows, positions])
        values_out.append(weights[local_rows, positions])
    return _SparseRows.from_sorted_triplets(
        np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(values_out), num_images
    )


def _average_of_rows(matrix: _SparseRows, sources: np.ndarray, chunk_size: int) -> _SparseRows:
    """Row p of the result is the mean of the rows ``sources[p, :]`` of ``matrix`` (query expansion)."""
    num_rows, num_sources = sources.shape
    num_cols = num_rows
    rows_out, cols_out, values_out = [], [], []
    for start, stop in row_chunks(num_rows, chunk_size):
        source_rows = sources[start:stop].reshape(-1)
        starts = matrix.indptr[source_rows]
        lengths = matrix.indptr[source_rows + 1] - starts
        gather = _concatenated_ranges(starts, lengths)
        owners = np.repeat(np.repeat(np.arange(stop - start, dtype=np.int64), num_sources), lengths)
        keys = owners * num_cols + matrix.indices[gather]
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse.reshape(-1), weights=matrix.values[gather], minlength=unique_keys.shape[0])
        rows_out.append(unique_keys // num_cols + start)
        cols_out.append(unique_keys % num_cols)
        values_out.append(sums / num_sources)
    return _SparseRows.from_sorted_triplets(
        np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(values_out), num_rows
    )


class KReciprocalReranker:
    """Memory-bounded k-reciprocal re-ranking for large query/gallery sets (e.g. MSMT17).

    Construction runs exact FAISS kNN searches (``IndexFlatIP`` on l2-normalised features, in
    batches) and builds the sparse weight matrix V. :meth:`distance_chunks` then yields the final
    (Q, G) distance ``chunk_size`` query rows at a time: sparse Jaccard distances plus
    ``lambda_value`` times the row-normalised cosine distance. Peak memory is about three copies of
    the features (caller's, normalised copy, FAISS index during the search) plus O(N * nnz(V) / N)
    for V and O(chunk_size x G) per chunk.
    """

    def __init__(
        self,
        query_features: np.ndarray | torch.Tensor,
        gallery_features: np.ndarray | torch.Tensor,
        *,
        k1: int = DEFAULT_K1,
        k2: int = DEFAULT_K2,
        lambda_value: float = DEFAULT_LAMBDA,
        search_batch_size: int = 4096,
        work_chunk_size: int = 4096,
    ) -> None:
        self.features, self.num_query = _pooled_normalized_features(query_features, gallery_features)
        num_images = self.features.shape[0]
        _check_parameters(k1, k2, lambda_value, num_images)
        self.num_gallery = num_images - self.num_query
        self.lambda_value = lambda_value

        neighbour_ids, neighbour_distances, self.row_max = _exact_neighbours(self.features, k1 + 1, search_batch_size)
        weights = _k_reciprocal_weights(
            self.features, neighbour_ids, neighbour_distances, self.row_max, k1, work_chunk_size
        )
        del neighbour_distances
        if k2 > 1:
            weights = _average_of_rows(weights, neighbour_ids[:, :k2], work_chunk_size)
        del neighbour_ids

        # Query rows of V, and the gallery part of V transposed (for each column k, the gallery
        # images g with V[g, k] > 0): the Jaccard overlap only ever pairs a query with a gallery row.
        query_end = weights.indptr[self.num_query]
        self.query_weights = _SparseRows(
            weights.indptr[: self.num_query + 1].copy(),
            weights.indices[:query_end].copy(),
            weights.values[:query_end].copy(),
        )
        gallery_rows = np.repeat(np.arange(self.num_gallery, dtype=np.int32), np.diff(weights.indptr[self.num_query :]))
        gallery_cols = weights.indices[query_end:]
        by_column = np.argsort(gallery_cols, kind="stable")
        self.postings = _SparseRows.from_sorted_triplets(
            gallery_cols[by_column], gallery_rows[by_column], weights.values[query_end:][by_column], num_images
        )

    def _jaccard(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, G) Jaccard distances of queries start..stop-1 to every gallery image."""
        num_rows = stop - start
        first, last = self.query_weights.indptr[start], self.query_weights.indptr[stop]
        columns = self.query_weights.indices[first:last]
        query_values = self.query_weights.values[first:last]
        row_lengths = np.diff(self.query_weights.indptr[start : stop + 1])
        query_rows = np.repeat(np.arange(num_rows, dtype=np.int64), row_lengths)
        posting_starts = self.postings.indptr[columns]
        posting_lengths = self.postings.indptr[columns + 1] - posting_starts
        gather = _concatenated_ranges(posting_starts, posting_lengths)
        shared = np.minimum(np.repeat(query_values, posting_lengths), self.postings.values[gather])
        flat_pairs = np.repeat(query_rows, posting_lengths) * self.num_gallery + self.postings.indices[gather]
        overlap = np.bincount(flat_pairs, weights=shared, minlength=num_rows * self.num_gallery)
        overlap = overlap.reshape(num_rows, self.num_gallery)
        return 1.0 - overlap / (2.0 - overlap)

    def distance_chunks(self, chunk_size: int = 256, jaccard_chunk_size: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_query_row, final_distances)`` with float32 (rows, G) re-ranked distances."""
        gallery = torch.from_numpy(self.features[self.num_query :])
        for start, stop in row_chunks(self.num_query, chunk_size):
            query = torch.from_numpy(self.features[start:stop])
            original = (1.0 - query @ gallery.T).numpy()
            original /= np.maximum(self.row_max[start:stop, None], NORM_EPS)
            final = self.lambda_value * original
            for sub_start, sub_stop in row_chunks(stop - start, jaccard_chunk_size):
                final[sub_start:sub_stop] += (1.0 - self.lambda_value) * self._jaccard(
                    start + sub_start, start + sub_stop
                )
            yield start, final

    def distance_matrix(self) -> np.ndarray:
        """The full (Q, G) re-ranked distance matrix (float32); for inputs where Q x G fits in memory."""
        return np.concatenate([chunk for _, chunk in self.distance_chunks()], axis=0)


def re_ranking(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
) -> np.ndarray:
    """Re-ranked (Q, G) distance matrix computed with the sparse kNN-based :class:`KReciprocalReranker`.

    Materialises the Q x G result; for MSMT17-size sets use ``evaluate_features(..., rerank=True)``
    or iterate :meth:`KReciprocalReranker.distance_chunks` instead.
    """
    return KReciprocalReranker(
        query_features, gallery_features, k1=k1, k2=k2, lambda_value=lambda_value
    ).distance_matrix()
