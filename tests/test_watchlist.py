"""The live watchlist (issue 22, item 2): the demo person put on the watchlist from the demo query,
camera 2's clip ingested, the alert made in the ingest's transaction and POSTed to a real HTTP
receiver with a valid HMAC-SHA256 signature; a receiver that fails first, a receiver that is down
during the ingest (delivered later, exactly once); the CLI; the page's alert list and stream.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import run_cli
from sqlalchemy import select, update

from reid_app.config import AppConfig
from reid_app.embed import Embedder
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.store import Alert, Database
from reid_app.watchlist import ALERT_ID_HEADER, SIGNATURE_HEADER, alerts, deliver_due, list_watches

REPO = Path(__file__).resolve().parents[1]
QUERY = REPO / "sample_videos" / "query_cam1_red_jacket.jpg"
CAM1, CAM2 = REPO / "sample_videos" / "cam1_square_left.mp4", REPO / "sample_videos" / "cam2_square_right.mp4"
START = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
SECRET = "s3cret-for-tests"


class Receiver:
    """A real HTTP server that records each POST; ``fail_first`` answers 500 that many times first."""

    def __init__(self, fail_first: int = 0, port: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.fail_first > 0:
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

    def close(self) -> None:
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


def ingest_camera2(config: AppConfig, models) -> None:
    embedder, detector = models
    options = IngestOptions(str(CAM2), 2, start_time=START + timedelta(seconds=47))
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
            cameras.add(payload["camera"])
        assert cameras == {2}
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
