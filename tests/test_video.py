"""Video decoding and sampling on the real sample clips (and ../shared/videos/dancer.avi)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from reid_app.errors import ReidAppError
from reid_app.video import is_stream_url, open_video, sample_step

REPO = Path(__file__).resolve().parents[1]
CAM1 = REPO / "sample_videos" / "cam1_square_left.mp4"
CAM2 = REPO / "sample_videos" / "cam2_square_right.mp4"
DANCER = REPO.parent / "shared" / "videos" / "dancer.avi"


@pytest.mark.parametrize("clip", [CAM1, CAM2])
def test_sample_clip_properties(clip: Path) -> None:
    assert clip.stat().st_size < 1_500_000, "sample clips must stay small enough for the repository"
    video = open_video(str(clip))
    assert video.fps == pytest.approx(10.0)
    assert video.frame_count == 150
    assert (video.width, video.height) == (640, 480)
    assert not video.is_stream
    assert video.duration_s == pytest.approx(15.0)


def test_every_frame_decodes() -> None:
    video = open_video(str(CAM1))
    frames = list(video.iter_frames(sample_fps=None))
    assert [f.index for f in frames] == list(range(150))
    assert video.stopped_early is None
    first = frames[0].image
    assert first.shape == (480, 640, 3) and first.dtype == np.uint8
    # Real footage: frames differ over time and are not blank.
    assert first.std() > 20
    assert np.abs(frames[-1].image.astype(int) - first.astype(int)).mean() > 1.0


def test_sampling_at_2_fps_picks_every_fifth_frame() -> None:
    video = open_video(str(CAM1))
    frames = list(video.iter_frames(sample_fps=2.0))
    assert [f.index for f in frames] == list(range(0, 150, 5))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / 10 for i in range(0, 150, 5)])


def test_sampling_step_rounds_and_never_drops_below_one() -> None:
    assert sample_step(25.0, 2.0) == 12  # round(12.5) → 12
    assert sample_step(10.0, 3.0) == 3
    assert sample_step(10.0, 30.0) == 1  # asking for more than the video has: every frame
    assert sample_step(10.0, None) == 1
    with pytest.raises(ReidAppError, match="sample fps"):
        sample_step(10.0, 0.0)


def test_resume_from_start_frame_yields_the_same_frames() -> None:
    video = open_video(str(CAM1))
    full = {f.index: f.image for f in video.iter_frames(sample_fps=2.0)}
    resumed = list(video.iter_frames(sample_fps=2.0, start_frame=47))
    # Sampled indices do not depend on where a run starts: a resumed run continues the grid.
    assert [f.index for f in resumed] == list(range(50, 150, 5))
    for frame in resumed[:3]:
        assert np.array_equal(frame.image, full[frame.index])
    assert list(video.iter_frames(sample_fps=2.0, start_frame=150)) == []


def test_dancer_video_from_shared() -> None:
    video = open_video(str(DANCER))
    assert video.fps == pytest.approx(25.0)
    assert (video.width, video.height) == (518, 496)
    frames = list(video.iter_frames(sample_fps=2.0))
    assert [f.index for f in frames[:3]] == [0, 12, 24]
    assert frames[1].timestamp_s == pytest.approx(0.48)
    # The container announces 1572 frames, 1571 decode: within slack, so no early-stop report.
    assert frames[-1].index == 1560
    assert video.stopped_early is None


def test_sha256_is_the_file_hash() -> None:
    video = open_video(str(CAM1))
    assert video.sha256() == hashlib.sha256(CAM1.read_bytes()).hexdigest()
    assert open_video(str(CAM2)).sha256() != video.sha256()


def test_missing_video() -> None:
    with pytest.raises(ReidAppError, match=r"^video not found: .*no_such_clip\.mp4$"):
        open_video(str(REPO / "no_such_clip.mp4"))


def test_directory_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(ReidAppError, match="not a video file"):
        open_video(str(tmp_path))


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(ReidAppError, match="cannot read video") as info:
        open_video(str(junk))
    assert "\n" not in str(info.value)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.avi"
    empty.touch()
    with pytest.raises(ReidAppError, match="cannot read video"):
        open_video(str(empty))


def test_file_cut_before_the_first_frame_is_refused(tmp_path: Path) -> None:
    stub = tmp_path / "stub.mp4"
    stub.write_bytes(CAM1.read_bytes()[:8_000])  # the header survives, no frame data does
    with pytest.raises(ReidAppError, match="no frame decodes"):
        open_video(str(stub))


def test_truncated_video_stops_cleanly_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    truncated = tmp_path / "truncated.mp4"
    data = CAM1.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.4)])
    video = open_video(str(truncated))
    assert video.frame_count == 150  # the header still announces the whole clip
    with caplog.at_level(logging.WARNING, logger="reid_app.video"):
        frames = list(video.iter_frames(sample_fps=None))
    assert 10 < len(frames) < 150
    assert [f.index for f in frames] == list(range(len(frames)))
    assert video.stopped_early is not None and "decoding stopped at frame" in video.stopped_early
    assert any("decoding stopped" in record.getMessage() for record in caplog.records)


def test_stream_urls_are_recognised() -> None:
    assert is_stream_url("rtsp://camera.local:554/stream1")
    assert is_stream_url("http://host/video.mjpg")
    assert not is_stream_url("file:///tmp/a.mp4")
    assert not is_stream_url("/tmp/a.mp4")
    assert not is_stream_url("C:/videos/a.mp4")


def test_unreachable_stream_is_a_one_line_error() -> None:
    with pytest.raises(ReidAppError, match=r"cannot open video stream: rtsp://127\.0\.0\.1:9/none"):
        open_video("rtsp://127.0.0.1:9/none")


def test_http_stream_from_a_local_server() -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(CAM1.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{CAM1.name}"
        video = open_video(url)
        assert video.is_stream and video.frame_count is None
        assert video.sha256() == hashlib.sha256(url.encode()).hexdigest()
        assert video.fps == pytest.approx(10.0)
        frames = []
        for frame in video.iter_frames(sample_fps=2.0):
            frames.append(frame)
            if len(frames) == 4:
                break
        video.close()
        assert [f.index for f in frames] == [0, 5, 10, 15]
        assert frames[0].image.shape == (480, 640, 3)
    finally:
        server.shutdown()
        server.server_close()
