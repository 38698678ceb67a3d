"""What the server loads once and shares between request threads, and how they share it safely.

Requests run on a thread pool (FastAPI runs plain ``def`` routes there). Three things are not
safe to share as they are:

* the detector: an Ultralytics predictor keeps per-call state (it is documented as not
  thread-safe), so calls are serialised by a lock;
* the embedder: PyTorch inference is thread-safe, but two forward passes at once on a small CPU
  only fight over the same cores; one lock keeps each call as fast as it can be;
* the FAISS index: :meth:`IndexManager.sync` adds the vectors other processes (ingests) stored
  since the last request to the loaded index *in place*, which must not happen while another
  thread searches that same index. Sync and search therefore hold one lock (a flat search of
  a demo-sized gallery takes microseconds; an IVF one milliseconds).

Requests that queue for either model run together (:class:`_BatchingModel`): whoever gets the
lock runs the requests waiting at that moment as one batch (up to :data:`MAX_BATCH`; a forward
pass of 4 images costs far less than 4 of one), and the others find their results ready when
their turn comes. The detector batches only images that it would letterbox identically alone, so
a batch finds the boxes single calls find (up to float rounding: ~1e-4 in a score).

The locks are granted in arrival order (:class:`FairLock`): with ``threading.Lock`` a waiting
request can lose the lock to later arrivals again and again, and under 16 concurrent clients some
searches waited over a minute while others were served in seconds (benchmarks/RESULTS.md).

Model results are cached by content (an LRU keyed by the image's bytes): an operator who changes
top-k, cameras or threshold on the same photo re-runs only the index search, not the detector
and embedder. Both models are deterministic (a batch changes a score by float rounding only), so a
cached answer is the answer.
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
from reid_app.server.limits import WORKER_THREADS
from reid_app.store import Database

#: Most requests one model call serves (the rest wait for the next): bounds the memory of a batch.
MAX_BATCH = 4
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


@dataclass
class _Job:
    request: Any
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class _BatchingModel:
    """Serialises calls to a model and runs the requests that queued meanwhile as one batch.

    Whoever gets the lock takes its own request and the others waiting at that moment (up to
    ``max_batch`` in all, oldest first) and hands them to ``run_batch`` (a list of requests → a
    list of results); the others find their result ready when their turn comes. When a batch
    fails, each of its requests runs alone, so only the request that broke it fails."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = MAX_BATCH) -> None:
        self._run_batch, self._lock, self._max_batch = run_batch, FairLock(), max_batch
        self._waiting: list[_Job] = []
        self._waiting_lock = threading.Lock()
        self.batches: list[int] = []  # requests per model call, most recent last (for tests/benchmarks)

    def __call__(self, request: Any) -> Any:
        job = _Job(request)
        with self._waiting_lock:
            self._waiting.append(job)
        with self._lock:
            if not job.done:  # nobody ran it while this waited
                with self._waiting_lock:
                    self._waiting.remove(job)
                    jobs = [job, *self._waiting[: self._max_batch - 1]]
                    del self._waiting[: self._max_batch - 1]
                self._run(jobs)
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self, jobs: list[_Job]) -> None:
        self.batches = [*self.batches[-99:], len(jobs)]
        try:
            results = self._run_batch([job.request for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"a model batch returned {len(results)} results for {len(jobs)} requests")
            for job, result in zip(jobs, results, strict=True):
                job.result, job.done = result, True
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].error, jobs[0].done = exc, True
                return
            for job in jobs:
                try:
                    job.result = self._run_batch([job.request])[0]
                except Exception as alone:
                    job.error = alone
                job.done = True
        finally:
            # Whatever escaped (an interrupt): no request of this batch may wait for a result
            # nobody will write, nor look for itself in the queue it has left.
            for job in jobs:
                if not job.done:
                    job.error, job.done = RuntimeError("the model call was interrupted"), True


@dataclass(frozen=True)
class _DetectRequest:
    image_bgr: np.ndarray
    confidence: float | None
    imgsz: int | None


class SharedDetector:
    """The person detector behind a lock, batching across requests, and a result cache;
    otherwise the detector itself."""

    def __init__(self, detector: Any, cache_entries: int = CACHE_ENTRIES) -> None:
        self._detector, self._cache = detector, _LRU(cache_entries)
        self._model = _BatchingModel(self._detect_requests)
        self.name = detector.name

    @property
    def batches(self) -> list[int]:
        return self._model.batches

    def detect(self, image_bgr: np.ndarray, confidence: float | None = None, imgsz: int | None = None) -> list[Any]:
        key = _key("detect", confidence, imgsz, image_bgr)
        return list(self._cache.get_or_compute(key, lambda: self._model(_DetectRequest(image_bgr, confidence, imgsz))))

    def _detect_requests(self, requests: list[_DetectRequest]) -> list[list[Any]]:
        # The detector batches images of one confidence and input size (it groups them further
        # by the canvas each gets, so that a batch finds exactly the boxes of single calls).
        groups: dict[tuple[float | None, int | None], list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault((request.confidence, request.imgsz), []).append(position)
        found: list[list[Any]] = [[] for _ in requests]
        for (confidence, imgsz), members in groups.items():
            images = [requests[position].image_bgr for position in members]
            for position, boxes in zip(
                members, self._detector.detect_many(images, confidence=confidence, imgsz=imgsz), strict=True
            ):
                found[position] = boxes
        return found


class SharedEmbedder:
    """The embedder behind a lock, batching across requests, and a result cache; its identity
    attributes pass through."""

    def __init__(self, embedder: Any, cache_entries: int = CACHE_ENTRIES) -> None:
        self._embedder, self._cache = embedder, _LRU(cache_entries)
        self._model = _BatchingModel(self._embed_requests)

    @property
    def batches(self) -> list[int]:
        return self._model.batches

    def __getattr__(self, name: str) -> Any:  # model_name, weights_sha256, dim, warning, ...
        return getattr(self._embedder, name)

    def embed(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        return self._cache.get_or_compute(_key("embed", *crops_bgr), lambda: self._model(list(crops_bgr))).copy()

    def _embed_requests(self, requests: list[list[np.ndarray]]) -> list[np.ndarray]:
        vectors = self._embedder.embed([crop for crops in requests for crop in crops])
        starts = np.cumsum([0, *(len(crops) for crops in requests)])
        return [vectors[start:end] for start, end in zip(starts[:-1], starts[1:], strict=True)]


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

        # Two connections per request thread (a search reads a thumbnail inside its session): a
        # request never waits for the pool, nor fails with "QueuePool limit" under load.
        db = Database(config, create=True, pool_size=2 * WORKER_THREADS)
        embedder = embedder or load_embedder(config)
        # A database of another model is refused at start, not at the first search.
        check_model_identity(db.info(), embedder.model_name, embedder.weights_sha256, embedder.dim)
        detector = detector or load_detector(detector_weights, config.device, config.backend)
        return cls(
            config=config,
            db=db,
            embedder=SharedEmbedder(embedder),
            detector=SharedDetector(detector),
            indexes=SharedIndexes(db, config),
            **kwargs,
        )
