"""``reid-app reembed``: a real database (the sample clip ingested by the untrained demo model, on
SQLite and PostgreSQL) moved to the shipped FA-Net from its stored crops, one step at the switch,
a stopped run finished by the next one, crops committed meanwhile picked up, and the bad inputs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BACKENDS, new_database_url
from helpers import run_cli
from sqlalchemy import delete, select, update

from fanet.weights import REPO_WEIGHTS_DIR
from reid_app import reembed as reembed_module
from reid_app.config import AppConfig
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS, Embedder
from reid_app.index import IndexManager, index_ids
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.reembed import reembed
from reid_app.store import Database, DatabaseInfo, Detection, ReembedJob, ReembedVector, Thumbnail, Track

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS
CAM1 = REPO / "sample_videos" / "cam1_square_left.mp4"
CAM2 = REPO / "sample_videos" / "cam2_square_right.mp4"


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    return {
        "untrained": Embedder("untrained", device="cpu"),
        "shipped": Embedder(str(SHIPPED), device="cpu"),
        "detector": load_detector(None, "cpu"),
    }


def ingest(config: AppConfig, models: dict, video: Path, camera: int, frames: int = 8) -> None:
    options = IngestOptions(video=str(video), camera=camera, max_frames=frames)
    ingest_video(config, options, embedder=models["untrained"], detector=models["detector"])


@pytest.fixture(scope="module", params=BACKENDS)
def demo_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models) -> AppConfig:
    """Camera 1's first seconds ingested with the untrained demo model (a database to move)."""
    folder = tmp_path_factory.mktemp(f"demo_{request.param}")
    config = AppConfig(db_url=new_database_url(request.param, folder, request), data_dir=folder, sample_fps=2.0)
    ingest(config, models, CAM1, 1)
    return config


def copy_of(config: AppConfig, folder: Path, request: pytest.FixtureRequest) -> AppConfig:
    """A copy of a test database (PostgreSQL: a new database from it as template)."""
    if config.db_url.startswith("postgresql"):
        cluster = request.getfixturevalue("pg_cluster")
        name = config.db_url.rsplit("/", 1)[1]
        cluster.drop_connections(name)
        url = cluster.create_database(template=name)
    else:
        with sqlite3.connect(config.sqlite_path) as source, sqlite3.connect(folder / "reid.db") as target:
            source.backup(target)  # the WAL's pages too, which a file copy would leave behind
        url = f"sqlite:///{folder / 'reid.db'}"
    return AppConfig(db_url=url, data_dir=folder, sample_fps=config.sample_fps)


def vectors(db: Database, table: type[Detection] | type[Track]) -> dict[int, np.ndarray]:
    with db.read() as session:
        return {i: np.frombuffer(bytes(blob), "<f4") for i, blob in session.execute(select(table.id, table.embedding))}


def stored_crops(db: Database) -> dict[int, np.ndarray]:
    with db.read() as session:
        rows = session.execute(select(Thumbnail.detection_id, Thumbnail.jpeg)).all()
    return {i: cv2.imdecode(np.frombuffer(bytes(jpeg), np.uint8), cv2.IMREAD_COLOR) for i, jpeg in rows}


def test_reembed_moves_every_vector_track_and_index_to_the_new_model(
    demo_db: AppConfig, models, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = copy_of(demo_db, tmp_path, request)
    db = Database(config)
    before = vectors(db, Detection)
    assert len(before) >= 4
    IndexManager(db, config).sync_all()  # the untrained model's index on this host
    report = reembed(db, models["shipped"])
    assert (report.previous_model, report.model_name) == ("fanet-untrained-seed0", SHIPPED.name)
    assert report.crops == report.crops_total == len(before) and not report.already
    info = db.info()
    assert (info.model_name, info.model_weights_sha256) == (SHIPPED.name, models["shipped"].weights_sha256)
    # Every crop's vector is the shipped model's embedding of its stored crop.
    after = vectors(db, Detection)
    crops = stored_crops(db)
    ids = sorted(after)
    expected = models["shipped"].embed([crops[i] for i in ids])
    np.testing.assert_allclose(np.stack([after[i] for i in ids]), expected, atol=1e-5)
    # Every track's vector is the normalised mean of its crops'.
    with db.read() as session:
        owner = dict(session.execute(select(Detection.id, Detection.track_id)).all())
        assert session.scalars(select(Track.identity_id)).all() == [None] * len(set(owner.values()))
        assert not session.scalars(select(ReembedVector.job_id)).all()
        assert not session.scalars(select(ReembedJob.id)).all()
    for track_id, vector in vectors(db, Track).items():
        mean = np.mean([after[i] for i in ids if owner[i] == track_id], axis=0)
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)
    # The host's index was built for the old model: the next sync rebuilds it with the new vectors.
    for kind, table in (("tracks", Track), ("detections", Detection)):
        gallery, sync = IndexManager(db, config).sync(kind)
        assert sync.rebuilt and sorted(index_ids(gallery.index)) == sorted(vectors(db, table))
        assert gallery.index.d == models["shipped"].dim
    # Running it again has nothing to do.
    assert reembed(db, models["shipped"]).already
    db.dispose()


def test_reembed_from_stored_crops_matches_what_ingest_embedded(models, tmp_path: Path, capsys, monkeypatch) -> None:
    """A database ingested by the shipped model, moved to a byte-different copy of the same network:
    the crops stored at ingest give that network almost exactly the vectors ingest gave it."""
    config = AppConfig(db_url=f"sqlite:///{tmp_path / 'reid.db'}", data_dir=tmp_path, sample_fps=2.0)
    options = IngestOptions(video=str(CAM1), camera=1, max_frames=8)
    ingest_video(config, options, embedder=models["shipped"], detector=models["detector"])
    db = Database(config)
    at_ingest = vectors(db, Detection)
    code, out, err = _cli_reembed(config, _reexported(tmp_path), capsys, monkeypatch)
    assert code == 0, err
    moved = vectors(db, Detection)
    cosine = np.array([float(at_ingest[i] @ moved[i]) for i in at_ingest])
    assert cosine.min() >= 0.95 and cosine.mean() >= 0.98, cosine  # JPEG of the stored crop vs the frame's pixels
    db.dispose()


def _reexported(folder: Path) -> Path:
    """The shipped network saved again in float32: another file (another sha256), the same features."""
    from fanet.checkpoint import load_inference_model, save_inference_checkpoint  # noqa: PLC0415

    path = folder / "shipped_fp32.pt"
    save_inference_checkpoint(load_inference_model(SHIPPED), path, input_size=[256, 128])
    return path


def _cli_reembed(config: AppConfig, weights: Path | str, capsys, monkeypatch) -> tuple[int, str, str]:  # noqa: ANN001
    args = ["reembed", "--weights", str(weights), "--db", config.db_url, "--data-dir", str(config.data_dir), "--quiet"]
    return run_cli(args, capsys, monkeypatch)


def test_a_stopped_reembed_leaves_the_old_model_and_the_next_run_finishes(
    demo_db: AppConfig, models, tmp_path: Path, request: pytest.FixtureRequest, capsys, monkeypatch
) -> None:
    config = copy_of(demo_db, tmp_path, request)
    db = Database(config)
    before = vectors(db, Detection)
    monkeypatch.setattr(reembed_module, "PAGE", 2)
    # A run stopped after its first page: two crops staged, nothing else changed.
    reembed_module._create_tables(db)
    owner = "otherhost:1:dead"
    info = db.info()
    job_id, kept = reembed_module._claim(db, models["shipped"], info, owner)
    assert kept == 0
    staged = reembed_module._embed_missing(db, models["shipped"], job_id, owner, 0, len(before))
    assert next(staged) == 2
    staged.close()
    assert db.info().model_name == "fanet-untrained-seed0" and vectors(db, Detection).keys() == before.keys()
    assert all(np.array_equal(v, before[i]) for i, v in vectors(db, Detection).items())
    # Searches still answer with the old model meanwhile.
    query = REPO / "sample_videos" / "query_cam1_red_jacket.jpg"
    search = ["search", str(query), "--db", config.db_url, "--data-dir", str(config.data_dir), "--weights", "untrained"]
    code, out, err = run_cli(search, capsys, monkeypatch)
    assert code == 0, err
    # While its lease lasts, another run is refused in one line and changes nothing.
    code, out, err = _cli_reembed(config, SHIPPED, capsys, monkeypatch)
    assert code != 0 and "another reembed" in err and len(err.strip().splitlines()) == 1, err
    # Once it has run out, the next run takes the job over, keeps the staged crops and finishes.
    db.write(lambda session: session.execute(update(ReembedJob).values(lease_until_s=0.0)))
    report = reembed(db, models["shipped"])
    assert report.resumed_crops == 2 and report.crops == len(before) - 2 and report.crops_total == len(before)
    assert db.info().model_name == SHIPPED.name
    db.dispose()


def test_crops_committed_during_a_reembed_are_embedded_before_the_switch(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = AppConfig(db_url=f"sqlite:///{tmp_path / 'reid.db'}", data_dir=tmp_path, sample_fps=2.0)
    ingest(config, models, CAM1, 1)
    db = Database(config)
    first_pass = reembed_module._embed_missing
    calls = []

    def embed_then_ingest(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        yield from first_pass(*args, **kwargs)
        if not calls:  # an ingest with the old model commits between the staging and the switch
            calls.append(1)
            ingest(config, models, CAM2, 2, frames=6)

    monkeypatch.setattr(reembed_module, "_embed_missing", embed_then_ingest)
    report = reembed(db, models["shipped"])
    with db.read() as session:
        cameras = set(session.scalars(select(Detection.camera_id)).all())
    assert cameras == {1, 2} and report.crops_total == len(vectors(db, Detection))
    crops, moved = stored_crops(db), vectors(db, Detection)
    ids = sorted(moved)
    np.testing.assert_allclose(
        np.stack([moved[i] for i in ids]), models["shipped"].embed([crops[i] for i in ids]), atol=1e-5
    )
    db.dispose()


def test_bad_input_is_one_line_and_switches_nothing(
    demo_db: AppConfig, tmp_path: Path, request: pytest.FixtureRequest, capsys, monkeypatch
) -> None:
    empty = AppConfig(db_url=f"sqlite:///{tmp_path / 'empty.db'}", data_dir=tmp_path)
    code, out, err = _cli_reembed(empty, SHIPPED, capsys, monkeypatch)
    assert code != 0 and "empty" in err and len(err.strip().splitlines()) == 1, err
    config = copy_of(demo_db, tmp_path, request)
    for weights, expected in (("untrained", "trained model"), (tmp_path / "missing.pt", "missing.pt")):
        code, out, err = _cli_reembed(config, weights, capsys, monkeypatch)
        assert code != 0 and expected in err and len(err.strip().splitlines()) == 1, err
    db = Database(config)
    with db.read() as session:
        first, second = session.scalars(select(Detection.id).order_by(Detection.id).limit(2)).all()
        top, bottom = session.execute(select(Detection.y1, Detection.y2).where(Detection.id == second)).one()
    # A crop stored far smaller than the person and the model's input: its pixels cannot be given back.
    tiny = cv2.imencode(".jpg", np.zeros((8, 4, 3), np.uint8))[1].tobytes()
    shrink = update(Thumbnail).where(Thumbnail.detection_id == second).values(jpeg=tiny)
    db.write(lambda session: session.execute(shrink))
    assert bottom - top > 16  # a person, taller than the stored 8 px
    code, out, err = _cli_reembed(config, SHIPPED, capsys, monkeypatch)
    assert code != 0 and "stored at 4x8 px" in err and len(err.strip().splitlines()) == 1, err
    # A crop without its stored image.
    db.write(lambda session: session.execute(delete(Thumbnail).where(Thumbnail.detection_id == first)))
    code, out, err = _cli_reembed(config, SHIPPED, capsys, monkeypatch)
    assert code != 0 and f"crop {first} has no stored pixels" in err and len(err.strip().splitlines()) == 1, err
    with db.read() as session:
        assert session.get(DatabaseInfo, 1).model_name == "fanet-untrained-seed0"
    db.dispose()


def test_ingest_stores_crops_at_least_as_large_as_the_model_input() -> None:
    from reid_app.thumbnails import stored_crop_side  # noqa: PLC0415

    assert stored_crop_side(256, (256, 128), (100, 40)) == 100  # small crops are kept whole
    assert stored_crop_side(256, (256, 128), (600, 200)) == 384  # 384x128: the input's width
    assert stored_crop_side(256, (256, 128), (600, 400)) == 256  # 256x171 covers 256x128
    assert stored_crop_side(256, (384, 128), (500, 200)) == 384
