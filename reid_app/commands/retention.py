"""``reid-app prune`` and ``reid-app forget``: retention and erasure (:mod:`reid_app.retention`)."""

from __future__ import annotations

import typer

from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig, parse_camera_id
from reid_app.errors import ReidAppError
from reid_app.retention import Removal, forget, parse_age, parse_row_id, prune
from reid_app.safetext import plain

_DB_HELP = f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
_DATA_HELP = "This host's data folder (index files, thumbnail cache; default: next to the DB)."


def _print(removal: Removal) -> None:
    for line in removal.lines():
        print(plain(line))


def prune_command(
    older_than: str = typer.Option(..., "--older-than", help="Age: a number and s/m/h/d/w, e.g. 30d."),
    camera: str | None = typer.Option(None, "--camera", help="Only this camera."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; remove nothing."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    data_dir: str | None = typer.Option(None, "--data-dir", help=_DATA_HELP),
) -> None:
    """Remove every track last seen longer ago than --older-than: rows, vectors and thumbnails."""
    age = parse_age(older_than)
    camera_id = parse_camera_id(camera) if camera is not None else None
    _print(prune(AppConfig.from_env(db, data_dir), age, camera_id, dry_run=dry_run))


def forget_command(
    track: str | None = typer.Option(None, "--track", help="A track id (from search results)."),
    identity: str | None = typer.Option(None, "--identity", help="An identity id (from `reid-app identities`)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; remove nothing."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    data_dir: str | None = typer.Option(None, "--data-dir", help=_DATA_HELP),
) -> None:
    """Erase one track, or every track of one identity: rows, vectors and thumbnails."""
    if (track is None) == (identity is None):
        raise ReidAppError("give exactly one of --track ID or --identity ID")
    track_id = parse_row_id(track, "--track") if track is not None else None
    identity_id = parse_row_id(identity, "--identity") if identity is not None else None
    config = AppConfig.from_env(db, data_dir)
    if not config.database_exists():
        raise ReidAppError(f"the database is empty: {config.sqlite_path} does not exist")
    _print(forget(config, track_id=track_id, identity_id=identity_id, dry_run=dry_run))


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)
    app.command("forget")(forget_command)
