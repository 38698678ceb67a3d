"""Weight averaging of training checkpoints of one model (a "model soup", Wortsman et al., ICML
2022; stochastic weight averaging, Izmailov et al., UAI 2018).

Checkpoints that descend from one another (``--init-from`` stages, the ends of successive
learning-rate cycles) lie in one basin of the loss, and their uniform average is usually a flatter
point that ranks people better than any of them — on cameras never seen as well as on the
training domain. The result is a training checkpoint (every weight, classifiers included), so a
further stage can start from it (``--init-from``) and ``export`` writes its inference model; it
carries no optimiser state, so it cannot be resumed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fanet.checkpoint import CheckpointError
from fanet.config import model_config_differences
from fanet.engine.trainer import read_training_checkpoint

#: Training-state entries of the last checkpoint that do not describe the averaged weights.
RUN_STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng", "iteration")


def average_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """The uniform average of the weights of two or more training checkpoints of one
    architecture (same model config, number of identities and cameras, tensor names and shapes).
    Floating-point tensors are averaged in float32; integer buffers (BatchNorm's batch counters)
    and everything else come from the last checkpoint, whose run the average continues.
    ``averaged_from`` lists the inputs (file name and epoch)."""
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two training checkpoints")
    payloads = [read_training_checkpoint(path) for path in paths]
    first_path, first = paths[0], payloads[0]
    for path, payload in zip(paths[1:], payloads[1:], strict=True):
        _check_same_model(first, first_path, payload, path)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in payloads[-1]["state_dict"].items():
        if tensor.is_floating_point():
            total = sum(payload["state_dict"][name].float() for payload in payloads)
            state[name] = (total / len(payloads)).to(tensor.dtype)
        else:
            state[name] = tensor.clone()
    averaged = {k: v for k, v in payloads[-1].items() if k not in RUN_STATE_KEYS}
    averaged["state_dict"] = state
    averaged["averaged_from"] = [
        {"source": Path(path).name, "epoch": int(payload.get("epoch", 0))}
        for path, payload in zip(paths, payloads, strict=True)
    ]
    return averaged


def _check_same_model(first: dict[str, Any], first_path: object, other: dict[str, Any], path: object) -> None:
    try:
        changed = model_config_differences(other["config"], first["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an unreadable model config ({exc})") from None
    if changed:
        raise CheckpointError(f"{path} is another model than {first_path} (differs in {', '.join(changed)})")
    for key in ("num_classes", "num_cameras"):
        if first.get(key) != other.get(key):
            raise CheckpointError(
                f"{path} was trained with {key} {other.get(key)}, {first_path} with {first.get(key)}: not one model"
            )
    ours, theirs = first["state_dict"], other["state_dict"]
    if set(ours) != set(theirs):
        name = sorted(set(ours) ^ set(theirs))[0]
        raise CheckpointError(f"{path} and {first_path} hold different tensors (e.g. {name})")
    for name, tensor in ours.items():
        if tensor.shape != theirs[name].shape:
            raise CheckpointError(
                f"{path} and {first_path} differ in the shape of {name} "
                f"({tuple(theirs[name].shape)} vs {tuple(tensor.shape)})"
            )
