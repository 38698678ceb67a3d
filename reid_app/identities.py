"""Cross-camera identities: group stored tracks that show the same person.

Agglomerative clustering of the tracks' pooled embeddings with cosine distance (1 - cosine
similarity). ``average`` linkage (default) merges two clusters while the mean distance between
their tracks is at most the threshold; ``complete`` linkage needs every pair within it.
Two tracks seen at the same time in the same video are different people: they can never end up
in one identity (their distance is set to infinity, which linkage carries to their clusters).

Each run recomputes every track's ``identity_id`` (1, 2, ... in order of first track id) and
records the threshold in the database. Memory is O(N²) in the number of tracks (4 bytes per pair:
10k tracks = 400 MB).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from reid_app.errors import ReidAppError
from reid_app.store import Database, DatabaseInfo, Track, Video, as_utc, bytes_to_vectors, require_nonempty, utc_now

Linkage = Literal["average", "complete"]


def agglomerative_clusters(
    vectors: np.ndarray, threshold: float, linkage: Linkage = "average", cannot_link: np.ndarray | None = None
) -> np.ndarray:
    """Cluster labels (0..K-1) of unit ``vectors`` by agglomerative clustering on cosine distance.

    ``cannot_link`` is an optional boolean (N, N) matrix of pairs that must stay apart.
    Uses the cached nearest-neighbour scheme: for average and complete linkage a merged
    cluster is never closer to a third cluster than the nearer of its two parts was, so only rows
    whose nearest neighbour took part in the merge need a new row minimum.
    """
    count = len(vectors)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    distance = (1.0 - vectors @ vectors.T).astype(np.float32)
    if cannot_link is not None:
        distance[cannot_link] = np.inf
    np.fill_diagonal(distance, np.inf)
    sizes = np.ones(count, dtype=np.float32)
    members: dict[int, list[int]] = {i: [i] for i in range(count)}
    nearest = distance.argmin(axis=1)
    nearest_distance = distance[np.arange(count), nearest]
    while True:
        first = int(nearest_distance.argmin())
        if not nearest_distance[first] <= threshold:
            break
        second = int(nearest[first])
        if linkage == "average":
            with np.errstate(invalid="ignore"):
                merged = (sizes[first] * distance[first] + sizes[second] * distance[second]) / (
                    sizes[first] + sizes[second]
                )
        else:
            merged = np.maximum(distance[first], distance[second])
        merged[np.isnan(merged)] = np.inf
        distance[first, :] = merged
        distance[:, first] = merged
        distance[first, first] = np.inf
        distance[second, :] = np.inf
        distance[:, second] = np.inf
        sizes[first] += sizes[second]
        members[first].extend(members.pop(second))
        nearest_distance[second] = np.inf
        stale = np.flatnonzero(((nearest == first) | (nearest == second)) & np.isfinite(nearest_distance))
        for row in {first, *stale.tolist()}:
            nearest[row] = distance[row].argmin()
            nearest_distance[row] = distance[row, nearest[row]]
    labels = np.empty(count, dtype=np.int64)
    for label, rows in enumerate(sorted(members.values(), key=min)):
        labels[rows] = label
    return labels


@dataclass
class Appearance:
    camera: int
    start: datetime
    end: datetime
    tracks: int = 1


@dataclass
class IdentitySummary:
    identity_id: int
    track_ids: list[int] = field(default_factory=list)
    appearances: list[Appearance] = field(default_factory=list)

    @property
    def cameras(self) -> list[int]:
        return sorted({a.camera for a in self.appearances})


def _cannot_link(tracks: list[Track]) -> np.ndarray:
    """Pairs of tracks of the same video whose frame ranges overlap."""
    video = np.array([t.video_id for t in tracks])
    first = np.array([t.first_frame for t in tracks])
    last = np.array([t.last_frame for t in tracks])
    same_video = video[:, None] == video[None, :]
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    together = same_video & overlap
    np.fill_diagonal(together, False)
    return together


def compute_identities(db: Database, threshold: float, linkage: Linkage = "average") -> list[IdentitySummary]:
    """Cluster all tracks, store their identity ids, and summarise each identity."""
    if not 0.0 <= threshold <= 2.0:
        raise ReidAppError(f"--threshold is a cosine distance in [0, 2], got {threshold}")
    info = require_nonempty(db)
    dim = int(info.model_dim or 0)
    with db.read() as session:
        tracks = list(session.scalars(select(Track).order_by(Track.id)))
        videos = {v.id: v for v in session.scalars(select(Video))}
    tracks = [t for t in tracks if t.video_id in videos]  # a track whose video row is gone has no time
    vectors = bytes_to_vectors([t.embedding for t in tracks], dim)
    labels = agglomerative_clusters(vectors, threshold, linkage, _cannot_link(tracks))
    identity_of = {t.id: int(label) + 1 for t, label in zip(tracks, labels, strict=True)}

    def store(session: Session) -> None:
        session.execute(update(Track).values(identity_id=None))
        by_identity: dict[int, list[int]] = defaultdict(list)
        for track_id, identity_id in identity_of.items():
            by_identity[identity_id].append(track_id)
        for identity_id, track_ids in by_identity.items():
            for start in range(0, len(track_ids), 900):
                session.execute(
                    update(Track).where(Track.id.in_(track_ids[start : start + 900])).values(identity_id=identity_id)
                )
        db_info = session.get(DatabaseInfo, 1)
        db_info.identity_threshold = threshold
        db_info.identities_computed_at = utc_now()

    db.write(store)
    return summarise(tracks, videos, identity_of)


def summarise(tracks: list[Track], videos: dict[int, Video], identity_of: dict[int, int]) -> list[IdentitySummary]:
    summaries: dict[int, IdentitySummary] = {}
    for track in tracks:
        identity_id = identity_of[track.id]
        summary = summaries.setdefault(identity_id, IdentitySummary(identity_id))
        summary.track_ids.append(track.id)
        start_time = as_utc(videos[track.video_id].start_time)
        start = start_time + timedelta(seconds=track.first_timestamp_s)
        end = start_time + timedelta(seconds=track.last_timestamp_s)
        summary.appearances.append(Appearance(camera=track.camera_id, start=start, end=end))
    for summary in summaries.values():
        summary.appearances = _merge_appearances(summary.appearances)
    return sorted(summaries.values(), key=lambda s: (-len(s.cameras), -len(s.track_ids), s.identity_id))


def _merge_appearances(appearances: list[Appearance]) -> list[Appearance]:
    """One line per camera and overlapping (or touching) time span."""
    merged: list[Appearance] = []
    for item in sorted(appearances, key=lambda a: (a.camera, a.start)):
        last = merged[-1] if merged else None
        if last is not None and last.camera == item.camera and item.start <= last.end + timedelta(seconds=1):
            last.end = max(last.end, item.end)
            last.tracks += 1
        else:
            merged.append(Appearance(item.camera, item.start, item.end))
    return sorted(merged, key=lambda a: a.start)


def stored_identities(db: Database) -> list[IdentitySummary]:
    """The identities the last ``reid-app identities`` run stored, summarised (read only): tracks
    ingested since then have no identity and are left out."""
    with db.read() as session:
        tracks = list(session.scalars(select(Track).where(Track.identity_id.is_not(None)).order_by(Track.id)))
        videos = {v.id: v for v in session.scalars(select(Video))}
    tracks = [t for t in tracks if t.video_id in videos]
    return summarise(tracks, videos, {t.id: int(t.identity_id) for t in tracks})


def identities_payload(
    summaries: list[IdentitySummary], threshold: float | None, linkage: str | None, trained: bool
) -> dict[str, Any]:
    """The JSON of ``reid-app identities --json`` and of the HTTP API (one serialiser for both)."""
    return {
        "threshold": threshold,
        "linkage": linkage,
        "matches_are_meaningful": trained,
        "identities": [
            {
                "identity_id": s.identity_id,
                "cameras": s.cameras,
                "track_ids": s.track_ids,
                "appearances": [
                    {"camera": a.camera, "start": a.start.isoformat(), "end": a.end.isoformat(), "tracks": a.tracks}
                    for a in s.appearances
                ],
            }
            for s in summaries
        ],
    }
