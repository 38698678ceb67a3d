"""Cases (issue 22, item 1) on the demo database (the two sample clips, shipped FA-Net), on SQLite
and PostgreSQL: start from the demo query's hit, search again with the confirmed tracks, confirm and
reject, the trajectory holds confirmed tracks only, export, erasure; the CLI and the HTTP API.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import BACKENDS, new_database_url
from fastapi.testclient import TestClient
from helpers import run_cli

from reid_app.cases import case_detail, create_case, export_case, list_cases, mark_track, search_case
from reid_app.config import AppConfig
from reid_app.embed import Embedder
from reid_app.errors import ReidAppError
from reid_app.index import IndexManager
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.overview import NotFound
from reid_app.search import SearchOptions, run_search
from reid_app.store import Database, delete_tracks

REPO = Path(__file__).resolve().parents[1]
QUERY = REPO / "sample_videos" / "query_cam1_red_jacket.jpg"
START = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def models() -> tuple[Embedder, object]:
    return Embedder(None, device="cpu"), load_detector(None, "cpu")


@pytest.fixture(scope="module", params=BACKENDS)
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models) -> AppConfig:
    """The demo's database: clip 1 as camera 1, clip 2 (47 s later) as camera 2."""
    folder = tmp_path_factory.mktemp(f"cases_{request.param}")
    config = AppConfig(db_url=new_database_url(request.param, folder, request), data_dir=folder, device="cpu")
    embedder, detector = models
    clips = ((1, "cam1_square_left.mp4", START), (2, "cam2_square_right.mp4", START + timedelta(seconds=47)))
    for camera, clip, start in clips:
        options = IngestOptions(str(REPO / "sample_videos" / clip), camera, start_time=start)
        ingest_video(config, options, embedder=embedder, detector=detector)
    return config


def first_hits(config: AppConfig, models) -> list:
    embedder, detector = models
    result = run_search(config, QUERY, SearchOptions(top_k=5), embedder=embedder, detector=detector)
    return result.persons[0].hits


def test_a_case_grows_with_confirmations_and_its_trajectory_is_confirmed_tracks_only(demo: AppConfig, models) -> None:
    db = Database(demo)
    hits = first_hits(demo, models)
    camera1 = hits[0]
    assert camera1.camera == 1
    case_id = create_case(db, "red jacket", notes="seen near the fountain", confirmed=[camera1.track_id], by="op1")
    indexes = IndexManager(db, demo)
    # Searching again with the confirmed track: the camera-2 track of the same person is the best candidate.
    candidates = search_case(db, indexes, case_id, top_k=5)["candidates"]
    assert camera1.track_id not in [c["track_id"] for c in candidates]
    camera2 = candidates[0]
    assert camera2["camera"] == 2
    mark_track(db, case_id, camera2["track_id"], "confirmed", by="op2")
    wrong = candidates[1]
    mark_track(db, case_id, wrong["track_id"], "rejected", by="op1")
    again = search_case(db, indexes, case_id, top_k=5)
    assert again["confirmed"] == 2
    decided = {camera1.track_id, camera2["track_id"], wrong["track_id"]}
    assert not decided & {c["track_id"] for c in again["candidates"]}
    detail = case_detail(db, case_id)
    assert [t["track_id"] for t in detail["trajectory"]] == [camera1.track_id, camera2["track_id"]]  # time order
    assert [t["camera"] for t in detail["trajectory"]] == [1, 2]
    assert [t["track_id"] for t in detail["rejected"]] == [wrong["track_id"]]
    assert detail["notes"] == "seen near the fountain" and detail["trajectory"][1]["decided_by"] == "op2"
    # Undecided takes a verdict back; the last verdict on a track wins.
    mark_track(db, case_id, wrong["track_id"], "undecided")
    assert case_detail(db, case_id)["rejected"] == []
    mark_track(db, case_id, wrong["track_id"], "rejected")
    # Export: the JSON carries the thumbnails; the HTML is one file with the images inline.
    document = export_case(db, case_id, "json")
    jpeg = base64.b64decode(document["trajectory"][0]["thumbnail_jpeg_base64"])
    assert jpeg.startswith(b"\xff\xd8\xff")
    page = export_case(db, case_id, "html")
    assert page.count("data:image/jpeg;base64,") == 3 and "<script" not in page and "red jacket" in page
    assert [c["name"] for c in list_cases(db)][0] == "red jacket"
    db.dispose()


def test_case_errors_are_one_line(demo: AppConfig, capsys, monkeypatch) -> None:
    db = Database(demo)
    with pytest.raises(NotFound):
        mark_track(db, 999_999, 1, "confirmed")
    case_id = create_case(db, "empty case")
    with pytest.raises(NotFound):
        mark_track(db, case_id, 999_999, "confirmed")
    with pytest.raises(ReidAppError, match="verdict"):
        mark_track(db, case_id, 1, "maybe")
    with pytest.raises(ReidAppError, match="no confirmed track"):
        search_case(db, IndexManager(db, demo), case_id)
    with pytest.raises(ReidAppError, match="name"):
        create_case(db, "  ")
    for args in (["show", "999999"], ["mark", str(case_id), "999999", "confirmed"], ["search", str(case_id)]):
        code, out, err = run_cli(["case", *args, "--db", demo.db_url], capsys, monkeypatch)
        assert code != 0 and len(err.strip().splitlines()) == 1, err
    db.dispose()


def test_case_cli_from_start_to_export(demo: AppConfig, models, tmp_path: Path, capsys, monkeypatch) -> None:
    hits = first_hits(demo, models)
    url = ["--db", demo.db_url]
    code, out, err = run_cli(["case", "create", "--name", "cli case", "--track", str(hits[0].track_id), *url],
                             capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    case_id = int(out.split()[1])
    code, out, err = run_cli(["case", "search", str(case_id), "--json", *url, "--data-dir", str(demo.data_dir)],
                             capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    best = json.loads(out)["candidates"][0]
    assert best["camera"] == 2
    mark = ["case", "mark", str(case_id), str(best["track_id"]), "confirmed", *url]
    code, out, err = run_cli(mark, capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["case", "show", str(case_id), *url], capsys, monkeypatch)
    assert code == 0 and out.count("camera ") == 2 and "cli case" in out, out
    report = tmp_path / "case.html"
    code, out, err = run_cli(["case", "export", str(case_id), "--output", str(report), *url], capsys, monkeypatch)
    assert code == 0 and report.read_text().count("data:image/jpeg;base64,") == 2
    code, out, err = run_cli(["case", "list", *url], capsys, monkeypatch)
    assert "cli case" in out


def test_cases_over_the_http_api(demo: AppConfig, models) -> None:
    from reid_app.server.app import create_app  # noqa: PLC0415
    from reid_app.server.state import ServerState  # noqa: PLC0415

    embedder, detector = models
    state = ServerState.load(demo, embedder=embedder, detector=detector)
    with TestClient(create_app(state), base_url="http://127.0.0.1") as client:
        with QUERY.open("rb") as handle:
            search = client.post("/api/v1/search", files={"image": ("q.jpg", handle, "image/jpeg")}).json()
        first = search["persons"][0]["results"][0]
        created = client.post("/api/v1/cases", json={"name": "api case", "track_ids": [first["track_id"]]})
        assert created.status_code == 200, created.text
        case_id = created.json()["case_id"]
        candidates = client.post(f"/api/v1/cases/{case_id}/search", params={"top_k": 3}).json()["candidates"]
        assert candidates[0]["camera"] == 2 and candidates[0]["thumbnail"].startswith("/api/v1/detections/")
        track_url = f"/api/v1/cases/{case_id}/tracks/{candidates[0]['track_id']}"
        marked = client.put(track_url, json={"verdict": "confirmed"})
        assert [t["camera"] for t in marked.json()["trajectory"]] == [1, 2]
        assert client.patch(f"/api/v1/cases/{case_id}", json={"notes": "two cameras"}).json()["notes"] == "two cameras"
        page = client.get(f"/api/v1/cases/{case_id}/export", params={"format": "html"})
        assert page.headers["content-type"].startswith("text/html") and "api case" in page.text
        assert client.get(f"/api/v1/cases/{case_id}/export", params={"format": "json"}).json()["name"] == "api case"
        assert client.get("/api/v1/cases/999999").status_code == 404
        bad = client.put(f"/api/v1/cases/{case_id}/tracks/1", json={"verdict": "maybe"})
        assert bad.status_code == 422 and "error" in bad.json()
        assert any(c["case_id"] == case_id for c in client.get("/api/v1/cases").json()["cases"])
        # Watching for the case's person from the API, and taking them off again.
        watched = client.post("/api/v1/watchlist", json={"case_id": case_id, "name": "api case", "threshold": 0.7})
        assert watched.status_code == 200, watched.text
        watch_id = watched.json()["watch_id"]
        assert [w["name"] for w in watched.json()["watchlist"]] == ["api case"]
        assert client.delete(f"/api/v1/watchlist/{watch_id}").json()["watchlist"] == []
        assert client.delete(f"/api/v1/watchlist/{watch_id}").status_code == 400


def test_the_audit_trail_records_searches_case_changes_and_exports(
    demo: AppConfig, models, tmp_path: Path, capsys, monkeypatch
) -> None:
    from reid_app.audit import entries  # noqa: PLC0415

    db = Database(demo)
    before = len(entries(db))
    url = ["--db", demo.db_url]
    search = ["search", str(QUERY), "--json", *url, "--data-dir", str(demo.data_dir)]
    code, out, err = run_cli(search, capsys, monkeypatch)
    assert code == 0, err
    track = json.loads(out)["persons"][0]["results"][0]["track_id"]
    case_id = create_case(db, "audited", confirmed=[track], by="api:10.0.0.7")
    mark_track(db, case_id, track, "rejected", by="api:10.0.0.8")
    export_case(db, case_id, "html", by="cli:auditor")
    new = entries(db)[before:]
    assert [(e["actor"], e["action"]) for e in new] == [
        (new[0]["actor"], "search"), ("api:10.0.0.7", "case.create"), ("api:10.0.0.8", "case.mark"),
        ("cli:auditor", "case.export"),
    ]  # fmt: skip
    assert new[0]["actor"].startswith("cli:") and new[0]["target"] == QUERY.name
    assert track in new[0]["details"]["results"]
    assert new[2]["details"] == {"track_id": track, "verdict": "rejected"} and new[2]["target"] == f"case {case_id}"
    # Erasure (last in this module: it deletes a demo track) takes the track out of every case and
    # leaves the trail alone (it holds ids, no image or vector).
    other = create_case(db, "erased", confirmed=[track])
    db.write(lambda session: delete_tracks(session, [track]))
    assert case_detail(db, other)["trajectory"] == [] and case_detail(db, case_id)["rejected"] == []
    assert len(entries(db)) == before + 5
    code, out, err = run_cli(["audit", "--since", "1h", "--json", *url], capsys, monkeypatch)
    actions = [e["action"] for e in json.loads(out)][-5:]
    assert code == 0 and actions == ["search", "case.create", "case.mark", "case.export", "case.create"]
    code, out, err = run_cli(["audit", "--since", "yesterday", *url], capsys, monkeypatch)
    assert code != 0 and "--since" in err and len(err.strip().splitlines()) == 1
    db.dispose()
