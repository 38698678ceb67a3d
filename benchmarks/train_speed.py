"""Training-step throughput (images/s) of the Table I variants: forward, FA-Net loss, backward and
SGD step on random 0-1 images, the trainer's settings (two lr groups, AMP on CUDA).

    .venv/bin/python benchmarks/train_speed.py --device cpu --height 128 --width 64 --batch-p 4 --batch-k 2
    .venv/bin/python benchmarks/train_speed.py --device cuda            # the paper's 384x128, 16x8

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
    config = FANetConfig.variant(variant)
    model = FANet(config, num_classes=num_classes, num_cameras=num_cameras).to(device).train()
    criterion = FANetLoss(config)
    solver = SolverConfig()
    optimizer = torch.optim.SGD(
        [{"params": model.pretrained_parameters(), "lr": solver.base_lr * solver.pretrained_lr_mult},
         {"params": model.new_parameters(), "lr": solver.base_lr}],
        lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay,
    )
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    batch = args.batch_p * args.batch_k
    images = torch.rand(batch, 3, args.height, args.width, device=device)
    pids = torch.arange(args.batch_p, device=device).repeat_interleave(args.batch_k)
    camids = torch.randint(0, num_cameras, (batch,), device=device)
    rates = []
    for step in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{device}, input {args.height}x{args.width}, batch {args.batch_p}x{args.batch_k}, "
          f"median of {args.iters} steps, AMP {'on' if device.type == 'cuda' else 'off'}")
    for variant in args.variants:
        print(f"  {variant:<14} {step_rate(variant, device, args):8.1f} img/s")


if __name__ == "__main__":
    main()
