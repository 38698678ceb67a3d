"""How the query rule of ``reid_app.search`` treats crop-shaped images: real person crops must be
accepted, crop-shaped images without a person refused.

Positives: CUHK03 "labeled" crops (64x128, real pedestrians, ``../shared/data``; a seeded random
sample), the demo query crop, and the person crops stored by an ingest (``--db``, optional).
Negatives: flat colours, noise, gradients, stripes, and crop-shaped windows of real video frames
(the repository's sample clips and the lab4cam videos) that overlap no person the detector finds
in the whole frame (a window with a partial, missed person may remain: counted as a negative).

    python benchmarks/crop_rule.py --cuhk03 300 [--db sqlite:///data/demo/reid.db]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from reid_app.config import AppConfig
from reid_app.errors import ReidAppError
from reid_app.ingest import load_detector
from reid_app.search import select_query_persons
from reid_app.store import Database, Detection
from reid_app.thumbnails import thumbnail_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def cuhk03_crops(count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    root = SHARED / "data" / "cuhk03_labeled_64x128"
    with open(root / "labels.csv") as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    chosen = np.random.default_rng(seed).choice(len(files), size=min(count, len(files)), replace=False)
    return [(files[i], cv2.imread(str(root / files[i]), cv2.IMREAD_COLOR)) for i in sorted(chosen)]


def stored_crops(db: str | None, limit: int) -> list[tuple[str, np.ndarray]]:
    """The first ``limit`` crops an ingest stored (read the way the app reads them: from the
    database, or an older row's file), on either backend."""
    if db is None:
        return []
    database = Database(AppConfig.from_env(db_url=db))
    with database.read() as session:
        ids = session.scalars(select(Detection.id).order_by(Detection.id).limit(limit)).all()
    crops = []
    for detection_id in ids:
        jpeg = thumbnail_bytes(database, detection_id)
        if jpeg is not None:
            image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            crops.append((f"stored detection {detection_id}", image))
    return crops


def synthetic_negatives(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    out = []
    for width, height in ((80, 200), (64, 128), (100, 250), (120, 200)):
        for grey in (0, 128, 255):
            out.append((f"flat {grey} {width}x{height}", np.full((height, width, 3), grey, np.uint8)))
        out.append((f"noise {width}x{height}", rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
        ramp = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
        out.append((f"gradient {width}x{height}", np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)))
        stripes = ((np.arange(width) // 8) % 2 * 255).astype(np.uint8)[None, :, None]
        out.append((f"stripes {width}x{height}", np.broadcast_to(stripes, (height, width, 3)).copy()))
    return out


def background_windows(detector, rng: np.random.Generator, per_video: int) -> list[tuple[str, np.ndarray]]:
    videos = sorted((REPO / "sample_videos").glob("*.mp4"))
    videos += sorted((SHARED / "data/lab4cam_video/videos").glob("*.mp4"))
    out = []
    for video in videos:
        capture = cv2.VideoCapture(str(video))
        capture.set(cv2.CAP_PROP_POS_FRAMES, 20)
        ok, frame = capture.read()
        capture.release()
        if not ok:
            continue
        boxes = [d.bbox for d in detector.detect(frame)]
        height, width = frame.shape[:2]
        found, tries = 0, 0
        while found < per_video and tries < 500:
            tries += 1
            w = int(rng.integers(50, max(51, width // 5)))
            h = int(w * rng.uniform(1.6, 3.0))
            if h >= height:
                continue
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if any(x < bx2 and bx1 < x + w and y < by2 and by1 < y + h for bx1, by1, bx2, by2 in boxes):
                continue
            out.append((f"{video.name} window {x},{y},{w}x{h}", frame[y : y + h, x : x + w].copy()))
            found += 1
    return out


def accepted(image: np.ndarray, detector) -> bool:
    try:
        select_query_persons(image, detector)
    except ReidAppError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuhk03", type=int, default=300, help="CUHK03 crops to sample")
    parser.add_argument("--db", default=None, help="sqlite:///PATH of an ingested database: its stored crops too")
    parser.add_argument("--stored", type=int, default=200, help="stored crops to read from --db")
    parser.add_argument("--windows", type=int, default=8, help="background windows per video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    detector = load_detector(None, "cpu")
    demo = cv2.imread(str(REPO / "sample_videos/query_cam1_red_jacket.jpg"), cv2.IMREAD_COLOR)
    groups = {
        "CUHK03 crops (person)": cuhk03_crops(args.cuhk03, args.seed),
        "demo query crop (person)": [("query_cam1_red_jacket.jpg", demo)],
        "stored ingest crops (person)": stored_crops(args.db, args.stored),
        "synthetic crop-shaped (no person)": synthetic_negatives(rng),
        "video background windows (no person)": background_windows(detector, rng, args.windows),
    }
    started = time.perf_counter()
    for name, items in groups.items():
        if not items:
            continue
        results = [(label, accepted(image, detector)) for label, image in items]
        ok = sum(a for _, a in results)
        print(f"{name}: {ok}/{len(results)} accepted, {len(results) - ok} refused")
        wrong = [label for label, a in results if a != ("(person)" in name)]
        if wrong:
            print("   misjudged:", ", ".join(wrong[:12]) + (" ..." if len(wrong) > 12 else ""))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
