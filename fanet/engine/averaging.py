"""Weight averaging of training checkpoints of one model (a "model soup", Wortsman et al., ICML
2022; stochastic weight averaging, Izmailov et al., UAI 2018).

Checkpoints that descend from one another (``--init-from`` stages, the ends of successive
learning-rate cycles) lie in one basin of the loss, and their uniform average is usually a flatter
point that ranks people better than any of them — on cameras never seen as well as on the
training domain. The result is a training checkpoint (every weight, classifiers included), so a
further stage can start from it (``--init-from``) and ``export`` writes its inference model; it
carries no optimiser state, so it cannot be resumed.

:func:`toward_pretrained` moves the backbone part of such weights back towards the backbone's
pretrained weights (WiSE-FT, Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022):
fine-tuning on a few training cameras pulls a re-ID-trained backbone towards them, and a weighted
mean of the fine-tuned and the pretrained backbone keeps much of what the pretraining knew about
cameras never seen. The averaged BatchNorm statistics are not those of the averaged weights; a
stage started from the result can re-estimate them first (``train --recalibrate-bn``,
:func:`fanet.engine.recalibration.recalibrate_batchnorm`).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fanet.checkpoint import CheckpointError, state_dict_mismatch
from fanet.config import FANetConfig, config_from_dict, model_config_differences
from fanet.engine.trainer import read_training_checkpoint
from fanet.model import FANet

#: Training-state entries of the last checkpoint that do not describe the averaged weights.
RUN_STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng", "iteration")


def average_checkpoints(
    paths: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None = None
) -> dict[str, Any]:
    """The average of the weights of two or more training checkpoints of one architecture (same
    model config, number of identities and cameras, tensor names and shapes): uniform, or with
    ``weights`` (one positive number per checkpoint, normalised to sum to 1 — e.g. ``1, 3`` puts a
    quarter of the way from the second checkpoint to the first, a trade between two stages' ends
    that a uniform soup cannot make). Floating-point tensors are averaged in float32; integer
    buffers (BatchNorm's batch counters) and everything else come from the last checkpoint, whose
    run the average continues. ``averaged_from`` lists the inputs (file name, epoch and, when
    weighted, the share)."""
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two training checkpoints")
    shares = _normalised_shares(weights, len(paths))
    payloads = [read_training_checkpoint(path) for path in paths]
    first_path, first = paths[0], payloads[0]
    for path, payload in zip(paths[1:], payloads[1:], strict=True):
        _check_same_model(first, first_path, payload, path)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in payloads[-1]["state_dict"].items():
        if tensor.is_floating_point():
            parts = (share * p["state_dict"][name].float() for share, p in zip(shares, payloads, strict=True))
            state[name] = sum(parts).to(tensor.dtype)
        else:
            state[name] = tensor.clone()
    averaged = {k: v for k, v in payloads[-1].items() if k not in (*RUN_STATE_KEYS, "best_map")}
    averaged["state_dict"] = state
    averaged["averaged_from"] = [
        {"source": Path(path).name, "epoch": int(payload.get("epoch", 0))}
        | ({} if weights is None else {"share": round(share, 6)})
        for path, payload, share in zip(paths, payloads, shares, strict=True)
    ]
    return averaged


def _normalised_shares(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise CheckpointError(f"{len(weights)} averaging weights for {count} checkpoints: give one per checkpoint")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise CheckpointError(f"averaging weights must be positive numbers, got {', '.join(map(str, weights))}")
    total = math.fsum(weights)
    return [w / total for w in weights]


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


def toward_pretrained(
    payload: dict[str, Any], weights_file: str | os.PathLike[str], weight: float, source: str | None = None
) -> dict[str, Any]:
    """``payload`` (a training checkpoint, e.g. an average; ``source`` names it) with every
    floating-point tensor of its backbone modules replaced by ``(1 - weight) * fine_tuned + weight *
    pretrained``, the pretrained tensors read from ``weights_file`` as training does
    (``--pretrained``); FA-Net's own layers (TEM, stripe embeddings, classifiers) are kept. Records
    ``toward_pretrained``; the source run's best mAP, which these weights do not have, is dropped."""
    if not 0.0 < weight < 1.0:
        raise CheckpointError(f"the pretrained weight must be between 0 and 1 (exclusive), got {weight}")
    try:
        config = config_from_dict(FANetConfig, payload["config"])
        counts = int(payload["num_classes"]), int(payload["num_cameras"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source or 'the checkpoint'} has an unreadable model config ({exc})") from None
    try:
        model = FANet(config, *counts, imagenet_weights=weights_file)
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{weights_file} is not a weights file of the {config.backbone.value} backbone "
            f"({state_dict_mismatch(exc)})"
        ) from None
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        # The same network loading the checkpoint checks it against the architecture.
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{source or 'the checkpoint'} does not match the FA-Net architecture ({state_dict_mismatch(exc)})"
        ) from None
    state = dict(payload["state_dict"])
    for name, tensor in state.items():
        if name.split(".", 1)[0] in FANet.BACKBONE_MODULES and tensor.is_floating_point():
            state[name] = ((1 - weight) * tensor.float() + weight * start[name].float()).to(tensor.dtype)
    moved = {k: v for k, v in payload.items() if k not in (*RUN_STATE_KEYS, "best_map")}
    moved["state_dict"] = state
    moved["toward_pretrained"] = {"source": Path(weights_file).name, "weight": weight}
    if source is not None:
        moved["toward_pretrained"]["from"] = Path(source).name
    return moved
