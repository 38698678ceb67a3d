"""The paper's learning-rate schedule (Sec. IV-B): linear warmup from 0.06 to 0.6 over the first
10 epochs, then x0.1 at epochs 40 and 80. Stepped once per epoch.

Every parameter group follows the same curve scaled by its own base lr, so the pretrained
ResNet50 group (0.1x) warms up from 0.006 to 0.06 while the new layers go from 0.06 to 0.6.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fanet.config import SolverConfig


def lr_factor(
    epoch: int,
    *,
    base_lr: float,
    warmup_start_lr: float,
    warmup_epochs: int,
    milestones: Sequence[int],
    gamma: float,
) -> float:
    """Multiplier of a group's base lr at ``epoch`` (0-based)."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        start = warmup_start_lr / base_lr
        warmup = start + (1.0 - start) * epoch / warmup_epochs
    else:
        warmup = 1.0
    return warmup * gamma ** bisect_right(list(milestones), epoch)


class WarmupMultiStepLR(LRScheduler):
    """Epoch-based warmup + multi-step decay. ``scheduler.step()`` once after each epoch.

    Its ``state_dict`` holds only numbers, lists and tuples, so training checkpoints load with
    ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        base_lr: float,
        warmup_start_lr: float,
        warmup_epochs: int,
        milestones: Sequence[int],
        gamma: float,
        last_epoch: int = -1,
    ) -> None:
        if base_lr <= 0:
            raise ValueError(f"base_lr must be positive, got {base_lr}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.base_lr = float(base_lr)
        self.warmup_start_lr = float(warmup_start_lr)
        self.warmup_epochs = int(warmup_epochs)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_config(cls, optimizer: Optimizer, solver: SolverConfig) -> WarmupMultiStepLR:
        return cls(
            optimizer,
            base_lr=solver.base_lr,
            warmup_start_lr=solver.warmup_start_lr,
            warmup_epochs=solver.warmup_epochs,
            milestones=solver.milestones,
            gamma=solver.gamma,
        )

    def factor(self, epoch: int) -> float:
        return lr_factor(
            epoch,
            base_lr=self.base_lr,
            warmup_start_lr=self.warmup_start_lr,
            warmup_epochs=self.warmup_epochs,
            milestones=self.milestones,
            gamma=self.gamma,
        )

    def get_lr(self) -> list[float]:
        # Closed form in the epoch: resuming only needs last_epoch, and nothing accumulates
        # rounding errors over 100 epochs.
        factor = self.factor(max(self.last_epoch, 0))
        return [base * factor for base in self.base_lrs]
