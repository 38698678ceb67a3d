"""CPU embedding speed of the shipped FA-Net next to the OSNet x0.25 peer (onnxruntime).

    .venv/bin/python benchmarks/reid_speed.py [--threads 2] [--height 256 --width 128]

The input size is the checkpoint's own (256x128 for the shipped model); ``--height/--width`` run
the same network at another size (what a model trained at that size would cost).

Random pixels (speed does not depend on content), 64 images a round, the mean over 5 rounds
after one warm-up round. FA-Net runs through :func:`fanet.embed_images`, the app's and the
evaluator's path (channels-last passes of 32 images on the CPU): once with one pass per image, as
OSNet runs, and once flip-averaged (two passes per image), as the app embeds crops.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fanet.checkpoint import checkpoint_input_size, load_inference_model, read_checkpoint
from fanet.inference import embed_images
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
    parser.add_argument(
        "--weights", nargs="+", default=[str(REPO_WEIGHTS_DIR / "fanet_mobilenetv2_cuhk03.pt")],
        help="one or more FA-Net checkpoints, timed in this run (default: the shipped model)",
    )
    parser.add_argument("--height", type=int, help="default: the checkpoint's input height")
    parser.add_argument("--width", type=int, help="default: the checkpoint's input width")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for weights in args.weights:
        model = load_inference_model(weights).eval()
        own_height, own_width = checkpoint_input_size(read_checkpoint(weights))
        height, width = args.height or own_height, args.width or own_width
        fanet_batch = torch.rand(64, 3, height, width)
        name = f"FA-Net ({model.config.backbone.value}, {height}x{width}, {Path(weights).name}, PyTorch"
        for flip, label in ((False, "one pass"), (True, "flip-averaged, as the app embeds")):
            fanet_speed = images_per_second(lambda m=model, b=fanet_batch, flip=flip: embed_images(m, b, flip=flip), 64)
            print(f"{name}, {label}): {fanet_speed:.0f} img/s on {args.threads} threads")

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
