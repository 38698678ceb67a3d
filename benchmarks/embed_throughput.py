"""Embedding throughput of FA-Net inference vs a bare ResNet50, same run, same inputs.

FA-Net at test time runs the low-level module and the foreground branch only (ResNet50 with
last stride 1) plus TEM and horizontal pyramid pooling. The reference is torchvision's ResNet50
with the same last stride 1, cut after global average pooling (2048-d). Both take 0-1 RGB
images and normalise them with the ImageNet mean/std inside, so the difference is FA-Net's own
heads. Weights are random: throughput does not depend on their values.

Measurements of the two models are interleaved (A B A B ...) and the median per model is
reported, so background load on the machine hits both alike. Goal: overhead <= 10%.

    .venv/bin/python benchmarks/embed_throughput.py --device cpu --batch-size 16 --iters 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import Tensor, nn

from fanet import FANet, FANetConfig
from fanet.config import IMAGENET_MEAN, IMAGENET_STD


class ResNet50GAP(nn.Module):
    """torchvision ResNet50, last stride 1, global average pooling output (N, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        resnet.layer4[0].conv2.stride = (1, 1)
        resnet.layer4[0].downsample[0].stride = (1, 1)
        resnet.fc = nn.Identity()
        self.resnet = resnet
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.resnet((images - self.mean) / self.std)


def images_per_second(model: nn.Module, images: Tensor, amp: bool) -> float:
    device = images.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return images.shape[0] / (time.perf_counter() - start)


def benchmark(device: torch.device, batch_size: int, iters: int, warmup: int, height: int, width: int,
              amp: bool) -> dict[str, float]:
    torch.manual_seed(0)
    models = {
        "FA-Net (foreground branch, TEM + HPP)": FANet(FANetConfig(), num_classes=0, num_cameras=0),
        "ResNet50 last-stride-1 + GAP": ResNet50GAP(),
    }
    models = {name: model.to(device).eval() for name, model in models.items()}
    images = torch.rand(batch_size, 3, height, width, device=device)
    for _ in range(warmup):
        for model in models.values():
            images_per_second(model, images, amp)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(iters):
        for name, model in models.items():
            samples[name].append(images_per_second(model, images, amp))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, plus cuda when available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10, help="timed batches per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [args.device]
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"input {args.height}x{args.width}, batch {args.batch_size}, {args.iters} timed batches per model "
          f"(median), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name in devices:
        device = torch.device(name)
        amp = device.type == "cuda"
        label = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)}, AMP fp16)" if amp else "")
        results = benchmark(device, args.batch_size, args.iters, args.warmup, args.height, args.width, amp)
        fanet_rate, resnet_rate = results.values()
        print(f"[{label}]")
        for model_name, rate in results.items():
            print(f"  {model_name:<40} {rate:9.1f} img/s")
        overhead = (resnet_rate / fanet_rate - 1.0) * 100.0
        verdict = "within" if overhead <= 10.0 else "over"
        print(f"  FA-Net time overhead vs ResNet50: {overhead:+.1f}% ({verdict} the 10% goal)")


if __name__ == "__main__":
    main()
