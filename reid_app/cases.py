"""Cases: an operator's investigation of one person — confirm, refine, follow (issue 22, item 1).

A case (:class:`reid_app.store.Case`) has a name, notes, and a verdict per track an operator has
looked at (:class:`reid_app.store.CaseTrack`): ``confirmed`` (the case's person) or ``rejected``
(not them). Everything is rows of the shared database, so a case survives restarts, works on
SQLite and PostgreSQL alike, and several operators can work on one case at once: each verdict is
one short write transaction (the last one on a track wins), and each answer reads the case afresh.

* **Search again** (:func:`search_case`): the query is every confirmed track's pooled vector,
  averaged and l2-normalised (the "query expansion" of re-ID retrieval: each confirmation adds the
  person's look from another camera or moment, so recall grows with each one). Tracks already
  confirmed or rejected are left out of the candidates.
* **Trajectory** (:func:`case_detail`): the confirmed tracks in time order, and nothing else;
  candidates are a separate list.
* **Export** (:func:`export_case`): the case as JSON with each confirmed track's best crop as a
  base64 JPEG, or as one self-contained HTML file (images inline, no script).
* A track deleted by ``prune``/``forget`` takes its verdicts with it (:func:`reid_app.store.delete_tracks`).
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from reid_app import audit
from reid_app.errors import ReidAppError
from reid_app.overview import NotFound, track_dict
from reid_app.search import best_detections
from reid_app.store import (
    AuditEntry,
    Case,
    CaseTrack,
    Database,
    Track,
    Video,
    bytes_to_vectors,
    require_nonempty,
    utc_now,
)
from reid_app.thumbnails import thumbnail_bytes

Verdict = Literal["confirmed", "rejected", "undecided"]
VERDICTS = ("confirmed", "rejected", "undecided")
MAX_NAME = 200
MAX_NOTES = 10000
MAX_CANDIDATES = 1000


def ensure_tables(db: Database) -> None:
    """The case tables and the audit trail's, on a database made before them (create_all skips
    existing ones)."""
    db.ensure_tables([Case.__table__, CaseTrack.__table__, AuditEntry.__table__])


def _check_text(name: str | None, notes: str | None) -> None:
    if name is not None and not 1 <= len(name.strip()) <= MAX_NAME:
        raise ReidAppError(f"a case name is 1 to {MAX_NAME} characters")
    if notes is not None and len(notes) > MAX_NOTES:
        raise ReidAppError(f"case notes are at most {MAX_NOTES} characters")


def create_case(db: Database, name: str, notes: str = "", confirmed: list[int] | None = None, by: str = "") -> int:
    """A new case, with ``confirmed`` tracks (e.g. the search hit it was started from); returns its id."""
    _check_text(name, notes)
    require_nonempty(db)
    ensure_tables(db)
    now = utc_now()

    def work(session: Session) -> int:
        case = Case(name=name.strip(), notes=notes, created_at=now, updated_at=now, created_by=by)
        session.add(case)
        session.flush()
        for track_id in dict.fromkeys(confirmed or []):
            _require_track(session, track_id)
            session.add(CaseTrack(case_id=case.id, track_id=track_id, verdict="confirmed", decided_at=now,
                                  decided_by=by))  # fmt: skip
        audit.add(session, by, "case.create", f"case {case.id}", name=case.name, confirmed=list(confirmed or []))
        return case.id

    return db.write(work)


def _require_track(session: Session, track_id: int) -> Track:
    track = session.get(Track, int(track_id))
    if track is None:
        raise NotFound(f"no track with id {track_id}")
    return track


def _require_case(session: Session, case_id: int) -> Case:
    case = session.get(Case, int(case_id))
    if case is None:
        raise NotFound(f"no case with id {case_id}")
    return case


def update_case(db: Database, case_id: int, name: str | None = None, notes: str | None = None, by: str = "") -> None:
    _check_text(name, notes)
    ensure_tables(db)

    def work(session: Session) -> None:
        case = _require_case(session, case_id)
        if name is not None:
            case.name = name.strip()
        if notes is not None:
            case.notes = notes
        case.updated_at = utc_now()
        audit.add(session, by, "case.update", f"case {case.id}", name=name is not None, notes=notes is not None)

    db.write(work)


def mark_track(db: Database, case_id: int, track_id: int, verdict: str, by: str = "") -> None:
    """Set a track's verdict in a case (``undecided`` removes it)."""
    if verdict not in VERDICTS:
        raise ReidAppError(f"a verdict is one of {', '.join(VERDICTS)}; got {verdict!r}")
    ensure_tables(db)
    now = utc_now()

    def work(session: Session) -> None:
        case = _require_case(session, case_id)
        _require_track(session, track_id)
        session.execute(delete(CaseTrack).where(CaseTrack.case_id == case.id, CaseTrack.track_id == int(track_id)))
        if verdict != "undecided":
            session.add(CaseTrack(case_id=case.id, track_id=int(track_id), verdict=verdict, decided_at=now,
                                  decided_by=by))  # fmt: skip
        case.updated_at = now
        audit.add(session, by, "case.mark", f"case {case.id}", track_id=int(track_id), verdict=verdict)

    db.write(work)


def list_cases(db: Database) -> list[dict[str, Any]]:
    ensure_tables(db)
    with db.read() as session:
        counts = dict(
            session.execute(
                select(CaseTrack.case_id, func.count())
                .where(CaseTrack.verdict == "confirmed")
                .group_by(CaseTrack.case_id)
            ).all()
        )
        cases = session.scalars(select(Case).order_by(Case.updated_at.desc(), Case.id.desc())).all()
        return [
            {"case_id": c.id, "name": c.name, "confirmed": int(counts.get(c.id, 0)),
             "created_at": c.created_at.isoformat(), "updated_at": c.updated_at.isoformat()}
            for c in cases
        ]  # fmt: skip


def _verdicts(session: Session, case_id: int) -> dict[int, CaseTrack]:
    return {row.track_id: row for row in session.scalars(select(CaseTrack).where(CaseTrack.case_id == case_id))}


def case_detail(db: Database, case_id: int) -> dict[str, Any]:
    """The case: name, notes, its confirmed tracks in time order (the trajectory) and its rejected ones."""
    ensure_tables(db)
    with db.read() as session:
        case = _require_case(session, case_id)
        verdicts = _verdicts(session, case.id)
        rows = session.execute(
            select(Track, Video).join(Video, Video.id == Track.video_id).where(Track.id.in_(list(verdicts) or [-1]))
        ).all()
        best = {t: d.id for t, d in best_detections(session, [track.id for track, _ in rows]).items()}
        tracks = []
        for track, video in rows:
            entry = track_dict(track, video)
            entry |= {"verdict": verdicts[track.id].verdict, "decided_by": verdicts[track.id].decided_by,
                      "detection_id": best.get(track.id)}  # fmt: skip
            tracks.append(entry)
        tracks.sort(key=lambda t: (t["start"], t["track_id"]))
        return {
            "case_id": case.id, "name": case.name, "notes": case.notes, "created_by": case.created_by,
            "created_at": case.created_at.isoformat(), "updated_at": case.updated_at.isoformat(),
            "trajectory": [t for t in tracks if t["verdict"] == "confirmed"],
            "rejected": [t for t in tracks if t["verdict"] == "rejected"],
        }  # fmt: skip


def search_case(
    db: Database, indexes: Any, case_id: int, top_k: int = 10, threshold: float | None = None, by: str = ""
) -> dict[str, Any]:
    """Candidates for the case's person: the tracks most similar to the mean of its confirmed tracks,
    without the tracks already decided (module docstring)."""
    from reid_app.search import hits_for_rows  # noqa: PLC0415 (the same hit rows as a search)

    if not 1 <= top_k <= MAX_CANDIDATES:
        raise ReidAppError(f"--top-k must be between 1 and {MAX_CANDIDATES}, got {top_k}")
    info = require_nonempty(db)
    ensure_tables(db)
    with db.read() as session:
        case = _require_case(session, case_id)
        verdicts = _verdicts(session, case.id)
        confirmed = [t for t, v in verdicts.items() if v.verdict == "confirmed"]
        if not confirmed:
            raise ReidAppError(f"case {case.id} has no confirmed track yet: confirm one to search with it")
        blobs = session.scalars(select(Track.embedding).where(Track.id.in_(confirmed))).all()
    vectors = bytes_to_vectors(list(blobs), int(info.model_dim))
    query = vectors.mean(axis=0)
    query = (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)
    gallery, _ = indexes.sync("tracks")
    wanted = min(gallery.ntotal, top_k + len(verdicts))
    skipped: list[str] = []
    if wanted == 0:
        return {"case_id": case_id, "confirmed": len(confirmed), "candidates": []}
    scores, ids = gallery.search(query[None, :], wanted, None)
    ranked = [
        (float(score), int(row_id)) for score, row_id in zip(scores[0], ids[0], strict=True)
        if row_id >= 0 and int(row_id) not in verdicts and (threshold is None or score >= threshold)
    ][:top_k]  # fmt: skip
    with db.read() as session:
        hits = hits_for_rows(session, db, "tracks", ranked, skipped)
    audit.record(db, by, "case.search", f"case {case_id}", candidates=[hit.track_id for hit in hits])
    return {"case_id": case_id, "confirmed": len(confirmed), "candidates": [asdict(hit) for hit in hits]}


def export_case(db: Database, case_id: int, fmt: str = "json", by: str = "") -> dict[str, Any] | str:
    """The case as a JSON document with inline thumbnails, or as a self-contained HTML page."""
    if fmt not in ("json", "html"):
        raise ReidAppError(f"export format is json or html, got {fmt!r}")
    detail = case_detail(db, case_id)
    audit.record(db, by, "case.export", f"case {case_id}", format=fmt)
    for track in (*detail["trajectory"], *detail["rejected"]):
        data = thumbnail_bytes(db, track["detection_id"]) if track.get("detection_id") is not None else None
        track["thumbnail_jpeg_base64"] = base64.b64encode(data).decode() if data else None
    if fmt == "json":
        return detail
    return _html(detail)


def _html(detail: dict[str, Any]) -> str:
    def rows(tracks: list[dict[str, Any]]) -> str:
        cells = []
        for t in tracks:
            image = (f'<img alt="track {t["track_id"]}" src="data:image/jpeg;base64,{t["thumbnail_jpeg_base64"]}">'
                     if t.get("thumbnail_jpeg_base64") else "")  # fmt: skip
            cells.append(
                f"<tr><td>{image}</td><td>{t['camera']}</td><td>{html.escape(t['start'])}</td>"
                f"<td>{html.escape(t['end'])}</td><td>{t['track_id']}</td><td>{html.escape(t['decided_by'])}</td></tr>"
            )
        return "".join(cells) or '<tr><td colspan="6">none</td></tr>'

    head = "<tr><th>crop</th><th>camera</th><th>from (UTC)</th><th>to (UTC)</th><th>track</th><th>by</th></tr>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Case {detail['case_id']}: {html.escape(detail['name'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;text-align:left}"
        "img{height:96px}</style></head><body>"
        f"<h1>Case {detail['case_id']}: {html.escape(detail['name'])}</h1>"
        f"<p>{html.escape(detail['notes'])}</p>"
        f"<p>created {html.escape(detail['created_at'])} by {html.escape(detail['created_by'] or '-')}; "
        f"updated {html.escape(detail['updated_at'])}</p>"
        "<h2>Where this person was seen (confirmed, in time order)</h2>"
        f"<table>{head}{rows(detail['trajectory'])}</table>"
        f"<h2>Not this person (rejected)</h2><table>{head}{rows(detail['rejected'])}</table>"
        "</body></html>"
    )
