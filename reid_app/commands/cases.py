"""``reid-app case list|show|create|mark|search|export``: investigations on the CLI (:mod:`reid_app.cases`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from reid_app.audit import cli_actor
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig
from reid_app.errors import ReidAppError

case_app = typer.Typer(help="Investigations: confirm tracks of one person, search again, export.", no_args_is_help=True)
DB_HELP = f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."


def _database(db: str | None, data_dir: str | None = None):  # noqa: ANN202
    from reid_app.store import Database  # noqa: PLC0415

    return Database(AppConfig.from_env(db, data_dir))


def _found(call):  # noqa: ANN001, ANN202 - a row that is not there is one line, as everywhere
    from reid_app.overview import NotFound  # noqa: PLC0415

    try:
        return call()
    except NotFound as exc:
        raise ReidAppError(str(exc)) from None


@case_app.command("list")
def list_command(db: str | None = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """Cases, most recently changed first."""
    from reid_app.cases import list_cases  # noqa: PLC0415

    for case in list_cases(_database(db)):
        confirmed = f"{case['confirmed']} confirmed tracks"
        typer.echo(f"{case['case_id']:>5}  {case['name']}  ({confirmed}; {case['updated_at']})")


@case_app.command("create")
def create_command(
    name: str = typer.Option(..., "--name", help="The case's name."),
    track: list[int] = typer.Option([], "--track", help="A track of the person (repeat the option for more)."),
    notes: str = typer.Option("", "--notes", help="Free text."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Start a case, optionally from tracks already known to be the person."""
    from reid_app.cases import create_case  # noqa: PLC0415

    case_id = _found(lambda: create_case(_database(db), name, notes, list(track), by=cli_actor()))
    typer.echo(f"case {case_id} created")


@case_app.command("mark")
def mark_command(
    case_id: int = typer.Argument(..., help="Case id."),
    track_id: int = typer.Argument(..., help="Track id (from a search)."),
    verdict: str = typer.Argument(..., help="confirmed (same person), rejected (not this person) or undecided."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Mark a track as the case's person or not."""
    from reid_app.cases import mark_track  # noqa: PLC0415

    _found(lambda: mark_track(_database(db), case_id, track_id, verdict, by=cli_actor()))
    typer.echo(f"case {case_id}: track {track_id} {verdict}")


@case_app.command("show")
def show_command(
    case_id: int = typer.Argument(..., help="Case id."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The case: its confirmed tracks in time order (where the person was seen) and its rejected ones."""
    from reid_app.cases import case_detail  # noqa: PLC0415

    detail = _found(lambda: case_detail(_database(db), case_id))
    if as_json:
        typer.echo(json.dumps(detail, indent=2))
        return
    typer.echo(f"case {detail['case_id']}: {detail['name']}")
    if detail["notes"]:
        typer.echo(f"notes: {detail['notes']}")
    for title, tracks in (("seen (confirmed)", detail["trajectory"]), ("not this person", detail["rejected"])):
        typer.echo(f"{title}:")
        for t in tracks:
            typer.echo(f"  camera {t['camera']}  {t['start']} .. {t['end']}  track {t['track_id']}")


@case_app.command("search")
def search_command(
    case_id: int = typer.Argument(..., help="Case id."),
    top_k: int = typer.Option(10, "--top-k", help="Candidates to show."),
    threshold: float | None = typer.Option(None, "--threshold", help="Lowest cosine similarity shown."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the index (default: next to the DB)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Search again with every confirmed track of the case as the query; decided tracks are left out."""
    from reid_app.cases import search_case  # noqa: PLC0415
    from reid_app.index import IndexManager  # noqa: PLC0415

    database = _database(db, data_dir)
    indexes = IndexManager(database, database.config)
    result = _found(lambda: search_case(database, indexes, case_id, top_k, threshold, cli_actor()))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"case {case_id}: {result['confirmed']} confirmed tracks as the query")
    for hit in result["candidates"]:
        where = f"camera {hit['camera']}  {hit['time']}  track {hit['track_id']}"
        typer.echo(f"{hit['rank']:>3}  {hit['score']:.4f}  {where}")


@case_app.command("export")
def export_command(
    case_id: int = typer.Argument(..., help="Case id."),
    output: Path = typer.Option(..., "--output", help="File to write (.html or .json)."),
    fmt: str | None = typer.Option(None, "--format", help="html or json (default: from the file's suffix)."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """A self-contained HTML report or a JSON document of the case, thumbnails included."""
    from reid_app.cases import export_case  # noqa: PLC0415
    from reid_app.locks import atomic_write_bytes  # noqa: PLC0415

    chosen = fmt or output.suffix.lstrip(".").lower()
    document = _found(lambda: export_case(_database(db), case_id, chosen, by=cli_actor()))
    text = document if isinstance(document, str) else json.dumps(document, indent=2)
    atomic_write_bytes(output, text.encode())
    typer.echo(f"wrote {output}")




def audit_command(
    since: str | None = typer.Option(None, "--since", help="Entries from this age on (30d, 12h) or time (ISO 8601)."),
    limit: int = typer.Option(1000, "--limit", help="Entries at most."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The audit trail: who searched, changed or exported a case, and when (oldest first)."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from reid_app.audit import entries  # noqa: PLC0415
    from reid_app.retention import parse_age  # noqa: PLC0415
    from reid_app.store import utc_now  # noqa: PLC0415

    start = None
    if since is not None:
        try:
            start = datetime.fromisoformat(since)
            start = start.astimezone(UTC) if start.tzinfo is not None else start.replace(tzinfo=UTC)
        except ValueError:
            try:
                start = utc_now() - parse_age(since)
            except ReidAppError:
                raise ReidAppError(f"--since is an age (30d, 12h) or an ISO 8601 time, got {since[:40]!r}") from None
    rows = entries(_database(db), start, limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        details = json.dumps(row["details"])
        typer.echo(f"{row['at'][:19]}  {row['actor']:<20} {row['action']:<12} {row['target']}  {details}")


def register(app: typer.Typer) -> None:
    app.add_typer(case_app, name="case")
    app.command("audit")(audit_command)
