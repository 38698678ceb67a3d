"""Real multi-camera footage, judged by eye: ``../shared/data/lab4cam_video`` (four synchronised,
overlapping cameras of one lab, no identity labels) ingested as cameras 1-4, then, for each
camera-1 track, its middle crop (cut from the video frame, as an operator would) searched among the
crops of cameras 2-4. Writes one contact sheet per query (the query, then the top-k hits with
score, camera and track) to count by eye how many hits are the same person; prints the hits.

    .venv/bin/python benchmarks/lab4cam_check.py --work /tmp/lab4cam [--weights weights/X.pt] [--adapt]

The app's own commands run in subprocesses: ``reid-app ingest ... --camera N``, ``reid-app search
QUERY --detections --exclude-camera 1 --top-k K --threshold -1 --json`` and ``reid-app identities
--json`` (the identities seen by several cameras are printed). ``--adapt`` then runs ``reid-app adapt
--db URL --output WORK/site.pt --apply`` (issue 21: the site learnt from its own unlabelled tracks,
the database moved to it) and the searches and identities again, sheets in ``WORK/before`` and
``WORK/after``. Research/testing only (the footage's terms, ../shared/README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from reid_app.config import AppConfig
from reid_app.store import Database, Detection

REPO = Path(__file__).resolve().parents[1]
VIDEOS = REPO.parent / "shared" / "data" / "lab4cam_video" / "videos"
TILE_HEIGHT, TILE_WIDTH = 192, 96


def reid_app(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "reid_app.cli", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        sys.exit(f"reid-app {args[0]} failed: {last_line}")
    return result.stdout


def middle_detections_of_camera(db_url: str, camera: int) -> list[Detection]:
    """Each track's middle stored crop (by frame) on ``camera``."""
    database = Database(AppConfig(db_url=db_url))
    with database.read() as session:
        rows = session.scalars(
            select(Detection).where(Detection.camera_id == camera).order_by(Detection.track_id, Detection.frame_index)
        ).all()
        session.expunge_all()
    database.dispose()
    by_track: dict[int, list[Detection]] = {}
    for row in rows:
        by_track.setdefault(row.track_id, []).append(row)
    return [crops[len(crops) // 2] for crops in by_track.values()]


def crop_from_video(video: Path, detection: Detection) -> np.ndarray:
    capture = cv2.VideoCapture(str(video))
    capture.set(cv2.CAP_PROP_POS_FRAMES, detection.frame_index)
    ok, frame = capture.read()
    capture.release()
    if not ok:
        sys.exit(f"cannot read frame {detection.frame_index} of {video}")
    x1, y1, x2, y2 = (round(v) for v in (detection.x1, detection.y1, detection.x2, detection.y2))
    return frame[max(y1, 0) : y2, max(x1, 0) : x2]


def tile(image: np.ndarray, caption: str) -> np.ndarray:
    out = np.full((TILE_HEIGHT + 18, TILE_WIDTH, 3), 255, np.uint8)
    out[:TILE_HEIGHT] = cv2.resize(image, (TILE_WIDTH, TILE_HEIGHT), interpolation=cv2.INTER_AREA)
    cv2.putText(out, caption, (2, TILE_HEIGHT + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def search_sheets(db_url: str, videos: list[Path], sheets: Path, model: list[str], top_k: int) -> None:
    """One contact sheet per camera-1 track (its middle crop searched among cameras 2-4)."""
    sheets.mkdir(parents=True, exist_ok=True)
    for detection in middle_detections_of_camera(db_url, camera=1):
        query = crop_from_video(videos[0], detection)
        query_path = sheets / f"query_track{detection.track_id}.png"
        cv2.imwrite(str(query_path), query)
        found = json.loads(reid_app(
            "search", str(query_path), "--db", db_url, "--detections", "--exclude-camera", "1",
            "--top-k", str(top_k), "--threshold", "-1", "--json", *model,
        ))  # fmt: skip
        hits = found["persons"][0]["results"] if found["persons"] else []
        tiles = [tile(query, f"query t{detection.track_id}")]
        print(f"camera-1 track {detection.track_id} (detection {detection.id}, frame {detection.frame_index}):")
        for hit in hits:
            print(f"  {hit['rank']:>2}  {hit['score']:.3f}  camera {hit['camera']}  track {hit['track_id']}")
            thumbnail = cv2.imread(str(REPO / hit["thumbnail"]), cv2.IMREAD_COLOR)
            tiles.append(tile(thumbnail, f"{hit['rank']} {hit['score']:.2f} c{hit['camera']} t{hit['track_id']}"))
        sheet = sheets / f"sheet_track{detection.track_id}.png"
        cv2.imwrite(str(sheet), np.hstack(tiles))
        print(f"  contact sheet: {sheet}")


def print_identities(db_url: str) -> None:
    found = json.loads(reid_app("identities", "--db", db_url, "--json"))
    groups = found["identities"]
    several = [g for g in groups if len(g["cameras"]) > 1]
    print(f"identities (distance <= {found['threshold']}): {len(groups)}, {len(several)} seen by several cameras")
    for group in groups:
        print(f"  identity {group['identity_id']}: cameras {group['cameras']}, tracks {group['track_ids']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the database, crops and sheets")
    parser.add_argument("--weights", help="FA-Net weights (default: the shipped model)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--adapt", action="store_true", help="then adapt --apply and everything again")
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        sys.exit(f"{args.work} is not empty: give a new folder")
    args.work.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{args.work / 'reid.db'}"
    model = ["--weights", args.weights] if args.weights else []
    videos = sorted(VIDEOS.glob("cam*.mp4"))
    for camera, video in enumerate(videos, start=1):
        reid_app("ingest", str(video), "--camera", str(camera), "--db", db_url, "--quiet", *model)
    search_sheets(db_url, videos, args.work / "before" if args.adapt else args.work, model, args.top_k)
    print_identities(db_url)
    if not args.adapt:
        return
    site = args.work / "site.pt"
    print(reid_app("adapt", "--db", db_url, "--output", str(site), "--apply", "--quiet", *model).strip())
    print("after adapt --apply:")
    search_sheets(db_url, videos, args.work / "after", ["--weights", str(site)], args.top_k)
    print_identities(db_url)


if __name__ == "__main__":
    main()
