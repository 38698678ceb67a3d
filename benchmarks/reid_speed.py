"""CPU embedding speed of the shipped FA-Net next to the OSNet x0.25 peer (onnxruntime).

    .venv/bin/python benchmarks/reid_speed.py [--threads 2] [--height 256 --width 128]

``--height/--width`` run the same network on another input size (what a model trained at that
size would cost; the shipped one is trained at 128x64).

Batch 64, random pixels (speed does not depend on content), the mean over 5 batches after
one warm-up batch; one forward pass each (the app's flip-averaged embedding runs FA-Net twice).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fanet.checkpoint import load_inference_model
from fanet.weights import REPO_WEIGHTS_DIR

OSNET = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "osnet_x0_25_msmt17.onnx"


def images_per_second(run, batch: int, repeats: int = 5) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=str(REPO_WEIGHTS_DIR / "fanet_mobilenetv2_cuhk03.pt"))
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_inference_model(args.weights).eval()
    fanet_batch = torch.rand(64, 3, args.height, args.width)
    with torch.no_grad():
        fanet_speed = images_per_second(lambda: model(fanet_batch), 64)
    size = f"{args.height}x{args.width}"
    print(f"FA-Net (MobileNetV2, {size}, PyTorch): {fanet_speed:.0f} img/s on {args.threads} threads")

    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(OSNET), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    osnet_batch = np.random.rand(64, 3, 256, 128).astype(np.float32)
    osnet_speed = images_per_second(lambda: session.run(None, {name: osnet_batch}), 64)
    print(f"OSNet x0.25 (256x128, onnxruntime): {osnet_speed:.0f} img/s on {args.threads} threads")


if __name__ == "__main__":
    main()
