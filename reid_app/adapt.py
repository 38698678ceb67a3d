"""``reid-app adapt``: adapt the FA-Net checkpoint to a site's own unlabelled tracks.

The method is :mod:`fanet.engine.adapt` (tracklet pseudo-identities, cluster contrast, anchored
to the starting model); this module only gathers the crops and writes the result:

* ``--db``: every stored track of the database becomes a tracklet folder
  (:func:`export_tracklets`: ``<camera>/<track>/<crop id>.jpg`` from the JPEGs the database keeps,
  plus ``tracks.csv`` with each track's first and last time, so that only tracks of one camera that
  overlap in time count as different people). The folder sits beside the output
  (``.<output name>.tracklets/``) so that a stopped run finds the same crops again and resumes.
* ``--from-folder DIR``: that layout made by anyone (:mod:`fanet.data.tracklets`).

The output is an inference checkpoint whose metadata says what it was adapted on (``adapted``:
the starting model, crops, tracks, cameras, source, epochs, time), written atomically at the end;
the output folder is checked to be writable before any training. ``--apply`` then moves the
database to it (:mod:`reid_app.reembed`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from reid_app.errors import ReidAppError
from reid_app.locks import atomic_write_bytes
from reid_app.store import Database, Detection, Track, Video, as_utc, require_nonempty
from reid_app.thumbnails import thumbnail_bytes

#: Fewest tracks an adaptation can learn anything from (two, and they must not all be one person).
MIN_TRACKS = 2


@dataclass
class AdaptReport:
    output: Path
    base: str
    crops: int
    tracks: int
    cameras: int
    epochs: list[Any]
    card: str


def adapted_card(meta: dict[str, Any]) -> str:
    """The card line of an adapted checkpoint's metadata ("" for one that was not adapted)."""
    from fanet.engine.adapt import card_line  # noqa: PLC0415

    return card_line(meta)


def export_tracklets(db: Database, folder: Path) -> int:
    """Write the database's tracks as a tracklet folder; returns the crops written. Times are
    seconds since 1970 (video start time + the crop's timestamp)."""
    from fanet.data.tracklets import Tracklet, write_times  # noqa: PLC0415

    require_nonempty(db)
    shutil.rmtree(folder, ignore_errors=True)  # afresh: forgotten tracks must not be trained on
    folder.mkdir(parents=True, exist_ok=True)
    with db.read() as session:
        rows = session.execute(
            select(Track.id, Track.camera_id, Track.first_timestamp_s, Track.last_timestamp_s, Video.start_time)
            .join(Video, Video.id == Track.video_id)
            .order_by(Track.id)
        ).all()
        crops = session.execute(select(Detection.id, Detection.track_id).order_by(Detection.id)).all()
    by_track: dict[int, list[int]] = {}
    for detection_id, track_id in crops:
        by_track.setdefault(track_id, []).append(detection_id)
    written, timed = 0, []
    for track_id, camera, first_s, last_s, start in rows:
        track_dir = folder / str(camera) / str(track_id)
        track_dir.mkdir(parents=True, exist_ok=True)
        for detection_id in by_track.get(track_id, []):
            data = thumbnail_bytes(db, detection_id)
            if data is None:
                continue
            atomic_write_bytes(track_dir / f"{detection_id}.jpg", data)
            written += 1
        origin = as_utc(start).timestamp()
        timed.append(Tracklet(str(camera), str(track_id), (), origin + first_s, origin + last_s))
    write_times(folder, timed)
    return written


def check_writable(output: Path) -> None:
    """One line before any training when the output cannot be written."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.with_name(f".{output.name}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = exc.strerror or exc
        raise ReidAppError(f"cannot write the output {output} ({why}): choose another --output") from None


def run_adapt(
    weights: str | None,
    output: Path,
    *,
    db: Database | None = None,
    folder: Path | None = None,
    epochs: int = 0,
    camera_centring: bool = True,
    camera_whitening: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> AdaptReport:
    """Adapt ``weights`` (default: the shipped model) on ``db``'s tracks or ``folder``'s; write ``output``.
    ``epochs=0`` with ``camera_centring`` only takes the site's camera means and (``camera_whitening``)
    their whitening (:mod:`fanet.centring`)."""
    from fanet.centring import CENTRING_META_KEY, MIN_CENTRING_TRACKS, WHITENING_META_KEY  # noqa: PLC0415
    from fanet.checkpoint import (  # noqa: PLC0415
        CheckpointError,
        checkpoint_input_size,
        model_from_checkpoint,  # noqa: PLC0415
        read_checkpoint,
        save_inference_checkpoint,
    )
    from fanet.data.tracklets import TrackletLayoutError, read_tracklet_folder  # noqa: PLC0415
    from fanet.engine.adapt import (  # noqa: PLC0415
        STATE_SUFFIX,
        AdaptConfig,
        adapt,
        card_line,
        embed_tracklets,
        fit_camera_centring,
        tracklet_means,
    )
    from fanet.weights import sha256_file  # noqa: PLC0415
    from reid_app.calibration import THRESHOLDS_META_KEY, calibrate  # noqa: PLC0415
    from reid_app.embed import _resolve_checkpoint  # noqa: PLC0415

    if (db is None) == (folder is None):
        raise ReidAppError("adapt takes one source: --db URL or --from-folder DIR")
    if weights is not None and weights.strip().lower() == "untrained":
        raise ReidAppError("adapt starts from a trained checkpoint: --weights untrained is not one")
    try:
        config = AdaptConfig(epochs=epochs, camera_centring=camera_centring, camera_whitening=camera_whitening)
    except ValueError as exc:
        raise ReidAppError(str(exc)) from None
    check_writable(output)
    base = _resolve_checkpoint(weights)
    try:
        payload = read_checkpoint(base)
        model = model_from_checkpoint(payload, source=base.name)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ReidAppError(str(exc).splitlines()[0]) from None
    input_size = checkpoint_input_size(payload)
    export_dir = None
    if db is not None:
        export_dir = output.with_name(f".{output.name}.tracklets")
        log(f"exporting the database's tracks to {export_dir}")
        export_tracklets(db, export_dir)
        source_dir, source = export_dir, f"database {db.config.safe_db_url}"
    else:
        source_dir, source = folder, f"folder {folder}"
    try:  # the export is a scratch copy: gone after success, a refusal or a stop alike
        try:
            tracklets = read_tracklet_folder(source_dir)
        except TrackletLayoutError as exc:
            raise ReidAppError(str(exc)) from None
        if len(tracklets) < MIN_TRACKS:
            raise ReidAppError(f"{source} holds {len(tracklets)} track: adaptation needs at least {MIN_TRACKS}")
        crops = sum(len(t.paths) for t in tracklets)
        cameras = len({t.camera for t in tracklets})
        centring_skipped = None
        if camera_centring and len(tracklets) < MIN_CENTRING_TRACKS:
            too_few = f"{len(tracklets)} tracks, the camera means need {MIN_CENTRING_TRACKS}"
            if epochs == 0:
                raise ReidAppError(f"{source} holds {too_few}: ingest more footage first (or fine-tune: --epochs N)")
            centring_skipped, camera_centring = too_few, False
            log(f"no camera centring: {too_few} (a mean over a few people is their look, not the cameras')")
        base_sha = sha256_file(base)
        state_file = output.with_name(output.name + STATE_SUFFIX)
        log(f"adapting {base.name} on {crops} crops of {len(tracklets)} tracks ({cameras} cameras) for {epochs} epochs")
        try:
            history = adapt(model, tracklets, input_size, config, state_file, base_sha, progress, log)
        except ValueError as exc:
            raise ReidAppError(str(exc)) from None
        meta = dict(payload.get("meta") or {})
        # A starting model's own camera means describe its features, not the adapted model's.
        dropped = ("model", "path", "half", CENTRING_META_KEY, WHITENING_META_KEY, THRESHOLDS_META_KEY)
        meta = {k: v for k, v in meta.items() if k not in dropped}
        meta["input_size"] = list(input_size)
        meta["adapted"] = {
            "from": base.name, "from_sha256": base_sha, "crops": crops, "tracks": len(tracklets), "cameras": cameras,
            "source": source, "epochs": epochs, "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }  # fmt: skip
        if camera_centring:
            features = embed_tracklets(model, tracklets, input_size, progress)
            centring = fit_camera_centring(features, tracklets, whiten=config.camera_whitening)
            meta.update(centring.to_meta())
            # The app's default thresholds, moved to the centred scores (reid_app/calibration.py).
            crop_cameras = [t.camera for t in tracklets for _ in t.paths]
            adapted_means = tracklet_means(centring.apply(features, crop_cameras), tracklets)
            if epochs:  # the network changed too: the starting one's features, once more
                starting_model = model_from_checkpoint(payload, source=base.name)
                features = embed_tracklets(starting_model, tracklets, input_size, progress, "calibration")
            starting_means = tracklet_means(features, tracklets)
            thresholds, pairs = calibrate(starting_means, adapted_means, [t.camera for t in tracklets])
            meta[THRESHOLDS_META_KEY] = thresholds.to_meta(pairs)
            log(f"thresholds for this site's scores (set on {pairs} track pairs): search {thresholds.search:.3f}, "
                f"identities {thresholds.identity:.3f}, watchlist {thresholds.watch:.3f}")  # fmt: skip
            meta["adapted"]["centred_cameras"] = len(centring.cameras)
            meta["adapted"]["whitened"] = bool(centring.whitening)
            what = "means and whitening" if centring.whitening else "means"
            log(f"camera centring: {what} of {len(centring.cameras)} of {cameras} cameras (the rest, with fewer than "
                f"{MIN_CENTRING_TRACKS} tracks: the site's)")  # fmt: skip
        elif centring_skipped:
            meta["adapted"]["centring_skipped"] = centring_skipped
        save_inference_checkpoint(model, output, **meta)
        state_file.unlink(missing_ok=True)
        return AdaptReport(output, base.name, crops, len(tracklets), cameras, history, card_line(meta))
    finally:
        if export_dir is not None:
            shutil.rmtree(export_dir, ignore_errors=True)
