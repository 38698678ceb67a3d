"""An ingest killed with SIGKILL and re-run while ``reid-app serve`` searches the same database
stores exactly the rows of an uninterrupted run (without a server).

Two copies of the demo gallery (``serve_load.py --work``): in copy A, a server runs and a client
searches it without pause while ``--video`` (default: sample clip 2) is ingested as camera 9,
killed after ``--kill-after`` seconds, then ingested again to the end. In copy B the same video is
ingested once, no server. Compared: camera 9's tracks and detections (frame, box to 0.1 px, track membership), and that
the server's index holds every new vector without a restart.

    python benchmarks/kill_while_serving.py --work /tmp/reid_serve_load --kill-after 10

``--kill-at-rows N`` kills instead as soon as N tracks of camera 9 are committed: the kill then
certainly lands after a partial commit, so the re-run takes the "interrupted ingest is redone"
path (use a video long enough to commit more than once, e.g. a lab4cam camera).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx

REPO = Path(__file__).resolve().parents[1]
DEMO_QUERY = REPO / "sample_videos/query_cam1_red_jacket.jpg"
CAMERA = 9  # a camera the gallery does not have
FLAGS = ["--camera", str(CAMERA), "--quiet", "--start-time", "2024-05-01T10:00:00"]


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reid_app", *args], cwd=REPO, **kwargs)


def rows(folder: Path) -> tuple[int, int, list[tuple]]:
    with sqlite3.connect(f"file:{folder / 'reid.db'}?mode=ro", uri=True) as connection:
        tracks = connection.execute(
            "SELECT id FROM tracks WHERE camera_id = ? ORDER BY first_frame, id", (CAMERA,)
        ).fetchall()
        number = {track_id: n for n, (track_id,) in enumerate(tracks)}
        detections = connection.execute(
            "SELECT track_id, frame_index, x1, y1, x2, y2 FROM detections WHERE camera_id = ?", (CAMERA,)
        ).fetchall()
    shape = sorted((number[t], f, *(round(v, 1) for v in box)) for t, f, *box in detections)
    return len(tracks), len(detections), shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reid_serve_load"))
    parser.add_argument("--video", type=Path, default=REPO / "sample_videos/cam2_square_right.mp4")
    parser.add_argument("--kill-after", type=float, default=10.0)
    parser.add_argument("--kill-at-rows", type=int, default=0, help="kill once this many tracks are committed")
    args = parser.parse_args()
    copies = {name: args.work.with_name(args.work.name + f"_{name}") for name in "AB"}
    for folder in copies.values():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(args.work, folder, ignore=shutil.ignore_patterns("camera3_*"))
        # The gallery's row ids and thumbnails are copied; the index files too (rebuilt if stale).
    video = args.work / f"kill_{args.video.name}"
    shutil.copy(args.video, video)

    # B: the uninterrupted reference, no server (its wall time and peak memory: the soak figures).
    url_b = f"sqlite:///{copies['B'] / 'reid.db'}"
    capture = cv2.VideoCapture(str(video))
    duration = capture.get(cv2.CAP_PROP_FRAME_COUNT) / (capture.get(cv2.CAP_PROP_FPS) or 25.0)
    size = f"{int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))}x{int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))}"
    capture.release()
    started = time.perf_counter()
    assert cli("ingest", str(video), "--db", url_b, *FLAGS).wait() == 0
    wall_b = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # only B has ended so far
    print(
        f"uninterrupted ingest of {video.name} ({size}, {duration:.1f} s): {wall_b:.1f} s, "
        f"real-time factor {wall_b / duration:.2f}, peak RSS {peak_mb:.0f} MB"
    )

    # A: the server and a searching client, the ingest killed then re-run.
    url_a = f"sqlite:///{copies['A'] / 'reid.db'}"
    server = cli("serve", "--db", url_a, "--port", "8791", stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "serving" in line:
            break
    threading.Thread(target=server.stderr.read, daemon=True).start()
    stop, served, failed = threading.Event(), [0], [0]

    def searching() -> None:
        with httpx.Client(base_url="http://127.0.0.1:8791", timeout=120) as http:
            while not stop.is_set():
                response = http.post("/api/v1/search", files={"image": ("q.jpg", DEMO_QUERY.read_bytes())})
                served[0] += 1
                failed[0] += response.status_code != 200

    client = threading.Thread(target=searching)
    client.start()
    first = cli("ingest", str(video), "--db", url_a, *FLAGS)
    started = time.perf_counter()
    if args.kill_at_rows > 0:
        while first.poll() is None and rows(copies["A"])[0] < args.kill_at_rows:
            time.sleep(0.1)
    else:
        time.sleep(args.kill_after)
    waited = time.perf_counter() - started
    killed = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = rows(copies["A"])[:2]
    rerun = cli("ingest", str(video), "--db", url_a, *FLAGS, stdout=subprocess.PIPE, text=True)
    note = rerun.communicate()[0]
    stop.set()
    client.join()
    index = httpx.get("http://127.0.0.1:8791/api/v1/cameras", timeout=60).json()["indexes"]
    server.terminate()
    server.wait()
    video.unlink()

    a, b = rows(copies["A"]), rows(copies["B"])
    print(f"killed mid-run: {killed} (after {waited:.1f} s: {partial[0]} tracks, {partial[1]} crops stored)")
    status = "redone after an interrupted run" if "redone" in note else "not a redo"
    print(f"re-run: {status}; rc {rerun.returncode}")
    print(f"camera {CAMERA}, killed + re-run with the server reading: {a[0]} tracks, {a[1]} crops")
    print(f"camera {CAMERA}, uninterrupted, no server:                {b[0]} tracks, {b[1]} crops")
    print(f"identical rows (frame, box to 0.1 px, track membership): {a[2] == b[2]}")
    with sqlite3.connect(f"file:{copies['A'] / 'reid.db'}?mode=ro", uri=True) as connection:
        stored = connection.execute("SELECT count(*) FROM tracks").fetchone()[0]
    print(f"server's tracks index after the re-run: {index['tracks']['vectors']} vectors, database {stored} tracks")
    print(f"searches served meanwhile: {served[0]}, failed: {failed[0]}")


if __name__ == "__main__":
    main()
