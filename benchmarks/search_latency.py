"""Search latency (p50/p99), recall@10 against exact search, build time and index size at several
gallery sizes.

The index is the one ``reid-app`` itself would use at each size (``reid_app.index``): exact
``IndexFlatIP`` below the threshold (``--ivf-threshold``, the app's default 50,000 vectors),
from there on PCA-256 + IVF-SQ8 candidates re-scored with SQ8 full vectors, nprobe and k_factor
tuned at build time for recall@10 >= 0.95.

Vectors are synthetic, 3840-d like FA-Net's, laid out like re-ID embeddings: each person has a
centre and ``--views`` noisy views of it. Real CNN embeddings are far from isotropic (most of
their energy lies in a few hundred directions), so centres and most of the view noise are drawn
in a ``--latent-dim`` (512) subspace with a 1/i power spectrum (its top 256 directions carry
90% of that energy); ``--isotropic`` of the noise energy is spread over all 3840 dimensions.
``--spread`` is the noise norm of a view relative to its centre. Queries are new views of stored
people, searched one at a time (batch of one, as the app does) with 1 and with 2 FAISS threads.

    python benchmarks/search_latency.py --sizes 10000,100000,1000000

Memory: no size is ever held as float32 (1M x 3840 = 15.4 GB). The vector of row id i is a pure
function of (seed, i's batch of ``CHUNK`` rows): batches are generated when the index build
reads them, and the exact top-10 of the queries is updated from each batch the first time it is
generated. The index holds 3.8 KB (SQ8 full vector) + 256 B (reduced code) per vector.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Iterator

import faiss
import numpy as np

from reid_app.index import (
    INDEX_TYPE_FLAT,
    INDEX_TYPE_IVF,
    GalleryIndex,
    build_ivf,
    desired_type,
    exact_topk_update,
    recall_at_k,
)

DIM = 3840
CHUNK = 20_000
K = 10


class SyntheticPeople:
    """``size`` unit vectors with row ids 1..size, ``views`` consecutive ids per person."""

    def __init__(self, size: int, views: int, spread: float, isotropic: float, latent_dim: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.size, self.views, self.seed = size, views, seed
        self.people = max(1, size // views)
        self.ids = np.arange(1, size + 1, dtype=np.int64)  # database row ids start at 1
        self.basis = np.linalg.qr(rng.standard_normal((DIM, latent_dim), dtype=np.float32))[0]  # orthonormal columns
        spectrum = 1 / np.sqrt(np.arange(1, latent_dim + 1, dtype=np.float32))
        self.spectrum = spectrum / np.linalg.norm(spectrum)  # centre energy 1 on average
        self.centres = rng.standard_normal((self.people, latent_dim), dtype=np.float32) * self.spectrum
        self.latent_noise = spread * np.sqrt(1 - isotropic)
        self.isotropic_noise = spread * np.sqrt(isotropic / DIM)
        self.batches_seen: set[int] = set()
        self.queries = np.zeros((0, DIM), dtype=np.float32)
        self.truth_scores = np.zeros((0, K), dtype=np.float32)
        self.truth_ids = np.zeros((0, K), dtype=np.int64)

    def _views_of(self, people: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        latent = self.centres[people] + self.latent_noise * self.spectrum * rng.standard_normal(
            (len(people), len(self.spectrum)), dtype=np.float32
        )
        vectors = latent @ self.basis.T
        vectors += self.isotropic_noise * rng.standard_normal(vectors.shape, dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def set_queries(self, count: int, seed: int) -> None:
        """New views of ``count`` random stored people; their exact top-k is gathered from now on."""
        rng = np.random.default_rng(seed)
        self.queries = self._views_of(rng.integers(0, self.people, count), rng)
        self.truth_scores = np.full((count, K), -np.inf, dtype=np.float32)
        self.truth_ids = np.full((count, K), -1, dtype=np.int64)
        self.batches_seen.clear()

    def batch(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of batch ``number``; merged into the queries' truth the first time."""
        ids = self.ids[number * CHUNK : (number + 1) * CHUNK]
        vectors = self._views_of((ids - 1) // self.views % self.people, np.random.default_rng([self.seed, number]))
        if number not in self.batches_seen:
            self.batches_seen.add(number)
            self.truth_scores, self.truth_ids = exact_topk_update(
                self.truth_scores, self.truth_ids, self.queries, ids, vectors
            )
        return ids, vectors

    def read(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) chunks of sorted ``ids``, as the database reader yields them."""
        batch_of = (ids - 1) // CHUNK
        for number in np.unique(batch_of):
            wanted = ids[batch_of == number]
            _, vectors = self.batch(int(number))
            yield wanted, vectors[wanted - 1 - number * CHUNK]

    def truth(self) -> np.ndarray:
        for number in range((self.size + CHUNK - 1) // CHUNK):
            if number not in self.batches_seen:
                self.batch(number)
        return self.truth_ids


def build(gallery: SyntheticPeople, index_type: str) -> GalleryIndex:
    if index_type == INDEX_TYPE_IVF:
        started = time.perf_counter()

        def progress(message: str) -> None:
            print(f"  [N={gallery.size} build +{time.perf_counter() - started:.0f} s] {message}", flush=True)

        index, meta = build_ivf(gallery.read, gallery.ids, DIM, target_recall=0.95, progress=progress)
        return GalleryIndex("tracks", index, {"type": INDEX_TYPE_IVF, **meta})
    flat = GalleryIndex("tracks", faiss.IndexIDMap2(faiss.IndexFlatIP(DIM)), {"type": INDEX_TYPE_FLAT})
    for ids, vectors in gallery.read(gallery.ids):
        flat.add(ids, vectors)
    return flat


def latencies_ms(index: GalleryIndex, queries: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query latency (ms) of single-query searches, and the ids found."""
    faiss.omp_set_num_threads(threads)
    index.search(queries[:5], K)  # warm-up
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, ids = index.search(query[None, :], K)
        times.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    return np.asarray(times), np.asarray(found)


def file_size_mb(index: faiss.Index, folder: str) -> float:
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--views", type=int, default=8, help="vectors per synthetic person")
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm of a view relative to its centre")
    parser.add_argument("--isotropic", type=float, default=0.25, help="share of the noise energy spread over all dims")
    parser.add_argument("--latent-dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--ivf-threshold", type=int, default=50_000)
    parser.add_argument("--tmp-dir", default=None, help="where the index file is written to measure its size")
    args = parser.parse_args()
    print(
        f"dim {DIM}, {args.views} views per person, spread {args.spread}, isotropic {args.isotropic}, "
        f"latent dim {args.latent_dim}, {args.queries} single-vector queries, recall@{K} vs exact"
    )
    print(
        f"{'N':>9} {'index':>18} {'nlist':>6} {'nprobe':>6} {'kfac':>4} {'build s':>8} {'p50 1t':>7} {'p99 1t':>7} "
        f"{'p50 2t':>7} {'p99 2t':>7} {'recall':>6} {'tuned':>6} {'file MB':>8} {'peak RSS GB':>11}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        faiss.omp_set_num_threads(args.build_threads)
        gallery = SyntheticPeople(size, args.views, args.spread, args.isotropic, args.latent_dim, seed=size)
        gallery.set_queries(args.queries, seed=size + 1)
        index_type, _ = desired_type(size, None, 0, args.ivf_threshold)
        started = time.perf_counter()
        index = build(gallery, index_type)
        built = time.perf_counter() - started
        truth = gallery.truth()
        one_thread, found = latencies_ms(index, gallery.queries, threads=1)
        two_threads, _ = latencies_ms(index, gallery.queries, threads=2)
        recall = recall_at_k(found, truth)
        peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        meta = index.meta
        print(
            f"{size:>9} {index.index_type:>18} {meta.get('nlist', '-'):>6} {meta.get('nprobe', '-'):>6} "
            f"{meta.get('k_factor', '-'):>4} {built:>8.1f} "
            f"{np.percentile(one_thread, 50):>7.2f} {np.percentile(one_thread, 99):>7.2f} "
            f"{np.percentile(two_threads, 50):>7.2f} {np.percentile(two_threads, 99):>7.2f} {recall:>6.3f} "
            f"{meta.get('recall_at_10', float('nan')):>6.3f} {file_size_mb(index.index, args.tmp_dir):>8.0f} "
            f"{peak_rss_gb:>11.1f}",
            flush=True,
        )
        if index.index_type == INDEX_TYPE_IVF:
            tuned = dict(index.meta)
            for nprobe in sorted({max(1, tuned["nprobe"] // 4), max(1, tuned["nprobe"] // 2), tuned["nprobe"]}):
                for k_factor in sorted({tuned["k_factor"], 2 * tuned["k_factor"]}):
                    index.meta.update(nprobe=nprobe, k_factor=k_factor)
                    times, found = latencies_ms(index, gallery.queries, threads=1)
                    times_2, _ = latencies_ms(index, gallery.queries, threads=2)
                    print(
                        f"    nprobe {nprobe:>5} k_factor {k_factor:>3}: p50 {np.percentile(times, 50):.2f} ms "
                        f"(2 threads {np.percentile(times_2, 50):.2f} ms), recall@{K} {recall_at_k(found, truth):.3f}",
                        flush=True,
                    )
            index.meta.update(tuned)
        del gallery, index


if __name__ == "__main__":
    main()
