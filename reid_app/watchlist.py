"""The live watchlist: "tell me when this person appears again" (issue 22, item 2).

* **Entries** (:class:`reid_app.store.WatchEntry`): a name, the person's vector under the database's
  model (from a query image, or the mean of a case's confirmed tracks), a similarity threshold, and
  optionally a webhook URL and its signing secret.
* **Alerts are made in the ingest's own transaction** (:func:`alerts_for_tracks`, called by
  :mod:`reid_app.ingest` as it commits tracks): a committed track has its alerts, an uncommitted one
  has none, whatever is killed when. An ingest does not wait for a watched person to leave the
  view: it compares each open track with the watchlist once the tracker has confirmed it, and
  commits a matching track at once (the rest of it follows as a later segment). One appearance
  (a video's tracker id) alerts once per entry, through its segments and through the redo of an
  interrupted ingest (which moves the alert to the track made again instead of raising another).
  An ingest that stops on an error (not a kill) discards its video's rows, alerts with them: its
  rerun alerts again.
* **Delivery** (:func:`deliver_due`, run by every ingest and by ``reid-app serve`` in the
  background, and by ``reid-app watch deliver``): each alert not yet delivered is POSTed as JSON
  (alert id, name, camera, time, score, thumbnail URL) with ``X-Reid-Signature: sha256=<HMAC-SHA256
  of the body with the entry's secret>`` and ``X-Reid-Alert-Id``. A 2xx answer marks it delivered;
  anything else is retried with exponential back-off (2 s, 4 s, ... up to 5 min). A deliverer takes
  an alert by moving its next attempt past a lease first, so two deliverers (two hosts, a server and
  an ingest) never post it at once. Nothing is lost across a restart of either side: undelivered
  alerts stay in the database until a 2xx. A kill between the receiver's 2xx and the database
  update posts that alert again: receivers drop repeats by ``X-Reid-Alert-Id`` (at-least-once, as
  every webhook sender).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import inspect, select, update
from sqlalchemy.orm import Session

from reid_app import audit
from reid_app.errors import ReidAppError
from reid_app.search import best_detections
from reid_app.store import (
    Alert,
    AuditEntry,
    Database,
    DatabaseInfo,
    Track,
    Video,
    WatchEntry,
    as_utc,
    bytes_to_vectors,
    require_nonempty,
    utc_now,
    vector_to_bytes,
)

SIGNATURE_HEADER = "X-Reid-Signature"
ALERT_ID_HEADER = "X-Reid-Alert-Id"
#: Seconds a deliverer holds an alert while posting it (another deliverer leaves it alone).
DELIVERY_LEASE_S = 30.0
BACKOFF_S = (2, 4, 8, 16, 32, 64, 128, 300)
POST_TIMEOUT_S = 5.0
#: Alerts taken per round: all of them are posted well within their lease, even if every post times out.
ALERTS_PER_ROUND = max(1, int(DELIVERY_LEASE_S / (2 * POST_TIMEOUT_S)))
#: Cosine similarity of an alert, for the shipped model: about 0.1 % of different-person crop pairs
#: reach it on cameras it never saw (weights/README.md); stricter per entry with --threshold.
DEFAULT_THRESHOLD = 0.5


def ensure_tables(db: Database) -> None:
    db.ensure_tables([WatchEntry.__table__, Alert.__table__, AuditEntry.__table__])


def add_watch(
    db: Database,
    name: str,
    vector: np.ndarray,
    model_sha256: str,
    threshold: float = DEFAULT_THRESHOLD,
    webhook_url: str = "",
    webhook_secret: str = "",
    by: str = "",
) -> int:
    if not 1 <= len(name.strip()) <= 200:
        raise ReidAppError("a watchlist name is 1 to 200 characters")
    if not -1.0 <= threshold <= 1.0:
        raise ReidAppError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    if webhook_url and not webhook_url.startswith(("http://", "https://")):
        raise ReidAppError(f"--webhook must be an http(s) URL, got {webhook_url[:60]!r}")
    info = require_nonempty(db)
    if info.model_weights_sha256 != model_sha256:
        raise ReidAppError("the watchlist vector must come from the database's own model (use its --weights)")
    ensure_tables(db)
    vector = np.asarray(vector, dtype=np.float32)
    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)

    def work(session: Session) -> int:
        current = session.get(DatabaseInfo, 1)
        if current is None or current.model_weights_sha256 != model_sha256:  # moved by a reembed meanwhile
            raise ReidAppError("the database's model changed while the entry was made: add it again")
        entry = WatchEntry(name=name.strip(), embedding=vector_to_bytes(vector), model_weights_sha256=model_sha256,
                           threshold=float(threshold), webhook_url=webhook_url, webhook_secret=webhook_secret,
                           active=True, created_at=utc_now(), created_by=by)  # fmt: skip
        session.add(entry)
        session.flush()
        audit.add(session, by, "watch.add", f"watch {entry.id}", name=entry.name, threshold=threshold,
                  webhook=bool(webhook_url))  # fmt: skip
        return entry.id

    return db.write(work)


def case_vector(db: Database, case_id: int) -> np.ndarray:
    """The mean of a case's confirmed tracks (what a case search queries with)."""
    from reid_app.cases import _verdicts  # noqa: PLC0415

    info = require_nonempty(db)
    with db.read() as session:
        confirmed = [t for t, v in _verdicts(session, case_id).items() if v.verdict == "confirmed"]
        blobs = session.scalars(select(Track.embedding).where(Track.id.in_(confirmed or [-1]))).all()
    if not blobs:
        raise ReidAppError(f"case {case_id} has no confirmed track to watch for")
    return bytes_to_vectors(list(blobs), int(info.model_dim)).mean(axis=0)


def remove_watch(db: Database, watch_id: int, by: str = "") -> None:
    ensure_tables(db)

    def work(session: Session) -> None:
        entry = session.get(WatchEntry, int(watch_id))
        if entry is None or not entry.active:
            raise ReidAppError(f"no watchlist entry {watch_id}")
        entry.active = False
        audit.add(session, by, "watch.remove", f"watch {entry.id}", name=entry.name)

    db.write(work)


def list_watches(db: Database) -> list[dict[str, Any]]:
    ensure_tables(db)
    info = db.info()
    current = info.model_weights_sha256 if info is not None else None
    with db.read() as session:
        entries = session.scalars(select(WatchEntry).where(WatchEntry.active).order_by(WatchEntry.id)).all()
        return [
            {"watch_id": e.id, "name": e.name, "threshold": e.threshold, "webhook": _shown_url(e.webhook_url),
             "created_at": as_utc(e.created_at).isoformat(), "stale": e.model_weights_sha256 != current}
            for e in entries
        ]  # fmt: skip


@dataclass(frozen=True)
class WatchVectors:
    """The active entries an ingest compares tracks with (those of the database's current model)."""

    vectors: np.ndarray  # one unit row per entry
    thresholds: np.ndarray

    @classmethod
    def of(cls, entries: list[WatchEntry], dim: int) -> WatchVectors:
        vectors = bytes_to_vectors([e.embedding for e in entries], dim)
        return cls(vectors, np.asarray([e.threshold for e in entries], dtype=np.float64))

    def passed(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each entry's score for a (pooled) track vector, and whether it reaches the entry's threshold:
        the one comparison for the early check and for the alerts (a cut track always gets its alert)."""
        scores = self.vectors @ (vector / max(float(np.linalg.norm(vector)), 1e-12))
        return scores, scores >= self.thresholds

    def matches(self, vector: np.ndarray) -> bool:
        return bool(np.any(self.passed(vector)[1]))


def prepare(db: Database) -> bool:
    """Whether a watchlist exists; one made by an older version is brought up to date (before an
    ingest touches alerts)."""
    with db.read() as session:
        if not inspect(session.connection()).has_table(WatchEntry.__tablename__):
            return False
    ensure_tables(db)
    return True


def watch_vectors(db: Database) -> WatchVectors | None:
    """The watchlist as an ingest reads it now; None when nobody is on it (tracks are then committed
    in batches and never checked early)."""
    if not prepare(db):
        return None
    with db.read() as session:
        entries = _current_entries(session)
        return WatchVectors.of(entries, len(entries[0].embedding) // 4) if entries else None


def _current_entries(session: Session) -> list[WatchEntry]:
    info = session.get(DatabaseInfo, 1)
    current = info.model_weights_sha256 if info is not None else None
    # Entries of another model (the database was reembedded since) cannot be compared: `watch list`
    # shows them as stale, to be added again.
    return list(session.scalars(
        select(WatchEntry).where(WatchEntry.active, WatchEntry.model_weights_sha256 == current)
    ).all())  # fmt: skip


def _shown_url(url: str) -> str:
    """A webhook URL without its credentials and query (which may carry a key)."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def alerts_for_tracks(session: Session, tracks: list[tuple[Track, np.ndarray, Video]]) -> int:
    """Alerts for just-added tracks (rows flushed in ``session``, the ingest's write transaction);
    returns how many are new. A database without a watchlist table has no watchlist.

    One appearance (a video's tracker id) alerts once per entry: the later segments of a track cut
    early for its alert raise none, and the redo of an interrupted ingest, which makes the same
    tracks again, moves the kept alert to its new track instead of raising (and posting) another."""
    if not tracks or not inspect(session.connection()).has_table(WatchEntry.__tablename__):
        return 0
    entries = _current_entries(session)
    if not entries:
        return 0
    watched = WatchVectors.of(entries, len(tracks[0][1]))
    now, made = utc_now(), 0
    for track, vector, video in tracks:
        scores, passed = watched.passed(vector)
        for entry, score, alerting in zip(entries, scores, passed, strict=True):
            if not alerting:
                continue
            appearance = (Alert.watch_id == entry.id, Alert.video_id == track.video_id,
                          Alert.tracker_id == track.tracker_id)  # fmt: skip
            if session.scalar(select(Alert.id).join(Track, Track.id == Alert.track_id).where(*appearance).limit(1)):
                continue  # a later segment of an appearance that already alerted
            kept = session.scalars(
                select(Alert).outerjoin(Track, Track.id == Alert.track_id)
                .where(*appearance, Alert.first_frame == track.first_frame, Track.id.is_(None))
            ).first()  # fmt: skip
            if kept is not None:  # kept through the redo of an interrupted ingest: this is its track now
                kept.track_id = track.id
                continue
            start = as_utc(video.start_time)
            session.add(Alert(watch_id=entry.id, track_id=track.id, camera_id=track.camera_id, score=float(score),
                              seen_at=start + timedelta(seconds=float(track.last_timestamp_s)),
                              first_seen_at=start + timedelta(seconds=float(track.first_timestamp_s)),
                              video_id=track.video_id, tracker_id=track.tracker_id, first_frame=track.first_frame,
                              created_at=now, attempts=0, next_attempt_s=0.0))  # fmt: skip
            audit.add(session, "ingest", "alert", f"watch {entry.id}", track_id=track.id,
                      score=round(float(score), 4))  # fmt: skip
            made += 1
    return made


def drop_unmatched_alerts(session: Session, video_id: int) -> int:
    """After a redo of ``video_id`` is complete: its kept alerts whose appearance was not made
    again and that no deliverer ever took go (nothing points at them, nobody was told). One that
    was taken may have reached its receiver: it stays, as the record of what was sent."""
    if not inspect(session.connection()).has_table(Alert.__tablename__):
        return 0
    orphans = session.scalars(
        select(Alert).outerjoin(Track, Track.id == Alert.track_id)
        .where(Alert.video_id == video_id, Track.id.is_(None), Alert.attempts == 0, Alert.next_attempt_s == 0.0)
    ).all()  # fmt: skip
    for alert in orphans:
        session.delete(alert)
    return len(orphans)


def alerts(db: Database, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Alerts with an id above ``after_id``, oldest first (what the page's live feed shows)."""
    ensure_tables(db)
    with db.read() as session:
        rows = session.execute(
            select(Alert, WatchEntry.name).join(WatchEntry, WatchEntry.id == Alert.watch_id)
            .where(Alert.id > after_id).order_by(Alert.id).limit(limit)
        ).all()  # fmt: skip
        best = {t: d.id for t, d in best_detections(session, [a.track_id for a, _ in rows]).items()}
        return [_payload(a, name, best.get(a.track_id)) for a, name in rows]


def _payload(alert: Alert, name: str, detection_id: int | None, base_url: str = "") -> dict[str, Any]:
    path = f"/api/v1/detections/{detection_id}/thumbnail"
    thumbnail = base_url.rstrip("/") + path if detection_id is not None else None
    first_seen = as_utc(alert.first_seen_at).isoformat() if alert.first_seen_at is not None else None
    return {"alert_id": alert.id, "watch_id": alert.watch_id, "name": name, "camera": alert.camera_id,
            "track_id": alert.track_id, "time": as_utc(alert.seen_at).isoformat(), "first_seen": first_seen,
            "score": round(alert.score, 4), "thumbnail_url": thumbnail,
            "delivered": alert.delivered_at is not None}  # fmt: skip


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver_due(db: Database, base_url: str = "", post: Callable[..., int] | None = None) -> int:
    """POST every alert that is due (module docstring); returns how many were delivered now."""
    post = post or _post
    now = db.server_time()
    due = (Alert.delivered_at.is_(None), Alert.next_attempt_s <= now, WatchEntry.webhook_url != "")
    with db.read() as session:  # most rounds find nothing: no write transaction for them
        if not inspect(session.connection()).has_table(Alert.__tablename__):
            return 0
    ensure_tables(db)  # a table of the first version gets its newer columns (checked once per process)
    with db.read() as session:
        # Only alerts whose track exists: one kept through the redo of an interrupted ingest waits
        # until the redo gives it its track again (or drops it).
        joined = (select(Alert.id).join(WatchEntry, WatchEntry.id == Alert.watch_id)
                  .join(Track, Track.id == Alert.track_id))  # fmt: skip
        if session.scalar(joined.where(*due).limit(1)) is None:
            return 0

    def take(session: Session) -> list[tuple[Alert, WatchEntry]]:
        rows = session.execute(
            select(Alert, WatchEntry).join(WatchEntry, WatchEntry.id == Alert.watch_id)
            .join(Track, Track.id == Alert.track_id)
            .where(*due).order_by(Alert.id).limit(ALERTS_PER_ROUND)
        ).all()  # fmt: skip
        for alert, _ in rows:
            alert.next_attempt_s = now + DELIVERY_LEASE_S  # taken: another deliverer leaves it alone
        session.flush()
        session.expunge_all()
        return [(alert, entry) for alert, entry in rows]

    taken = db.write(take)
    delivered = 0
    for alert, entry in taken:
        with db.read() as session:
            best = best_detections(session, [alert.track_id]).get(alert.track_id)
            detection = best.id if best is not None else None
        body = json.dumps(_payload(alert, entry.name, detection, base_url) | {"delivered": True}).encode()
        headers = {"Content-Type": "application/json", ALERT_ID_HEADER: str(alert.id)}
        if entry.webhook_secret:
            headers[SIGNATURE_HEADER] = signature(entry.webhook_secret, body)
        try:
            status, error = post(entry.webhook_url, body, headers), ""
        except (OSError, ValueError, http.client.HTTPException) as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"[:300]
        ok = 200 <= status < 300
        attempts = alert.attempts + 1
        retry_at = db.server_time() + BACKOFF_S[min(attempts - 1, len(BACKOFF_S) - 1)]
        values = {"attempts": attempts, "last_error": "" if ok else (error or f"HTTP {status}")}
        values |= {"delivered_at": utc_now()} if ok else {"next_attempt_s": retry_at}
        db.write(lambda session, values=values, alert_id=alert.id: session.execute(
            update(Alert).where(Alert.id == alert_id).values(**values)))  # fmt: skip
        delivered += ok
    return delivered


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook answers where it was configured: a redirect is not followed (it counts as a failure)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=POST_TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class Deliverer:
    """A background thread that runs :func:`deliver_due` every ``interval_s`` until stopped."""

    def __init__(self, db: Database, base_url: str = "", interval_s: float = 1.0) -> None:
        self.db, self.base_url, self.interval_s = db, base_url, interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reid-alert-delivery", daemon=True)

    def start(self) -> Deliverer:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Run a round now (an ingest just committed alerts): no wait for the next interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with contextlib.suppress(Exception):  # a failing round is retried next round; alerts stay stored
                deliver_due(self.db, self.base_url)
            self._wake.wait(self.interval_s)

    def stop(self) -> None:
        """Stop after one last round (what was committed last is delivered before the process ends)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=POST_TIMEOUT_S * 2)
        with contextlib.suppress(Exception):  # stored alerts are delivered by the next deliverer
            deliver_due(self.db, self.base_url)
