"""``reid-app identities``: group tracks across cameras into global identities."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from reid_app.calibration import database_thresholds
from reid_app.commands.ingest import warn
from reid_app.commands.stats import UNTRAINED_NOTE
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig
from reid_app.errors import ReidAppError
from reid_app.identities import compute_identities, identities_payload
from reid_app.safetext import cell
from reid_app.store import Database, require_nonempty


def identities_command(
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help=f"Cosine distance (1 - similarity) up to which clusters merge (default: the model's own; "
        f"{AppConfig.identity_threshold} for the shipped model).",
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="The database's model, when not the shipped one (its calibrated default threshold)."
    ),
    linkage: str = typer.Option("average", "--linkage", help="average or complete."),
    db: str | None = typer.Option(
        None, "--db", help=f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the thumbnails (default: next to the DB)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Cluster all tracks into identities, store each track's identity id and list them."""
    if linkage not in ("average", "complete"):
        raise ReidAppError(f"--linkage must be 'average' or 'complete', got {linkage!r}")
    config = AppConfig.from_env(db, data_dir, weights=weights)
    database = Database(config)
    info = require_nonempty(database)
    if threshold is None:
        threshold = database_thresholds(config.weights, info, warn).identity
    if not info.model_is_trained:
        warn(UNTRAINED_NOTE)
    summaries = compute_identities(database, threshold, linkage)  # type: ignore[arg-type]
    if as_json:
        payload = identities_payload(summaries, threshold, linkage, bool(info.model_is_trained))
        print(json.dumps(payload, indent=2))
        return
    multi = sum(len(s.cameras) > 1 for s in summaries)
    table = Table(
        title=f"{len(summaries)} identities from {sum(len(s.track_ids) for s in summaries)} tracks "
        f"({multi} seen by several cameras) — {linkage} linkage, distance ≤ {threshold}"
    )
    for column in ("identity", "cameras", "tracks", "appearances (camera: UTC time span)"):
        table.add_column(column)
    for s in summaries:
        spans = "; ".join(
            f"cam {a.camera}: {a.start:%Y-%m-%d %H:%M:%S}–{a.end:%H:%M:%S}"
            + (f" ({a.tracks} tracks)" if a.tracks > 1 else "")
            for a in s.appearances
        )
        table.add_row(*map(cell, (s.identity_id, ",".join(map(str, s.cameras)), len(s.track_ids), spans)))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # piped: no 80-column cut


def register(app: typer.Typer) -> None:
    app.command("identities")(identities_command)
