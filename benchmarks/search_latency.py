"""Search latency (p50/p99) and recall@10 against exact search, at several gallery sizes.

The index is the one ``reid-app`` itself would use at each size (``reid_app.index``): exact
``IndexFlatIP`` below the IVF threshold (50,000 vectors), IVF-SQ8 with nlist = 4·sqrt(N) and an
nprobe tuned at build time for recall@10 >= 0.95 from there on. Vectors are synthetic, 3840-d
like FA-Net's: unit vectors grouped as people (``--views`` noisy views around each person's
random centre), which is how re-ID embeddings are laid out; ``--spread`` sets how far the views
scatter. Queries are new noisy views of stored people. Each query is searched alone (batch of
one, as the app does) with ``--threads`` FAISS threads; build time is reported too.

    python benchmarks/search_latency.py --sizes 10000,100000 --threads 1

Memory: float32 vectors are 15 KB each at 3840-d (1M = 15.4 GB), SQ8 codes 3.8 KB (1M = 3.8 GB);
the generator keeps all vectors of a size in memory as float16 (1M = 7.7 GB).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from reid_app.index import (
    INDEX_TYPE_FLAT,
    INDEX_TYPE_IVF,
    GalleryIndex,
    build_ivf,
    desired_type,
    recall_at_k,
)

DIM = 3840
CHUNK = 20_000


class SyntheticGallery:
    """``size`` unit vectors, ``views`` per person, stored as float16 to halve memory."""

    def __init__(self, size: int, views: int, spread: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.people = max(1, size // views)
        self.views, self.spread = views, spread
        self.centres = rng.standard_normal((self.people, DIM), dtype=np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.vectors = np.empty((size, DIM), dtype=np.float16)
        for start in range(0, size, CHUNK):
            stop = min(size, start + CHUNK)
            self.vectors[start:stop] = self._views_of(np.arange(start, stop) // views % self.people, rng)
        self.ids = np.arange(1, size + 1, dtype=np.int64)  # database row ids start at 1

    def _views_of(self, people: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal((len(people), DIM), dtype=np.float32) * (self.spread / np.sqrt(DIM))
        vectors = self.centres[people] + noise
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def read(self, ids: np.ndarray):
        """(ids, float32 vectors) chunks, as the database reader yields them."""
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            yield chunk, self.vectors[chunk - 1].astype(np.float32)

    def queries(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return self._views_of(rng.integers(0, self.people, count), rng).astype(np.float32)


def exact_top_k(gallery: SyntheticGallery, queries: np.ndarray, k: int) -> np.ndarray:
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, vectors in gallery.read(gallery.ids):
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        order = np.argsort(-scores, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(all_ids, order, 1)
    return best_ids


def build(gallery: SyntheticGallery, threshold: int) -> GalleryIndex:
    index_type, _ = desired_type(len(gallery.ids), None, 0, threshold)
    if index_type == INDEX_TYPE_IVF:
        index, meta = build_ivf(gallery.read, gallery.ids, DIM, target_recall=0.95)
        return GalleryIndex("tracks", index, {"type": INDEX_TYPE_IVF, **meta})
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    for ids, vectors in gallery.read(gallery.ids):
        index.add_with_ids(vectors, ids)
    return GalleryIndex("tracks", index, {"type": INDEX_TYPE_FLAT})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--views", type=int, default=8, help="vectors per synthetic person")
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm of a view around its centre")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--ivf-threshold", type=int, default=50_000)
    args = parser.parse_args()
    print(
        f"dim {DIM}, {args.views} views per person, spread {args.spread}, {args.queries} single-vector queries, "
        f"{args.threads} search thread(s)"
    )
    print(
        f"{'N':>9} {'index':>8} {'nlist':>6} {'nprobe':>6} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'recall@10':>9} {'index MB':>9}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        faiss.omp_set_num_threads(args.build_threads)
        started = time.perf_counter()
        gallery = SyntheticGallery(size, args.views, args.spread, seed=size)
        generated = time.perf_counter() - started
        started = time.perf_counter()
        index = build(gallery, args.ivf_threshold)
        built = time.perf_counter() - started
        queries = gallery.queries(args.queries, seed=size + 1)
        truth = exact_top_k(gallery, queries, 10)
        faiss.omp_set_num_threads(args.threads)
        index.search(queries[:5], 10)  # warm-up
        latencies, found = [], []
        for query in queries:
            started = time.perf_counter()
            _, ids = index.search(query[None, :], 10)
            latencies.append((time.perf_counter() - started) * 1000)
            found.append(ids[0])
        recall = recall_at_k(np.asarray(found), truth)
        size_mb = len(faiss.serialize_index(index.index)) / 1e6
        print(
            f"{size:>9} {index.index_type:>8} {index.meta.get('nlist', '-'):>6} {index.meta.get('nprobe', '-'):>6} "
            f"{built:>8.1f} {np.percentile(latencies, 50):>8.2f} {np.percentile(latencies, 99):>8.2f} "
            f"{recall:>9.3f} {size_mb:>9.0f}   (vectors generated in {generated:.0f} s)",
            flush=True,
        )
        del gallery, index


if __name__ == "__main__":
    main()
