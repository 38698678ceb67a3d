"""The FA-Net embedder on real person crops (random-init weights: no trained re-ID model exists here)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import ASSETS

import fanet.weights
from fanet.checkpoint import save_inference_checkpoint, untrained_inference_model
from fanet.weights import sha256_file
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS, Embedder
from reid_app.errors import ReidAppError
from reid_app.video import open_video

REPO = Path(__file__).resolve().parents[1]
# Ultralytics' sample photos, found without importing it (reid_app sets its offline mode first).
CAM1 = REPO / "sample_videos" / "cam1_square_left.mp4"
# Person boxes in bus.jpg (x1, y1, x2, y2), as YOLO11n-pose finds them.
BUS_PEOPLE = [(48, 400, 244, 906), (669, 388, 810, 878), (223, 405, 344, 859)]
# A man in a dark jacket and jeans in frame 100 of cam1_square_left.mp4 (640x480), as YOLO boxes him.
CAM1_FRAME, CAM1_PERSON = 100, (373, 77, 419, 182)


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    bus = cv2.imread(str(ASSETS / "bus.jpg"))
    people = [bus[y1:y2, x1:x2] for x1, y1, x2, y2 in BUS_PEOPLE]
    frame = next(f for f in open_video(str(CAM1)).iter_frames(None, start_frame=CAM1_FRAME))
    x1, y1, x2, y2 = CAM1_PERSON
    people.append(frame.image[y1:y2, x1:x2])
    return people


@pytest.fixture(scope="module")
def untrained() -> Embedder:
    return Embedder("untrained", device="cpu")


@pytest.fixture(scope="module")
def features(untrained: Embedder, crops: list[np.ndarray]) -> np.ndarray:
    return untrained.embed(crops)


def test_untrained_embedder_identity_and_warning(untrained: Embedder) -> None:
    assert untrained.model_name == "fanet-untrained-seed0"
    assert untrained.dim == 3840
    assert untrained.is_trained is False
    assert untrained.device == "cpu"
    assert len(untrained.weights_sha256) == 64
    warning = untrained.warning()
    assert warning is not None and "\n" not in warning
    assert "fanet-untrained-seed0" in warning and "NOT trained" in warning


def test_features_are_unit_norm_float32(features: np.ndarray, crops: list[np.ndarray]) -> None:
    assert features.shape == (len(crops), 3840)
    assert features.dtype == np.float32
    assert np.all(np.isfinite(features))
    assert np.linalg.norm(features, axis=1) == pytest.approx(np.ones(len(crops)), abs=1e-5)
    # Different people do not collapse onto one vector (even at random init).
    assert not np.allclose(features[0], features[1], atol=1e-3)


def test_same_seed_and_other_batch_size_give_the_same_features(
    untrained: Embedder, features: np.ndarray, crops: list[np.ndarray]
) -> None:
    other = Embedder("untrained", device="cpu", batch_size=3)
    assert other.weights_sha256 == untrained.weights_sha256
    assert np.allclose(other.embed(crops), features, atol=1e-5)


def test_flip_averaging_makes_features_mirror_invariant(untrained: Embedder, crops: list[np.ndarray]) -> None:
    crop = crops[3]
    original, mirrored = untrained.embed([crop, np.ascontiguousarray(crop[:, ::-1])])
    assert np.allclose(original, mirrored, atol=1e-5)


def test_empty_input(untrained: Embedder) -> None:
    assert untrained.embed([]).shape == (0, 3840)


def test_a_broken_crop_is_a_clear_error(untrained: Embedder) -> None:
    with pytest.raises(ReidAppError, match="cannot embed"):
        untrained.embed([np.zeros((0, 10, 3), dtype=np.uint8)])


def test_checkpoint_file_round_trip(
    tmp_path: Path, untrained: Embedder, features: np.ndarray, crops: list[np.ndarray]
) -> None:
    path = tmp_path / "fanet_reid.pt"
    save_inference_checkpoint(untrained_inference_model(seed=0), path, epochs_trained=3, input_size=[384, 128])
    loaded = Embedder(str(path), device="cpu")
    assert loaded.model_name == "fanet_reid.pt"
    assert loaded.weights_sha256 == sha256_file(path)
    assert loaded.is_trained and loaded.warning() is None
    assert loaded.input_size == (384, 128)
    # The same weights through a file give the same features as the in-memory model.
    assert np.allclose(loaded.embed(crops[:2]), features[:2], atol=1e-5)


def test_default_file_is_found_in_the_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # $REID_WEIGHTS_DIR comes before the repository's weights/ (which holds the shipped model).
    default = tmp_path / DEFAULT_EMBEDDER_WEIGHTS
    save_inference_checkpoint(untrained_inference_model(seed=1), default, epochs_trained=0)
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))
    embedder = Embedder(None, device="cpu")
    assert embedder.weights_path == default
    # Metadata saying no epoch was trained makes the embedder say so.
    assert not embedder.is_trained and "NOT trained" in (embedder.warning() or "")


def test_missing_default_weights_name_the_file_and_the_places_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout without the shipped file (e.g. an sdist): the error names it and every place.
    empty_repo_weights = tmp_path / "repo_weights"
    empty_repo_weights.mkdir()
    monkeypatch.setattr(fanet.weights, "REPO_WEIGHTS_DIR", empty_repo_weights)
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ReidAppError) as info:
        Embedder(None)
    message = str(info.value)
    name = DEFAULT_EMBEDDER_WEIGHTS
    assert name in message and str(tmp_path / name) in message
    assert str(empty_repo_weights / name) in message and "reid-app train" in message
    assert "\n" not in message


def test_missing_explicit_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ReidAppError, match=r"'model\.pt' not found \(looked in: .*model\.pt\)"):
        Embedder(str(tmp_path / "model.pt"))


def test_a_foreign_torch_file_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, foreign)
    with pytest.raises(ReidAppError, match="is not an FA-Net checkpoint") as info:
        Embedder(str(foreign))
    assert "\n" not in str(info.value)


def test_a_checkpoint_with_other_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    save_inference_checkpoint(untrained_inference_model(seed=0), path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {"fc.weight": torch.zeros(2, 2)}
    torch.save(payload, path)
    with pytest.raises(ReidAppError, match="does not match the FA-Net architecture"):
        Embedder(str(path))


def test_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ReidAppError, match="not a readable FA-Net checkpoint"):
        Embedder(str(corrupt))


def test_unavailable_device_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ReidAppError, match="no CUDA GPU"):
        Embedder("untrained", device="cuda")
