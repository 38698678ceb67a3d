"""``reid-app stats``: what the database holds."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, AppConfig
from reid_app.index import INDEX_KINDS, INDEX_TYPE_IVF, IndexManager
from reid_app.safetext import cell
from reid_app.store import Database, Detection, Track, Video, as_utc, require_nonempty

UNTRAINED_NOTE = (
    "the embedding model of this database is untrained (random weights): its similarities and identities "
    "are not meaningful re-identification"
)


def collect_stats(config: AppConfig) -> dict[str, Any]:
    """Per-camera counts and time spans, the model identity and the index types."""
    db = Database(config)
    info = require_nonempty(db)
    indexes = IndexManager(db, config)
    # How far this host's index was behind the shared database (rows other hosts added or deleted
    # since its last sync), then caught up.
    synced, catch_up = {}, {}
    for kind in INDEX_KINDS:
        synced[kind], report = indexes.sync(kind)
        catch_up[kind] = {
            "rows_behind": report.behind_rows,
            "deletions_behind": report.behind_deletions,
            "rebuilt": report.rebuilt,
            "seconds": round(report.seconds, 3),
        }
    cameras: dict[int, dict[str, Any]] = {}
    with db.read() as session:
        for video in session.scalars(select(Video).order_by(Video.camera_id, Video.id)):
            entry = cameras.setdefault(
                video.camera_id,
                {
                    "camera": video.camera_id,
                    "videos": 0,
                    "incomplete_videos": 0,
                    "tracks": 0,
                    "detections": 0,
                    "first_seen": None,
                    "last_seen": None,
                },
            )
            entry["videos"] += 1
            entry["incomplete_videos"] += video.status != "complete"
            start = as_utc(video.start_time)
            span = session.execute(
                select(func.min(Track.first_timestamp_s), func.max(Track.last_timestamp_s)).where(
                    Track.video_id == video.id
                )
            ).one()
            if span[0] is not None:
                first, last = start + timedelta(seconds=span[0]), start + timedelta(seconds=span[1])
                entry["first_seen"] = min(filter(None, [entry["first_seen"], first]))
                entry["last_seen"] = max(filter(None, [entry["last_seen"], last]))
        for model, key in ((Track, "tracks"), (Detection, "detections")):
            for camera_id, count in session.execute(select(model.camera_id, func.count()).group_by(model.camera_id)):
                cameras[camera_id][key] = count
        identities = session.scalar(select(func.count(func.distinct(Track.identity_id))))
    for entry in cameras.values():
        for key in ("first_seen", "last_seen"):
            entry[key] = entry[key].isoformat() if entry[key] is not None else None
    index_info = {}
    for kind, gallery in synced.items():
        meta = gallery.meta
        index_info[kind] = {
            "type": meta["type"],
            "vectors": gallery.ntotal,
            "ivf_threshold": config.ivf_threshold,
            "index_folder": str(indexes.index_dir),
            "was_behind": catch_up[kind],
            **(
                {k: meta.get(k) for k in ("nlist", "nprobe", "k_factor", "reduced_dim", "recall_at_10")}
                if meta["type"] == INDEX_TYPE_IVF
                else {}
            ),
        }
    return {
        "database": config.safe_db_url,
        "model": {
            "name": info.model_name,
            "weights_sha256": info.model_weights_sha256,
            "dim": info.model_dim,
            "trained": bool(info.model_is_trained),
        },
        "cameras": [cameras[c] for c in sorted(cameras)],
        "indexes": index_info,
        "identities": {
            "count": identities or 0,
            "threshold": info.identity_threshold,
            "computed_at": as_utc(info.identities_computed_at).isoformat() if info.identities_computed_at else None,
        },
    }


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
