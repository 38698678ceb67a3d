"""Tests for fanet.evaluation: CMC/mAP protocol, chunking, feature evaluation, re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fanet.evaluation import (
    KReciprocalReranker,
    RankAccumulator,
    evaluate_features,
    evaluate_rank,
    re_ranking,
    re_ranking_dense,
)


def reference_eval_market1501(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
) -> tuple[np.ndarray, float, int]:
    """Straightforward per-query protocol (torchreid's formulation, with a stable argsort)."""
    all_cmc, all_ap = [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        junk = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        hits = (g_pids[order] == q_pids[q])[~junk].astype(np.int32)
        if not hits.any():
            continue
        cmc = hits.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision_at_hit = np.asarray([x / (i + 1.0) for i, x in enumerate(hits.cumsum())]) * hits
        all_ap.append(precision_at_hit.sum() / hits.sum())
    cmc_mean = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_cmc)
    return cmc_mean, float(np.mean(all_ap)), len(all_ap)


def random_protocol(
    rng: np.random.Generator, num_query: int, num_gallery: int, num_ids: int, num_cams: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        rng.integers(0, num_ids, num_query),
        rng.integers(0, num_ids, num_gallery),
        rng.integers(0, num_cams, num_query),
        rng.integers(0, num_cams, num_gallery),
    )


def clustered_features(
    rng: np.random.Generator, num_ids: int, per_id_query: int, per_id_gallery: int, dim: int, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian cluster per identity; queries on camera 0, gallery on cameras 1-4 (all valid)."""
    centres = rng.standard_normal((num_ids, dim))
    q_pids = np.repeat(np.arange(num_ids), per_id_query)
    g_pids = np.repeat(np.arange(num_ids), per_id_gallery)
    query = (centres[q_pids] + noise * rng.standard_normal((q_pids.shape[0], dim))).astype(np.float32)
    gallery = (centres[g_pids] + noise * rng.standard_normal((g_pids.shape[0], dim))).astype(np.float32)
    q_camids = np.zeros(q_pids.shape[0], dtype=np.int64)
    g_camids = rng.integers(1, 5, g_pids.shape[0])
    return query, gallery, q_pids, g_pids, q_camids, g_camids


# --------------------------------------------------------------------------- evaluate_rank


def test_hand_worked_cmc_and_map() -> None:
    # Gallery:        g0          g1          g2          g3          g4
    #   pid/cam:      1/c0        2/c1        1/c1        3/c1        1/c2
    # q0 (pid 1, cam 0): distances 0.1 0.2 0.3 0.4 0.5. g0 is same pid + same camera -> removed.
    #   Ranked list after removal: g1 (miss), g2 (HIT, rank 2), g3 (miss), g4 (HIT, rank 4).
    #   CMC = [0, 1, 1, 1];  AP = (1/2 + 2/4) / 2 = 0.5
    # q1 (pid 2, cam 0): distances 0.9 0.1 0.5 0.3 0.7 -> g1 (HIT, rank 1), g3, g2, g4, g0.
    #   CMC = [1, 1, 1, 1];  AP = 1/1 = 1.0
    # q2 (pid 3, cam 1): its only pid-3 gallery image g3 is on camera 1 too -> removed -> no valid
    #   match -> query skipped.
    # Mean over the 2 valid queries: CMC = [0.5, 1, 1, 1], mAP = (0.5 + 1.0) / 2 = 0.75
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5],
            [0.9, 0.1, 0.5, 0.3, 0.7],
            [0.5, 0.4, 0.3, 0.2, 0.1],
        ]
    )
    q_pids, q_camids = np.array([1, 2, 3]), np.array([0, 0, 1])
    g_pids, g_camids = np.array([1, 2, 1, 3, 1]), np.array([0, 1, 1, 1, 2])

    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=4)

    np.testing.assert_array_equal(cmc, np.array([0.5, 1.0, 1.0, 1.0], dtype=np.float32))
    assert cmc.dtype == np.float32
    assert mean_ap == pytest.approx(0.75, abs=1e-15)
    accumulator = RankAccumulator(q_pids, g_pids, q_camids, g_camids, max_rank=4)
    accumulator.add(0, distmat)
    assert accumulator.result()[2] == 2  # q2 skipped


def test_same_camera_match_ranked_first_is_ignored() -> None:
    # g0 has the query's pid AND camera and is the closest: it must not count as a rank-1 hit.
    distmat = np.array([[0.0, 0.5, 1.0]])
    q_pids, q_camids = np.array([7]), np.array([0])
    g_pids = np.array([7, 5, 7])

    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, np.array([0, 1, 1]), max_rank=2)
    np.testing.assert_array_equal(cmc, [0.0, 1.0])  # first valid hit is g2, at rank 2 once g0 is gone
    assert mean_ap == pytest.approx(0.5)

    # Control: the same g0 on another camera is a legitimate rank-1 hit.
    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, np.array([1, 1, 1]), max_rank=2)
    np.testing.assert_array_equal(cmc, [1.0, 1.0])
    assert mean_ap == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_query_without_valid_match_is_skipped_and_all_invalid_raises() -> None:
    distmat = np.array([[0.2, 0.1], [0.1, 0.2]])
    g_pids, g_camids = np.array([1, 2]), np.array([1, 1])
    # q1 (pid 9) has no gallery image at all: skipped, so metrics are q0's alone.
    cmc, mean_ap = evaluate_rank(distmat, np.array([1, 9]), g_pids, np.array([0, 0]), g_camids, max_rank=2)
    np.testing.assert_array_equal(cmc, [0.0, 1.0])
    assert mean_ap == pytest.approx(0.5)

    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(distmat, np.array([8, 9]), g_pids, np.array([0, 0]), g_camids, max_rank=2)


@pytest.mark.parametrize("integer_distances", [False, True], ids=["continuous", "many-ties"])
def test_matches_per_query_reference_on_random_data(integer_distances: bool) -> None:
    rng = np.random.default_rng(3)
    num_query, num_gallery = 120, 700
    q_pids, g_pids, q_camids, g_camids = random_protocol(rng, num_query, num_gallery, num_ids=60, num_cams=3)
    if integer_distances:  # ties everywhere: order must follow gallery index (stable sort)
        distmat = rng.integers(0, 8, (num_query, num_gallery)).astype(np.float32)
    else:
        distmat = rng.random((num_query, num_gallery))

    expected_cmc, expected_map, _ = reference_eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, 50)
    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, chunk_size=32)

    np.testing.assert_array_equal(cmc, expected_cmc)
    assert mean_ap == pytest.approx(expected_map, rel=1e-12)


def test_equal_distances_ranked_by_gallery_index() -> None:
    # g0 (wrong pid) and g1 (right pid) are tied: the stable order puts g0 first -> rank-1 miss.
    distmat = np.array([[0.3, 0.3, 0.9]])
    cmc, mean_ap = evaluate_rank(distmat, np.array([1]), np.array([2, 1, 3]), np.array([0]), np.array([1, 1, 1]), 3)
    np.testing.assert_array_equal(cmc, [0.0, 1.0, 1.0])
    assert mean_ap == pytest.approx(0.5)


def test_chunked_equals_unchunked_and_torch_inputs_accepted() -> None:
    rng = np.random.default_rng(5)
    q_pids, g_pids, q_camids, g_camids = random_protocol(rng, 97, 400, num_ids=40, num_cams=4)
    distmat = rng.random((97, 400)).astype(np.float32)

    whole_cmc, whole_map = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, chunk_size=10_000)
    for chunk_size in (1, 7, 64):
        cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, chunk_size=chunk_size)
        np.testing.assert_array_equal(cmc, whole_cmc)
        assert mean_ap == whole_map
    as_tensors = [torch.from_numpy(a) for a in (distmat, q_pids, g_pids, q_camids, g_camids)]
    cmc, mean_ap = evaluate_rank(*as_tensors)
    np.testing.assert_array_equal(cmc, whole_cmc)
    assert mean_ap == whole_map


def test_max_rank_clamped_to_gallery_size() -> None:
    distmat = np.array([[0.1, 0.2, 0.3]])
    with pytest.warns(UserWarning, match="max_rank"):
        cmc, _ = evaluate_rank(distmat, np.array([1]), np.array([2, 1, 3]), np.array([0]), np.array([1, 1, 1]))
    np.testing.assert_array_equal(cmc, [0.0, 1.0, 1.0])


def test_bad_inputs_raise_clear_errors() -> None:
    distmat = np.zeros((2, 3))
    pids, cams = np.array([1, 2]), np.array([0, 0])
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_rank(distmat, pids, np.array([1, 2]), cams, np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(np.zeros(3), pids, np.array([1, 2, 3]), cams, np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.full((2, 3), np.nan), pids, np.array([1, 2, 3]), cams, np.array([1, 1, 1]), max_rank=3)
    with pytest.raises(ValueError, match="dims differ"):
        evaluate_features(np.ones((2, 4)), np.ones((3, 5)), pids, np.array([1, 2, 3]), cams, np.array([1, 1, 1]))


# --------------------------------------------------------------------------- evaluate_features


def test_evaluate_features_matches_evaluate_rank_on_explicit_cosine_distmat() -> None:
    rng = np.random.default_rng(11)
    query, gallery, q_pids, g_pids, q_camids, g_camids = clustered_features(
        rng, num_ids=30, per_id_query=2, per_id_gallery=9, dim=48, noise=1.0
    )
    query *= rng.uniform(0.5, 3.0, (query.shape[0], 1)).astype(np.float32)  # norms must not matter
    q_norm = query / np.linalg.norm(query.astype(np.float64), axis=1, keepdims=True)
    g_norm = gallery / np.linalg.norm(gallery.astype(np.float64), axis=1, keepdims=True)
    distmat = 1.0 - q_norm @ g_norm.T

    expected_cmc, expected_map = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20)
    for chunk_size in (5, 256):
        metrics = evaluate_features(
            query, gallery, q_pids, g_pids, q_camids, g_camids, max_rank=20, chunk_size=chunk_size
        )
        np.testing.assert_array_equal(metrics.cmc, expected_cmc)
        assert metrics.mAP == pytest.approx(expected_map, rel=1e-12)
        assert metrics.num_valid_queries == query.shape[0]
        assert metrics.rank1 == expected_cmc[0] and metrics.rank20 == expected_cmc[19]
    assert 0.3 < expected_map < 0.99  # the case is neither trivial nor hopeless


# --------------------------------------------------------------------------- re-ranking


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (6, 1, 0.0), (9, 3, 1.0)])
def test_sparse_rerank_equals_dense_reference(k1: int, k2: int, lambda_value: float) -> None:
    rng = np.random.default_rng(k1)
    query, gallery, q_pids, g_pids, q_camids, g_camids = clustered_features(
        rng, num_ids=25, per_id_query=2, per_id_gallery=8, dim=24, noise=1.0
    )
    dense = re_ranking_dense(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    sparse = re_ranking(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)

    assert sparse.shape == dense.shape == (query.shape[0], gallery.shape[0])
    np.testing.assert_allclose(sparse, dense, atol=1e-5)
    dense_cmc, dense_map = evaluate_rank(dense, q_pids, g_pids, q_camids, g_camids)
    sparse_cmc, sparse_map = evaluate_rank(sparse, q_pids, g_pids, q_camids, g_camids)
    np.testing.assert_array_equal(sparse_cmc, dense_cmc)
    assert sparse_map == pytest.approx(dense_map, abs=1e-6)
    if lambda_value < 1.0:  # the Jaccard term really is in play: not just the original distance
        assert np.abs(dense - re_ranking_dense(query, gallery, k1, k2, 1.0)).max() > 0.05


def test_reranker_chunks_cover_all_queries_and_match_full_matrix() -> None:
    rng = np.random.default_rng(2)
    query, gallery, *_ = clustered_features(rng, num_ids=12, per_id_query=3, per_id_gallery=6, dim=16, noise=1.0)
    reranker = KReciprocalReranker(query, gallery, k1=8, k2=3)
    chunks = list(reranker.distance_chunks(chunk_size=7, jaccard_chunk_size=3))
    assert [start for start, _ in chunks] == list(range(0, query.shape[0], 7))
    stacked = np.concatenate([chunk for _, chunk in chunks])
    np.testing.assert_allclose(stacked, re_ranking_dense(query, gallery, k1=8, k2=3), atol=1e-5)


def test_rerank_improves_map_on_clustered_identities() -> None:
    rng = np.random.default_rng(0)
    query, gallery, q_pids, g_pids, q_camids, g_camids = clustered_features(
        rng, num_ids=40, per_id_query=2, per_id_gallery=10, dim=32, noise=1.0
    )
    plain = evaluate_features(query, gallery, q_pids, g_pids, q_camids, g_camids)
    reranked = evaluate_features(query, gallery, q_pids, g_pids, q_camids, g_camids, rerank=True)

    assert plain.mAP < 0.9  # room to improve
    assert reranked.mAP > plain.mAP + 0.05
    expected_cmc, expected_map = evaluate_rank(re_ranking_dense(query, gallery), q_pids, g_pids, q_camids, g_camids)
    np.testing.assert_array_equal(reranked.cmc, expected_cmc)
    assert reranked.mAP == pytest.approx(expected_map, abs=1e-6)


def test_rerank_parameter_validation() -> None:
    features = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="k2"):
        re_ranking(features[:5], features[5:], k1=4, k2=6)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking(features[:5], features[5:], lambda_value=1.5)
    with pytest.raises(ValueError, match="more than k1"):
        re_ranking(features[:5], features[5:], k1=40)


def test_unknown_cameras_never_exclude_matches() -> None:
    """Custom data without camera IDs (camid -1): every correct match counts."""
    distmat = np.array([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]])
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 3])
    unknown_q, unknown_g = np.full(2, -1), np.full(3, -1)
    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, unknown_q, unknown_g, max_rank=3)
    assert cmc.tolist() == [1.0, 1.0, 1.0] and mean_ap == pytest.approx(1.0)
    with pytest.raises(ValueError):  # the same data with one shared known camera has no valid query
        evaluate_rank(distmat, q_pids, g_pids, np.zeros(2), np.zeros(3), max_rank=3)
