"""Video input: files and network streams, decoded with OpenCV, sampled by time.

``open_video`` checks the input up front (a missing file, or a file from which no frame
decodes, is a :class:`ReidAppError`), so a bad path fails before any model is loaded. A decode
failure in the middle of a file ends the iteration with a logged warning instead of an
exception: the frames decoded so far are still worth keeping.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fanet.weights import sha256_file
from reid_app.errors import ReidAppError

logger = logging.getLogger(__name__)

#: Frame rate assumed when the container does not say (0, NaN or an absurd value).
FALLBACK_FPS = 25.0
#: Above this the container's fps is treated as unknown (some streams report 90000, the time base).
MAX_PLAUSIBLE_FPS = 1000.0
#: Containers often announce a frame or two more than they hold; only a larger gap is reported.
FRAME_COUNT_SLACK = 2
#: How long OpenCV may wait for a network stream to open or deliver a frame.
STREAM_TIMEOUT_MS = 15_000

_URL_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its index in the source, its time from the start, and BGR pixels."""

    index: int
    timestamp_s: float
    image: np.ndarray


def is_stream_url(source: str) -> bool:
    """True for ``rtsp://``, ``http(s)://`` and other URLs; ``file://`` counts as a file."""
    return bool(_URL_PATTERN.match(source)) and not source.lower().startswith("file://")


def sample_step(fps: float, sample_fps: float | None) -> int:
    """Number of source frames between two sampled frames: round(fps / sample_fps), at least 1."""
    if sample_fps is None:
        return 1
    if not sample_fps > 0:
        raise ReidAppError(f"sample fps must be positive, got {sample_fps}")
    return max(1, round(fps / sample_fps))


class VideoSource:
    """An opened video file or stream. Create it with :func:`open_video`."""

    def __init__(
        self,
        source: str,
        *,
        fps: float,
        frame_count: int | None,
        width: int,
        height: int,
        is_stream: bool,
        capture: cv2.VideoCapture | None = None,
    ) -> None:
        self.source = source
        self.fps = fps
        self.frame_count = frame_count
        self.width = width
        self.height = height
        self.is_stream = is_stream
        #: Why the last :meth:`iter_frames` stopped before the end, or None when it did not.
        self.stopped_early: str | None = None
        # A stream cannot be re-opened at the same position, so its probe capture is reused.
        self._stream_capture = capture
        self._sha256: str | None = None

    def __repr__(self) -> str:
        return (
            f"VideoSource({self.source!r}, fps={self.fps:g}, frames={self.frame_count}, "
            f"{self.width}x{self.height}, stream={self.is_stream})"
        )

    @property
    def duration_s(self) -> float | None:
        """Length in seconds from the frame count, or None for streams."""
        return None if self.frame_count is None else self.frame_count / self.fps

    def sha256(self) -> str:
        """Hash of the file's bytes (a stable identity for resume); for a stream, a hash of its URL."""
        if self._sha256 is None:
            if self.is_stream:
                self._sha256 = hashlib.sha256(self.source.encode("utf-8")).hexdigest()
            else:
                self._sha256 = sha256_file(self.source)
        return self._sha256

    def iter_frames(self, sample_fps: float | None = 2.0, start_frame: int = 0) -> Iterator[Frame]:
        """Yield frames whose index is a multiple of ``round(fps / sample_fps)``, from ``start_frame`` on.

        Sampled indices do not depend on ``start_frame`` (they are multiples of the step), so a
        resumed run yields exactly the frames an uninterrupted run would have yielded from there.
        ``sample_fps=None`` yields every frame. Frames before ``start_frame`` and between samples
        are grabbed but not converted to pixels.
        """
        if start_frame < 0:
            raise ReidAppError(f"start frame must be >= 0, got {start_frame}")
        step = sample_step(self.fps, sample_fps)
        self.stopped_early = None
        capture = self._open_for_iteration()
        index = 0
        try:
            while True:
                if self.frame_count is not None and index >= self.frame_count:
                    return
                wanted = index >= start_frame and index % step == 0
                try:
                    if not capture.grab():
                        self._note_end(index)
                        return
                    if wanted:
                        ok, image = capture.retrieve()
                        if not ok or image is None:
                            self._note_failure(index, "frame could not be decoded")
                            return
                except cv2.error as exc:
                    self._note_failure(index, f"OpenCV error: {str(exc).strip().splitlines()[-1]}")
                    return
                if wanted:
                    yield Frame(index=index, timestamp_s=index / self.fps, image=image)
                index += 1
        finally:
            if not self.is_stream:
                capture.release()

    def close(self) -> None:
        """Release a stream's connection (files hold nothing open between iterations)."""
        if self._stream_capture is not None:
            self._stream_capture.release()
            self._stream_capture = None

    def _open_for_iteration(self) -> cv2.VideoCapture:
        if self.is_stream:
            if self._stream_capture is None:
                self._stream_capture = _open_capture(self.source, stream=True)
            return self._stream_capture
        capture = _open_capture(self.source, stream=False)
        if not capture.isOpened():
            raise ReidAppError(f"cannot open video (it changed or vanished since it was opened): {self.source}")
        return capture

    def _note_end(self, index: int) -> None:
        # The container announced more frames than could be read: a truncated or damaged file.
        if self.frame_count is not None and index < self.frame_count - FRAME_COUNT_SLACK:
            self._note_failure(index, f"no frame after {index} of the {self.frame_count} announced")
        elif self.is_stream:
            self._note_failure(index, "stream ended or stopped delivering frames")

    def _note_failure(self, index: int, why: str) -> None:
        self.stopped_early = f"video {self.source}: decoding stopped at frame {index} ({why})"
        logger.warning("%s; the rest of the video is skipped", self.stopped_early)


def _open_capture(source: str, *, stream: bool) -> cv2.VideoCapture:
    if stream:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            STREAM_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            STREAM_TIMEOUT_MS,
        ]
        return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(source)


def _container_fps(capture: cv2.VideoCapture) -> float:
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    if not math.isfinite(fps) or fps <= 0 or fps > MAX_PLAUSIBLE_FPS:
        return FALLBACK_FPS
    return fps


#: File signatures of the still-image formats OpenCV also opens as a "video" of one frame.
_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def still_image_format(path: Path) -> str | None:
    """The still-image format ``path`` holds, judged by its first bytes (not its name), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _IMAGE_SIGNATURES if head.startswith(magic)), None)


def open_video(source: str) -> VideoSource:
    """Open a video file or a stream URL and check that at least one frame decodes."""
    source = str(source)
    if is_stream_url(source):
        capture = _open_capture(source, stream=True)
        if not capture.isOpened():
            raise ReidAppError(f"cannot open video stream: {source}")
        return VideoSource(
            source,
            fps=_container_fps(capture),
            frame_count=None,
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            is_stream=True,
            capture=capture,
        )

    if source.lower().startswith("file://"):
        source = source[len("file://") :]
    path = Path(source).expanduser()
    if not path.exists():
        raise ReidAppError(f"video not found: {path}")
    if not path.is_file():
        raise ReidAppError(f"not a video file: {path}")
    still = still_image_format(path)
    if still is not None:
        # OpenCV's image-sequence reader would hand it over as a one-frame "video" at a made-up
        # 25 fps: stored, it would pose as a recording. Refused whatever its name says.
        raise ReidAppError(
            f"{path} is a still image ({still}), not a video: ingest needs a video file or stream and stores "
            f"nothing for an image; to look for the person in it, run `reid-app search {path}`"
        )
    capture = _open_capture(str(path), stream=False)
    try:
        if not capture.isOpened():
            raise ReidAppError(f"cannot read video (not a video file, or a format OpenCV cannot decode): {path}")
        ok, first = capture.read()
        if not ok or first is None:
            raise ReidAppError(f"cannot read video (no frame decodes; the file is corrupt or empty): {path}")
        announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        return VideoSource(
            str(path),
            fps=_container_fps(capture),
            frame_count=announced if announced > 0 else None,
            width=int(first.shape[1]),
            height=int(first.shape[0]),
            is_stream=False,
        )
    finally:
        capture.release()
