"""The FAISS index types of a gallery, their build and their search-time tuning.

Index type, chosen from the number of vectors N each time the index is (re)built:

* N < ``ivf_threshold`` (default 50,000, :class:`reid_app.config.AppConfig`): **exact search**,
  ``IndexIDMap2(IndexFlatIP)``.
* N >= ``ivf_threshold``: **PCA + IVF-SQ8, re-scored with SQ8 full vectors** (type
  ``pca_ivf_sq8_refine``). A query is searched in two stages:

  1. candidates: the vectors are projected to ``REDUCED_DIM`` (256) dimensions by an uncentred PCA
     (the top eigenvectors of the vectors' second-moment matrix, so inner products are what the
     projection keeps best) and searched in an IVF index with 8-bit scalar-quantized codes
     (256 B per vector), ``nlist = 4·sqrt(N)`` lists, ``nprobe`` of them visited. It returns
     ``k · k_factor`` candidates. Scanning 256-d codes instead of 3840-d ones is what makes it
     fast: a probed list costs 15x less than with full-dimension IVF-SQ8.
  2. re-scoring: the candidates' full vectors, kept 8-bit scalar-quantized (3840 B per vector,
     1M vectors = 3.8 GB), are scored against the full query straight from their codes
     (:class:`StoreScorer`); the best ``k`` are returned. The scores are inner products with the
     SQ8 vectors (within ~3e-3 of exact).

  PCA is fitted on a sample of at most ``PCA_SAMPLE`` stored vectors and k-means on at most
  ``TRAIN_POINTS_PER_LIST · nlist`` projected ones (``nlist`` is capped so every list gets
  ``MIN_POINTS_PER_LIST`` of them), so a build reads the gallery about twice and takes minutes
  at 1M vectors. ``nprobe`` and ``k_factor`` are tuned at build time on up to 200 stored vectors
  used as queries (each one's own id left out of its results and of its truth): of the pairs
  whose recall@10 against exact search reaches ``ivf_target_recall`` (0.95), the one that
  reads the fewest code bytes per query (nprobe grows by sqrt 2 steps, k_factor is one of
  ``K_FACTORS``); the measured recall is recorded. If none reaches it, the largest pair tried
  is kept with its recall. A single query is spread over the FAISS threads list by list.
* An approximate index is rebuilt when N has grown 4x since it was trained (its lists get too
  long and its PCA/centroids stale) and turned back into an exact one when N falls under half
  the threshold.

The approximate index is stored as one FAISS file holding an ``IndexRefine`` whose ``base_index``
is ``IndexPreTransform(LinearTransform, IndexIVFScalarQuantizer)`` and whose ``refine_index`` is
``IndexIDMap2(IndexScalarQuantizer)``, both keyed by database row ids (``add_with_ids``,
``remove_ids`` and ``reconstruct`` by id all work on them). FAISS's own ``IndexRefine.search``
expects sequential ids (0..ntotal-1), so the container is never searched directly: the
re-scoring is done by :meth:`GalleryIndex.search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from reid_app.errors import ReidAppError

INDEX_TYPE_FLAT = "flat"
#: PCA + IVF-SQ8 candidates re-scored with SQ8 full vectors (see the module docstring).
INDEX_TYPE_IVF = "pca_ivf_sq8_refine"
#: FAISS wants about this many training points per IVF list.
MIN_POINTS_PER_LIST = 39
#: k-means sample per list (more costs k-means time for little gain).
TRAIN_POINTS_PER_LIST = 64
#: Stored vectors the PCA is fitted on (3840-d float32: 50,000 = 770 MB while building).
PCA_SAMPLE = 50_000
#: Dimension of the candidate search. 256 of 3840 keeps the neighbourhoods of re-ID features
#: well enough for the re-scoring to restore the exact order among ~100 candidates.
REDUCED_DIM = 256
#: Candidates re-scored per result (``k_factor``) that tuning chooses from.
K_FACTORS = (2, 4, 8, 16, 32, 64)
#: Ratio between the nprobe values tuning tries (powers of two would overshoot by up to 2x).
NPROBE_STEP = math.sqrt(2)
TUNING_QUERIES = 200
RECALL_K = 10
_KMEANS_ITERATIONS = 10  # FAISS's default 25 costs much more build time for little recall
#: The 8-bit quantizers' per-dimension ranges are the training sample's min..max widened by this
#: fraction of it on each side: vectors added later (new cameras, new people) that fall outside
#: the trained range would be clipped, costing score accuracy, for a 1.4x coarser step.
_SQ_RANGE_MARGIN = 0.2


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _ivf_ids(ivf: faiss.IndexIVF) -> np.ndarray:
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(list_no), lists.list_size(list_no)).copy()
        for list_no in range(ivf.nlist)
        if lists.list_size(list_no) > 0
    ]
    return np.sort(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, dtype=np.int64)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The row ids stored in ``index`` (sorted int64)."""
    ivf = _ivf_of(index)
    if ivf is None:
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    return _ivf_ids(ivf)


def refine_parts(index: faiss.Index) -> tuple[faiss.IndexPreTransform, faiss.IndexIDMap2]:
    """(candidate index, full-vector store) of an approximate index (see the module docstring)."""
    container = faiss.downcast_index(index)
    if not isinstance(container, faiss.IndexRefine):
        raise ReidAppError(f"not a {INDEX_TYPE_IVF} index: {type(container).__name__}")
    return faiss.downcast_index(container.base_index), faiss.downcast_index(container.refine_index)


class StoreScorer:
    """Inner products of queries with the SQ8 vectors of a full-vector store, by row id.

    Computed on the 8-bit codes directly: a QT_8bit value decodes to ``vmin + (code + 0.5) · step``
    per dimension, so ``q · x = codes @ (q · step) + q · vmin + 0.5 · sum(q · step)``: one gather
    and one matrix-vector product per query, several times faster than decoding each candidate
    through FAISS. The codes are read in place (no copy): a scorer is only valid until the store
    changes."""

    def __init__(self, store: faiss.IndexIDMap2) -> None:
        quantized = faiss.downcast_index(store.index)
        if not isinstance(quantized, faiss.IndexScalarQuantizer) or quantized.sq.qtype != faiss.ScalarQuantizer.QT_8bit:
            raise ReidAppError("the full-vector store of the index is not an 8-bit scalar quantizer")
        trained = faiss.vector_to_array(quantized.sq.trained)
        self.vmin, self.step = trained[: quantized.d], trained[quantized.d :] / 255
        count, size = int(quantized.ntotal), int(quantized.code_size)
        self.codes = (
            faiss.rev_swig_ptr(quantized.codes.data(), count * size).reshape(count, size)
            if count
            else np.zeros((0, size), dtype=np.uint8)
        )
        id_map = faiss.vector_to_array(store.id_map).astype(np.int64)
        self.order = np.argsort(id_map, kind="stable")
        self.sorted_ids = id_map[self.order]

    def scores(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``query`` · stored vector of each of ``ids`` (which must all be stored)."""
        slots = np.searchsorted(self.sorted_ids, ids).clip(max=max(len(self.sorted_ids) - 1, 0))
        if not np.array_equal(self.sorted_ids[slots], ids):
            raise ReidAppError("the candidate index returned ids its full-vector store does not hold")
        weights = query * self.step
        offset = float(query @ self.vmin) + 0.5 * float(weights.sum())
        return self.codes[self.order[slots]].astype(np.float32) @ weights + offset


def rescore(scorer: StoreScorer, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) of each query among its candidate ids (-1 = none), scored with the
    full vectors; ids -1 pad missing results."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (query, row_candidates) in enumerate(zip(queries, candidates, strict=True)):
        valid = row_candidates[row_candidates >= 0]
        if len(valid) == 0:
            continue
        candidate_scores = scorer.scores(query, valid)
        best = np.argsort(-candidate_scores, kind="stable")[:k]
        scores[row, : len(best)], ids[row, : len(best)] = candidate_scores[best], valid[best]
    return scores, ids


@dataclass
class GalleryIndex:
    """A loaded index and its sidecar metadata."""

    kind: str
    index: faiss.Index
    meta: dict[str, Any]
    _parts: tuple[faiss.Index, faiss.Index] | None = field(default=None, init=False, repr=False)
    _scorer: StoreScorer | None = field(default=None, init=False, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_type(self) -> str:
        return str(self.meta["type"])

    def _refine_parts(self) -> tuple[faiss.Index, faiss.Index]:
        if self._parts is None:
            self._parts = refine_parts(self.index)
        return self._parts

    def _store_scorer(self) -> StoreScorer:
        if self._scorer is None:
            self._scorer = StoreScorer(self._refine_parts()[1])
        return self._scorer

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query row; ids -1 pad missing results. ``allowed_ids``
        restricts the search to those row ids (camera filters)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ntotal == 0 or k <= 0:
            empty = np.zeros((len(queries), max(k, 0)))
            return empty.astype(np.float32), (empty - 1).astype(np.int64)
        selector = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
        if self.index_type != INDEX_TYPE_IVF:
            return self.index.search(queries, k, params=faiss.SearchParameters(sel=selector))
        candidates_index, _ = self._refine_parts()
        # Few queries: the threads share out each query's lists (else they would share out the
        # queries and all but one would idle on a single-query search).
        faiss.extract_index_ivf(candidates_index).parallel_mode = 1 if len(queries) < faiss.omp_get_max_threads() else 0
        ivf_params = faiss.SearchParametersIVF(sel=selector, nprobe=int(self.meta["nprobe"]))
        params = faiss.SearchParametersPreTransform(index_params=ivf_params)
        _, candidates = candidates_index.search(queries, k * int(self.meta["k_factor"]), params=params)
        return rescore(self._store_scorer(), queries, candidates, k)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` under the row ids ``ids``."""
        if self.index_type != INDEX_TYPE_IVF:
            self.index.add_with_ids(vectors, ids)
            return
        candidates_index, store = self._refine_parts()
        self._scorer = None  # its view of the codes goes stale
        candidates_index.add_with_ids(vectors, ids)
        store.add_with_ids(vectors, ids)
        self.index.ntotal = candidates_index.ntotal  # the container does not track its parts

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of row ids ``ids``; returns how many were held."""
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        if self.index_type != INDEX_TYPE_IVF:
            return int(self.index.remove_ids(selector))
        candidates_index, store = self._refine_parts()
        self._scorer = None
        removed = int(candidates_index.remove_ids(selector))
        store.remove_ids(selector)
        self.index.ntotal = candidates_index.ntotal
        return removed


def new_flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def ivf_nlist(n_vectors: int) -> int:
    """nlist = 4·sqrt(N), capped so every list gets MIN_POINTS_PER_LIST training points."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // MIN_POINTS_PER_LIST))


def reduced_dim(dim: int) -> int:
    """Dimension of the candidate search for ``dim``-d vectors."""
    return max(1, min(REDUCED_DIM, dim // 2))


def desired_type(n_vectors: int, current: str | None, trained_on: int, threshold: int) -> tuple[str, bool]:
    """(index type wanted for ``n_vectors``, whether the current index must be rebuilt)."""
    if current == INDEX_TYPE_IVF:
        if n_vectors < threshold // 2:
            return INDEX_TYPE_FLAT, True
        return INDEX_TYPE_IVF, n_vectors >= 4 * max(trained_on, 1)
    if n_vectors >= threshold:
        return INDEX_TYPE_IVF, True
    return INDEX_TYPE_FLAT, current != INDEX_TYPE_FLAT


def exact_topk_update(
    best_scores: np.ndarray, best_ids: np.ndarray, queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge one chunk of gallery vectors into the running exact top-k of ``queries``."""
    scores = queries @ vectors.T
    all_scores = np.concatenate([best_scores, scores], axis=1)
    all_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
    k = best_scores.shape[1]
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)


VectorChunks = Callable[[np.ndarray], Iterator[tuple[np.ndarray, np.ndarray]]]


def _uncentred_pca(sample: np.ndarray, out_dim: int) -> faiss.LinearTransform:
    """Projection on the top ``out_dim`` eigenvectors of the sample's second-moment matrix: the
    rank-``out_dim`` map that best keeps inner products (centring would drop the mean direction,
    which inner products between same-signed features depend on)."""
    second_moment = np.zeros((sample.shape[1], sample.shape[1]), dtype=np.float64)
    for start in range(0, len(sample), 10_000):
        part = sample[start : start + 10_000]
        second_moment += (part.T @ part).astype(np.float64)
    _, eigenvectors = np.linalg.eigh(second_moment)  # ascending eigenvalues
    projection = np.ascontiguousarray(eigenvectors[:, ::-1][:, :out_dim].T, dtype=np.float32)
    transform = faiss.LinearTransform(sample.shape[1], out_dim, False)
    faiss.copy_array_to_vector(projection.ravel(), transform.A)
    transform.is_trained = True
    return transform


def candidate_ivf(out_dim: int, nlist: int) -> faiss.IndexIVF:
    """The untrained IVF index of the candidate search (in the reduced space)."""
    ivf = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(out_dim), out_dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    ivf.sq.rangestat_arg = _SQ_RANGE_MARGIN
    return ivf


def build_ivf(
    read_vectors: VectorChunks,
    ids: np.ndarray,
    dim: int,
    target_recall: float,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Train and fill an approximate (PCA + IVF-SQ8 + SQ8 re-scoring) index with the vectors of
    ``ids`` and tune its nprobe and k_factor.

    ``read_vectors(ids)`` yields (ids, float32 vectors) chunks (from the database in the app). It
    is called three times: PCA sample, k-means sample, then every id. ``progress`` is told when
    each phase is done."""
    report = progress or (lambda _message: None)
    rng = np.random.default_rng(seed)
    nlist = ivf_nlist(len(ids))
    out_dim = reduced_dim(dim)
    train_ids = rng.permutation(rng.choice(ids, size=min(len(ids), TRAIN_POINTS_PER_LIST * nlist), replace=False))
    pca_ids = np.sort(train_ids[:PCA_SAMPLE])
    pca_sample = np.concatenate([vecs for _, vecs in read_vectors(pca_ids)])
    transform = _uncentred_pca(pca_sample, out_dim)
    report(f"PCA {dim}->{out_dim} fitted on {len(pca_sample)} vectors")
    store = faiss.IndexIDMap2(
        faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    )
    store_quantizer = faiss.downcast_index(store.index)
    store_quantizer.sq.rangestat_arg = _SQ_RANGE_MARGIN
    store.train(pca_sample)
    query_rows = rng.choice(len(pca_sample), size=min(TUNING_QUERIES, len(pca_sample)), replace=False)
    queries, query_ids = pca_sample[query_rows].copy(), pca_ids[query_rows]
    del pca_sample
    # k-means runs in the reduced space: 15x cheaper than at full dimension.
    reduced_train = np.concatenate([transform.apply(vecs) for _, vecs in read_vectors(np.sort(train_ids))])
    ivf = candidate_ivf(out_dim, nlist)
    ivf.cp.niter = _KMEANS_ITERATIONS
    ivf.train(reduced_train)
    report(f"k-means: {nlist} lists trained on {len(reduced_train)} vectors")
    del reduced_train
    candidates_index = faiss.IndexPreTransform(transform, ivf)
    index = faiss.IndexRefine(candidates_index, store)
    # Exact truth for the tuning queries, each one's own id left out: k + 1 neighbours, then drop it.
    k = min(RECALL_K, len(ids) - 1)
    best_scores = np.full((len(queries), k + 1), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k + 1), -1, dtype=np.int64)
    gallery = GalleryIndex("", index, {"type": INDEX_TYPE_IVF})
    for chunk_ids, vectors in read_vectors(ids):
        gallery.add(chunk_ids, vectors)
        best_scores, best_ids = exact_topk_update(best_scores, best_ids, queries, chunk_ids, vectors)
    report(f"{len(ids)} vectors added")
    truth = _without_own_ids(best_ids, query_ids, k)
    nprobe, k_factor, recall = tune_search(gallery, queries, query_ids, truth, target_recall)
    report(f"tuned: nprobe {nprobe}, k_factor {k_factor}, recall@{k} {recall:.3f}")
    meta = {
        "nlist": nlist,
        "nprobe": nprobe,
        "k_factor": k_factor,
        "reduced_dim": out_dim,
        "recall_at_10": recall,
        "trained_on": len(ids),
    }
    return index, meta


def _without_own_ids(found: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` ids of each row other than that row's own id."""
    rows = [row[row != own][:k] for row, own in zip(found, own_ids, strict=True)]
    return np.asarray([np.pad(row, (0, k - len(row)), constant_values=-1) for row in rows], dtype=np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k ids) present in ``found``."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(truth.size, 1)


def tune_search(
    gallery: GalleryIndex, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, target_recall: float
) -> tuple[int, int, float]:
    """(nprobe, k_factor, recall@k) of the cheapest pair reaching ``target_recall`` on ``queries``
    (stored vectors, whose own ids ``query_ids`` are left out of the results, as of ``truth``).

    Cost = code bytes read per query: nprobe lists of the reduced codes + k·k_factor full SQ8
    vectors. nprobe grows by NPROBE_STEP (sqrt 2) up to nlist; the candidates of the largest
    k_factor are re-scored once per nprobe and each smaller k_factor uses a prefix of them."""
    candidates_index, store = gallery._refine_parts()
    scorer = gallery._store_scorer()
    ivf = faiss.extract_index_ivf(candidates_index)
    k = truth.shape[1]
    list_cost = ivf.ntotal / ivf.nlist * ivf.code_size
    best: tuple[float, int, int, float] | None = None  # (cost, nprobe, k_factor, recall)
    fallback = (1, K_FACTORS[0], 0.0)
    nprobe = 1
    while best is None or nprobe * list_cost < best[0]:
        params = faiss.SearchParametersPreTransform(index_params=faiss.SearchParametersIVF(nprobe=nprobe))
        _, candidates = candidates_index.search(queries, k * K_FACTORS[-1], params=params)
        for k_factor in K_FACTORS:
            # As many candidates as a search of k results gets; the query's own id among them
            # leaves one fewer for its neighbours (a little pessimistic).
            _, found = rescore(scorer, queries, candidates[:, : k * k_factor], k + 1)
            recall = recall_at_k(_without_own_ids(found, query_ids, k), truth)
            cost = nprobe * list_cost + k * k_factor * store.d  # one byte per dimension
            if recall >= target_recall and (best is None or cost < best[0]):
                best = (cost, nprobe, k_factor, recall)
            fallback = (nprobe, k_factor, recall)
        if nprobe >= ivf.nlist:
            break
        nprobe = min(max(nprobe + 1, round(nprobe * NPROBE_STEP)), ivf.nlist)
    return (best[1], best[2], best[3]) if best is not None else fallback

