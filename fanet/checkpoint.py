"""FA-Net checkpoint files.

An *inference* checkpoint holds the model config and the weights inference runs (low-level
module, foreground branch, TEM, stripe embeddings) — the background branch and classifiers are
dropped. Files are read with ``torch.load(weights_only=True)``: no pickled code is executed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from fanet.config import DataConfig, FANetConfig, config_from_dict, model_config_to_dict
from fanet.model import FANet

CHECKPOINT_FORMAT = "fanet"
CHECKPOINT_VERSION = 1
INFERENCE_KIND = "inference"
TRAINING_KIND = "training"
#: Largest input side a checkpoint may ask for (a person crop; more would exhaust memory per batch).
MAX_INPUT_SIDE = 1024


class CheckpointError(ValueError):
    """A file that is not a usable FA-Net checkpoint (one-line message)."""


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)
_KEY_LIST = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)")


def state_dict_mismatch(exc: BaseException) -> str:
    """A short, whole sentence for why weights do not load: torch's ``load_state_dict`` message
    (hundreds of keys long) summarised as counts and a first example, never cut mid-word."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    parts = []
    sizes = _SIZE_MISMATCH.findall(text)
    if sizes:
        name, stored, expected = sizes[0]
        more = f" and {len(sizes) - 1} more tensor(s)" if len(sizes) > 1 else ""
        parts.append(f"{name} has shape [{stored}] in the file but [{expected}] in the model{more}")
    for kind, keys in _KEY_LIST.findall(text):
        names = re.findall(r'"([^"]+)"', keys)
        if names:
            parts.append(f"{len(names)} {kind.lower()} tensor(s), e.g. {names[0]}")
    return "; ".join(parts) if parts else text.splitlines()[0]


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate the header of an FA-Net checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        # torch's first sentence says what is wrong; the rest (advice on weights_only) is not for a user.
        detail = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable FA-Net checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an FA-Net checkpoint (no 'format: fanet' header)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has FA-Net checkpoint version {payload.get('version')!r}; this build reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return payload


def checkpoint_input_size(payload: dict[str, Any]) -> tuple[int, int]:
    """(height, width) the checkpoint's model was trained at: from a training checkpoint's config
    or an inference checkpoint's metadata, else the paper's 384 x 128."""
    train_config = payload.get("train_config")
    data = train_config.get("data") if isinstance(train_config, dict) else None
    if isinstance(data, dict) and "height" in data and "width" in data:
        return _input_size(data["height"], data["width"], "train_config.data height/width")
    meta = payload.get("meta")
    size = meta.get("input_size") if isinstance(meta, dict) else None
    if size:
        if not isinstance(size, list | tuple) or len(size) != 2:
            raise CheckpointError(f"the checkpoint's meta.input_size is {size!r}, not [height, width]")
        return _input_size(size[0], size[1], "meta.input_size")
    return DataConfig.height, DataConfig.width


def _input_size(height: object, width: object, where: str) -> tuple[int, int]:
    """A stored (height, width), checked: positive integers up to MAX_INPUT_SIDE."""
    if not all(type(v) is int and 1 <= v <= MAX_INPUT_SIDE for v in (height, width)):
        raise CheckpointError(
            f"the checkpoint's {where} is {height!r} x {width!r}, not two integers from 1 to {MAX_INPUT_SIDE}"
        )
    return height, width


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint") -> FANet:
    try:
        config = config_from_dict(FANetConfig, payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has an incompatible model config: {exc}") from None
    weights = payload.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{source} holds no weights (its 'state_dict' is missing or not a mapping)")
    model = FANet(config, num_classes=0, num_cameras=0)
    state = {k: v for k, v in weights.items() if _is_inference_key(k)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source} does not match the FA-Net architecture ({state_dict_mismatch(exc)})") from None
    if missing or unexpected:
        sample = (missing or unexpected)[:3]
        raise CheckpointError(
            f"{source} does not match the FA-Net architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {', '.join(sample)})"
        )
    return model.eval()


def load_inference_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> FANet:
    """The foreground-only FA-Net stored in ``path`` (an inference or a training checkpoint)."""
    return model_from_checkpoint(read_checkpoint(path, map_location), source=str(path))


def _is_inference_key(key: str) -> bool:
    return not key.startswith(("background_branch.", "background_pooling.", "person_classifiers.",
                               "camera_classifiers."))


def inference_state(model: FANet, half: bool = False) -> dict[str, Any]:
    """The payload of an inference checkpoint for ``model``; ``half`` stores floating-point
    tensors as float16 (half the file; loading casts them back to the model's float32)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if _is_inference_key(k)}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": INFERENCE_KIND,
        "config": model_config_to_dict(model.config),
        "state_dict": state,
    }


def save_inference_checkpoint(model: FANet, path: str | os.PathLike[str], half: bool = False, **meta: Any) -> Path:
    """Write the foreground-only checkpoint atomically (temp file + rename)."""
    payload = inference_state(model, half=half)
    payload["meta"] = meta
    return save_atomically(payload, path)


def save_atomically(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def untrained_inference_model(seed: int = 0, config: FANetConfig | None = None) -> FANet:
    """A deterministic random-init FA-Net, for pipeline demos and tests only: it has not learnt
    re-identification, and callers must say so."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FANet(config or FANetConfig(), num_classes=0, num_cameras=0)
    return model.eval()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A content hash of the weights (names, shapes and values), stable across machines."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        value = tensor.detach().cpu().contiguous()
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()
