"""Ingest one video of one camera: sample frames → detect → track → best crops → embed → store.

Storage happens in batches: every ``commit_every_frames`` sampled frames, the tracks that
ended meanwhile are embedded and their rows, vectors (track pooled vector + one vector per crop)
and JPEG thumbnails committed in **one transaction**, together with the video's
``last_committed_frame``. The FAISS indexes are then synced from the database
(:mod:`reid_app.index`), so they never hold a vector the database does not.

Idempotence and crash safety:

* A video is identified by (sha256 of its bytes, camera). Ingesting a pair that is already
  ``complete`` adds nothing and says so.
* Only one process ingests a (video, camera) at a time, whatever host it runs on: it holds a
  claim row in the database, renewed while it runs (:mod:`reid_app.claims`). A second ingest of
  the pair stops at once with a one-line error naming the holder.
* A run killed at any point (even SIGKILL) leaves the video with status ``ingesting`` and its
  claim. Once the claim is free (its lease ended, or its owner was a process of this host that is
  gone), the next ingest of that video **redoes it**: the partial tracks, crops and thumbnails are deleted (one
  transaction), the indexes are synced (dropping their vectors) and the video is processed
  from the start. Resuming from ``last_committed_frame`` instead would cut every track that was
  open at the kill into two (the tracker's state is not stored), so the result would differ
  from an uninterrupted run; redoing gives exactly the same rows.
* A run that fails with an error (e.g. the model breaks) deletes what it stored, video row
  included. A video that stops decoding part-way keeps the frames decoded so far (a warning says
  where it stopped).
* Thumbnails are stored in the database with their rows (:mod:`reid_app.thumbnails`), so every
  host sees them; nothing is written to the data folder. Deleted rows are logged
  (:func:`reid_app.store.delete_tracks`) so every host's index drops their vectors.
* Everything that can be checked is checked before anything is written: the video decodes,
  the camera id, the weights, the database's embedding model.
* The embedding model is recorded in the database by the transaction that commits its first
  vectors (and checked again there), and forgotten again when a failed run's cleanup leaves no
  vector at all: a run that stored nothing never ties the database to its model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import delete, inspect, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from reid_app import claims
from reid_app.config import AppConfig, parse_camera_id
from reid_app.errors import ReidAppError, short_path
from reid_app.index import IndexManager
from reid_app.store import (
    VIDEO_COMPLETE,
    VIDEO_INGESTING,
    Alert,
    Database,
    DatabaseInfo,
    Detection,
    Thumbnail,
    Track,
    Video,
    as_utc,
    check_model_identity,
    count_rows,
    delete_tracks,
    utc_now,
    vector_to_bytes,
)
from reid_app.thumbnails import finish_file_deletions, stored_crop_side
from reid_app.track import DEFAULT_LOST_TRACK_SECONDS, PersonTracker, TrackCrops, TrackCropSelector
from reid_app.video import VideoSource, open_video, sample_step
from reid_app.watchlist import (
    Deliverer,
    WatchVectors,
    alerts_for_tracks,
    drop_unmatched_alerts,
    watch_vectors,
)
from reid_app.watchlist import prepare as prepare_watchlist

logger = logging.getLogger(__name__)

#: Longest wait between two attempts to reconnect a dropped stream (1, 2, 4, ... seconds up to this).
RECONNECT_MAX_S = 30.0
#: A track unseen for this long (seconds, beyond the tracker's own lost-track buffer) is finished.
TRACK_END_MARGIN_S = 1.0
#: With someone on the watchlist, an open track is compared with it once it has this many tracked
#: detections (ByteTrack confirms a person on the second sighting: about 1.5 s after they appear at
#: 2 fps), and again every WATCH_RECHECK_S while it stays unmatched; a match commits the track so
#: far at once with its alert, instead of when the person leaves the view.
WATCH_MIN_DETECTIONS = 2
WATCH_RECHECK_S = 2.0
#: Seconds between two reads of the watchlist by a running ingest (entries added during a stream count).
WATCH_REFRESH_S = 10.0
#: Accepted start times of a video (README.md, Limits). Stored times are start + offset and are
#: shifted and formatted later: a start near year 9999 would overflow every read of the database.
EARLIEST_START_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_START_TIME = datetime(2200, 1, 1, tzinfo=UTC)
#: Longest file or folder name (bytes) of common file systems (ext4, XFS, btrfs, APFS, NTFS).
MAX_NAME_BYTES = 255
#: Lowest --fps: one frame every 1000 s. Lower values make the sampling step overflow.
MIN_SAMPLE_FPS = 0.001


@dataclass
class IngestProgress:
    frames_done: int
    frames_total: int | None
    persons: int  # person detections seen so far
    crops: int  # crops stored so far
    tracks: int


@dataclass
class IngestSummary:
    video_id: int
    video_path: str
    camera: int
    status: str  # "ingested", "redone after an interrupted run", "already ingested"
    sampled_frames: int = 0
    person_detections: int = 0
    tracks: int = 0
    crops: int = 0
    elapsed_s: float = 0.0
    video_seconds: float = 0.0  # span of video processed
    stopped_early: str | None = None
    alerts: int = 0  # watchlist alerts raised by this run's tracks
    notes: list[str] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float | None:
        """Processing time / processed video duration (< 1: faster than real time)."""
        return self.elapsed_s / self.video_seconds if self.video_seconds > 0 else None


@dataclass
class IngestOptions:
    video: str
    camera: int
    start_time: datetime | None = None
    max_frames: int | None = None  # stop after this many sampled frames (trial runs, tests)


def default_start_time(video: VideoSource) -> datetime:
    """A file's modification time, or now for a stream (both UTC)."""
    if video.is_stream:
        return utc_now()
    mtime = Path(video.source).stat().st_mtime
    try:
        moment = datetime.fromtimestamp(mtime, tz=UTC)
    except (OverflowError, OSError, ValueError):
        moment = None
    if moment is None or not EARLIEST_START_TIME <= moment < LATEST_START_TIME:
        raise ReidAppError(
            f"the modification time of {video.source} ({mtime:.0f} s after 1970) is not a plausible recording "
            "time: give the time of its first frame with --start-time"
        )
    return moment


def parse_start_time(text: str | None) -> datetime | None:
    """``--start-time`` as an ISO 8601 time between EARLIEST_START_TIME and LATEST_START_TIME; a
    time without zone is taken as UTC."""
    if text is None:
        return None
    try:
        moment = as_utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError):  # OverflowError: a zone pushing year 1 or 9999 out of range
        moment = None
    if moment is None or not EARLIEST_START_TIME <= moment < LATEST_START_TIME:
        raise ReidAppError(
            f"--start-time must be an ISO 8601 time from {EARLIEST_START_TIME:%Y-%m-%d} to before "
            f"{LATEST_START_TIME:%Y-%m-%d}, such as 2024-05-01T14:30:00; got {text[:60]!r}"
        )
    return moment


def check_path_components(path: Path) -> None:
    """Refuse a folder whose path has a component longer than file systems allow, before the run
    creates anything (the database would be made before its thumbnail folder fails)."""
    for part in path.absolute().parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ReidAppError(
                f"a folder name is too long (at most {MAX_NAME_BYTES} bytes per path component): {short_path(path)}"
            )


def check_sample_fps(fps: float | None) -> None:
    """``--fps``: None (every frame) or a finite rate of at least MIN_SAMPLE_FPS."""
    if fps is not None and not (math.isfinite(fps) and fps >= MIN_SAMPLE_FPS):
        raise ReidAppError(f"--fps must be a number of at least {MIN_SAMPLE_FPS:g} frames per second, got {fps}")


def thumbnail_image(crop: np.ndarray, max_side: int) -> np.ndarray:
    height, width = crop.shape[:2]
    if max(height, width) <= max_side:
        return crop
    scale = max_side / max(height, width)
    return cv2.resize(crop, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def pooled_embedding(vectors: np.ndarray) -> np.ndarray:
    """Mean of a track's crop embeddings, l2-normalised again."""
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def video_identity(video: VideoSource, start_time: datetime) -> str:
    """What makes two ingests "the same video": the file's sha256; for a stream (whose content
    changes over time) the hash of its URL and start time."""
    if not video.is_stream:
        return video.sha256()
    return hashlib.sha256(f"{video.source}@{start_time.isoformat()}".encode()).hexdigest()


def _checked_uuid(value: object) -> str:
    """The database's uuid in canonical form: it becomes a folder name (index files, thumbnail
    cache), so a row holding anything else (``../..``) must not reach the file system."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ReidAppError(
            f"the database's uuid {str(value)[:40]!r} is not a UUID: its database_info row is damaged"
        ) from None


def _delete_video_rows(session: Session, video_id: int, *, delete_video: bool, keep_alerts: bool = False) -> None:
    """A video's tracks, crops, thumbnails (logged for every host's index), and its row if asked;
    ``keep_alerts``: the redo of a file, which makes the same tracks again, keeps their alerts."""
    track_ids = list(session.scalars(select(Track.id).where(Track.video_id == video_id)))
    delete_tracks(session, track_ids, keep_alerts=keep_alerts)
    if not keep_alerts and inspect(session.connection()).has_table(Alert.__tablename__):
        # Also those an earlier redo kept, whose tracks were already gone.
        session.execute(delete(Alert).where(Alert.video_id == video_id))
    if delete_video:
        session.execute(delete(claims.IngestClaim).where(claims.IngestClaim.video_id == video_id))
        session.execute(delete(Video).where(Video.id == video_id))


class _Ingest:
    """One ingest run (state shared by the steps)."""

    def __init__(
        self,
        config: AppConfig,
        options: IngestOptions,
        embedder: Any,
        detector: Any,
        on_progress: Callable[[IngestProgress], None] | None,
        source: VideoSource | None = None,
    ) -> None:
        self.config, self.options = config, options
        self.source = source
        self.embedder, self.detector = embedder, detector
        self.on_progress = on_progress
        self.db: Database | None = None
        self.indexes: IndexManager | None = None
        self.video_id: int | None = None
        self.db_uuid: str | None = None
        self.owner = claims.new_owner()  # this run's name in the claim row
        self.completed = False  # its final commit went through
        self.deliverer: Deliverer | None = None
        # Early watchlist checks: crop vectors by tracker id and frame (each crop is embedded once,
        # for the check and the commit), the frame of each open track's last check, and the
        # tracks already cut for an alert (their later segments are committed as usual).
        self._crop_vectors: dict[int, dict[int, np.ndarray]] = {}
        self._checked_at: dict[int, int] = {}
        self._alerted: set[int] = set()

    # -- validation (nothing written) ------------------------------------------------------
    def validate(self) -> VideoSource:
        parse_camera_id(self.options.camera)
        if self.options.max_frames is not None and self.options.max_frames < 1:
            raise ReidAppError(f"--max-frames must be at least 1, got {self.options.max_frames}")
        check_sample_fps(self.config.sample_fps)
        video = self.source or open_video(self.options.video)
        for folder in (self.config.storage_dir, self.config.index_dir):
            check_path_components(folder)
        if self.config.sqlite_path is None or self.config.sqlite_path.exists():
            probe = Database(self.config, create=False)
            info = probe.info()
            check_model_identity(info, self.embedder.model_name, self.embedder.weights_sha256, self.embedder.dim)
            probe.dispose()
        return video

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> IngestSummary:
        video = self.validate()
        start_time = self.options.start_time or default_start_time(video)
        sha256 = video_identity(video, start_time)  # before the database is touched: hashing takes a while
        self.db = Database(self.config, create=True)
        self.indexes = IndexManager(self.db, self.config)
        summary = IngestSummary(video_id=0, video_path=video.source, camera=self.options.camera, status="ingested")
        # The claim row, renewed for the whole run: a second ingest of the same video and camera,
        # on any host, must not take this one's unfinished rows for those of a killed run.
        # Alerts of this run's tracks are POSTed while it runs (and any left undelivered before it,
        # also when the video turns out to be ingested already: a run killed after its last commit).
        prepare_watchlist(self.db)  # an older alerts table gets its columns before the claim reads them
        self.deliverer = Deliverer(self.db, self.config.public_url).start()
        try:
            existing = self._claim_video(video, sha256, start_time, summary)
            if existing == VIDEO_COMPLETE:
                return summary
            with claims.Heartbeat(self.db, self.video_id, self.owner, self.config.claim_lease_s):
                try:
                    self.indexes.sync_all()  # drop vectors of a redone run's deleted rows
                    self._process(video, summary)
                except Exception:
                    self._discard()
                    raise
        finally:
            self.deliverer.stop()
        return summary

    def _claim_video(self, video: VideoSource, sha256: str, start_time: datetime, summary: IngestSummary) -> str | None:
        """Create (or reset, after an interrupted run) the video row; return the previous status."""
        embedder = self.embedder
        what = f"video {video.source} (camera {self.options.camera})"
        now_s = self.db.server_time()

        def work(session: Session) -> tuple[int, str | None]:
            info = session.get(DatabaseInfo, 1)
            check_model_identity(info, embedder.model_name, embedder.weights_sha256, embedder.dim)
            row = session.scalars(
                select(Video).where(Video.sha256 == sha256, Video.camera_id == self.options.camera)
            ).first()
            if row is not None and row.status == VIDEO_COMPLETE:
                return row.id, VIDEO_COMPLETE
            previous = None
            if row is None:
                row = Video(sha256=sha256, camera_id=self.options.camera, created_at=utc_now())
                session.add(row)
            else:
                claims.take(session, row.id, self.owner, now_s, self.config.claim_lease_s, what)
                previous = row.status
                # A stream's "redo" sees other moments: its old alerts are not this run's appearances.
                _delete_video_rows(session, row.id, delete_video=False, keep_alerts=not video.is_stream)
            row.path = str(Path(video.source).resolve()) if not video.is_stream else video.source
            row.fps, row.frame_count = video.fps, video.frame_count or 0
            row.width, row.height = video.width, video.height
            row.sample_fps = self.config.sample_fps
            row.start_time = start_time
            row.status = VIDEO_INGESTING
            row.last_committed_frame = -1
            row.detector = self.detector.name
            session.flush()
            if previous is None:
                claims.take(session, row.id, self.owner, now_s, self.config.claim_lease_s, what)
            return row.id, previous

        self.db_uuid = _checked_uuid(self.db.ensure_info().uuid)
        try:
            self.video_id, previous = self.db.write(work)
        except IntegrityError:
            raise ReidAppError(
                f"video {video.source} (camera {self.options.camera}) is being ingested by another process right now"
            ) from None
        summary.video_id = self.video_id
        if previous == VIDEO_COMPLETE:
            summary.status = "already ingested"
            summary.notes.append(
                f"video {video.source} (sha256 {sha256[:12]}) is already ingested for camera "
                f"{self.options.camera} (video id {self.video_id}): nothing added"
            )
        elif previous == VIDEO_INGESTING:
            summary.status = "redone after an interrupted run"
            finish_file_deletions(self.db)  # thumbnail files of a killed run of an older version
            summary.notes.append(
                f"video id {self.video_id} was left unfinished by an interrupted run: its partial rows were "
                "deleted and the video is processed again from the start"
            )
        return previous

    def _process(self, video: VideoSource, summary: IngestSummary) -> None:
        started = time.perf_counter()
        step = sample_step(video.fps, self.config.sample_fps)
        tracker = PersonTracker(frame_rate=video.fps / step)
        selector = TrackCropSelector(max_crops=self.config.crops_per_track)
        max_age = math.ceil((DEFAULT_LOST_TRACK_SECONDS + TRACK_END_MARGIN_S) * video.fps)
        frames_total = math.ceil(video.frame_count / step) if video.frame_count else None
        if self.options.max_frames is not None:
            frames_total = min(frames_total or self.options.max_frames, self.options.max_frames)
        pending: list[TrackCrops] = []
        last_frame_index, first_ts, last_ts = -1, None, 0.0
        # A stream's frame numbers start again at each connection: ``offset`` keeps them increasing;
        # and so do its tracker's ids: ``id_offset`` keeps them unique within the video.
        offset, drops, id_offset, last_id = 0, 0, 0, 0
        stream_started = time.monotonic()
        watch, watch_read_at = watch_vectors(self.db), time.monotonic()
        recheck_frames = max(1, round(WATCH_RECHECK_S * video.fps))
        # A stream has no end: Ctrl-C (or SIGTERM) ends its ingest normally (what was seen is stored
        # and the video marked complete); when it drops, the ingest reconnects with back-off. For a
        # file, Ctrl-C interrupts the run like a kill (redone next time).
        try:
            while True:
                done = False
                for frame in video.iter_frames(sample_fps=self.config.sample_fps):
                    drops = 0
                    index = frame.index + offset
                    timestamp = index / video.fps
                    first_ts = timestamp if first_ts is None else first_ts
                    last_ts, last_frame_index = timestamp, index
                    tracked = tracker.update(self.detector.detect(frame.image), frame.image)
                    if id_offset:
                        tracked = [d.with_track_id(d.track_id + id_offset) if d.track_id else d for d in tracked]
                    last_id = max([last_id, *(d.track_id for d in tracked if d.track_id is not None)])
                    summary.person_detections += len(tracked)
                    selector.add(index, timestamp, frame.image, tracked)
                    pending.extend(self._ended(selector.finished_tracks(index, max_age)))
                    summary.sampled_frames += 1
                    if time.monotonic() - watch_read_at > WATCH_REFRESH_S:
                        watch, watch_read_at = self._reread_watchlist(watch), time.monotonic()
                    if watch is not None:
                        pending.extend(self._watch_cuts(selector, watch, index, recheck_frames))
                    # With someone on the watchlist a finished (or cut) track is committed at once (its
                    # alert waits for its commit), else every ``commit_every_frames`` frames.
                    if summary.sampled_frames % self.config.commit_every_frames == 0 or (pending and watch is not None):
                        self._commit(pending, index, summary, final=False)
                        pending = []
                    self._report(summary, frames_total)
                    if self.options.max_frames is not None and summary.sampled_frames >= self.options.max_frames:
                        done = True
                        break
                if done or not video.is_stream:
                    break
                # The stream dropped: the tracks seen so far end here (a person still in view after the
                # reconnection is a new track, never a duplicate of a stored one), then try again.
                pending.extend(self._ended(selector.flush()))
                self._commit(pending, last_frame_index, summary, final=False)
                pending = []
                tracker = PersonTracker(frame_rate=video.fps / step)
                id_offset = last_id
                selector = TrackCropSelector(max_crops=self.config.crops_per_track)
                drops += 1
                delay = min(RECONNECT_MAX_S, 2.0 ** (drops - 1))
                why = video.stopped_early or f"stream {video.source} ended"
                logger.warning("%s; reconnecting in %.0f s", why, delay)
                video.close()
                time.sleep(delay)
                # Frame numbers (hence times) keep counting through the outage: the next frame is
                # numbered by the wall-clock time since the stream's first frame.
                elapsed = time.monotonic() - stream_started
                offset = max(last_frame_index + step, math.ceil(elapsed * video.fps / step) * step)
        except KeyboardInterrupt:
            if not video.is_stream:
                raise
            summary.notes.append(f"stream {video.source}: stopped by the operator; what was seen is stored")
            video.stopped_early = None
        pending.extend(self._ended(selector.flush()))
        summary.stopped_early = video.stopped_early
        self._commit(pending, last_frame_index, summary, final=True)
        self._report(summary, frames_total)
        summary.elapsed_s = time.perf_counter() - started
        summary.video_seconds = (last_ts - (first_ts or 0.0)) + step / video.fps if first_ts is not None else 0.0

    def _reread_watchlist(self, current: WatchVectors | None) -> WatchVectors | None:
        """The watchlist now; the one read before if the database cannot answer this time (a
        long stream must not end, and lose its rows, over a passing database error)."""
        try:
            return watch_vectors(self.db)
        except SQLAlchemyError as exc:
            logger.warning("could not read the watchlist again (%s); keeping the previous one", type(exc).__name__)
            return current

    def _ended(self, tracks: list[TrackCrops]) -> list[TrackCrops]:
        """Tracks that ended: their early-check state goes with them."""
        for track in tracks:
            self._checked_at.pop(track.track_id, None)
            self._alerted.discard(track.track_id)
        return tracks

    def _watch_cuts(
        self, selector: TrackCropSelector, watch: WatchVectors, frame_index: int, recheck_frames: int
    ) -> list[TrackCrops]:
        """Open tracks that already match the watchlist, cut to be committed (and alerted) now."""
        cuts = []
        for track_id in selector.open_track_ids:
            checked = self._checked_at.get(track_id)
            if track_id in self._alerted or (checked is not None and frame_index - checked < recheck_frames):
                continue
            segment = selector.peek(track_id)
            if segment.num_detections < WATCH_MIN_DETECTIONS:
                continue
            self._checked_at[track_id] = frame_index
            matched = watch.matches(pooled_embedding(self._track_vectors([segment])[0]))
            # Only the crops chosen now stay cached: a long open track does not pile up vectors.
            cached = self._crop_vectors[track_id]
            self._crop_vectors[track_id] = {c.frame_index: cached[c.frame_index] for c in segment.crops}
            if matched:
                self._alerted.add(track_id)
                cuts.append(selector.cut(track_id))
        return cuts

    def _track_vectors(self, tracks: list[TrackCrops]) -> list[np.ndarray]:
        """Each track's crop vectors, embedding (in one batch) only crops not embedded before."""
        missing = [
            (track.track_id, crop) for track in tracks for crop in track.crops
            if crop.frame_index not in self._crop_vectors.get(track.track_id, {})
        ]  # fmt: skip
        if missing:
            cameras = [self.options.camera] * len(missing)  # an adapted model centres by camera
            vectors = self.embedder.embed([crop.image for _, crop in missing], cameras=cameras)
            for (track_id, crop), vector in zip(missing, vectors, strict=True):
                self._crop_vectors.setdefault(track_id, {})[crop.frame_index] = vector
        empty = np.zeros((0, self.embedder.dim), dtype=np.float32)
        return [
            np.stack([self._crop_vectors[t.track_id][c.frame_index] for c in t.crops]) if t.crops else empty
            for t in tracks
        ]

    def _report(self, summary: IngestSummary, frames_total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(
                IngestProgress(
                    summary.sampled_frames, frames_total, summary.person_detections, summary.crops, summary.tracks
                )
            )

    def _commit(self, finished: list[TrackCrops], frame_index: int, summary: IngestSummary, *, final: bool) -> None:
        """Embed the finished tracks and store them with their vectors in one transaction."""
        crops = [c for track in finished for c in track.crops]
        per_track = self._track_vectors(finished)
        for track in finished:  # committed: a later segment of the same id has later frames
            self._crop_vectors.pop(track.track_id, None)
        rows: list[tuple[TrackCrops, np.ndarray, list[bytes]]] = []
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.config.thumbnail_jpeg_quality]
        max_side, input_size = self.config.thumbnail_max_side, self.embedder.input_size
        for track, track_vectors in zip(finished, per_track, strict=True):
            jpegs = []
            for crop in track.crops:
                # At least what the embedder's input took of it: what `reid-app reembed` needs.
                side = stored_crop_side(max_side, input_size, crop.image.shape[:2])
                ok, encoded = cv2.imencode(".jpg", thumbnail_image(crop.image, side), quality)
                if not ok:
                    raise ReidAppError(f"cannot encode the thumbnail of a crop of frame {crop.frame_index}")
                jpegs.append(encoded.tobytes())
            rows.append((track, track_vectors, jpegs))

        def work(session: Session) -> None:
            claims.check_held(session, self.video_id, self.owner)
            if rows:
                self._record_model(session)
            video = session.get(Video, self.video_id)
            committed: list[tuple[Track, np.ndarray, Video]] = []
            for track, track_vectors, jpegs in rows:
                track_row = Track(
                    video_id=self.video_id,
                    camera_id=self.options.camera,
                    tracker_id=track.track_id,
                    first_frame=track.first_frame,
                    last_frame=track.last_frame,
                    first_timestamp_s=track.first_timestamp_s,
                    last_timestamp_s=track.last_timestamp_s,
                    num_crops=len(track.crops),
                    embedding=vector_to_bytes(pooled_embedding(track_vectors)),
                )
                session.add(track_row)
                session.flush()
                detections = []
                for crop, vector in zip(track.crops, track_vectors, strict=True):
                    x1, y1, x2, y2 = (float(v) for v in crop.bbox)
                    detections.append(
                        Detection(
                            track_id=track_row.id,
                            video_id=self.video_id,
                            camera_id=self.options.camera,
                            frame_index=crop.frame_index,
                            timestamp_s=crop.timestamp_s,
                            x1=x1,
                            y1=y1,
                            x2=x2,
                            y2=y2,
                            score=float(crop.score),
                            thumbnail_path="",  # empty: the thumbnail is the row of the thumbnails table
                            embedding=vector_to_bytes(vector),
                        )
                    )
                session.add_all(detections)
                session.flush()
                session.add_all(
                    Thumbnail(detection_id=row.id, jpeg=jpeg) for row, jpeg in zip(detections, jpegs, strict=True)
                )
                committed.append((track_row, pooled_embedding(track_vectors), video))
            # Watchlist alerts in this same transaction: a committed track has its alerts, whatever is killed when.
            raised[0] = alerts_for_tracks(session, committed)
            video.last_committed_frame = frame_index
            if final:
                drop_unmatched_alerts(session, self.video_id)
                video.status = VIDEO_COMPLETE
                video.completed_at = utc_now()
                claims.release(session, self.video_id, self.owner)

        raised = [0]  # set by the transaction that commits (a retried one sets it again)
        self.db.write(work)
        summary.alerts += raised[0]
        if raised[0] and self.deliverer is not None:
            self.deliverer.wake()
        self.completed = final
        summary.tracks += len(rows)
        summary.crops += len(crops)
        if final:
            # The index is derived from the database (searches re-sync it first): bringing it up to
            # date once per video avoids rewriting the whole index file after every batch.
            self.indexes.sync_all()

    def _record_model(self, session: Session) -> None:
        """Tie the database to this run's model, in the transaction of its vectors. Checked again
        here: another ingest may have stored vectors of another model since this one was claimed."""
        info = session.get(DatabaseInfo, 1)
        embedder = self.embedder
        check_model_identity(info, embedder.model_name, embedder.weights_sha256, embedder.dim)
        if info.model_name is None:
            info.model_name = embedder.model_name
            info.model_weights_sha256 = embedder.weights_sha256
            info.model_dim = embedder.dim
            info.model_is_trained = bool(embedder.is_trained)

    def _discard(self) -> None:
        """Undo a failed run: its rows, video row and index vectors; nothing when another process
        has taken the video over (its rows are that one's now)."""
        if self.db is None or self.video_id is None:
            return
        video_id = self.video_id

        def work(session: Session) -> None:
            # Ours to undo while we hold the claim, or once we completed the video (the completing
            # commit released it); never when another process took the video over.
            ours = claims.holds(session, video_id, self.owner)
            if not (ours or (self.completed and claims.unclaimed(session, video_id))):
                return
            _delete_video_rows(session, video_id, delete_video=True)
            if count_rows(session, Track) == 0 and count_rows(session, Detection) == 0:
                # No vector of any model is left: the next ingest may bring other weights.
                info = session.get(DatabaseInfo, 1)
                info.model_name = info.model_weights_sha256 = info.model_dim = info.model_is_trained = None

        self.db.write(work)
        self.indexes.sync_all()


def ingest_video(
    config: AppConfig,
    options: IngestOptions,
    *,
    embedder: Any,
    detector: Any,
    on_progress: Callable[[IngestProgress], None] | None = None,
    source: VideoSource | None = None,
) -> IngestSummary:
    """Ingest ``options.video`` as camera ``options.camera`` (see the module docstring).
    ``source``: the video already opened with :func:`reid_app.video.open_video`, if it was."""
    return _Ingest(config, options, embedder, detector, on_progress, source).run()


# -- models, shared by `ingest` and `search` -----------------------------------------------------
def load_embedder(config: AppConfig, warn: Callable[[str], None] | None = None) -> Any:
    """The FA-Net embedder for ``config.weights`` (a path, "untrained", or None: the default file)
    on ``config.backend``; a missing weights file is a one-line error. ``warn`` receives the line
    said when the backend falls back to PyTorch (default: the log)."""
    from fanet.checkpoint import CheckpointError
    from fanet.weights import WeightsNotFoundError
    from reid_app.embed import Embedder

    try:
        return Embedder(
            config.weights, device=config.device, batch_size=config.embed_batch_size, backend=config.backend,
            int8=config.int8,
            **({"warn": warn} if warn is not None else {}),
        )  # fmt: skip
    except CheckpointError as exc:  # e.g. an input size in its metadata that cannot be used
        raise ReidAppError(f"{config.weights}: {exc}") from None
    except (WeightsNotFoundError, FileNotFoundError) as exc:
        raise ReidAppError(str(exc).splitlines()[0] if str(exc) else f"embedder weights not found: {exc}") from None


def load_detector(detector_weights: str | None, device: str, backend: str = "auto") -> Any:
    """The person detector (see :func:`reid_app.detect.build_detector`) on ``backend``'s runtime."""
    from reid_app.detect import DetectorConfig, build_detector

    return build_detector(DetectorConfig(weights=detector_weights, device=device, backend=backend))
