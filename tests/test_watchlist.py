"""The live watchlist (issue 22, item 2): the demo person put on the watchlist from the demo query,
camera 2's clip ingested, the alert made in the ingest's transaction while the person is still in
view and POSTed to a real HTTP receiver with a valid HMAC-SHA256 signature; a receiver that fails
first, a receiver that is down during the ingest (delivered later, exactly once); an ingest killed
between the alert's commit and its delivery, then run again (the same alert delivered, once); the
CLI; the page's alert list and stream; a database made before the alerts' newer columns.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import run_cli
from sqlalchemy import select, text, update

from reid_app.config import AppConfig
from reid_app.embed import Embedder
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.store import Alert, Database, Track
from reid_app.watchlist import ALERT_ID_HEADER, SIGNATURE_HEADER, alerts, deliver_due, list_watches, watch_vectors

REPO = Path(__file__).resolve().parents[1]
QUERY = REPO / "sample_videos" / "query_cam1_red_jacket.jpg"
CAM1, CAM2 = REPO / "sample_videos" / "cam1_square_left.mp4", REPO / "sample_videos" / "cam2_square_right.mp4"
START = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
SECRET = "s3cret-for-tests"


class Receiver:
    """A real HTTP server that records each POST; ``fail_first`` answers 500 that many times first;
    ``hold`` keeps each POST unanswered (not recorded) until :meth:`release`."""

    def __init__(self, fail_first: int = 0, port: int = 0, hold: bool = False) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.held: list[bytes] = []
        self.fail_first = fail_first
        self.hold, self.got_held, self.released = hold, threading.Event(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hold:
                    receiver.held.append(body)
                    receiver.got_held.set()
                    receiver.released.wait(60)
                    self.send_response(503)
                elif receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(500)
                else:
                    receiver.received.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.hold = False
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def models() -> tuple[Embedder, object]:
    return Embedder(None, device="cpu"), load_detector(None, "cpu")


def camera1_database(folder: Path, models) -> AppConfig:
    config = AppConfig(db_url=f"sqlite:///{folder / 'reid.db'}", data_dir=folder, device="cpu")
    embedder, detector = models
    ingest_video(config, IngestOptions(str(CAM1), 1, start_time=START), embedder=embedder, detector=detector)
    return config


CAM2_START = START + timedelta(seconds=47)


def ingest_camera2(config: AppConfig, models) -> None:
    embedder, detector = models
    options = IngestOptions(str(CAM2), 2, start_time=CAM2_START)
    ingest_video(config, options, embedder=embedder, detector=detector)


def watch(config: AppConfig, url: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("REID_APP_WEBHOOK_SECRET", SECRET)
    code, out, err = run_cli(
        ["watch", "add", str(QUERY), "--name", "red jacket", "--threshold", "0.6", "--webhook", url,
         "--db", config.db_url],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err


def test_a_watched_person_raises_one_signed_alert_when_seen_on_another_camera(
    models, tmp_path: Path, capsys, monkeypatch
) -> None:
    config = camera1_database(tmp_path, models)
    receiver = Receiver()
    try:
        watch(config, receiver.url, capsys, monkeypatch)
        assert [w["name"] for w in list_watches(Database(config))] == ["red jacket"]
        ingest_camera2(config, models)  # its deliverer posts before the ingest returns
        assert receiver.received, "no alert delivered"
        cameras = set()
        for headers, body in receiver.received:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
            payload = json.loads(body)
            assert payload["name"] == "red jacket" and payload["score"] >= 0.6
            assert headers[ALERT_ID_HEADER] == str(payload["alert_id"])
            assert payload["thumbnail_url"].endswith("/thumbnail")
            assert payload["first_seen"] <= payload["time"]
            cameras.add(payload["camera"])
        assert cameras == {2}
        # Alerted while the person was still in view: the alerted track was cut when it matched, and
        # the rest of that appearance (same tracker id, later frames) is a second segment, which
        # raised no second alert.
        with Database(config).read() as session:
            for alert in session.scalars(select(Alert)).all():
                track = session.get(Track, alert.track_id)
                later = session.scalars(select(Track).where(
                    Track.video_id == track.video_id, Track.tracker_id == track.tracker_id, Track.id != track.id)).all()
                assert later and all(t.first_frame > track.last_frame for t in later)
            appearances = session.execute(select(Alert.watch_id, Alert.video_id, Alert.tracker_id)).all()
            assert len(appearances) == len(set(appearances))
        stored = alerts(Database(config))
        assert [a["alert_id"] for a in stored] == sorted(json.loads(b)["alert_id"] for _, b in receiver.received)
        assert all(a["delivered"] for a in stored)
        # Nothing is posted twice: another round finds nothing due.
        assert deliver_due(Database(config)) == 0 and len(receiver.received) == len(stored)
    finally:
        receiver.close()


def test_alerts_survive_a_receiver_that_is_down_or_fails_and_arrive_once(
    models, tmp_path: Path, capsys, monkeypatch
) -> None:
    config = camera1_database(tmp_path, models)
    down = Receiver()
    url = down.url
    down.close()  # nobody listens there during the ingest
    watch(config, url, capsys, monkeypatch)
    ingest_camera2(config, models)
    db = Database(config)
    with db.read() as session:
        pending = session.scalars(select(Alert)).all()
    assert pending and all(a.delivered_at is None and a.attempts >= 1 and a.last_error for a in pending)
    # The receiver comes back on the same port, failing once more first; the next rounds deliver.
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    back = Receiver(fail_first=1, port=port)
    try:
        db.write(lambda session: session.execute(update(Alert).values(next_attempt_s=0.0)))  # skip the back-off wait
        deliver_due(db)
        time.sleep(0.1)
        db.write(lambda session: session.execute(update(Alert).values(next_attempt_s=0.0)))
        code, out, err = run_cli(["watch", "deliver", "--db", config.db_url], capsys, monkeypatch)
        assert code == 0, err
        deliver_due(db)
        ids = [json.loads(body)["alert_id"] for _, body in back.received]
        assert sorted(ids) == sorted(a.id for a in pending) and len(ids) == len(set(ids))
    finally:
        back.close()


def test_the_page_gets_alerts_as_a_stream_and_the_cli_manages_the_list(
    models, tmp_path: Path, capsys, monkeypatch
) -> None:
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from reid_app.server.app import create_app  # noqa: PLC0415
    from reid_app.server.state import ServerState  # noqa: PLC0415

    config = camera1_database(tmp_path, models)
    url = ["--db", config.db_url]
    code, out, err = run_cli(["watch", "add", str(QUERY), "--name", "no hook", *url], capsys, monkeypatch)
    assert code == 0, err
    ingest_camera2(config, models)
    embedder, detector = models
    state = ServerState.load(config, embedder=embedder, detector=detector)
    with TestClient(create_app(state), base_url="http://127.0.0.1") as client:
        listed = client.get("/api/v1/alerts").json()["alerts"]
        assert listed and {a["camera"] for a in listed} == {2} and not any(a["delivered"] for a in listed)
        with client.stream("GET", "/api/v1/alerts/stream", params={"after": listed[0]["alert_id"] - 1}) as stream:
            lines = []
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    break
        assert "event: alert" in lines and json.loads(lines[-1][5:])["alert_id"] == listed[0]["alert_id"]
        assert [w["name"] for w in client.get("/api/v1/watchlist").json()["watchlist"]] == ["no hook"]
    code, out, err = run_cli(["watch", "list", *url], capsys, monkeypatch)
    assert "no hook" in out
    watch_id = out.split()[0]
    code, out, err = run_cli(["watch", "remove", watch_id, *url], capsys, monkeypatch)
    assert code == 0 and list_watches(Database(config)) == []
    for args, expected in ((["watch", "add", "--name", "x", *url], "one of them"),
                           (["watch", "add", str(QUERY), "--name", "x", "--webhook", "ftp://x", *url], "http(s)"),
                           (["watch", "remove", "999", *url], "no watchlist entry")):  # fmt: skip
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code != 0 and expected in err and len(err.strip().splitlines()) == 1, err


def test_an_ingest_killed_between_the_alert_commit_and_its_delivery_delivers_it_once_when_run_again(
    models, tmp_path: Path, capsys, monkeypatch
) -> None:
    config = camera1_database(tmp_path, models)
    receiver = Receiver(hold=True)
    public = "http://reid.example.org:8000"
    log = (tmp_path / "ingest.log").open("w")
    try:
        watch(config, receiver.url, capsys, monkeypatch)
        ingest = subprocess.Popen(
            [sys.executable, "-m", "reid_app.cli", "ingest", str(CAM2), "--camera", "2", "--db", config.db_url,
             "--data-dir", str(tmp_path), "--start-time", CAM2_START.isoformat(), "--device", "cpu", "--quiet",
             "--public-url", public],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"REID_APP_WEBHOOK_SECRET": SECRET},
        )  # fmt: skip
        # Its first POST comes after the alert's commit: kill it there, before the answer is recorded.
        got = receiver.got_held.wait(300)
        ingest.kill()
        ingest.wait(timeout=60)
        assert got, (tmp_path / "ingest.log").read_text()
        killed_on = json.loads(receiver.held[0])
        assert killed_on["thumbnail_url"].startswith(f"{public}/api/v1/detections/")
        db = Database(config)
        with db.read() as session:
            stored = session.scalars(select(Alert)).all()
        assert killed_on["alert_id"] in {a.id for a in stored} and all(a.delivered_at is None for a in stored)
        receiver.release()
        # The killed run's lease on the alert keeps other deliverers off it for 30 s: skip that wait.
        db.write(lambda session: session.execute(update(Alert).values(next_attempt_s=0.0)))
        config.public_url = public
        ingest_camera2(config, models)  # run again: the video is redone from its start
    finally:
        receiver.close()
        log.close()
    with db.read() as session:
        final = session.scalars(select(Alert)).all()
        assert all(session.get(Track, a.track_id) is not None for a in final)  # moved to the redone tracks
    ids = [json.loads(body)["alert_id"] for _, body in receiver.received]
    assert killed_on["alert_id"] in ids  # the same alert, not a second one for the same appearance
    assert sorted(ids) == sorted(a.id for a in final) and len(ids) == len(set(ids))
    assert all(a.delivered_at is not None for a in final)
    assert all(json.loads(b)["thumbnail_url"].startswith(public) for _, b in receiver.received)


def test_a_database_with_the_first_alerts_table_gets_the_new_columns(
    models, tmp_path: Path, capsys, monkeypatch
) -> None:
    config = camera1_database(tmp_path, models)
    watch(config, "", capsys, monkeypatch)
    db = Database(config)
    # The alerts table as the first watchlist version made it (no appearance columns).
    db.write(lambda session: session.execute(text("DROP TABLE alerts")))
    db.write(lambda session: session.execute(text(
        "CREATE TABLE alerts (id INTEGER PRIMARY KEY, watch_id INTEGER, track_id INTEGER, camera_id INTEGER, "
        "score FLOAT, seen_at DATETIME, created_at DATETIME, delivered_at DATETIME, attempts INTEGER, "
        "next_attempt_s FLOAT, last_error VARCHAR(300), UNIQUE (watch_id, track_id))")))  # fmt: skip
    # A deliverer (every ingest, serve, `watch deliver`) adds the missing columns in its first round.
    assert deliver_due(db) == 0
    with db.read() as session:
        columns = {row[1] for row in session.execute(text("PRAGMA table_info(alerts)"))}
    assert {"video_id", "tracker_id", "first_seen_at"} <= columns
    assert watch_vectors(db) is not None
    ingest_camera2(config, models)
    assert alerts(db) and all(a["first_seen"] for a in alerts(db))
