"""``reid-app adapt``: learn a site's cameras from its own unlabelled tracks (:mod:`reid_app.adapt`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig


def _log(line: str) -> None:
    typer.echo(line, err=True)


def adapt_command(
    output: Path = typer.Option(..., "--output", help="Inference checkpoint to write (the adapted model)."),
    db: str | None = typer.Option(
        None, "--db", help=f"Adapt on this database's stored tracks (default when no --from-folder: {DEFAULT_DB_URL}, "
        f"or ${DB_URL_ENV})."
    ),  # fmt: skip
    from_folder: Path | None = typer.Option(
        None, "--from-folder", help="Adapt on a tracklet folder DIR/<camera id>/<track id>/*.jpg instead."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the thumbnails (default: next to the DB)."),
    weights: str | None = typer.Option(None, "--weights", help="Checkpoint to start from (default: the shipped one)."),
    epochs: int = typer.Option(
        0, "--epochs", help="Fine-tuning epochs on the tracks before the cameras' mean features are taken "
        "(each re-labels the tracks); 0: only the mean features, the measured better choice for the shipped model."
    ),
    camera_centring: bool = typer.Option(
        True, "--camera-centring/--no-camera-centring",
        help="Store each camera's mean feature; the app takes it from that camera's crops (queries: the site's).",
    ),  # fmt: skip
    camera_whitening: bool = typer.Option(
        True, "--camera-whitening/--no-camera-whitening",
        help="With the means, store each camera's whitening of its centred features (the measured better choice).",
    ),  # fmt: skip
    apply: bool = typer.Option(False, "--apply", help="Then move the database to the adapted model (reembed)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Adapt the re-ID model to your cameras without labels: each camera's mean feature is stored with
    it (--epochs N fine-tunes on the tracks first); --apply also re-embeds the database with it."""
    from reid_app.adapt import run_adapt  # noqa: PLC0415
    from reid_app.errors import ReidAppError  # noqa: PLC0415
    from reid_app.store import Database  # noqa: PLC0415

    if from_folder is not None and (db is not None or apply):
        raise ReidAppError("--from-folder adapts on a folder: it takes neither --db nor --apply")
    database = None
    if from_folder is None:
        config = AppConfig.from_env(db, data_dir)
        database = Database(config)
    progress = Progress(
        TextColumn("[bold]adapt {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=quiet,
    )  # fmt: skip
    with progress:
        task = progress.add_task("", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        report = run_adapt(weights, output, db=database, folder=from_folder, epochs=epochs,
                           camera_centring=camera_centring, camera_whitening=camera_whitening,
                           progress=on_progress, log=_log)  # fmt: skip
    typer.echo(f"wrote {report.output}: {report.card}")
    if apply:
        from reid_app.ingest import load_embedder  # noqa: PLC0415
        from reid_app.reembed import reembed  # noqa: PLC0415

        assert database is not None
        embedder = load_embedder(AppConfig.from_env(db, data_dir, weights=str(output)), warn)
        moved = reembed(database, embedder)
        from reid_app.index import IndexManager  # noqa: PLC0415

        IndexManager(database, database.config).sync_all()
        typer.echo(
            f"moved the database to {moved.model_name}: {moved.crops_total} crops and {moved.tracks} tracks "
            "re-embedded; run `reid-app identities` again"
        )


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt_command)
