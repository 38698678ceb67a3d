"""End to end through the real CLI: ingest real video → search, idempotence, kill/resume, concurrency.

Real video decoding (the repository's sample clips), the real YOLO11n-pose detector, ByteTrack,
the seeded untrained FA-Net embedder (``--weights untrained``), a real SQLite file or a real
PostgreSQL server (the gallery fixture is parametrised) and real FAISS indexes. A test folder is a
host's data folder; the URL of its database is written in it (``.db_url``). Ingests sample 1
frame per second of the first seconds of a clip to stay fast.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import faiss
import numpy as np
import pytest
from conftest import BACKENDS, new_database_url
from helpers import run_cli
from pgcluster import database_name
from sqlalchemy import create_engine, select, text

from reid_app import cli
from reid_app.config import AppConfig
from reid_app.embed import Embedder
from reid_app.index import INDEX_KINDS, IndexManager, index_ids, index_paths
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.search import SearchOptions, run_search
from reid_app.store import Database, Video, as_utc
from reid_app.video import open_video

REPO = Path(__file__).resolve().parents[1]
CLIP_CAM1 = REPO / "sample_videos" / "cam1_square_left.mp4"
CLIP_CAM2 = REPO / "sample_videos" / "cam2_square_right.mp4"
# Shared by every ingest here, so that row counts of different runs can be compared.
INGEST_ARGS = [
    "--fps",
    "1",
    "--max-frames",
    "12",
    "--crops-per-track",
    "2",
    "--batch-frames",
    "2",
    "--weights",
    "untrained",
]


def clip(path: Path, shared_dir: Path) -> Path:
    """A sample clip of the repository, or the shared dancer video when it is missing."""
    return path if path.exists() else shared_dir / "videos" / "dancer.avi"




def cli_subprocess(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reid_app.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def db_url(folder: Path) -> str:
    """The database of a test folder: the URL written in it, else a SQLite file in it."""
    marker = folder / ".db_url"
    return marker.read_text() if marker.exists() else f"sqlite:///{folder / 'reid.db'}"


def use_database(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".db_url").write_text(url)
    return folder


def sql(folder: Path, query: str, **params) -> list[tuple]:
    """Rows of a plain SQL query on the folder's database (either backend)."""
    engine = create_engine(db_url(folder))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query), params)]
    finally:
        engine.dispose()


def like(gallery: Path, folder: Path, request: pytest.FixtureRequest) -> Path:
    """``folder`` with a fresh database of the gallery's backend."""
    backend = "postgresql" if db_url(gallery).startswith("postgresql") else "sqlite"
    return use_database(folder, new_database_url(backend, folder, request))


def sql_write(folder: Path, statement: str, **params) -> None:
    engine = create_engine(db_url(folder))
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), params)
    finally:
        engine.dispose()


def copy_gallery(source: Path, target: Path, request: pytest.FixtureRequest) -> Path:
    """A copy of a test folder and its database (PostgreSQL: a new database from it as template)."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    url = db_url(source)
    if url.startswith("postgresql"):
        cluster = request.getfixturevalue("pg_cluster")
        cluster.drop_connections(database_name(url))
        use_database(target, cluster.create_database(template=database_name(url)))
    else:
        # The copied marker still names the source's file: point it at the copy, or every "copy"
        # would write into the shared gallery.
        use_database(target, f"sqlite:///{target / 'reid.db'}")
    return target


def table_counts(folder: Path) -> dict[str, int]:
    return {table: sql(folder, f"SELECT count(*) FROM {table}")[0][0] for table in ("videos", "tracks", "detections")}


def camera_counts(folder: Path, camera: int) -> tuple[int, int]:
    """(tracks, detections) stored for one camera.

    Runs are compared by counts, not by box coordinates: PyTorch's CPU kernels may sum in a
    different order under other load, and a last-digit change can flip which of two
    near-equal crops a track keeps (observed once here), without changing what is stored.
    """
    return tuple(
        sql(folder, f"SELECT count(*) FROM {table} WHERE camera_id = :camera", camera=camera)[0][0]
        for table in ("tracks", "detections")
    )


def assert_db_and_index_agree(folder: Path) -> None:
    """Every index file holds exactly the database's row ids, and every crop has one thumbnail row."""
    config = AppConfig(db_url=db_url(folder), data_dir=folder)
    db = Database(config)
    for kind in INDEX_KINDS:
        ids = np.sort([row[0] for row in sql(folder, f"SELECT id FROM {kind}")]).astype(np.int64)
        on_disk = faiss.read_index(str(index_paths(IndexManager(db, config).index_dir, kind)[0]))
        np.testing.assert_array_equal(index_ids(on_disk), ids, err_msg=f"{kind} index vs database")
    detections = {row[0] for row in sql(folder, "SELECT id FROM detections")}
    assert {row[0] for row in sql(folder, "SELECT detection_id FROM thumbnails")} == detections
    assert not list(folder.glob("thumbnails/*/camera_*"))  # nothing written to the data folder
    # And opening it finds nothing to repair.
    assert not any(report.changed for report in IndexManager(db, config).sync_all())
    db.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def gallery(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A database with the first 12 s of camera 1's clip (ingested in this process), on each backend."""
    folder = tmp_path_factory.mktemp(f"gallery_{request.param}")
    use_database(folder, new_database_url(request.param, folder, request))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "reid-app",
                "ingest",
                str(clip(CLIP_CAM1, shared_dir)),
                "--camera",
                "1",
                "--db",
                db_url(folder),
                "--data-dir",
                str(folder),
                "--quiet",
                *INGEST_ARGS,
            ],
        )
        with pytest.raises(SystemExit) as exit_info:
            cli.app()
    assert exit_info.value.code in (0, None)
    return folder


def test_ingest_stores_tracks_crops_vectors_and_thumbnails(gallery: Path) -> None:
    counts = table_counts(gallery)
    assert counts["videos"] == 1 and counts["tracks"] >= 2
    assert counts["tracks"] <= counts["detections"] <= 2 * counts["tracks"]  # --crops-per-track 2
    ((status, last_frame),) = sql(gallery, "SELECT status, last_committed_frame FROM videos")
    dims = {len(row[0]) for row in sql(gallery, "SELECT embedding FROM detections")}
    ((dim, trained),) = sql(gallery, "SELECT model_dim, model_is_trained FROM database_info")
    assert status == "complete" and last_frame > 0
    assert dims == {3840 * 4} and (dim, bool(trained)) == (3840, False)
    assert_db_and_index_agree(gallery)
    jpeg = bytes(sql(gallery, "SELECT jpeg FROM thumbnails LIMIT 1")[0][0])
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None


def _query_crop_of_stored_detection(folder: Path, out: Path) -> tuple[int, int]:
    """Crop the largest stored person box out of its frame, decoded again from the video."""
    ((det_id, track_id, frame_index, x1, y1, x2, y2, path),) = sql(
        folder,
        "SELECT d.id, d.track_id, d.frame_index, d.x1, d.y1, d.x2, d.y2, v.path FROM detections d "
        "JOIN videos v ON v.id = d.video_id ORDER BY (d.x2 - d.x1) * (d.y2 - d.y1) DESC, d.id LIMIT 1",
    )
    frame = next(open_video(path).iter_frames(sample_fps=None, start_frame=frame_index))
    assert frame.index == frame_index
    crop = frame.image[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]
    cv2.imwrite(str(out), crop)
    return det_id, track_id


def test_search_with_a_crop_finds_its_own_track(gallery: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    query = tmp_path / "query.jpg"
    det_id, track_id = _query_crop_of_stored_detection(gallery, query)
    base = ["search", str(query), "--db", db_url(gallery), "--data-dir", str(gallery), "--weights", "untrained",
            "--json", "--top-k", "3"]
    code, out, err = run_cli(base, capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["matches_are_meaningful"] is False and "untrained" in result["warning"].lower()
    assert "untrained" in err.lower()  # said on stderr too
    person = result["persons"][0]
    assert person["how"] == "whole image (crop-like)"
    assert track_id in [hit["track_id"] for hit in person["results"]]
    assert person["results"][0]["track_id"] == track_id
    assert set(person["results"][0]) >= {"rank", "score", "camera", "video_id", "time", "track_id", "thumbnail"}
    assert cv2.imread(person["results"][0]["thumbnail"]) is not None  # the database's JPEG, cached on this host
    code, out, _ = run_cli([*base, "--detections"], capsys, monkeypatch)
    hits = json.loads(out)["persons"][0]["results"]
    assert hits[0]["detection_id"] == det_id and hits[0]["score"] > 0.99


def test_search_whole_frame_report_and_camera_filter(gallery: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    ((frame_index, path),) = sql(
        gallery,
        "SELECT d.frame_index, v.path FROM detections d JOIN videos v ON v.id = d.video_id ORDER BY d.id LIMIT 1",
    )
    frame = next(open_video(path).iter_frames(sample_fps=None, start_frame=frame_index))
    query = tmp_path / "frame.png"
    cv2.imwrite(str(query), frame.image)
    report = tmp_path / "report.html"
    args = ["search", str(query), "--db", db_url(gallery), "--data-dir", str(gallery), "--weights", "untrained",
            "--all", "--report", str(report)]
    code, out, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["persons"] and all(p["how"] == "detected person" for p in result["persons"])
    html = report.read_text()
    assert html.count("data:image/jpeg;base64,") >= 2 and "UNTRAINED" in html and "not meaningful" in html
    # Only camera 2 (which has nothing stored): no results. Excluding camera 2: results.
    code, out, _ = run_cli([*args[:8], "--json", "--camera", "2"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["persons"][0]["results"] == []
    code, out, _ = run_cli([*args[:8], "--json", "--exclude-camera", "2"], capsys, monkeypatch)
    assert json.loads(out)["persons"][0]["results"]
    # The default output is a table.
    code, out, _ = run_cli(args[:8], capsys, monkeypatch)
    assert code == 0 and "score" in out and "track" in out and "thumbnail" in out


def test_reingest_of_the_same_video_adds_nothing(gallery: Path, capsys, monkeypatch, shared_dir: Path) -> None:
    before = table_counts(gallery)
    config = AppConfig(db_url=db_url(gallery), data_dir=gallery)
    index_file = index_paths(IndexManager(Database(config), config).index_dir, "detections")[0]
    stamp = index_file.stat().st_mtime_ns
    args = [
        "ingest",
        str(clip(CLIP_CAM1, shared_dir)),
        "--camera",
        "1",
        "--db",
        db_url(gallery),
        "--data-dir",
        str(gallery),
        "--quiet",
        *INGEST_ARGS,
    ]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "already ingested" in err and "nothing added" in err
    assert table_counts(gallery) == before
    assert index_file.stat().st_mtime_ns == stamp


def test_stats_and_identities(gallery: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    stats_args = ["stats", "--db", db_url(gallery), "--data-dir", str(gallery)]
    code, out, err = run_cli([*stats_args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    stats = json.loads(out)
    counts = table_counts(gallery)
    assert [c["camera"] for c in stats["cameras"]] == [1]
    assert stats["cameras"][0]["tracks"] == counts["tracks"]
    assert stats["cameras"][0]["detections"] == counts["detections"]
    assert stats["model"]["dim"] == 3840 and stats["model"]["trained"] is False
    assert stats["indexes"]["tracks"]["type"] == "flat" and stats["indexes"]["tracks"]["ivf_threshold"] == 50_000
    assert "untrained" in err
    # Which runtime `--backend auto` runs on this machine (a GPU: PyTorch), and what is installed.
    from reid_app.backends import auto_backend_on_cpu

    auto = "torch" if stats["inference"]["cuda"] else auto_backend_on_cpu().value
    assert stats["inference"]["backend"] == auto and auto in stats["inference"]["installed"]
    code, out, _ = run_cli(["stats", "--db", db_url(gallery), "--data-dir", str(gallery)], capsys, monkeypatch)
    assert "IVF" in out and "flat" in out
    assert f"inference backend on this machine: {auto} (what --backend auto runs" in out

    code, out, err = run_cli(
        ["identities", "--db", db_url(gallery), "--json", "--threshold", "0.0"], capsys, monkeypatch
    )
    assert code == 0, err
    identities = json.loads(out)["identities"]
    # Threshold 0: no two tracks merge, every track is its own identity.
    assert len(identities) == counts["tracks"]
    code, out, _ = run_cli(["identities", "--db", db_url(gallery), "--json", "--threshold", "2.0"], capsys, monkeypatch)
    identities = json.loads(out)["identities"]
    # Threshold 2 merges everything that may be merged: only tracks seen at the same time stay apart.
    assert len(identities) < counts["tracks"]
    assert sql(gallery, "SELECT count(*) FROM tracks WHERE identity_id IS NULL") == [(0,)]
    query = tmp_path / "query.jpg"
    _query_crop_of_stored_detection(gallery, query)
    code, out, _ = run_cli(
        ["search", str(query), "--db", db_url(gallery), "--data-dir", str(gallery), "--weights", "untrained", "--json"],
        capsys,
        monkeypatch,
    )
    assert all(hit["identity_id"] is not None for hit in json.loads(out)["persons"][0]["results"])


def _wait_for_committed_rows(folder: Path, process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            tracks = sql(folder, "SELECT count(*) FROM tracks")[0][0]
        except Exception:  # noqa: BLE001 - not created yet, or locked
            tracks = 0
        if tracks > 0:
            return True
        time.sleep(0.05)
    return False


def test_killed_ingest_resumes_to_the_same_rows(
    gallery: Path, tmp_path: Path, shared_dir: Path, request: pytest.FixtureRequest
) -> None:
    like(gallery, tmp_path, request)
    video = str(clip(CLIP_CAM1, shared_dir))
    args = ["ingest", video, "--camera", "1", "--db", db_url(tmp_path), "--data-dir", str(tmp_path), "--quiet",
            *INGEST_ARGS]
    process = cli_subprocess(args)
    committed = _wait_for_committed_rows(tmp_path, process, timeout_s=180)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert committed, "the ingest ended before any batch was committed; nothing was interrupted"
    assert sql(tmp_path, "SELECT status FROM videos") == [("ingesting",)]
    rerun = cli_subprocess(args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "interrupted run" in err
    assert table_counts(tmp_path) == table_counts(gallery)
    assert camera_counts(tmp_path, 1) == camera_counts(gallery, 1)
    assert_db_and_index_agree(tmp_path)


def test_two_cameras_ingested_concurrently_into_one_database(
    gallery: Path, tmp_path: Path, shared_dir: Path, request: pytest.FixtureRequest
) -> None:
    like(gallery, tmp_path, request)
    second = CLIP_CAM2 if CLIP_CAM2.exists() else clip(CLIP_CAM1, shared_dir)
    common = ["--db", db_url(tmp_path), "--data-dir", str(tmp_path), "--quiet", *INGEST_ARGS[:-4]]
    common += ["--batch-frames", "1", "--weights", "untrained"]
    processes = [
        cli_subprocess(["ingest", str(clip(CLIP_CAM1, shared_dir)), "--camera", "1", *common]),
        cli_subprocess(["ingest", str(second), "--camera", "2", "--start-time", "2024-05-01T14:30:00+02:00", *common]),
    ]
    for process in processes:
        _, err = process.communicate(timeout=400)
        assert process.returncode == 0, err
    statuses = sql(tmp_path, "SELECT camera_id, status FROM videos ORDER BY camera_id")
    assert statuses == [(1, "complete"), (2, "complete")]
    config = AppConfig(db_url=db_url(tmp_path), data_dir=tmp_path)
    with Database(config).read() as session:
        (start_of_camera_2,) = session.scalars(select(Video.start_time).where(Video.camera_id == 2))
    assert as_utc(start_of_camera_2).isoformat().startswith("2024-05-01T12:30:00")  # stored in UTC
    # Camera 1 got exactly the rows a lone ingest of the same clip gets; camera 2 got rows too.
    assert camera_counts(tmp_path, 1) == camera_counts(gallery, 1)
    assert min(camera_counts(tmp_path, 2)) > 0
    assert_db_and_index_agree(tmp_path)


def test_every_frame_flag_conflicts_with_fps(capsys, monkeypatch, tmp_path: Path, shared_dir: Path) -> None:
    code, _, err = run_cli(
        [
            "ingest",
            str(clip(CLIP_CAM1, shared_dir)),
            "--camera",
            "1",
            "--db",
            db_url(tmp_path),
            "--fps",
            "1",
            "--every-frame",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 2 and err.strip() == "error: use either --fps or --every-frame, not both"
    assert not (tmp_path / "reid.db").exists()


# --------------------------------------------------------------------------- two cameras: the filters


@pytest.fixture(scope="module")
def two_camera_gallery(
    gallery: Path, tmp_path_factory: pytest.TempPathFactory, shared_dir: Path, request: pytest.FixtureRequest
) -> Path:
    """``gallery`` (camera 1) copied, then the second sample clip ingested as camera 2."""
    folder = copy_gallery(gallery, tmp_path_factory.mktemp("two_cameras"), request)
    second = CLIP_CAM2 if CLIP_CAM2.exists() else clip(CLIP_CAM1, shared_dir)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(
            sys, "argv",
            ["reid-app", "ingest", str(second), "--camera", "2", "--db", db_url(folder), "--data-dir", str(folder),
             "--quiet", *INGEST_ARGS],
        )
        with pytest.raises(SystemExit) as exit_info:
            cli.app()
    assert exit_info.value.code in (0, None)
    return folder


@pytest.fixture(scope="module")
def models() -> tuple[Embedder, object]:
    """The embedder and detector ``--weights untrained`` searches and ingests use, loaded once."""
    return Embedder("untrained", device="cpu"), load_detector(None, "cpu")


def row_ids(folder: Path, table: str, camera: int) -> set[int]:
    return {row[0] for row in sql(folder, f"SELECT id FROM {table} WHERE camera_id = :camera", camera=camera)}


def stored_vectors(folder: Path, table: str) -> dict[int, np.ndarray]:
    rows = sql(folder, f"SELECT id, embedding FROM {table}")
    return {row_id: np.frombuffer(bytes(blob), dtype="<f4") for row_id, blob in rows}


@pytest.mark.parametrize("level", ["tracks", "detections"])
def test_camera_filters_keep_exactly_the_rows_of_the_chosen_cameras(
    two_camera_gallery: Path, models, level: str, tmp_path: Path
) -> None:
    folder = two_camera_gallery
    embedder, detector = models
    query = tmp_path / "query.jpg"
    _query_crop_of_stored_detection(folder, query)
    ids = {camera: row_ids(folder, level, camera) for camera in (1, 2)}
    assert ids[1] and ids[2]
    if level == "detections":  # the filter has something to get wrong: these are not the track ids
        assert row_ids(folder, "tracks", 2) != ids[2] and row_ids(folder, "tracks", 1) != ids[1]
    vectors = stored_vectors(folder, level)
    query_vector = embedder.embed([cv2.imread(str(query))])[0]  # a crop: embedded whole
    config = AppConfig(db_url=db_url(folder), data_dir=folder, weights="untrained", device="cpu")
    everything = len(ids[1]) + len(ids[2])
    for wanted, options in (
        (2, SearchOptions(top_k=everything, cameras=[2], level=level)),
        (2, SearchOptions(top_k=everything, exclude_cameras=[1], level=level)),
        (1, SearchOptions(top_k=everything, cameras=[1], level=level)),
        (1, SearchOptions(top_k=everything, exclude_cameras=[2], level=level)),
        (None, SearchOptions(top_k=everything, level=level)),
    ):
        result = run_search(config, query, options, embedder=embedder, detector=detector)
        hits = result.persons[0].hits
        found = [hit.track_id if level == "tracks" else hit.detection_id for hit in hits]
        expected = ids[1] | ids[2] if wanted is None else ids[wanted]
        assert sorted(found) == sorted(expected), options
        if wanted is not None:
            assert {hit.camera for hit in hits} == {wanted}
        # Ranked by cosine similarity with the stored vectors.
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, [float(vectors[i] @ query_vector) for i in found], atol=1e-4)


def test_cli_camera_filters_on_two_cameras(two_camera_gallery: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    folder = two_camera_gallery
    query = tmp_path / "query.jpg"
    _query_crop_of_stored_detection(folder, query)
    base = ["search", str(query), "--db", db_url(folder), "--data-dir", str(folder), "--weights", "untrained", "--json",
            "--top-k", "1000"]
    code, out, err = run_cli([*base, "--detections", "--exclude-camera", "1"], capsys, monkeypatch)
    assert code == 0, err
    hits = json.loads(out)["persons"][0]["results"]
    assert {hit["detection_id"] for hit in hits} == row_ids(folder, "detections", 2)
    code, out, err = run_cli([*base, "--camera", "1"], capsys, monkeypatch)
    assert code == 0, err
    hits = json.loads(out)["persons"][0]["results"]
    assert {hit["track_id"] for hit in hits} == row_ids(folder, "tracks", 1)


# --------------------------------------------------------------------------- runs that fail or are killed


class SimulatedKill(BaseException):
    """Stands for SIGKILL: not an ``Exception``, so the run cleans nothing up."""


class FailingEmbedder(Embedder):
    """The real untrained embedder, made to raise on its second non-empty batch of crops, i.e.
    after a first batch was embedded and committed. Records what the database held then."""

    def __init__(self, error: BaseException, folder: Path) -> None:
        super().__init__("untrained", device="cpu")
        self.error, self.folder = error, folder
        self.batches = 0
        self.stored_when_failing: tuple[int, int] | None = None

    def embed(self, crops_bgr: list[np.ndarray], cameras: list[int | None] | None = None) -> np.ndarray:
        if crops_bgr:
            self.batches += 1
            if self.batches == 2:
                self.stored_when_failing = camera_counts(self.folder, 3)
                raise self.error
        return super().embed(crops_bgr, cameras)


def failure_config(folder: Path) -> AppConfig:
    """Settings of the failure-injection ingests: 1 fps, a transaction every 2 sampled frames."""
    return AppConfig(
        db_url=db_url(folder), data_dir=folder, sample_fps=1.0, crops_per_track=2, commit_every_frames=2,
        weights="untrained", device="cpu",
    )


def failure_options(shared_dir: Path) -> IngestOptions:
    second = CLIP_CAM2 if CLIP_CAM2.exists() else clip(CLIP_CAM1, shared_dir)
    return IngestOptions(video=str(second), camera=3, max_frames=6)


def snapshot(folder: Path) -> dict[str, object]:
    """Everything an ingest may change: all rows (the deletion log aside), the ids in each index
    file, the files in the data folder."""
    rows = {table: sql(folder, f"SELECT * FROM {table} ORDER BY id") for table in ("videos", "tracks", "detections")}
    rows["thumbnails"] = sql(folder, "SELECT * FROM thumbnails ORDER BY detection_id")
    rows["ingest_claims"] = sql(folder, "SELECT * FROM ingest_claims")
    config = AppConfig(db_url=db_url(folder), data_dir=folder)
    folder_of_index = IndexManager(Database(config), config).index_dir
    indexes = {
        kind: index_ids(faiss.read_index(str(index_paths(folder_of_index, kind)[0]))).tolist() for kind in INDEX_KINDS
    }
    files = {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and folder_of_index not in p.parents and not p.name.startswith("reid.db")
    }
    return {"rows": rows, "indexes": indexes, "files": files}


def test_a_run_that_fails_part_way_leaves_everything_as_before(
    gallery: Path, models, tmp_path: Path, shared_dir: Path, request: pytest.FixtureRequest
) -> None:
    folder = copy_gallery(gallery, tmp_path / "db", request)
    before = snapshot(folder)
    embedder = FailingEmbedder(RuntimeError("the model broke"), folder)
    with pytest.raises(RuntimeError, match="the model broke"):
        ingest_video(failure_config(folder), failure_options(shared_dir), embedder=embedder, detector=models[1])
    # It failed part-way: a first batch of camera 3 had been committed.
    assert embedder.stored_when_failing is not None and min(embedder.stored_when_failing) > 0
    after = snapshot(folder)
    assert after == before
    assert_db_and_index_agree(folder)


def test_a_run_that_fails_after_storing_and_indexing_everything_is_undone(
    gallery: Path, models, tmp_path: Path, shared_dir: Path, request: pytest.FixtureRequest
) -> None:
    """The last thing a run does is report progress, after the final commit and index sync: an
    error there must still remove the video's rows, its vectors from the index files and its
    thumbnails."""
    folder = copy_gallery(gallery, tmp_path / "db", request)
    before = snapshot(folder)
    seen: dict[str, object] = {}

    def fail_once_complete(progress) -> None:
        if sql(folder, "SELECT status FROM videos WHERE camera_id = 3") == [("complete",)]:
            seen.update(snapshot(folder))
            raise RuntimeError("the progress display broke")

    embedder, detector = models
    with pytest.raises(RuntimeError, match="progress display"):
        ingest_video(
            failure_config(folder), failure_options(shared_dir), embedder=embedder, detector=detector,
            on_progress=fail_once_complete,
        )
    # At the failure, camera 3 was stored, indexed and had thumbnails.
    assert len(seen["indexes"]["detections"]) > len(before["indexes"]["detections"])
    assert len(seen["rows"]["videos"]) == len(before["rows"]["videos"]) + 1
    assert len(seen["rows"]["thumbnails"]) > len(before["rows"]["thumbnails"])
    assert snapshot(folder) == before
    assert_db_and_index_agree(folder)


def test_a_killed_run_is_redone_without_its_old_thumbnails(
    gallery: Path, models, tmp_path: Path, shared_dir: Path, request: pytest.FixtureRequest
) -> None:
    folder = copy_gallery(gallery, tmp_path / "db", request)
    config, options = failure_config(folder), failure_options(shared_dir)
    embedder, detector = models
    with pytest.raises(SimulatedKill):
        ingest_video(config, options, embedder=FailingEmbedder(SimulatedKill(), folder), detector=detector)
    ((video_id, status),) = sql(folder, "SELECT id, status FROM videos WHERE camera_id = 3")
    assert status == "ingesting" and min(camera_counts(folder, 3)) > 0
    # The killed run's claim is still there; its process (this one) is alive, so only the owner
    # itself or the end of the lease frees it: a run of this process with another owner id waits.
    assert len(sql(folder, "SELECT owner FROM ingest_claims WHERE video_id = :v", v=video_id)) == 1
    sql_write(folder, "UPDATE ingest_claims SET lease_until_s = 0")  # as if its lease had run out

    summary = ingest_video(config, options, embedder=embedder, detector=detector)
    assert summary.status == "redone after an interrupted run" and summary.video_id == video_id
    assert sql(folder, "SELECT count(*) FROM ingest_claims") == [(0,)]
    assert_db_and_index_agree(folder)


# --------------------------------------------------------------------------- several hosts on one PostgreSQL


def on_postgresql(gallery: Path) -> None:
    if not db_url(gallery).startswith("postgresql"):
        pytest.skip("several hosts share a server database: PostgreSQL only")


def host_env(name: str, lease_s: float) -> dict[str, str]:
    import os

    return {**os.environ, "REID_APP_HOST": name, "REID_APP_CLAIM_LEASE_S": str(lease_s)}


def test_hosts_share_one_database_and_a_killed_host_is_taken_over(
    gallery: Path, tmp_path: Path, shared_dir: Path, request: pytest.FixtureRequest
) -> None:
    """Host A (killed with SIGKILL mid-ingest) and host B ingest camera 2 into the gallery's
    database, each with its own --data-dir; B is refused while A's claim runs, takes the video over
    once it has expired, and a third host C searches and sees both cameras' thumbnails."""
    on_postgresql(gallery)
    shared = copy_gallery(gallery, tmp_path / "host_0", request)  # camera 1, ingested by "host 0"
    url = db_url(shared)
    second = str(CLIP_CAM2 if CLIP_CAM2.exists() else clip(CLIP_CAM1, shared_dir))
    # Long enough for host B to start (load its models) and be refused before it ends.
    lease_s = 45.0

    def ingest(host: str) -> subprocess.Popen:
        folder = tmp_path / host
        args = ["ingest", second, "--camera", "2", "--db", url, "--data-dir", str(folder), "--quiet", *INGEST_ARGS]
        return cli_subprocess(args, env=host_env(host, lease_s))

    host_a = ingest("host_a")
    assert _wait_for_committed_rows_of_camera(shared, 2, host_a, timeout_s=240)
    host_a.send_signal(signal.SIGKILL)
    host_a.wait()
    ((lease_until,),) = sql(shared, "SELECT lease_until_s FROM ingest_claims WHERE host = 'host_a'")
    assert sql(shared, "SELECT status FROM videos WHERE camera_id = 2") == [("ingesting",)]
    refused = ingest("host_b")  # A is dead, but only its lease tells another host so
    _, err = refused.communicate(timeout=300)
    ((now,),) = sql(shared, "SELECT extract(epoch from clock_timestamp())")
    if float(now) < lease_until - 1:  # B was quicker than the lease (else it took the video over: below)
        assert refused.returncode != 0 and "being ingested by another process" in err and "host host_a" in err
        assert camera_counts(shared, 2)[0] > 0  # A's partial rows, untouched
        time.sleep(lease_until - float(now) + 1)
        taken_over = ingest("host_b")
        _, err = taken_over.communicate(timeout=400)
    else:
        taken_over = refused
    assert taken_over.returncode == 0, err
    assert "interrupted run" in err
    assert sql(shared, "SELECT count(*) FROM ingest_claims") == [(0,)]
    # Nothing duplicated or lost: camera 1 as ingested alone; camera 2 has each crop once.
    assert camera_counts(shared, 1) == camera_counts(gallery, 1)
    assert min(camera_counts(shared, 2)) > 0
    assert sql(shared, "SELECT count(*) FROM videos") == [(2,)]
    # Host C: its own index folder, built from the database; thumbnails of both cameras readable.
    host_c = tmp_path / "host_c"
    query = tmp_path / "query.jpg"
    _query_crop_of_stored_detection(shared, query)
    base = ["search", str(query), "--db", url, "--data-dir", str(host_c), "--weights", "untrained", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "reid_app.cli", *base, "--detections", "--top-k", "1000"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["persons"][0]["results"]
    assert {hit["camera"] for hit in hits} == {1, 2}
    assert all(hit["thumbnail"].startswith(str(host_c)) and cv2.imread(hit["thumbnail"]) is not None for hit in hits)
    # Host 0 (the gallery's index, made before camera 2 existed) catches up incrementally.
    shared_config = AppConfig(db_url=url, data_dir=shared)
    manager = IndexManager(Database(shared_config), shared_config)
    lag = manager.lag("detections")
    assert lag["needs_build"] is None and lag["rows_behind"] == camera_counts(shared, 2)[1]
    _, report = manager.sync("detections")
    assert not report.rebuilt and report.added == lag["rows_behind"]
    for folder in (shared, host_c):
        assert_db_and_index_agree_at(url, folder)


def _wait_for_committed_rows_of_camera(folder: Path, camera: int, process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if camera_counts(folder, camera)[0] > 0:
            return True
        time.sleep(0.1)
    return False


def assert_db_and_index_agree_at(url: str, folder: Path) -> None:
    config = AppConfig(db_url=url, data_dir=folder)
    db = Database(config)
    manager = IndexManager(db, config)
    manager.sync_all()  # caught up (host 0 has only synced its detections index so far) ...
    assert not any(report.changed for report in manager.sync_all())  # ... and then in agreement
    for kind in INDEX_KINDS:
        with db.read() as session:
            ids = np.sort(np.asarray(session.scalars(select(INDEX_KINDS[kind].id)).all(), dtype=np.int64))
        np.testing.assert_array_equal(index_ids(manager.sync(kind)[0].index), ids)
    db.dispose()


def test_forget_and_prune_remove_rows_vectors_and_thumbnails(
    gallery: Path, tmp_path: Path, capsys, monkeypatch, request: pytest.FixtureRequest
) -> None:
    folder = copy_gallery(gallery, tmp_path / "db", request)
    url = db_url(folder)
    common = ["--db", url, "--data-dir", str(folder)]
    query = tmp_path / "query.jpg"
    _, track_id = _query_crop_of_stored_detection(folder, query)
    search = ["search", str(query), *common, "--weights", "untrained", "--json", "--top-k", "1000"]
    code, out, err = run_cli(search, capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["persons"][0]["results"][0]["track_id"] == track_id  # its thumbnail now cached here
    crops = sql(folder, "SELECT id FROM detections WHERE track_id = :t", t=track_id)
    before = table_counts(folder)
    # --dry-run: says what, removes nothing.
    code, out, err = run_cli(["forget", "--track", str(track_id), *common, "--dry-run"], capsys, monkeypatch)
    assert code == 0, err
    assert f"would remove 1 tracks (camera 1: 1) and {len(crops)} crops" in out
    assert table_counts(folder) == before
    code, out, err = run_cli(["forget", "--track", str(track_id), *common], capsys, monkeypatch)
    assert code == 0, err
    assert f"removed 1 tracks (camera 1: 1) and {len(crops)} crops" in out
    assert f"{1 + len(crops)} vectors dropped" in out
    assert sql(folder, "SELECT count(*) FROM thumbnails WHERE detection_id IN (SELECT id FROM detections)") == [
        (before["detections"] - len(crops),)
    ]
    assert not list(folder.glob(f"thumbnails/*/cache/{crops[0][0]}.jpg"))  # this host's cached copy too
    code, out, _ = run_cli(search, capsys, monkeypatch)
    assert track_id not in [hit["track_id"] for hit in json.loads(out)["persons"][0]["results"]]
    assert_db_and_index_agree(folder)
    # A second forget of it finds nothing (and says so).
    code, out, _ = run_cli(["forget", "--track", str(track_id), *common], capsys, monkeypatch)
    assert code == 0 and "removed 0 tracks" in out
    # Prune: the clip's start time is its file's time, so everything is older than 1 s; camera 2 has nothing.
    code, out, _ = run_cli(["prune", "--older-than", "1s", "--camera", "2", *common], capsys, monkeypatch)
    assert code == 0 and "removed 0 tracks" in out
    code, out, err = run_cli(["prune", "--older-than", "1s", *common, "--dry-run"], capsys, monkeypatch)
    assert code == 0 and f"would remove {before['tracks'] - 1} tracks" in out and "would remove 1 video rows" in out
    code, out, err = run_cli(["prune", "--older-than", "1s", *common], capsys, monkeypatch)
    assert code == 0, err
    assert table_counts(folder) == {"videos": 0, "tracks": 0, "detections": 0}
    assert sql(folder, "SELECT count(*) FROM thumbnails") == [(0,)]
    code, _, err = run_cli(search, capsys, monkeypatch)
    assert code != 0 and "empty" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "--older-than", "30 days"], "--older-than must be a number and a unit"),
        (["prune", "--older-than", "999999w"], "--older-than is at most"),
        (["prune", "--older-than", "1d", "--camera", "1180591620717411303424"], "camera ID must be a positive"),
        (["forget", "--track", "2147483648"], "--track must be a positive integer up to 2147483647"),
        (["forget", "--identity", "-3"], "--identity must be a positive integer"),
        (["forget"], "exactly one of --track ID or --identity ID"),
    ],
)
def test_prune_and_forget_refuse_bad_values_in_one_line(
    gallery: Path, args: list[str], message: str, capsys, monkeypatch
) -> None:
    before = table_counts(gallery)
    code, out, err = run_cli([*args, "--db", db_url(gallery), "--data-dir", str(gallery)], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert table_counts(gallery) == before


# --------------------------------------------------------------------------- prune and forget killed part-way


def run_in_child(args: list[str], kill_point: str | None = None, kill_after_s: float | None = None) -> str:
    """Run ``reid-app ARGS`` in a forked child of this process (everything is imported already, so
    it starts at once) and SIGKILL it: when it reaches ``kill_point`` (it kills itself there), or
    ``kill_after_s`` seconds after its start. Returns "killed" or "finished" (it ended first)."""
    gc.collect()  # SQLite connections of this process that nothing refers to: closed before the fork
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99  # an exception other than SystemExit
        try:
            faiss.omp_set_num_threads(1)  # no OpenMP thread pool of the parent to rely on after fork
            sys.stdout = sys.stderr = io.StringIO()
            sys.argv = ["reid-app", *args]
            if kill_point is not None:
                KILL_POINTS[kill_point]()
            try:
                cli.app()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            os._exit(code)
    deadline = started + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline or (kill_after_s is not None and time.monotonic() - started >= kill_after_s):
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
    assert time.monotonic() < deadline, f"reid-app {' '.join(args)} hung"
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    assert os.WEXITSTATUS(status) == 0, f"reid-app {' '.join(args)} failed (exit code {os.WEXITSTATUS(status)})"
    return "finished"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after(owner: object, name: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):  # noqa: ANN202
        original(*args, **kwargs)
        _die()

    setattr(owner, name, wrapper)


def _die_at_call(owner: object, name: str, number: int = 1) -> None:
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):  # noqa: ANN202
        calls.append(1)
        if len(calls) == number:
            _die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _kill_points() -> dict[str, Callable[[], None]]:
    import reid_app.index
    import reid_app.retention

    return {
        # In the one transaction: rows deleted, not committed.
        "rows deleted, not committed": lambda: _die_after(reid_app.retention, "delete_tracks"),
        # Committed; this host's index files, cached thumbnails and older files not touched yet.
        "committed, nothing local done": lambda: _die_at_call(reid_app.retention, "finish_file_deletions"),
        "tracks index synced, detections index not": lambda: _die_at_call(IndexManager, "sync", 2),
        # Inside an index save: the index file replaced, its sidecar not yet.
        "index file replaced, sidecar not": lambda: _die_at_call(reid_app.index, "atomic_write_bytes"),
        # Inside an index save: the new index written to its temporary file, not moved into place.
        "index written, not moved into place": lambda: _die_at_call(os, "replace"),
    }


KILL_POINTS = _kill_points()


@dataclass
class Selected:
    """The rows a prune or forget selects (ids before it runs)."""

    videos: set[int]
    tracks: set[int]
    detections: set[int]

    def left(self, folder: Path) -> dict[str, int]:
        """How many of them are still stored, per table (thumbnails: rows of the selected crops)."""
        counts = {}
        for table, column, ids in (
            ("videos", "id", self.videos),
            ("tracks", "id", self.tracks),
            ("detections", "id", self.detections),
            ("thumbnails", "detection_id", self.detections),
        ):
            stored = {row[0] for row in sql(folder, f"SELECT {column} FROM {table}")}
            counts[table] = len(stored & ids)
        return counts

    def everything(self) -> dict[str, int]:
        return {
            "videos": len(self.videos),
            "tracks": len(self.tracks),
            "detections": len(self.detections),
            "thumbnails": len(self.detections),
        }


def select_camera(folder: Path, camera: int) -> Selected:
    return Selected(
        videos=row_ids(folder, "videos", camera),
        tracks=row_ids(folder, "tracks", camera),
        detections=row_ids(folder, "detections", camera),
    )


def search_all(folder: Path, query: Path, models) -> dict[str, set[int]]:
    """Track and crop ids every search returns (everything, whatever its score): the index of each
    kind is synced with the database first, as any search does."""
    embedder, detector = models
    config = AppConfig(db_url=db_url(folder), data_dir=folder, weights="untrained", device="cpu")
    db = Database(config)
    found = {}
    for level in ("tracks", "detections"):
        options = SearchOptions(top_k=10_000, threshold=-1.0, level=level)
        hits = run_search(config, query, options, embedder=embedder, detector=detector, db=db).persons[0].hits
        found[level] = {hit.track_id if level == "tracks" else hit.detection_id for hit in hits}
    db.dispose()  # no connection of this process left open when the next run is forked from it
    return found


def assert_all_or_nothing(folder: Path, selected: Selected, query: Path, models) -> bool:
    """Either every selected row is still stored and every search finds it, or none is and no
    search returns it (nor keeps its vector or cached thumbnail). Returns whether they are gone."""
    left = selected.left(folder)
    assert left in (selected.everything(), dict.fromkeys(left, 0)), f"half-deleted: {left}"
    gone = left["tracks"] == 0
    found = search_all(folder, query, models)
    if gone:
        assert not found["tracks"] & selected.tracks and not found["detections"] & selected.detections
        for detection_id in selected.detections:
            assert not list(folder.glob(f"thumbnails/*/cache/{detection_id}.jpg"))
    else:
        assert found["tracks"] >= selected.tracks and found["detections"] >= selected.detections
    assert_db_and_index_agree(folder)  # no vector of a removed row left in either index
    return gone


def final_state(folder: Path) -> dict[str, object]:
    """What a finished run leaves: every row (the deletion log without its ids and times), the ids
    of each index file and the files of the data folder."""
    tables = ("videos", "tracks", "detections", "thumbnails", "ingest_claims", "pending_file_deletions")
    rows: dict[str, object] = {table: sql(folder, f"SELECT * FROM {table} ORDER BY 1") for table in tables}
    rows["deletions"] = sorted(
        (kind, count, bytes(ids)) for kind, count, ids in sql(folder, "SELECT kind, row_count, row_ids FROM deletions")
    )
    config = AppConfig(db_url=db_url(folder), data_dir=folder)
    db = Database(config)
    index_dir = IndexManager(db, config).index_dir
    db.dispose()
    indexes = {kind: index_ids(faiss.read_index(str(index_paths(index_dir, kind)[0]))).tolist() for kind in INDEX_KINDS}
    files = sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and not path.name.startswith("reid.db") and path.name != ".db_url"
    )
    return {"rows": rows, "indexes": indexes, "files": files}


def prepared_copy(source: Path, target: Path, camera: int, models, request: pytest.FixtureRequest):
    """A copy of ``source`` searched once (its indexes synced, every thumbnail cached on this
    host), the rows of ``camera`` and a query crop of one of them."""
    folder = copy_gallery(source, target, request)
    selected = select_camera(folder, camera)
    query = target / "query.jpg"
    (jpeg,) = sql(folder, "SELECT jpeg FROM thumbnails WHERE detection_id = :d", d=min(selected.detections))[0]
    query.write_bytes(bytes(jpeg))
    assert search_all(folder, query, models)["detections"] >= selected.detections
    assert list(folder.glob("thumbnails/*/cache/*.jpg"))
    return folder, selected, query


@pytest.fixture(scope="module")
def pruned_reference(two_camera_gallery: Path, models, tmp_path_factory, request: pytest.FixtureRequest) -> dict:
    """The state an uninterrupted ``prune --camera 2`` leaves."""
    target = tmp_path_factory.mktemp("pruned_reference")
    folder, selected, _ = prepared_copy(two_camera_gallery, target, 2, models, request)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["reid-app", *prune_args(folder)])
        with pytest.raises(SystemExit) as exit_info:
            cli.app()
    assert exit_info.value.code in (0, None)
    assert selected.left(folder) == dict.fromkeys(selected.everything(), 0)
    return final_state(folder)


def prune_args(folder: Path) -> list[str]:
    return ["prune", "--older-than", "1s", "--camera", "2", "--db", db_url(folder), "--data-dir", str(folder)]


#: The points where the database matters: on PostgreSQL only these run (the others are inside this
#: host's index saves, the same whatever the database).
DATABASE_KILL_POINTS = ("rows deleted, not committed", "committed, nothing local done")


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_prune_killed_part_way_leaves_all_or_nothing_and_a_rerun_finishes(
    point: str, two_camera_gallery: Path, pruned_reference: dict, models, tmp_path: Path, capsys, monkeypatch,
    request: pytest.FixtureRequest,
) -> None:
    """``prune --camera 2`` SIGKILLed at a point of its work: the camera's videos, tracks, crops,
    thumbnails and vectors are all still there (and found by search) or all gone (and returned by
    no search); a re-run then says what it removed and leaves what an uninterrupted run leaves."""
    if db_url(two_camera_gallery).startswith("postgresql") and point not in DATABASE_KILL_POINTS:
        pytest.skip("a kill inside an index save: the same on either database (run on SQLite)")
    folder, selected, query = prepared_copy(two_camera_gallery, tmp_path / "db", 2, models, request)
    assert run_in_child(prune_args(folder), kill_point=point) == "killed"
    gone = assert_all_or_nothing(folder, selected, query, models)
    assert gone == (point != "rows deleted, not committed")
    code, out, err = run_cli(prune_args(folder), capsys, monkeypatch)
    assert code == 0, err
    removed = 0 if gone else len(selected.tracks)
    assert f"removed {removed} tracks" in out and ("removed 1 video rows" in out) == (not gone), out
    assert final_state(folder) == pruned_reference


def test_forget_killed_again_and_again_then_finished(
    gallery: Path, models, tmp_path: Path, capsys, monkeypatch, request: pytest.FixtureRequest
) -> None:
    """``forget --track`` started over and over, each run SIGKILLed later into its work than the
    last (wherever that falls: opening the database, in or after the transaction, in an index
    save), until one finishes: after every kill all of the track is there or none of it, and the
    end is what one uninterrupted run leaves."""
    (track_id,) = sql(gallery, "SELECT max(id) FROM tracks")[0]

    def forget(folder: Path) -> list[str]:
        return ["forget", "--track", str(track_id), "--db", db_url(folder), "--data-dir", str(folder)]

    # The uninterrupted run, in a child as the others: how long it takes, and what it leaves.
    reference, _, _ = prepared_copy(gallery, tmp_path / "reference", 1, models, request)
    started = time.monotonic()
    assert run_in_child(forget(reference)) == "finished"
    duration = time.monotonic() - started

    folder, _, query = prepared_copy(gallery, tmp_path / "db", 1, models, request)
    crops = {row[0] for row in sql(folder, "SELECT id FROM detections WHERE track_id = :t", t=track_id)}
    selected = Selected(videos=set(), tracks={track_id}, detections=crops)
    kills = []
    for fraction in (0.05, 0.25, 0.45, 0.65, 0.85, None):  # None: let it finish
        ended = run_in_child(forget(folder), kill_after_s=None if fraction is None else fraction * duration)
        gone = assert_all_or_nothing(folder, selected, query, models)
        if ended == "finished":
            break
        kills.append(gone)
    # At least the first kill fell before the end (later runs have less left to do: they may finish
    # before their kill). The deterministic points are in the test above.
    assert gone and kills, kills
    code, out, err = run_cli(forget(folder), capsys, monkeypatch)
    assert code == 0 and "removed 0 tracks" in out, err
    assert final_state(folder) == final_state(reference)
