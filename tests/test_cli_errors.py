"""Bad input through the real CLI: one clear ``error:`` line on stderr, exit code 2, and the
database, the index files and the thumbnails exactly as they were."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from helpers import ASSETS, run_cli

import fanet.weights
from reid_app import cli
from reid_app.config import AppConfig
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS
from reid_app.store import Database

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "sample_videos" / "cam1_square_left.mp4"
UNTRAINED = ["--weights", "untrained"]




def db_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'reid.db'}"


def snapshot(folder: Path) -> dict[str, object]:
    """Row counts, index file contents and the list of stored files of a database folder."""
    state: dict[str, object] = {}
    if (folder / "reid.db").exists():
        with sqlite3.connect(folder / "reid.db") as connection:
            tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                state[table] = connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(("-wal", "-shm", ".lock", ".db")):
            state[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def faiss_dir(folder: Path) -> Path:
    """The index folder of the one database whose SQLite file is in ``folder``."""
    (found,) = folder.glob("faiss/*")
    return found


def stored_thumbnail(folder: Path, out: Path) -> Path:
    """A real person crop: the first stored thumbnail of the SQLite database in ``folder``."""
    with sqlite3.connect(folder / "reid.db") as connection:
        (jpeg,) = connection.execute("SELECT jpeg FROM thumbnails ORDER BY detection_id LIMIT 1").fetchone()
    out.write_bytes(jpeg)
    return out


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    """Exit code 2; the last stderr line is the error, the only one, and has no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment.lower() in lines[-1].lower(), lines[-1]


@pytest.fixture(scope="module")
def video(shared_dir: Path) -> Path:
    return CLIP if CLIP.exists() else shared_dir / "videos" / "dancer.avi"


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, video: Path) -> Path:
    """A small database: 5 sampled frames of a real clip."""
    folder = tmp_path_factory.mktemp("filled")
    with pytest.MonkeyPatch.context() as monkeypatch:
        args = ["ingest", str(video), "--camera", "3", "--db", db_url(folder), "--fps", "1", "--max-frames", "8"]
        monkeypatch.setattr(sys, "argv", ["reid-app", *args, "--quiet", "--crops-per-track", "1", *UNTRAINED])
        with pytest.raises(SystemExit) as exit_info:
            cli.app()
    assert exit_info.value.code in (0, None)
    with sqlite3.connect(folder / "reid.db") as connection:
        assert connection.execute("SELECT count(*) FROM tracks").fetchone()[0] > 0
    return folder


@pytest.fixture()
def query_crop(filled: Path, tmp_path: Path) -> Path:
    """A real person crop: a stored thumbnail."""
    return stored_thumbnail(filled, tmp_path / "person.jpg")


def test_missing_video(filled: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    before = snapshot(filled)
    code, _, err = run_cli(
        ["ingest", str(tmp_path / "nope.mp4"), "--camera", "1", "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "video not found", "nope.mp4")
    assert len(err.strip().splitlines()) == 1  # found before anything else was said or loaded
    assert snapshot(filled) == before


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "directory", "text"])
def test_corrupt_or_unreadable_video_leaves_no_trace(
    kind: str, filled: Path, video: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    bad = tmp_path / "bad.mp4"
    if kind == "random bytes":
        bad.write_bytes(bytes(range(256)) * 64)
    elif kind == "truncated":
        bad.write_bytes(video.read_bytes()[:4096])
    elif kind == "directory":
        bad.mkdir()
    else:
        bad.write_text("this is not a video\n")
    before = snapshot(filled)
    code, _, err = run_cli(
        ["ingest", str(bad), "--camera", "1", "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "bad.mp4")
    assert snapshot(filled) == before
    # Into a database that does not exist yet: it is not created.
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(
        ["ingest", str(bad), "--camera", "1", "--db", db_url(fresh), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err)
    assert not fresh.exists() or not any(fresh.iterdir())


@pytest.mark.parametrize("camera", ["0", "-2", "abc", "1.5"])
def test_camera_id_must_be_a_positive_integer(
    camera: str, filled: Path, video: Path, query_crop: Path, capsys, monkeypatch
) -> None:
    before = snapshot(filled)
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", camera, "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "camera ID must be a positive integer", repr(camera))
    code, _, err = run_cli(
        ["search", str(query_crop), "--camera", camera, "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "camera ID must be a positive integer")
    assert snapshot(filled) == before


def test_query_that_is_not_an_image(filled: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    before = snapshot(filled)
    fake = tmp_path / "query.jpg"
    fake.write_text("not an image")
    code, _, err = run_cli(["search", str(fake), "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch)
    assert_one_error_line(code, err, "not an image", "query.jpg")
    code, _, err = run_cli(
        ["search", str(tmp_path / "gone.png"), "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "query image not found")
    assert snapshot(filled) == before


def test_query_without_a_person(filled: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # The front of the bus in ultralytics' bus.jpg: wider than tall, nobody in it.
    bus = cv2.imread(str(ASSETS / "bus.jpg"))
    query = tmp_path / "bus_front.jpg"
    cv2.imwrite(str(query), bus[150:400, 330:630])
    before = snapshot(filled)
    code, _, err = run_cli(["search", str(query), "--db", db_url(filled), *UNTRAINED], capsys, monkeypatch)
    assert_one_error_line(code, err, "no person found")
    assert snapshot(filled) == before


@pytest.mark.parametrize("command", ["search", "stats", "identities"])
def test_empty_database(command: str, tmp_path: Path, query_crop: Path, capsys, monkeypatch) -> None:
    args = {"search": ["search", str(query_crop), *UNTRAINED], "stats": ["stats"], "identities": ["identities"]}[
        command
    ]
    # No database file at all: refused, and none is created.
    missing = tmp_path / "missing"
    code, _, err = run_cli([*args, "--db", db_url(missing)], capsys, monkeypatch)
    assert_one_error_line(code, err, "database is empty")
    assert not missing.exists()
    # A database with its tables but nothing ingested.
    empty = tmp_path / "empty"
    Database(AppConfig(db_url=db_url(empty)), create=True).ensure_info()
    before = snapshot(empty)
    code, _, err = run_cli([*args, "--db", db_url(empty)], capsys, monkeypatch)
    assert_one_error_line(code, err, "database is empty")
    assert snapshot(empty) == before


def test_database_of_another_model_is_refused(
    filled: Path, video: Path, query_crop: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    other = tmp_path / "other"
    shutil.copytree(filled, other)
    with sqlite3.connect(other / "reid.db") as connection:
        connection.execute("UPDATE database_info SET model_weights_sha256 = ?", ("f" * 64,))
    before = snapshot(other)
    code, _, err = run_cli(["search", str(query_crop), "--db", db_url(other), *UNTRAINED], capsys, monkeypatch)
    assert_one_error_line(code, err, "different models")
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "9", "--db", db_url(other), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "different models")
    assert snapshot(other) == before


def test_missing_weights_file(filled: Path, video: Path, query_crop: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    before = snapshot(filled)
    missing = str(tmp_path / "no_such_weights.pt")
    for args in (
        ["ingest", str(video), "--camera", "4", "--db", db_url(filled), "--weights", missing],
        ["search", str(query_crop), "--db", db_url(filled), "--weights", missing],
    ):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_error_line(code, err, "no_such_weights.pt")
    # No --weights, in a checkout whose weights/ lacks the shipped default model.
    monkeypatch.setattr(fanet.weights, "REPO_WEIGHTS_DIR", tmp_path)
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))
    code, _, err = run_cli(["ingest", str(video), "--camera", "4", "--db", db_url(filled)], capsys, monkeypatch)
    assert_one_error_line(code, err, DEFAULT_EMBEDDER_WEIGHTS)
    assert snapshot(filled) == before


def test_console_script_exit_code_and_stderr(tmp_path: Path) -> None:
    """The installed entry point itself (a fresh process): exit 2, one line on stderr, nothing on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "reid_app.cli", "stats", "--db", db_url(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: the database is empty")


def test_a_stream_that_cannot_be_opened_is_one_line_without_ffmpeg_noise(tmp_path: Path) -> None:
    """An RTSP camera that refuses the connection: FFmpeg's and OpenCV's own warnings used to come
    before the error line; now the error line is all (a fresh process: the log levels are read
    when cv2 is first imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_LOG", "OPENCV_FFMPEG"))}
    done = subprocess.run(
        [sys.executable, "-m", "reid_app.cli", "ingest", "rtsp://127.0.0.1:9/camera", "--camera", "1",
         "--db", db_url(tmp_path / "rtsp")],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == "error: cannot open video stream: rtsp://127.0.0.1:9/camera\n"


def test_same_video_being_ingested_by_another_process(filled: Path, video: Path, capsys, monkeypatch) -> None:
    """While another process (here: of another host) ingests a video for a camera, it holds the
    video's claim row; a second ingest of it is refused instead of taking the first one's rows for
    leftovers of a killed run."""
    import time

    from fanet.weights import sha256_file

    with sqlite3.connect(filled / "reid.db") as connection:
        connection.execute(
            "INSERT INTO videos (path, sha256, camera_id, fps, frame_count, width, height, sample_fps, start_time, "
            "status, last_committed_frame, detector, created_at) VALUES (?, ?, 5, 25, 100, 640, 480, 2, "
            "'2024-01-01 00:00:00', 'ingesting', -1, 'yolo', '2024-01-01 00:00:00')",
            (str(video), sha256_file(video)),
        )
        video_id = connection.execute("SELECT max(id) FROM videos").fetchone()[0]
        connection.execute(
            "INSERT INTO ingest_claims (video_id, owner, host, pid, lease_until_s) "
            "VALUES (?, 'other:1:x', 'other', 1, ?)",
            (video_id, time.time() + 600),
        )
    before = snapshot(filled)
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "5", "--db", db_url(filled), "--quiet", *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "being ingested by another process", "host other")
    assert snapshot(filled) == before
    with sqlite3.connect(filled / "reid.db") as connection:
        connection.execute("DELETE FROM ingest_claims WHERE video_id = ?", (video_id,))
        connection.execute("DELETE FROM videos WHERE id = ?", (video_id,))


@pytest.mark.parametrize("url", ["ftp://reid.example.org", "reid.example.org:8000", "http://", "http://x/?key=1"])
def test_public_url_must_be_an_http_address(url: str, filled: Path, video: Path, capsys, monkeypatch) -> None:
    before = snapshot(filled)
    for command in (["ingest", str(video), "--camera", "1", *UNTRAINED], ["watch", "deliver"]):
        code, _, err = run_cli([*command, "--db", db_url(filled), "--public-url", url], capsys, monkeypatch)
        assert_one_error_line(code, err, "must be an http(s) URL", "--public-url")
    monkeypatch.setenv("REID_APP_PUBLIC_URL", url)  # the environment is checked the same way
    code, _, err = run_cli(["watch", "deliver", "--db", db_url(filled)], capsys, monkeypatch)
    assert_one_error_line(code, err, "must be an http(s) URL", "--public-url")
    assert snapshot(filled) == before
