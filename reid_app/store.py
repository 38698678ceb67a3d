"""The database: SQLAlchemy 2 ORM models and session helpers.

The database is the single source of truth. Every stored vector (each crop's embedding and each
track's pooled embedding) is kept in it as little-endian float32 bytes, so the FAISS index files
(:mod:`reid_app.index`) are a derivative that can always be rebuilt from it.

Only portable SQLAlchemy constructs are used, so any SQLAlchemy URL works (SQLite by default,
PostgreSQL, ...). SQLite gets what concurrent writers need: WAL journal, a busy timeout,
``BEGIN IMMEDIATE`` for write transactions (so two writers queue instead of failing on a lock
upgrade) and :func:`Database.write` retries a transaction that still hits "database is locked".
Tables use AUTOINCREMENT on SQLite so a deleted row id is never handed out again: an index file
that still holds a vector for a deleted id can then never be mistaken for the new row's vector.

Several hosts on one PostgreSQL (README, "Several hosts"):

* **Write transactions are serialised.** On PostgreSQL each one first takes one transaction-level
  advisory lock (:data:`WRITER_LOCK_KEY`), as SQLite's ``BEGIN IMMEDIATE`` does by itself. Row ids
  are therefore handed out in commit order: a reader that has seen every row up to id N will
  never later see a new row with a smaller id, which is what lets every host's FAISS index catch
  up by reading only ``id > N`` (:mod:`reid_app.index`). Write transactions are short (embedding
  and decoding happen outside them), so the queue is brief.
* **Deletions are logged** (:class:`Deletion`, in the transaction that deletes): other hosts drop
  the vectors of deleted rows by reading the log past the last entry they applied.
* **Thumbnails are rows** (:class:`Thumbnail`, the JPEG bytes): every host reads them, whatever
  host ingested them. Rows of databases made before keep ``thumbnail_path`` (a file in the data
  folder of the host that ingested them), read from there.
* **Who ingests a video is a row** (:class:`IngestClaim`, see :mod:`reid_app.claims`), not a file
  lock: it works across hosts and expires when its owner stops renewing it.

Every value read is checked against its column's type (:class:`StoredInteger` and its siblings):
SQLite keeps whatever a hand edit puts in a column, and a text where a number belongs must be one
line naming the column (:class:`DamagedValueError`), not a traceback wherever the value is used.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from reid_app.config import AppConfig
from reid_app.errors import ReidAppError

T = TypeVar("T")

SQLITE_MAGIC = b"SQLite format 3\x00"
#: The DB-API module SQLAlchemy imports for a URL, and the PyPI package that provides it.
DRIVER_PACKAGES = {
    "psycopg": "psycopg",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
}

VIDEO_INGESTING = "ingesting"
VIDEO_COMPLETE = "complete"
_SQLITE_TABLE_ARGS = {"sqlite_autoincrement": True}
#: PostgreSQL advisory lock key that serialises write transactions ("reid" in ASCII).
WRITER_LOCK_KEY = 0x72656964


def utc_now() -> datetime:
    return datetime.now(UTC)


class DatabaseFileGone(ReidAppError):
    """The SQLite file was removed or replaced while this process had it open."""


class DamagedValueError(ReidAppError):
    """A value read from the database that is not of its column's type: a row edited or written
    by other software (SQLite keeps text in an INTEGER or REAL column, whatever its type says)."""


class _Checked(TypeDecorator):
    """A column type whose values are checked as they are read, so that a damaged row is one
    :class:`DamagedValueError` naming the column (a search skips that result, other commands stop
    with one line) instead of a ``TypeError`` deep in the code that uses the value. The stored
    form (DDL, bound values) is that of ``impl``: nothing changes in the database."""

    cache_ok = True
    #: What the values must be, for the message.
    expected = "a value"
    #: ``table.column`` and whether NULL is allowed, set once the tables are defined (below).
    where = "a column"
    nullable = True

    def accepts(self, value: object) -> bool:
        raise NotImplementedError

    def result_processor(self, dialect, coltype):  # noqa: ANN001, ANN201 - SQLAlchemy's signature
        # The impl's own processing (a SQLite datetime is parsed from text) is kept, and what it
        # cannot parse is a damaged value too.
        inner = super().result_processor(dialect, coltype)

        def process(value: object) -> object:
            if value is None:
                if self.nullable:
                    return None
                raise self.damaged(value)
            try:
                converted = inner(value) if inner is not None else value
            except (TypeError, ValueError, OverflowError):
                raise self.damaged(value) from None
            if not self.accepts(converted):
                raise self.damaged(value)
            return converted

        return process

    def damaged(self, value: object) -> DamagedValueError:
        shown = "NULL" if value is None else repr(value if not isinstance(value, bytes) else value[:20])[:60]
        return DamagedValueError(
            f"the database holds a damaged row: {self.where} is {shown}, not {self.expected} (the row was edited "
            "or written by other software): fix or delete that row, or restore the database from a backup"
        )


class StoredInteger(_Checked):
    impl = Integer
    cache_ok = True
    expected = "an integer"

    def accepts(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


class StoredFloat(_Checked):
    impl = Float
    cache_ok = True
    expected = "a finite number"

    def accepts(self, value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class StoredDateTime(_Checked):
    impl = DateTime
    cache_ok = True
    expected = "a date and time"

    def accepts(self, value: object) -> bool:
        return isinstance(value, datetime)


class StoredString(_Checked):
    impl = String
    cache_ok = True
    expected = "text"

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)


class StoredBytes(_Checked):
    impl = LargeBinary
    cache_ok = True
    expected = "binary data"

    def accepts(self, value: object) -> bool:
        return isinstance(value, bytes | bytearray | memoryview)


class Base(DeclarativeBase):
    pass


class DatabaseInfo(Base):
    """One row: this database's identity and the embedding model its vectors come from."""

    __tablename__ = "database_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(StoredString(36))
    created_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    model_name: Mapped[str | None] = mapped_column(StoredString(200))
    model_weights_sha256: Mapped[str | None] = mapped_column(StoredString(64))
    model_dim: Mapped[int | None] = mapped_column(StoredInteger)
    model_is_trained: Mapped[bool | None]
    identity_threshold: Mapped[float | None] = mapped_column(StoredFloat)
    identities_computed_at: Mapped[datetime | None] = mapped_column(StoredDateTime(timezone=True))


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (UniqueConstraint("sha256", "camera_id", name="uq_video_sha256_camera"), _SQLITE_TABLE_ARGS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(StoredString(4096))
    sha256: Mapped[str] = mapped_column(StoredString(64))
    camera_id: Mapped[int] = mapped_column(StoredInteger, index=True)
    fps: Mapped[float] = mapped_column(StoredFloat)
    frame_count: Mapped[int] = mapped_column(StoredInteger)
    width: Mapped[int] = mapped_column(StoredInteger)
    height: Mapped[int] = mapped_column(StoredInteger)
    sample_fps: Mapped[float | None] = mapped_column(StoredFloat)  # None: every frame
    start_time: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    status: Mapped[str] = mapped_column(StoredString(16))
    last_committed_frame: Mapped[int] = mapped_column(StoredInteger, default=-1)
    detector: Mapped[str] = mapped_column(StoredString(200))
    created_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(StoredDateTime(timezone=True))

    tracks: Mapped[list[Track]] = relationship(back_populates="video")


class Track(Base):
    """One person tracked within one video; ``embedding`` is the mean of its crops' embeddings,
    l2-normalised again."""

    __tablename__ = "tracks"
    __table_args__ = (_SQLITE_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(StoredInteger, ForeignKey("videos.id"), index=True)
    camera_id: Mapped[int] = mapped_column(StoredInteger, index=True)
    tracker_id: Mapped[int] = mapped_column(StoredInteger)  # the tracker's own id within the video
    first_frame: Mapped[int] = mapped_column(StoredInteger)
    last_frame: Mapped[int] = mapped_column(StoredInteger)
    first_timestamp_s: Mapped[float] = mapped_column(StoredFloat)
    last_timestamp_s: Mapped[float] = mapped_column(StoredFloat)
    num_crops: Mapped[int] = mapped_column(StoredInteger)
    embedding: Mapped[bytes] = mapped_column(StoredBytes)
    identity_id: Mapped[int | None] = mapped_column(StoredInteger, index=True)  # set by `reid-app identities`

    video: Mapped[Video] = relationship(back_populates="tracks")
    detections: Mapped[list[Detection]] = relationship(back_populates="track", order_by="Detection.id")


class Detection(Base):
    """One stored crop of a track: where it is in the video, its thumbnail and its embedding."""

    __tablename__ = "detections"
    __table_args__ = (Index("ix_detections_video_frame", "video_id", "frame_index"), _SQLITE_TABLE_ARGS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    track_id: Mapped[int] = mapped_column(StoredInteger, ForeignKey("tracks.id"), index=True)
    video_id: Mapped[int] = mapped_column(StoredInteger, ForeignKey("videos.id"))
    camera_id: Mapped[int] = mapped_column(StoredInteger, index=True)
    frame_index: Mapped[int] = mapped_column(StoredInteger)
    timestamp_s: Mapped[float] = mapped_column(StoredFloat)
    x1: Mapped[float] = mapped_column(StoredFloat)
    y1: Mapped[float] = mapped_column(StoredFloat)
    x2: Mapped[float] = mapped_column(StoredFloat)
    y2: Mapped[float] = mapped_column(StoredFloat)
    score: Mapped[float] = mapped_column(StoredFloat)
    thumbnail_path: Mapped[str] = mapped_column(StoredString(4096))  # relative to the data folder
    embedding: Mapped[bytes] = mapped_column(StoredBytes)

    track: Mapped[Track] = relationship(back_populates="detections")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


class Thumbnail(Base):
    """The JPEG thumbnail of one stored crop, kept in the database so that every host sees it."""

    __tablename__ = "thumbnails"

    detection_id: Mapped[int] = mapped_column(StoredInteger, ForeignKey("detections.id"), primary_key=True)
    jpeg: Mapped[bytes] = mapped_column(StoredBytes)


class Deletion(Base):
    """One entry of the deletion log: row ids of ``kind`` ("tracks" or "detections") deleted by one
    transaction, as little-endian int64 bytes. Hosts apply the entries past the last one they saw."""

    __tablename__ = "deletions"
    __table_args__ = (_SQLITE_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(StoredString(16))
    row_count: Mapped[int] = mapped_column(StoredInteger)
    row_ids: Mapped[bytes] = mapped_column(StoredBytes)
    deleted_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))


class IngestClaim(Base):
    """Who is ingesting a video right now, until when (seconds since 1970 on the database's clock)."""

    __tablename__ = "ingest_claims"

    video_id: Mapped[int] = mapped_column(StoredInteger, ForeignKey("videos.id"), primary_key=True)
    owner: Mapped[str] = mapped_column(StoredString(300))  # host:pid:random
    host: Mapped[str] = mapped_column(StoredString(255))
    pid: Mapped[int] = mapped_column(StoredInteger)
    lease_until_s: Mapped[float] = mapped_column(StoredFloat)


class WatchEntry(Base):
    """A person on the live watchlist (:mod:`reid_app.watchlist`): their vector under the database's
    model, the similarity that raises an alert, and where alerts are POSTed."""

    __tablename__ = "watchlist"
    __table_args__ = (_SQLITE_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(StoredString(200))
    embedding: Mapped[bytes] = mapped_column(StoredBytes)
    model_weights_sha256: Mapped[str] = mapped_column(StoredString(64))
    threshold: Mapped[float] = mapped_column(StoredFloat)
    webhook_url: Mapped[str] = mapped_column(StoredString(2000), default="")
    webhook_secret: Mapped[str] = mapped_column(StoredString(200), default="")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(StoredString(200), default="")


class Alert(Base):
    """A newly committed track that matched a watchlist entry; created in the track's own transaction
    (no track without its alerts, no alert without its track) and delivered afterwards."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("watch_id", "track_id", name="uq_alert_watch_track"), _SQLITE_TABLE_ARGS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    watch_id: Mapped[int] = mapped_column(StoredInteger, index=True)
    track_id: Mapped[int] = mapped_column(StoredInteger)
    camera_id: Mapped[int] = mapped_column(StoredInteger)
    score: Mapped[float] = mapped_column(StoredFloat)
    seen_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))  # the frame that decided
    # The appearance (one tracked person in one video): it alerts once per watch, through every
    # segment of the track and a redo of an interrupted ingest. None on rows of the first version.
    video_id: Mapped[int | None] = mapped_column(StoredInteger)
    tracker_id: Mapped[int | None] = mapped_column(StoredInteger)
    first_seen_at: Mapped[datetime | None] = mapped_column(StoredDateTime(timezone=True))
    first_frame: Mapped[int | None] = mapped_column(StoredInteger)  # of the appearance's first segment
    created_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(StoredDateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(StoredInteger, default=0)
    next_attempt_s: Mapped[float] = mapped_column(StoredFloat, default=0.0)  # database clock
    last_error: Mapped[str] = mapped_column(StoredString(300), default="")


class AuditEntry(Base):
    """One line of the audit trail (:mod:`reid_app.audit`): appended, never changed or deleted."""

    __tablename__ = "audit_log"
    __table_args__ = (_SQLITE_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(StoredString(200))
    action: Mapped[str] = mapped_column(StoredString(64))
    target: Mapped[str] = mapped_column(StoredString(200), default="")
    details: Mapped[str] = mapped_column(StoredString(4000), default="")  # JSON


class Case(Base):
    """An investigation (:mod:`reid_app.cases`): a name, notes, and the tracks an operator marked."""

    __tablename__ = "cases"
    __table_args__ = (_SQLITE_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(StoredString(200))
    notes: Mapped[str] = mapped_column(StoredString(10000), default="")
    created_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(StoredString(200), default="")


class CaseTrack(Base):
    """One track's verdict in a case: ``confirmed`` (the case's person) or ``rejected`` (not them)."""

    __tablename__ = "case_tracks"

    case_id: Mapped[int] = mapped_column(StoredInteger, ForeignKey("cases.id"), primary_key=True)
    track_id: Mapped[int] = mapped_column(StoredInteger, primary_key=True, index=True)
    verdict: Mapped[str] = mapped_column(StoredString(16))
    decided_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))
    decided_by: Mapped[str] = mapped_column(StoredString(200), default="")


class ReembedJob(Base):
    """A ``reid-app reembed`` under way (at most one row): the model it moves the database to, the
    model it started from, and who runs it until when (like :class:`IngestClaim`)."""

    __tablename__ = "reembed_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(StoredString(200))
    model_weights_sha256: Mapped[str] = mapped_column(StoredString(64))
    model_dim: Mapped[int] = mapped_column(StoredInteger)
    model_is_trained: Mapped[bool]
    from_weights_sha256: Mapped[str] = mapped_column(StoredString(64))
    owner: Mapped[str] = mapped_column(StoredString(300))  # host:pid:random
    lease_until_s: Mapped[float] = mapped_column(StoredFloat)
    started_at: Mapped[datetime] = mapped_column(StoredDateTime(timezone=True))


class ReembedVector(Base):
    """A stored crop's embedding under a reembed job's model, kept apart until the job switches the
    database over (searches read :class:`Detection` only, so they keep the old model until then)."""

    __tablename__ = "reembed_vectors"

    job_id: Mapped[int] = mapped_column(StoredInteger, primary_key=True)
    detection_id: Mapped[int] = mapped_column(StoredInteger, primary_key=True)
    embedding: Mapped[bytes] = mapped_column(StoredBytes)


class PendingFileDeletion(Base):
    """A thumbnail file (of a database made before thumbnails were rows) whose rows are deleted but
    whose file may still be on disk: recorded in the deleting transaction, removed after it, so a
    run killed in between is finished by the next prune or forget."""

    __tablename__ = "pending_file_deletions"
    __table_args__ = (_SQLITE_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(StoredString(4096))  # relative to the data folder


def _label_checked_columns() -> None:
    """Tell each checked column type which column it is (for the message) and whether it may be NULL."""
    seen: set[int] = set()
    for table in Base.metadata.tables.values():
        for column in table.columns:
            if isinstance(column.type, _Checked):
                assert id(column.type) not in seen, f"{table.name}.{column.name} shares its type instance"
                seen.add(id(column.type))
                column.type.where = f"{table.name}.{column.name}"
                column.type.nullable = bool(column.nullable)


_label_checked_columns()


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def ids_to_bytes(ids: list[int] | np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def bytes_to_ids(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<i8").astype(np.int64)


def bytes_to_vectors(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stack stored vectors into a float32 (N, dim) array."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    size = 4 * dim
    wrong = next((len(blob) for blob in blobs if len(blob) != size), None)
    if wrong is not None:
        raise DamagedValueError(
            f"the database holds a damaged row: a stored embedding has {wrong} bytes, not the {size} of a {dim}-d "
            "vector (the row was edited or written by other software): fix or delete that row, or restore the "
            "database from a backup"
        )
    matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)
    return matrix.astype(np.float32, copy=True)


def _is_lock_error(exc: OperationalError) -> bool:
    text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return "locked" in text or "busy" in text


class Database:
    """Engine plus session helpers for one database URL."""

    def __init__(self, config: AppConfig, *, create: bool = False, pool_size: int | None = None) -> None:
        """Connect. ``create=False`` refuses a SQLite file that does not exist yet (a read command on
        an empty database must not create one); ``create=True`` makes the file and the schema.
        ``pool_size``: connections kept open at most (default: SQLAlchemy's 5, and 10 more that
        are closed after use); a threaded server gives as many as its threads may hold at once."""
        self.config = config
        sqlite_path = config.sqlite_path
        if sqlite_path is not None and not sqlite_path.exists():
            if not create:
                raise ReidAppError(f"the database is empty: {sqlite_path} does not exist (run `reid-app ingest` first)")
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            sqlite_path.touch()  # an empty file is an empty database; connections never create one
        elif sqlite_path is not None:
            _check_sqlite_file(sqlite_path)
        # Which file this is: a long-running process (the server, an ingest) must notice it being
        # removed or replaced, or it goes on reading the deleted footage and writing into a file
        # nobody will see again.
        self._file_identity = _file_identity(sqlite_path) if sqlite_path is not None else None
        self._tables_ensured: set[frozenset[str]] = set()  # ensure_tables: found up to date
        try:
            self.engine = self._make_engine(config, pool_size)
        except ImportError as exc:  # the URL's DB-API driver is not installed
            module = (exc.name or "").split(".")[0]
            package = DRIVER_PACKAGES.get(module, module or "the driver named in --db")
            raise ReidAppError(
                f"the database driver for {config.safe_db_url} is not installed (no module {module!r}): "
                f"install it with `.venv/bin/pip install {package}`"
            ) from None
        self._write_engine = (
            self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE") if config.is_sqlite else self.engine
        )
        self.is_postgresql = self.engine.dialect.name == "postgresql"
        self._uuid: str | None = None
        if create:
            # In a write transaction (BEGIN IMMEDIATE on SQLite, the writer lock on PostgreSQL): two
            # processes creating the same new database queue up instead of failing, and the second
            # finds the tables made.
            self._retry_locked(self._create_schema)

    def _create_schema(self) -> None:
        with self._write_engine.begin() as connection:
            if self.is_postgresql:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITER_LOCK_KEY})
            Base.metadata.create_all(connection)

    @staticmethod
    def _make_engine(config: AppConfig, pool_size: int | None = None) -> Engine:
        # An in-memory SQLite database lives in one connection (SQLAlchemy's SingletonThreadPool or
        # StaticPool): it has no pool to size, and refuses the arguments of one.
        in_memory = config.is_sqlite and config.sqlite_path is None
        pool = {} if pool_size is None or in_memory else {"pool_size": pool_size, "max_overflow": 0}
        if not config.is_sqlite:
            return create_engine(config.db_url, pool_pre_ping=True, **pool)
        engine = create_engine(config.db_url, connect_args={"timeout": config.busy_timeout_s}, **pool)
        busy_ms = int(config.busy_timeout_s * 1000)

        @event.listens_for(engine, "do_connect")
        def _sqlite_never_create(_dialect, _record, cargs, cparams) -> None:  # noqa: ANN001 - SQLAlchemy's
            # Read-write, never create (SQLite's default creates a missing file): a database removed
            # while a process runs must not come back empty at its path under the next connection.
            if not cparams.get("uri") and cargs and cargs[0] not in ("", ":memory:"):
                cargs[0] = f"file:{quote(str(cargs[0]))}?mode=rw"
                cparams["uri"] = True

        @event.listens_for(engine, "connect")
        def _sqlite_on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API objects
            # Let SQLAlchemy's "begin" hook below issue BEGIN, so writers can ask for IMMEDIATE.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_on_begin(connection) -> None:  # noqa: ANN001
            connection.exec_driver_sql(connection.get_execution_options().get("sqlite_begin", "BEGIN"))

        return engine

    def check_file(self) -> None:
        """Refuse to go on when the SQLite file was removed or replaced since this process opened it
        (the connections it holds would read and write the old, unlinked file)."""
        if self._file_identity is None:
            return
        path = self.config.sqlite_path
        if _file_identity(path) != self._file_identity:
            raise DatabaseFileGone(
                f"the database file {path} was removed or replaced while this process was using it: "
                "restart it (on the restored file, or after `reid-app ingest` created a new one)"
            )

    def ensure_tables(self, tables: list[Any]) -> None:
        """Create ``tables`` (and columns added to them since) on a database made before they
        existed; when everything exists (every call but the first) this only reads the schema."""
        from sqlalchemy import inspect  # noqa: PLC0415

        wanted = frozenset(table.name for table in tables)
        if wanted in self._tables_ensured:  # checked once per process: not on every page poll
            return
        inspector = inspect(self.engine)
        existing = set(inspector.get_table_names())
        columns = {t.name: {c["name"] for c in inspector.get_columns(t.name)} for t in tables if t.name in existing}
        missing = [(t, c) for t in tables if t.name in columns for c in t.columns if c.name not in columns[t.name]]
        if {table.name for table in tables} <= existing and not missing:
            self._tables_ensured.add(wanted)
            return

        def work(session: Session) -> None:
            Base.metadata.create_all(session.connection(), tables=tables)
            # Columns added to a table since it was made (all nullable: old rows read as "unknown").
            dialect = session.connection().dialect
            present = inspect(session.connection())
            now = {name: {c["name"] for c in present.get_columns(name)} for name in {t.name for t, _ in missing}}
            for table, column in missing:
                if column.name in now[table.name]:
                    continue  # another process added it meanwhile
                kind = column.type.compile(dialect=dialect)
                names = dialect.identifier_preparer
                added = f"{names.quote(column.name)} {kind}"
                session.execute(text(f"ALTER TABLE {names.format_table(table)} ADD COLUMN {added}"))

        try:
            self.write(work)
        except (OperationalError, ProgrammingError) as exc:  # e.g. a PostgreSQL role that may not ALTER
            what = ", ".join(f"{t.name}.{c.name}" for t, c in missing) or ", ".join(sorted(wanted - existing))
            raise ReidAppError(
                f"cannot bring the database schema up to date ({what}): {str(exc.orig).strip().splitlines()[0]}; "
                "run this version once as the database's owner"
            ) from None
        self._tables_ensured.add(wanted)

    def has_schema(self) -> bool:
        from sqlalchemy import inspect

        self.check_file()
        return inspect(self.engine).has_table(DatabaseInfo.__tablename__)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; nothing it does is committed. Objects loaded through it stay
        readable after it closes (closing, unlike a rollback, does not expire them)."""
        self.check_file()
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def write(self, work: Callable[[Session], T], *, retries: int = 8) -> T:
        """Run ``work`` in one write transaction and commit; retried from scratch when the database
        is locked by another process (``work`` must therefore only touch the database)."""

        def transaction() -> T:
            self.check_file()
            with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                if self.is_postgresql:
                    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITER_LOCK_KEY})
                return work(session)

        return self._retry_locked(transaction, retries=retries)

    @staticmethod
    def _retry_locked(action: Callable[[], T], *, retries: int = 8) -> T:
        """Run ``action``, again after a growing pause while the database reports it is locked."""
        delay = 0.2
        for attempt in range(retries + 1):
            try:
                return action()
            except OperationalError as exc:
                if not _is_lock_error(exc) or attempt == retries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def info(self) -> DatabaseInfo | None:
        if not self.has_schema():
            return None
        with self.read() as session:
            return session.get(DatabaseInfo, 1)

    def ensure_info(self) -> DatabaseInfo:
        """The database_info row, created (with a fresh uuid) on first use."""

        def work(session: Session) -> DatabaseInfo:
            info = session.get(DatabaseInfo, 1)
            if info is None:
                info = DatabaseInfo(id=1, uuid=str(uuid.uuid4()), created_at=utc_now())
                session.add(info)
            return info

        return self.write(work)

    @property
    def uuid(self) -> str:
        """This database's uuid (read once)."""
        if self._uuid is None:
            info = self.info()
            if info is None:
                raise ReidAppError("the database is empty: nothing has been ingested yet (run `reid-app ingest` first)")
            try:
                # It names folders (index files, thumbnail cache): a damaged row must not lead elsewhere.
                self._uuid = str(uuid.UUID(str(info.uuid)))
            except ValueError:
                raise ReidAppError(
                    f"the database's uuid {str(info.uuid)[:40]!r} is not a UUID: its database_info row is damaged"
                ) from None
        return self._uuid

    def server_time(self) -> float:
        """Seconds since 1970 on the database's clock: leases compared on one clock hold whatever the
        hosts' own clocks say (on SQLite, a single machine, its clock)."""
        if not self.is_postgresql:
            return time.time()
        with self.engine.connect() as connection:
            return float(connection.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()


@dataclass
class DeletedRows:
    """What :func:`delete_tracks` removed."""

    tracks: list[int] = field(default_factory=list)
    detections: list[int] = field(default_factory=list)
    thumbnails: int = 0  # thumbnail rows
    files: list[str] = field(default_factory=list)  # thumbnail files of older rows, to remove after commit


def delete_tracks(session: Session, track_ids: list[int], *, keep_alerts: bool = False) -> DeletedRows:
    """Delete tracks with their crops, thumbnails and vectors, logging the deleted ids (and older
    rows' thumbnail files) in the same transaction: a kill either leaves all of it or none. Case
    verdicts and watchlist alerts on those tracks go with them (erasure leaves no trace of the
    person in a case or an alert; the audit trail keeps its ids) — except alerts when
    ``keep_alerts``: an interrupted ingest's redo makes the same tracks again and gives each kept
    alert its new track (no second alert for one appearance)."""
    from sqlalchemy import inspect  # noqa: PLC0415

    deleted = DeletedRows()
    tables = set(inspect(session.connection()).get_table_names())
    has_cases, has_alerts = CaseTrack.__tablename__ in tables, Alert.__tablename__ in tables
    for start in range(0, len(track_ids), _ID_CHUNK):
        chunk = track_ids[start : start + _ID_CHUNK]
        rows = session.execute(
            select(Detection.id, Detection.thumbnail_path).where(Detection.track_id.in_(chunk))
        ).all()
        detection_ids = [row[0] for row in rows]
        deleted.files += [row[1] for row in rows if row[1]]
        for id_start in range(0, len(detection_ids), _ID_CHUNK):
            id_chunk = detection_ids[id_start : id_start + _ID_CHUNK]
            deleted.thumbnails += session.execute(
                delete(Thumbnail).where(Thumbnail.detection_id.in_(id_chunk))
            ).rowcount
            session.execute(delete(Detection).where(Detection.id.in_(id_chunk)))
        if has_cases:  # a database made before cases has no verdicts to erase
            session.execute(delete(CaseTrack).where(CaseTrack.track_id.in_(chunk)))
        if has_alerts:  # nor one made before the watchlist alerts
            erased = delete(Alert).where(Alert.track_id.in_(chunk))
            # Kept: those a redo can give their track again (alerts of the first version cannot).
            session.execute(erased.where(Alert.video_id.is_(None)) if keep_alerts else erased)
        session.execute(delete(Track).where(Track.id.in_(chunk)))
        deleted.tracks += chunk
        deleted.detections += detection_ids
    now = utc_now()
    for kind, ids in (("tracks", deleted.tracks), ("detections", deleted.detections)):
        if ids:
            session.add(Deletion(kind=kind, row_count=len(ids), row_ids=ids_to_bytes(ids), deleted_at=now))
    session.add_all(PendingFileDeletion(path=path) for path in deleted.files)
    return deleted


#: Ids per IN (...) list: below every database's bound-parameter limit.
_ID_CHUNK = 900


#: One read-only descriptor per database file whose header this process has read, never closed.
#: Closing *any* descriptor of a file drops every POSIX lock the process holds on it, SQLite's own
#: included (https://www.sqlite.org/howtocorrupt.html, section 2.2): a process that opened a second
#: Database on a file its connections already had open (a server, a test) lost its WAL read lock,
#: and another process's ingest then deleted the WAL under it ("database disk image is malformed",
#: or stale reads). A descriptor that stays open releases nothing.
_HEADER_DESCRIPTORS: dict[tuple[int, int], int] = {}
_HEADER_LOCK = threading.Lock()


def _read_header(path: Path) -> bytes:
    """The first bytes of ``path``, read without ever closing a descriptor of it."""
    with _HEADER_LOCK:
        status = path.stat()
        descriptor = _HEADER_DESCRIPTORS.get((status.st_dev, status.st_ino))
        if descriptor is None:
            descriptor = os.open(path, os.O_RDONLY)
            opened = os.fstat(descriptor)
            # An open descriptor keeps its inode allocated, so this key cannot name another file later.
            _HEADER_DESCRIPTORS[(opened.st_dev, opened.st_ino)] = descriptor
        return os.pread(descriptor, len(SQLITE_MAGIC), 0)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it does not exist."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _check_sqlite_file(path: Path) -> None:
    """Refuse, before SQLite touches it, a --db path that is a folder or another kind of file."""
    if path.is_dir():
        raise ReidAppError(f"--db must name a SQLite database file, but {path} is a directory")
    head = _read_header(path)
    if head and head != SQLITE_MAGIC:  # an empty file is a new database to SQLite
        raise ReidAppError(f"{path} is not a SQLite database (--db must name a reid-app database or a new file)")


def count_rows(session: Session, model: type[Base]) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def require_nonempty(db: Database) -> DatabaseInfo:
    """The database's info row, or a one-line error when nothing was ever ingested."""
    info = db.info()
    if info is None or info.model_name is None:
        raise ReidAppError("the database is empty: nothing has been ingested yet (run `reid-app ingest` first)")
    with db.read() as session:
        if count_rows(session, Track) == 0:
            raise ReidAppError("the database is empty: no person tracks are stored (run `reid-app ingest` first)")
    return info


def as_utc(moment: datetime) -> datetime:
    """Datetimes read back from SQLite lose their zone; everything stored is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_model_identity(info: DatabaseInfo | None, name: str, weights_sha256: str, dim: int) -> None:
    """Refuse to mix embeddings of two models in one database."""
    if info is None or info.model_name is None:
        return
    stored = (info.model_name, info.model_weights_sha256, info.model_dim)
    if stored != (name, weights_sha256, dim):
        raise ReidAppError(
            f"this database holds embeddings of model {info.model_name} (weights sha256 "
            f"{(info.model_weights_sha256 or '')[:12]}, dim {info.model_dim}) but this run uses {name} (weights "
            f"sha256 {weights_sha256[:12]}, dim {dim}); embeddings of different models cannot be compared: "
            "use the same --weights or another --db"
        )
