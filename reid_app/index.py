"""Each host's FAISS indexes, kept in step with the shared database incrementally.

There are two indexes per database, ``tracks`` (one pooled vector per track) and ``detections``
(one vector per stored crop). Vector ids are the database row ids. Vectors are l2-normalised,
so inner product = cosine similarity. The index types (exact, or PCA + IVF-SQ8 with re-scoring
above ``ivf_threshold``) and their build and tuning are in :mod:`reid_app.ivf`; the local file
lock and atomic writes in :mod:`reid_app.locks`. This module only keeps an index equal to the
database (the database is the truth; see :mod:`reid_app.store`).

Files, per host and per database: ``<index folder>/faiss/<database uuid>/<kind>.faiss`` and a
``<kind>.faiss.json`` sidecar. The index folder is the SQLite file's folder, or the host's
``--data-dir`` for a server database: every search host has its own, and two databases sharing a
folder never touch each other's files. Both files are written to a temporary file and moved into
place, under an exclusive ``fcntl`` lock on ``<kind>.faiss.lock``, so two processes of one host
never clobber each other; the temporary files of a process killed while saving are deleted by the
next sync.

Catching up (:meth:`IndexManager.sync`, run by every command that opens an index): the sidecar
records ``synced_id``, the highest row id the index has been brought up to, and
``deletion_seq``, the last entry of the deletion log (:class:`reid_app.store.Deletion`) applied.
Writers are serialised, so row ids appear in commit order; a sync therefore reads the deletion
log past ``deletion_seq`` (removing those ids), then the rows with ``id > synced_id`` (adding
them), and nothing else: its cost is that of the change, not of the gallery. Reading the log
first is what makes it exact: a row added and deleted between the two reads is either not read
or removed by the next sync. :meth:`IndexManager.lag` says how far behind an index is
(``reid-app stats``).

An index whose sidecar is missing, unreadable, of the older format, disagrees with the file, or
belongs to another database or model is rebuilt from the database; so is one whose size calls
for the other index type (:func:`reid_app.ivf.desired_type`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import func, select

from reid_app.config import AppConfig
from reid_app.errors import ReidAppError
from reid_app.ivf import (  # noqa: F401 (re-exported: the names callers knew from this module)
    INDEX_TYPE_FLAT,
    INDEX_TYPE_IVF,
    K_FACTORS,
    GalleryIndex,
    StoreScorer,
    build_ivf,
    desired_type,
    exact_topk_update,
    index_ids,
    ivf_nlist,
    recall_at_k,
    reduced_dim,
    refine_parts,
    tune_search,
)
from reid_app.ivf import new_flat as _new_flat
from reid_app.locks import atomic_write, atomic_write_bytes, file_lock
from reid_app.store import Database, DatabaseInfo, Deletion, Detection, Track, bytes_to_ids, bytes_to_vectors, utc_now

__all__ = ["INDEX_KINDS", "IndexManager", "SyncReport", "file_lock", "index_folder", "index_paths"]

INDEX_KINDS: dict[str, type[Track] | type[Detection]] = {"tracks": Track, "detections": Detection}
#: 2: ``synced_id`` and ``deletion_seq`` (incremental catch-up). A format-1 sidecar is rebuilt.
SIDECAR_FORMAT = 2
_READ_CHUNK = 900  # ids per IN (...) query: below every database's bound-parameter limit
_ROWS_PER_READ = 2000  # rows per keyset page while catching up


def index_folder(config: AppConfig, db_uuid: str) -> Path:
    """The folder of one database's index files on this host."""
    return config.index_dir / "faiss" / db_uuid


def index_paths(index_dir: Path, kind: str) -> tuple[Path, Path, Path]:
    """(index file, sidecar JSON, lock file) of one index."""
    base = index_dir / f"{kind}.faiss"
    return base, base.with_name(base.name + ".json"), base.with_name(base.name + ".lock")


@dataclass
class SyncReport:
    kind: str
    added: int = 0
    removed: int = 0
    rebuilt: bool = False
    reason: str = ""
    behind_rows: int = 0  # rows the index lacked before the sync
    behind_deletions: int = 0  # deleted rows it still held (or might)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.rebuilt or self.added > 0 or self.removed > 0


class _VectorReader:
    """Reads stored vectors of one table: by id, or every row past an id, in chunks."""

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

    def vectors_after(self, last_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every row with id > ``last_id``, by keyset pages in id order."""
        with self.db.read() as session:
            while True:
                rows = session.execute(
                    select(self.model.id, self.model.embedding)
                    .where(self.model.id > last_id)
                    .order_by(self.model.id)
                    .limit(_ROWS_PER_READ)
                ).all()
                if not rows:
                    return
                last_id = int(rows[-1][0])
                yield (
                    np.asarray([row[0] for row in rows], dtype=np.int64),
                    bytes_to_vectors([row[1] for row in rows], self.dim),
                )

    def count_after(self, last_id: int) -> int:
        with self.db.read() as session:
            return int(session.scalar(select(func.count()).where(self.model.id > last_id)) or 0)

    def max_id(self) -> int:
        with self.db.read() as session:
            return int(session.scalar(select(func.max(self.model.id))) or 0)


def _deletions_after(db: Database, kind: str, seq: int) -> tuple[np.ndarray, int]:
    """(row ids deleted by log entries past ``seq``, the last entry's seq)."""
    with db.read() as session:
        rows = session.execute(
            select(Deletion.id, Deletion.row_ids).where(Deletion.id > seq, Deletion.kind == kind).order_by(Deletion.id)
        ).all()
    if not rows:
        return np.zeros(0, dtype=np.int64), seq
    return np.unique(np.concatenate([bytes_to_ids(row[1]) for row in rows])), int(rows[-1][0])


def _last_deletion_seq(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.max(Deletion.id))) or 0)


class IndexManager:
    """Opens, syncs and saves the indexes of one database on this host."""

    def __init__(self, db: Database, config: AppConfig) -> None:
        self.db, self.config = db, config
        # Loaded indexes, with the (inode, mtime, size) of the file they were read from or written
        # to, so a process that syncs after every ingest batch only re-reads what others changed.
        self._cache: dict[str, tuple[tuple[int, int, int], GalleryIndex]] = {}

    @property
    def index_dir(self) -> Path:
        """This database's index folder on this host."""
        return index_folder(self.config, self.db.uuid)

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
        problem = _sidecar_problem(meta, index, info)
        if problem:
            return None, problem
        expected = {
            "format": SIDECAR_FORMAT,
            "db_uuid": info.uuid,
            "model_weights_sha256": info.model_weights_sha256,
            "dim": info.model_dim,
            "ntotal": int(index.ntotal),
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                return None, f"sidecar {key} is {meta.get(key)!r}, expected {value!r}"
        if meta.get("type") not in (INDEX_TYPE_FLAT, INDEX_TYPE_IVF) or (
            (meta["type"] == INDEX_TYPE_IVF) != isinstance(index, faiss.IndexRefine)
        ):
            return None, "sidecar type does not match the index file"
        ids = index_ids(index)
        if len(ids) and int(ids[-1]) > meta["synced_id"]:
            return None, "the index holds rows past its sidecar's synced_id"
        if meta["type"] == INDEX_TYPE_IVF:
            # Both parts must hold the same rows (a crash cannot split them: the file is written
            # whole, but a file edited or written by other code could).
            candidates_index, store = refine_parts(index)
            store_ids = np.sort(faiss.vector_to_array(store.id_map).astype(np.int64))
            if candidates_index.ntotal != index.ntotal or not np.array_equal(store_ids, ids):
                return None, "the candidate index and the vector store hold different rows"
        loaded = GalleryIndex(kind=kind, index=index, meta=meta)
        self._cache[kind] = (stamp, loaded)
        return loaded, ""

    def _save(self, gallery: GalleryIndex) -> None:
        index_path, sidecar_path, _ = index_paths(self.index_dir, gallery.kind)
        gallery.meta.update(ntotal=int(gallery.index.ntotal))
        gallery.meta["written_at"] = utc_now().isoformat()
        # Written by FAISS straight to the temporary file: serialising to memory first would
        # hold two more copies of a multi-GB index.
        atomic_write(index_path, lambda name: faiss.write_index(gallery.index, name))
        atomic_write_bytes(sidecar_path, json.dumps(gallery.meta, indent=2).encode())
        self._cache[gallery.kind] = (_file_stamp(index_path), gallery)

    def _info(self) -> DatabaseInfo:
        info = self.db.info()
        if info is None or info.model_dim is None:
            raise ReidAppError("the database is empty: nothing has been ingested yet")
        return info

    def sync(self, kind: str) -> tuple[GalleryIndex, SyncReport]:
        """Bring the ``kind`` index into agreement with the database (under the file lock) and
        return it."""
        info = self._info()
        _, _, lock_path = index_paths(self.index_dir, kind)
        started = time.perf_counter()
        with file_lock(lock_path, self.config.lock_timeout_s):
            gallery, report = self._sync_locked(kind, info)
        report.seconds = time.perf_counter() - started
        return gallery, report

    def _sync_locked(self, kind: str, info: DatabaseInfo) -> tuple[GalleryIndex, SyncReport]:
        self._remove_unfinished_saves(kind)
        dim = int(info.model_dim or 0)
        reader = _VectorReader(self.db, INDEX_KINDS[kind], dim)
        report = SyncReport(kind=kind)
        gallery, why_not = self._load(kind, info)
        if gallery is not None:
            # The deletion log first, then the new rows (the module docstring says why).
            deleted, seq = _deletions_after(self.db, kind, int(gallery.meta["deletion_seq"]))
            if len(deleted):
                held = np.intersect1d(deleted, index_ids(gallery.index), assume_unique=True)
                report.behind_deletions = len(held)
                if len(held):
                    gallery.remove(held)
                    report.removed = len(held)
                    if kind == "detections":
                        self._forget_cached_thumbnails(held)
            if seq != gallery.meta["deletion_seq"]:
                gallery.meta["deletion_seq"] = seq
                report.reason = "deletion log read"
            for chunk_ids, vectors in reader.vectors_after(int(gallery.meta["synced_id"])):
                gallery.add(chunk_ids, vectors)
                report.added += len(chunk_ids)
                gallery.meta["synced_id"] = int(chunk_ids[-1])
            report.behind_rows = report.added
            trained_on = int(gallery.meta.get("trained_on", 0))
            wanted, rebuild = desired_type(gallery.ntotal, gallery.index_type, trained_on, self.config.ivf_threshold)
            if rebuild:
                why_not = f"{gallery.ntotal} vectors: switching to {wanted}"
                gallery = None
        if gallery is None:
            report.rebuilt = True
            report.reason = why_not
            gallery = self._build(kind, reader, info)
            report.behind_rows = gallery.ntotal
        if report.changed or report.reason:
            self._save(gallery)
        return gallery, report

    def _remove_unfinished_saves(self, kind: str) -> None:
        """Delete the temporary files of a save of the ``kind`` index that was killed before moving
        them into place (each as big as the index). Every save runs under the lock held now, so
        none of them is being written."""
        index_path, _, _ = index_paths(self.index_dir, kind)
        # .tracks.faiss.<random>.tmp and .tracks.faiss.json.<random>.tmp (reid_app.locks).
        for leftover in self.index_dir.glob(f".{index_path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def _build(self, kind: str, reader: _VectorReader, info: DatabaseInfo) -> GalleryIndex:
        """A new index of every stored row. The log position is read before the ids, so deletions
        committed meanwhile are applied again by the next sync (removing an absent id does nothing);
        rows committed meanwhile have larger ids than any read here."""
        dim = int(info.model_dim or 0)
        deletion_seq = _last_deletion_seq(self.db)
        ids = reader.all_ids()
        index_type, _ = desired_type(len(ids), None, 0, self.config.ivf_threshold)
        meta: dict[str, Any] = {
            "format": SIDECAR_FORMAT,
            "kind": kind,
            "type": index_type,
            "db_uuid": info.uuid,
            "model_name": info.model_name,
            "model_weights_sha256": info.model_weights_sha256,
            "dim": dim,
            "ivf_threshold": self.config.ivf_threshold,
            "synced_id": int(ids[-1]) if len(ids) else 0,
            "deletion_seq": deletion_seq,
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

    def _forget_cached_thumbnails(self, detection_ids: np.ndarray) -> None:
        """This host's cached copies of deleted crops' thumbnails go with their vectors."""
        from reid_app.thumbnails import drop_cached

        drop_cached(self.config, self.db.uuid, detection_ids.tolist())

    def sync_all(self) -> list[SyncReport]:
        """Sync every index; none while no vector was ever stored (no model recorded yet)."""
        info = self.db.info()
        if info is None or info.model_dim is None:
            return []
        return [self.sync(kind)[1] for kind in INDEX_KINDS]

    def lag(self, kind: str) -> dict[str, Any]:
        """How far this host's ``kind`` index is behind the database, without syncing it: rows it
        lacks, deletions it has not applied (log entries' row counts), and whether it must be built."""
        info = self._info()
        gallery, why_not = self._load(kind, info)
        if gallery is None:
            return {"rows_behind": None, "deletions_behind": None, "needs_build": why_not}
        reader = _VectorReader(self.db, INDEX_KINDS[kind], int(info.model_dim or 0))
        with self.db.read() as session:
            pending = session.scalar(
                select(func.coalesce(func.sum(Deletion.row_count), 0)).where(
                    Deletion.id > int(gallery.meta["deletion_seq"]), Deletion.kind == kind
                )
            )
        return {
            "rows_behind": reader.count_after(int(gallery.meta["synced_id"])),
            "deletions_behind": int(pending or 0),
            "needs_build": None,
        }

    def describe(self, kind: str) -> dict[str, Any] | None:
        """The sidecar of the ``kind`` index as it is on disk (None if there is none)."""
        _, sidecar_path, _ = index_paths(self.index_dir, kind)
        try:
            return json.loads(sidecar_path.read_text())
        except (OSError, ValueError):
            return None


#: Sidecar fields read as numbers, and their smallest valid value (an approximate index needs all
#: but trained_on; a flat one only trained_on, and an older sidecar may lack it).
_NUMERIC_FIELDS = {"trained_on": 0, "nlist": 1, "nprobe": 1, "k_factor": 1, "reduced_dim": 1}


def _sidecar_problem(meta: object, index: faiss.Index, info: DatabaseInfo) -> str | None:
    """Why a parsed sidecar cannot describe ``index`` (so the index is rebuilt), or None. The file
    may have been edited, or written by other code: every field used later is checked here."""
    if not isinstance(meta, dict):
        return f"the sidecar is a JSON {type(meta).__name__}, not an object"
    if index.d != info.model_dim:
        return f"the index file holds {index.d}-d vectors, the database {info.model_dim}-d ones"
    for key in ("synced_id", "deletion_seq"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            return f"sidecar {key} is {meta.get(key)!r}, not an integer >= 0"
    is_ivf = meta.get("type") == INDEX_TYPE_IVF
    for key, minimum in _NUMERIC_FIELDS.items():
        required = is_ivf and key != "trained_on"
        value = meta.get(key)
        if value is None and not required:
            continue
        if type(value) is not int or value < minimum:  # bool is not accepted either
            return f"sidecar {key} is {value!r}, not an integer >= {minimum}"
    if is_ivf and not isinstance(meta.get("recall_at_10"), int | float):
        return f"sidecar recall_at_10 is {meta.get('recall_at_10')!r}, not a number"
    return None


def _file_stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
