"""Training-step throughput (images/s) of the Table I variants: forward, FA-Net loss, backward and
SGD step on random 0-1 images, the trainer's settings (two lr groups, AMP on CUDA).

    .venv/bin/python benchmarks/train_speed.py --device cpu --height 128 --width 64 --batch-p 4 --batch-k 2
    .venv/bin/python benchmarks/train_speed.py --device cuda            # the paper's 384x128, 16x8
    .venv/bin/python benchmarks/train_speed.py --device cpu --backbone mobilenetv2 --height 256 \
        --width 128 --batch-p 16 --batch-k 4 --threads 2 --cpu-bf16     # the trainer's --cpu-bf16

Weights are random (speed does not depend on them); camera and person labels are random too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fanet import FANet, FANetConfig, FANetLoss
from fanet.config import SolverConfig, Variant


def step_rate(variant: str, device: torch.device, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    num_classes, num_cameras = 751, 6  # Market-1501's training set
    config = FANetConfig.variant(variant, backbone=args.backbone)
    model = FANet(config, num_classes=num_classes, num_cameras=num_cameras).to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    criterion = FANetLoss(config)
    solver = SolverConfig()
    optimizer = torch.optim.SGD(
        [{"params": model.pretrained_parameters(), "lr": solver.base_lr * solver.pretrained_lr_mult},
         {"params": model.new_parameters(), "lr": solver.base_lr}],
        lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay,
    )
    amp = device.type == "cuda"
    cpu_bf16 = args.cpu_bf16 and device.type == "cpu"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    batch = args.batch_p * args.batch_k
    images = torch.rand(batch, 3, args.height, args.width, device=device).contiguous(memory_format=memory_format)
    pids = torch.arange(args.batch_p, device=device).repeat_interleave(args.batch_k)
    camids = torch.randint(0, num_cameras, (batch,), device=device)
    rates = []
    for step in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16 if cpu_bf16 else torch.float16, enabled=amp or cpu_bf16):
            loss = criterion(model(images), pids, camids)["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=[Variant.BASELINE.value, Variant.FANET.value],
                        choices=[v.value for v in Variant])
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-p", type=int, default=16)
    parser.add_argument("--batch-k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backbone", default="resnet50", choices=["resnet50", "mobilenetv2"])
    parser.add_argument("--cpu-bf16", action="store_true", help="bfloat16 autocast on the CPU (train --cpu-bf16)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC model and images (no gain under --cpu-bf16, so the trainer has no such switch)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{device}, input {args.height}x{args.width}, batch {args.batch_p}x{args.batch_k}, "
          f"median of {args.iters} steps, {args.backbone}, "
          f"AMP {'float16' if device.type == 'cuda' else 'bfloat16' if args.cpu_bf16 else 'off'}"
          f"{', channels_last' if args.channels_last else ''}")
    for variant in args.variants:
        print(f"  {variant:<14} {step_rate(variant, device, args):8.1f} img/s")


if __name__ == "__main__":
    main()
