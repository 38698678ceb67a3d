"""What the server loads once and shares between request threads, and how they share it safely.

Requests run on a thread pool (FastAPI runs plain ``def`` routes there). Three things are not
safe to share as they are:

* the detector: an Ultralytics predictor keeps per-call state (it is documented as not
  thread-safe), so calls are serialised by a lock;
* the embedder: PyTorch inference is thread-safe, but two forward passes at once on a small CPU
  only fight over the same cores; one lock keeps each call as fast as it can be. Requests that
  queue for it are embedded together: whoever gets the lock embeds the crops of every request
  waiting at that moment in one batch (one forward pass of 16 crops costs far less than 16 of
  one), and the others find their vectors ready when their turn comes;
* the FAISS index: :meth:`IndexManager.sync` adds the vectors other processes (ingests) stored
  since the last request to the loaded index *in place*, which must not happen while another
  thread searches that same index. Sync and search therefore hold one lock (a flat search of
  a demo-sized gallery takes microseconds; an IVF one milliseconds).

The locks are granted in arrival order (:class:`FairLock`): with ``threading.Lock`` a waiting
request can lose the lock to later arrivals again and again, and under 16 concurrent clients some
searches waited over a minute while others were served in seconds (benchmarks/RESULTS.md).

Model results are cached by content (an LRU keyed by the image's bytes): an operator who changes
top-k, cameras or threshold on the same photo re-runs only the index search, not the detector
and embedder. Both models are deterministic, so a cached answer is the answer.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reid_app.config import AppConfig
from reid_app.index import GalleryIndex, IndexManager, SyncReport
from reid_app.store import Database

#: Distinct query images whose model results are kept (a few MB at most: boxes and 15 KB vectors).
CACHE_ENTRIES = 256


class FairLock:
    """A lock granted first come, first served (a ticket queue)."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> FairLock:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._condition.wait()
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class _LRU:
    def __init__(self, size: int) -> None:
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get_or_compute(self, key: bytes, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def _key(*parts: Any) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(repr((part.shape, part.dtype.str)).encode())
            digest.update(np.ascontiguousarray(part).data)
        else:
            digest.update(repr(part).encode())
        digest.update(b"|")
    return digest.digest()


class SharedDetector:
    """The person detector behind a lock and a result cache; otherwise the detector itself."""

    def __init__(self, detector: Any, cache_entries: int = CACHE_ENTRIES) -> None:
        self._detector, self._lock, self._cache = detector, FairLock(), _LRU(cache_entries)
        self.name = detector.name

    def detect(self, image_bgr: np.ndarray, confidence: float | None = None, imgsz: int | None = None) -> list[Any]:
        def run() -> list[Any]:
            with self._lock:
                return self._detector.detect(image_bgr, confidence=confidence, imgsz=imgsz)

        return list(self._cache.get_or_compute(_key("detect", confidence, imgsz, image_bgr), run))


@dataclass
class _EmbedJob:
    crops: list[np.ndarray]
    vectors: np.ndarray | None = None
    error: BaseException | None = None


class SharedEmbedder:
    """The embedder behind a lock, batching across requests, and a result cache; its identity
    attributes pass through."""

    def __init__(self, embedder: Any, cache_entries: int = CACHE_ENTRIES) -> None:
        self._embedder, self._lock, self._cache = embedder, FairLock(), _LRU(cache_entries)
        self._waiting: list[_EmbedJob] = []
        self._waiting_lock = threading.Lock()
        self.batches: list[int] = []  # requests per model call, most recent last (for tests/benchmarks)

    def __getattr__(self, name: str) -> Any:  # model_name, weights_sha256, dim, warning, ...
        return getattr(self._embedder, name)

    def embed(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        return self._cache.get_or_compute(_key("embed", *crops_bgr), lambda: self._embed_batched(crops_bgr)).copy()

    def _embed_batched(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        job = _EmbedJob(list(crops_bgr))
        with self._waiting_lock:
            self._waiting.append(job)
        with self._lock:
            if job.vectors is None and job.error is None:  # nobody embedded it while this waited
                with self._waiting_lock:
                    jobs, self._waiting = self._waiting, []
                self._run(jobs)
        if job.error is not None:
            raise job.error
        return job.vectors

    def _run(self, jobs: list[_EmbedJob]) -> None:
        self.batches = [*self.batches[-99:], len(jobs)]
        try:
            vectors = self._embedder.embed([crop for job in jobs for crop in job.crops])
        except Exception:
            if len(jobs) == 1:
                raise
            # One request's crops broke the batch: embed each alone, so only that request fails.
            for job in jobs:
                try:
                    job.vectors = self._embedder.embed(job.crops)
                except Exception as exc:
                    job.error = exc
            return
        start = 0
        for job in jobs:
            job.vectors = vectors[start : start + len(job.crops)]
            start += len(job.crops)


@dataclass
class _LockedGallery:
    """A synced index whose searches hold the lock that its in-place updates hold."""

    gallery: GalleryIndex
    lock: FairLock

    @property
    def ntotal(self) -> int:
        return self.gallery.ntotal

    @property
    def index_type(self) -> str:
        return self.gallery.index_type

    @property
    def meta(self) -> dict[str, Any]:
        return self.gallery.meta

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> Any:
        with self.lock:
            return self.gallery.search(queries, k, allowed_ids)


class SharedIndexes(IndexManager):
    """One IndexManager for the whole server: the index is read from disk once, then each request
    adds only what ingests stored since (``sync``), under the lock described in the module doc."""

    def __init__(self, db: Database, config: AppConfig) -> None:
        super().__init__(db, config)
        self._lock = FairLock()

    def sync(self, kind: str) -> tuple[Any, SyncReport]:
        with self._lock:
            gallery, report = super().sync(kind)
        return _LockedGallery(gallery, self._lock), report


@dataclass
class ServerState:
    """Everything the routes use: built once by ``reid-app serve`` (or a test)."""

    config: AppConfig
    db: Database
    embedder: SharedEmbedder
    detector: SharedDetector
    indexes: SharedIndexes
    token: str | None = None
    loopback_only: bool = True
    max_upload_bytes: int = 20 << 20
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        config: AppConfig,
        *,
        embedder: Any | None = None,
        detector: Any | None = None,
        detector_weights: str | None = None,
        **kwargs: Any,
    ) -> ServerState:
        """Open the database (created empty when it does not exist yet, so the server can start
        before the first ingest) and load the models, unless given."""
        from reid_app.ingest import load_detector, load_embedder
        from reid_app.store import check_model_identity

        db = Database(config, create=True)
        embedder = embedder or load_embedder(config)
        # A database of another model is refused at start, not at the first search.
        check_model_identity(db.info(), embedder.model_name, embedder.weights_sha256, embedder.dim)
        detector = detector or load_detector(detector_weights, config.device)
        return cls(
            config=config,
            db=db,
            embedder=SharedEmbedder(embedder),
            detector=SharedDetector(detector),
            indexes=SharedIndexes(db, config),
            **kwargs,
        )
