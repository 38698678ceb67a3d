"""How far INT8 post-training quantisation moves an FA-Net's features, and how much faster it runs.

    .venv/bin/python benchmarks/int8_probe.py [--weights FILE] [--method minmax|percentile|entropy]
        [--calibration 256] [--threads 2]

A probe for issue 20's ``--int8`` (not the acceptance check, which must score CUHK03 and the DG
protocol): the checkpoint's cached float32 export (:mod:`reid_app.backends`) is quantised with ONNX
Runtime's static quantisation (QDQ, per-channel int8 weights, uint8 activations), calibrated on
``--calibration`` crops of PETA's CAVIAR4REID (a training set, never a DG test set). Printed: the
cosine between the int8 and float32 features (flip-averaged, 64 VIPeR crops: min and mean) and
img/s at batch 32 of float32 and int8 on ONNX Runtime and OpenVINO (OpenVINO runs the QDQ graph
in int8 itself).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from fanet.inference import preprocess_bgr
from fanet.weights import REPO_WEIGHTS_DIR
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS, Embedder
from reid_app.external_model import ExternalReIDModel, InputConvention

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "peta_reid" / "images"
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def load(folder: Path, count: int, step: int, size: tuple[int, int]) -> np.ndarray:
    files = sorted(folder.iterdir())[::step][:count]
    return preprocess_bgr([cv2.imread(str(f)) for f in files], *size).numpy()


def speed(run, images: np.ndarray, repeats: int = 5) -> float:
    run(images)
    start = time.perf_counter()
    for _ in range(repeats):
        run(images)
    return len(images) * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS))
    parser.add_argument("--method", choices=sorted(METHODS), default="minmax")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    embedder = Embedder(args.weights, device="cpu", backend="onnxruntime", warn=print)
    if embedder.exported_graph is None:
        raise SystemExit("no float32 export to quantise (see the warning above)")
    size = embedder.input_size
    calibration = load(IMAGES / "CAVIAR4REID", args.calibration, 4, size)
    test = load(IMAGES / "VIPeR", 64, 1, size)
    with tempfile.TemporaryDirectory() as folder:
        prepared, quantised = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(str(embedder.exported_graph.path), str(prepared), skip_symbolic_shape=True)
        started = time.perf_counter()
        quantize_static(
            str(prepared), str(quantised), Batches(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=METHODS[args.method],
        )  # fmt: skip
        print(
            f"{Path(args.weights).name}: {args.method} calibration on {len(calibration)} CAVIAR4REID crops, "
            f"quantised in {time.perf_counter() - started:.0f} s; {args.threads} threads"
        )
        reference = embedder.exported_graph.embed(test)
        print(f"{'runtime':<14}{'fp32 img/s@32':>15}{'int8 img/s@32':>15}{'cos min':>10}{'cos mean':>10}")
        for runtime in ("onnxruntime", "openvino"):
            def graph(path: Path, runtime: str = runtime) -> ExternalReIDModel:
                return ExternalReIDModel(
                    path, convention=InputConvention.RGB_01, backend=runtime, flip=True, batch_size=32,
                    threads=args.threads, input_size=size,
                )  # fmt: skip

            fp32, int8 = graph(embedder.exported_graph.path), graph(quantised)
            cosine = (int8.embed(test) * reference).sum(axis=1)
            print(
                f"{runtime:<14}{speed(fp32.raw, test[:32]):>15.0f}{speed(int8.raw, test[:32]):>15.0f}"
                f"{cosine.min():>10.4f}{cosine.mean():>10.4f}"
            )


if __name__ == "__main__":
    main()
