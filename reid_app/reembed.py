"""``reid-app reembed``: move a database to another re-ID model, from the crops it stores.

A database is pinned to the model that wrote its vectors (:func:`reid_app.store.check_model_identity`);
this is the one way to change it. Every stored crop is embedded again from its stored pixels (the
JPEG each crop keeps, :mod:`reid_app.thumbnails`), each track's pooled vector is rebuilt from them,
and the model recorded in the database changes **in one transaction** with all of it.

Crash-safety contract (the same words as :mod:`reid_app.ingest`'s):

* **Until the switch nothing that searches read changes.** New vectors go to a table of their own
  (:class:`reid_app.store.ReembedVector`), committed a page of crops at a time; the CLI and
  ``reid-app serve`` keep answering with the old model meanwhile.
* **A kill at any point leaves the old model usable, and a re-run finishes the job**: it finds
  the job row (:class:`reid_app.store.ReembedJob`, with a lease like an ingest claim's), keeps the
  vectors already staged for the same model and embeds only the crops still missing.
* **The switch is one write transaction**: it checks that every crop stored by then has a staged
  vector (an ingest that committed meanwhile with the old model sends the job back for those crops),
  writes every crop's and track's vector, records the new model, clears the identities (computed
  from the old vectors: run ``reid-app identities`` again) and deletes the job. Each host's FAISS
  index names the model it was built for, so every host rebuilds it on its next sync.
* **Concurrent runs**: a second reembed while one holds the lease is refused in one line; a job
  whose lease ran out is taken over (same model: its vectors are kept; another model: they are
  dropped); a switch finds the database moved by someone else since the job began: it stops and
  switches nothing.

Stored pixels: a crop's JPEG is at most ``thumbnail_max_side`` a side, and ingest keeps it at
least the embedder's input size (:func:`reid_app.thumbnails.stored_crop_side`), so the new model sees what it would
have seen at ingest up to JPEG rounding. A crop stored smaller than the new model's input while the
person was larger in the video (a database ingested with small thumbnails, or for a smaller model)
cannot give the new model its input: one line, and nothing is switched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session

from reid_app.claims import new_owner, owner_process_gone
from reid_app.errors import ReidAppError
from reid_app.store import (
    Base,
    Database,
    DatabaseInfo,
    Detection,
    IngestClaim,
    ReembedJob,
    ReembedVector,
    Thumbnail,
    Track,
    bytes_to_vectors,
    require_nonempty,
    utc_now,
    vector_to_bytes,
)
from reid_app.thumbnails import confined_thumbnail, read_thumbnail_file

#: Crops embedded and committed per page (bounded memory and transaction size; a kill loses at most one page).
PAGE = 256
#: Seconds a job's lease lasts; renewed by every page, so a run that stops is taken over after this.
LEASE_S = 120.0
#: Times the switch sends the job back for crops committed meanwhile before giving up (an ingest
#: that commits faster than this embeds should be stopped first).
SWITCH_ATTEMPTS = 5
#: A stored crop may be this many pixels short of the input it should cover (JPEG/rounding).
SIZE_SLACK_PX = 2


@dataclass
class ReembedReport:
    model_name: str
    previous_model: str | None
    crops: int  # crops embedded by this run
    crops_total: int
    tracks: int
    already: bool = False  # the database already used this model
    resumed_crops: int = 0  # crops whose vectors an earlier, stopped run had staged


Progress = Callable[[int, int], None]  # (done, total)


def reembed(db: Database, embedder: Any, progress: Progress | None = None) -> ReembedReport:
    """Move ``db`` to ``embedder``'s model (module docstring); returns what was done."""
    info = require_nonempty(db)
    target = (embedder.model_name, embedder.weights_sha256, int(embedder.dim))
    if (info.model_name, info.model_weights_sha256, info.model_dim) == target:
        return ReembedReport(embedder.model_name, info.model_name, 0, 0, 0, already=True)
    _create_tables(db)
    owner = new_owner()
    job_id, kept = _claim(db, embedder, info, owner)
    try:
        return _run(db, embedder, progress, job_id, owner, kept, info)
    except BaseException:
        # A run that stops on an error (or Ctrl-C) hands its job over at once; its staged vectors stay.
        with contextlib.suppress(Exception):  # the error that stopped it is the one to report
            db.write(lambda session: _release(session, job_id, owner))
        raise


def _release(session: Session, job_id: int, owner: str) -> None:
    mine = (ReembedJob.id == job_id) & (ReembedJob.owner == owner)
    session.execute(update(ReembedJob).where(mine).values(lease_until_s=0.0))


def _run(
    db: Database, embedder: Any, progress: Progress | None, job_id: int, owner: str, kept: int, info: DatabaseInfo
) -> ReembedReport:
    previous, from_sha = info.model_name, info.model_weights_sha256
    embedded = 0
    for _ in range(SWITCH_ATTEMPTS):
        total = _count(db, Detection)
        for done in _embed_missing(db, embedder, job_id, owner, kept + embedded, total):
            embedded = done - kept
            if progress is not None:
                progress(done, total)
        now = db.server_time()
        switched = db.write(lambda session, now=now: _switch(session, db, job_id, owner, from_sha, now))
        if switched is not None:
            return ReembedReport(embedder.model_name, previous, embedded, switched[0], switched[1], resumed_crops=kept)
    raise ReidAppError(
        f"crops kept arriving faster than reembed could embed them ({SWITCH_ATTEMPTS} tries): stop the running "
        "ingests and run reembed again (its work so far is kept)"
    )


def _create_tables(db: Database) -> None:
    # A database made before reembed existed gets its two tables here (create_all skips existing ones).
    tables = [ReembedJob.__table__, ReembedVector.__table__]

    def work(session: Session) -> None:
        Base.metadata.create_all(session.connection(), tables=tables)

    db.write(work)


def _count(db: Database, model: type[Base]) -> int:
    from reid_app.store import count_rows  # noqa: PLC0415

    with db.read() as session:
        return count_rows(session, model)


def _claim(db: Database, embedder: Any, info: DatabaseInfo, owner: str) -> tuple[int, int]:
    """Take (or take over) the job row; returns (job id, crops already staged for this model)."""
    now = db.server_time()

    def work(session: Session) -> tuple[int, int]:
        job = session.scalars(select(ReembedJob)).first()
        if job is not None and job.lease_until_s > now and not owner_process_gone(job.owner):
            raise ReidAppError(
                f"another reembed (to {job.model_name}, by {job.owner.rsplit(':', 1)[0]}) is running on this "
                "database; wait for it, or run this again once it has stopped"
            )
        same_target = job is not None and (job.model_weights_sha256, job.model_dim) == (
            embedder.weights_sha256, int(embedder.dim),
        ) and job.from_weights_sha256 == info.model_weights_sha256  # fmt: skip
        if job is not None and not same_target:
            session.execute(delete(ReembedVector).where(ReembedVector.job_id == job.id))
            session.delete(job)
            session.flush()
            job = None
        if job is None:
            job = ReembedJob(
                model_name=embedder.model_name, model_weights_sha256=embedder.weights_sha256,
                model_dim=int(embedder.dim), model_is_trained=bool(embedder.is_trained),
                from_weights_sha256=info.model_weights_sha256 or "", owner=owner, lease_until_s=now + LEASE_S,
                started_at=utc_now(),
            )  # fmt: skip
            session.add(job)
            session.flush()
            return job.id, 0
        job.owner, job.lease_until_s = owner, now + LEASE_S
        staged = session.scalar(
            select(func.count()).select_from(ReembedVector).where(
                ReembedVector.job_id == job.id,
                exists().where(Detection.id == ReembedVector.detection_id),
            )
        )
        return job.id, int(staged or 0)

    return db.write(work)


def _renew(session: Session, job_id: int, owner: str, now: float) -> None:
    renewed = session.execute(
        update(ReembedJob).where(ReembedJob.id == job_id, ReembedJob.owner == owner).values(lease_until_s=now + LEASE_S)
    ).rowcount
    if not renewed:
        raise ReidAppError("this reembed's job was taken over by another run (its lease ran out): stopping")


def _embed_missing(db: Database, embedder: Any, job_id: int, owner: str, done: int, total: int) -> Iterator[int]:
    """Embed the crops that have no staged vector yet, a page per transaction; yields crops done."""
    height, width = (int(v) for v in embedder.input_size)
    after = 0
    while True:
        with db.read() as session:
            page = session.execute(
                select(Detection.id, Detection.x1, Detection.y1, Detection.x2, Detection.y2, Detection.thumbnail_path,
                       Detection.camera_id)  # fmt: skip
                .where(Detection.id > after)
                .where(~exists().where(ReembedVector.job_id == job_id, ReembedVector.detection_id == Detection.id))
                .order_by(Detection.id)
                .limit(PAGE)
            ).all()
            if not page:
                return
            ids = [row[0] for row in page]
            stored = select(Thumbnail.detection_id, Thumbnail.jpeg).where(Thumbnail.detection_id.in_(ids))
            jpegs = dict(session.execute(stored).all())
        crops = [_stored_crop(db, row, jpegs.get(row[0]), (height, width)) for row in page]
        vectors = embedder.embed(crops, cameras=[row.camera_id for row in page])
        now = db.server_time()

        rows = [
            ReembedVector(job_id=job_id, detection_id=detection_id, embedding=vector_to_bytes(vector))
            for detection_id, vector in zip(ids, vectors, strict=True)
        ]
        db.write(lambda session, rows=rows, now=now: _stage(session, job_id, owner, now, rows))
        after = ids[-1]
        done += len(ids)
        yield min(done, max(total, done))


def _stage(session: Session, job_id: int, owner: str, now: float, rows: list[ReembedVector]) -> None:
    _renew(session, job_id, owner, now)
    session.add_all(rows)


def _stored_crop(db: Database, row: Any, jpeg: bytes | None, input_size: tuple[int, int]) -> np.ndarray:
    detection_id, x1, y1, x2, y2, path = row[:6]
    if jpeg is None:
        local = confined_thumbnail(db.config.storage_dir, path)
        jpeg = read_thumbnail_file(local) if local is not None else None
    pixels = None if jpeg is None else cv2.imdecode(np.frombuffer(bytes(jpeg), np.uint8), cv2.IMREAD_COLOR)
    if pixels is None or pixels.size == 0:
        raise ReidAppError(
            f"crop {detection_id} has no stored pixels here (its thumbnail is missing or unreadable): reembed "
            "needs every crop's stored image; run it on the host that ingested it, or delete that video"
        )
    stored_h, stored_w = pixels.shape[:2]
    box_h, box_w = float(y2) - float(y1), float(x2) - float(x1)
    needed_h, needed_w = min(box_h, input_size[0]), min(box_w, input_size[1])
    if stored_h + SIZE_SLACK_PX < needed_h or stored_w + SIZE_SLACK_PX < needed_w:
        raise ReidAppError(
            f"crop {detection_id} is stored at {stored_w}x{stored_h} px, smaller than the "
            f"{input_size[1]}x{input_size[0]} input of the new model (the person was {box_w:.0f}x{box_h:.0f} px): "
            "this database keeps too little of each crop to reembed; ingest its videos again with the new model"
        )
    return pixels


def _switch(
    session: Session, db: Database, job_id: int, owner: str, from_sha: str | None, now: float
) -> tuple[int, int] | None:
    """The switch (module docstring); None when crops committed since need embedding first."""
    job = session.get(ReembedJob, job_id)
    if job is None or job.owner != owner:
        raise ReidAppError("this reembed's job was taken over by another run (its lease ran out): stopping")
    info = session.get(DatabaseInfo, 1)
    if info is None or info.model_weights_sha256 != from_sha:
        raise ReidAppError(
            f"the database was moved to model {info.model_name if info else '?'} by another run while this "
            "reembed ran: nothing switched"
        )
    # An ingest running now would fail its next commit against the new model and discard its video:
    # the switch waits until none holds a claim (its staged work is kept; run reembed again).
    live = session.scalars(select(IngestClaim).where(IngestClaim.lease_until_s > now)).first()
    if live is not None:
        raise ReidAppError(
            f"an ingest is running on this database (host {live.host}, pid {live.pid}): stop it or let it finish, "
            "then run reembed again (the crops embedded so far are kept)"
        )
    staged = exists().where(ReembedVector.job_id == job_id, ReembedVector.detection_id == Detection.id)
    if session.scalar(select(Detection.id).where(~staged).limit(1)) is not None:
        return None  # crops committed meanwhile: embed them, then try again
    dim = int(job.model_dim)
    crops = tracks = 0
    for track_ids in _chunks(session.scalars(select(Track.id).order_by(Track.id)).all(), 500):
        rows = session.execute(
            select(Detection.track_id, Detection.id, ReembedVector.embedding)
            .join(ReembedVector, (ReembedVector.detection_id == Detection.id) & (ReembedVector.job_id == job_id))
            .where(Detection.track_id.in_(track_ids))
            .order_by(Detection.track_id, Detection.id)
        ).all()
        if not rows:
            continue
        vectors = bytes_to_vectors([row[2] for row in rows], dim)
        session.execute(
            update(Detection),
            [{"id": row[1], "embedding": row[2]} for row in rows],
        )
        owners = np.array([row[0] for row in rows])
        pooled = []
        for track_id in np.unique(owners):
            mean = vectors[owners == track_id].mean(axis=0)
            pooled.append({"id": int(track_id), "embedding": vector_to_bytes(mean / max(np.linalg.norm(mean), 1e-12)),
                           "identity_id": None})  # fmt: skip
        session.execute(update(Track), pooled)
        crops += len(rows)
        tracks += len(pooled)
    info.model_name, info.model_weights_sha256 = job.model_name, job.model_weights_sha256
    info.model_dim, info.model_is_trained = dim, job.model_is_trained
    info.identities_computed_at = None
    session.execute(delete(ReembedVector).where(ReembedVector.job_id == job_id))
    session.delete(job)
    return crops, tracks


def _chunks(values: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
