"""N concurrent clients searching ``reid-app serve`` while an ingest of another camera writes the
same database: requests served, latency percentiles, errors, and whether the new camera became
searchable without a restart.

Setup (``--work DIR``, reused when it exists): the demo gallery, both sample clips ingested as
cameras 1 and 2 with the shipped model. The server runs as its own process on a free local port.
At ``--ingest-after`` seconds an ``reid-app ingest`` process adds ``--ingest-video`` (default: the
lab4cam camera-0 video from ../shared, 1288x728) as a new camera; the clients keep searching until
``--duration`` has passed *and* the ingest has ended.

Queries are the person crops the gallery holds when the run starts (read from the database) plus
the demo query. ``--mode fresh`` changes
every upload by a random ±1 grey level noise (new bytes each time: the detector and the embedder
run for every request, as for new photos); ``--mode repeat`` sends the crops unchanged (an
operator changing top-k, cameras or threshold on the same photo: the server's model cache answers).
Each request picks a random top-k (5-50) and, one time in three, a camera filter.

    python benchmarks/serve_load.py --clients 16 --duration 60 --mode fresh [--weights FILE --work DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
from sqlalchemy import select

from reid_app.config import AppConfig
from reid_app.store import Database, Detection
from reid_app.thumbnails import thumbnail_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLIPS = (REPO / "sample_videos/cam1_square_left.mp4", REPO / "sample_videos/cam2_square_right.mp4")
DEMO_QUERY = REPO / "sample_videos/query_cam1_red_jacket.jpg"
FRESH_UPLOADS_PER_CLIENT = 100


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reid_app", *args], cwd=REPO, **kwargs)


def prepare(work: Path, weights: list[str]) -> str:
    url = f"sqlite:///{work / 'reid.db'}"
    if not (work / "reid.db").exists():
        work.mkdir(parents=True, exist_ok=True)
        for camera, clip in enumerate(CLIPS, start=1):
            assert cli("ingest", str(clip), "--camera", str(camera), "--db", url, "--quiet", *weights).wait() == 0
    return url


def stored_crops(url: str) -> list[bytes]:
    """The JPEG crops the gallery holds before the run (read as the app reads them), as queries."""
    database = Database(AppConfig.from_env(db_url=url))
    with database.read() as session:
        ids = session.scalars(select(Detection.id).order_by(Detection.id)).all()
    return [jpeg for jpeg in (thumbnail_bytes(database, i) for i in ids) if jpeg is not None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reid_serve_load"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--mode", choices=("fresh", "repeat"), default="fresh")
    parser.add_argument("--ingest-video", type=Path, default=SHARED / "data/lab4cam_video/videos/cam0.mp4")
    parser.add_argument("--ingest-after", type=float, default=5.0)
    parser.add_argument("--ingest-nice", type=int, default=0, help="the ingest's nice level (0: the server's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="the server's and the ingest's --backend")
    parser.add_argument("--int8", action="store_true", help="the server and the ingest embed with --int8")
    parser.add_argument("--weights", help="FA-Net weights of every process (default: the shipped model); a --work "
                                          "folder holds one model's gallery")
    args = parser.parse_args()

    weights = ["--weights", args.weights] if args.weights else []
    url = prepare(args.work, weights)
    # A fresh copy of the ingested video each run: the same file would be "already ingested".
    video = args.work / f"camera3_{time.time_ns()}{args.ingest_video.suffix}"
    shutil.copy(args.ingest_video, video)
    with open(video, "ab") as handle:  # other bytes than any earlier run's copy: a new video
        handle.write(os.urandom(8))
    crops = stored_crops(url) + [DEMO_QUERY.read_bytes()]
    images = [cv2.imdecode(np.frombuffer(c, np.uint8), cv2.IMREAD_COLOR) for c in crops]
    print(f"query pool: {len(crops)} images (the gallery's stored crops and the demo query)")

    port = free_port()
    int8 = ["--int8"] if args.int8 else []
    serve_flags = ["--db", url, "--port", str(port), "--backend", args.backend, *int8, *weights]
    server = cli("serve", *serve_flags, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "serving" in line:
            break
    threading.Thread(target=server.stderr.read, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    cameras_before = [c["camera"] for c in httpx.get(base + "/api/v1/cameras", timeout=60).json()["cameras"]]
    new_camera = max(cameras_before) + 1

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ingest: dict[str, float | int | None] = {"started": None, "ended": None, "rc": None}
    stop = threading.Event()

    def fresh_uploads(number: int) -> Iterator[bytes]:
        """New bytes for every request (±1 grey level noise on a random crop), made ahead of the
        run: encoding uploads is the clients' work, not the server's, and must not take its CPU."""
        rng = np.random.default_rng(args.seed * 1000 + number)

        def one() -> bytes:
            image = images[int(rng.integers(len(images)))]
            noisy = np.clip(image.astype(np.int16) + rng.integers(-1, 2, image.shape), 0, 255).astype(np.uint8)
            return cv2.imencode(".png", noisy)[1].tobytes()

        yield from [one() for _ in range(FRESH_UPLOADS_PER_CLIENT)]
        while True:  # a client that outran its stock makes more as it goes
            yield one()

    fresh = {n: fresh_uploads(n) for n in range(args.clients)}
    if args.mode == "fresh":
        for uploads in fresh.values():
            next(uploads)  # makes the stock now; the first request sends the next one

    def client(number: int) -> None:
        rng = random.Random(args.seed * 1000 + number)
        with httpx.Client(base_url=base, timeout=120) as http:
            while not stop.is_set():
                index = rng.randrange(len(crops))
                payload = next(fresh[number]) if args.mode == "fresh" else crops[index]
                data: dict[str, object] = {"top_k": str(rng.randint(5, 50))}
                if rng.random() < 1 / 3:
                    data["camera"] = [str(rng.choice((1, 2)))]
                started = time.perf_counter()
                try:
                    response = http.post("/api/v1/search", files={"image": ("q.png", payload)}, data=data)
                    ok = response.status_code == 200
                    problem = None if ok else f"{response.status_code} {response.text[:120]}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)

    def run_ingest() -> None:
        time.sleep(args.ingest_after)
        ingest["started"] = time.perf_counter()
        flags = ["--camera", str(new_camera), "--db", url, "--quiet", "--backend", args.backend, *int8, *weights]
        # --ingest-nice: the ingest at a lower CPU priority than the server, as an operator would
        # run a batch job on a host that also answers interactive searches.
        process = cli("ingest", str(video), *flags, stdout=subprocess.DEVNULL,
                      preexec_fn=(lambda: os.nice(args.ingest_nice)) if args.ingest_nice else None)
        ingest["rc"] = process.wait()
        ingest["ended"] = time.perf_counter()

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    ingester = threading.Thread(target=run_ingest)
    for thread in [*threads, ingester]:
        thread.start()
    while time.perf_counter() - began < args.duration or ingester.is_alive():
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    cameras_after = httpx.get(base + "/api/v1/cameras", timeout=60).json()
    rss = peak_rss_mb(server.pid)
    server.terminate()
    server.wait()
    video.unlink(missing_ok=True)

    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    capture = cv2.VideoCapture(str(args.ingest_video))
    seconds = capture.get(cv2.CAP_PROP_FRAME_COUNT) / max(capture.get(cv2.CAP_PROP_FPS), 1e-6)
    capture.release()
    ingest_s = (ingest["ended"] or 0) - (ingest["started"] or 0)
    print(f"mode {args.mode}, {args.clients} clients, {wall:.0f} s, cpus {os.cpu_count()}, load {os.getloadavg()}")
    print(f"requests served {len(latencies)} ({len(latencies) / wall:.1f}/s), errors {len(errors)}")
    print(
        f"latency p50 {statistics.median(ordered):.3f} s, p95 {pct(0.95):.3f} s, p99 {pct(0.99):.3f} s, "
        f"max {ordered[-1]:.3f} s"
    )
    print(
        f"concurrent ingest of {args.ingest_video.name} ({seconds:.1f} s of video) as camera {new_camera}: "
        f"rc {ingest['rc']}, "
        f"{ingest_s:.1f} s (real-time factor {ingest_s / seconds:.2f})"
    )
    print(
        f"cameras before {cameras_before}, after {[c['camera'] for c in cameras_after['cameras']]}; "
        f"tracks index {cameras_after['indexes']['tracks']['vectors']} vectors; server peak RSS {rss:.0f} MB"
    )
    for problem in errors[:5]:
        print("  error:", problem)


if __name__ == "__main__":
    main()
