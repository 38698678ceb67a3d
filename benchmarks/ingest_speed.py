"""Ingest speed: real-time factor (processing time / video duration) of ``reid-app ingest``.

The repository has no 720p clip, so a sample clip (640x480) is upscaled to 1280x720 first
(stretched, written as MPEG-4 with OpenCV) — the report says so. The whole pipeline runs as the
CLI runs it (decode → YOLO11n-pose → ByteTrack → crop selection → FA-Net embedding → SQLite +
FAISS), on the CPU, sampling 2 frames per second, with the shipped FA-Net. Time spent in the detector and in the
embedder is measured by wrapping them. ``--backend`` picks the runtime of both networks (as the
CLI's flag); ``--no-upscale`` ingests the video at its own size (e.g. a lab4cam camera).

    python benchmarks/ingest_speed.py [--video sample_videos/cam1_square_left.mp4] [--fps 2]
        [--backend auto|torch|onnxruntime|openvino] [--int8] [--no-upscale]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import torch

from reid_app.config import AppConfig
from reid_app.ingest import IngestOptions, ingest_video, load_detector, load_embedder

REPO = Path(__file__).resolve().parents[1]
TARGET_SIZE = (1280, 720)


def upscale_to_720p(source: Path, target: Path) -> tuple[int, int, float, int]:
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, TARGET_SIZE)
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        writer.write(cv2.resize(frame, TARGET_SIZE, interpolation=cv2.INTER_CUBIC))
        frames += 1
    writer.release()
    capture.release()
    return width, height, fps, frames


class Timed:
    """Forwards one method of a real component and adds up the time spent in it."""

    def __init__(self, inner: object, method: str) -> None:
        self._inner, self._method, self.seconds, self.calls = inner, method, 0.0, 0

    def __getattr__(self, name: str):
        attribute = getattr(self._inner, name)
        if name != self._method:
            return attribute

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", default=str(REPO / "sample_videos" / "cam1_square_left.mp4"))
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--int8", action="store_true", help="the embedder's accepted int8 graph (reid-app quantize)")
    parser.add_argument("--weights", default=None, help="FA-Net checkpoint (default: the shipped one)")
    parser.add_argument("--no-upscale", action="store_true", help="ingest the video at its own size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        if args.no_upscale:
            clip = Path(args.video)
            capture = cv2.VideoCapture(str(clip))
            fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
            width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            capture.release()
            print(f"input: {args.video} ({width}x{height}, {fps:g} fps, {frames} frames = {frames / fps:.1f} s)")
        else:
            clip = Path(folder) / "clip_720p.mp4"
            width, height, fps, frames = upscale_to_720p(Path(args.video), clip)
            print(
                f"input: {args.video} ({width}x{height}, {fps:g} fps, {frames} frames = {frames / fps:.1f} s), "
                f"upscaled to {TARGET_SIZE[0]}x{TARGET_SIZE[1]} because no 720p clip is in the repository"
            )
        config = AppConfig(
            db_url=f"sqlite:///{folder}/reid.db", weights=args.weights, device="cpu", sample_fps=args.fps,
            backend=args.backend, int8=args.int8,
        )  # fmt: skip
        started = time.perf_counter()
        embedder = Timed(load_embedder(config), "embed")
        detector = Timed(load_detector(None, "cpu", config.backend), "detect")
        loading = time.perf_counter() - started
        summary = ingest_video(config, IngestOptions(video=str(clip), camera=1), embedder=embedder, detector=detector)
        duration = frames / fps
        print(
            f"device: cpu, {args.threads} threads; detector {detector.name} on {detector.backend}; embedder "
            f"{embedder.model_name} on {embedder.backend.value} {embedder.precision}"
        )
        print(f"models loaded in {loading:.1f} s (not counted below)")
        print(
            f"sampled {summary.sampled_frames} frames at {args.fps:g} fps; {summary.person_detections} person "
            f"detections; {summary.tracks} tracks; {summary.crops} crops embedded and stored"
        )
        print(
            f"processing time {summary.elapsed_s:.1f} s for {duration:.1f} s of video: "
            f"real-time factor {summary.elapsed_s / duration:.2f} (< 1 is faster than real time)"
        )
        print(
            f"  detector: {detector.seconds:.1f} s ({1000 * detector.seconds / max(detector.calls, 1):.0f} ms/frame); "
            f"embedder: {embedder.seconds:.1f} s ({1000 * embedder.seconds / max(summary.crops, 1):.0f} ms/crop); "
            f"rest (decode, tracking, thumbnails, SQLite, FAISS): "
            f"{summary.elapsed_s - detector.seconds - embedder.seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
