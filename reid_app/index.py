"""FAISS index files: a searchable copy of the vectors stored in the database.

There are two indexes per database, ``tracks`` (one pooled vector per track) and ``detections``
(one vector per stored crop). Vector ids are the database row ids. Vectors are l2-normalised,
so inner product = cosine similarity.

Index type, chosen from the number of vectors N each time the index is (re)built:

* N < ``ivf_threshold`` (default 50,000, :class:`reid_app.config.AppConfig`): **exact search**,
  ``IndexIDMap2(IndexFlatIP)``.
* N >= ``ivf_threshold``: **IVF-SQ8** (``IndexIVFScalarQuantizer``, 8-bit scalar quantizer,
  4x smaller than float32: ~3.8 KB per 3840-d vector) with ``nlist = 4·sqrt(N)`` lists (capped
  so each list gets >= 39 training points). ``nprobe`` is tuned at build time: the smallest power
  of two whose recall@10 against exact search, measured on up to 200 stored vectors used as
  queries, reaches ``ivf_target_recall`` (0.95); the measured recall is recorded.
* An IVF index is rebuilt when N has grown 4x since it was trained (its lists get too long) and
  turned back into an exact one when N falls under half the threshold.

``reid-app stats`` shows the type, N, nlist, nprobe and the measured recall of each index.

Consistency with the database (the database is the truth; see :mod:`reid_app.store`):

* Files: ``<kind>.faiss`` (the FAISS index) and ``<kind>.faiss.json`` (a sidecar saying which
  database, model and rows it holds: db uuid, weights sha256, dim, ntotal, max id, type, nlist,
  nprobe). Both are written to a temporary file and moved into place with ``os.replace``, under an
  exclusive ``fcntl`` lock on ``<kind>.faiss.lock``, so two processes never clobber each other.
* :func:`sync_index` (run under that lock by every command that opens an index) compares the
  row ids the index holds with the row ids in the database: ids missing from the index are
  added from the stored vectors, ids the database no longer has (orphans) are removed. An index
  whose sidecar is missing, disagrees with the file, or belongs to another database or model
  is rebuilt from the database.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import select

from reid_app.config import AppConfig
from reid_app.errors import ReidAppError
from reid_app.store import Database, DatabaseInfo, Detection, Track, bytes_to_vectors, utc_now

INDEX_KINDS: dict[str, type[Track] | type[Detection]] = {"tracks": Track, "detections": Detection}
INDEX_TYPE_FLAT = "flat"
INDEX_TYPE_IVF = "ivf_sq8"
SIDECAR_FORMAT = 1
#: FAISS wants about this many training points per IVF list.
MIN_POINTS_PER_LIST = 39
#: Training sample per list (more costs k-means time for little gain).
TRAIN_POINTS_PER_LIST = 64
TUNING_QUERIES = 200
RECALL_K = 10
_READ_CHUNK = 900  # ids per IN (...) query: below every database's bound-parameter limit


def index_paths(index_dir: Path, kind: str) -> tuple[Path, Path, Path]:
    """(index file, sidecar JSON, lock file) of one index."""
    base = index_dir / f"{kind}.faiss"
    return base, base.with_name(base.name + ".json"), base.with_name(base.name + ".lock")


@contextmanager
def file_lock(path: Path, timeout_s: float, busy_message: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), waiting up to ``timeout_s``; then
    a :class:`ReidAppError` with ``busy_message``. The kernel drops the lock when its process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ReidAppError(busy_message or f"timed out waiting for the lock {path}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def index_ids(index: faiss.Index) -> np.ndarray:
    """The row ids stored in ``index`` (sorted int64)."""
    ivf = _ivf_of(index)
    if ivf is None:
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(list_no), lists.list_size(list_no)).copy()
        for list_no in range(ivf.nlist)
        if lists.list_size(list_no) > 0
    ]
    return np.sort(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class GalleryIndex:
    """A loaded index and its sidecar metadata."""

    kind: str
    index: faiss.Index
    meta: dict[str, Any]

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_type(self) -> str:
        return str(self.meta["type"])

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
        if self.index_type == INDEX_TYPE_IVF:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(self.meta["nprobe"]))
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(queries, k, params=params)
        return scores, ids


@dataclass
class SyncReport:
    kind: str
    added: int = 0
    removed: int = 0
    rebuilt: bool = False
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.rebuilt or self.added > 0 or self.removed > 0


def _new_flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def ivf_nlist(n_vectors: int) -> int:
    """nlist = 4·sqrt(N), capped so every list gets MIN_POINTS_PER_LIST training points."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // MIN_POINTS_PER_LIST))


def desired_type(n_vectors: int, current: str | None, trained_on: int, threshold: int) -> tuple[str, bool]:
    """(index type wanted for ``n_vectors``, whether the current index must be rebuilt)."""
    if current == INDEX_TYPE_IVF:
        if n_vectors < threshold // 2:
            return INDEX_TYPE_FLAT, True
        return INDEX_TYPE_IVF, n_vectors >= 4 * max(trained_on, 1)
    if n_vectors >= threshold:
        return INDEX_TYPE_IVF, True
    return INDEX_TYPE_FLAT, current != INDEX_TYPE_FLAT


class _VectorReader:
    """Reads stored vectors of one table by id, in chunks."""

    def __init__(self, db: Database, model: type[Track] | type[Detection], dim: int) -> None:
        self.db, self.model, self.dim = db, model, dim

    def all_ids(self) -> np.ndarray:
        with self.db.read() as session:
            ids = session.scalars(select(self.model.id)).all()
        return np.sort(np.asarray(ids, dtype=np.int64))

    def vectors(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) chunks, in the order of ``ids``; ids deleted meanwhile are skipped."""
        with self.db.read() as session:
            for start in range(0, len(ids), _READ_CHUNK):
                chunk = [int(i) for i in ids[start : start + _READ_CHUNK]]
                rows = session.execute(
                    select(self.model.id, self.model.embedding).where(self.model.id.in_(chunk))
                ).all()
                by_id = {row_id: blob for row_id, blob in rows}
                present = [i for i in chunk if i in by_id]
                if present:
                    yield (
                        np.asarray(present, dtype=np.int64),
                        bytes_to_vectors([by_id[i] for i in present], self.dim),
                    )


def _exact_topk_update(
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


def build_ivf(
    read_vectors: VectorChunks, ids: np.ndarray, dim: int, target_recall: float, seed: int = 0
) -> tuple[faiss.Index, dict[str, Any]]:
    """Train and fill an IVF-SQ8 index with the vectors of ``ids`` and tune its nprobe.

    ``read_vectors(ids)`` yields (ids, float32 vectors) chunks (from the database in the app)."""
    rng = np.random.default_rng(seed)
    nlist = ivf_nlist(len(ids))
    train_ids = np.sort(rng.choice(ids, size=min(len(ids), TRAIN_POINTS_PER_LIST * nlist), replace=False))
    train = np.concatenate([vecs for _, vecs in read_vectors(train_ids)])
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = 10  # k-means iterations; FAISS's default 25 costs minutes at this dimension
    index.train(train)
    queries = train[rng.choice(len(train), size=min(TUNING_QUERIES, len(train)), replace=False)]
    k = min(RECALL_K, len(ids))
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for chunk_ids, vectors in read_vectors(ids):
        index.add_with_ids(vectors, chunk_ids)
        best_scores, best_ids = _exact_topk_update(best_scores, best_ids, queries, chunk_ids, vectors)
    nprobe, recall = tune_nprobe(index, queries, best_ids, target_recall)
    return index, {"nlist": nlist, "nprobe": nprobe, "recall_at_10": recall, "trained_on": len(ids)}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k ids) present in ``found``."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(truth.size, 1)


def tune_nprobe(
    index: faiss.IndexIVF, queries: np.ndarray, truth: np.ndarray, target_recall: float
) -> tuple[int, float]:
    """Smallest power-of-two nprobe (or nlist) whose recall@k reaches ``target_recall``."""
    k = truth.shape[1]
    nprobe, recall = 1, 0.0
    while True:
        _, found = index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        recall = recall_at_k(found, truth)
        if recall >= target_recall or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, index.nlist)


class IndexManager:
    """Opens, syncs and saves the indexes of one database."""

    def __init__(self, db: Database, config: AppConfig) -> None:
        self.db, self.config = db, config
        self.index_dir = config.index_dir
        # Loaded indexes, with the (inode, mtime, size) of the file they were read from or written
        # to, so a process that syncs after every ingest batch only re-reads what others changed.
        self._cache: dict[str, tuple[tuple[int, int, int], GalleryIndex]] = {}

    def _load(self, kind: str, info: DatabaseInfo) -> tuple[GalleryIndex | None, str]:
        """The index on disk if it is usable, else (None, why not)."""
        index_path, sidecar_path, _ = index_paths(self.index_dir, kind)
        if not index_path.exists():
            return None, "no index file"
        stamp = _file_stamp(index_path)
        cached = self._cache.get(kind)
        if cached is not None and cached[0] == stamp:
            return cached[1], ""
        try:
            meta = json.loads(sidecar_path.read_text())
            index = faiss.read_index(str(index_path))
        except (OSError, ValueError, RuntimeError) as exc:
            return None, f"unreadable index or sidecar ({type(exc).__name__})"
        ids = index_ids(index)
        max_id = int(ids[-1]) if len(ids) else 0
        expected = {
            "format": SIDECAR_FORMAT,
            "db_uuid": info.uuid,
            "model_weights_sha256": info.model_weights_sha256,
            "dim": info.model_dim,
            "ntotal": int(index.ntotal),
            "max_id": max_id,
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                return None, f"sidecar {key} is {meta.get(key)!r}, expected {value!r}"
        if meta.get("type") not in (INDEX_TYPE_FLAT, INDEX_TYPE_IVF) or (
            (meta["type"] == INDEX_TYPE_IVF) != (_ivf_of(index) is not None)
        ):
            return None, "sidecar type does not match the index file"
        loaded = GalleryIndex(kind=kind, index=index, meta=meta)
        self._cache[kind] = (stamp, loaded)
        return loaded, ""

    def _save(self, gallery: GalleryIndex) -> None:
        index_path, sidecar_path, _ = index_paths(self.index_dir, gallery.kind)
        ids = index_ids(gallery.index)
        gallery.meta.update(ntotal=int(gallery.index.ntotal), max_id=int(ids[-1]) if len(ids) else 0)
        gallery.meta["written_at"] = utc_now().isoformat()
        _atomic_write_bytes(index_path, faiss.serialize_index(gallery.index).tobytes())
        _atomic_write_bytes(sidecar_path, json.dumps(gallery.meta, indent=2).encode())
        self._cache[gallery.kind] = (_file_stamp(index_path), gallery)

    def sync(self, kind: str) -> tuple[GalleryIndex, SyncReport]:
        """Bring the ``kind`` index into agreement with the database (under the file lock) and
        return it."""
        info = self.db.info()
        if info is None or info.model_dim is None:
            raise ReidAppError("the database is empty: nothing has been ingested yet")
        _, _, lock_path = index_paths(self.index_dir, kind)
        with file_lock(lock_path, self.config.lock_timeout_s):
            return self._sync_locked(kind, info)

    def _sync_locked(self, kind: str, info: DatabaseInfo) -> tuple[GalleryIndex, SyncReport]:
        dim = int(info.model_dim or 0)
        reader = _VectorReader(self.db, INDEX_KINDS[kind], dim)
        report = SyncReport(kind=kind)
        gallery, why_not = self._load(kind, info)
        db_ids = reader.all_ids()
        current_type = gallery.index_type if gallery is not None else None
        trained_on = int(gallery.meta.get("trained_on", 0)) if gallery is not None else 0
        wanted, rebuild = desired_type(len(db_ids), current_type, trained_on, self.config.ivf_threshold)
        if gallery is None or rebuild:
            report.rebuilt = True
            report.reason = why_not or f"{len(db_ids)} vectors: switching to {wanted}"
            gallery = self._build(kind, wanted, reader, db_ids, info)
        else:
            held = index_ids(gallery.index)
            orphans = np.setdiff1d(held, db_ids, assume_unique=True)
            missing = np.setdiff1d(db_ids, held, assume_unique=True)
            if len(orphans):
                gallery.index.remove_ids(faiss.IDSelectorBatch(orphans))
                report.removed = len(orphans)
            for chunk_ids, vectors in reader.vectors(missing):
                gallery.index.add_with_ids(vectors, chunk_ids)
                report.added += len(chunk_ids)
        if report.changed:
            self._save(gallery)
        return gallery, report

    def _build(
        self, kind: str, index_type: str, reader: _VectorReader, ids: np.ndarray, info: DatabaseInfo
    ) -> GalleryIndex:
        dim = int(info.model_dim or 0)
        meta: dict[str, Any] = {
            "format": SIDECAR_FORMAT,
            "kind": kind,
            "type": index_type,
            "db_uuid": info.uuid,
            "model_name": info.model_name,
            "model_weights_sha256": info.model_weights_sha256,
            "dim": dim,
            "ivf_threshold": self.config.ivf_threshold,
        }
        if index_type == INDEX_TYPE_IVF:
            index, ivf_meta = build_ivf(reader.vectors, ids, dim, self.config.ivf_target_recall)
            meta.update(ivf_meta)
        else:
            index = _new_flat(dim)
            for chunk_ids, vectors in reader.vectors(ids):
                index.add_with_ids(vectors, chunk_ids)
            meta["trained_on"] = 0
        return GalleryIndex(kind=kind, index=index, meta=meta)

    def sync_all(self) -> list[SyncReport]:
        return [self.sync(kind)[1] for kind in INDEX_KINDS]

    def describe(self, kind: str) -> dict[str, Any] | None:
        """The sidecar of the ``kind`` index as it is on disk (None if there is none)."""
        _, sidecar_path, _ = index_paths(self.index_dir, kind)
        try:
            return json.loads(sidecar_path.read_text())
        except (OSError, ValueError):
            return None


def _file_stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
