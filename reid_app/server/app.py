"""The FastAPI application: the page (static files, no build step, nothing from another origin)
and the HTTP API under ``/api/v1`` with its OpenAPI schema at ``/api/v1/openapi.json``.

Errors are JSON ``{"error": "one line"}`` with a 4xx status for anything the request got wrong
(400 bad input such as a non-image or no person in it, 404 unknown id, 413 too large, 422 a
parameter out of range), 503 for a failure of the machine (disk, database server) and 500 only
for a bug; no failed request writes anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from reid_app import audit, watchlist
from reid_app.adapt import adapted_card
from reid_app.cases import MAX_NAME as MAX_CASE_NAME
from reid_app.cases import MAX_NOTES as MAX_CASE_NOTES
from reid_app.cases import case_detail, create_case, export_case, list_cases, mark_track, search_case, update_case
from reid_app.config import MAX_CAMERA_ID
from reid_app.errors import ReidAppError, describe_failure
from reid_app.identities import compute_identities, identities_payload, stored_identities
from reid_app.overview import (
    MAX_PAGE,
    NotFound,
    collect_stats,
    detection_detail,
    frame_jpeg,
    list_tracks,
    thumbnail_bytes,
    track_detail,
)
from reid_app.safetext import plain
from reid_app.search import MAX_TOP_K, SearchOptions, model_dict, run_search
from reid_app.server.limits import UPLOADS_AT_ONCE, WORKER_THREADS, HeavyWork
from reid_app.server.security import SECURITY_HEADERS, GuardMiddleware
from reid_app.server.state import ServerState
from reid_app.store import DamagedValueError, DatabaseFileGone, as_utc, check_model_identity, require_nonempty
from reid_app.watchlist import Deliverer

logger = logging.getLogger("reid_app.server")
#: Seconds between the alert stream's looks at the database.
ALERT_POLL_S = 0.5
#: An alert stream ends after this long; the browser's EventSource reconnects by itself, resuming
#: after the last alert it got (Last-Event-ID), so no connection is held open forever.
ALERT_STREAM_S = 300.0

API = "/api/v1"
STATIC = files("reid_app.server") / "static"
#: Row ids are SQL integers: larger values cannot name a row (and SQLite refuses to bind them).
MAX_ROW_ID = 2**63 - 1
#: Query image file names shown back in results: a name, never a server path.
MAX_NAME = 200

#: Failures of the machine rather than of the request or the code (:func:`describe_failure`): 503.
#: Of the database's errors, only those of its state (locked, disk, server unreachable, pool
#: exhausted): any other (a constraint, a statement the database refuses) is a bug, a 500 whose
#: traceback the log keeps. The file removed under the server (DatabaseFileGone) has its own handler.
MACHINE_FAILURES = (OSError, OperationalError, SQLAlchemyTimeoutError, OverflowError, MemoryError)
SECURITY_HEADERS_TEXT = [(name.decode(), value.decode()) for name, value in SECURITY_HEADERS]

RowId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]
Camera = Annotated[int, Query(ge=1, le=MAX_CAMERA_ID)]
UNTRAINED_NOTE = (
    "the embedding model of this database is untrained (random weights): its similarities and identities "
    "are not meaningful re-identification"
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": plain(message)}, status_code=status, headers=headers)


def create_app(state: ServerState, *, uploads_at_once: int = UPLOADS_AT_ONCE) -> FastAPI:
    """The application over ``state`` (loaded models, database, index). ``uploads_at_once``:
    requests with a body in progress at once (:mod:`.limits`)."""
    app = FastAPI(
        lifespan=_lifespan,
        title="reid-app",
        version="1",
        summary="Person re-identification across cameras: search, tracks, detections, cameras, identities.",
        openapi_url=f"{API}/openapi.json",
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: the page must work offline
        redoc_url=None,
    )
    app.state.reid = state
    app.add_middleware(
        GuardMiddleware,
        token=state.token,
        loopback_only=state.loopback_only,
        max_upload_bytes=state.max_upload_bytes,
        uploads_at_once=uploads_at_once,
    )
    _add_error_handlers(app)
    _add_api(app, state)
    _add_page(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The threads that run requests: as many as the database pool serves (ServerState.load).
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    # Watchlist alerts left undelivered by any ingest (or stopped host) are POSTed from here too.
    deliverer = app.state.deliverer = Deliverer(app.state.reid.db, app.state.reid.config.public_url).start()
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(deliverer.stop)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ReidAppError)
    async def reid_error(_request: Request, exc: ReidAppError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(DamagedValueError)
    async def damaged_row(_request: Request, exc: DamagedValueError) -> JSONResponse:
        # Not the request's fault: the stored data's. Its one line names the column to fix.
        logger.warning("request failed: %s", exc)
        return _error(500, str(exc))

    @app.exception_handler(DatabaseFileGone)
    async def database_gone(_request: Request, exc: DatabaseFileGone) -> JSONResponse:
        # The machine's state, not the request: every request is refused until a restart (the
        # message for the log names the file; the answer does not).
        logger.warning("request refused: %s", exc)
        return _error(503, "the database file was removed or replaced while the server was running: restart the server")

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:5]
        )
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    async def machine_failure(_request: Request, exc: Exception) -> JSONResponse:
        # The machine, not the request (disk, database): one line in the log, naming the file, for
        # the operator to act on; the answer names no server path. Handled here, inside the app,
        # so that it is not re-raised to uvicorn (which would log its traceback, SQL and all).
        logger.warning("request failed: %s", describe_failure(exc))
        return _error(503, describe_failure(exc, with_paths=False) or "the server cannot answer now")

    for failure_type in MACHINE_FAILURES:
        app.add_exception_handler(failure_type, machine_failure)

    @app.exception_handler(Exception)
    async def failure(_request: Request, exc: Exception) -> JSONResponse:
        # Whatever escaped the handlers above: a bug (500), or a failure of the machine raised
        # outside the app's own error handling. Starlette answers from outside the middleware
        # stack, so the security headers are added here; it then re-raises the exception, and
        # uvicorn logs its traceback.
        message = describe_failure(exc, with_paths=False) if isinstance(exc, MACHINE_FAILURES) else None
        status, text = (503, message) if message is not None else (500, "internal error (see the server log)")
        return _error(status, text, dict(SECURITY_HEADERS_TEXT))


def _save_upload(upload: UploadFile, folder: str) -> Path:
    """The upload in a private temporary file (the search pipeline reads image files), refusing an
    empty one with a message that names no server path."""
    target = Path(folder) / "query"
    size = 0
    with open(target, "wb") as handle:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            handle.write(chunk)
    if size == 0:
        raise ReidAppError("the uploaded image is empty (0 bytes)")
    return target


def _add_api(app: FastAPI, state: ServerState) -> None:
    heavy = [Depends(HeavyWork())]  # the admission rule of .limits: one queue for all heavy routes

    @app.get(f"{API}/status", tags=["status"])
    def status() -> dict[str, Any]:
        """The model the server embeds with, the database's model, and the warning that applies."""
        info = state.db.info()
        stored = model_dict(info) if info is not None and info.model_name is not None else None
        warning = state.embedder.warning()
        if warning is None and stored is not None and not stored["trained"]:
            warning = UNTRAINED_NOTE
        return {
            "database": state.db.engine.dialect.name,
            "embedder": {
                "name": state.embedder.model_name,
                "dim": state.embedder.dim,
                "trained": bool(state.embedder.is_trained),
                "backend": state.embedder.backend.value,
                "precision": state.embedder.precision,
                # What the checkpoint was adapted on (`reid-app adapt`), or "".
                "adapted": adapted_card(state.embedder.metadata),
            },
            "database_model": stored,
            "detector": state.detector.name,
            "warning": warning,
            "matches_are_meaningful": warning is None,
            "defaults": {
                "top_k": 10,
                "threshold": state.embedder.thresholds.search,
                "max_top_k": MAX_TOP_K,
                "identity_threshold": state.embedder.thresholds.identity,
            },
            "max_upload_bytes": state.max_upload_bytes,
        }

    @app.post(f"{API}/search", tags=["search"], dependencies=heavy)
    def search(
        request: Request,
        image: Annotated[UploadFile, File(description="Query photo: a person crop or a whole frame.")],
        top_k: Annotated[int, Form(ge=1, le=MAX_TOP_K)] = 10,
        camera: Annotated[list[int] | None, Form(description="Only these cameras (repeat the field).")] = None,
        exclude_camera: Annotated[list[int] | None, Form(description="Not these cameras.")] = None,
        threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
        level: Annotated[Literal["tracks", "detections"], Form()] = "tracks",
        all_persons: Annotated[bool, Form(description="Search every person found in a frame.")] = False,
    ) -> dict[str, Any]:
        """Search the gallery: the same JSON as ``reid-app search --json`` (``query_image`` is the
        uploaded file's name)."""
        options = SearchOptions(
            top_k=top_k,
            cameras=[_camera(c) for c in camera or []],
            exclude_cameras=[_camera(c) for c in exclude_camera or []],
            threshold=state.embedder.thresholds.search if threshold is None else threshold,
            level=level,
            all_persons=all_persons,
        )
        options.validate()
        info = require_nonempty(state.db)
        embedder = state.embedder
        check_model_identity(info, embedder.model_name, embedder.weights_sha256, embedder.dim)
        with tempfile.TemporaryDirectory(prefix="reid-query-") as folder:
            path = _save_upload(image, folder)
            try:
                result = run_search(
                    state.config,
                    path,
                    options,
                    embedder=embedder,
                    detector=state.detector,
                    db=state.db,
                    indexes=state.indexes,
                )
            except ReidAppError as exc:  # its message may name the temporary file: name the upload
                raise type(exc)(str(exc).replace(str(path), _upload_name(image))) from None
        result.query_image = _upload_name(image)
        if result.skipped:
            logger.warning("search: %s", result.skipped_warning())
        audit.record(state.db, actor(request), "search", result.query_image, level=level,
                     results=[hit.track_id for person in result.persons for hit in person.hits])  # fmt: skip
        return api_json(result.to_json_dict())

    @app.get(f"{API}/cameras", tags=["cameras"], dependencies=heavy)
    def cameras() -> dict[str, Any]:
        """What ``reid-app stats --json`` shows: per camera counts and time spans, model, indexes."""
        return api_json(collect_stats(state.config, state.db, state.indexes, state.embedder.backend))

    @app.get(f"{API}/tracks", tags=["tracks"])
    def tracks(
        camera: Annotated[list[int] | None, Query(description="Only these cameras.")] = None,
        identity: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
        ids: Annotated[list[int] | None, Query(max_length=MAX_PAGE, description="Only these track ids.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
    ) -> dict[str, Any]:
        """Tracks ordered by start time: camera, time span, identity (the rows of a timeline)."""
        chosen_ids = [_row_id(i) for i in ids] if ids else None
        rows = list_tracks(
            state.db,
            cameras=[_camera(c) for c in camera or []],
            identity_id=identity,
            ids=chosen_ids,
            limit=limit,
            offset=offset,
        )
        return api_json({"tracks": rows})

    @app.get(f"{API}/tracks/{{track_id}}", tags=["tracks"])
    def track(track_id: RowId) -> dict[str, Any]:
        """One track and all its stored crops."""
        return api_json(track_detail(state.db, track_id))

    @app.get(f"{API}/detections/{{detection_id}}", tags=["detections"])
    def detection(detection_id: RowId) -> dict[str, Any]:
        """One stored crop: camera, frame, time, box."""
        return api_json(detection_detail(state.db, detection_id))

    @app.get(
        f"{API}/detections/{{detection_id}}/thumbnail",
        tags=["detections"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def thumbnail(detection_id: RowId) -> Response:
        """The stored JPEG crop of a detection."""
        return Response(thumbnail_bytes(state.config, state.db, detection_id), media_type="image/jpeg")

    @app.get(
        f"{API}/detections/{{detection_id}}/frame",
        tags=["detections"],
        dependencies=heavy,
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def frame(detection_id: RowId) -> Response:
        """The full video frame of a detection with its box, read from the stored video now."""
        return Response(frame_jpeg(state.db, detection_id), media_type="image/jpeg")

    @app.get(f"{API}/identities", tags=["identities"])
    def identities() -> dict[str, Any]:
        """The identities stored by the last ``reid-app identities`` run (or POST here)."""
        info = require_nonempty(state.db)
        summaries = stored_identities(state.db)
        payload = identities_payload(summaries, info.identity_threshold, None, bool(info.model_is_trained))
        computed = info.identities_computed_at
        payload["computed_at"] = as_utc(computed).isoformat() if computed is not None else None
        return payload

    @app.post(f"{API}/identities", tags=["identities"], dependencies=heavy)
    def recompute_identities(
        threshold: Annotated[float | None, Query(ge=0.0, le=2.0)] = None,
        linkage: Annotated[Literal["average", "complete"], Query()] = "average",
    ) -> dict[str, Any]:
        """Cluster all tracks again, as ``reid-app identities`` does, and store the result."""
        info = require_nonempty(state.db)
        threshold = state.embedder.thresholds.identity if threshold is None else threshold
        summaries = compute_identities(state.db, threshold, linkage)
        return identities_payload(summaries, threshold, linkage, bool(info.model_is_trained))

    _add_cases_api(app, state, heavy)

    @app.get(f"{API}/alerts", tags=["watchlist"])
    def alert_list(after: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0) -> dict[str, Any]:
        """Watchlist alerts with an id above ``after``, oldest first."""
        return {"alerts": watchlist.alerts(state.db, after)}

    @app.get(f"{API}/alerts/stream", tags=["watchlist"], response_class=StreamingResponse)
    async def alert_stream(
        request: Request, after: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0
    ) -> StreamingResponse:
        """Server-sent events: each new alert as it is stored (``event: alert``, JSON data)."""
        resumed = request.headers.get("last-event-id", "")
        after = max(after, int(resumed)) if re.fullmatch(r"[0-9]{1,18}", resumed) else after

        async def events() -> AsyncIterator[bytes]:
            last = after
            yield b": connected\n\n"
            ends = anyio.current_time() + ALERT_STREAM_S
            while anyio.current_time() < ends:
                new = await anyio.to_thread.run_sync(watchlist.alerts, state.db, last)
                for alert in new:
                    last = alert["alert_id"]
                    yield f"id: {last}\nevent: alert\ndata: {json.dumps(alert)}\n\n".encode()
                await anyio.sleep(ALERT_POLL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get(f"{API}/watchlist", tags=["watchlist"])
    def watch_entries() -> dict[str, Any]:
        """The active watchlist entries."""
        return {"watchlist": watchlist.list_watches(state.db)}

    @app.post(f"{API}/watchlist", tags=["watchlist"])
    def watch_case(body: WatchCreate, request: Request) -> dict[str, Any]:
        """Watch for a case's person (the mean of its confirmed tracks): every ingest alerts on them."""
        info = require_nonempty(state.db)
        vector = watchlist.case_vector(state.db, _row_id(body.case_id))
        threshold = state.embedder.thresholds.watch if body.threshold is None else body.threshold
        watch_id = watchlist.add_watch(state.db, body.name, vector, info.model_weights_sha256 or "", threshold,
                                       body.webhook, body.secret, by=actor(request))  # fmt: skip
        return {"watch_id": watch_id, "watchlist": watchlist.list_watches(state.db)}

    @app.delete(f"{API}/watchlist/{{watch_id}}", tags=["watchlist"])
    def unwatch(watch_id: RowId, request: Request) -> dict[str, Any]:
        """Take an entry off the watchlist (its past alerts stay)."""
        watchlist.remove_watch(state.db, watch_id, by=actor(request))
        return {"watchlist": watchlist.list_watches(state.db)}

    @app.get(f"{API}/audit", tags=["audit"])
    def audit_log(
        since: Annotated[datetime | None, Query(description="Entries from this time on (ISO 8601).")] = None,
        limit: Annotated[int, Query(ge=1, le=audit.MAX_ENTRIES)] = 1000,
    ) -> dict[str, Any]:
        """The audit trail: searches, case changes, exports, oldest first."""
        return {"entries": audit.entries(state.db, since, limit)}


def actor(request: Request) -> str:
    """Who made a request, for the audit trail (:mod:`reid_app.audit`)."""
    return f"api:{request.client.host if request.client else 'unknown'}"


class CaseCreate(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_CASE_NAME)
    notes: str = Field(default="", max_length=MAX_CASE_NOTES)
    track_ids: list[int] = Field(default_factory=list, max_length=MAX_PAGE)


class CaseUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=MAX_CASE_NAME)
    notes: str | None = Field(default=None, max_length=MAX_CASE_NOTES)


class WatchCreate(BaseModel):
    case_id: int = Field(ge=1, le=MAX_ROW_ID)
    name: str = Field(min_length=1, max_length=200)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)  # None: the model's own
    webhook: str = Field(default="", max_length=2000)
    secret: str = Field(default="", max_length=200)


class CaseVerdict(BaseModel):
    verdict: Literal["confirmed", "rejected", "undecided"]


def _add_cases_api(app: FastAPI, state: ServerState, heavy: list[Any]) -> None:
    """Investigations (:mod:`reid_app.cases`): the page and any client share these."""

    @app.get(f"{API}/cases", tags=["cases"])
    def cases() -> dict[str, Any]:
        """Every case, most recently changed first."""
        return {"cases": list_cases(state.db)}

    @app.post(f"{API}/cases", tags=["cases"])
    def new_case(body: CaseCreate, request: Request) -> dict[str, Any]:
        """Start a case (from a search: the hit's track as its first confirmed track)."""
        track_ids = [_row_id(t) for t in body.track_ids]
        case_id = create_case(state.db, body.name, body.notes, track_ids, by=actor(request))
        return api_json(case_detail(state.db, case_id))

    @app.get(f"{API}/cases/{{case_id}}", tags=["cases"])
    def case(case_id: RowId) -> dict[str, Any]:
        """The case: name, notes, confirmed tracks in time order (the trajectory), rejected tracks."""
        return api_json(case_detail(state.db, case_id))

    @app.patch(f"{API}/cases/{{case_id}}", tags=["cases"])
    def edit_case(case_id: RowId, body: CaseUpdate, request: Request) -> dict[str, Any]:
        """Rename the case or change its notes."""
        update_case(state.db, case_id, body.name, body.notes, by=actor(request))
        return api_json(case_detail(state.db, case_id))

    @app.put(f"{API}/cases/{{case_id}}/tracks/{{track_id}}", tags=["cases"])
    def mark(case_id: RowId, track_id: RowId, body: CaseVerdict, request: Request) -> dict[str, Any]:
        """Mark a track as the case's person (confirmed), not them (rejected), or undecided."""
        mark_track(state.db, case_id, track_id, body.verdict, by=actor(request))
        return api_json(case_detail(state.db, case_id))

    @app.post(f"{API}/cases/{{case_id}}/search", tags=["cases"], dependencies=heavy)
    def case_search(
        case_id: RowId,
        request: Request,
        top_k: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 10,
        threshold: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    ) -> dict[str, Any]:
        """Candidates: the tracks closest to the mean of the case's confirmed tracks, undecided ones only."""
        return api_json(search_case(state.db, state.indexes, case_id, top_k, threshold, actor(request)))

    @app.get(
        f"{API}/cases/{{case_id}}/export", tags=["cases"], response_class=Response,
        responses={200: {"content": {"text/html": {}, "application/json": {}}}},
    )  # fmt: skip
    def export(
        case_id: RowId, request: Request, format: Annotated[Literal["html", "json"], Query()] = "html"  # noqa: A002
    ) -> Response:
        """The case as one self-contained HTML report or a JSON document, thumbnails inline."""
        document = export_case(state.db, case_id, format, by=actor(request))
        if isinstance(document, str):
            return Response(document, media_type="text/html")
        return Response(json.dumps(document), media_type="application/json")


def api_json(payload: Any) -> Any:  # noqa: ANN401 - any JSON document
    """A Pipeline JSON document as the API gives it: the same, but for the server paths in it.
    The CLI's user is the operator on this machine; an API client is told ids, names and URLs:
    ``video_path`` becomes ``video`` (the file's name), ``thumbnail`` the crop's URL, the
    ``database`` URL its kind, and the ``index_folder`` is left out."""
    if isinstance(payload, list):
        return [api_json(item) for item in payload]
    if not isinstance(payload, dict):
        return payload
    shown: dict[str, Any] = {}
    for key, value in payload.items():
        if key == "video_path":
            shown["video"] = _video_name(value)
        elif key == "thumbnail":
            detection = payload.get("detection_id")
            shown[key] = f"{API}/detections/{detection}/thumbnail" if value is not None and detection else None
        elif key == "database" and isinstance(value, str):
            shown[key] = value.split(":", 1)[0].split("+", 1)[0]  # sqlite, postgresql (not the driver)
        elif key != "index_folder":
            shown[key] = api_json(value)
    return shown


def _video_name(path: str) -> str:
    # A stream's URL may carry credentials and hosts: only the last part of its path is shown.
    return PurePosixPath(urlsplit(path).path if "://" in path else path).name


def _camera(value: int) -> int:
    if not 1 <= value <= MAX_CAMERA_ID:
        raise ReidAppError(f"camera ID must be a positive integer up to {MAX_CAMERA_ID}, got {value}")
    return value


def _row_id(value: int) -> int:
    if not 1 <= value <= MAX_ROW_ID:
        raise ReidAppError(f"ids are positive integers up to {MAX_ROW_ID}, got {value}")
    return value


def _upload_name(upload: UploadFile) -> str:
    return os.path.basename(plain(upload.filename or "upload"))[:MAX_NAME] or "upload"


def _add_page(app: FastAPI) -> None:
    # Three small files, read once and served from memory on the event loop: the page never
    # waits for a thread that heavy requests may be using.
    media_types = {
        "index.html": "text/html; charset=utf-8",
        "app.js": "text/javascript; charset=utf-8",
        "style.css": "text/css; charset=utf-8",
    }
    contents = {name: (STATIC / name).read_bytes() for name in media_types}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return Response(contents["index.html"], media_type=media_types["index.html"])

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> Response:
        # A fixed list: no path from the request ever reaches the file system.
        if name not in media_types or name == "index.html":
            raise NotFound(f"no such file: {name[:60]}")
        return Response(contents[name], media_type=media_types[name])
