"""Several hosts on one database: concurrent ingest (PostgreSQL vs SQLite), index catch-up, prune.

1. ``ingest``: the two sample videos ingested by 1 (sequential), 2 and 4 concurrent ``reid-app
   ingest`` processes, into a throwaway PostgreSQL server and into SQLite. With 4 processes each
   video is started twice (same camera): the claim must let exactly one of them store it. Prints
   wall time, row counts and index sizes; they must equal the sequential run's.
2. ``catchup``: a gallery of N synthetic crops (unit vectors of the shipped model's dimension)
   synced once, then 10,000 rows committed as another host would: time for a search host's sync.
3. ``prune``: 10 % of a 100k-crop gallery older than the cut-off: time of ``prune`` (transaction +
   this host's index update).

    OMP_NUM_THREADS=1 python benchmarks/several_hosts.py ingest --max-frames 20
    OMP_NUM_THREADS=1 python benchmarks/several_hosts.py catchup prune --gallery 100000 --dim 512
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import func, insert, select

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pgcluster import PostgresCluster, find_pg_bin  # noqa: E402

from reid_app.config import AppConfig  # noqa: E402
from reid_app.index import IndexManager  # noqa: E402
from reid_app.retention import prune  # noqa: E402
from reid_app.store import Database, DatabaseInfo, Detection, Track, Video, utc_now  # noqa: E402

VIDEOS = [(REPO / "sample_videos" / "cam1_square_left.mp4", 1), (REPO / "sample_videos" / "cam2_square_right.mp4", 2)]


def run_ingests(url: str, data_dir: Path, jobs: list[tuple[Path, int]], max_frames: int) -> float:
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "reid_app.cli", "ingest", str(video), "--camera", str(camera), "--db", url,
             "--data-dir", str(data_dir / f"host{number}"), "--quiet", "--fps", "2", "--max-frames", str(max_frames)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for number, (video, camera) in enumerate(jobs)
    ]  # fmt: skip
    for process in processes:
        process.communicate()
    return time.perf_counter() - started


def counts(url: str, data_dir: Path) -> tuple[int, int, int, int, int]:
    config = AppConfig(db_url=url, data_dir=data_dir / "check")
    db = Database(config)
    with db.read() as session:
        rows = tuple(int(session.scalar(select(func.count()).select_from(m))) for m in (Video, Track, Detection))
    manager = IndexManager(db, config)
    sizes = tuple(manager.sync(kind)[0].ntotal for kind in ("tracks", "detections"))
    db.dispose()
    return (*rows, *sizes)


def bench_ingest(cluster: PostgresCluster, max_frames: int) -> None:
    print("| backend | processes | wall time (s) | videos | tracks | crops | index tracks | index crops |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in ("postgresql", "sqlite"):
        reference = None
        for processes in (1, 2, 4):
            folder = Path(tempfile.mkdtemp(prefix="reid-bench-"))
            url = cluster.create_database() if backend == "postgresql" else f"sqlite:///{folder / 'reid.db'}"
            if processes == 1:
                seconds = sum(run_ingests(url, folder, [job], max_frames) for job in VIDEOS)
            else:
                seconds = run_ingests(url, folder, VIDEOS * (processes // 2), max_frames)
            found = counts(url, folder)
            reference = reference or found
            verdict = "" if found == reference else " (DIFFERS from sequential)"
            print(f"| {backend} | {processes} | {seconds:.1f} | " + " | ".join(map(str, found)) + f" |{verdict}")


def synthetic_gallery(url: str, data_dir: Path, crops: int, dim: int, start_offset_s: float = 0.0) -> AppConfig:
    """``crops`` crops, one per track (cheap to make; what the sync reads is the same)."""
    config = AppConfig(db_url=url, data_dir=data_dir)
    db = Database(config, create=True)
    db.ensure_info()

    def model(session) -> None:  # noqa: ANN001
        info = session.get(DatabaseInfo, 1)
        info.model_name, info.model_weights_sha256, info.model_dim, info.model_is_trained = "bench", "0" * 64, dim, True

    db.write(model)
    add_rows(db, crops, dim, seed=0)
    db.dispose()
    return config


def add_rows(db: Database, crops: int, dim: int, seed: int, chunk: int = 5000) -> None:
    rng = np.random.default_rng(seed)

    def work(session) -> None:  # noqa: ANN001
        video = Video(path=f"/bench/{seed}.mp4", sha256=f"{seed:064d}", camera_id=1 + seed % 2, fps=25.0,
                      frame_count=crops, width=1920, height=1080, sample_fps=2.0,
                      start_time=utc_now() - timedelta(days=60), status="complete", last_committed_frame=crops - 1,
                      detector="bench", created_at=utc_now())  # fmt: skip
        session.add(video)
        session.flush()
        for start in range(0, crops, chunk):
            n = min(chunk, crops - start)
            vectors = rng.standard_normal((n, dim)).astype("<f4")
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            # Track i lasts until 30 days + i·(30 days / crops): the first 10 % are older than 57 days.
            last = [(start + i) * (30 * 86400 / crops) for i in range(n)]
            track_ids = session.scalars(
                insert(Track).returning(Track.id),
                [dict(video_id=video.id, camera_id=video.camera_id, tracker_id=start + i, first_frame=0, last_frame=0,
                      first_timestamp_s=last[i], last_timestamp_s=last[i], num_crops=1,
                      embedding=vectors[i].tobytes()) for i in range(n)],
            ).all()  # fmt: skip
            session.execute(
                insert(Detection),
                [dict(track_id=track_ids[i], video_id=video.id, camera_id=video.camera_id, frame_index=start + i,
                      timestamp_s=last[i], x1=0, y1=0, x2=1, y2=1, score=1.0, thumbnail_path="",
                      embedding=vectors[i].tobytes()) for i in range(n)],
            )  # fmt: skip

    db.write(work)


def bench_catchup_and_prune(cluster: PostgresCluster, gallery: int, dim: int, steps: list[str]) -> None:
    print(f"\ngallery {gallery} crops of dim {dim}; times in seconds")
    print("| backend | step | seconds | detail |")
    print("|---|---|---|---|")
    for backend in ("postgresql", "sqlite"):
        folder = Path(tempfile.mkdtemp(prefix="reid-bench-"))
        url = cluster.create_database() if backend == "postgresql" else f"sqlite:///{folder / 'reid.db'}"
        config = synthetic_gallery(url, folder / "search_host", gallery, dim)
        db = Database(config)
        manager = IndexManager(db, config)
        started = time.perf_counter()
        manager.sync_all()
        print(f"| {backend} | first build of both indexes | {time.perf_counter() - started:.1f} | {gallery} crops |")
        if "catchup" in steps:
            add_rows(db, 10_000, dim, seed=1)  # another host's commit
            lag = manager.lag("detections")
            started = time.perf_counter()
            reports = manager.sync_all()
            seconds = time.perf_counter() - started
            detail = ", ".join(f"{r.kind} +{r.added} (rebuilt: {r.rebuilt})" for r in reports)
            step = f"catch-up of 10,000 new crops (was {lag['rows_behind']} behind)"
            print(f"| {backend} | {step} | {seconds:.2f} | {detail} |")
        if "prune" in steps:
            started = time.perf_counter()
            removal = prune(config, timedelta(days=57))
            seconds = time.perf_counter() - started
            detail = f"{removal.tracks} tracks, {removal.detections} crops, {removal.index_vectors} vectors dropped"
            print(f"| {backend} | prune --older-than 57d | {seconds:.2f} | {detail} |")
            other = IndexManager(db, AppConfig(db_url=url, data_dir=folder / "search_host_2"))
            other.sync_all()
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+", choices=["ingest", "catchup", "prune"])
    parser.add_argument("--max-frames", type=int, default=20)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL programs found (apt-get install postgresql)")
    cluster = PostgresCluster(bin_dir).start()
    try:
        if "ingest" in args.steps:
            bench_ingest(cluster, args.max_frames)
        if "catchup" in args.steps or "prune" in args.steps:
            bench_catchup_and_prune(cluster, args.gallery, args.dim, args.steps)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
