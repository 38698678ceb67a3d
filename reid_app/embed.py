"""Person crops → FA-Net foreground features (the re-ID embedding stored and searched).

The embedder says what it is: ``model_name`` and ``weights_sha256`` identify the weights (a
database refuses vectors from another model), and :meth:`Embedder.warning` states plainly when
the model has not been trained for re-identification, so that commands can print it every run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fanet.centring import CameraCentring
from fanet.checkpoint import (
    CheckpointError,
    checkpoint_input_size,
    model_from_checkpoint,
    read_checkpoint,
    state_dict_sha256,
    untrained_inference_model,
)
from fanet.inference import embed_images, preprocess_bgr
from fanet.weights import WeightsNotFoundError, resolve_weights, sha256_file
from reid_app.backends import InferenceBackend, Warn, load_runtime
from reid_app.calibration import Thresholds
from reid_app.errors import ReidAppError

#: The FA-Net shipped in weights/ (OSNet x0.5 backbone, trained on CUHK03 + PETA; see weights/README.md).
DEFAULT_EMBEDDER_WEIGHTS = "fanet_osnet_cuhk03_peta.pt"
DEFAULT_EMBEDDER_SOURCE = (
    "the repository's weights/ folder (a fresh clone has it), or your own: `reid-app train` then "
    "`reid-app export --checkpoint RUN/best.pt --inference-checkpoint FILE` and --weights FILE"
)
logger = logging.getLogger(__name__)

UNTRAINED = "untrained"
UNTRAINED_SEED = 0


def resolve_torch_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; an unusable explicit choice is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ReidAppError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ReidAppError(f"device {device!r} asked for, but no CUDA GPU is available here")
    return chosen


class Embedder:
    """FA-Net foreground branch over BGR person crops.

    ``weights``: a path to an FA-Net checkpoint, None for the shipped ``fanet_osnet_cuhk03_peta.pt`` in the weights
    folders (``$REID_WEIGHTS_DIR``, then ``weights/``), or ``"untrained"`` for a seeded
    random-init model (pipeline demos only). ``input_size`` is (height, width); None takes it
    from the checkpoint's metadata, else 384×128 (the paper's size). ``batch_size`` crops are
    resized at a time (bounding memory); the forward passes are sized by
    :func:`fanet.inference.embed_images` for the device.

    A checkpoint written by ``reid-app adapt`` may hold its site's camera means
    (:mod:`fanet.centring`): :meth:`embed` then takes each crop's camera mean away (the site's mean
    for a crop of unknown camera, such as a query photo); :attr:`centring` holds them.

    ``backend`` picks the runtime (:mod:`reid_app.backends`: ``auto``, ``torch``,
    ``onnxruntime``, ``openvino``); :attr:`backend` says which one runs. ``warn`` receives the one
    line said when a backend falls back to PyTorch. ``int8`` runs the checkpoint's int8 graph that
    ``reid-app quantize`` accepted (:mod:`reid_app.quantize`) on an ONNX backend; :attr:`precision`
    says which precision runs.
    """

    def __init__(
        self,
        weights: str | None,
        device: str = "auto",
        batch_size: int = 32,
        input_size: tuple[int, int] | None = None,
        backend: str | InferenceBackend = InferenceBackend.AUTO,
        warn: Warn = logger.warning,
        int8: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ReidAppError(f"embedding batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._device = resolve_torch_device(device)
        self.metadata: dict[str, Any] = {}
        payload: dict[str, Any] = {}  # the untrained model has none: the paper's input size applies
        if weights is not None and weights.strip().lower() == UNTRAINED:
            model = untrained_inference_model(seed=UNTRAINED_SEED)
            self.model_name = f"fanet-untrained-seed{UNTRAINED_SEED}"
            self.weights_path: Path | None = None
            self.weights_sha256 = state_dict_sha256(model)
            self.is_trained = False
        else:
            path = _resolve_checkpoint(weights)
            try:
                payload = read_checkpoint(path, map_location="cpu")
                model = model_from_checkpoint(payload, source=str(path))
            except (CheckpointError, FileNotFoundError) as exc:
                raise ReidAppError(str(exc)) from None
            self.metadata = dict(payload.get("meta") or {})
            self.model_name = path.name
            self.weights_path = path
            self.weights_sha256 = sha256_file(path)
            # An exported file is a trained model unless its metadata says it saw no training at all.
            self.is_trained = self.metadata.get("epochs_trained", 1) != 0
        self.centring = CameraCentring.from_meta(self.metadata)
        #: The default thresholds for this model's scores (its own when ``adapt`` calibrated them).
        self.thresholds = Thresholds.of_model(self.metadata)
        self.input_size = tuple(input_size or checkpoint_input_size(payload))
        self.model = model.to(self._device).eval()
        self.dim: int = int(model.feature_dim)
        self.precision = "int8" if int8 else "float32"
        self.backend, self.exported_graph = load_runtime(
            backend, self._device, model, self.weights_path, self.weights_sha256, self.input_size, warn, int8
        )

    @property
    def device(self) -> str:
        return str(self._device)

    def warning(self) -> str | None:
        """A plain one-line statement when matches from this model are not meaningful, else None."""
        if not self.is_trained:
            return (
                f"embedding model '{self.model_name}' is NOT trained for re-identification: matches are not meaningful"
            )
        return None

    def embed(self, crops_bgr: list[np.ndarray], cameras: Sequence[str | int | None] | None = None) -> np.ndarray:
        """(N, dim) float32 l2-normalised features of BGR uint8 crops (any sizes). ``cameras``: the
        camera id of each crop (None where unknown), used when the model holds camera means."""
        if len(crops_bgr) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if cameras is not None and len(cameras) != len(crops_bgr):
            raise ValueError(f"{len(cameras)} camera ids for {len(crops_bgr)} crops")
        height, width = self.input_size
        chunks = []
        # Preprocess batch by batch: a whole video's crops at 384×128 would not fit in memory.
        for start in range(0, len(crops_bgr), self.batch_size):
            try:
                images = preprocess_bgr(crops_bgr[start : start + self.batch_size], height=height, width=width)
            except ValueError as exc:
                raise ReidAppError(f"cannot embed crop batch starting at {start}: {exc}") from None
            if self.exported_graph is not None:
                chunks.append(self.exported_graph.embed(images.numpy()))
            else:
                features = embed_images(self.model, images, flip=True)
                chunks.append(features.numpy().astype(np.float32, copy=False))
        features = np.concatenate(chunks)
        if self.centring is None:
            return features
        return self.centring.apply(features, None if cameras is None else [_camera_key(c) for c in cameras])

    def __repr__(self) -> str:
        return (
            f"Embedder({self.model_name!r}, dim={self.dim}, device={self.device}, backend={self.backend.value}, "
            f"precision={self.precision}, trained={self.is_trained}, "
            f"camera_means={0 if self.centring is None else len(self.centring.cameras)})"
        )


def _camera_key(camera: str | int | None) -> str | None:
    """Camera ids as the centring stores them (the tracklet folders' names): ``3`` and ``"3"`` agree."""
    return None if camera is None else str(camera)


def _resolve_checkpoint(weights: str | None) -> Path:
    # An explicit path is reported under its own name; otherwise the default file is looked for.
    name = Path(weights).name if weights is not None else DEFAULT_EMBEDDER_WEIGHTS
    try:
        return resolve_weights(name, weights, source=DEFAULT_EMBEDDER_SOURCE)
    except WeightsNotFoundError as exc:
        raise ReidAppError(str(exc)) from None
