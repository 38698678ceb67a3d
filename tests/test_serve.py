"""``reid-app serve``: the HTTP API and the page over a real gallery.

The gallery is the demo's: both sample clips ingested (2 fps) with the shipped FA-Net and the real
YOLO11n-pose detector into a real SQLite file and FAISS indexes, once for this module. Requests
go through the real FastAPI application (in-process, httpx) with the real models; the access
rules are tested on the ASGI app as a client sees them, and ``serve`` itself as a process.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import ASSETS, run_cli
from hypothesis import HealthCheck, settings

from reid_app.config import AppConfig
from reid_app.embed import Embedder
from reid_app.images import JPEG_MARKER
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.overview import collect_stats
from reid_app.server.app import api_json, create_app
from reid_app.server.limits import uvicorn_config
from reid_app.server.security import load_token, require_token_for
from reid_app.server.state import ServerState

REPO = Path(__file__).resolve().parents[1]
CLIP_CAM1 = REPO / "sample_videos" / "cam1_square_left.mp4"
CLIP_CAM2 = REPO / "sample_videos" / "cam2_square_right.mp4"
DEMO_QUERY = REPO / "sample_videos" / "query_cam1_red_jacket.jpg"
#: Clip 2 starts 47 s after clip 1 in the source sequence (sample_videos/README.md).
START = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
TOKEN = "test-token-0123456789abcdef"
LOCAL = "http://127.0.0.1"
#: Examples per API operation (about 10 operations; each request a few ms, a search up to ~0.2 s).
FUZZ_EXAMPLES = 40


@pytest.fixture(scope="module")
def models() -> tuple[Embedder, object]:
    """The shipped FA-Net and the default detector, loaded once."""
    return Embedder(None, device="cpu"), load_detector(None, "cpu")


@pytest.fixture(scope="module")
def demo_gallery(tmp_path_factory: pytest.TempPathFactory, models) -> Path:
    """The demo's database: clip 1 as camera 1, clip 2 as camera 2 (about 10 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("serve_gallery")
    config = AppConfig(db_url=f"sqlite:///{folder / 'reid.db'}", device="cpu")
    embedder, detector = models
    for camera, clip, start in ((1, CLIP_CAM1, START), (2, CLIP_CAM2, START + timedelta(seconds=47))):
        ingest_video(
            config, IngestOptions(str(clip), camera, start_time=start), embedder=embedder, detector=detector
        )
    return folder


def db_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'reid.db'}"


@pytest.fixture(scope="module")
def state(demo_gallery: Path, models) -> ServerState:
    embedder, detector = models
    return ServerState.load(AppConfig(db_url=db_url(demo_gallery), device="cpu"), embedder=embedder, detector=detector)


@pytest.fixture(scope="module")
def client(state: ServerState) -> Iterator[TestClient]:
    with TestClient(create_app(state), base_url=LOCAL) as test_client:
        yield test_client


def snapshot(folder: Path) -> dict[str, object]:
    """Row counts, identity ids and the index files' bytes: what no refused request may change."""
    with sqlite3.connect(folder / "reid.db") as connection:
        counts = {
            t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("videos", "tracks", "detections")
        }
        identities = connection.execute("SELECT id, identity_id FROM tracks ORDER BY id").fetchall()
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.faiss*")) if not p.name.endswith(".lock")}
    return {"counts": counts, "identities": identities, "files": files}


def search(client: TestClient, path: Path | None = None, data: dict | None = None, *, content: bytes | None = None,
           name: str = "query.jpg", headers: dict | None = None):
    payload = content if content is not None else Path(path).read_bytes()
    return client.post("/api/v1/search", files={"image": (name, payload, "image/jpeg")}, data=data or {},
                       headers=headers)


def png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


# ------------------------------------------------------------------------------------------------ search


def test_search_finds_the_demo_person_on_camera_2_with_the_cli_json(
    client: TestClient, demo_gallery: Path, capsys, monkeypatch
) -> None:
    response = search(client, DEMO_QUERY, {"top_k": "5"}, name="query_cam1_red_jacket.jpg")
    assert response.status_code == 200, response.text
    api = response.json()
    hits = api["persons"][0]["results"]
    assert api["warning"] is None and api["matches_are_meaningful"]
    assert hits[0]["camera"] == 1  # the query's own track
    assert any(h["camera"] == 2 and h["rank"] <= 2 for h in hits), hits
    # One serialiser: the CLI's --json gives the same document (but for where the query file is).
    code, out, err = run_cli(
        ["search", str(DEMO_QUERY), "--db", db_url(demo_gallery), "--top-k", "5", "--json", "--device", "cpu"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    cli = json.loads(out)
    assert cli["query_image"] == str(DEMO_QUERY.resolve()) and api["query_image"] == "query_cam1_red_jacket.jpg"
    # The API names no server path (video file names and thumbnail URLs instead): otherwise the same.
    assert {**api_json(cli), "query_image": None} == {**api, "query_image": None}


def test_filters_levels_and_a_frame_with_several_people(client: TestClient, demo_gallery: Path) -> None:
    only2 = search(client, DEMO_QUERY, {"camera": ["2"], "top_k": "3", "threshold": "-1"}).json()
    assert {h["camera"] for h in only2["persons"][0]["results"]} == {2}
    crops = search(client, DEMO_QUERY, {"level": "detections", "top_k": "4", "threshold": "-1"}).json()
    assert crops["level"] == "detections" and len(crops["persons"][0]["results"]) == 4
    # A whole frame of camera 2 with several people: every one of them is a query person, with its box.
    capture = cv2.VideoCapture(str(CLIP_CAM2))
    capture.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, frame = capture.read()
    capture.release()
    assert ok
    everyone = search(client, content=png(frame), data={"all_persons": "true"}, name="frame.png").json()
    assert len(everyone["persons"]) >= 2
    assert all(p["how"] == "detected person" and len(p["bbox"]) == 4 for p in everyone["persons"])


# ------------------------------------------------------------------------------------- refused requests


def test_bad_queries_are_one_line_4xx_and_change_nothing(
    client: TestClient, demo_gallery: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    before = snapshot(demo_gallery)
    grey = png(np.full((200, 80, 3), 128, np.uint8))
    demo = DEMO_QUERY.read_bytes()
    cases = {
        "grey 80x200 crop": (grey, 400, "no person found"),
        "empty file": (b"", 400, "empty"),
        "text file": (b"hello, not a picture", 400, "not an image"),
        "truncated JPEG": (demo[:200], 400, "not an image"),
    }
    for what, (content, status, words) in cases.items():
        response = search(client, content=content, name="upload.bin")
        assert response.status_code == status, (what, response.text)
        body = response.json()
        assert words in body["error"], (what, body)
        assert "/tmp" not in body["error"] and "\n" not in body["error"]
    for data in ({"top_k": "0"}, {"top_k": "10001"}, {"threshold": "2"}, {"level": "faces"}, {"camera": ["0"]},
                 {"camera": ["1"], "exclude_camera": ["2"]}):
        response = search(client, DEMO_QUERY, data)
        assert response.status_code in (400, 422), (data, response.text)
        assert "error" in response.json()
    assert client.post("/api/v1/search").status_code == 422  # no image at all
    for path in ("/api/v1/tracks/999999", "/api/v1/detections/999999", "/api/v1/detections/999999/thumbnail",
                 "/api/v1/detections/999999/frame"):
        response = client.get(path)
        assert response.status_code == 404 and "999999" in response.json()["error"], path
    for path in ("/api/v1/tracks/0", "/api/v1/detections/-1/frame", "/api/v1/detections/99999999999999999999",
                 "/api/v1/tracks/abc"):
        assert client.get(path).status_code == 422, path
    assert snapshot(demo_gallery) == before
    # The CLI applies the same rule to the same grey crop.
    query = tmp_path / "grey.png"
    query.write_bytes(grey)
    code, _, err = run_cli(["search", str(query), "--db", db_url(demo_gallery), "--device", "cpu"], capsys, monkeypatch)
    assert code == 2 and "no person found" in err and len(err.strip().splitlines()) == 1


def test_uploads_are_size_limited(state: ServerState) -> None:
    small = ServerState(**{**state.__dict__, "max_upload_bytes": 4096})
    with TestClient(create_app(small), base_url=LOCAL) as limited:
        response = limited.post("/api/v1/search", files={"image": ("q.jpg", b"\xff" * 10_000, "image/jpeg")})
        assert response.status_code == 413 and "limited to" in response.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: read up to the limit, then refused
            for _ in range(10):
                yield b"x" * 1000

        multipart = {"content-type": "multipart/form-data; boundary=b"}
        response = limited.post("/api/v1/search", content=chunks(), headers=multipart)
        assert response.status_code == 413


# ------------------------------------------------------------------------------------------------ reads


def test_read_endpoints_are_the_pipeline_functions(client: TestClient, state: ServerState, demo_gallery: Path) -> None:
    cameras = client.get("/api/v1/cameras").json()
    expected = collect_stats(state.config)
    for stats in (cameras, expected):  # how far each index was behind, and how long it took: per call
        for index in stats["indexes"].values():
            assert set(index.pop("was_behind")) == {"rows_behind", "deletions_behind", "rebuilt", "seconds"}
    assert cameras == api_json(expected)
    assert [c["camera"] for c in cameras["cameras"]] == [1, 2]
    tracks = client.get("/api/v1/tracks", params={"camera": 2}).json()["tracks"]
    assert tracks and {t["camera"] for t in tracks} == {2}
    assert [t["start"] for t in tracks] == sorted(t["start"] for t in tracks)
    chosen = [tracks[0]["track_id"], tracks[-1]["track_id"]]
    assert {t["track_id"] for t in client.get("/api/v1/tracks", params={"ids": chosen}).json()["tracks"]} == set(chosen)
    detail = client.get(f"/api/v1/tracks/{chosen[0]}").json()
    detection = detail["detections"][0]
    assert client.get(f"/api/v1/detections/{detection['detection_id']}").json() == detection
    # The thumbnail is the JPEG stored in the database (where every host reads it), served by id.
    thumb = client.get(f"/api/v1/detections/{detection['detection_id']}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    with sqlite3.connect(demo_gallery / "reid.db") as connection:
        (stored,) = connection.execute(
            "SELECT jpeg FROM thumbnails WHERE detection_id = ?", (detection["detection_id"],)
        ).fetchone()
    assert thumb.content == bytes(stored) and thumb.content.startswith(b"\xff\xd8\xff")
    # The frame is read from the video now: the clip's size, the box drawn in orange.
    jpeg = client.get(f"/api/v1/detections/{detection['detection_id']}/frame").content
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape[:2] == (480, 640)
    x1, y1, _, _ = (round(v) for v in detection["bbox"])
    b, g, r = frame[y1 + 1, x1 + 1].astype(int)
    assert r > 200 and b < 80, (b, g, r)


def test_identities_read_and_recompute(client: TestClient, demo_gallery: Path) -> None:
    first = client.post("/api/v1/identities", params={"threshold": 0.3}).json()
    assert first["identities"] and first["threshold"] == 0.3
    stored = client.get("/api/v1/identities").json()
    assert stored["computed_at"] is not None
    assert {i["identity_id"]: i["track_ids"] for i in stored["identities"]} == {
        i["identity_id"]: i["track_ids"] for i in first["identities"]
    }
    some = stored["identities"][0]
    tracks = client.get("/api/v1/tracks", params={"identity": some["identity_id"]}).json()["tracks"]
    assert sorted(t["track_id"] for t in tracks) == sorted(some["track_ids"])
    assert client.post("/api/v1/identities", params={"threshold": 3}).status_code == 422
    # Without a threshold the calibrated default applies, the one the status tells the page.
    assert client.post("/api/v1/identities").json()["threshold"] == AppConfig.identity_threshold
    status = client.get("/api/v1/status").json()
    assert status["defaults"]["identity_threshold"] == AppConfig.identity_threshold
    # The runtime the server embeds with (the shipped model on `auto`: an exported graph on a CPU).
    from reid_app.backends import auto_backend_on_cpu

    assert status["embedder"]["backend"] == auto_backend_on_cpu().value
    assert status["embedder"]["precision"] == "float32"
    assert status["embedder"]["adapted"] == ""  # the shipped model was not adapted
    assert client.get("/api/v1/cameras").json()["inference"]["backend"] == auto_backend_on_cpu().value


def test_the_index_picks_up_a_new_camera_without_a_restart(
    client: TestClient, demo_gallery: Path, tmp_path: Path, models
) -> None:
    before = client.get("/api/v1/cameras").json()["indexes"]["tracks"]["vectors"]
    copy = tmp_path / "cam3.mp4"  # another camera's file (other bytes: a new video)
    shutil.copy(CLIP_CAM1, copy)
    with open(copy, "ab") as handle:
        handle.write(b"\0")
    # Written by another process, as an ingest would be, while this server keeps its index loaded.
    process = subprocess.run(
        [sys.executable, "-m", "reid_app", "ingest", str(copy), "--camera", "3", "--db", db_url(demo_gallery),
         "--max-frames", "6", "--quiet", "--device", "cpu", "--start-time", "2024-05-01T10:05:00"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr
    cameras = client.get("/api/v1/cameras").json()
    assert 3 in [c["camera"] for c in cameras["cameras"]], (process.stdout, process.stderr)
    assert cameras["indexes"]["tracks"]["vectors"] > before
    hits = search(client, DEMO_QUERY, {"camera": ["3"], "threshold": "-1"}).json()["persons"][0]["results"]
    assert hits and {h["camera"] for h in hits} == {3}


def test_concurrent_searches_give_the_serial_answers(client: TestClient, demo_gallery: Path) -> None:
    queries = sorted((demo_gallery / "thumbnails").rglob("*.jpg"))[:8]
    serial = {q: search(client, q, {"top_k": "3"}).json()["persons"][0]["results"] for q in queries}
    answers: dict[Path, object] = {}

    def run(query: Path) -> None:
        answers[query] = search(client, query, {"top_k": "3"}).json()["persons"][0]["results"]

    threads = [threading.Thread(target=run, args=(q,)) for q in queries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == serial


# --------------------------------------------------------------------------------------------- security


def test_token_host_and_headers(state: ServerState) -> None:
    with TestClient(create_app(state), base_url="http://reid.example.com") as foreign:
        response = foreign.get("/api/v1/status")  # DNS rebinding: a loopback server answers loopback names only
        assert response.status_code == 400 and "localhost" in response.json()["error"]
    guarded = ServerState(**{**state.__dict__, "token": TOKEN, "loopback_only": False})
    with TestClient(create_app(guarded), base_url="http://10.1.2.3:8000") as remote:
        for path in ("/", "/static/app.js", "/api/v1/status", "/api/v1/detections/1/thumbnail", "/api/v1/openapi.json"):
            response = remote.get(path)
            assert response.status_code == 401 and "token" in response.json()["error"], path
        wrong = {"Authorization": "Bearer wrong-token-0123456789"}
        assert remote.get("/api/v1/status", headers=wrong).status_code == 401
        assert remote.get("/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # The page: /?token= sets an HttpOnly, SameSite=Strict cookie and drops the token from the address.
        first = remote.get(f"/?token={TOKEN}", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=Strict" in first.headers["set-cookie"]
        page = remote.get("/")
        assert page.status_code == 200 and "<title>reid-app</title>" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert remote.get("/api/v1/cameras").status_code == 200


def test_serve_refuses_an_open_address_without_a_token(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("REID_APP_TOKEN", raising=False)
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path}/x.db"], capsys, monkeypatch)
    assert code == 2 and "access token" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(Exception, match="access token"):
        require_token_for("192.168.1.20", None)
    require_token_for("127.0.0.1", None)
    require_token_for("::1", None)
    weak = tmp_path / "weak"
    weak.write_text("short\n")
    weak.chmod(0o600)
    with pytest.raises(Exception, match="at least 16"):
        load_token(str(weak))
    shared = tmp_path / "shared"
    shared.write_text(TOKEN)
    shared.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        load_token(str(shared))
    shared.chmod(0o600)
    assert load_token(str(shared)) == TOKEN


# ------------------------------------------------------------------------------------- the real process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: What the ``served`` process wrote to stderr after it started (the slowloris test reads it).
SERVED_LOG: list[str] = []
#: The ``served`` process's file-descriptor limit: low, so that exhausting it takes only a few
#: hundred connections (the slowloris test).
SERVED_FD_LIMIT = 512


@pytest.fixture(scope="module")
def served(demo_gallery: Path) -> Iterator[str]:
    """``reid-app serve`` as its own process on a free local port, over the demo gallery, with a
    file-descriptor limit of SERVED_FD_LIMIT."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "reid_app", "serve", "--db", db_url(demo_gallery), "--port", str(port), "--device",
         "cpu"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Set from here, not with preexec_fn (unsafe in a process with threads, as pytest's is):
        # the child is still starting Python when this lands, long before serve reads its limit.
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (SERVED_FD_LIMIT, SERVED_FD_LIMIT))
        deadline = time.monotonic() + 180
        for line in process.stderr:
            if "serving" in line:
                break
            assert time.monotonic() < deadline and process.poll() is None, line
        # Keep its pipe drained, and what it says for the tests.
        threading.Thread(target=lambda: SERVED_LOG.extend(process.stderr), daemon=True).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def browser_page(served: str) -> Iterator[tuple[object, list[str]]]:
    """The page opened in the system Chromium, with the page's script errors collected."""
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium binary found (install Debian's chromium: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(served + "/")
            page.wait_for_selector("#camera-filter input")  # the cameras overview answered
            yield page, errors
        finally:
            browser.close()


def test_the_page_in_a_real_browser(served: str, tmp_path: Path) -> None:
    """Chromium opens the page, uploads the demo query; the grid and the timeline show the camera-2 hit."""
    with browser_page(served) as (page, errors):
        from playwright.sync_api import expect

        # The form starts from the server's calibrated defaults, not from numbers of its own.
        expect(page.locator("#threshold")).to_have_value(str(AppConfig.search_threshold))
        expect(page.locator("#identity-threshold")).to_have_value(str(AppConfig.identity_threshold))
        page.set_input_files("#image-input", str(DEMO_QUERY))
        page.wait_for_selector("#results figure", timeout=120_000)
        page.wait_for_selector("#timeline svg .bar-group", timeout=60_000)
        figures = page.query_selector_all("#results figure")
        ranked = [
            (int(f.get_attribute("data-rank")), int(f.get_attribute("data-camera")), f.get_attribute("data-track"))
            for f in figures
        ]
        camera2 = [(rank, track) for rank, camera, track in ranked if camera == 2 and rank <= 2]
        assert camera2, ranked
        track = camera2[0][1]
        assert page.query_selector(f"#timeline .bar-group[data-camera='2'][data-track='{track}']")
        assert page.query_selector(f"#trajectory li[data-camera='2'][data-track='{track}']")
        assert page.is_hidden("#warning")  # the shipped model is trained: no warning
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        # A click shows the full frame with the box and the track's other crops.
        page.click(f"#results figure[data-track='{track}']")
        page.wait_for_selector("#detail-crops figure")
        # Polled from here: the page's CSP (no eval) forbids Playwright's in-page wait_for_function.
        width, deadline = 0, time.monotonic() + 60
        while width == 0 and time.monotonic() < deadline:
            width = page.evaluate("document.getElementById('detail-frame').naturalWidth")
            page.wait_for_timeout(200)
        assert width == 640
        assert not errors, errors


def test_a_case_in_a_real_browser(served: str) -> None:
    """Search → start a case from the camera-1 hit → search again → confirm the camera-2 candidate →
    the case's timeline holds exactly the two confirmed tracks → the HTML export has both."""
    with browser_page(served) as (page, errors):
        page.set_input_files("#image-input", str(DEMO_QUERY))
        page.wait_for_selector("#results figure", timeout=120_000)
        page.fill("#case-name", "red jacket (browser)")
        first = page.query_selector("#results figure[data-rank='1']")
        assert first is not None and first.get_attribute("data-camera") == "1"
        first_track = first.get_attribute("data-track")
        first.query_selector("button.start-case").click()
        page.wait_for_selector("#case-candidates figure.candidate", timeout=60_000)
        assert "red jacket (browser)" in page.inner_text("#case-title")
        candidate = page.query_selector("#case-candidates figure.candidate[data-camera='2']")
        assert candidate is not None
        second_track = candidate.get_attribute("data-track")
        candidate.query_selector("button[data-verdict='confirmed']").click()
        page.wait_for_selector(f"#case-timeline .bar-group[data-track='{second_track}']", timeout=60_000)
        bars = {(g.get_attribute("data-camera"), g.get_attribute("data-track"))
                for g in page.query_selector_all("#case-timeline .bar-group")}  # fmt: skip
        assert bars == {("1", first_track), ("2", second_track)}
        # The candidates no longer hold the confirmed tracks: they are drawn apart.
        page.wait_for_selector("#case-candidates figure.candidate", timeout=60_000)
        figures = page.query_selector_all("#case-candidates figure.candidate")
        shown = {f.get_attribute("data-track") for f in figures}
        assert not shown & {first_track, second_track}
        export = page.request.get(served + (page.get_attribute("#case-export-html", "href") or ""))
        assert export.ok and export.text().count("data:image/jpeg;base64,") == 2
        # Watch for the case's person: the watchlist shows the entry.
        page.click("#case-watch")
        page.wait_for_selector("#watchlist li[data-watch]")
        assert "red jacket (browser)" in page.inner_text("#watchlist")
        # The admin view lists what was done, by whom.
        page.click("nav button[data-tab='audit']")
        page.wait_for_selector("#audit-table tr[data-action='case.mark']")
        actions = {r.get_attribute("data-action") for r in page.query_selector_all("#audit-table tbody tr")}
        assert {"search", "case.create", "case.search", "case.mark", "case.export", "watch.add"} <= actions
        assert "api:127.0.0.1" in page.inner_text("#audit-table")
        assert not errors, errors


# ------------------------------------------------------------------------------ API fuzzing (schemathesis)


def test_api_fuzz_never_answers_with_a_server_error(served: str) -> None:
    """Requests generated from the OpenAPI schema the running server publishes (real HTTP, real
    uvicorn) to the search and read endpoints: never a 5xx, every error a JSON ``error``."""
    import schemathesis
    from hypothesis import given

    schema = schemathesis.openapi.from_url(served + "/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # Recomputing identities is a deliberate write (tested above), not a read or a search.
    operations = [op for op in operations if (op.method.upper(), op.path) != ("POST", "/api/v1/identities")]
    # The alert stream never ends by design (server-sent events): read in test_watchlist instead.
    operations = [op for op in operations if op.path != "/api/v1/alerts/stream"]
    assert {op.path for op in operations} >= {"/api/v1/search", "/api/v1/tracks/{track_id}", "/api/v1/cameras"}
    calls: list[tuple[str, int]] = []
    for operation in operations:

        @settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(timeout=120)
            calls.append((case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert "error" in response.json(), response.text[:300]

        check()
    print(f"{len(calls)} fuzzed requests over {len(operations)} operations; statuses {sorted({c for _, c in calls})}")


def call_while_busy(model, call, requests: list) -> dict[int, object]:
    """``call(request)`` for each request on its own thread while another call holds ``model``
    (a _BatchingModel), so that all of them queue up; what each got, by position (an exception
    when it raised)."""
    results: dict[int, object] = {}

    def one(number: int, request) -> None:
        try:
            results[number] = call(request)
        except Exception as exc:  # noqa: BLE001 - the tests inspect what each request got
            results[number] = exc

    with model._lock:  # a search is using the model: the next requests queue up
        threads = [threading.Thread(target=one, args=(n, r)) for n, r in enumerate(requests)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(model._waiting) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(60)
    return results


def test_requests_waiting_for_the_embedder_are_embedded_in_one_batch(models) -> None:
    from reid_app.server.state import MAX_BATCH, SharedEmbedder

    embedder, _ = models
    shared = SharedEmbedder(embedder)
    frame = cv2.imread(str(REPO / "sample_videos/query_cam1_red_jacket.jpg"))
    crops = [np.ascontiguousarray(frame[:, i : i + frame.shape[1] - 6]) for i in range(MAX_BATCH)]  # all different
    broken = np.zeros((0, 5, 3), np.uint8)  # no pixels: the embedder refuses it
    results = call_while_busy(shared._model, lambda crop: shared.embed([crop]), [*crops[1:], broken])
    # All waited together; the broken crop made that batch fail, so each was embedded alone and
    # only the broken one's request failed.
    assert shared.batches == [MAX_BATCH]
    assert isinstance(results[MAX_BATCH - 1], Exception) and "cannot embed" in str(results[MAX_BATCH - 1])
    for number, crop in enumerate(crops[1:]):
        np.testing.assert_allclose(results[number], embedder.embed([crop]), atol=1e-5)

    # Without a broken crop the queued requests share one model call.
    shared = SharedEmbedder(embedder)
    results = call_while_busy(shared._model, lambda crop: shared.embed([crop]), crops)
    assert shared.batches == [MAX_BATCH]
    for number, crop in enumerate(crops):
        np.testing.assert_allclose(results[number], embedder.embed([crop]), atol=1e-5)


def test_requests_waiting_for_the_detector_are_detected_in_one_batch(models) -> None:
    from reid_app.search import query_imgsz
    from reid_app.server.state import MAX_BATCH, SharedDetector

    _, detector = models
    shared = SharedDetector(detector)
    frame = cv2.imread(str(REPO / "sample_videos/query_cam1_red_jacket.jpg"))
    # Different uploads of the demo query (shifted by a pixel each) and one with no pixels.
    images = [np.ascontiguousarray(frame[:, i : i + frame.shape[1] - 6]) for i in range(MAX_BATCH - 1)]
    broken = np.zeros((0, 5, 3), np.uint8)
    results = call_while_busy(
        shared._model, lambda image: shared.detect(image, imgsz=query_imgsz(image.shape)), [*images, broken]
    )
    assert shared.batches == [MAX_BATCH]
    assert isinstance(results[MAX_BATCH - 1], Exception)
    for number, image in enumerate(images):
        alone = detector.detect(image, imgsz=query_imgsz(image.shape))
        assert len(alone) >= 1 and len(results[number]) == len(alone)
        for a, b in zip(results[number], alone, strict=True):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=0.5)


def test_a_batch_holds_at_most_max_batch_requests_and_each_gets_its_own_result() -> None:
    from reid_app.server.state import _BatchingModel

    model = _BatchingModel(lambda numbers: [n * n for n in numbers], max_batch=3)
    results = call_while_busy(model, model, list(range(7)))
    assert results == {n: n * n for n in range(7)}
    assert sorted(model.batches) == [1, 3, 3]


def test_a_batch_that_returns_too_few_results_is_run_request_by_request() -> None:
    from reid_app.server.state import _BatchingModel

    # A model call that answers only the first request of a batch: each request must still get
    # its own answer (run alone), never another's, never an error from the queue.
    model = _BatchingModel(lambda numbers: [n * n for n in numbers][:1], max_batch=3)
    results = call_while_busy(model, model, list(range(3)))
    assert results == {n: n * n for n in range(3)}
    assert model.batches == [3]


# ----------------------------------------------------------------------- hardening (issue 19): real sockets


@contextmanager
def live_server(app, **options) -> Iterator[int]:
    """``app`` served by uvicorn as ``reid-app serve`` configures it, on a free loopback port, in a
    thread of this process (the models are loaded once for the module); yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def raw_exchange(port: int, head: bytes, body: Iterable[bytes] = (), timeout: float = 60) -> tuple[int, dict, bytes]:
    """Send ``head`` (request line and headers, as bytes on the wire) and ``body`` over a plain TCP
    connection; (status, headers, body) of the answer. The server may answer before the body is
    all sent: what it no longer reads is not sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head)
        try:
            for part in body:
                connection.sendall(part)
        except OSError:  # the server answered and closed while the body was on its way
            pass
        received = b""
        while b"\r\n\r\n" not in received:
            data = connection.recv(65536)
            assert data, f"connection closed before an answer: {received!r}"
            received += data
        top, _, rest = received.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            data = connection.recv(65536)
            if not data:
                break
            rest += data
        return int(lines[0].split()[1]), headers, rest


def multipart_head(path: str, boundary: str, extra: str = "") -> tuple[bytes, bytes]:
    """(request head, the multipart preamble of an ``image`` file field) for a chunked upload."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Transfer-Encoding: chunked\r\n{extra}\r\n"
    ).encode()
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head, preamble


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_body_framed_two_ways_is_refused_and_every_body_byte_is_counted(state: ServerState) -> None:
    """Finding 1: ``Content-Length: 10`` beside ``Transfer-Encoding: chunked`` passed the limit
    (checked on the header) while the parser read the chunked body, of any size."""
    small = ServerState(**{**state.__dict__, "max_upload_bytes": 64 << 10})
    with live_server(create_app(small)) as port:
        head, preamble = multipart_head("/api/v1/search", "b", "Content-Length: 10\r\n")
        payload = preamble + DEMO_QUERY.read_bytes() + bytes(1 << 20)
        body = [chunk(payload[i : i + 65536]) for i in range(0, len(payload), 65536)]
        status, headers, answer = raw_exchange(port, head, [*body, chunk(b"\r\n--b--\r\n"), b"0\r\n\r\n"])
        assert status == 400 and "Transfer-Encoding" in json.loads(answer)["error"], answer
        assert headers["x-content-type-options"] == "nosniff"
        # Chunked alone (no Content-Length): counted as it arrives, refused past the limit.
        head, preamble = multipart_head("/api/v1/search", "b")
        status, _, answer = raw_exchange(port, head, [chunk(preamble), *body, b"0\r\n\r\n"])
        assert status == 413 and "limited to" in json.loads(answer)["error"], answer


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_unfinished_chunked_uploads_are_not_held_in_memory(state: ServerState) -> None:
    """Finding 7: each chunked body was read whole into memory before the app saw it (20
    unfinished 19 MB uploads: +400 MB). Now it streams to the form parser, which spools files
    past 1 MB to disk."""
    limited = ServerState(**{**state.__dict__, "max_upload_bytes": 16 << 20})
    uploads, size = 8, 6 << 20
    with live_server(create_app(limited)) as port:
        before = resident_bytes()
        connections = []
        try:
            for number in range(uploads):
                head, preamble = multipart_head("/api/v1/search", "b")
                connection = socket.create_connection(("127.0.0.1", port), timeout=30)
                connections.append(connection)
                connection.sendall(head + chunk(preamble))
                block = bytes([number]) * (1 << 20)  # distinct bytes: nothing shared between uploads
                for _ in range(size >> 20):
                    connection.sendall(chunk(block))
            time.sleep(1.0)  # let the server read what was sent
            grown = resident_bytes() - before
        finally:
            for connection in connections:
                connection.close()
    assert grown < uploads * size // 3, f"{grown / 2**20:.0f} MB held for {uploads} unfinished uploads"


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG, a scan with its entropy-coded data."""
    found, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            return [*found, (marker, position, position + 2)]
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # the scan's data ends at the next marker that is no restart (RST0-7)
            following = JPEG_MARKER.search(data, end)
            while 0xD0 <= following[1][0] <= 0xD7:
                following = JPEG_MARKER.search(data, following.end())
            end = following.end() - 2
        found.append((marker, position, end))
        position = end
    return found


def progressive_bomb(side: int, extra_scans: int) -> bytes:
    """A grey progressive JPEG whose last scan is repeated ``extra_scans`` times: small on disk,
    and each scan is one more pass of the decoder over every coefficient of the image."""
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(encoded, "JPEG", progressive=True)
    data = encoded.getvalue()
    start, end = [(s, e) for marker, s, e in jpeg_segments(data) if marker == 0xDA][-1]
    return data[:end] + data[start:end] * extra_scans + data[end:]


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding(
    client: TestClient, demo_gallery: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Finding 2: a 93 KB 4096x4096 JPEG with 6,000 empty scans cost 8.9 s of CPU to decode (and
    a 20 MB one could hold 2 million). The scans are counted from the markers, before decoding."""
    bomb = progressive_bomb(2048, 3000)
    assert len(bomb) < 200_000
    started = time.process_time()
    response = search(client, content=bomb, name="bomb.jpg")
    assert response.status_code == 400 and "scans" in response.json()["error"], response.text
    assert "bomb.jpg" in response.json()["error"] and "/tmp" not in response.json()["error"]
    assert time.process_time() - started < 1.0
    # The CLI reads images with the same rule; an ordinary progressive JPEG still passes it.
    query = tmp_path / "bomb.jpg"
    query.write_bytes(bomb)
    code, _, err = run_cli(["search", str(query), "--db", db_url(demo_gallery), "--device", "cpu"], capsys, monkeypatch)
    assert code == 2 and "scans" in err and len(err.strip().splitlines()) == 1
    # libjpeg skips bytes that are no marker between two segments and decodes on: a byte after
    # APP0 stopped the first version's walk of the markers, and 1,500 scans were decoded. The
    # scans are counted wherever they are.
    app0_end = 4 + int.from_bytes(bomb[4:6], "big")
    assert bomb[2:4] == b"\xff\xe0"
    for junk in (b"\x00", b"\x00" * 1000 + b"\x7f"):
        started = time.process_time()
        response = search(client, content=bomb[:app0_end] + junk + bomb[app0_end:], name="bomb.jpg")
        assert response.status_code == 400 and "scans" in response.json()["error"], response.text
        assert time.process_time() - started < 1.0
    # Nor can millions of tiny segments make the count itself the slow part.
    demo = DEMO_QUERY.read_bytes()
    flood = demo[:2] + b"\xff\xfe\x00\x02" * 1_000_000 + demo[2:]  # empty comments
    started = time.process_time()
    assert "scans" in search(client, content=flood).json()["error"]
    assert time.process_time() - started < 1.0
    from PIL import Image

    progressive = io.BytesIO()
    Image.open(DEMO_QUERY).save(progressive, "JPEG", progressive=True)
    assert search(client, content=progressive.getvalue()).status_code == 200


def test_state_changing_requests_from_another_site_are_refused(state: ServerState, demo_gallery: Path) -> None:
    """Finding 3: a page of any site could make the operator's browser POST to the loopback server
    (a plain auto-submitted form) and re-cluster the identities, so that a later erasure by identity
    deleted the wrong tracks. A browser says where a request comes from (Origin, Sec-Fetch-Site)."""
    before = snapshot(demo_gallery)
    attack = "/api/v1/identities?threshold=0&linkage=complete"
    guarded = ServerState(**{**state.__dict__, "token": TOKEN, "loopback_only": False})
    with TestClient(create_app(state), base_url=LOCAL) as local, TestClient(
        create_app(guarded), base_url="http://10.1.2.3:8000", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as remote:
        for client, foreign in ((local, {"Origin": "http://evil.example"}), (local, {"Sec-Fetch-Site": "cross-site"}),
                                (local, {"Origin": "null"}), (local, {"Origin": "http://127.0.0.1:9999"}),
                                (remote, {"Sec-Fetch-Site": "same-site", "Origin": "http://10.1.2.4:8000"}),
                                (remote, {"Origin": "http://10.1.2.3:8000", "Sec-Fetch-Site": "same-site"})):
            response = client.post(attack, headers=foreign)
            assert response.status_code == 403 and "another site" in response.json()["error"], (foreign, response.text)
            assert response.headers["x-frame-options"] == "DENY"
        assert snapshot(demo_gallery) == before
        # The page's own requests (same origin) and clients that are no browser (no such headers) pass.
        own = {"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}
        assert search(local, DEMO_QUERY, {"top_k": "1"}, headers=own).status_code == 200
        assert remote.post("/api/v1/search", files={"image": ("q.jpg", DEMO_QUERY.read_bytes())},
                           headers={"Origin": "http://10.1.2.3:8000"}).status_code == 200
        assert search(local, DEMO_QUERY, {"top_k": "1"}).status_code == 200
        # Reading stays open to links from elsewhere (opening the page from a bookmark or a mail).
        assert local.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_connections_that_never_finish_their_headers_do_not_shut_the_server_out(served: str) -> None:
    """Finding 4 (slowloris): ~420 connections that never finished their headers exhausted the
    file descriptors at ``ulimit -n 400`` (EMFILE in accept) and normal requests timed out. The
    served process has a limit of SERVED_FD_LIMIT; a third more connections than that wait."""
    import httpx

    port = int(served.rsplit(":", 1)[1])
    slow: list[socket.socket] = []
    try:
        for _ in range(SERVED_FD_LIMIT * 4 // 3):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
            slow.append(connection)
        time.sleep(0.5)
        # Requests of other clients are still answered, while all these connections wait.
        for _ in range(3):
            assert httpx.get(served + "/api/v1/status", timeout=5).status_code == 200
    finally:
        for connection in slow:
            connection.close()
    assert not [line for line in SERVED_LOG if "Too many open files" in line], SERVED_LOG[-5:]


def test_pages_and_reads_do_not_wait_behind_heavy_requests(state: ServerState, demo_gallery: Path) -> None:
    """Finding 5: every route shared ~40 threads and a database pool of 5+10: while a write lock
    was held, 42 slow recomputes made the page and a track time out, and 25 requests ended in
    "QueuePool limit" 503s. Now heavy requests wait in a bounded queue (past it: 503 at once,
    with Retry-After), and the page, the status and reads never wait behind them."""
    import httpx

    heavy = 44  # more than the old thread pool, and than the heavy queue (workers + waiting)
    #: Longest answer accepted from a route that must not wait: wide enough for a loaded 2-core
    #: machine, far below the 30 s a queued recompute waits (and the old code's time-outs).
    prompt_s = 5.0
    answers: list[tuple[int, dict, float]] = []
    with live_server(create_app(state)) as port, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=120, limits=httpx.Limits(max_connections=heavy + 8)
    ) as shared:
        base = f"http://127.0.0.1:{port}"

        def recompute() -> None:
            # One client for all threads: making one per thread (SSL context and all) took a
            # good part of the time measured here.
            started = time.monotonic()
            try:
                response = shared.post("/api/v1/identities")
                answers.append((response.status_code, dict(response.headers), time.monotonic() - started))
            except httpx.HTTPError as exc:
                answers.append((0, {"error": repr(exc)}, time.monotonic() - started))

        lock = sqlite3.connect(demo_gallery / "reid.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process writes: every recompute waits for it
        threads = [threading.Thread(target=recompute) for _ in range(heavy)]
        try:
            for thread in threads:
                thread.start()
            time.sleep(1.5)
            with httpx.Client(base_url=base, timeout=2 * prompt_s) as reader:
                for path in ("/", "/static/app.js", "/api/v1/status", "/api/v1/tracks/1",
                             "/api/v1/detections/1/thumbnail"):
                    started = time.monotonic()
                    assert reader.get(path).status_code == 200, path
                    assert time.monotonic() - started < prompt_s, path
            refused = [a for a in answers if a[0] == 503]
            assert refused and all(a[2] < prompt_s and int(a[1]["retry-after"]) > 0 for a in refused), answers
        finally:
            lock.execute("ROLLBACK")
            lock.close()
            for thread in threads:
                thread.join(120)
    statuses = sorted(a[0] for a in answers)
    assert len(statuses) == heavy and set(statuses) <= {200, 503}, answers
    assert statuses.count(200) >= heavy - len(refused)


def test_a_request_must_arrive_within_its_time(state: ServerState) -> None:
    """Finding 4: a connection could take forever to send its request head or its body, holding a
    file descriptor (and, sending a body, a request slot). Here the limits are cut to a second."""
    with live_server(create_app(state), header_timeout_s=1.0, body_timeout_s=1.0) as port:
        for partial in (b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers never finished
                        b"POST /api/v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
                        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"):  # body never finished
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                started = time.monotonic()
                connection.sendall(partial)
                try:
                    while connection.recv(65536):  # whatever answer, until the server closes
                        pass
                except ConnectionResetError:
                    pass
                assert time.monotonic() - started < 5, partial
        # A request sent in time is answered as before.
        status, _, _ = raw_exchange(port, b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200


def closed_within(connection: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[float | None, bytes]:
    """(seconds until the server closed ``connection``, or None if still open after ``seconds``;
    what it sent meanwhile), sending ``trickle`` every 0.2 s (a body that keeps coming, never done)."""
    started, received = time.monotonic(), b""
    connection.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if trickle:
                connection.sendall(trickle)
            data = connection.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset, or a broken pipe while trickling
            return time.monotonic() - started, received
        if not data:
            return time.monotonic() - started, received
        received += data
    return None, received


def test_a_pipelined_request_must_send_its_body_in_time_too(state: ServerState) -> None:
    """Review of finding 4: after a first answer on a connection, the phase stayed "answering", so
    a second request sent with the first (pipelined) got no deadline: its body could trickle in
    for ever, holding the connection and an upload. Limits cut to a second, as above."""
    with live_server(create_app(state), header_timeout_s=1.0, body_timeout_s=1.0) as port, socket.create_connection(
        ("127.0.0.1", port), timeout=10
    ) as connection:
        connection.sendall(
            b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"POST /api/v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        closed, received = closed_within(connection, 8.0, trickle=b"x")
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert closed is not None and closed < 4.0, f"the trickled body was still read after {closed} s"


def test_uploads_in_progress_are_bounded(state: ServerState) -> None:
    """Review of finding 7: unfinished uploads are spooled to disk (up to the upload limit each),
    and their number was bounded only by the connections (thousands). Past ``uploads_at_once``,
    a request with a body is a 503 with Retry-After before any of it is read; requests without
    one, and uploads once others end, are answered as before."""
    import httpx

    with live_server(create_app(state, uploads_at_once=2)) as port:
        base = f"http://127.0.0.1:{port}"
        unfinished = []
        try:
            for _ in range(2):
                head, preamble = multipart_head("/api/v1/search", "b")
                connection = socket.create_connection(("127.0.0.1", port), timeout=30)
                connection.sendall(head + chunk(preamble) + chunk(b"\xff\xd8" + bytes(1 << 20)))
                unfinished.append(connection)
            time.sleep(0.5)  # both heads are in
            started = time.monotonic()
            busy = httpx.post(base + "/api/v1/search", files={"image": ("q.jpg", DEMO_QUERY.read_bytes())}, timeout=30)
            assert busy.status_code == 503 and "uploads" in busy.json()["error"], busy.text
            assert int(busy.headers["retry-after"]) > 0 and busy.headers["x-frame-options"] == "DENY"
            assert time.monotonic() - started < 2.0
            assert httpx.get(base + "/api/v1/status", timeout=30).status_code == 200
        finally:
            for connection in unfinished:
                connection.close()
        time.sleep(0.5)  # the server sees them go
        answer = httpx.post(base + "/api/v1/search", files={"image": ("q.jpg", DEMO_QUERY.read_bytes())}, timeout=60)
        assert answer.status_code == 200, answer.text


@pytest.fixture()
def gallery_copy(demo_gallery: Path, tmp_path: Path, models) -> tuple[Path, ServerState]:
    """A copy of the demo gallery (database, index files) and a server state over it: for tests
    that break the database under a running server."""
    folder = tmp_path / "gallery"
    shutil.copytree(demo_gallery, folder)
    embedder, detector = models
    return folder, ServerState.load(AppConfig(db_url=db_url(folder), device="cpu"), embedder=embedder,
                                    detector=detector)


def test_a_database_removed_or_replaced_while_serving_is_refused_not_recreated(gallery_copy) -> None:
    """Finding 8: after ``rm reid.db*``, pooled connections kept serving the deleted footage and
    recomputes wrote into the deleted file (lost); new connections created an empty reid.db at the
    path. The server now refuses (503) until it is restarted, and never creates the file."""
    folder, copy = gallery_copy
    database = folder / "reid.db"
    with TestClient(create_app(copy), base_url=LOCAL) as client:
        assert client.get("/api/v1/tracks/1").status_code == 200
        with sqlite3.connect(database) as source, sqlite3.connect(folder / "backup.db") as backup:
            source.backup(backup)
        for name in ("reid.db", "reid.db-wal", "reid.db-shm"):
            (folder / name).unlink(missing_ok=True)
        for method, path in (("GET", "/api/v1/tracks/1"), ("GET", "/api/v1/status"), ("POST", "/api/v1/identities"),
                             ("POST", "/api/v1/search")):
            response = search(client, DEMO_QUERY) if path.endswith("search") else client.request(method, path)
            assert response.status_code == 503, (path, response.text)
            assert "restart" in response.json()["error"] and str(folder) not in response.text
            assert response.headers["x-content-type-options"] == "nosniff"
        assert not database.exists()
        # Restored from a backup: another file at the path, still refused until a restart.
        shutil.copy(folder / "backup.db", database)
        assert client.get("/api/v1/tracks/1").status_code == 503


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_failures_of_the_machine_are_503s_with_the_headers_and_one_log_line(gallery_copy) -> None:
    """Finding 9: a 503 (the database, the disk) was answered by the catch-all handler outside the
    middleware that adds the security headers, and then re-raised, so that each one logged a
    ~40-line traceback with SQL (6.3 MB of log in 8 s under load)."""
    import httpx

    folder, copy = gallery_copy
    with live_server(create_app(copy)) as port:
        base = f"http://127.0.0.1:{port}"
        records = _Records()
        loggers = [logging.getLogger(name) for name in ("uvicorn.error", "reid_app.server")]
        for logger in loggers:
            logger.addHandler(records)
        try:
            # The folder a search caches its thumbnails in is a file now (a disk that is full or
            # read-only fails the same way).
            shutil.rmtree(folder / "thumbnails", ignore_errors=True)
            (folder / "thumbnails").write_text("not a folder")
            for _ in range(3):
                response = httpx.post(base + "/api/v1/search", files={"image": ("q.jpg", DEMO_QUERY.read_bytes())},
                                      timeout=60)
                assert response.status_code == 503 and "not a directory" in response.json()["error"], response.text
                assert response.headers["content-security-policy"].startswith("default-src 'self'")
                assert response.headers["x-frame-options"] == "DENY"
                assert str(folder) not in response.text
        finally:
            for logger in loggers:
                logger.removeHandler(records)
    assert len(records.records) == 3, [r.getMessage() for r in records.records]
    assert not any(r.exc_info for r in records.records)
    assert all("\n" not in r.getMessage() for r in records.records)


def test_only_failures_of_the_machine_are_503s_and_they_name_no_server(gallery_copy) -> None:
    """Review of finding 9: every database error was a 503, a bug's too (a statement breaking a
    constraint), and a 503's text carried the driver's message, which for PostgreSQL names the
    server's host, port and user. A bug is a 500 (its traceback kept for the log); the 503 of an
    unreachable database server says only that the database cannot answer."""
    import sqlalchemy
    from sqlalchemy import text

    from reid_app.errors import describe_failure

    folder, copy = gallery_copy
    app = create_app(copy)

    @app.get("/test/duplicate-track")
    def duplicate_track() -> None:  # a bug's kind of database error: a real UNIQUE constraint broken
        with copy.db.read() as session:
            session.execute(text("INSERT INTO tracks SELECT * FROM tracks LIMIT 1"))

    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        response = client.get("/test/duplicate-track")
    assert response.status_code == 500 and "internal error" in response.json()["error"], response.text
    assert response.headers["x-frame-options"] == "DENY"
    # A PostgreSQL server that cannot be reached (a real connection attempt to a closed port).
    port = free_port()
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://reid_operator:secret@127.0.0.1:{port}/footage")
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
        engine.connect()
    told = describe_failure(caught.value, with_paths=False)
    assert told is not None and "database" in told
    for secret in ("127.0.0.1", str(port), "reid_operator", "footage", "secret"):
        assert secret not in told, told
    assert str(port) in describe_failure(caught.value)  # the operator's log line keeps them


def test_api_answers_name_no_server_paths(client: TestClient, demo_gallery: Path) -> None:
    """Finding 10: /status (the database URL), /cameras (the index folder), tracks and search
    results (the video's and the thumbnail's absolute paths) told any client where the footage
    lies on the server. The API gives ids, names and URLs; the CLI (the operator's) keeps paths."""
    track = client.get("/api/v1/tracks", params={"limit": 1}).json()["tracks"][0]
    detection_id = client.get(f"/api/v1/tracks/{track['track_id']}").json()["detections"][0]["detection_id"]
    answers = {
        path: client.get(path)
        for path in ("/api/v1/status", "/api/v1/cameras", "/api/v1/tracks", f"/api/v1/tracks/{track['track_id']}",
                     f"/api/v1/detections/{detection_id}", "/api/v1/identities")
    }
    answers["search"] = search(client, DEMO_QUERY, {"top_k": "3"})
    answers["search detections"] = search(client, DEMO_QUERY, {"top_k": "3", "level": "detections"})
    for what, response in answers.items():
        assert response.status_code == 200, (what, response.text)
        for place in (str(demo_gallery), str(REPO), "/tmp/", "sqlite:"):
            assert place not in response.text, (what, place, response.text[:400])
    assert answers["/api/v1/status"].json()["database"] == "sqlite"
    assert track["video"] == CLIP_CAM1.name or track["video"] == CLIP_CAM2.name
    hit = answers["search"].json()["persons"][0]["results"][0]
    assert hit["video"] in (CLIP_CAM1.name, CLIP_CAM2.name)
    assert hit["thumbnail"] == f"/api/v1/detections/{hit['detection_id']}/thumbnail"
    assert client.get(hit["thumbnail"]).headers["content-type"] == "image/jpeg"


def served_pid(served: str) -> int:
    """The process listening on the ``served`` port (its own, not uvicorn's parent: there is none)."""
    port = int(served.rsplit(":", 1)[1])
    inode = next(
        line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if int(line.split()[1].split(":")[1], 16) == port and line.split()[3] == "0A"  # LISTEN
    )
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
        except OSError:
            continue
    raise AssertionError(f"no process listens on {port}")


def test_large_images_are_decoded_reduced_and_few_at_a_time(served: str) -> None:
    """Finding 6: a 160 KB 7000x7000 PNG (under the 50 MP limit) cost ~220 MB per request, and 8 at
    once took the server from 1.1 to 2.86 GB. Now at most two images are decoded at once and large
    ones are kept at a quarter of their pixels (up to 16 MP) for the detector and embedder."""
    import httpx

    big = np.full((7000, 7000, 3), 128, np.uint8)
    cv2.rectangle(big, (3000, 2000), (3600, 5000), (40, 40, 200), -1)  # something, not a person
    payload = png(big)
    assert len(payload) < 1_000_000
    pid = served_pid(served)
    status = Path(f"/proc/{pid}/status")

    def peak() -> int:
        return int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")))

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
    before = peak()
    answers: list[httpx.Response] = []
    uploads = 6

    def one() -> None:
        answers.append(httpx.post(served + "/api/v1/search", files={"image": ("big.png", payload)}, timeout=300))

    threads = [threading.Thread(target=one) for _ in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    grown_mb = (peak() - before) / 1024
    assert [a.status_code for a in answers] == [400] * uploads, [a.text for a in answers]
    assert all("7000x7000" in a.json()["error"] for a in answers), answers[0].text  # the size as uploaded
    print(f"{uploads} concurrent 7000x7000 PNG searches: peak grew {grown_mb:.0f} MB")
    assert grown_mb < 600, f"{grown_mb:.0f} MB"


def test_boxes_of_a_reduced_query_are_given_in_the_uploaded_pixels(client: TestClient) -> None:
    """Finding 6: a query over 16 MP is decoded reduced; the boxes it reports (the page draws them
    over the upload) are still in the uploaded image's pixels."""
    capture = cv2.VideoCapture(str(CLIP_CAM2))
    capture.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, frame = capture.read()
    capture.release()
    assert ok
    factor = 9  # 5760x4320: 25 MP, decoded at half its width and height
    big = cv2.resize(frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    ok, encoded = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    small = search(client, content=png(frame), data={"all_persons": "true"}, name="frame.png").json()["persons"]
    large = search(client, content=encoded.tobytes(), data={"all_persons": "true"}, name="big.jpg").json()["persons"]
    assert len(large) == len(small) >= 2
    for wanted, got in zip(sorted(p["bbox"] for p in small), sorted(p["bbox"] for p in large), strict=True):
        np.testing.assert_allclose(np.array(got) / factor, wanted, atol=6)


def test_an_exif_rotated_query_gets_the_boxes_of_the_upright_image(client: TestClient) -> None:
    """Review of finding 6: the boxes were scaled by the header's width over the decoded width, but
    the decoder turns a photo upright by its EXIF orientation: a phone photo stored on its side
    (orientation 6, "turn a quarter clockwise to show") got boxes a third too large, and its
    "no person found" message named the stored size, not the size shown."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are shown turned 90° clockwise

    def jpeg(image: Image.Image, **options: object) -> bytes:
        encoded = io.BytesIO()
        image.save(encoded, "JPEG", quality=95, **options)
        return encoded.getvalue()

    upright = Image.open(ASSETS / "bus.jpg").convert("RGB")  # 810x1080, four people
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 1080x810 in the file
    wanted = search(client, content=jpeg(upright), data={"all_persons": "true"}).json()["persons"]
    answer = search(client, content=jpeg(stored, exif=exif), data={"all_persons": "true"})
    assert answer.status_code == 200, answer.text
    got = answer.json()["persons"]
    assert len(got) == len(wanted) >= 3
    for expected, found in zip(sorted(p["bbox"] for p in wanted), sorted(p["bbox"] for p in got), strict=True):
        np.testing.assert_allclose(found, expected, atol=6)
    nobody = Image.new("RGB", (400, 300), (128, 128, 128))  # shown as 300x400
    answer = search(client, content=jpeg(nobody, exif=exif), name="grey.jpg")
    assert answer.status_code == 400 and "(300x400)" in answer.json()["error"], answer.text


def test_smaller_items_of_the_review(client: TestClient, state: ServerState) -> None:
    """Finding 11: images may be embedded by other sites (no Cross-Origin-Resource-Policy); a Host
    of ``[::1]evil.com`` passed as loopback; ``HEAD /`` was 405; the cookie held the token itself."""
    thumbnail = client.get("/api/v1/detections/1/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["cross-origin-resource-policy"] == "same-origin"
    assert client.head("/").status_code == 200 and client.head("/static/app.js").status_code == 200
    for host in ("[::1]evil.com", "[::1]:8000evil", "localhost:80x", "127.0.0.1:", "[::1"):
        response = client.get("/api/v1/status", headers={"Host": host})
        assert response.status_code == 400, (host, response.text)
    for host in ("[::1]:8000", "[::1]", "localhost", "LOCALHOST:8000", "127.0.0.1:8000"):
        assert client.get("/api/v1/status", headers={"Host": host}).status_code == 200, host
    guarded = ServerState(**{**state.__dict__, "token": TOKEN, "loopback_only": False})
    with TestClient(create_app(guarded), base_url="http://10.1.2.3:8000") as remote:
        first = remote.get(f"/?token={TOKEN}", follow_redirects=False)
        cookie = first.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        assert TOKEN not in first.headers["set-cookie"] and len(cookie) >= 32
        assert remote.get("/api/v1/status").status_code == 200  # the browser's cookie
        remote.cookies.clear()
        assert remote.get("/api/v1/status", headers={"Cookie": f"reid_app_token={TOKEN}"}).status_code == 401
        assert remote.get("/api/v1/status", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401


def test_serve_on_a_busy_port_says_so_at_once(tmp_path: Path, capsys, monkeypatch) -> None:
    """Finding 11: ``serve`` on a port in use loaded the models (~20 s), then exited 3 with
    uvicorn's message. The port is checked first: one line, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code, _, err = run_cli(["serve", "--db", f"sqlite:///{tmp_path}/x.db", "--port", str(port)], capsys,
                               monkeypatch)
    assert code == 2 and f"port {port}" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - started < 5 and not (tmp_path / "x.db").exists()


def test_serve_refuses_an_in_memory_database_and_warns_of_a_low_fd_limit(tmp_path: Path, capsys, monkeypatch) -> None:
    """Review: ``serve --db sqlite://`` crashed with a TypeError (a pool size given to SQLite's
    single-connection pool); and a file-descriptor limit that leaves a handful of connections was
    silent, while a few slow clients could then take them all."""
    code, _, err = run_cli(["serve", "--db", "sqlite://"], capsys, monkeypatch)
    assert code == 2 and "in-memory" in err and len(err.strip().splitlines()) == 1, err
    with socket.socket() as taken:  # the port check ends the run before any model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "reid_app", "serve", "--db", f"sqlite:///{tmp_path}/x.db", "--port", str(port)],
            cwd=REPO, stderr=subprocess.PIPE, text=True,
        )
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (256, 256))  # lands while Python starts
        _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 2, err
    assert lines[0].startswith("warning: the file-descriptor limit allows only 16 open connections"), err
    assert f"port {port}" in lines[1]
