"""Domain-generalisation (DG) figures of FA-Net checkpoints next to trained peers, in one run.

    .venv/bin/python benchmarks/dg_report.py --weights weights/fanet_osnet_cuhk03_peta.pt [b.pt ...]

Prints a markdown table: per test set (VIPeR, PRID, GRID, i-LIDS) rank-1 / mAP in %, the mean over
the 10 splits of ``peta_reid/dg_splits.json``, and the DG mean of the four sets (the protocol is in
:mod:`fanet.evaluation.dg`: cosine ranking, single query, no camera filtering). Every model reads the
same images the same way (PIL bilinear straight to 256x128); FA-Net averages each image with its
mirror (as it is evaluated), the peers do not (as their own figures are made).

Peers (``--skip-peers`` leaves them out): OSNet x0.25 trained on MSMT17 (ONNX, onnxruntime) and
the Intel Open Model Zoo person-reidentification-retail-0288/0287/0286/0277 (OpenVINO IR; float32
inference unless ``--ov-precision``; the FP32 files where the copy has them). None of them trained
on the four test sets as far as their sources say; the OMZ models' training data are not stated.

VIPeR, PRID, GRID and i-LIDS (through PETA) are for research use only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from calibration import pair_score_summary, print_summary  # benchmarks/ is the script's folder, so on the path

from fanet.checkpoint import checkpoint_input_size, model_from_checkpoint, read_checkpoint
from fanet.data.peta import find_peta_folder, read_dg_splits, read_peta_labels
from fanet.evaluation.dg import DGResult, PathEmbedder, evaluate_dg, fanet_embedder, load_images
from fanet.weights import sha256_file
from reid_app.external_model import ExternalReIDModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OMZ = SHARED / "weights" / "openvino_omz_person_reid" / "intel"
#: (row name, file), smallest first. FP16 only where the copy has no FP32 file (0286, 0277); both
#: are run in float32.
PEERS = (
    ("OSNet x0.25 MSMT17 (ONNX)", SHARED / "weights" / "osnet_x0_25_msmt17.onnx"),
    *(
        (f"OMZ retail-{n} ({precision})", OMZ / f"person-reidentification-retail-{n}" / precision
         / f"person-reidentification-retail-{n}.xml")
        for n, precision in (("0288", "FP32"), ("0287", "FP32"), ("0286", "FP16"), ("0277", "FP16"))
    ),
)


def peer_embedder(model: ExternalReIDModel) -> PathEmbedder:
    def embed(paths: list[str]) -> np.ndarray:
        return model.embed(load_images(paths, *model.input_size))

    return embed


class CachingEmbedder:
    """Keeps every feature it computes, by path, so the calibration reuses the evaluation's."""

    def __init__(self, embed: PathEmbedder) -> None:
        self.embed = embed
        self.features: dict[str, np.ndarray] = {}

    def __call__(self, paths: list[str]) -> np.ndarray:
        features = self.embed(paths)
        self.features.update(zip(paths, features, strict=True))
        return features


def dg_pair_scores(features: dict[str, np.ndarray], peta_root: str, splits) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of every query-gallery pair of every split and set: same person (always seen
    by another camera or at another time here) and different people."""
    labels = read_peta_labels(peta_root)
    positive, negative = [], []
    for split in splits:
        for subset in split.values():
            query, gallery = subset["query"], subset["gallery"]
            q = np.stack([features[labels[f].path] for f in query])
            g = np.stack([features[labels[f].path] for f in gallery])
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            g = g / np.linalg.norm(g, axis=1, keepdims=True)
            same = np.array([labels[f].pid for f in query])[:, None] == np.array([labels[f].pid for f in gallery])
            scores = q @ g.T
            positive.append(scores[same])
            negative.append(scores[~same])
    return np.concatenate(positive), np.concatenate(negative)


def run(name: str, embed: PathEmbedder, peta_root: str, splits, extra: dict[str, object]) -> DGResult:
    result = evaluate_dg(embed, peta_root, splits)
    result.extra.update(extra)
    print(
        f"{name}: DG mean R1 {result.mean_rank1:.1%} mAP {result.mean_mAP:.1%}; {result.num_images} images "
        f"embedded in {result.embed_seconds:.1f} s ({result.num_images / result.embed_seconds:.0f} img/s), "
        f"{result.seconds:.1f} s in all",
        file=sys.stderr,
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="*", default=[], help="FA-Net checkpoints (inference or training)")
    parser.add_argument("--skip-peers", action="store_true", help="only the FA-Net checkpoints")
    parser.add_argument("--peta-root", default=str(SHARED / "data"), help="peta_reid/ or the folder holding it")
    parser.add_argument("--no-flip", action="store_true", help="FA-Net without flip averaging")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every runtime")
    parser.add_argument("--ov-precision", default="f32", choices=("f32", "bf16", "default"),
                        help="OpenVINO inference precision of the OMZ peers (default: its own, bf16 on CPUs with it)")
    parser.add_argument("--json", help="also write every figure (per split too) to this JSON file")
    parser.add_argument("--calibrate", action="store_true",
                        help="also print the FA-Net checkpoints' same/different-person score distributions")
    args = parser.parse_args()
    if not args.weights and args.skip_peers:
        parser.error("nothing to evaluate: give --weights or drop --skip-peers")
    torch.set_num_threads(args.threads)
    # Read once up front: a wrong --peta-root fails before any model is loaded.
    splits = read_dg_splits(args.peta_root)
    rows: list[tuple[str, DGResult]] = []
    report: dict[str, object] = {
        "peta_folder": str(find_peta_folder(args.peta_root)), "threads": args.threads, "models": {},
    }

    for weights in args.weights:
        payload = read_checkpoint(weights)
        model = model_from_checkpoint(payload, source=weights).eval()
        height, width = checkpoint_input_size(payload)
        name = f"FA-Net {Path(weights).name}" + ("" if args.no_flip else " (flip)")
        if payload.get("init") == "random" or payload.get("meta", {}).get("init") == "random":
            name += " RANDOM INIT"
        extra = {
            "weights": weights, "sha256": sha256_file(weights), "input_size": [height, width],
            "flip": not args.no_flip, "meta": payload.get("meta", {}),
        }
        embed = CachingEmbedder(fanet_embedder(model, height, width, flip=not args.no_flip))
        result = run(name, embed, args.peta_root, splits, extra)
        rows.append((name, result))
        if args.calibrate:
            summary = pair_score_summary(*dg_pair_scores(embed.features, args.peta_root, splits))
            print_summary(f"{name} on the DG sets", summary)
            result.extra["scores"] = summary

    if not args.skip_peers:
        for name, path in PEERS:
            start = time.perf_counter()
            precision = None if args.ov_precision == "default" else args.ov_precision
            peer = ExternalReIDModel(path, threads=args.threads, precision=precision)
            extra = {
                "weights": str(path), "sha256": sha256_file(path), "backend": peer.backend.value,
                "convention": peer.convention.value, "input_size": list(peer.input_size), "flip": peer.flip,
                "ov_precision": args.ov_precision if peer.backend.value == "openvino" else None,
                "load_seconds": time.perf_counter() - start,
            }
            rows.append((name, run(name, peer_embedder(peer), args.peta_root, splits, extra)))

    print(DGResult.table_header())
    for name, result in rows:
        print(result.table_row(name))
    if args.json:
        report["models"] = {name: result.as_dict() for name, result in rows}
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
