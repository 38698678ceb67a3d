"""Self-contained HTML report of a search: the query beside its matches.

Every picture is embedded as a base64 ``data:`` URI, so the file can be mailed or archived on
its own. When the embedding model is untrained, the report says so at the top in red.

Everything that comes from the database is HTML-escaped (SQLite keeps text in an INTEGER
column, so even a camera id can hold markup), and a thumbnail is embedded only when it is a
JPEG of sensible size (the search already confines its path to the data folder).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np

from reid_app.errors import ReidAppError
from reid_app.safetext import plain
from reid_app.search import SearchResult
from reid_app.thumbnails import JPEG_MAGIC, read_thumbnail_file

THUMB_HEIGHT = 160
QUERY_MAX_SIDE = 480

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.warning { background: #fde2e2; border: 2px solid #c00; color: #900; padding: .8em; font-weight: bold; }
.person { display: flex; gap: 2em; align-items: flex-start; margin: 1.5em 0; border-top: 1px solid #ccc;
          padding-top: 1em; }
.query img { border: 3px solid #06c; }
.matches { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; text-align: center; font-size: 12px; }
figure img { height: 160px; border: 1px solid #999; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; }
"""


def image_data_uri(image: np.ndarray, max_side: int | None = None) -> str:
    """A BGR image as a JPEG data URI, shrunk so that its longer side is at most ``max_side``."""
    if max_side is not None and max(image.shape[:2]) > max_side:
        scale = max_side / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise ReidAppError("could not encode an image for the report")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def file_data_uri(path: str | Path | None) -> str | None:
    """A stored JPEG thumbnail as a data URI, or None if there is none, it is gone or it is not a
    JPEG thumbnail."""
    data = None if path is None else read_thumbnail_file(path)
    if data is None or not data.startswith(JPEG_MAGIC):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def esc(value: object) -> str:
    """Any value as HTML text (quotes included, for attributes), control characters removed."""
    return html.escape(plain(value), quote=True)


def _query_with_boxes(image: np.ndarray, result: SearchResult) -> np.ndarray:
    canvas = image.copy()
    thickness = max(2, round(max(image.shape[:2]) / 300))
    # The boxes as found in this image (a large query is decoded reduced; the JSON's boxes are
    # in the uploaded image's pixels).
    for person, query_person in zip(result.persons, result.query_persons, strict=True):
        x1, y1, x2, y2 = (round(v) for v in query_person.bbox)
        cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), (255, 102, 0), thickness)
        cv2.putText(canvas, str(person.person), (x1 + 4, y1 + 24), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 102, 0), 2)
    return canvas


def render_report(result: SearchResult, query_image: np.ndarray) -> str:
    """The report as an HTML string."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>reid-app search</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>reid-app search</h1>",
    ]
    if result.warning:
        parts.append(f"<p class='warning'>{esc(result.warning)}</p>")
    model = result.model
    parts.append(
        f"<p>Query: <code>{esc(result.query_image)}</code><br>Model: {esc(model['name'])} "
        f"(weights sha256 {esc(str(model['weights_sha256'])[:16])}…, dim {esc(model['dim'])}, "
        f"{'trained' if model['trained'] else 'UNTRAINED'})<br>Index: {esc(result.level)}, "
        f"{esc(result.index['type'])}, {esc(result.index['ntotal'])} vectors</p>"
    )
    query_uri = image_data_uri(_query_with_boxes(query_image, result), QUERY_MAX_SIDE)
    parts.append(f"<div class='query'><img alt='query' src='{query_uri}'></div>")
    for person, query_person in zip(result.persons, result.query_persons, strict=True):
        parts.append("<div class='person'>")
        parts.append(
            f"<figure class='query'><img alt='query person {esc(person.person)}' "
            f"src='{image_data_uri(query_person.image, 2 * THUMB_HEIGHT)}'>"
            f"<figcaption>query person {esc(person.person)}<br>{esc(person.how)}</figcaption></figure>"
        )
        parts.append("<div class='matches'>")
        if not person.hits:
            parts.append("<p>No match (none passed the filters).</p>")
        for hit in person.hits:
            uri = file_data_uri(hit.thumbnail)
            image_tag = f"<img alt='match {esc(hit.rank)}' src='{uri}'>" if uri else "<p>(thumbnail missing)</p>"
            identity = f"identity {esc(hit.identity_id)}<br>" if hit.identity_id is not None else ""
            parts.append(
                f"<figure>{image_tag}<figcaption>#{esc(hit.rank)} score {hit.score:.3f}<br>"
                f"camera {esc(hit.camera)}, track {esc(hit.track_id)}<br>{identity}"
                f"{esc(hit.time[:19].replace('T', ' '))} UTC<br>"
                f"<span title='{esc(hit.video_path)}'>{esc(Path(str(hit.video_path)).name)}</span> "
                f"@ {hit.timestamp_s:.1f}s</figcaption></figure>"
            )
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, result: SearchResult, query_image: np.ndarray) -> Path:
    """Write the HTML report; refuses to write into a folder that does not exist."""
    path = Path(path)
    if not path.parent.exists():
        raise ReidAppError(f"cannot write the report: folder {path.parent} does not exist")
    if path.is_dir():
        raise ReidAppError(f"cannot write the report: {path} is a directory")
    path.write_text(render_report(result, query_image), encoding="utf-8")
    return path
