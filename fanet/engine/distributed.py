"""Multi-process training helpers for ``torchrun`` (one process per GPU, any number of nodes).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain
``python`` run has none of them and trains in one process. NCCL is used on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False  # True when this context created the group (and must end it)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0


def select_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(requested_device: str = "auto") -> DistContext:
    """Join the process group described by the ``torchrun`` environment, if any."""
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(requested_device, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        owns_process_group=owns,
    )


def shutdown(context: DistContext) -> None:
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.is_distributed:
        dist.barrier()


def all_reduce_mean(values: dict[str, float], context: DistContext) -> dict[str, float]:
    """Average scalar statistics over the processes (every rank gets the same numbers)."""
    if not context.is_distributed or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= context.world_size
    return dict(zip(keys, tensor.tolist(), strict=True))


def all_gather_objects(value: Any, context: DistContext) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, context: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    if not context.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
