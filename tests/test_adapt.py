"""``reid-app adapt``: tracklet pseudo-identities, the adaptation run on real crops (a tracklet folder
of VIPeR people, a database ingested from the sample clips), resume after a stop, ``--apply``, and
the bad inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import run_cli

from fanet.centring import (
    MIN_CENTRING_TRACKS,
    SITE,
    WHITENING_META_KEY,
    WHITENING_RIDGE,
    CameraCentring,
    TooFewTracks,
    Whitening,
)
from fanet.checkpoint import read_checkpoint
from fanet.data.peta import read_peta_labels
from fanet.data.tracklets import Tracklet, TrackletLayoutError, read_tracklet_folder
from fanet.engine import adapt as adapt_engine
from fanet.engine.adapt import STATE_SUFFIX, pseudo_identities
from fanet.weights import REPO_WEIGHTS_DIR, sha256_file
from reid_app.adapt import run_adapt
from reid_app.calibration import Thresholds, calibrate, database_thresholds
from reid_app.config import AppConfig
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS, Embedder
from reid_app.errors import ReidAppError
from reid_app.ingest import IngestOptions, ingest_video, load_detector
from reid_app.store import Database, DatabaseInfo

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS


def tracklet(camera: str, track: str, start: float | None = None, end: float | None = None) -> Tracklet:
    return Tracklet(camera, track, (f"{camera}/{track}.jpg",), start, end)


def test_mutual_nearest_tracklets_become_one_identity_but_never_two_seen_at_once() -> None:
    # Three people; a and b walk in camera 0 at the same time, c later; each is seen again in camera 1.
    tracks = [tracklet("0", "a", 0, 10), tracklet("0", "b", 5, 15), tracklet("0", "c", 20, 30),
              tracklet("1", "a", 40, 50), tracklet("1", "b", 40, 50), tracklet("1", "c", 60, 70)]  # fmt: skip
    rng = np.random.default_rng(0)
    people = rng.standard_normal((3, 16))
    features = np.stack([people[i % 3] + 0.1 * rng.standard_normal(16) for i in range(6)])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labels = pseudo_identities(features, tracks)
    assert labels[0] == labels[3] and labels[1] == labels[4] and labels[2] == labels[5]
    assert len(set(labels)) == 3
    # Two tracks that overlap in one camera stay apart even when they look alike; a third that
    # matches both joins only one of them.
    same = np.stack([people[0], people[0] + 1e-3, people[0] + 2e-3])
    same /= np.linalg.norm(same, axis=1, keepdims=True)
    labels = pseudo_identities(same, [tracklet("0", "a", 0, 10), tracklet("0", "b", 5, 15), tracklet("1", "x")])
    assert labels[0] != labels[1] and labels[2] in (labels[0], labels[1])
    # Without times, two tracks of one camera are two people.
    labels = pseudo_identities(same[:2], [tracklet("0", "a"), tracklet("0", "b")])
    assert labels[0] != labels[1]


def viper_folder(shared_dir: Path, folder: Path, people_count: int) -> Path:
    """``people_count`` VIPeR people, each a track in camera 0 and one in camera 1 (one real crop
    each; no label crosses a camera)."""
    peta = shared_dir / "data" / "peta_reid"
    images = sorted((i for i in read_peta_labels(peta).values() if i.subset == "VIPeR"), key=lambda i: i.path)
    people = sorted({i.pid for i in images})[:people_count]
    for image in (i for i in images if i.pid in people):
        target = folder / str(image.camid) / image.pid / Path(image.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(image.path)
    return folder


@pytest.fixture(scope="module")
def viper_tracklets(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 people in two cameras: 48 tracks, fewer than the camera means need."""
    return viper_folder(shared_dir, tmp_path_factory.mktemp("viper_tracks"), 24)


@pytest.fixture(scope="module")
def viper_site(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MIN_CENTRING_TRACKS people in two cameras: enough tracks for a mean of each camera."""
    return viper_folder(shared_dir, tmp_path_factory.mktemp("viper_site"), MIN_CENTRING_TRACKS)


@pytest.fixture(scope="module")
def viper_site_features(viper_site: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """The site's crops of each camera (people in name order: one crop each) and the shipped model's
    features of them, without any camera statistics."""
    crops = {camera: [cv2.imread(str(p)) for p in sorted((viper_site / camera).glob("*/*"))] for camera in "01"}
    plain = Embedder(None, device="cpu", backend="torch")
    assert plain.centring is None
    return crops, {camera: plain.embed(images) for camera, images in crops.items()}


def test_adapt_from_a_folder_writes_a_checkpoint_that_says_what_it_was_adapted_on(
    viper_tracklets: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    output = tmp_path / "site.pt"
    code, out, err = run_cli(
        ["adapt", "--from-folder", str(viper_tracklets), "--output", str(output), "--epochs", "1", "--quiet"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err
    meta = read_checkpoint(output)["meta"]
    adapted = meta["adapted"]
    assert (adapted["from"], adapted["crops"], adapted["tracks"], adapted["cameras"]) == (SHIPPED.name, 48, 48, 2)
    assert adapted["epochs"] == 1 and str(viper_tracklets) in adapted["source"]
    assert f"adapted from {SHIPPED.name} on 48 crops of 48 tracks" in out
    assert "pseudo-identities" in err  # the epoch line
    assert not output.with_name(output.name + STATE_SUFFIX).exists()
    # 48 tracks are too few people for a mean (fanet/centring.py): fine-tuned, not centred, and said so.
    assert "camera_centring" not in meta and "centred_cameras" not in adapted
    assert f"1 epochs, not centred (48 tracks, the camera means need {MIN_CENTRING_TRACKS})" in out
    assert "no camera centring: 48 tracks" in err
    # The adapted model is an ordinary checkpoint for the app, and it did change.
    adapted_model, shipped = Embedder(str(output), device="cpu", backend="torch"), Embedder(None, device="cpu")
    crops = [np.full((128, 48, 3), value, np.uint8) for value in (40, 120)]
    assert adapted_model.dim == shipped.dim
    assert not np.allclose(adapted_model.embed(crops), shipped.embed(crops), atol=1e-4)


def test_a_stopped_adaptation_resumes_from_its_last_epoch(viper_tracklets: Path, tmp_path: Path, monkeypatch) -> None:
    output = tmp_path / "site.pt"
    calls: list[str] = []

    def stop_in_epoch_two(stage: str, done: int, total: int) -> None:
        calls.append(stage)
        if stage.startswith("epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(None, output, folder=viper_tracklets, epochs=2, progress=stop_in_epoch_two, log=lambda _l: None)
    state = output.with_name(output.name + STATE_SUFFIX)
    assert state.is_file() and not output.exists()
    assert torch.load(state, weights_only=False)["epoch"] == 1
    lines: list[str] = []
    report = run_adapt(None, output, folder=viper_tracklets, epochs=2, log=lines.append)
    assert any("resuming the adaptation after epoch 1" in line for line in lines)
    assert [e.epoch for e in report.epochs] == [2] and output.is_file() and not state.exists()


def test_adapt_a_database_and_apply_it(tmp_path: Path, capsys, monkeypatch) -> None:
    config = AppConfig(db_url=f"sqlite:///{tmp_path / 'reid.db'}", data_dir=tmp_path, sample_fps=2.0)
    embedder, detector = Embedder(None, device="cpu"), load_detector(None, "cpu")
    for camera, clip in ((1, "cam1_square_left.mp4"), (2, "cam2_square_right.mp4")):
        options = IngestOptions(video=str(REPO / "sample_videos" / clip), camera=camera, max_frames=8)
        ingest_video(config, options, embedder=embedder, detector=detector)
    output = tmp_path / "adapted" / "site.pt"
    # Two short clips hold a handful of tracks: the default (camera means only) refuses them, and
    # leaves neither a checkpoint nor its scratch export of the tracks behind.
    code, out, err = run_cli(
        ["adapt", "--db", config.db_url, "--data-dir", str(tmp_path), "--output", str(output), "--quiet"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code != 0 and f"the camera means need {MIN_CENTRING_TRACKS}" in err
    assert not output.exists() and not list(output.parent.glob(".*"))
    code, out, err = run_cli(
        ["adapt", "--db", config.db_url, "--data-dir", str(tmp_path), "--output", str(output), "--epochs", "1",
         "--apply", "--quiet"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err
    assert "not centred" in out
    adapted = read_checkpoint(output)["meta"]["adapted"]
    assert adapted["cameras"] == 2 and adapted["source"].startswith("database sqlite:///")
    assert not list(output.parent.glob(".site.pt.tracklets"))  # the export is removed after success
    assert Database(config).info().model_name == "site.pt"
    code, out, err = run_cli(["stats", "--db", config.db_url, "--json"], capsys, monkeypatch)
    assert json.loads(out)["model"]["name"] == "site.pt"
    # The server (and its page) says which model the database uses and what it was adapted on.
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from reid_app.server.app import create_app  # noqa: PLC0415
    from reid_app.server.state import ServerState  # noqa: PLC0415

    served = ServerState.load(
        AppConfig(db_url=config.db_url, data_dir=tmp_path, weights=str(output), device="cpu"),
        embedder=Embedder(str(output), device="cpu"), detector=detector,
    )  # fmt: skip
    with TestClient(create_app(served), base_url="http://127.0.0.1") as client:
        status = client.get("/api/v1/status").json()
    assert status["database_model"]["name"] == "site.pt"
    assert status["embedder"]["adapted"].startswith(f"adapted from {SHIPPED.name} on ")


def test_bad_inputs_are_one_line_and_write_nothing(viper_tracklets: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def adapt_cli(*args: str) -> str:
        code, out, err = run_cli(["adapt", *args, "--quiet"], capsys, monkeypatch)
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        return err

    output = tmp_path / "out.pt"
    assert "empty" in adapt_cli("--db", f"sqlite:///{tmp_path / 'none.db'}", "--output", str(output))
    one = tmp_path / "one"
    shutil.copytree(viper_tracklets / "0" / sorted(p.name for p in (viper_tracklets / "0").iterdir())[0],
                    one / "0" / "t", symlinks=True)  # fmt: skip
    assert "at least 2" in adapt_cli("--from-folder", str(one), "--output", str(output))
    assert "not found" in adapt_cli("--from-folder", str(tmp_path / "missing"), "--output", str(output))
    (tmp_path / "empty").mkdir()
    assert "no tracks" in adapt_cli("--from-folder", str(tmp_path / "empty"), "--output", str(output))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}, "config": {"backbone": "vgg"}}, foreign)
    assert "foreign.pt" in adapt_cli("--from-folder", str(viper_tracklets), "--weights", str(foreign),
                                     "--output", str(output))  # fmt: skip
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write the output" in adapt_cli("--from-folder", str(viper_tracklets), "--output",
                                                  str(blocker / "out.pt"))  # fmt: skip
    assert "--apply" in adapt_cli("--from-folder", str(viper_tracklets), "--output", str(output), "--apply")
    assert not output.exists()
    with pytest.raises(TrackletLayoutError):
        read_tracklet_folder(tmp_path / "missing")
    with pytest.raises(ReidAppError, match="one source"):
        run_adapt(None, output)
    with pytest.raises(ValueError, match="epochs"):
        adapt_engine.AdaptConfig(epochs=-1)
    with pytest.raises(ValueError, match="change nothing"):
        adapt_engine.AdaptConfig(epochs=0, camera_centring=False)
    assert "change nothing" in adapt_cli("--from-folder", str(viper_tracklets), "--output", str(output),
                                         "--epochs", "0", "--no-camera-centring")  # fmt: skip
    # The default (camera means only) on 48 tracks: too few people for a mean.
    assert f"48 tracks, the camera means need {MIN_CENTRING_TRACKS}" in adapt_cli(
        "--from-folder", str(viper_tracklets), "--output", str(output)
    )
    assert not output.exists()


def test_camera_means_are_over_many_tracks_each_counted_once() -> None:
    rng = np.random.default_rng(0)
    dim, many = 8, MIN_CENTRING_TRACKS
    # Camera "a": `many` one-crop tracks plus one track of 500 crops far off; camera "b": too few tracks.
    a = rng.standard_normal((many, dim)).astype(np.float32)
    long_track = np.tile(np.full(dim, 9.0, np.float32), (500, 1))
    b = rng.standard_normal((many - 1, dim)).astype(np.float32) + 3
    features = np.concatenate([a, long_track, b])
    cameras = ["a"] * (many + 500) + ["b"] * (many - 1)
    tracks = [*range(many), *(["long"] * 500), *range(many - 1)]
    centring = CameraCentring.fit(features, cameras, tracks)
    assert centring.cameras == ["a"]  # "b" has one track too few: the site's mean
    track_means = np.concatenate([a, long_track[:1], b])
    np.testing.assert_allclose(centring.means["a"], track_means[: many + 1].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(centring.means[SITE], track_means.mean(axis=0), rtol=1e-5)
    # Without track ids every crop is a track of its own, and then the long track dominates "a".
    assert CameraCentring.fit(features, cameras).means["a"][0] > 8
    with pytest.raises(TooFewTracks, match=f"at least {many} tracks and the site has {many - 1}"):
        CameraCentring.fit(b, ["b"] * (many - 1))


def test_camera_centring_alone_keeps_the_weights_and_centres_each_cameras_crops(
    viper_site: Path, viper_site_features: tuple[dict, dict], tmp_path: Path, capsys, monkeypatch
) -> None:
    """``--epochs 0`` (the default) with the means alone: the starting network unchanged, the site's camera
    means added; the embedder takes each crop's camera mean away, and the site's mean where the camera
    is not known."""
    output = tmp_path / "centred.pt"
    code, out, err = run_cli(
        ["adapt", "--from-folder", str(viper_site), "--output", str(output), "--no-camera-whitening", "--quiet"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err
    assert "0 epochs, centred on 2 camera means" in out
    assert WHITENING_META_KEY not in read_checkpoint(output)["meta"]
    centred_payload, shipped_payload = read_checkpoint(output), read_checkpoint(SHIPPED)
    for name, tensor in shipped_payload["state_dict"].items():
        torch.testing.assert_close(centred_payload["state_dict"][name].float(), tensor.float(), rtol=0, atol=0)
    crops, raw_of = viper_site_features
    centred = Embedder(str(output), device="cpu", backend="torch")
    assert centred.centring is not None
    for camera, images in crops.items():
        raw = raw_of[camera]
        by_camera = centred.embed(images, cameras=[int(camera)] * len(images))  # the app's ids are ints
        expected = raw - raw.mean(axis=0)
        np.testing.assert_allclose(by_camera, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=2e-3)
        assert np.linalg.norm(by_camera.mean(axis=0)) < 0.5 * np.linalg.norm(raw.mean(axis=0))
    # A crop of unknown camera (a query photo) or of a camera the site did not show: the site's mean.
    everyone = np.concatenate([raw_of["0"], raw_of["1"]])
    unknown = centred.embed(crops["0"][:3])
    np.testing.assert_array_equal(unknown, centred.embed(crops["0"][:3], cameras=[None, 7, "x"]))
    expected = everyone[:3] - everyone.mean(axis=0)
    np.testing.assert_allclose(unknown, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=2e-3)
    with pytest.raises(ValueError, match="camera ids for"):
        centred.embed(crops["0"][:2], cameras=[0])


def _whitened_reference(features: np.ndarray) -> np.ndarray:
    """Shrinkage whitening written out from its definition (fanet/centring.py): covariance of the
    rows, every variance v scaled by sqrt(r / (v + r)), r = WHITENING_RIDGE of the total variance."""
    centred = features - features.mean(axis=0)
    covariance = centred.T @ centred / len(centred)
    variances, vectors = np.linalg.eigh(covariance)
    ridge = WHITENING_RIDGE * variances.sum()
    return vectors @ np.diag(np.sqrt(ridge / (np.clip(variances, 0, None) + ridge))) @ vectors.T


def test_whitening_flattens_the_strong_directions_a_camera_adds() -> None:
    rng = np.random.default_rng(1)
    dim, many = 16, MIN_CENTRING_TRACKS
    # Identity variation everywhere, plus one strong camera-wide direction in camera "a".
    people = rng.standard_normal((many, dim))
    nuisance = np.zeros(dim)
    nuisance[3] = 1.0
    a = people + 6.0 * rng.standard_normal((many, 1)) * nuisance
    whitening = Whitening.fit(a)
    assert len(whitening.scale) == dim and whitening.scale.min() < 0.2 and whitening.scale.max() <= 1.0
    np.testing.assert_allclose(whitening.basis @ whitening.basis.T, np.eye(dim), atol=1e-5)
    strongest = whitening.basis[np.argmin(whitening.scale)]
    assert abs(strongest[3]) > 0.95  # the camera's direction is the one flattened most
    np.testing.assert_allclose(whitening.apply(a), a @ _whitened_reference(a), rtol=1e-4, atol=1e-5)
    # More tracks than dimensions take the covariance route: the same transform.
    tall = rng.standard_normal((dim + 40, dim)) * np.linspace(0.2, 3.0, dim)
    np.testing.assert_allclose(Whitening.fit(tall).apply(tall), tall @ _whitened_reference(tall), atol=1e-4)
    # Every track alike: nothing to flatten.
    assert len(Whitening.fit(np.ones((many, dim))).scale) == 0


def test_camera_whitening_is_stored_and_applied_per_camera(
    viper_site: Path, viper_site_features: tuple[dict, dict], tmp_path: Path, capsys, monkeypatch
) -> None:
    """The default adapt (means and whitening): a crop is centred by its camera's mean, whitened by its
    camera's whitening (the site's for an unknown camera), l2-normalised; on these 50 VIPeR people it
    brings each person's two cameras closer than the raw features do."""
    output = tmp_path / "whitened.pt"
    code, out, err = run_cli(
        ["adapt", "--from-folder", str(viper_site), "--output", str(output), "--quiet"], capsys, monkeypatch
    )
    assert code == 0, err
    assert "0 epochs, centred and whitened on 2 camera means" in out
    stored = read_checkpoint(output)["meta"][WHITENING_META_KEY]
    assert sorted(stored) == [SITE, "0", "1"] and stored["0"]["basis"].dtype == torch.float16
    crops, raw = viper_site_features
    adapted = Embedder(str(output), device="cpu", backend="torch")

    def centred(rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
        rows = rows - mean
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def whitened(rows: np.ndarray, fitted_on: np.ndarray) -> np.ndarray:
        rows = rows @ _whitened_reference(fitted_on)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    own = {camera: centred(raw[camera], raw[camera].mean(axis=0)) for camera in "01"}
    out_of = {camera: adapted.embed(crops[camera], cameras=[int(camera)] * len(crops[camera])) for camera in "01"}
    for camera in "01":
        np.testing.assert_allclose(out_of[camera], whitened(own[camera], own[camera]), atol=5e-3)
    # Unknown camera: the site's mean, then the site's whitening (fitted on every camera's centred crops).
    everyone = np.concatenate([raw["0"], raw["1"]])
    site = whitened(centred(raw["0"][:3], everyone.mean(axis=0)), np.concatenate([own["0"], own["1"]]))
    np.testing.assert_allclose(adapted.embed(crops["0"][:3]), site, atol=5e-3)

    def separation(query: np.ndarray, gallery: np.ndarray) -> float:
        """How far a person's other-camera similarity stands above different people's, in their stds
        (rank-1 is 0.98 for both on 50 people: too coarse here)."""
        similarity = query @ gallery.T
        others = similarity[~np.eye(len(query), dtype=bool)]
        return float((np.diag(similarity).mean() - others.mean()) / others.std())

    assert separation(out_of["0"], out_of["1"]) > separation(raw["0"], raw["1"]) + 1.0  # measured 7.3 vs 4.8

    # The model's own default thresholds, moved to its scores (reid_app/calibration.py) and found by
    # the commands that load no model through the database's model hash.
    shipped = Thresholds.defaults()
    own = adapted.thresholds
    assert f"thresholds for this site's scores (set on {50 * 50} track pairs)" in err
    assert own != shipped and own.search < shipped.search and own.watch < shipped.watch
    assert own.identity > shipped.identity  # a distance: merging needs a lower similarity than 0.55 now
    info = DatabaseInfo(model_weights_sha256=sha256_file(output), model_is_trained=True)
    assert database_thresholds(str(output), info) == own
    told: list[str] = []
    info.model_weights_sha256 = "0" * 64  # another model's database
    assert database_thresholds(str(output), info, told.append) == shipped
    assert told == [f"default threshold: the shipped model's ({output.name} is not the model this database was "
                    "embedded with; --weights FILE names the database's model)"]  # fmt: skip
    assert Embedder(None, device="cpu").thresholds == shipped


def test_calibrated_thresholds_pass_the_same_share_of_cross_camera_pairs() -> None:
    rng = np.random.default_rng(3)
    tracks, dim = 120, 32
    cameras = ["0"] * 60 + ["1"] * 60

    def unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    starting = unit(rng.standard_normal((tracks, dim)) + 0.8)  # a shared offset: scores sit high
    adapted = unit(starting - starting.mean(axis=0))  # centred: the same people, lower scores
    thresholds, pairs = calibrate(starting, adapted, cameras)
    assert pairs == 60 * 60
    cross = np.array(cameras)[:, None] != np.array(cameras)[None, :]
    for before, after in ((0.25, thresholds.search), (0.5, thresholds.watch), (0.55, 1 - thresholds.identity)):
        share_before = np.mean((starting @ starting.T)[cross] >= before)
        share_after = np.mean((adapted @ adapted.T)[cross] >= after)
        assert abs(share_before - share_after) <= 2 / pairs
    assert thresholds.search < 0.25
    with pytest.raises(ValueError, match="two tracks"):
        calibrate(starting[:1], adapted[:1], ["0"])
