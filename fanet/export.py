"""ONNX export of the inference model: the low-level module and the foreground branch (no
background branch, no classifiers), as run by :func:`fanet.embed_images` without flipping.

The graph takes 0-1 RGB images (N, 3, H, W) — normalisation by the ImageNet mean/std is inside
it — and returns the un-normalised features (N, 3840 for FA-Net with HPP); the batch axis is
dynamic. Needs the ``onnx`` and ``onnxscript`` packages (dev extras); ``verify_onnx`` needs
``onnxruntime``.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from fanet.model import FANet

INPUT_NAME = "images"
OUTPUT_NAME = "features"
DEFAULT_OPSET = 18


def inference_copy(model: FANet) -> FANet:
    """A CPU float32 eval-mode copy of ``model`` without what inference does not run."""
    clone = copy.deepcopy(model).cpu().float().eval()
    clone.drop_background()
    return clone


def export_onnx(
    model: FANet,
    path: str | os.PathLike[str],
    *,
    height: int = 384,
    width: int = 128,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model``'s inference graph to ``path``; returns the path."""
    import onnx  # noqa: F401, PLC0415 (fail early with ImportError when the extra is missing)

    exported = inference_copy(model)
    example = torch.rand(2, 3, height, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about internal decompositions
        program = torch.onnx.export(
            exported,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    return path


def verify_onnx(
    path: str | os.PathLike[str],
    model: FANet,
    *,
    height: int = 384,
    width: int = 128,
    batch_sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
) -> float:
    """Largest absolute difference between onnxruntime and PyTorch features on random images
    of each batch size in ``batch_sizes`` (also checks the dynamic batch axis)."""
    import onnxruntime  # noqa: PLC0415

    reference = inference_copy(model)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch_size in batch_sizes:
        images = torch.rand(batch_size, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = reference(images).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        if actual.shape != expected.shape:
            raise ValueError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
        worst = max(worst, float(np.abs(actual - expected).max()))
    return worst
