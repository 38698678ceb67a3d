"""Retention and erasure: ``reid-app prune`` (by age) and ``reid-app forget`` (a track or an identity).

What is selected is removed **in one database transaction**: the tracks, their crops, the crops'
thumbnails and the vectors (rows; every host's FAISS index drops them through the deletion log,
:mod:`reid_app.index`), plus, for prune, the rows of videos left with nothing newer. A kill before
the commit leaves everything; after it, nothing a search can return: a search syncs its index
(removing the vectors) before it ranks, and skips rows that are gone. What is left after the
commit is local clean-up, which any re-run finishes: this host's index files and cached
thumbnails, and the thumbnail files of rows stored before thumbnails were rows (recorded in the
transaction, :class:`reid_app.store.PendingFileDeletion`).

A track's age is the time of its last sighting (video start time + its last timestamp).
Videos still being ingested keep their row (their old tracks may go).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from reid_app.config import MAX_CAMERA_ID, AppConfig
from reid_app.errors import ReidAppError
from reid_app.index import IndexManager
from reid_app.store import (
    VIDEO_COMPLETE,
    Database,
    Detection,
    IngestClaim,
    Track,
    Video,
    as_utc,
    delete_tracks,
    utc_now,
)
from reid_app.thumbnails import finish_file_deletions

_AGE_PATTERN = re.compile(r"^\s*(\d{1,6}(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Longest accepted --older-than (about 200 years): later cut-offs fall before 1970.
MAX_AGE = timedelta(days=200 * 365)


def parse_age(text: str) -> timedelta:
    """``--older-than``: a number and a unit, s/m/h/d/w (``30d``, ``12h``, ``1.5w``)."""
    match = _AGE_PATTERN.match(text or "")
    if match is None:
        raise ReidAppError(f"--older-than must be a number and a unit s, m, h, d or w (such as 30d), got {text[:40]!r}")
    age = timedelta(seconds=float(match.group(1)) * _AGE_UNITS[match.group(2)])
    if age > MAX_AGE:
        raise ReidAppError(f"--older-than is at most {MAX_AGE.days} days, got {text[:40]!r}")
    return age


def parse_row_id(text: str | int, what: str) -> int:
    """A track or identity id: a positive integer that fits the database's INTEGER columns."""
    value = str(text).strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 10 or not 1 <= int(value) <= MAX_CAMERA_ID:
        raise ReidAppError(f"{what} must be a positive integer up to {MAX_CAMERA_ID}, got {str(text)[:40]!r}")
    return int(value)


@dataclass
class Removal:
    """What a prune or forget removed (or, with ``dry_run``, would remove)."""

    what: str
    dry_run: bool
    tracks: int = 0
    detections: int = 0
    thumbnails: int = 0
    videos: list[int] = field(default_factory=list)
    cameras: dict[int, int] = field(default_factory=dict)  # camera -> tracks removed
    files: int = 0  # thumbnail files of older rows
    index_vectors: int = 0  # vectors dropped from this host's indexes

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        per_camera = ", ".join(f"camera {c}: {n}" for c, n in sorted(self.cameras.items())) or "none"
        out = [
            f"{self.what}: {verb} {self.tracks} tracks ({per_camera}) and {self.detections} crops with their "
            f"vectors and thumbnails",
        ]
        if self.videos:
            out.append(f"{verb} {len(self.videos)} video rows: ids {', '.join(map(str, self.videos[:20]))}"
                       + (" ..." if len(self.videos) > 20 else ""))
        if not self.dry_run:
            out.append(
                f"this host's index: {self.index_vectors} vectors dropped; other hosts drop theirs at their next sync"
                + (f"; {self.files} thumbnail files of older rows deleted" if self.files else "")
            )
        return out


@dataclass
class _Selection:
    tracks: list[int]
    cameras: dict[int, int]
    detections: int
    videos: list[int]


def _count_crops(session: Session, track_ids: list[int]) -> int:
    total = 0
    for start in range(0, len(track_ids), 900):
        chunk = track_ids[start : start + 900]
        total += int(session.scalar(select(func.count()).where(Detection.track_id.in_(chunk))) or 0)
    return total


def _select_old(session: Session, cutoff: datetime, camera: int | None) -> _Selection:
    query = select(Video)
    if camera is not None:
        query = query.where(Video.camera_id == camera)
    tracks: list[int] = []
    cameras: dict[int, int] = {}
    videos: list[int] = []
    for video in session.scalars(query.order_by(Video.id)):
        # Seconds into this video before which a sighting is older than the cut-off.
        offset = (cutoff - as_utc(video.start_time)).total_seconds()
        if offset <= 0:
            continue
        rows = session.execute(select(Track.id, Track.last_timestamp_s).where(Track.video_id == video.id)).all()
        old = [row[0] for row in rows if row[1] < offset]
        tracks += old
        if old:
            cameras[video.camera_id] = cameras.get(video.camera_id, 0) + len(old)
        duration = video.frame_count / video.fps if video.fps and video.frame_count else 0.0
        latest = max([duration, *(row[1] for row in rows)])
        if video.status == VIDEO_COMPLETE and len(old) == len(rows) and latest < offset:
            videos.append(video.id)
    return _Selection(tracks, cameras, _count_crops(session, tracks), videos)


def _select_tracks(session: Session, track_id: int | None, identity_id: int | None) -> _Selection:
    query = select(Track.id, Track.camera_id)
    query = query.where(Track.id == track_id) if track_id is not None else query.where(Track.identity_id == identity_id)
    rows = session.execute(query.order_by(Track.id)).all()
    cameras: dict[int, int] = {}
    for _, camera in rows:
        cameras[camera] = cameras.get(camera, 0) + 1
    tracks = [row[0] for row in rows]
    return _Selection(tracks, cameras, _count_crops(session, tracks), [])


def _remove(config: AppConfig, what: str, select_rows, dry_run: bool) -> Removal:  # noqa: ANN001
    db = Database(config)
    removal = Removal(what=what, dry_run=dry_run)
    if not db.has_schema():
        return removal
    if dry_run:
        with db.read() as session:
            chosen = select_rows(session)
    else:

        def work(session: Session) -> _Selection:
            # Selected and deleted in one transaction: nothing stored meanwhile is lost or half-deleted.
            chosen = select_rows(session)
            deleted = delete_tracks(session, chosen.tracks)
            removal.thumbnails = deleted.thumbnails
            for start in range(0, len(chosen.videos), 900):
                chunk = chosen.videos[start : start + 900]
                session.execute(delete(IngestClaim).where(IngestClaim.video_id.in_(chunk)))
                session.execute(delete(Video).where(Video.id.in_(chunk)))
            return chosen

        chosen = db.write(work)
    removal.tracks, removal.detections = len(chosen.tracks), chosen.detections
    removal.videos, removal.cameras = chosen.videos, chosen.cameras
    if not dry_run:
        removal.files = finish_file_deletions(db)
        reports = IndexManager(db, config).sync_all()
        removal.index_vectors = sum(report.removed for report in reports)
    db.dispose()
    return removal


def prune(config: AppConfig, older_than: timedelta, camera: int | None = None, *, dry_run: bool = False) -> Removal:
    """Remove every track last seen before now − ``older_than`` (of ``camera`` only, if given)."""
    cutoff = utc_now() - older_than
    what = f"prune: sightings before {cutoff:%Y-%m-%d %H:%M:%S} UTC" + (f" on camera {camera}" if camera else "")
    return _remove(config, what, lambda session: _select_old(session, cutoff, camera), dry_run)


def forget(
    config: AppConfig, *, track_id: int | None = None, identity_id: int | None = None, dry_run: bool = False
) -> Removal:
    """Remove one track, or every track of one identity (as numbered by the last ``reid-app identities``)."""
    if (track_id is None) == (identity_id is None):
        raise ReidAppError("give exactly one of --track ID or --identity ID")
    what = f"forget track {track_id}" if track_id is not None else f"forget identity {identity_id}"
    return _remove(config, what, lambda session: _select_tracks(session, track_id, identity_id), dry_run)
