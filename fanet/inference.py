"""Embedding images with the foreground branch: preprocessing, flip averaging, l2 normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image
from torch import Tensor, nn

from fanet.data.transforms import resize_rgb


def preprocess_bgr(crops: Sequence[np.ndarray], height: int = 384, width: int = 128) -> Tensor:
    """OpenCV-style BGR uint8 crops → a (N, 3, height, width) 0-1 RGB float batch.

    The resize is the training/evaluation one (:func:`fanet.data.transforms.resize_rgb`, PIL
    bilinear), so the app embeds a crop exactly as the evaluator embedded the test images.
    """
    batch = torch.empty((len(crops), 3, height, width), dtype=torch.float32)
    for i, crop in enumerate(crops):
        if crop.ndim != 3 or crop.shape[2] != 3 or min(crop.shape[:2]) < 1 or crop.dtype != np.uint8:
            raise ValueError(
                f"crop {i} has shape {crop.shape} and dtype {crop.dtype}; expected a non-empty (H, W, 3) uint8 image"
            )
        batch[i] = resize_rgb(Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1])), height, width)
    return batch


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: Tensor,
    *,
    flip: bool = True,
    batch_size: int = 64,
    amp: bool | None = None,
) -> Tensor:
    """Features of 0-1 RGB ``images`` (N, 3, H, W): the mean of the image's and its horizontal
    mirror's features when ``flip`` (Sec. IV-B), l2-normalised so a dot product is the cosine
    similarity. ``amp`` defaults to on for CUDA models. Returns float32 on the CPU."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    use_amp = device.type == "cuda" if amp is None else amp and device.type == "cuda"
    outputs = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                if flip:
                    # One forward pass over the images and their mirrors: in eval mode the batch
                    # rows are independent, and one call of twice the size is cheaper than two.
                    both = model(torch.cat([batch, batch.flip(-1)])).float()
                    features = both[: len(batch)] + both[len(batch) :]
                else:
                    features = model(batch).float()
            outputs.append(functional.normalize(features, dim=1).cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty((0, getattr(model, "feature_dim", 0)), dtype=torch.float32)
    return torch.cat(outputs)
