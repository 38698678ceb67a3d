"""``reid-app stats``: what the database holds."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig
from reid_app.index import INDEX_TYPE_IVF
from reid_app.overview import collect_stats
from reid_app.safetext import cell

UNTRAINED_NOTE = (
    "the embedding model of this database is untrained (random weights): its similarities and identities "
    "are not meaningful re-identification"
)


def stats_command(
    db: str | None = typer.Option(
        None, "--db", help=f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the thumbnails (default: next to the DB)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show what is stored, per camera, and the model and index in use."""
    config = AppConfig.from_env(db, data_dir)
    stats = collect_stats(config)
    if not stats["model"]["trained"]:
        warn(UNTRAINED_NOTE)
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped: no 80-column cut
    table = Table(title=cell(f"reid-app stats — {stats['database']}"))
    for column in ("camera", "videos", "tracks", "detections", "first seen (UTC)", "last seen (UTC)"):
        table.add_column(column)
    for cam in stats["cameras"]:
        videos = str(cam["videos"]) + (f" ({cam['incomplete_videos']} unfinished)" if cam["incomplete_videos"] else "")
        table.add_row(
            *map(
                cell,
                (
                    cam["camera"],
                    videos,
                    cam["tracks"],
                    cam["detections"],
                    _short_time(cam["first_seen"]),
                    _short_time(cam["last_seen"]),
                ),
            )
        )
    console.print(table)
    model = stats["model"]
    console.print(
        cell(
            f"model: {model['name']}  weights sha256 {model['weights_sha256']}  dim {model['dim']}  "
            f"{'trained' if model['trained'] else 'UNTRAINED (random init)'}"
        )
    )
    for kind, entry in stats["indexes"].items():
        line = f"index {kind}: {entry['type']}, {entry['vectors']} vectors"
        if entry["type"] == INDEX_TYPE_IVF:
            line += (
                f", nlist {entry['nlist']}, nprobe {entry['nprobe']}, k_factor {entry['k_factor']},"
                f" recall@10 {entry['recall_at_10']:.3f}"
            )
        behind = entry["was_behind"]
        line += (
            f"; was {behind['rows_behind']} rows and {behind['deletions_behind']} deletions behind the database"
            f"{' (rebuilt)' if behind['rebuilt'] else ''}, caught up in {behind['seconds']:.2f} s"
        )
        line += (
            f" (exact flat search below {entry['ivf_threshold']} vectors; from there on PCA-256 IVF-SQ8"
            " candidates re-scored with the full vectors)"
        )
        console.print(cell(line))
    inference = stats["inference"]
    console.print(
        cell(
            f"inference backend on this machine: {inference['backend']} (what --backend auto runs; installed: "
            f"{', '.join(inference['installed'])}{'; CUDA GPU present' if inference['cuda'] else ''})"
        )
    )
    ident = stats["identities"]
    if ident["computed_at"]:
        console.print(
            cell(f"identities: {ident['count']} (threshold {ident['threshold']}, computed {ident['computed_at'][:19]})")
        )
    else:
        console.print("identities: not computed (run `reid-app identities`)")


def _short_time(iso: str | None) -> str:
    return "-" if iso is None else iso[:19].replace("T", " ")


def register(app: typer.Typer) -> None:
    app.command("stats")(stats_command)
