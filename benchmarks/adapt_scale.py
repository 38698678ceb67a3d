"""Time and peak memory of ``reid-app adapt`` and ``reid-app reembed`` at several crop counts.

    .venv/bin/python benchmarks/adapt_scale.py [--crops 1000 5000 20000] [--epochs 0] [--skip-adapt]
        [--skip-reembed] [--work /tmp/adapt_scale] [--weights FILE]

Crops: CUHK03's training images, then PETA's training subsets (CAVIAR4REID, 3DPeS, SARC3D,
TownCentre), real person crops, taken in file order. For adapt they form a tracklet folder with
one track per person and camera (as a tracker gives); for reembed, a database of the same crops
(one video per camera, one track per tracklet, each crop a stored JPEG thumbnail with a
placeholder vector of another model) is moved to ``--weights``. Each command runs as its own
process (the real CLI); wall time and that process's peak RSS (``ru_maxrss`` of the child) are
printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from fanet.weights import REPO_WEIGHTS_DIR
from reid_app.config import AppConfig
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS
from reid_app.store import Database, DatabaseInfo, Detection, Thumbnail, Track, Video, vector_to_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared"
PETA_TRAIN = ("CAVIAR4REID", "3DPeS", "SARC3D", "TownCentre")


def crop_list() -> list[tuple[str, str, str]]:
    """(camera, person, path) of every training crop, CUHK03 first."""
    rows = []
    cuhk = SHARED / "data" / "cuhk03_labeled_64x128"
    with (cuhk / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            camera = int(row["cam_pair_probable"]) * 2 + int(row["camid"]) - 2
            rows.append((f"c{camera}", f"cuhk{row['pid']}", str(cuhk / row["file"])))
    with (SHARED / "data" / "peta_reid" / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["subset"] in PETA_TRAIN:
                camera = f"{row['subset']}{row['camid']}"
                rows.append((camera, row["pid"], str(SHARED / "data" / "peta_reid" / row["file"])))
    return rows


def tracklet_folder(crops: list[tuple[str, str, str]], folder: Path) -> None:
    for camera, person, path in crops:
        target = folder / camera / person / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path)


def database(crops: list[tuple[str, str, str]], folder: Path) -> str:
    url = f"sqlite:///{folder / 'reid.db'}"
    db = Database(AppConfig(db_url=url, data_dir=folder), create=True)
    cameras = sorted({c for c, _, _ in crops})
    now = datetime.now(UTC)
    placeholder = vector_to_bytes(np.full(8, 1 / np.sqrt(8), np.float32))

    def work(session) -> None:  # noqa: ANN001
        session.add(DatabaseInfo(id=1, uuid="00000000-0000-4000-8000-000000000000", created_at=now,
                                 model_name="placeholder.pt", model_weights_sha256="0" * 64, model_dim=8,
                                 model_is_trained=True))  # fmt: skip
        for number, camera in enumerate(cameras, start=1):
            video = Video(path=f"{camera}.mp4", sha256=f"{number:064d}", camera_id=number, fps=10.0, frame_count=1,
                          width=640, height=480, sample_fps=2.0, start_time=now, status="complete",
                          last_committed_frame=0, detector="benchmark", created_at=now)  # fmt: skip
            session.add(video)
            session.flush()
            people: dict[str, list[str]] = {}
            for c, person, path in crops:
                if c == camera:
                    people.setdefault(person, []).append(path)
            for tracker_id, paths in enumerate(people.values()):
                track = Track(video_id=video.id, camera_id=number, tracker_id=tracker_id, first_frame=0, last_frame=0,
                              first_timestamp_s=0.0, last_timestamp_s=1.0, num_crops=len(paths),
                              embedding=placeholder)  # fmt: skip
                session.add(track)
                session.flush()
                for path in paths:
                    image = cv2.imread(path)
                    height, width = image.shape[:2]
                    detection = Detection(track_id=track.id, video_id=video.id, camera_id=number, frame_index=0,
                                          timestamp_s=0.0, x1=0.0, y1=0.0, x2=float(width), y2=float(height),
                                          score=0.9, thumbnail_path="", embedding=placeholder)  # fmt: skip
                    session.add(detection)
                    session.flush()
                    session.add(Thumbnail(detection_id=detection.id, jpeg=cv2.imencode(".jpg", image)[1].tobytes()))

    db.write(work)
    db.dispose()
    return url


def timed(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one CLI process (its own rusage, from wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command[2:4])} failed (exit {process.returncode})")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--epochs", type=int, default=0, help="as reid-app adapt: 0 = the camera means alone")
    parser.add_argument("--weights", default=str(REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapt_scale"))
    parser.add_argument("--skip-adapt", action="store_true")
    parser.add_argument("--skip-reembed", action="store_true")
    args = parser.parse_args()
    everything = crop_list()
    cli = [sys.executable, "-m", "reid_app.cli"]
    print(f"{len(everything)} training crops available; weights {Path(args.weights).name}", flush=True)
    for count in args.crops:
        crops = everything[:count]
        folder = args.work / str(count)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if not args.skip_adapt:
            tracklet_folder(crops, folder / "tracklets")
            tracks = sum(1 for _ in (folder / "tracklets").glob("*/*"))
            command = [*cli, "adapt", "--from-folder", str(folder / "tracklets"), "--weights", args.weights,
                       "--output", str(folder / "adapted.pt"), "--epochs", str(args.epochs), "--quiet"]  # fmt: skip
            seconds, peak = timed(command)
            print(f"adapt   {len(crops):>6} crops ({tracks} tracks, {args.epochs} epochs): {seconds:7.0f} s, "
                  f"peak RSS {peak:6.0f} MB", flush=True)  # fmt: skip
        if not args.skip_reembed:
            url = database(crops, folder)
            seconds, peak = timed([*cli, "reembed", "--weights", args.weights, "--db", url, "--quiet"])
            print(f"reembed {len(crops):>6} crops: {seconds:7.0f} s, peak RSS {peak:6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
