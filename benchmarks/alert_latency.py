"""Watchlist alert latency on a live stream: from the frame to the webhook (issue 22).

A real RTSP server (GStreamer, as in ``tests/test_rtsp.py``) plays sample clip 2 (camera 2, where
the demo person walks through); each time the clip ends the stream drops, ``reid-app ingest
rtsp://...`` reconnects and the person appears again. The demo person is on the watchlist (the
demo query photo, default threshold) with a webhook to a local receiver, which notes when each
POST arrives. For every alert, two latencies on one clock (the ingest times a stream's frames by
the wall clock since it connected):

* from the person's **first tracked frame** (the alert's ``first_seen``; ByteTrack confirms a
  person on their second sighting, half a second after the first at 2 fps), and
* from the **deciding frame** (the alert's ``time``: the frame after which the track matched).

    python benchmarks/alert_latency.py --appearances 20 [--backend auto] [--int8] [--work /tmp/reid_alerts]

The gallery is camera 1's clip, ingested first (a watchlist needs the database's model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUERY = REPO / "sample_videos/query_cam1_red_jacket.jpg"
CAM1, CAM2 = REPO / "sample_videos/cam1_square_left.mp4", REPO / "sample_videos/cam2_square_right.mp4"
SYSTEM_PYTHON = "/usr/bin/python3"  # PyGObject (the RTSP server) comes from Debian


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reid_app", *args], cwd=REPO, **kwargs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Receiver:
    """A webhook receiver noting the arrival time of each alert."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                arrived = time.time()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.arrivals.append((arrived, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appearances", type=int, default=20, help="Alerts to wait for.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/reid_alerts"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Give up after this many seconds.")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    db = f"sqlite:///{args.work / 'reid.db'}"
    model = ["--backend", args.backend, *(["--int8"] if args.int8 else [])]
    if cli("ingest", str(CAM1), "--camera", "1", "--db", db, "--quiet", *model).wait() != 0:
        raise SystemExit("the gallery ingest failed")
    receiver = Receiver()
    if cli("watch", "add", str(QUERY), "--name", "demo person", "--webhook", receiver.url, "--db", db,
           "--backend", args.backend).wait() != 0:  # fmt: skip
        raise SystemExit("watch add failed")

    port = free_port()
    server = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tests/rtsp_server.py"), str(CAM2), str(port)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    log = (args.work / "ingest.log").open("w")
    ingest = cli("ingest", f"rtsp://127.0.0.1:{port}/cam", "--camera", "2", "--db", db, "--quiet", *model,
                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    started = time.monotonic()
    try:
        while len(receiver.arrivals) < args.appearances:
            if ingest.poll() is not None or time.monotonic() - started > args.timeout:
                raise SystemExit(f"stopped after {len(receiver.arrivals)} alerts; see {args.work / 'ingest.log'}")
            time.sleep(0.5)
    finally:
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(timeout=120)
        server.terminate()
        server.wait(timeout=30)
        log.close()

    from_first, from_decision = [], []
    for arrived, alert in receiver.arrivals:
        from_first.append(arrived - datetime.fromisoformat(alert["first_seen"]).timestamp())
        from_decision.append(arrived - datetime.fromisoformat(alert["time"]).timestamp())
    cameras = {alert["camera"] for _, alert in receiver.arrivals}
    reconnects = (args.work / "ingest.log").read_text().count("reconnecting")
    print(f"{len(receiver.arrivals)} alerts (cameras {sorted(cameras)}) over {reconnects + 1} plays of the clip, "
          f"{time.monotonic() - started:.0f} s; backend {args.backend}{' int8' if args.int8 else ''}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    for name, values in (("from the first tracked frame", from_first), ("from the deciding frame", from_decision)):
        print(f"latency {name}: p50 {statistics.median(values):.2f} s, p95 {percentile(values, 0.95):.2f} s, "
              f"max {max(values):.2f} s")  # fmt: skip
    print("scores:", " ".join(f"{alert['score']:.2f}" for _, alert in receiver.arrivals))


if __name__ == "__main__":
    main()
