"""Site adaptation measured on the domain-generalisation sets: each of VIPeR, PRID, GRID and i-LIDS
is one "site" whose crops are adapted on without labels, then scored on its own 10 splits.

    .venv/bin/python benchmarks/adapt_dg.py [--weights FILE] [--epochs 0] [--no-camera-centring] [--no-camera-whitening]
        [--sets VIPeR PRID GRID i-LID] [--work /tmp/adapt_dg] [--threads 2]

Each set's tracklet folder is built from its images without identity labels crossing cameras, as
a tracker would give them: one track per person and camera (in these sets that is one image per
track); i-LIDS records no camera, so every image is its own track in a camera of its own (no
cannot-link is known there). ``reid-app adapt --from-folder`` runs on it (same code,
:func:`reid_app.adapt.run_adapt`), and the adapted checkpoint is scored on that set's splits of
``dg_splits.json`` (:func:`fanet.evaluation.dg.evaluate_dg` with ``sets=[name]``). Printed per
set: before / after R1 and mAP, adaptation time; then the mean over the sets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fanet.centring import CameraCentring
from fanet.checkpoint import checkpoint_input_size, load_inference_model, read_checkpoint
from fanet.data.peta import DG_TEST_SUBSETS, find_peta_folder, read_peta_labels
from fanet.evaluation.dg import evaluate_dg, fanet_embedder
from fanet.weights import REPO_WEIGHTS_DIR
from reid_app.adapt import run_adapt
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tracklet_folder(peta: Path, name: str, folder: Path) -> int:
    """The set's images as ``folder/<camera>/<track>/`` links; returns the number of tracks."""
    tracks = set()
    for index, image in enumerate(sorted(read_peta_labels(peta).values(), key=lambda i: i.path)):
        if image.subset != name:
            continue
        if image.camid < 0:  # no camera recorded: every image is its own sighting
            camera, track = f"u{index}", "0"
        else:
            camera, track = str(image.camid), image.pid  # one person in one camera: one track
        target = folder / camera / track / Path(image.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(image.path)
        tracks.add((camera, track))
    return len(tracks)


def score(weights: Path, peta: Path, name: str) -> tuple[float, float]:
    """The set's R1 and mAP; a checkpoint with camera means centres each image by its camera's, as
    the app does for a crop ingested from that camera (no camera recorded: the site's mean)."""
    model = load_inference_model(weights)
    payload = read_checkpoint(weights)
    height, width = checkpoint_input_size(payload)
    embed = fanet_embedder(model, height, width)
    centring = CameraCentring.from_meta(payload.get("meta"))
    if centring is not None:
        images = read_peta_labels(peta).values()
        camera_of = {image.path: None if image.camid < 0 else str(image.camid) for image in images}
        plain = embed

        def embed(paths: list[str]) -> np.ndarray:
            return centring.apply(plain(paths), [camera_of[path] for path in paths])

    result = evaluate_dg(embed, peta, sets=[name])
    return 100 * result.mean_rank1, 100 * result.mean_mAP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs; 0: camera centring only")
    parser.add_argument("--no-camera-centring", action="store_true")
    parser.add_argument("--no-camera-whitening", action="store_true", help="the camera means alone")
    parser.add_argument("--sets", nargs="+", default=list(DG_TEST_SUBSETS), choices=DG_TEST_SUBSETS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapt_dg"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peta = find_peta_folder(SHARED / "data")
    rows = []
    for name in args.sets:
        folder = args.work / name / "tracklets"
        tracks = tracklet_folder(peta, name, folder)
        before = score(args.weights, peta, name)
        started = time.perf_counter()
        output = args.work / name / f"adapted_{args.weights.stem}.pt"
        report = run_adapt(str(args.weights), output, folder=folder, epochs=args.epochs,
                           camera_centring=not args.no_camera_centring,
                           camera_whitening=not args.no_camera_whitening, log=lambda _line: None)  # fmt: skip
        seconds = time.perf_counter() - started
        after = score(output, peta, name)
        last = report.epochs[-1] if report.epochs else None
        linked = f"{last.linked_tracklets}/{report.tracks} tracks linked, " if last else ""
        rows.append((name, before, after, seconds, report.crops, linked))
        print(
            f"{name:<7} before R1 {before[0]:5.1f} mAP {before[1]:5.1f}  after R1 {after[0]:5.1f} mAP {after[1]:5.1f}  "
            f"({report.crops} crops, {tracks} tracks, {linked}adapted in {seconds:.0f} s)",
            flush=True,
        )
    mean_before = [sum(r[1][i] for r in rows) / len(rows) for i in (0, 1)]
    mean_after = [sum(r[2][i] for r in rows) / len(rows) for i in (0, 1)]
    print(
        f"mean    before R1 {mean_before[0]:5.1f} mAP {mean_before[1]:5.1f}  after R1 {mean_after[0]:5.1f} "
        f"mAP {mean_after[1]:5.1f}  (R1 {mean_after[0] - mean_before[0]:+.1f})"
    )


if __name__ == "__main__":
    main()
