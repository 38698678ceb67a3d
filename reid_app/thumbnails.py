"""Thumbnails of stored crops, wherever they are kept: one way in for every host and face.

New crops keep their JPEG in the database (:class:`reid_app.store.Thumbnail`), so a search host
sees the thumbnails of every ingest host. Crops of databases made before that keep
``thumbnail_path``, a file under the data folder of the host that ingested them.

* :func:`thumbnail_bytes` — the JPEG bytes of a crop by detection id (what a server sends).
* :func:`thumbnail_file` — a local file path of it (what the CLI table and the HTML report show):
  a database thumbnail is copied once into this host's cache,
  ``<data folder>/thumbnails/<database uuid>/cache/<detection id>.jpg``; the index sync removes
  the cached copies of deleted crops (:mod:`reid_app.index`).

A row is data, not a file name to trust: a ``thumbnail_path`` that leads outside the data folder
(absolute, ``..``, a symbolic link out) counts as no thumbnail, so nothing outside the data folder
is ever read on a row's say-so.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import delete, select

from reid_app.config import AppConfig
from reid_app.locks import atomic_write_bytes
from reid_app.store import Database, Detection, Thumbnail

#: Stored thumbnails are JPEGs of at most 256 px a side: tens of KB. Anything bigger is not one.
MAX_THUMBNAIL_BYTES = 4 << 20
#: How every JPEG file starts (SOI marker + the next marker's 0xFF): what is sent or shown as a
#: thumbnail must start so.
JPEG_MAGIC = b"\xff\xd8\xff"


def stored_crop_side(thumbnail_max_side: int, input_size: tuple[int, int], crop_hw: tuple[int, int]) -> int:
    """The longest side ingest stores a crop of ``crop_hw`` (height, width) pixels at: at most the
    configured side, unless one of the crop's sides would then fall below what the embedder's input
    (height, width) takes of it, so that ``reid-app reembed`` with a model of that input size gets
    at least the pixels ingest gave the embedder."""
    height, width = crop_hw
    long_side = max(height, width, 1)
    scale = min(1.0, thumbnail_max_side / long_side)
    scale = max(scale, min(height, input_size[0]) / max(height, 1), min(width, input_size[1]) / max(width, 1))
    return math.ceil(min(1.0, scale) * long_side)


def confined_thumbnail(data_dir: Path, stored: object) -> str | None:
    """The absolute path a row's ``thumbnail_path`` names inside ``data_dir`` (symbolic links
    resolved), or None when it leads anywhere else."""
    if not stored:
        return None
    try:
        root = data_dir.resolve()
        path = (root / str(stored)).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop
        return None
    return str(path) if path != root and path.is_relative_to(root) else None


def cache_path(config: AppConfig, db_uuid: str, detection_id: int) -> Path:
    return config.thumbnails_dir / db_uuid / "cache" / f"{int(detection_id)}.jpg"


def thumbnail_bytes(db: Database, detection_id: int) -> bytes | None:
    """The JPEG of crop ``detection_id``: from the database, or the file of an older row; None
    when the crop or its thumbnail is gone."""
    with db.read() as session:
        jpeg = session.scalar(select(Thumbnail.jpeg).where(Thumbnail.detection_id == int(detection_id)))
        stored = None if jpeg is not None else session.scalar(
            select(Detection.thumbnail_path).where(Detection.id == int(detection_id))
        )
    if jpeg is not None:
        return bytes(jpeg)
    path = confined_thumbnail(db.config.storage_dir, stored)
    return None if path is None else read_thumbnail_file(path)


def read_thumbnail_file(path: str | Path) -> bytes | None:
    """A thumbnail file's bytes, or None when it is gone or too big to be a thumbnail (read with
    a bound, so a huge file in its place costs nothing)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_THUMBNAIL_BYTES + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_THUMBNAIL_BYTES else None


def thumbnail_file(db: Database, detection: Detection) -> str | None:
    """A readable local file of ``detection``'s thumbnail, or None (see the module docstring)."""
    if detection.thumbnail_path:
        return confined_thumbnail(db.config.storage_dir, detection.thumbnail_path)
    path = cache_path(db.config, db.uuid, detection.id)
    if not path.exists():
        data = thumbnail_bytes(db, detection.id)
        if data is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return str(path)


def drop_cached(config: AppConfig, db_uuid: str, detection_ids: Iterable[int]) -> int:
    """Remove this host's cached thumbnails of ``detection_ids``; returns how many there were."""
    removed = 0
    for detection_id in detection_ids:
        with contextlib.suppress(FileNotFoundError):
            cache_path(config, db_uuid, detection_id).unlink()
            removed += 1
    return removed


def remove_files(config: AppConfig, relative_paths: Iterable[str]) -> int:
    """Delete thumbnail files of older rows (paths relative to the data folder, confined to it);
    returns how many existed."""
    removed = 0
    for relative in relative_paths:
        path = confined_thumbnail(config.storage_dir, relative)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()
                removed += 1
    return removed


def finish_file_deletions(db: Database) -> int:
    """Remove the thumbnail files that deletions recorded (:class:`reid_app.store.PendingFileDeletion`)
    and then their records: what a run killed between its commit and its file removal left."""
    from reid_app.store import PendingFileDeletion

    with db.read() as session:
        pending = session.execute(select(PendingFileDeletion.id, PendingFileDeletion.path)).all()
    if not pending:
        return 0
    removed = remove_files(db.config, [row[1] for row in pending])
    ids = [row[0] for row in pending]

    def work(session) -> None:  # noqa: ANN001
        for start in range(0, len(ids), 900):
            session.execute(delete(PendingFileDeletion).where(PendingFileDeletion.id.in_(ids[start : start + 900])))

    db.write(work)
    return removed
