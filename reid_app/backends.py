"""Which runtime runs the embedder's network: PyTorch, ONNX Runtime or OpenVINO, chosen once at load.

The network is the same in every backend: the checkpoint's FA-Net foreground branch, as
:func:`fanet.export.export_onnx` writes it (0-1 RGB in, normalisation inside, raw features out).
:class:`reid_app.embed.Embedder` preprocesses crops with one shared function
(:func:`fanet.inference.preprocess_bgr`), hands the batch to the backend, and gets l2-normalised,
flip-averaged features back; the rest of the app never sees which backend ran.

**Choosing** (``--backend``, :func:`choose_backend`): ``auto`` is PyTorch on a CUDA device (AMP), else
the first installed of :data:`CPU_PREFERENCE`. The order is measured, not guessed: on this project's
2-core CPU (``benchmarks/reid_speed.py``, figures in benchmarks/RESULTS.md) ONNX Runtime embedded 184
img/s with the MobileNetV2 FA-Net and 217 with the OSNet one (passes of 32, float32), OpenVINO 177 and
186, PyTorch 65 and 62. The ONNX backends run on the CPU only; asking for one with a CUDA device is
an error rather than a silent move.

**The exported graph** is built from the checkpoint on first use and cached beside it, named by the
checkpoint file's sha256 and the input size (``fanet_osnet_cuhk03_peta.<sha256[:16]>.256x128.onnx``),
so a changed checkpoint never reuses a stale export. It is written atomically (a temporary file,
then a rename: concurrent processes at worst export twice). Each time a graph is loaded its
features are compared with PyTorch's on two fixed images (cosine >= :data:`AGREEMENT`): a corrupt
cached file is exported again; a checkpoint folder that cannot be written (a read-only install)
sends the export to the user's cache folder (:func:`user_cache_dir`); a graph that can be written
nowhere, or does not agree, falls back to PyTorch. Each of these says one warning line. The seeded
untrained demo model always runs on PyTorch (it has no file to cache beside).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from reid_app.errors import ReidAppError

if TYPE_CHECKING:
    from fanet.model import FANet
    from reid_app.external_model import ExternalReIDModel

logger = logging.getLogger(__name__)


class InferenceBackend(StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


#: CPU backends, fastest first (measured: see the module docstring).
CPU_PREFERENCE = (InferenceBackend.ONNXRUNTIME, InferenceBackend.OPENVINO, InferenceBackend.TORCH)
#: Packages each backend needs besides torch (the ONNX export needs onnx and onnxscript).
REQUIRED_PACKAGES = {
    InferenceBackend.TORCH: (),
    InferenceBackend.ONNXRUNTIME: ("onnxruntime", "onnx", "onnxscript"),
    InferenceBackend.OPENVINO: ("openvino", "onnx", "onnxscript"),
}
#: Lowest cosine similarity between an exported graph's features and PyTorch's that is accepted.
AGREEMENT = 0.9999
#: Images per pass of an exported graph (16 crops and their mirrors): passes of 32 were the fastest
#: of 1-128 for both runtimes on 2 cores.
EXPORTED_PASS_IMAGES = 32

Warn = Callable[[str], None]
#: Folder for exports when the checkpoint's own folder is read-only (see :func:`user_cache_dir`).
CACHE_DIR_ENV = "REID_APP_CACHE_DIR"
BACKEND_HELP = (
    "Runtime of the re-ID network: auto (PyTorch on a GPU, else the fastest installed CPU runtime), "
    + ", ".join(b.value for b in InferenceBackend if b is not InferenceBackend.AUTO)
    + "."
)


INT8_HELP = (
    "Embed with the int8 graph `reid-app quantize` accepted for these weights (CPU runtimes; ~2x the "
    "float32 speed, within 1 point of its CUHK03 and DG figures)."
)


def backend_names() -> str:
    return ", ".join(b.value for b in InferenceBackend)


def parse_backend(value: str | InferenceBackend) -> InferenceBackend:
    try:
        return InferenceBackend(str(value).strip().lower())
    except ValueError:
        raise ReidAppError(f"unknown inference backend {str(value)[:40]!r} (use {backend_names()})") from None


def _missing_packages(backend: InferenceBackend, required: Mapping[InferenceBackend, tuple[str, ...]]) -> list[str]:
    return [name for name in required[backend] if importlib.util.find_spec(name) is None]


def is_installed(
    backend: InferenceBackend, required: Mapping[InferenceBackend, tuple[str, ...]] = REQUIRED_PACKAGES
) -> bool:
    return not _missing_packages(backend, required)


def _require_installed(backend: InferenceBackend, required: Mapping[InferenceBackend, tuple[str, ...]]) -> None:
    missing = _missing_packages(backend, required)
    if missing:
        packages = " ".join(missing)
        raise ReidAppError(f"backend {backend.value} needs packages that are not installed: pip install {packages}")


def choose_backend(requested: str | InferenceBackend, device: torch.device) -> InferenceBackend:
    """The backend that runs for ``requested`` on ``device`` (see the module docstring)."""
    backend = parse_backend(requested)
    if backend is InferenceBackend.AUTO:
        return InferenceBackend.TORCH if device.type != "cpu" else auto_backend_on_cpu()
    if backend is not InferenceBackend.TORCH:
        if device.type != "cpu":
            raise ReidAppError(f"backend {backend.value} runs on the CPU only; use --device cpu or --backend torch")
        _require_installed(backend, REQUIRED_PACKAGES)
    return backend


def auto_backend_on_cpu() -> InferenceBackend:
    """What ``auto`` runs on a machine without a GPU (said by ``reid-app stats``)."""
    return next(b for b in CPU_PREFERENCE if is_installed(b))


def backend_summary(running: InferenceBackend | None = None) -> dict[str, object]:
    """For ``stats``: the backend that runs (``running``, else what ``auto`` picks on this machine)
    and the backends installed, fastest CPU one first."""
    here = InferenceBackend.TORCH if torch.cuda.is_available() else auto_backend_on_cpu()
    return {
        "backend": (running or here).value,
        "installed": [b.value for b in CPU_PREFERENCE if is_installed(b)],
        "cuda": torch.cuda.is_available(),
    }


def exported_graph_path(checkpoint: Path, sha256: str, height: int, width: int) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.{sha256[:16]}.{height}x{width}.onnx")


def _export_atomically(model: FANet, path: Path, height: int, width: int) -> None:
    from fanet.export import export_onnx  # noqa: PLC0415 (needs onnx + onnxscript)

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        # The exporter prints its progress on stdout, which is the CLI's --json channel.
        with contextlib.redirect_stdout(io.StringIO()):
            export_onnx(model, temporary, height=height, width=width)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _agreement(graph: ExternalReIDModel, model: FANet, height: int, width: int) -> float:
    """Lowest cosine between ``graph``'s and PyTorch's (flip-averaged) features of two fixed random images."""
    from fanet.export import inference_copy  # noqa: PLC0415
    from fanet.inference import embed_images  # noqa: PLC0415

    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    expected = embed_images(inference_copy(model), images, flip=True).numpy()
    actual = graph.embed(images.numpy())
    return float((expected * actual).sum(axis=1).min())


def user_cache_dir() -> Path:
    """Where exports go when the checkpoint's folder cannot be written: ``$REID_APP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/reid-app/exports`` (``~/.cache/reid-app/exports``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "reid-app" / "exports"


def load_exported_graph(
    backend: InferenceBackend,
    model: FANet,
    checkpoint: Path,
    sha256: str,
    input_size: tuple[int, int],
    warn: Warn,
) -> ExternalReIDModel | None:
    """``model``'s cached export (built when missing or corrupt) running on ``backend``, flip-averaged
    as the app embeds; None, after one warning line, when PyTorch must run instead. The export is
    looked for beside the checkpoint, then in :func:`user_cache_dir` (where it is written, with
    one warning line, when the checkpoint's folder is read-only)."""
    from reid_app.external_model import ExternalReIDModel, InputConvention  # noqa: PLC0415

    height, width = input_size
    beside = exported_graph_path(checkpoint, sha256, height, width)
    elsewhere = user_cache_dir() / beside.name
    fallback = f"embedding with PyTorch instead of {backend.value}"

    def open_graph(path: Path) -> ExternalReIDModel:
        return ExternalReIDModel(
            path, convention=InputConvention.RGB_01, backend=backend.value, flip=True,
            batch_size=EXPORTED_PASS_IMAGES, threads=torch.get_num_threads(), input_size=input_size,
        )  # fmt: skip

    path = next((p for p in (beside, elsewhere) if p.is_file()), None)
    if path is not None:
        try:
            graph = open_graph(path)
            if _agreement(graph, model, height, width) >= AGREEMENT:
                return graph
            reason = "its features differ from PyTorch's"
        except (ValueError, RuntimeError, OSError) as exc:
            reason = f"unreadable: {type(exc).__name__}"
        warn(f"cached export {path} is stale or corrupt ({reason}): exporting it again")
    path = path or beside
    try:
        try:
            _export_atomically(model, path, height, width)
        except OSError as exc:
            if path == elsewhere:
                raise
            beside_error, path = exc.strerror, elsewhere
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _export_atomically(model, path, height, width)
            except OSError as second:
                warn(
                    f"cannot write the exported graph beside the checkpoint ({beside_error}) nor in "
                    f"{path.parent} ({second.strerror}); {fallback}"
                )
                return None
            warn(f"cannot write the exported graph beside the checkpoint ({beside_error}): cached in {path.parent}")
    except OSError as exc:
        warn(f"cannot write the exported graph in {path.parent} ({exc.strerror}); {fallback}")
        return None
    except Exception as exc:  # the exporter raises many types; any failure leaves PyTorch, which works
        warn(f"exporting {checkpoint.name} for {backend.value} failed ({type(exc).__name__}); {fallback}")
        return None
    try:
        graph = open_graph(path)
        agreement = _agreement(graph, model, height, width)
    except (ValueError, RuntimeError, OSError) as exc:
        warn(f"{backend.value} cannot run the exported graph ({type(exc).__name__}); {fallback}")
        return None
    if agreement < AGREEMENT:
        warn(f"{backend.value}'s features differ from PyTorch's (cosine {agreement:.6f}); {fallback}")
        return None
    return graph


def load_runtime(
    requested: str | InferenceBackend,
    device: torch.device,
    model: FANet,
    checkpoint: Path | None,
    sha256: str,
    input_size: tuple[int, int],
    warn: Warn,
    int8: bool = False,
) -> tuple[InferenceBackend, ExternalReIDModel | None]:
    """The backend that runs ``model`` and, unless it is PyTorch, its exported graph (the int8 one
    with ``int8``): the app's rule for the embedder and the evaluators. ``checkpoint`` None (the
    untrained demo model) runs on PyTorch."""
    backend = choose_backend(requested, device)
    if int8 and backend is InferenceBackend.TORCH:
        raise ReidAppError("--int8 runs on the CPU runtimes only: use --backend onnxruntime or openvino on the CPU")
    if int8 and checkpoint is None:
        raise ReidAppError("--int8 needs a trained checkpoint (the untrained demo model has no int8 graph)")
    if backend is InferenceBackend.TORCH or checkpoint is None:
        return InferenceBackend.TORCH, None
    graph = load_exported_graph(backend, model, checkpoint, sha256, input_size, warn)
    if graph is None:
        if int8:
            raise ReidAppError(f"--int8: {checkpoint.name} has no float32 export to start from (see above)")
        return InferenceBackend.TORCH, None
    if int8:
        graph = load_int8_graph(graph, sha256, checkpoint.name)
    return backend, graph


def load_int8_graph(float_graph: ExternalReIDModel, checkpoint_sha256: str, model_name: str) -> ExternalReIDModel:
    """The accepted int8 graph of ``float_graph``'s checkpoint on the same runtime and settings; a
    one-line error when ``reid-app quantize`` has not accepted one (:mod:`reid_app.quantize`)."""
    from reid_app.external_model import ExternalReIDModel  # noqa: PLC0415
    from reid_app.quantize import accepted_int8_graph  # noqa: PLC0415

    path = accepted_int8_graph(float_graph.path, checkpoint_sha256)
    if path is None:
        raise ReidAppError(
            f"no accepted int8 graph of {model_name}: make one with `reid-app quantize --weights "
            f"{model_name} --data-root DIR` (it is kept only if CUHK03 and DG stay within 1 point)"
        )
    return ExternalReIDModel(
        path, convention=float_graph.convention, backend=float_graph.backend.value, flip=float_graph.flip,
        batch_size=float_graph.batch_size, threads=torch.get_num_threads(), input_size=float_graph.input_size,
    )  # fmt: skip


class ExportedGraphModule(nn.Module):
    """An exported graph as a module mapping 0-1 RGB image batches to raw features, so the evaluators
    (which take "any module": :func:`fanet.inference.embed_images` does the flip) can score a backend."""

    def __init__(self, graph: ExternalReIDModel) -> None:
        super().__init__()
        self.graph = graph
        self.feature_dim = graph.feature_dim
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # embed_images reads the device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.graph.raw(images.detach().cpu().float().numpy()))


# -- the person detector ----------------------------------------------------------------------
#: CPU runtimes of the YOLO detector for ``auto``. Measured on 2 cores (YOLO11n-pose, 30 frames of
#: sample_videos/cam2, 640x480): PyTorch 86 ms a frame, ONNX Runtime 39 ms with PyTorch's boxes
#: (largest difference 6e-5 px), OpenVINO 24-26 ms but boxes up to 0.74 px and scores up to 0.009
#: away (it computes in bfloat16 on CPUs that have it, and Ultralytics does not let us ask for
#: float32). ``auto`` takes the fastest runtime that gives PyTorch's boxes; ``--backend openvino``
#: is there for whoever prefers the last 40 %.
DETECTOR_CPU_PREFERENCE = (InferenceBackend.ONNXRUNTIME, InferenceBackend.OPENVINO, InferenceBackend.TORCH)
#: What the detector's runtimes need: Ultralytics exports with its own code (ONNX: onnx; OpenVINO:
#: openvino alone).
DETECTOR_REQUIRED_PACKAGES = {
    InferenceBackend.TORCH: (),
    InferenceBackend.ONNXRUNTIME: ("onnxruntime", "onnx"),
    InferenceBackend.OPENVINO: ("openvino",),
}
#: Ultralytics' export format of each runtime.
DETECTOR_FORMATS = {InferenceBackend.ONNXRUNTIME: "onnx", InferenceBackend.OPENVINO: "openvino"}


@dataclass(frozen=True)
class DetectorExport:
    path: Path  # an .onnx file or an Ultralytics ``*_openvino_model`` folder
    source: Path  # the .pt it was exported from
    task: str  # "detect" or "pose"
    backend: str


def choose_detector_backend(requested: str | InferenceBackend) -> InferenceBackend:
    """The detector's runtime on the CPU for ``requested`` (``auto``: the first installed of
    :data:`DETECTOR_CPU_PREFERENCE`); an explicit one that is not installed is an error."""
    backend = parse_backend(requested)
    if backend is InferenceBackend.AUTO:
        return next(b for b in DETECTOR_CPU_PREFERENCE if is_installed(b, DETECTOR_REQUIRED_PACKAGES))
    _require_installed(backend, DETECTOR_REQUIRED_PACKAGES)
    return backend


def exported_detector_path(weights: Path, sha256: str, backend: InferenceBackend) -> Path:
    stem = f"{weights.stem}.{sha256[:16]}"
    return weights.with_name(f"{stem}.onnx" if backend is InferenceBackend.ONNXRUNTIME else f"{stem}_openvino_model")


def exported_detector(
    weights: Path, requested: str, task: str, warn: Warn = logger.warning
) -> DetectorExport | None:
    """Ultralytics' own export of the YOLO ``weights`` (already loaded once: a model of ``task``) for
    the chosen CPU runtime, cached beside the file by its sha256 (built on first use; dynamic input
    size, so the same letterboxed canvases as PyTorch's); None for PyTorch, or after one warning
    line when the export cannot be made."""
    from ultralytics import YOLO  # noqa: PLC0415

    from fanet.weights import sha256_file  # noqa: PLC0415

    backend = choose_detector_backend(requested)
    if backend is InferenceBackend.TORCH:
        return None
    path = exported_detector_path(weights, sha256_file(weights), backend)
    if path.exists():
        return DetectorExport(path, weights, task, backend.value)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{weights.stem}.export-", dir=weights.parent))
    except OSError as exc:
        warn(f"cannot write the detector's {backend.value} export beside {weights} ({exc.strerror}); using PyTorch")
        return None
    try:
        staged = staging / weights.name
        shutil.copyfile(weights, staged)
        options = {"simplify": False} if backend is InferenceBackend.ONNXRUNTIME else {}
        with contextlib.redirect_stdout(io.StringIO()):
            written = Path(YOLO(str(staged)).export(format=DETECTOR_FORMATS[backend], dynamic=True, **options))
        try:
            os.replace(written, path)
        except OSError:
            if not path.exists():  # another process renaming the same export first is fine
                raise
    except Exception as exc:  # Ultralytics raises many types; PyTorch still works
        warn(f"exporting detector {weights.name} for {backend.value} failed ({type(exc).__name__}); using PyTorch")
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DetectorExport(path, weights, task, backend.value)
