"""k-reciprocal re-ranking against a reference written from the equations of Zhong et al.,
"Re-ranking Person Re-identification with k-reciprocal Encoding" (CVPR 2017), Sec. 3.

The reference below shares no code with :mod:`fanet.evaluation.rerank`: plain Python loops over
sets, float64, and the Jaccard distance in its min/max form (Eq. 11) rather than the
``1 - m / (2 - m)`` shortcut. Where the paper leaves a choice open it follows the conventions
that :mod:`fanet.evaluation.rerank` documents, each named where it is used:

* the original distance d(p, g) is the cosine distance of the features divided by each row's
  maximum over all query and gallery images;
* N(p, k) holds the k + 1 nearest images of p, p itself included;
* the expansion test is a strict ``>`` 2/3 (the paper writes >=; the public code uses >);
* the V vectors are normalised to sum to 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from fanet.evaluation import KReciprocalReranker, re_ranking, re_ranking_dense


def original_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(N, N) distances between all pooled images: cosine distance over each row's maximum."""
    pooled = np.concatenate([query, gallery]).astype(np.float64)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    count = pooled.shape[0]
    distance = np.zeros((count, count))
    for p in range(count):
        for g in range(count):
            distance[p, g] = 1.0 - float(pooled[p] @ pooled[g])
        distance[p] /= distance[p].max()
    return distance


def nearest(distance: np.ndarray, p: int, k: int) -> list[int]:
    """N(p, k): the k + 1 images closest to p (p first, at distance 0)."""
    return sorted(range(distance.shape[0]), key=lambda g: (distance[p, g], g))[: k + 1]


def k_reciprocal(distance: np.ndarray, p: int, k: int) -> set[int]:
    """Eq. 6: R(p, k) = {g in N(p, k) and p in N(g, k)}."""
    return {g for g in nearest(distance, p, k) if p in nearest(distance, g, k)}


def expanded_set(distance: np.ndarray, p: int, k1: int) -> set[int]:
    """Eq. 7: R*(p) adds R(q, k1/2) for each q in R(p, k1) whose set lies mostly inside R(p, k1)."""
    own = k_reciprocal(distance, p, k1)
    result = set(own)
    for q in own:
        candidate = k_reciprocal(distance, q, round(k1 / 2))
        if len(candidate & own) > 2.0 / 3.0 * len(candidate):
            result |= candidate
    return result


def reference_rerank(
    query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float
) -> np.ndarray:
    """The final distance d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g) (Eq. 13), (Q, G)."""
    distance = original_distance(query, gallery)
    count, num_query = distance.shape[0], query.shape[0]

    # Eq. 10: V_p over all images, a Gaussian kernel of the distance on R*(p), zero elsewhere.
    vectors = np.zeros((count, count))
    for p in range(count):
        members = expanded_set(distance, p, k1)
        total = sum(np.exp(-distance[p, g]) for g in members)
        for g in members:
            vectors[p, g] = np.exp(-distance[p, g]) / total

    # Eq. 12: local query expansion, V_p becomes the mean of V_g over the k2 nearest images of p.
    if k2 > 1:
        expanded = np.zeros_like(vectors)
        for p in range(count):
            neighbours = nearest(distance, p, k2 - 1)  # k2 images, p included
            expanded[p] = sum(vectors[g] for g in neighbours) / len(neighbours)
        vectors = expanded

    final = np.zeros((num_query, count - num_query))
    for q in range(num_query):
        for j in range(count - num_query):
            g = num_query + j
            # Eq. 11: Jaccard distance from the min / max of the two vectors.
            shared = sum(min(vectors[q, i], vectors[g, i]) for i in range(count))
            union = sum(max(vectors[q, i], vectors[g, i]) for i in range(count))
            jaccard = 1.0 - shared / union
            final[q, j] = (1.0 - lambda_value) * jaccard + lambda_value * distance[q, g]
    return final


def clustered(seed: int, num_ids: int = 6, per_id: int = 5, dim: int = 8) -> tuple[np.ndarray, ...]:
    """Identities as Gaussian clusters; the first image of each identity is a query."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim))
    pids = np.repeat(np.arange(num_ids), per_id)
    features = (centres[pids] + 0.9 * rng.standard_normal((pids.shape[0], dim))).astype(np.float32)
    is_query = np.arange(pids.shape[0]) % per_id == 0
    return features[is_query], features[~is_query], pids[is_query], pids[~is_query]


def test_reference_helpers_on_a_hand_worked_line() -> None:
    """Five points on a line, so N, R and R* can be read off by eye (no row normalisation
    surprises: the ranking of a row does not change when it is divided by its maximum)."""
    angles = np.array([0.0, 0.1, 0.2, 1.0, 1.05])
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    distance = original_distance(points[:1], points[1:])
    assert nearest(distance, 0, 2) == [0, 1, 2]
    assert nearest(distance, 3, 1) == [3, 4]
    # 2's nearest two others are 1 and 0 (0.1 and 0.2 away; 3 is 0.8 away): 0 and 2 are 2-reciprocal.
    assert k_reciprocal(distance, 0, 2) == {0, 1, 2}
    # 3 and 4 are each other's nearest neighbour; 2 is 3's second but 3 is not in N(2, 2).
    assert k_reciprocal(distance, 3, 2) == {3, 4}
    assert expanded_set(distance, 3, 2) == {3, 4}


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(6, 3, 0.3), (4, 1, 0.2), (8, 4, 0.7)])
def test_dense_and_sparse_rerank_match_the_paper_reference(k1: int, k2: int, lambda_value: float) -> None:
    query, gallery, *_ = clustered(seed=k1)
    expected = reference_rerank(query, gallery, k1, k2, lambda_value)
    dense = re_ranking_dense(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    sparse = re_ranking(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    chunked = np.concatenate(
        [c for _, c in KReciprocalReranker(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
         .distance_chunks(chunk_size=4, jaccard_chunk_size=2)]
    )
    assert expected.shape == dense.shape == sparse.shape == (query.shape[0], gallery.shape[0])
    np.testing.assert_allclose(dense, expected, atol=2e-5)
    np.testing.assert_allclose(sparse, expected, atol=2e-5)
    np.testing.assert_allclose(chunked, expected, atol=2e-5)


def test_lambda_weights_the_original_distance() -> None:
    """lambda multiplies d and 1 - lambda the Jaccard distance: swapping them changes the result,
    and lambda = 1 gives back the original (row-normalised) distance exactly."""
    query, gallery, *_ = clustered(seed=3)
    k1, k2, lambda_value = 6, 3, 0.2
    expected = reference_rerank(query, gallery, k1, k2, lambda_value)
    swapped = reference_rerank(query, gallery, k1, k2, 1.0 - lambda_value)
    assert np.abs(expected - swapped).max() > 0.1  # lambda matters on this data
    for rerank in (re_ranking_dense, re_ranking):
        result = rerank(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
        np.testing.assert_allclose(result, expected, atol=2e-5)
        assert np.abs(result - swapped).max() > 0.1
        only_original = rerank(query, gallery, k1=k1, k2=k2, lambda_value=1.0)
        num_query = query.shape[0]
        np.testing.assert_allclose(
            only_original, original_distance(query, gallery)[:num_query, num_query:], atol=2e-5
        )
