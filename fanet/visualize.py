"""Fig. 7-style pictures of what FA-Net looks at.

One column per image; rows: the input X, the foreground features F, the foreground mask Z^f,
the background features B and the background mask Z^b = 1 - Z^f, each map up-sampled to the
image, coloured with a jet colour map and blended over the image. Feature maps are shown as
their per-position l2 energy (:meth:`fanet.model.FANet.attention_maps`), min-max scaled per
image; masks are shown on their own 0-1 scale. Pure numpy + PIL (no matplotlib, no OpenCV).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image, ImageDraw
from torch import Tensor

from fanet.model import FANet

ROW_ORDER = ("X", "F", "Z", "B", "1-Z")
# Jet: blue -> cyan -> yellow -> red, as piecewise-linear ramps of the three channels.
_JET_KNOTS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RED = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.5])
_JET_GREEN = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
_JET_BLUE = np.array([0.5, 1.0, 1.0, 0.0, 0.0, 0.0])


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB of shape ``values.shape + (3,)``."""
    clipped = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    channels = [np.interp(clipped, _JET_KNOTS, ramp) for ramp in (_JET_RED, _JET_GREEN, _JET_BLUE)]
    return np.round(np.stack(channels, axis=-1) * 255.0).astype(np.uint8)


def _min_max(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scale = (high - low).clamp_min(1e-12)
    return (maps - low[:, None, None, None]) / scale[:, None, None, None]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured ``heat`` (H, W) in [0, 1] over a uint8 RGB ``image`` (H, W, 3)."""
    coloured = jet_colormap(heat).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * coloured
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


@torch.no_grad()
def attention_rows(model: FANet, images: Tensor) -> dict[str, np.ndarray]:
    """Row name → (N, H, W, 3) uint8 panels for 0-1 RGB ``images`` (N, 3, H, W). Rows a model
    cannot produce (Z without TEM; B and 1-Z without the background branch) are left out."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        maps = model.attention_maps(images.to(device))
    finally:
        model.train(was_training)
    height, width = images.shape[-2:]
    pictures = (images.clamp(0, 1) * 255.0).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    def upsample(values: Tensor) -> np.ndarray:
        resized = functional.interpolate(values.float().cpu(), size=(height, width), mode="bilinear",
                                         align_corners=False)
        return resized[:, 0].numpy()

    heats: dict[str, np.ndarray] = {"F": upsample(_min_max(maps["F"]))}
    if "Z" in maps:
        heats["Z"] = upsample(maps["Z"])
    if "B" in maps:
        heats["B"] = upsample(_min_max(maps["B"]))
        if "Z" in maps:
            heats["1-Z"] = upsample(1.0 - maps["Z"])
    rows = {"X": pictures}
    for name in ROW_ORDER[1:]:
        if name in heats:
            rows[name] = np.stack([overlay(p, h) for p, h in zip(pictures, heats[name], strict=True)])
    return rows


def attention_grid(model: FANet, images: Tensor, padding: int = 2, label_width: int = 28) -> Image.Image:
    """The grid as a PIL image: a label column, then one column per image, one row per map."""
    rows = attention_rows(model, images)
    count, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    grid_width = label_width + count * (width + padding) + padding
    grid_height = len(rows) * (height + padding) + padding
    grid = Image.new("RGB", (grid_width, grid_height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row_index, (name, panels) in enumerate(rows.items()):
        top = padding + row_index * (height + padding)
        draw.text((4, top + height // 2 - 5), name, fill=(0, 0, 0))
        for column, panel in enumerate(panels):
            grid.paste(Image.fromarray(panel), (label_width + padding + column * (width + padding), top))
    return grid


def load_images(paths: Sequence[str | os.PathLike[str]], height: int, width: int) -> Tensor:
    """Image files → a (N, 3, height, width) 0-1 RGB batch (bilinear resize, as in training)."""
    batch = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        except OSError as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
        batch.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0)
    if not batch:
        raise ValueError("no images given")
    return torch.stack(batch)


def save_attention_grid(
    model: FANet,
    image_paths: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    height: int = 384,
    width: int = 128,
) -> list[str]:
    """Write the grid of ``image_paths`` to the PNG ``output``; returns the rows drawn."""
    images = load_images(image_paths, height, width)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    attention_grid(model, images).save(output, format="PNG")
    return list(attention_rows_names(model))


def attention_rows_names(model: FANet) -> list[str]:
    """The rows :func:`attention_grid` draws for ``model``."""
    names = ["X", "F"]
    has_mask = model.target_enhancement is not None
    if has_mask:
        names.append("Z")
    if model.background_branch is not None:
        names.append("B")
        if has_mask:
            names.append("1-Z")
    return names
