"""``reid-app search IMAGE``: find the person of a query image in the gallery."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from reid_app import audit
from reid_app.backends import BACKEND_HELP, INT8_HELP
from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig, parse_camera_id
from reid_app.errors import ReidAppError
from reid_app.ingest import load_detector, load_embedder
from reid_app.report import write_report
from reid_app.safetext import cell
from reid_app.search import SearchOptions, SearchResult, load_query_image, run_search
from reid_app.store import Database, check_model_identity, require_nonempty


def search_command(
    image: str = typer.Argument(..., help="Query image: a person crop or a whole frame."),
    top_k: int = typer.Option(10, "--top-k", "-k", help="Number of matches per query person."),
    camera: list[str] = typer.Option([], "--camera", help="Only these cameras (repeatable)."),
    exclude_camera: list[str] = typer.Option([], "--exclude-camera", help="Not these cameras (repeatable)."),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help=f"Minimum cosine similarity (default: the model's own, {AppConfig.search_threshold} for the shipped model "
        f"(weights/README.md), set by adapt for an adapted one; -1 shows every match).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (stable keys) instead of a table."),
    report: str | None = typer.Option(None, "--report", help="Also write a self-contained HTML report here."),
    tracks: bool = typer.Option(True, "--tracks/--detections", help="Match whole tracks or single crops."),
    all_persons: bool = typer.Option(False, "--all", help="Search every person found in the query image."),
    db: str | None = typer.Option(
        None, "--db", help=f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the thumbnails (default: next to the DB)."),
    detector: str | None = typer.Option(None, "--detector", help="Person detector (as for ingest)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda:0, ..."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    int8: bool = typer.Option(False, "--int8", help=INT8_HELP),
    weights: str | None = typer.Option(None, "--weights", help="FA-Net weights (must be those of the database)."),
) -> None:
    """Search the gallery for the person(s) in IMAGE."""
    options = SearchOptions(
        top_k=top_k,
        cameras=[parse_camera_id(c) for c in camera],
        exclude_cameras=[parse_camera_id(c) for c in exclude_camera],
        threshold=threshold,
        level="tracks" if tracks else "detections",
        all_persons=all_persons,
    )
    options.validate()
    query_image = load_query_image(image)
    if report is not None and not Path(report).resolve().parent.is_dir():
        raise ReidAppError(f"cannot write the report: folder {Path(report).resolve().parent} does not exist")
    if report is not None and Path(report).is_dir():
        raise ReidAppError(f"--report must name an HTML file to write, but {report} is a directory")
    config = AppConfig.from_env(db, data_dir, weights=weights, device=device, backend=backend, int8=int8)
    database = Database(config)
    info = require_nonempty(database)
    embedder = load_embedder(config, warn)
    warn(embedder.warning())
    check_model_identity(info, embedder.model_name, embedder.weights_sha256, embedder.dim)
    if threshold is None:
        options.threshold = embedder.thresholds.search
    result = run_search(
        config, image, options, embedder=embedder, detector=load_detector(detector, device, config.backend), db=database
    )
    warn(result.skipped_warning())
    found = [hit.track_id for person in result.persons for hit in person.hits]
    audit.record(database, audit.cli_actor(), "search", Path(image).name, level=options.level, results=found)
    if report is not None:
        path = write_report(report, result, query_image)
        print(f"report written to {path}", file=sys.stderr)
    if as_json:
        print(json.dumps(result.to_json_dict(), indent=2))
    else:
        # Piped output is not cut to 80 columns: the thumbnail paths stay whole.
        Console(width=None if sys.stdout.isatty() else 200).print(*results_tables(result))
    warn(result.warning)


def results_tables(result: SearchResult) -> list[Table]:
    tables = []
    for person in result.persons:
        table = Table(
            title=cell(f"query person {person.person} ({person.how}) — {result.level}, {result.index['type']} index"),
            caption="score = cosine similarity"
            + (" · UNTRAINED MODEL: not re-identification" if result.warning else ""),
        )
        for column in ("#", "score", "cam", "video", "time (UTC)", "track", "identity"):
            table.add_column(column, no_wrap=True)
        table.add_column("thumbnail", overflow="fold")
        for hit in person.hits:
            table.add_row(
                *map(
                    cell,
                    (
                        hit.rank,
                        f"{hit.score:.4f}",
                        hit.camera,
                        hit.video_id,
                        hit.time[:19].replace("T", " "),
                        hit.track_id,
                        "-" if hit.identity_id is None else hit.identity_id,
                        "-" if hit.thumbnail is None else _short_path(hit.thumbnail),
                    ),
                )
            )
        if not person.hits:
            table.add_row("-", "no match passed the filters", *[""] * 6)
        tables.append(table)
    return tables


def _short_path(path: str) -> str:
    """Relative to the working folder when it is inside it (narrower tables); JSON keeps it absolute."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
