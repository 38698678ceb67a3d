"""``reid-app ingest rtsp://...`` against a real RTSP server (GStreamer's, tests/rtsp_server.py,
serving the camera-1 sample clip): it commits as it goes, reconnects when the server restarts,
adds no duplicate track, and stops cleanly on SIGTERM with what it saw stored.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "sample_videos" / "cam1_square_left.mp4"
SYSTEM_PYTHON = "/usr/bin/python3"


def _rtsp_server_available() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(
    not _rtsp_server_available(),
    reason="no GStreamer RTSP server: apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad python3-gi",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tests" / "rtsp_server.py"), str(CLIP), str(port)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server


def rows(db: Path, query: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        try:
            return connection.execute(query).fetchall()
        except sqlite3.OperationalError:  # tables not made yet
            return []


def wait_for(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_live_stream_reconnects_after_a_server_restart_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "reid.db"
    server = start_server(port)
    log = (tmp_path / "ingest.log").open("w")
    ingest = subprocess.Popen(
        [sys.executable, "-m", "reid_app.cli", "ingest", f"rtsp://127.0.0.1:{port}/cam", "--camera", "7",
         "--db", f"sqlite:///{db}", "--quiet"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: len(rows(db, "SELECT id FROM tracks")) >= 1, 240, "the first committed track")
        before_restart = len(rows(db, "SELECT id FROM tracks"))
        server.terminate()
        server.wait(timeout=30)
        time.sleep(3)  # the ingest sees the stream drop and backs off
        server = start_server(port)
        wait_for(lambda: "reconnecting" in (tmp_path / "ingest.log").read_text(), 120, "a reconnection")
        wait_for(lambda: len(rows(db, "SELECT id FROM tracks")) > before_restart, 240, "tracks after the restart")
        assert ingest.poll() is None  # still running: a live ingest runs until stopped
        ingest.send_signal(signal.SIGTERM)
        assert ingest.wait(timeout=120) == 0, (tmp_path / "ingest.log").read_text()
    finally:
        if ingest.poll() is None:
            ingest.kill()
        server.terminate()
        server.wait(timeout=30)
        log.close()
    output = (tmp_path / "ingest.log").read_text()
    assert "stopped by the operator" in output
    ((status,),) = rows(db, "SELECT status FROM videos")
    assert status == "complete"
    # No duplicate: frame numbers keep increasing across connections, so no track is stored twice
    # (a repeat would repeat its frame span), and every track has its crops.
    spans = rows(db, "SELECT first_frame, last_frame FROM tracks")
    assert len(spans) > before_restart and len(set(spans)) == len(spans)
    assert rows(db, "SELECT count(*) FROM tracks WHERE id NOT IN (SELECT track_id FROM detections)") == [(0,)]
    # The tracker starts again at each connection, its ids do not: each stored track has its own.
    tracker_ids = rows(db, "SELECT tracker_id FROM tracks")
    assert len(set(tracker_ids)) == len(tracker_ids)
