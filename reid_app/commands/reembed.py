"""``reid-app reembed --weights FILE``: move a database to another re-ID model (:mod:`reid_app.reembed`)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reid_app.backends import BACKEND_HELP, INT8_HELP
from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig
from reid_app.errors import ReidAppError


def reembed_command(
    weights: str = typer.Option(..., "--weights", help="FA-Net checkpoint to move the database to."),
    db: str | None = typer.Option(
        None, "--db", help=f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the thumbnails (default: next to the DB)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda:0, ..."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    int8: bool = typer.Option(False, "--int8", help=INT8_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Embed every stored crop again with another model and switch the database to it in one step
    (searches keep the old model until then; a stopped run is finished by running it again)."""
    from reid_app.index import IndexManager  # noqa: PLC0415
    from reid_app.ingest import load_embedder  # noqa: PLC0415
    from reid_app.reembed import reembed  # noqa: PLC0415
    from reid_app.store import Database  # noqa: PLC0415

    if weights.strip().lower() == "untrained":
        raise ReidAppError("reembed moves a database to a trained model: --weights untrained is not one")
    config = AppConfig.from_env(db, data_dir, weights=weights, device=device, backend=backend, int8=int8)
    database = Database(config)
    embedder = load_embedder(config, warn)
    progress = Progress(
        TextColumn(f"[bold]reembed to {embedder.model_name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("crops"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )
    with progress:
        task = progress.add_task("reembed", total=None)
        report = reembed(database, embedder, lambda done, total: progress.update(task, completed=done, total=total))
    if report.already:
        typer.echo(f"the database already uses {report.model_name}: nothing to do")
        return
    IndexManager(database, config).sync_all()  # this host's indexes, rebuilt for the new model now
    resumed = f" ({report.resumed_crops} of them staged by an earlier run)" if report.resumed_crops else ""
    typer.echo(
        f"moved the database from {report.previous_model} to {report.model_name}: {report.crops_total} crops"
        f"{resumed} and {report.tracks} tracks re-embedded; run `reid-app identities` again"
    )


def register(app: typer.Typer) -> None:
    app.command("reembed")(reembed_command)
