"""Make the two sample clips from OpenCV's ``vtest.avi`` (run once by a developer; not used at run time).

Each "camera" is a time segment of the same single-camera sequence, cropped to a different
part of the scene and scaled up 1.33× (so that people are 80-160 px tall, which YOLO at its
default 640 px input finds reliably), then encoded as H.264 with ffmpeg (libx264)::

    python sample_videos/make_clips.py /usr/share/doc/opencv-doc/examples/data/vtest.avi

``vtest.avi`` ships with OpenCV (``samples/data/vtest.avi``; Debian package ``opencv-doc``).
ffmpeg comes from ``$FFMPEG``, from the ``imageio-ffmpeg`` wheel, or from ``PATH``; OpenCV's
own writer cannot be used because opencv-python is built without an H.264 encoder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_FPS = 10  # vtest.avi: 795 frames at 10 fps, 768x576


@dataclass(frozen=True)
class Clip:
    name: str
    first_frame: int  # inclusive, in vtest.avi's numbering
    last_frame: int  # exclusive
    crop_x: int
    crop_y: int
    crop_width: int
    crop_height: int
    out_width: int
    out_height: int


CLIPS = (
    # Left and centre of the square, first 15 s.
    Clip("cam1_square_left.mp4", 0, 150, 96, 120, 480, 360, 640, 480),
    # Right and centre of the square, 15 s starting at 47 s: a later segment, shifted view.
    Clip("cam2_square_right.mp4", 470, 620, 288, 150, 480, 360, 640, 480),
)


def find_ffmpeg() -> str:
    if os.environ.get("FFMPEG"):
        return os.environ["FFMPEG"]
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        pass
    found = shutil.which("ffmpeg")
    if found is None:
        sys.exit("ffmpeg with libx264 is needed: set $FFMPEG, pip install imageio-ffmpeg, or install ffmpeg")
    return found


def make_clip(ffmpeg: str, source: Path, clip: Clip, out_dir: Path) -> Path:
    out = out_dir / clip.name
    filters = ",".join(
        [
            f"trim=start_frame={clip.first_frame}:end_frame={clip.last_frame}",
            "setpts=PTS-STARTPTS",
            f"crop={clip.crop_width}:{clip.crop_height}:{clip.crop_x}:{clip.crop_y}",
            f"scale={clip.out_width}:{clip.out_height}:flags=lanczos",
        ]
    )
    command = [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
        "-i", str(source),
        "-vf", filters,
        "-r", str(SOURCE_FPS),
        "-c:v", "libx264", "-preset", "veryslow", "-crf", "22", "-pix_fmt", "yuv420p",
        "-movflags", "+faststart", "-an",
        str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vtest", type=Path, help="path to OpenCV's samples/data/vtest.avi")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    ffmpeg = find_ffmpeg()
    for clip in CLIPS:
        out = make_clip(ffmpeg, args.vtest, clip, args.out_dir)
        print(f"{out}: {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
