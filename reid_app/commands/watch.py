"""``reid-app watch add|list|remove|deliver``: the live watchlist (:mod:`reid_app.watchlist`)."""

from __future__ import annotations

from pathlib import Path

import typer

from reid_app.audit import cli_actor
from reid_app.backends import BACKEND_HELP
from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, PUBLIC_URL_HELP, AppConfig
from reid_app.errors import ReidAppError

watch_app = typer.Typer(help="Watchlist: be alerted when a person appears again.", no_args_is_help=True)
DB_HELP = f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
SECRET_ENV = "REID_APP_WEBHOOK_SECRET"


@watch_app.command("add")
def add_command(
    image: Path | None = typer.Argument(None, help="A photo of the person (a crop or a frame)."),
    name: str = typer.Option(..., "--name", help="Who this is (shown in alerts)."),
    case: int | None = typer.Option(None, "--case", help="Watch for a case's person (its confirmed tracks)."),
    threshold: float | None = typer.Option(
        None, "--threshold",
        help="Lowest cosine similarity that raises an alert (default: the model's own; 0.5 for the shipped model).",
    ),  # fmt: skip
    webhook: str = typer.Option("", "--webhook", help="URL alerts are POSTed to (JSON, HMAC-SHA256 signed)."),
    secret: str | None = typer.Option(None, "--secret", help=f"Signing secret (default: ${SECRET_ENV})."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    weights: str | None = typer.Option(None, "--weights", help="The database's model (for an image)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
) -> None:
    """Add a person to the watchlist: every ingest then checks each new track against them."""
    import os  # noqa: PLC0415

    from reid_app.calibration import database_thresholds  # noqa: PLC0415
    from reid_app.ingest import load_detector, load_embedder  # noqa: PLC0415
    from reid_app.search import load_query_image, select_query_persons  # noqa: PLC0415
    from reid_app.store import Database, check_model_identity, require_nonempty  # noqa: PLC0415
    from reid_app.watchlist import add_watch, case_vector  # noqa: PLC0415

    if (image is None) == (case is None):
        raise ReidAppError("watch add takes a photo of the person or --case ID (one of them)")
    config = AppConfig.from_env(db, None, weights=weights, backend=backend)
    database = Database(config)
    info = require_nonempty(database)
    if case is not None:
        vector = case_vector(database, case)
    else:
        embedder = load_embedder(config, warn)
        check_model_identity(info, embedder.model_name, embedder.weights_sha256, embedder.dim)
        person = select_query_persons(load_query_image(image), load_detector(None, config.device, config.backend))[0]
        vector = embedder.embed([person.image])[0]
    if threshold is None:
        threshold = database_thresholds(config.weights, info, warn).watch
    signing = secret if secret is not None else os.environ.get(SECRET_ENV, "")
    watch_id = add_watch(database, name, vector, info.model_weights_sha256 or "", threshold, webhook, signing,
                         by=cli_actor())  # fmt: skip
    typer.echo(f"watchlist entry {watch_id}: {name} (threshold {threshold:g}{', webhook' if webhook else ''})")


@watch_app.command("list")
def list_command(db: str | None = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """The watchlist."""
    from reid_app.store import Database  # noqa: PLC0415
    from reid_app.watchlist import list_watches  # noqa: PLC0415

    for entry in list_watches(Database(AppConfig.from_env(db))):
        hook = f"  → {entry['webhook']}" if entry["webhook"] else ""
        typer.echo(f"{entry['watch_id']:>4}  {entry['name']}  (threshold {entry['threshold']:g}){hook}")


@watch_app.command("remove")
def remove_command(
    watch_id: int = typer.Argument(..., help="Watchlist entry id."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Take a person off the watchlist (their past alerts stay)."""
    from reid_app.store import Database  # noqa: PLC0415
    from reid_app.watchlist import remove_watch  # noqa: PLC0415

    remove_watch(Database(AppConfig.from_env(db)), watch_id, by=cli_actor())
    typer.echo(f"watchlist entry {watch_id} removed")


@watch_app.command("deliver")
def deliver_command(
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    public_url: str = typer.Option("", "--public-url", help=PUBLIC_URL_HELP),
) -> None:
    """POST the alerts that are due now (ingests and the server do this by themselves)."""
    from reid_app.store import Database  # noqa: PLC0415
    from reid_app.watchlist import deliver_due  # noqa: PLC0415

    config = AppConfig.from_env(db, public_url=public_url)
    typer.echo(f"{deliver_due(Database(config), config.public_url)} alerts delivered")


def register(app: typer.Typer) -> None:
    app.add_typer(watch_app, name="watch")
