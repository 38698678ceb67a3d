"""``reid-app serve``: the HTTP API and the page over a real gallery.

The gallery is the demo's: both sample clips ingested (2 fps) with the shipped FA-Net and the real
YOLO11n-pose detector into a real SQLite file and FAISS indexes, once for this module. Requests
go through the real FastAPI application (in-process, httpx) with the real models; the access
rules are tested on the ASGI app as a client sees them, and ``serve`` itself as a process.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import run_cli
from hypothesis import HealthCheck, settings

from reid_app.config import AppConfig
from reid_app.embed import Embedder
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.overview import collect_stats
from reid_app.server.app import create_app
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
           name: str = "query.jpg"):
    payload = content if content is not None else Path(path).read_bytes()
    return client.post("/api/v1/search", files={"image": (name, payload, "image/jpeg")}, data=data or {})


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
    assert {**cli, "query_image": None} == {**api, "query_image": None}


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
    assert cameras == expected
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
    assert client.get("/api/v1/status").json()["defaults"]["identity_threshold"] == AppConfig.identity_threshold


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


@pytest.fixture(scope="module")
def served(demo_gallery: Path) -> Iterator[str]:
    """``reid-app serve`` as its own process on a free local port, over the demo gallery."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "reid_app", "serve", "--db", db_url(demo_gallery), "--port", str(port), "--device",
         "cpu"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        for line in process.stderr:
            if "serving" in line:
                break
            assert time.monotonic() < deadline and process.poll() is None, line
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe drained
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


def test_the_page_in_a_real_browser(served: str, tmp_path: Path) -> None:
    """Chromium opens the page, uploads the demo query; the grid and the timeline show the camera-2 hit."""
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium binary found (install Debian's chromium: apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(served + "/")
            page.wait_for_selector("#camera-filter input")  # the cameras overview answered
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
        finally:
            browser.close()


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
