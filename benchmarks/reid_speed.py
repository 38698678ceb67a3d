"""CPU embedding speed of FA-Net checkpoints on every inference backend, next to the OSNet x0.25 peer.

    .venv/bin/python benchmarks/reid_speed.py [--weights A.pt B.pt] [--threads 2] [--height 256 --width 128]

For each checkpoint (default: the shipped model) and each installed backend (PyTorch, ONNX Runtime,
OpenVINO in float32, and OpenVINO in bfloat16 where the CPU has it), in one run:

* ``img/s @1`` and ``img/s @32``: the network alone, one pass over random pixels (speed does not
  depend on content) at batch 1 and 32, the mean over 5 rounds after a warm-up round;
* ``crops/s``: as the app embeds them — :class:`reid_app.embed.Embedder` over 64 real pedestrian
  crops of mixed sizes (PETA's VIPeR, GRID, PRID, i-LIDS), resize and flip averaging included.

The input size is the checkpoint's own; ``--height/--width`` run the same network at another size
(what a model trained at that size would cost; the app rows are then skipped). Each Embedder
exports its graph on first use (cached beside the checkpoint), which is not timed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from fanet.checkpoint import checkpoint_input_size, read_checkpoint
from fanet.inference import embed_images
from fanet.weights import REPO_WEIGHTS_DIR
from reid_app.backends import InferenceBackend, is_installed
from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS, Embedder
from reid_app.external_model import ExternalReIDModel, InputConvention
from reid_app.quantize import accepted_int8_graph

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OSNET = SHARED / "weights" / "osnet_x0_25_msmt17.onnx"
CROP_SETS = ("VIPeR", "GRID", "PRID", "i-LID")


def images_per_second(run: Callable[[], object], images: int, repeats: int = 5) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return images * repeats / (time.perf_counter() - start)


def real_crops(count: int = 64) -> list[np.ndarray]:
    folder = SHARED / "data" / "peta_reid" / "images"
    files = [f for name in CROP_SETS for f in sorted((folder / name).iterdir())[: count // len(CROP_SETS)]]
    return [cv2.imread(str(f)) for f in files]


def cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--weights", nargs="+", default=[str(REPO_WEIGHTS_DIR / DEFAULT_EMBEDDER_WEIGHTS)],
        help="one or more FA-Net checkpoints, timed in this run (default: the shipped model)",
    )  # fmt: skip
    parser.add_argument("--height", type=int, help="default: the checkpoint's input height")
    parser.add_argument("--width", type=int, help="default: the checkpoint's input width")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    crops = real_crops()
    backends = (InferenceBackend.TORCH, InferenceBackend.ONNXRUNTIME, InferenceBackend.OPENVINO)
    print(f"{args.threads} threads; {len(crops)} real crops for the app column")
    print(f"{'model':<44}{'backend':<18}{'img/s @1':>10}{'img/s @32':>11}{'crops/s':>10}")
    for weights in args.weights:
        own = checkpoint_input_size(read_checkpoint(weights))
        height, width = args.height or own[0], args.width or own[1]
        resized = (height, width) != tuple(own)
        for backend in (b for b in backends if is_installed(b)):
            embedder = Embedder(weights, device="cpu", backend=backend, input_size=(height, width), warn=print)
            if embedder.backend is not backend:
                continue  # said by the warning line
            label = f"{embedder.model.config.backbone.value} {height}x{width} {Path(weights).name}"[:43]
            variants: list[tuple[str, Callable[[np.ndarray], object]]] = []
            app_embedders = {}
            if embedder.exported_graph is None:
                model = embedder.model

                def torch_pass(images: np.ndarray, model: torch.nn.Module = model) -> object:
                    return embed_images(model, torch.from_numpy(images), flip=False, batch_size=len(images))

                variants.append(("torch f32", torch_pass))
            else:
                graph = embedder.exported_graph
                variants.append((f"{backend.value} f32", graph.raw))
                if backend is InferenceBackend.OPENVINO and cpu_has_bf16():
                    bf16 = ExternalReIDModel(
                        graph.path, convention=InputConvention.RGB_01, backend="openvino", batch_size=32,
                        threads=args.threads, input_size=(height, width), precision="bf16",
                    )  # fmt: skip
                    variants.append(("openvino bf16", bf16.raw))
                int8_graph = accepted_int8_graph(graph.path, embedder.weights_sha256)
                if int8_graph is not None:  # `reid-app quantize` accepted one for these weights
                    int8 = Embedder(weights, device="cpu", backend=backend, input_size=(height, width), int8=True)
                    assert int8.exported_graph is not None
                    variants.append((f"{backend.value} int8", int8.exported_graph.raw))
                    app_embedders[f"{backend.value} int8"] = int8
            for name, run in variants:
                single = np.random.rand(1, 3, height, width).astype(np.float32)
                batch = np.random.rand(32, 3, height, width).astype(np.float32)
                at_one = images_per_second(lambda run=run, x=single: run(x), 1, repeats=20)
                at_32 = images_per_second(lambda run=run, x=batch: run(x), 32)
                app = "-"
                app_embedder = embedder if name.endswith("f32") else app_embedders.get(name)
                if app_embedder is not None and not resized:
                    app = f"{images_per_second(lambda e=app_embedder: e.embed(crops), len(crops), repeats=3):.0f}"
                print(f"{label:<44}{name:<18}{at_one:>10.0f}{at_32:>11.0f}{app:>10}")

    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(OSNET), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    osnet_batch = np.random.rand(32, 3, 256, 128).astype(np.float32)
    osnet_speed = images_per_second(lambda: session.run(None, {name: osnet_batch}), 32)
    print(f"{'OSNet x0.25 256x128 (peer)':<44}{'onnxruntime f32':<18}{'':>10}{osnet_speed:>11.0f}{'':>10}")


if __name__ == "__main__":
    main()
