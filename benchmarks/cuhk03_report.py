"""CUHK03 figures of an FA-Net checkpoint, next to the OSNet peer: accuracy through the trainer's
evaluator and through the app's embedder (they must agree), score calibration. CPU speed is
measured on its own by benchmarks/reid_speed.py.

    .venv/bin/python benchmarks/cuhk03_report.py --weights weights/fanet_osnet_cuhk03_peta.pt

Prints figures (no pass/fail). CUHK03 (Li et al., DeepReID, CVPR 2014) is for non-commercial
research only; the split is the CUHK03-NP-shaped one of ``split_np.json`` (close to, not equal
to, the official CUHK03-NP protocol).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from calibration import pair_score_summary  # benchmarks/ is the script's folder, so on the path
from PIL import Image

from fanet.checkpoint import checkpoint_input_size, load_inference_model, read_checkpoint
from fanet.config import DataConfig, DatasetName
from fanet.data import build_dataset
from fanet.data.transforms import resize_rgb
from fanet.engine.evaluator import build_test_data, extract_features
from fanet.evaluation import evaluate_features
from fanet.weights import sha256_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OSNET = SHARED / "weights" / "osnet_x0_25_msmt17.onnx"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def rank_metrics(query: np.ndarray, gallery: np.ndarray, dataset) -> dict[str, float]:
    q_pids = np.array([s.pid for s in dataset.query])
    g_pids = np.array([s.pid for s in dataset.gallery])
    q_cams = np.array([s.camid for s in dataset.query])
    g_cams = np.array([s.camid for s in dataset.gallery])
    result = evaluate_features(query, gallery, q_pids, g_pids, q_cams, g_cams)
    ranks = {f"R{k}": float(result.cmc[k - 1]) for k in (1, 5, 10)}
    return ranks | {"mAP": float(result.mAP)}


def score_distribution(query: np.ndarray, gallery: np.ndarray, dataset) -> dict[str, object]:
    """Cosine scores of query-gallery pairs: same person seen by another camera vs different people."""
    q_pids = np.array([s.pid for s in dataset.query])
    g_pids = np.array([s.pid for s in dataset.gallery])
    q_cams = np.array([s.camid for s in dataset.query])
    g_cams = np.array([s.camid for s in dataset.gallery])
    scores = query @ gallery.T
    same = (q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :])
    different = q_pids[:, None] != g_pids[None, :]
    return pair_score_summary(scores[same], scores[different])


def app_features(weights: str, samples) -> tuple[np.ndarray, float]:
    """Features from reid_app's Embedder over images read the app's way (OpenCV, BGR)."""
    from reid_app.embed import Embedder  # noqa: PLC0415

    embedder = Embedder(weights, device="cpu", batch_size=64)
    crops = [cv2.imread(s.path, cv2.IMREAD_COLOR) for s in samples]
    start = time.perf_counter()
    features = embedder.embed(crops)
    return features, len(crops) / (time.perf_counter() - start)


def osnet_features(samples, threads: int, batch: int = 64) -> tuple[np.ndarray, float]:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(OSNET), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = []
    for sample in samples:
        with Image.open(sample.path) as image:
            images.append(resize_rgb(image, 256, 128).numpy())
    images = (np.stack(images) - IMAGENET_MEAN) / IMAGENET_STD
    start = time.perf_counter()
    out = np.concatenate([session.run(None, {name: images[i : i + batch].astype(np.float32)})[0]
                          for i in range(0, len(images), batch)])
    speed = len(images) / (time.perf_counter() - start)
    return out / np.linalg.norm(out, axis=1, keepdims=True), speed


def osnet_report(dataset, threads: int) -> dict[str, object]:
    osnet_query, _ = osnet_features(dataset.query, threads)
    osnet_gallery, osnet_speed = osnet_features(dataset.gallery, threads)
    return rank_metrics(osnet_query, osnet_gallery, dataset) | {
        "img_per_s": osnet_speed, "note": "trained on MSMT17: cross-domain on CUHK03; 256x128, no flip",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="FA-Net checkpoint (omit with --osnet-only)")
    parser.add_argument("--osnet-only", action="store_true", help="only the OSNet peer's figures")
    parser.add_argument("--data-root", default=str(SHARED / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-osnet", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.osnet_only:
        dataset = build_dataset(DatasetName.CUHK03, args.data_root)
        print("osnet     :", osnet_report(dataset, args.threads), flush=True)
        return
    if not args.weights:
        parser.error("--weights is required (or --osnet-only)")

    payload = read_checkpoint(args.weights)
    height, width = checkpoint_input_size(payload)
    report: dict[str, object] = {
        "weights": args.weights, "sha256": sha256_file(args.weights), "input_size": [height, width],
        "meta": payload.get("meta", {}), "threads": args.threads,
    }
    dataset = build_dataset(DatasetName.CUHK03, args.data_root)
    data = DataConfig(dataset=DatasetName.CUHK03, root=args.data_root, height=height, width=width, workers=0)

    # 1. The trainer's evaluator (PIL loading, the test transform, flip-averaged features).
    model = load_inference_model(args.weights).eval()
    query_loader, gallery_loader = build_test_data(data, train_dataset=dataset)
    start = time.perf_counter()
    evaluator_query = extract_features(model, query_loader).features.numpy()
    evaluator_gallery = extract_features(model, gallery_loader).features.numpy()
    report["evaluator"] = rank_metrics(evaluator_query, evaluator_gallery, dataset)
    report["evaluator"]["seconds"] = time.perf_counter() - start
    print("evaluator :", report["evaluator"], flush=True)

    # 2. The app's embedder (OpenCV reading, BGR crops, the app's preprocessing).
    app_query, _ = app_features(args.weights, dataset.query)
    app_gallery, app_speed = app_features(args.weights, dataset.gallery)
    report["app"] = rank_metrics(app_query, app_gallery, dataset)
    report["app"]["max_abs_feature_diff"] = float(
        max(np.abs(app_query - evaluator_query).max(), np.abs(app_gallery - evaluator_gallery).max())
    )
    report["app"]["embed_img_per_s_with_flip"] = app_speed
    print("app       :", report["app"], flush=True)

    report["scores"] = score_distribution(app_query, app_gallery, dataset)
    print("scores    :", json.dumps(report["scores"], indent=1), flush=True)

    if not args.skip_osnet:
        report["osnet_x0_25_msmt17"] = osnet_report(dataset, args.threads)
        print("osnet     :", report["osnet_x0_25_msmt17"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
