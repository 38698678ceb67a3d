"""``reid-app ingest VIDEO --camera ID``: store the people of a video in the gallery."""

from __future__ import annotations

import signal
import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from reid_app.backends import BACKEND_HELP, INT8_HELP
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, PUBLIC_URL_HELP, AppConfig, parse_camera_id
from reid_app.errors import ReidAppError
from reid_app.ingest import (
    IngestOptions,
    IngestProgress,
    IngestSummary,
    check_sample_fps,
    ingest_video,
    load_detector,
    load_embedder,
    parse_start_time,
)
from reid_app.safetext import cell, plain
from reid_app.video import open_video


def warn(message: str | None) -> None:
    """A plain warning line on stderr."""
    if message:
        print(f"warning: {plain(message)}", file=sys.stderr, flush=True)


def _stop_like_ctrl_c(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def ingest_command(
    video: str = typer.Argument(..., help="Video file (or stream URL)."),
    camera: str = typer.Option(..., "--camera", help="Camera ID (a positive integer)."),
    db: str | None = typer.Option(
        None, "--db", help=f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder for thumbnails (default: next to the DB)."),
    fps: float | None = typer.Option(
        None, "--fps", help=f"Frames sampled per second of video (default: {AppConfig.sample_fps:g})."
    ),
    every_frame: bool = typer.Option(False, "--every-frame", help="Process every frame (no sampling)."),
    detector: str | None = typer.Option(
        None, "--detector", help="Person detector: a YOLO weights path/name or 'hog' (default: YOLO11n)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda:0, ..."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    int8: bool = typer.Option(False, "--int8", help=INT8_HELP),
    weights: str | None = typer.Option(
        None, "--weights", help="FA-Net weights file, or 'untrained' (random init) (default: fanet_reid.pt)."
    ),
    start_time: str | None = typer.Option(
        None, "--start-time", help="Wall-clock time of the first frame, ISO 8601 (default: file mtime)."
    ),
    max_frames: int | None = typer.Option(None, "--max-frames", help="Stop after this many sampled frames."),
    crops_per_track: int | None = typer.Option(
        None, "--crops-per-track", help=f"Crops kept per track (default {AppConfig.crops_per_track})."
    ),
    batch_frames: int | None = typer.Option(
        None,
        "--batch-frames",
        help=f"Sampled frames per database transaction (default {AppConfig.commit_every_frames}).",
    ),
    public_url: str = typer.Option("", "--public-url", help=PUBLIC_URL_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Detect, track and embed the people of VIDEO and store them for camera ID."""
    camera_id = parse_camera_id(camera)
    if fps is not None and every_frame:
        raise ReidAppError("use either --fps or --every-frame, not both")
    check_sample_fps(fps)
    config = AppConfig.from_env(
        db, data_dir, weights=weights, device=device, backend=backend, int8=int8, public_url=public_url
    )
    if every_frame:
        config.sample_fps = None
    elif fps is not None:
        config.sample_fps = fps
    if crops_per_track is not None:
        if crops_per_track < 1:
            raise ReidAppError(f"--crops-per-track must be at least 1, got {crops_per_track}")
        config.crops_per_track = crops_per_track
    if batch_frames is not None:
        if batch_frames < 1:
            raise ReidAppError(f"--batch-frames must be at least 1, got {batch_frames}")
        config.commit_every_frames = batch_frames
    options = IngestOptions(
        video=video, camera=camera_id, start_time=parse_start_time(start_time), max_frames=max_frames
    )
    source = open_video(video)  # a bad video fails here, before the models load
    if source.is_stream:
        # A service manager stops a live ingest with SIGTERM: end it as Ctrl-C does (what was seen is stored).
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    embedder = load_embedder(config, warn)
    warn(embedder.warning())
    person_detector = load_detector(detector, device, config.backend)

    err = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]ingest camera {task.fields[camera]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames · {task.fields[persons]} persons · {task.fields[crops]} crops · {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("ingest", total=None, camera=camera_id, persons=0, crops=0, rate="")
        started = _Clock()

        def on_progress(update: IngestProgress) -> None:
            elapsed = started.elapsed()
            rate = f"{update.crops / elapsed:.1f} crops/s" if elapsed > 0 else ""
            progress.update(
                task,
                completed=update.frames_done,
                total=update.frames_total,
                persons=update.persons,
                crops=update.crops,
                rate=rate,
            )

        summary = ingest_video(
            config, options, embedder=embedder, detector=person_detector, on_progress=on_progress, source=source
        )
    for note in summary.notes:
        print(plain(note), file=sys.stderr)
    if summary.stopped_early:
        warn(summary.stopped_early)
    Console().print(summary_table(summary, config))
    warn(embedder.warning())


class _Clock:
    def __init__(self) -> None:
        import time

        self._time = time.perf_counter
        self._start = self._time()

    def elapsed(self) -> float:
        return self._time() - self._start


def summary_table(summary: IngestSummary, config: AppConfig) -> Table:
    table = Table(title=f"ingest: {summary.status}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("video", cell(f"{summary.video_path} (id {summary.video_id})"))
    table.add_row("camera", cell(summary.camera))
    table.add_row("database", cell(config.safe_db_url))
    if summary.status != "already ingested":
        rtf = summary.realtime_factor
        table.add_row("sampled frames", str(summary.sampled_frames))
        table.add_row("person detections", str(summary.person_detections))
        table.add_row("tracks stored", str(summary.tracks))
        table.add_row("crops stored", str(summary.crops))
        table.add_row("time", f"{summary.elapsed_s:.1f} s for {summary.video_seconds:.1f} s of video")
        table.add_row("real-time factor", f"{rtf:.2f}" if rtf is not None else "-")
    return table


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_command)
