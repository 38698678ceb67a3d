"""Read-only use cases over what is stored: the cameras overview (``reid-app stats``), tracks and
their crops, thumbnails and full video frames by database id, and track time spans for the
"where was this person seen" timeline. The CLI commands and the HTTP server both call these;
neither queries the database itself.

Everything is addressed by database id. A thumbnail or video path is read from its row, never
taken from a request, and a thumbnail row that points outside the data folder is treated as no
thumbnail (:mod:`reid_app.thumbnails`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

import cv2
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from reid_app.backends import InferenceBackend, backend_summary
from reid_app.config import AppConfig
from reid_app.index import INDEX_KINDS, INDEX_TYPE_IVF, IndexManager
from reid_app.search import model_dict
from reid_app.store import Database, Detection, Track, Video, as_utc, require_nonempty
from reid_app.thumbnails import JPEG_MAGIC
from reid_app.thumbnails import thumbnail_bytes as stored_thumbnail_bytes

_Row = TypeVar("_Row", Track, Detection)

#: Most rows one listing returns (``limit``); paging goes on with ``offset``.
MAX_PAGE = 1000
FRAME_JPEG_QUALITY = 85
BOX_COLOUR = (0, 140, 255)  # BGR orange: visible on most scenes


class NotFound(LookupError):
    """No row with that id (or its file is gone): a 404 for the server, one line for the CLI."""


def collect_stats(
    config: AppConfig,
    db: Database | None = None,
    indexes: IndexManager | None = None,
    backend: InferenceBackend | None = None,
) -> dict[str, Any]:
    """Per-camera counts and time spans, the model identity, the index types and the inference
    backend (``backend``: the one running, e.g. the server's; None: what ``auto`` picks here)."""
    db = db or Database(config)
    info = require_nonempty(db)
    indexes = indexes or IndexManager(db, config)
    # How far this host's index was behind the shared database (rows other hosts added or deleted
    # since its last sync), then caught up.
    synced, catch_up = {}, {}
    for kind in INDEX_KINDS:
        synced[kind], report = indexes.sync(kind)
        catch_up[kind] = {
            "rows_behind": report.behind_rows,
            "deletions_behind": report.behind_deletions,
            "rebuilt": report.rebuilt,
            "seconds": round(report.seconds, 3),
        }
    cameras: dict[int, dict[str, Any]] = {}
    with db.read() as session:
        for video in session.scalars(select(Video).order_by(Video.camera_id, Video.id)):
            entry = cameras.setdefault(
                video.camera_id,
                {
                    "camera": video.camera_id,
                    "videos": 0,
                    "incomplete_videos": 0,
                    "tracks": 0,
                    "detections": 0,
                    "first_seen": None,
                    "last_seen": None,
                },
            )
            entry["videos"] += 1
            entry["incomplete_videos"] += video.status != "complete"
            start = as_utc(video.start_time)
            span = session.execute(
                select(func.min(Track.first_timestamp_s), func.max(Track.last_timestamp_s)).where(
                    Track.video_id == video.id
                )
            ).one()
            if span[0] is not None:
                first, last = start + timedelta(seconds=span[0]), start + timedelta(seconds=span[1])
                entry["first_seen"] = min(filter(None, [entry["first_seen"], first]))
                entry["last_seen"] = max(filter(None, [entry["last_seen"], last]))
        for model, key in ((Track, "tracks"), (Detection, "detections")):
            for camera_id, count in session.execute(select(model.camera_id, func.count()).group_by(model.camera_id)):
                if camera_id in cameras:  # rows of a video deleted since the loop above are skipped
                    cameras[camera_id][key] = count
        identities = session.scalar(select(func.count(func.distinct(Track.identity_id))))
    for entry in cameras.values():
        for key in ("first_seen", "last_seen"):
            entry[key] = entry[key].isoformat() if entry[key] is not None else None
    index_info = {}
    for kind, gallery in synced.items():
        meta = gallery.meta
        index_info[kind] = {
            "type": meta["type"],
            "vectors": gallery.ntotal,
            "ivf_threshold": config.ivf_threshold,
            "index_folder": str(indexes.index_dir),
            "was_behind": catch_up[kind],
            **(
                {k: meta.get(k) for k in ("nlist", "nprobe", "k_factor", "reduced_dim", "recall_at_10")}
                if meta["type"] == INDEX_TYPE_IVF
                else {}
            ),
        }
    return {
        "database": config.safe_db_url,
        "model": model_dict(info),
        "inference": backend_summary(backend),
        "cameras": [cameras[c] for c in sorted(cameras)],
        "indexes": index_info,
        "identities": {
            "count": identities or 0,
            "threshold": info.identity_threshold,
            "computed_at": as_utc(info.identities_computed_at).isoformat() if info.identities_computed_at else None,
        },
    }


def _at(video: Video, seconds: float) -> str:
    """A row's offset into its video as absolute UTC time (ISO 8601)."""
    return (as_utc(video.start_time) + timedelta(seconds=seconds)).isoformat()


def detection_dict(detection: Detection, video: Video) -> dict[str, Any]:
    return {
        "detection_id": detection.id,
        "track_id": detection.track_id,
        "camera": detection.camera_id,
        "video_id": detection.video_id,
        "frame_index": detection.frame_index,
        "timestamp_s": round(detection.timestamp_s, 3),
        "time": _at(video, detection.timestamp_s),
        "bbox": [round(v, 1) for v in detection.bbox],
        "score": round(detection.score, 4),
    }


def track_dict(track: Track, video: Video, detections: list[Detection] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "track_id": track.id,
        "camera": track.camera_id,
        "video_id": track.video_id,
        "video_path": video.path,
        "identity_id": track.identity_id,
        "first_frame": track.first_frame,
        "last_frame": track.last_frame,
        "start": _at(video, track.first_timestamp_s),
        "end": _at(video, track.last_timestamp_s),
        "num_crops": track.num_crops,
    }
    if detections is not None:
        out["detections"] = [detection_dict(d, video) for d in detections]
    return out


def list_tracks(
    db: Database,
    *,
    cameras: list[int] | None = None,
    identity_id: int | None = None,
    ids: list[int] | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Tracks ordered by start time (then id), filtered by camera, identity or ids: the rows of a
    timeline. ``limit`` is capped at MAX_PAGE."""
    limit = max(0, min(limit, MAX_PAGE))
    query = select(Track, Video).join(Video, Track.video_id == Video.id)
    if cameras:
        query = query.where(Track.camera_id.in_(cameras))
    if identity_id is not None:
        query = query.where(Track.identity_id == identity_id)
    if ids is not None:
        query = query.where(Track.id.in_(ids[:MAX_PAGE]))
    with db.read() as session:
        rows = session.execute(query.order_by(Track.id).offset(max(0, offset)).limit(limit)).all()
    tracks = [track_dict(track, video) for track, video in rows]
    return sorted(tracks, key=lambda t: (t["start"], t["track_id"]))


def track_detail(db: Database, track_id: int) -> dict[str, Any]:
    """One track with all its stored crops (the "track's other crops" of a search hit)."""
    with db.read() as session:
        track, video = _row_and_its_video(session, Track, track_id, "track")
        detections = list(
            session.scalars(select(Detection).where(Detection.track_id == track_id).order_by(Detection.frame_index))
        )
    return track_dict(track, video, detections)


def _row_and_its_video(session: Session, table: type[_Row], row_id: int, what: str) -> tuple[_Row, Video]:
    """A track or detection row and its video; NotFound when either is missing (a row whose
    video was deleted is as gone as the video)."""
    row = session.get(table, row_id)
    video = session.get(Video, row.video_id) if row is not None else None
    if row is None or video is None:
        raise NotFound(f"no {what} with id {row_id}")
    return row, video


def _detection_and_video(db: Database, detection_id: int) -> tuple[Detection, Video]:
    with db.read() as session:
        return _row_and_its_video(session, Detection, detection_id, "detection")


def detection_detail(db: Database, detection_id: int) -> dict[str, Any]:
    detection, video = _detection_and_video(db, detection_id)
    return detection_dict(detection, video)


def thumbnail_bytes(config: AppConfig, db: Database, detection_id: int) -> bytes:
    """The stored JPEG thumbnail of a detection, by database id (in the database, or an older
    row's file inside the data folder: :mod:`reid_app.thumbnails` knows which)."""
    _detection_and_video(db, detection_id)  # NotFound for an unknown id
    data = stored_thumbnail_bytes(db, detection_id)
    if data is None:
        raise NotFound(f"detection {detection_id} has no stored thumbnail")
    if not data.startswith(JPEG_MAGIC):
        raise NotFound(f"the thumbnail of detection {detection_id} is not a JPEG thumbnail")
    return data


def frame_jpeg(db: Database, detection_id: int, max_side: int = 1280) -> bytes:
    """The full video frame of a detection with its box drawn, read from the stored video now.
    A stream (RTSP/HTTP) or a video file that is gone or no longer decodes there: NotFound."""
    detection, video = _detection_and_video(db, detection_id)
    if "://" in video.path:
        raise NotFound(f"detection {detection_id} comes from a stream: its frames are not stored")
    capture = cv2.VideoCapture(video.path)
    try:
        if not capture.isOpened():
            raise NotFound(f"the video of detection {detection_id} cannot be opened any more")
        capture.set(cv2.CAP_PROP_POS_FRAMES, detection.frame_index)
        ok, frame = capture.read()
    finally:
        capture.release()
    if not ok or frame is None:
        raise NotFound(f"frame {detection.frame_index} of the video of detection {detection_id} cannot be read")
    x1, y1, x2, y2 = (round(v) for v in detection.bbox)
    thickness = max(2, round(max(frame.shape[:2]) / 300))
    cv2.rectangle(frame, (x1, y1), (x2 - 1, y2 - 1), BOX_COLOUR, thickness)
    if max(frame.shape[:2]) > max_side:
        scale = max_side / max(frame.shape[:2])
        frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)))
    ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, FRAME_JPEG_QUALITY])
    if not ok:
        raise NotFound(f"the frame of detection {detection_id} cannot be encoded")
    return encoded.tobytes()
