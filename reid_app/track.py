"""Within-camera tracking (ByteTrack) and the choice of a few good crops per track.

A person walking through a camera's view becomes one track; storage then keeps a handful of
crops of that track (:class:`TrackCropSelector`) instead of one per sampled frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from reid_app.detect import Detection, configure_ultralytics_offline

configure_ultralytics_offline()

#: Seconds a lost track is kept for re-association. ByteTrack's default ``track_buffer`` of 30
#: frames assumes 30 fps (1 s); a time is used here because ingest samples at a few fps.
DEFAULT_LOST_TRACK_SECONDS = 2.0
#: Colour distance (Bhattacharyya, 0-1) above which a track and a detection are never matched.
#: Measured on the sample clips at 5 fps: 99% of same-person pairs in consecutive samples are
#: below 0.42, while 90% of pairs of different people are above 0.48.
DEFAULT_APPEARANCE_GATE = 0.5
#: Buffered IoU (Yang et al., "Hard to track objects with irregular motions and similar appearances?
#: Make it easier by buffering the matching space", WACV 2023): for association, boxes are grown
#: on every side by this many box sizes per second between updates (capped at 1), so that a
#: walker still overlaps his predicted box at low sampling rates: 0.5 at 2 fps, 0.1 at 10 fps.
#: On the sample clips at 2 fps this raised the share of detections that get a track id from
#: 88/178 to 138/178, with fewer, longer tracks.
BOX_BUFFER_PER_SECOND = 1.0
#: Histogram bins (hue, saturation, value) of each half of a person box.
COLOUR_BINS = (8, 4, 4)


def _bytetrack_defaults() -> dict[str, object]:
    """Ultralytics' own ``bytetrack.yaml`` (thresholds tuned by its authors)."""
    import ultralytics
    from ultralytics.utils import YAML

    return dict(YAML.load(Path(ultralytics.__file__).parent / "cfg" / "trackers" / "bytetrack.yaml"))


class _DetectionArrays:
    """Detections in the array form BYTETracker.update reads: ``conf``, ``cls``, ``xyxy``, ``xywh``.

    It must support ``len`` and boolean-mask indexing, like Ultralytics' ``Boxes``.
    """

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray) -> None:
        self.xyxy = xyxy
        self.conf = conf
        self.cls = np.zeros(len(conf), dtype=np.float32)  # everything here is a person

    @classmethod
    def from_detections(cls, detections: list[Detection]) -> _DetectionArrays:
        xyxy = np.asarray([d.bbox for d in detections], dtype=np.float32).reshape(-1, 4)
        conf = np.asarray([d.score for d in detections], dtype=np.float32)
        return cls(xyxy, conf)

    @property
    def xywh(self) -> np.ndarray:
        centre = (self.xyxy[:, :2] + self.xyxy[:, 2:]) / 2
        size = self.xyxy[:, 2:] - self.xyxy[:, :2]
        return np.concatenate([centre, size], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: np.ndarray) -> _DetectionArrays:
        return _DetectionArrays(self.xyxy[index], self.conf[index])


class PersonTracker:
    """ByteTrack over person detections from any detector (YOLO or HOG), with an appearance gate.

    ``frame_rate`` is the rate at which :meth:`update` is called (the sampling rate, not the
    video's). :meth:`update` returns every input detection, in input order, with ``track_id``
    set for those that belong to a confirmed track and ``None`` for the others (a detection
    below ByteTrack's thresholds, or a new person seen for the first time, which is confirmed
    on the next update). Track ids start at 1 and are unique within one tracker until
    :meth:`reset`.

    ByteTrack associates by box overlap only. At the few frames per second ingest samples,
    people who cross move far between samples and the overlap test alone swaps their ids; a
    swapped track mixes two people's crops. So when ``image`` is given, a match between a
    track and a detection whose clothing colours clearly differ (:func:`colour_signature`,
    Bhattacharyya distance above ``appearance_gate``) is forbidden; everything else is
    Ultralytics' ByteTrack with its own ``bytetrack.yaml`` settings. ``appearance_gate=None``
    turns the gate off.

    For the same reason boxes are compared with a buffered IoU (see ``BOX_BUFFER_PER_SECOND``):
    ``box_buffer`` is the fraction of its size a box grows by on each side when tracks and
    detections are compared; None derives it from ``frame_rate``, 0 gives ByteTrack's plain IoU.
    """

    def __init__(
        self,
        frame_rate: float,
        lost_track_seconds: float = DEFAULT_LOST_TRACK_SECONDS,
        appearance_gate: float | None = DEFAULT_APPEARANCE_GATE,
        box_buffer: float | None = None,
    ) -> None:
        if not frame_rate > 0:
            raise ValueError(f"frame_rate must be positive, got {frame_rate}")
        settings = _bytetrack_defaults()
        settings["track_buffer"] = max(1, round(frame_rate * lost_track_seconds))
        self.frame_rate = frame_rate
        self.appearance_gate = appearance_gate
        if box_buffer is None:
            box_buffer = min(1.0, BOX_BUFFER_PER_SECOND / frame_rate)
        self.box_buffer = box_buffer
        self._tracker = _gated_bytetrack_class()(SimpleNamespace(**settings), appearance_gate, self.box_buffer)

    def update(self, detections: list[Detection], image: np.ndarray | None = None) -> list[Detection]:
        """Advance the tracker by one (sampled) frame and return ``detections`` with track ids."""
        arrays = _DetectionArrays.from_detections(detections)
        signatures = None
        if image is not None and self.appearance_gate is not None:
            signatures = [colour_signature(image, d.bbox) for d in detections]
        self._tracker.detection_signatures = signatures
        rows = self._tracker.update(arrays, image)
        track_of_detection: dict[int, int] = {}
        # Row layout (Ultralytics 8.4): x1, y1, x2, y2, track_id, score, cls, detection index.
        for row in np.asarray(rows).reshape(-1, 8):
            track_of_detection[int(row[7])] = int(row[4])
        if signatures is not None:
            self._tracker.remember(track_of_detection, signatures)
        return [d.with_track_id(track_of_detection.get(i)) for i, d in enumerate(detections)]

    def reset(self) -> None:
        """Forget all tracks (call between videos); ids start again at 1."""
        self._tracker.reset()


def buffered_box(xyxy: np.ndarray, buffer: float) -> np.ndarray:
    """The box grown by ``buffer`` × its width (height) on the left and right (top and bottom)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    grow_x, grow_y = buffer * (x2 - x1), buffer * (y2 - y1)
    return np.array([x1 - grow_x, y1 - grow_y, x2 + grow_x, y2 + grow_y], dtype=np.float32)


def colour_signature(image: np.ndarray, bbox: tuple[float, float, float, float]) -> np.ndarray | None:
    """Normalised HSV colour histograms of the upper and lower half of a person box.

    The box's outer fifths on each side are left out (mostly background). None when the
    remaining region is empty.
    """
    x1, y1, x2, y2 = bbox
    margin = 0.2 * (x2 - x1)
    try:
        region = crop(image, (x1 + margin, y1, x2 - margin, y2))
    except ValueError:
        return None
    if region.shape[0] < 2:
        return None
    hsv = cv2.cvtColor(region, cv2.COLOR_BGR2HSV)
    half = hsv.shape[0] // 2
    histograms = [
        cv2.calcHist([part], [0, 1, 2], None, list(COLOUR_BINS), [0, 180, 0, 256, 0, 256]).ravel()
        for part in (hsv[:half], hsv[half:])
    ]
    signature = np.concatenate(histograms).astype(np.float32)
    return signature / max(float(signature.sum()), 1.0)


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya distance between two colour signatures: 0 identical, 1 disjoint."""
    return float(cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA))


@functools.cache
def _gated_bytetrack_class() -> type:
    """BYTETracker whose box-overlap costs are vetoed by the colour gate (built on first use)."""
    from ultralytics.trackers.byte_tracker import BYTETracker
    from ultralytics.trackers.utils import matching

    class GatedBYTETracker(BYTETracker):
        def __init__(self, args: SimpleNamespace, appearance_gate: float | None, box_buffer: float) -> None:
            super().__init__(args)
            self.appearance_gate = appearance_gate
            self.box_buffer = box_buffer
            self.detection_signatures: list[np.ndarray | None] | None = None
            self.track_signatures: dict[int, np.ndarray] = {}

        def get_dists(self, tracks: list, detections: list) -> np.ndarray:
            if not tracks or not detections or self.box_buffer <= 0:
                dists = super().get_dists(tracks, detections)
            else:
                dists = matching.iou_distance(
                    [buffered_box(t.xyxy, self.box_buffer) for t in tracks],
                    [buffered_box(d.xyxy, self.box_buffer) for d in detections],
                )
                if self.args.fuse_score:
                    dists = matching.fuse_score(dists, detections)
            if self.appearance_gate is None or self.detection_signatures is None or dists.size == 0:
                return dists
            for row, track in enumerate(tracks):
                known = self.track_signatures.get(int(track.track_id))
                if known is None:
                    continue
                for column, detection in enumerate(detections):
                    seen = self.detection_signatures[int(detection.idx)]
                    if seen is not None and colour_distance(known, seen) > self.appearance_gate:
                        dists[row, column] = 1.0  # above every matching threshold: never paired
            return dists

        def remember(self, track_of_detection: dict[int, int], signatures: list[np.ndarray | None]) -> None:
            """Blend each matched track's signature with its detection's (half each)."""
            for detection_index, track_id in track_of_detection.items():
                seen = signatures[detection_index]
                if seen is None:
                    continue
                known = self.track_signatures.get(track_id)
                self.track_signatures[track_id] = seen if known is None else (known + seen) / 2
            alive = {int(t.track_id) for t in (*self.tracked_stracks, *self.lost_stracks)}
            for track_id in [t for t in self.track_signatures if t not in alive]:
                del self.track_signatures[track_id]

        def reset(self) -> None:
            super().reset()
            self.track_signatures = {}
            self.detection_signatures = None

    return GatedBYTETracker


def crop(image: np.ndarray, bbox: tuple[float, float, float, float], pad: float = 0.0) -> np.ndarray:
    """Copy of the ``bbox`` region, grown by ``pad`` × its size on every side, clipped to the image."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = bbox
    grow_x, grow_y = pad * (x2 - x1), pad * (y2 - y1)
    left = int(np.clip(np.floor(x1 - grow_x), 0, width))
    right = int(np.clip(np.ceil(x2 + grow_x), 0, width))
    top = int(np.clip(np.floor(y1 - grow_y), 0, height))
    bottom = int(np.clip(np.ceil(y2 + grow_y), 0, height))
    if right <= left or bottom <= top:
        raise ValueError(f"box {bbox} lies outside the {width}x{height} image")
    return np.ascontiguousarray(image[top:bottom, left:right])


@dataclass(frozen=True, slots=True, eq=False)
class TrackCrop:
    """One crop of a tracked person and where it came from."""

    frame_index: int
    timestamp_s: float
    bbox: tuple[float, float, float, float]
    score: float
    image: np.ndarray

    @property
    def quality(self) -> float:
        """Detector confidence × box area: prefers confident, large (close, unoccluded) views."""
        x1, y1, x2, y2 = self.bbox
        return self.score * max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass(slots=True)
class TrackCrops:
    """The crops kept for one finished track, in time order, plus the track's extent."""

    track_id: int
    crops: list[TrackCrop]
    first_frame: int
    last_frame: int
    first_timestamp_s: float
    last_timestamp_s: float
    num_detections: int


@dataclass(slots=True)
class _OpenTrack:
    track_id: int
    first_frame: int
    first_timestamp_s: float
    last_frame: int = 0
    last_timestamp_s: float = 0.0
    num_detections: int = 0
    candidates: list[TrackCrop] = field(default_factory=list)


class TrackCropSelector:
    """Keeps, per track, the best ``max_crops`` crops spread over the track's time span.

    Every tracked detection is a candidate. To bound memory on long tracks the candidate pool
    holds at most ``pool_factor × max_crops`` crops: when full, of the two candidates closest
    in time the worse one is dropped, which keeps the pool spread over time. When the track
    ends its time span is cut into ``max_crops`` equal parts and the best candidate of each part
    is kept (parts without candidates are filled with the best remaining ones).
    """

    def __init__(self, max_crops: int = 4, pad: float = 0.0, pool_factor: int = 4) -> None:
        if max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {max_crops}")
        self.max_crops = max_crops
        self.pad = pad
        self.pool_size = max(max_crops, pool_factor * max_crops)
        self._tracks: dict[int, _OpenTrack] = {}

    @property
    def open_track_ids(self) -> list[int]:
        return sorted(self._tracks)

    def add(self, frame_index: int, timestamp_s: float, image: np.ndarray, detections: list[Detection]) -> None:
        """Offer the tracked detections of one frame (those with ``track_id`` None are ignored)."""
        for detection in detections:
            if detection.track_id is None:
                continue
            track = self._tracks.get(detection.track_id)
            if track is None:
                track = _OpenTrack(detection.track_id, frame_index, timestamp_s)
                self._tracks[detection.track_id] = track
            track.last_frame = frame_index
            track.last_timestamp_s = timestamp_s
            track.num_detections += 1
            candidate = TrackCrop(
                frame_index=frame_index,
                timestamp_s=timestamp_s,
                bbox=detection.bbox,
                score=detection.score,
                image=crop(image, detection.bbox, self.pad),
            )
            track.candidates.append(candidate)
            if len(track.candidates) > self.pool_size:
                _drop_closest_worse(track.candidates)

    def finished_tracks(self, current_frame_index: int, max_age: int) -> list[TrackCrops]:
        """Remove and return tracks not seen for more than ``max_age`` frames before ``current_frame_index``."""
        finished = [
            track_id for track_id, track in self._tracks.items() if current_frame_index - track.last_frame > max_age
        ]
        return [self._finish(self._tracks.pop(track_id)) for track_id in sorted(finished)]

    def peek(self, track_id: int) -> TrackCrops:
        """What an open track would be if it ended now (it stays open)."""
        return self._finish(self._tracks[track_id])

    def cut(self, track_id: int) -> TrackCrops:
        """End an open track here (an early watchlist alert commits it at once); the tracker's next
        detections of the same id start a new segment of it."""
        return self._finish(self._tracks.pop(track_id))

    def flush(self) -> list[TrackCrops]:
        """Remove and return every open track (end of video)."""
        tracks = [self._finish(self._tracks[track_id]) for track_id in sorted(self._tracks)]
        self._tracks.clear()
        return tracks

    def _finish(self, track: _OpenTrack) -> TrackCrops:
        return TrackCrops(
            track_id=track.track_id,
            crops=_spread_best(track.candidates, self.max_crops),
            first_frame=track.first_frame,
            last_frame=track.last_frame,
            first_timestamp_s=track.first_timestamp_s,
            last_timestamp_s=track.last_timestamp_s,
            num_detections=track.num_detections,
        )


def _drop_closest_worse(candidates: list[TrackCrop]) -> None:
    """Drop the lower-quality one of the two time-adjacent candidates that are closest in time."""
    gaps = [b.frame_index - a.frame_index for a, b in zip(candidates, candidates[1:], strict=False)]
    i = int(np.argmin(gaps))
    drop = i if candidates[i].quality < candidates[i + 1].quality else i + 1
    del candidates[drop]


def _spread_best(candidates: list[TrackCrop], count: int) -> list[TrackCrop]:
    """Best candidate from each of ``count`` equal time slices, topped up by quality, in time order."""
    if len(candidates) <= count:
        return list(candidates)
    first, last = candidates[0].frame_index, candidates[-1].frame_index
    span = max(1, last - first + 1)
    chosen: list[TrackCrop] = []
    for slice_index in range(count):
        start = first + span * slice_index / count
        stop = first + span * (slice_index + 1) / count
        in_slice = [c for c in candidates if start <= c.frame_index < stop]
        if in_slice:
            chosen.append(max(in_slice, key=lambda c: c.quality))
    if len(chosen) < count:
        taken = {id(c) for c in chosen}  # identity: the dataclass's == would compare pixel arrays
        rest = sorted((c for c in candidates if id(c) not in taken), key=lambda c: c.quality, reverse=True)
        chosen.extend(rest[: count - len(chosen)])
    return sorted(chosen, key=lambda c: c.frame_index)
