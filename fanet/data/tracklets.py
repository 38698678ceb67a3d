"""Unlabelled tracklets of a site: the data source of ``reid-app adapt`` (:mod:`fanet.engine.adapt`).

Layout on disk: ``DIR/<camera id>/<track id>/*.jpg|png`` — one folder per track, the crops a
tracker gave for one person in one camera. No identity label is read; what the layout does say is
used as constraints:

* the crops of one track are one person;
* two tracks of one camera that overlap in time are two people. A folder says nothing about
  time unless it holds ``DIR/tracks.csv`` (``camera,track,start_s,end_s``): without it every two
  tracks of one camera are taken as overlapping, i.e. as different people (a person who leaves
  and comes back into one camera then counts twice, the lesser error for the adaptation: merging
  two people teaches the model to confuse them).

Camera and track ids are folder names: integers or any other name (cameras are compared as names).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
TIMES_FILE = "tracks.csv"


class TrackletLayoutError(FileNotFoundError):
    """A tracklet folder that does not follow ``DIR/<camera>/<track>/*.jpg`` (the message says what)."""


@dataclass(frozen=True)
class Tracklet:
    camera: str
    track: str
    paths: tuple[str, ...]
    start_s: float | None = None  # None: unknown (overlaps every track of its camera)
    end_s: float | None = None

    def overlaps(self, other: Tracklet) -> bool:
        """Whether the two tracks are seen at the same time in the same camera (hence two people)."""
        if self.camera != other.camera:
            return False
        if None in (self.start_s, self.end_s, other.start_s, other.end_s):
            return True
        return self.start_s <= other.end_s and other.start_s <= self.end_s  # type: ignore[operator]


def read_tracklet_folder(root: str | Path) -> list[Tracklet]:
    """Every track folder of ``root`` with at least one image, sorted by (camera, track)."""
    root = Path(root)
    if not root.is_dir():
        raise TrackletLayoutError(f"tracklet folder not found: {root}")
    times = _read_times(root / TIMES_FILE)
    tracklets = []
    for camera in sorted(p for p in root.iterdir() if p.is_dir()):
        for track in sorted(p for p in camera.iterdir() if p.is_dir()):
            paths = tuple(str(p) for p in sorted(track.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
            if paths:
                start, end = times.get((camera.name, track.name), (None, None))
                tracklets.append(Tracklet(camera.name, track.name, paths, start, end))
    if not tracklets:
        raise TrackletLayoutError(f"no tracks in {root}: expected {root}/<camera id>/<track id>/*.jpg")
    return tracklets


def _read_times(path: Path) -> dict[tuple[str, str], tuple[float, float]]:
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as handle:
            return {
                (row["camera"], row["track"]): (float(row["start_s"]), float(row["end_s"]))
                for row in csv.DictReader(handle)
            }
    except (KeyError, ValueError, TypeError) as exc:
        raise TrackletLayoutError(f"{path}: expected columns camera,track,start_s,end_s ({exc})") from None


def write_times(root: Path, tracklets: list[Tracklet]) -> None:
    """``tracks.csv`` for the tracklets whose times are known (what a database export writes)."""
    with (root / TIMES_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["camera", "track", "start_s", "end_s"])
        for t in tracklets:
            if t.start_s is not None and t.end_s is not None:
                writer.writerow([t.camera, t.track, f"{t.start_s:.3f}", f"{t.end_s:.3f}"])
