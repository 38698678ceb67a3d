"""External re-ID models (OpenVINO IR or ONNX) behind one call: 0-1 RGB batches in, l2-normalised features out.

Used to score peers next to FA-Net (``benchmarks/dg_report.py``) and, later, as a distillation
teacher handed to training: ``model(images)`` takes the (N, 3, H, W) 0-1 RGB float batches the
FA-Net data pipeline produces and returns (N, D) float32 CPU features, so the caller never sees
which runtime runs or what input the network expects.

**Input conventions** differ between exporters and are not written in the files, so each model is
given one explicitly (:class:`InputConvention`); the default follows the file:

* ``.xml`` (OpenVINO IR, Intel Open Model Zoo ``person-reidentification-retail-02xx``):
  ``BGR_255`` — BGR, values 0..255, no mean/std (the OMZ model cards and
  ``../shared/weights/openvino_omz_person_reid/PROVENANCE.md``).
* ``.onnx`` (torchreid exports such as ``osnet_x0_25_msmt17.onnx``): ``RGB_IMAGENET`` — RGB /255,
  then ImageNet mean/std. FA-Net's own ONNX exports take ``RGB_01`` (their normalisation is inside).

A wrong convention does not fail, it only scores worse, so pass it when a file is not one of these.

**Runtime**: ``.xml`` runs on OpenVINO; ``.onnx`` on onnxruntime by default, or on OpenVINO with
``backend="openvino"`` (needed for ``person-reidentification-retail-0267.onnx``, on which
onnxruntime returns NaN: non-finite output is refused with a message saying so). OpenVINO models are
reshaped to a dynamic batch. OpenVINO is asked for float32 inference (``precision="f32"``): on CPUs
with bf16 support it otherwise runs in bf16 by default, and the features (and the figures) would
depend on the CPU. Measured on the DG protocol, bf16 moves the OMZ models' figures by up to 0.6
points (0288: DG mean R1 55.4 f32, 54.8 bf16) and runs 1.5-2x faster; ``precision=None`` keeps
the runtime's default (e.g. for a teacher, where speed matters more than the last digit).

**Flip averaging** (the mean of the image's and its mirror's features, as FA-Net is evaluated) is
off by default: the peers' published figures are without it, and a teacher should give the
features of the very image the student sees. ``flip=True`` turns it on.

Images of another size than :attr:`ExternalReIDModel.input_size` are resized to it (bilinear,
antialiased) before the network; the DG evaluation loads them at that size already.
"""

from __future__ import annotations

import functools
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
#: The input size assumed when the file leaves the height or width open.
DEFAULT_INPUT_SIZE = (256, 128)


class InputConvention(StrEnum):
    """What the network expects, starting from a 0-1 RGB image."""

    BGR_255 = "bgr255"  # Intel OMZ person re-ID models: BGR, 0..255, no mean/std
    RGB_IMAGENET = "rgb-imagenet"  # torchreid exports: RGB, /255, ImageNet mean/std
    RGB_255 = "rgb255"  # RGB, 0..255, no mean/std
    RGB_01 = "rgb01"  # RGB, 0..1 (FA-Net exports: the model normalises)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """``images`` (N, 3, H, W) 0-1 RGB float32 → the network's input (a new float32 array)."""
        if self is InputConvention.BGR_255:
            return np.ascontiguousarray(images[:, ::-1] * np.float32(255.0))
        if self is InputConvention.RGB_IMAGENET:
            return (images - IMAGENET_MEAN) / IMAGENET_STD
        if self is InputConvention.RGB_255:
            return images * np.float32(255.0)
        return images.copy()


class Backend(StrEnum):
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"


def default_convention(path: str | Path) -> InputConvention:
    """The convention a file is run with when none is given (see the module docstring)."""
    return InputConvention.BGR_255 if Path(path).suffix.lower() == ".xml" else InputConvention.RGB_IMAGENET


def default_backend(path: str | Path) -> Backend:
    return Backend.OPENVINO if Path(path).suffix.lower() == ".xml" else Backend.ONNXRUNTIME


def _static_size(dims: list[object]) -> tuple[int, int] | None:
    height, width = dims[2], dims[3]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


@functools.cache
def openvino_core() -> Any:
    """The process's one OpenVINO runtime. Why one: each ``ov.Core`` loads the device plugins and
    unloads them when collected, while models compiled by it may live on; created per model and
    freed at the garbage collector's whim, cores crashed the test process (SIGSEGV) much later."""
    import openvino as ov  # noqa: PLC0415 (an optional dependency)

    return ov.Core()


class ExternalReIDModel:
    """An OpenVINO IR (``.xml``) or ONNX (``.onnx``) re-ID model as a callable on 0-1 RGB batches.

    ``model(images)``: (N, 3, H, W) 0-1 RGB float tensor (any device) → (N, D) l2-normalised
    float32 CPU tensor, in batches of ``batch_size``. ``input_size`` is the network's (height,
    width); ``feature_dim`` its output size; ``threads`` caps the runtime's CPU threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        convention: InputConvention | str | None = None,
        backend: Backend | str | None = None,
        flip: bool = False,
        batch_size: int = 64,
        threads: int | None = None,
        input_size: tuple[int, int] | None = None,
        precision: str | None = "f32",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"re-ID model not found: {self.path}")
        if self.path.suffix.lower() not in (".xml", ".onnx"):
            raise ValueError(f"{self.path}: expected an OpenVINO IR (.xml) or an ONNX file (.onnx)")
        self.convention = InputConvention(convention) if convention is not None else default_convention(self.path)
        self.backend = Backend(backend) if backend is not None else default_backend(self.path)
        if self.backend is Backend.ONNXRUNTIME and self.path.suffix.lower() == ".xml":
            raise ValueError(f"{self.path}: onnxruntime cannot read an OpenVINO IR; use backend='openvino'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.flip = flip
        self.batch_size = batch_size
        if self.backend is Backend.OPENVINO:
            file_size = self._load_openvino(threads, precision)
        else:
            file_size = self._load_onnxruntime(threads)
        self.input_size: tuple[int, int] = input_size or file_size or DEFAULT_INPUT_SIZE
        if file_size is not None and input_size is not None and tuple(input_size) != file_size:
            raise ValueError(f"{self.path} takes {file_size[0]}x{file_size[1]} images, not {input_size}")
        self.feature_dim: int = self._infer(np.zeros((1, 3, *self.input_size), dtype=np.float32)).shape[1]

    def _load_openvino(self, threads: int | None, precision: str | None) -> tuple[int, int] | None:
        try:
            core = openvino_core()
        except ImportError:
            raise ValueError(f"{self.path.name} needs the 'openvino' package: pip install openvino") from None
        model = core.read_model(str(self.path))
        if len(model.inputs) != 1:
            raise ValueError(f"{self.path}: expected one input image tensor, found {len(model.inputs)} inputs")
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise ValueError(f"{self.path}: expected an (N, 3, H, W) input, found {shape}")
        dims = [d.get_length() if d.is_static else None for d in shape]
        size = _static_size(dims)
        height, width = size or DEFAULT_INPUT_SIZE
        model.reshape([-1, 3, height, width])  # OMZ files are saved for batch 1
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(model, "CPU", config)
        return size

    def _load_onnxruntime(self, threads: int | None) -> tuple[int, int] | None:
        try:
            import onnxruntime as ort  # noqa: PLC0415 (an optional dependency)
        except ImportError:
            raise ValueError(f"{self.path.name} needs the 'onnxruntime' package: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: exports carry unused initialisers it warns about one by one
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for foreign files
            raise ValueError(f"{self.path} is not a readable ONNX model ({type(exc).__name__})") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{self.path}: expected one (N, 3, H, W) input")
        self._input_name = inputs[0].name
        batch = inputs[0].shape[0]
        if isinstance(batch, int):  # an export with a fixed batch size (the OMZ sources: 1)
            if batch != 1:
                raise ValueError(f"{self.path}: a fixed batch size of {batch} is not supported (export a dynamic one)")
            self.batch_size = 1
        return _static_size(list(inputs[0].shape))

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output for an already converted (N, 3, H, W) float32 batch."""
        if self.backend is Backend.OPENVINO:
            output = self._compiled(batch)[0]
        else:
            output = self._session.run(None, {self._input_name: batch})[0]
        output = np.asarray(output, dtype=np.float32).reshape(len(batch), -1)
        if not np.isfinite(output).all():
            raise ValueError(
                f"{self.path.name} returned non-finite features on {self.backend.value}"
                + ("; try backend='openvino'" if self.backend is Backend.ONNXRUNTIME else "")
            )
        return output

    def raw(self, images: np.ndarray) -> np.ndarray:
        """The network's own output for (N, 3, H, W) 0-1 RGB float32 images at :attr:`input_size`:
        no flip, no normalisation, in batches of ``batch_size``."""
        outputs = [
            self._infer(self.convention.apply(images[start : start + self.batch_size]))
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(outputs) if outputs else np.empty((0, self.feature_dim), dtype=np.float32)

    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) 0-1 RGB images → (N, D) l2-normalised float32 numpy features."""
        if isinstance(images, torch.Tensor):
            images = images.detach().to("cpu", torch.float32)
            if tuple(images.shape[-2:]) != self.input_size and images.ndim == 4 and len(images):
                images = functional.interpolate(
                    images, size=self.input_size, mode="bilinear", align_corners=False, antialias=True
                )
            images = images.numpy()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {images.shape}")
        if tuple(images.shape[2:]) != self.input_size:
            raise ValueError(
                f"{self.path.name} takes {self.input_size[0]}x{self.input_size[1]} images, got "
                f"{images.shape[2]}x{images.shape[3]} (pass a torch tensor to have it resized)"
            )
        outputs = []
        # With flip, each pass holds half a batch of images and their mirrors: one call of 2n
        # images is cheaper than two of n (a single search crop: 1 call of 2, not 2 calls of 1).
        step = max(1, self.batch_size // 2) if self.flip else self.batch_size
        for start in range(0, len(images), step):
            batch = images[start : start + step]
            if self.flip and self.batch_size > 1:
                both = self._infer(self.convention.apply(np.concatenate([batch, batch[..., ::-1]])))
                features = both[: len(batch)] + both[len(batch) :]
            elif self.flip:  # a fixed batch-1 network
                features = self._infer(self.convention.apply(batch)) + self._infer(
                    self.convention.apply(batch[..., ::-1])
                )
            else:
                features = self._infer(self.convention.apply(batch))
            outputs.append(features)
        if not outputs:
            return np.empty((0, self.feature_dim), dtype=np.float32)
        features = np.concatenate(outputs)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher interface: (N, 3, H, W) 0-1 RGB tensor → (N, D) float32 CPU tensor."""
        return torch.from_numpy(self.embed(images))

    def __repr__(self) -> str:
        return (
            f"ExternalReIDModel({self.path.name!r}, backend={self.backend.value}, convention={self.convention.value}, "
            f"input_size={self.input_size}, flip={self.flip})"
        )
