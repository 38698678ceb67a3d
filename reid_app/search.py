"""Search the gallery with a query image.

Which part of the query image is embedded (the rule):

1. The detector runs on the whole image.
2. The image is **crop-like** when its height/width ratio is between 1.2 and 4 (a standing
   person's crop is about 2:1) *and* either the largest person box covers at least half the
   image, or the detector finds nobody at its usual confidence but does find a person in a
   *context view* of the image: the image scaled up to at least 256 px high and set on a grey
   canvas (half its width added on each side, a tenth of its height above and below), searched
   at confidence 0.15, with a box at least half the image's height. Tight crops often have too
   little context (and too few pixels) for a detector at its usual setting, which is why the
   second look exists; an image in which even that look finds nobody (a flat grey rectangle,
   noise, a patch of pavement) is no person and is refused. A crop-like image is embedded as it
   is, as one person. Measured in benchmarks/RESULTS.md (query rule): how many real crops
   (CUHK03, stored ingest crops) it refuses, and how many person-free crops it lets through.
3. Otherwise, when the detector finds persons, the largest box is the query (``--all``: every
   box, each searched separately).
4. Otherwise the query has no person: a one-line error. CLI and HTTP API share this rule.

The detector looks at a small query (a crop) at its own size rounded up to the detector's stride,
at least 160 px, instead of blowing it up to the 640 px of a video frame: the person fills a crop,
so the larger input found nobody the smaller one misses, and it cost about 4x the compute per
search. A 160 px floor (was 256) accepted as many real crops and refused as many person-free
ones, at about two thirds of the detector's time (benchmarks/RESULTS.md, query rule and serve load).

Results are database rows ranked by cosine similarity (inner product of unit vectors): one per
track (pooled embedding, the default) or one per stored crop (``--detections``).

Thumbnails are found through :mod:`reid_app.thumbnails` (in the database, or an older row's file
confined to the data folder).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from reid_app.config import AppConfig
from reid_app.detect import DEFAULT_IMGSZ
from reid_app.errors import ReidAppError
from reid_app.images import read_image
from reid_app.index import IndexManager
from reid_app.store import (
    DamagedValueError,
    Database,
    DatabaseInfo,
    Detection,
    Track,
    Video,
    as_utc,
    require_nonempty,
)
from reid_app.thumbnails import confined_thumbnail, thumbnail_file  # noqa: F401 (confined_thumbnail: re-exported)
from reid_app.track import crop

CROP_MIN_ASPECT = 1.2
CROP_MAX_ASPECT = 4.0
CROP_MIN_COVERAGE = 0.5
#: The context view of rule 2 (module docstring): at least this high, padded with YOLO's own
#: letterbox grey, searched at this confidence; a box must be this fraction of the crop's height.
CONTEXT_MIN_HEIGHT = 256
CONTEXT_PAD_X = 0.5
CONTEXT_PAD_Y = 0.1
CONTEXT_GREY = (114, 114, 114)
CONTEXT_CONFIDENCE = 0.15
CONTEXT_MIN_BOX_HEIGHT = 0.5
QUERY_MIN_IMGSZ = 160
DETECTOR_STRIDE = 32
#: Most results asked for per query person (README.md, Limits); a gallery smaller than that gives
#: all it has: the index is never asked for more rows than it holds.
MAX_TOP_K = 10_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

SearchLevel = Literal["tracks", "detections"]


@dataclass
class SearchOptions:
    top_k: int = 10
    cameras: list[int] = field(default_factory=list)
    exclude_cameras: list[int] = field(default_factory=list)
    threshold: float | None = None
    level: SearchLevel = "tracks"
    all_persons: bool = False

    def validate(self) -> None:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ReidAppError(f"--top-k must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        if self.cameras and self.exclude_cameras:
            raise ReidAppError("use either --camera or --exclude-camera, not both")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ReidAppError(f"--threshold is a cosine similarity in [-1, 1], got {self.threshold}")


@dataclass
class QueryPerson:
    """One person in the query image: its box in the image and how it was chosen."""

    bbox: tuple[float, float, float, float]
    how: str  # "whole image (crop-like)" or "detected person"
    image: np.ndarray  # BGR crop that is embedded
    detector_score: float | None = None


@dataclass
class SearchHit:
    rank: int
    score: float
    camera: int
    video_id: int
    video_path: str
    frame_index: int
    timestamp_s: float
    time: str  # absolute UTC time: video start time + timestamp
    track_id: int
    detection_id: int | None  # the matched crop (detections level) or the track's best crop
    identity_id: int | None
    bbox: list[float]
    thumbnail: str | None  # absolute path of the JPEG thumbnail; None if its row points outside the data folder


@dataclass
class PersonResults:
    person: int
    bbox: list[float]
    how: str
    hits: list[SearchHit]


@dataclass
class SearchResult:
    query_image: str
    level: SearchLevel
    warning: str | None
    model: dict[str, Any]
    index: dict[str, Any]
    persons: list[PersonResults]
    query_persons: list[QueryPerson]
    #: Why matches were left out: one line per result whose database rows are damaged.
    skipped: list[str] = field(default_factory=list)

    def skipped_warning(self) -> str | None:
        """One line on the results left out, or None."""
        if not self.skipped:
            return None
        count = len(self.skipped)
        return f"{count} {'match' if count == 1 else 'matches'} left out: {self.skipped[0]}"

    def to_json_dict(self) -> dict[str, Any]:
        """Machine-readable form; keys are stable."""
        return {
            "query_image": self.query_image,
            "level": self.level,
            "matches_are_meaningful": self.warning is None,
            "warning": self.warning,
            "model": self.model,
            "index": self.index,
            "persons": [
                {
                    "person": p.person,
                    "bbox": p.bbox,
                    "how": p.how,
                    "results": [asdict(hit) for hit in p.hits],
                }
                for p in self.persons
            ],
        }


def load_query_image(path: str | Path) -> np.ndarray:
    """Read a query image (BGR; a large one reduced: :func:`reid_app.images.read_image`); a missing,
    non-image or too large file is a one-line error."""
    return read_image(path, "query image").pixels


def is_crop_like(image_shape: tuple[int, ...], largest_box_area: float | None) -> bool:
    """Rule 2 of the module docstring."""
    height, width = image_shape[:2]
    aspect = height / max(width, 1)
    if not CROP_MIN_ASPECT <= aspect <= CROP_MAX_ASPECT:
        return False
    return largest_box_area is None or largest_box_area >= CROP_MIN_COVERAGE * height * width


def context_view(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Rule 2's second look: (the crop scaled up and padded with grey, the crop's height in it)."""
    height, width = image.shape[:2]
    scale = max(1.0, CONTEXT_MIN_HEIGHT / height)
    if scale > 1.0:
        image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_CUBIC)
    height, width = image.shape[:2]
    pad_x, pad_y = round(width * CONTEXT_PAD_X), round(height * CONTEXT_PAD_Y)
    view = cv2.copyMakeBorder(image, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_CONSTANT, value=CONTEXT_GREY)
    return view, height


def query_imgsz(image_shape: tuple[int, ...]) -> int | None:
    """The detector input size for a query image (module docstring); None: the configured size."""
    long_side = max(image_shape[:2])
    size = max(QUERY_MIN_IMGSZ, -(-long_side // DETECTOR_STRIDE) * DETECTOR_STRIDE)
    return size if size < DEFAULT_IMGSZ else None


def crop_shows_person(image: np.ndarray, detector: Any) -> bool:
    """Whether the detector finds a person filling the crop-shaped ``image`` in its context view."""
    view, crop_height = context_view(image)
    boxes = detector.detect(view, confidence=CONTEXT_CONFIDENCE, imgsz=query_imgsz(view.shape))
    return any(box.height >= CONTEXT_MIN_BOX_HEIGHT * crop_height for box in boxes)


def select_query_persons(
    image: np.ndarray, detector: Any, all_persons: bool = False, shown_size: tuple[int, int] | None = None
) -> list[QueryPerson]:
    """The person(s) of the query image to search for (the rule in the module docstring).
    ``shown_size``: (width, height) of the upright file to name in a message, when ``image`` was
    decoded reduced."""
    height, width = image.shape[:2]
    boxes = sorted(detector.detect(image, imgsz=query_imgsz(image.shape)), key=lambda d: d.area, reverse=True)
    largest_area = boxes[0].area if boxes else None
    if is_crop_like(image.shape, largest_area) and (boxes or crop_shows_person(image, detector)):
        return [QueryPerson(bbox=(0.0, 0.0, float(width), float(height)), how="whole image (crop-like)", image=image)]
    if not boxes:
        shown_width, shown_height = shown_size or (width, height)
        raise ReidAppError(
            f"no person found in the query image ({shown_width}x{shown_height}); give a person crop or a frame "
            "showing a person"
        )
    chosen = boxes if all_persons else boxes[:1]
    return [
        QueryPerson(bbox=tuple(d.bbox), how="detected person", image=crop(image, d.bbox), detector_score=d.score)
        for d in chosen
    ]


def _allowed_ids(session: Session, level: SearchLevel, options: SearchOptions) -> np.ndarray | None:
    if not options.cameras and not options.exclude_cameras:
        return None
    model = Track if level == "tracks" else Detection
    query = select(model.id)
    if options.cameras:
        query = query.where(model.camera_id.in_(options.cameras))
    else:
        query = query.where(model.camera_id.not_in(options.exclude_cameras))
    return np.asarray(session.scalars(query).all(), dtype=np.int64)


def best_detections(session: Session, track_ids: list[int]) -> dict[int, Detection]:
    """The crop that represents each track: its highest-scoring stored detection (ties: lowest id)."""
    best: dict[int, Detection] = {}
    query = (
        select(Detection)
        .where(Detection.track_id.in_(track_ids))
        .order_by(Detection.track_id, Detection.score.desc(), Detection.id)
    )
    for detection in session.scalars(query):
        best.setdefault(detection.track_id, detection)
    return best


def _rows_by_id(session: Session, model: type, ids: Iterable[int]) -> dict[int, Any]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    return {row.id: row for row in session.scalars(select(model).where(model.id.in_(ids)))}


def hits_for_rows(
    session: Session, db: Database, level: SearchLevel, ranked: list[tuple[float, int]], skipped: list[str]
) -> list[SearchHit]:
    """The results for index rows ``ranked`` (score, row id), best first, read in a few queries.
    Rows that are gone are skipped: another process may delete them (a redone or failed ingest,
    prune, forget) between the index sync and this read. A row damaged by a hand edit fails the
    read of all (:class:`reid_app.store.DamagedValueError`): the rows are then read one result at a
    time, and the results of damaged rows left out, their messages added to ``skipped``."""
    try:
        return _hits_read_together(session, db, level, ranked)
    except DamagedValueError:
        pass
    hits: list[SearchHit] = []
    for score, row_id in ranked:
        try:
            track, detection, video = _rows_of_one(session, level, row_id)
            if detection is not None and video is not None:
                hits.append(_hit(len(hits) + 1, score, track, detection, video, db))
        except DamagedValueError as exc:
            skipped.append(str(exc))
    return hits


def _hits_read_together(
    session: Session, db: Database, level: SearchLevel, ranked: list[tuple[float, int]]
) -> list[SearchHit]:
    row_ids = [row_id for _, row_id in ranked]
    if level == "tracks":
        tracks = _rows_by_id(session, Track, row_ids)
        detections = best_detections(session, list(tracks))
        pairs = [(tracks.get(row_id), detections.get(row_id)) for row_id in row_ids]
    else:
        by_id = _rows_by_id(session, Detection, row_ids)
        tracks = _rows_by_id(session, Track, (d.track_id for d in by_id.values()))
        pairs = [
            (tracks.get(by_id[row_id].track_id) if row_id in by_id else None, by_id.get(row_id))
            for row_id in row_ids
        ]
    videos = _rows_by_id(session, Video, (track.video_id for track, _ in pairs if track is not None))
    hits: list[SearchHit] = []
    for (score, _), (track, detection) in zip(ranked, pairs, strict=True):
        video = videos.get(track.video_id) if track is not None else None
        if detection is not None and video is not None:
            hits.append(_hit(len(hits) + 1, score, track, detection, video, db))
    return hits


def _rows_of_one(
    session: Session, level: SearchLevel, row_id: int
) -> tuple[Track | None, Detection | None, Video | None]:
    """The track, crop and video of one index row, read alone (None where gone)."""
    if level == "tracks":
        track = session.get(Track, row_id)
        detection = best_detections(session, [row_id]).get(row_id)
    else:
        detection = session.get(Detection, row_id)
        track = session.get(Track, detection.track_id) if detection is not None else None
    video = session.get(Video, track.video_id) if track is not None else None
    return track, detection, video


def _hit(rank: int, score: float, track: Track, detection: Detection, video: Video, db: Database) -> SearchHit:
    timestamp = detection.timestamp_s
    return SearchHit(
        rank=rank,
        score=round(float(score), 6),
        camera=track.camera_id,
        video_id=video.id,
        video_path=video.path,
        frame_index=detection.frame_index,
        timestamp_s=round(timestamp, 3),
        time=(as_utc(video.start_time) + timedelta(seconds=timestamp)).isoformat(),
        track_id=track.id,
        detection_id=detection.id,
        identity_id=track.identity_id,
        bbox=[round(v, 1) for v in detection.bbox],
        thumbnail=thumbnail_file(db, detection),
    )


def model_dict(info: DatabaseInfo) -> dict[str, Any]:
    return {
        "name": info.model_name,
        "weights_sha256": info.model_weights_sha256,
        "dim": info.model_dim,
        "trained": bool(info.model_is_trained),
    }


def run_search(
    config: AppConfig,
    query_path: str | Path,
    options: SearchOptions,
    *,
    embedder: Any,
    detector: Any,
    db: Database | None = None,
    indexes: IndexManager | None = None,
) -> SearchResult:
    """Search the gallery for the person(s) in ``query_path``. ``embedder`` must already have been
    checked against the database's model (:func:`reid_app.store.check_model_identity`).
    ``indexes``: a long-lived process (the server) passes its own, so the index is read from disk
    once and then only brought up to date with what other processes added."""
    options.validate()
    decoded = read_image(query_path, "query image")
    image = decoded.pixels
    # A large image is decoded reduced: the boxes reported are in the pixels of the upright file,
    # as a viewer shows it (the decoder has applied its EXIF orientation already).
    scale = decoded.reduction
    db = db or Database(config)
    info = require_nonempty(db)
    persons = select_query_persons(image, detector, options.all_persons, decoded.size)
    vectors = embedder.embed([p.image for p in persons])
    gallery, _ = (indexes or IndexManager(db, config)).sync(options.level)
    results: list[PersonResults] = []
    skipped: list[str] = []
    with db.read() as session:
        allowed = _allowed_ids(session, options.level, options)
        for number, (person, vector) in enumerate(zip(persons, vectors, strict=True), start=1):
            hits: list[SearchHit] = []
            if allowed is None or len(allowed):
                top_k = min(options.top_k, gallery.ntotal if allowed is None else len(allowed))
                scores, ids = gallery.search(vector[None, :], top_k, allowed)
                ranked = [
                    (float(score), int(row_id))
                    for score, row_id in zip(scores[0], ids[0], strict=True)
                    if row_id >= 0 and (options.threshold is None or score >= options.threshold)
                ]
                hits = hits_for_rows(session, db, options.level, ranked, skipped)
            results.append(
                PersonResults(
                    person=number, bbox=[round(v * scale, 1) for v in person.bbox], how=person.how, hits=hits
                )
            )
    return SearchResult(
        query_image=str(Path(query_path).resolve()),
        level=options.level,
        warning=embedder.warning(),
        model=model_dict(info),
        index={"kind": options.level, "type": gallery.index_type, "ntotal": gallery.ntotal},
        persons=results,
        query_persons=persons,
        skipped=skipped,
    )
