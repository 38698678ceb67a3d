"""INT8 embedding: the checkpoint's exported graph quantised after training, used only once a
measured gate has accepted it (``reid-app quantize``, then ``--int8`` on ingest/search/serve/evaluate).

**Quantising** (:func:`quantise_graph`): ONNX Runtime's static post-training quantisation of the
float32 export that :mod:`reid_app.backends` caches beside the checkpoint — QDQ format, int8
weights per output channel, uint8 activations whose ranges are the min/max seen on calibration
crops. Both CPU runtimes run that graph in int8 (OpenVINO reads the QDQ pairs itself).

Layers next to the input are the ones int8 hurts: on the shipped MobileNetV2 FA-Net, quantising
its 1st, 2nd or 4th convolution alone moved the features of 64 VIPeR crops to a mean cosine of
0.985, 0.985 and 0.964 against float32, and any one of its last 50 by less than 0.001
(``benchmarks/int8_probe.py``). So the first K convolution/linear layers stay float32, with K the
smallest of 0, 1, 2, 4, 8, ... for which held-out calibration crops keep a mean cosine of
:data:`FEATURE_AGREEMENT` with float32.

**The gate** (:func:`int8_gate`): the float32 and the int8 graph are both scored, flip-averaged as
the app embeds, on every protocol asked for (default: the CUHK03 split and the DG mean of PETA's
VIPeR/PRID/GRID/i-LIDS). The int8 graph is accepted only when each rank-1 and mAP is within
:data:`TOLERANCE_POINTS` of float32's. Rejected: nothing is written. Accepted: the graph and its
record (``<export>.int8.onnx`` and ``.int8.json``: both sets of figures, the calibration, the
layers kept in float32, the graph's sha256) are written beside the float32 export, the graph
first, each atomically; a graph without a record that names its sha256 is never used.

**Calibration crops** (:func:`calibration_crops`): the person crops in a folder the user names
(image files, any sizes), else the people the detector finds in a video or a folder of videos,
by default the bundled ``sample_videos/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reid_app.errors import ReidAppError
from reid_app.locks import atomic_write_bytes

#: Largest drop (points of rank-1 and of mAP) on any gate protocol that int8 may cost.
TOLERANCE_POINTS = 1.0
#: Mean cosine between int8 and float32 features of held-out calibration crops that the layers
#: kept in float32 must reach before the gate is run.
FEATURE_AGREEMENT = 0.99
#: Calibration crops used by default (3/4 set the activation ranges, 1/4 check the agreement).
DEFAULT_CALIBRATION_CROPS = 256
MIN_CALIBRATION_CROPS = 8
#: Gate protocols by default: the CUHK03 split and the domain-generalisation mean.
DEFAULT_GATE = ("cuhk03", "dg")
DG_PROTOCOL = "dg"
#: Layers kept in float32 that are tried, in order (the first K convolution/linear layers).
FLOAT_PREFIXES = (0, 1, 2, 4, 8, 16, 32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
SAMPLE_VIDEOS = Path(__file__).resolve().parents[1] / "sample_videos"


def int8_graph_path(float_graph: Path) -> Path:
    """``NAME.<sha16>.HxW.onnx`` → ``NAME.<sha16>.HxW.int8.onnx`` (same folder)."""
    return float_graph.with_name(float_graph.name.removesuffix(".onnx") + ".int8.onnx")


def int8_record_path(int8_graph: Path) -> Path:
    return int8_graph.with_suffix(".json")


@dataclass
class Int8Record:
    """What ``reid-app quantize`` measured and accepted, stored beside the int8 graph."""

    checkpoint: str  # file name
    checkpoint_sha256: str
    graph_sha256: str
    input_size: tuple[int, int]
    float_layers: int  # the first layers kept in float32
    feature_cosine: float  # mean cosine with float32 on held-out calibration crops
    calibration: str  # where the crops came from
    calibration_crops: int
    figures: dict[str, dict[str, dict[str, float]]]  # protocol -> float32|int8 -> R1|mAP (percent)
    accepted: bool
    tolerance_points: float = TOLERANCE_POINTS
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    onnxruntime: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def accepted_int8_graph(float_graph: Path, checkpoint_sha256: str) -> Path | None:
    """The int8 graph beside ``float_graph`` when its record accepts it for this checkpoint and names
    its bytes; else None."""
    graph = int8_graph_path(float_graph)
    record = read_record(graph)
    if record is None or not graph.is_file():
        return None
    if not record.accepted or record.checkpoint_sha256 != checkpoint_sha256:
        return None
    return graph if _sha256(graph) == record.graph_sha256 else None


def read_record(int8_graph: Path) -> Int8Record | None:
    try:
        data = json.loads(int8_record_path(int8_graph).read_text())
        data["input_size"] = tuple(data["input_size"])
        return Int8Record(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


# -- calibration crops -------------------------------------------------------------------------


def calibration_crops(
    source: Path | None,
    count: int,
    detector_factory: Callable[[], Any],
    log: Callable[[str], None] = print,
) -> tuple[list[np.ndarray], str]:
    """Up to ``count`` BGR person crops and a description of where they came from.

    ``source``: a folder of crop images (searched recursively), a video, a folder of videos, or
    None for the bundled sample footage (whose one query photo does not make it a crop folder).
    Crops are taken evenly across what is found."""
    from reid_app.images import read_image  # noqa: PLC0415

    source = source if source is not None else SAMPLE_VIDEOS
    if not source.exists():
        raise ReidAppError(f"calibration source not found: {source} (pass --calibration DIR of person crops)")
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        videos = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    else:
        images = [source] if source.suffix.lower() in IMAGE_SUFFIXES else []
        videos = [source] if source.suffix.lower() in VIDEO_SUFFIXES else []
    if len(images) >= MIN_CALIBRATION_CROPS or (images and not videos):
        chosen = [images[i] for i in np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)]
        crops = [read_image(path, "calibration crop").pixels for path in dict.fromkeys(chosen)]
        description = f"{len(crops)} crops from {source}"
    elif videos:
        crops = _video_crops(videos, count, detector_factory(), log)
        description = f"{len(crops)} detector crops from {', '.join(v.name for v in videos)}"
    else:
        raise ReidAppError(f"no person crops ({'/'.join(IMAGE_SUFFIXES)}) or videos in {source}")
    if len(crops) < MIN_CALIBRATION_CROPS:
        raise ReidAppError(f"only {len(crops)} calibration crops in {source}: need at least {MIN_CALIBRATION_CROPS}")
    return crops, description


def _video_crops(videos: Sequence[Path], count: int, detector: Any, log: Callable[[str], None]) -> list[np.ndarray]:
    from reid_app.video import open_video  # noqa: PLC0415

    per_video = -(-count // len(videos))
    crops: list[np.ndarray] = []
    for path in videos:
        taken = 0
        for frame in open_video(str(path)).iter_frames(sample_fps=2.0):
            for box in detector.detect(frame.image):
                x1, y1, x2, y2 = (int(round(v)) for v in box.bbox)
                crop = frame.image[max(y1, 0) : y2, max(x1, 0) : x2]
                if crop.shape[0] >= 32 and crop.shape[1] >= 16:
                    crops.append(crop)
                    taken += 1
            if taken >= per_video:
                break
        log(f"calibration: {taken} crops from {path.name}")
    return crops[:count]


# -- quantising ------------------------------------------------------------------------------


def quantise_graph(
    float_graph: Path,
    calibration: np.ndarray,
    held_out: np.ndarray,
    output: Path,
    threads: int,
    log: Callable[[str], None] = print,
) -> tuple[int, float]:
    """Write the int8 graph of ``float_graph`` to ``output``; returns (layers kept in float32, mean
    cosine with float32 on ``held_out``). Both arrays are preprocessed 0-1 RGB NCHW batches."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    reference = _graph(float_graph, calibration.shape[2:], threads).embed(held_out)
    with tempfile.TemporaryDirectory(prefix="reid-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_graph), str(prepared), skip_symbolic_shape=True)
        layers = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        candidate = Path(folder) / "int8.onnx"
        cosine = -1.0
        for keep in (k for k in FLOAT_PREFIXES if k <= len(layers)):
            # The quantiser warns on the root logger for each 1-D weight (a norm's scale) it leaves
            # per-tensor: expected, and dozens of lines that buried the progress lines below.
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                quantize_static(
                    str(prepared), str(candidate), _batches(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=layers[:keep],
                )  # fmt: skip
            finally:
                logging.disable(previous)
            features = _graph(candidate, calibration.shape[2:], threads).embed(held_out)
            cosine = float((features * reference).sum(axis=1).mean())
            log(f"int8 with the first {keep} of {len(layers)} layers in float32: mean cosine {cosine:.4f}")
            if cosine >= FEATURE_AGREEMENT:
                shutil.move(candidate, output)
                return keep, cosine
    raise ReidAppError(
        f"int8 features stay too far from float32 (mean cosine {cosine:.4f} < {FEATURE_AGREEMENT} with "
        f"the first {FLOAT_PREFIXES[-1]} layers in float32): not quantised"
    )


def _batches(images: np.ndarray, batch: int = 32) -> Any:
    """An ONNX Runtime calibration reader over ``images``, ``batch`` images a pass."""
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._batches, None)
            return None if item is None else {"images": item}

    return Batches()


def _graph(path: Path, input_size: tuple[int, ...], threads: int, backend: str = "onnxruntime") -> Any:
    from reid_app.backends import EXPORTED_PASS_IMAGES  # noqa: PLC0415
    from reid_app.external_model import ExternalReIDModel, InputConvention  # noqa: PLC0415

    return ExternalReIDModel(
        path, convention=InputConvention.RGB_01, backend=backend, flip=True, batch_size=EXPORTED_PASS_IMAGES,
        threads=threads, input_size=(int(input_size[0]), int(input_size[1])),
    )  # fmt: skip


# -- the gate --------------------------------------------------------------------------------


def parse_gate(value: str, datasets: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    allowed = (*datasets, DG_PROTOCOL)
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ReidAppError(f"--gate takes protocols among {', '.join(allowed)}; got {value!r}")
    return names


def score(graph_module: Any, protocol: str, data_root: str, input_size: tuple[int, int]) -> dict[str, float]:
    """Rank-1 and mAP (percent) of an exported-graph module on one gate protocol, flip-averaged."""
    height, width = input_size
    if protocol == DG_PROTOCOL:
        from fanet.evaluation.dg import evaluate_dg, fanet_embedder  # noqa: PLC0415

        result = evaluate_dg(fanet_embedder(graph_module, height, width, flip=True), data_root)
        return {"R1": 100 * result.mean_rank1, "mAP": 100 * result.mean_mAP}
    from fanet.config import DataConfig  # noqa: PLC0415
    from fanet.engine.evaluator import evaluate_checkpoint_model  # noqa: PLC0415

    data = DataConfig(dataset=protocol, root=data_root, height=height, width=width, workers=0)
    evaluation = evaluate_checkpoint_model(graph_module, data, flip=True)
    return {"R1": 100 * evaluation.rank(1), "mAP": 100 * evaluation.mAP}


def passes(figures: dict[str, dict[str, dict[str, float]]], tolerance: float = TOLERANCE_POINTS) -> bool:
    """True when no protocol's int8 rank-1 or mAP is more than ``tolerance`` points below float32's."""
    return all(
        result["int8"][metric] >= result["float32"][metric] - tolerance
        for result in figures.values()
        for metric in ("R1", "mAP")
    )


def write_accepted(graph_file: Path, destination: Path, record: Int8Record) -> None:
    """The graph, then its record, each atomically (a graph without its record is never used)."""
    atomic_write_bytes(destination, graph_file.read_bytes())
    payload = json.dumps(asdict(record), indent=2) + "\n"
    atomic_write_bytes(int8_record_path(destination), payload.encode())


def remove_int8(float_graph: Path) -> None:
    """Drop an earlier int8 graph and record of this export (before an accepted new one is written)."""
    graph = int8_graph_path(float_graph)
    for path in (int8_record_path(graph), graph):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# -- the whole job ---------------------------------------------------------------------------


def quantise_checkpoint(
    weights: str | None,
    data_root: str,
    gate: Sequence[str] = DEFAULT_GATE,
    calibration: Path | None = None,
    crops: int = DEFAULT_CALIBRATION_CROPS,
    detector_factory: Callable[[], Any] | None = None,
    log: Callable[[str], None] = print,
) -> Int8Record:
    """``reid-app quantize``: quantise ``weights``' float32 export, score both on ``gate`` and keep
    the int8 graph only if it passes (module docstring). Returns the record, accepted or not."""
    import onnxruntime  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from fanet.inference import preprocess_bgr  # noqa: PLC0415
    from reid_app.backends import ExportedGraphModule  # noqa: PLC0415
    from reid_app.embed import Embedder  # noqa: PLC0415

    if crops < MIN_CALIBRATION_CROPS:
        raise ReidAppError(f"--crops must be at least {MIN_CALIBRATION_CROPS}, got {crops}")
    for protocol in gate:
        _check_gate_data(protocol, data_root)
    embedder = Embedder(weights, device="cpu", backend="onnxruntime", warn=log)
    if embedder.exported_graph is None or embedder.weights_path is None:
        raise ReidAppError(f"{embedder.model_name}: no float32 export to quantise (see above)")
    float_graph = embedder.exported_graph.path
    height, width = embedder.input_size
    threads = torch.get_num_threads()

    def default_detector() -> Any:
        from reid_app.ingest import load_detector  # noqa: PLC0415

        return load_detector(None, "cpu")

    pixels, source = calibration_crops(calibration, crops, detector_factory or default_detector, log)
    images = preprocess_bgr(pixels, height=height, width=width).numpy()
    held_out = images[::4]
    calibrating = np.delete(images, np.arange(0, len(images), 4), axis=0)
    log(f"calibration: {source} ({len(calibrating)} set the ranges, {len(held_out)} check the features)")
    with tempfile.TemporaryDirectory(prefix="reid-int8-") as folder:
        candidate = Path(folder) / "int8.onnx"
        float_layers, cosine = quantise_graph(float_graph, calibrating, held_out, candidate, threads, log)
        figures: dict[str, dict[str, dict[str, float]]] = {}
        for protocol in gate:
            figures[protocol] = {}
            for precision, path in (("float32", float_graph), ("int8", candidate)):
                module = ExportedGraphModule(_graph(path, (height, width), threads))
                started = time.perf_counter()
                figures[protocol][precision] = score(module, protocol, data_root, (height, width))
                result = figures[protocol][precision]
                log(
                    f"{protocol:<10}{precision:<8} R1 {result['R1']:5.1f}  mAP {result['mAP']:5.1f}"
                    f"  ({time.perf_counter() - started:.0f} s)"
                )
        record = Int8Record(
            checkpoint=embedder.weights_path.name, checkpoint_sha256=embedder.weights_sha256,
            graph_sha256=_sha256(candidate), input_size=(height, width), float_layers=float_layers,
            feature_cosine=round(cosine, 6), calibration=source, calibration_crops=len(images), figures=figures,
            accepted=passes(figures), onnxruntime=onnxruntime.__version__,
        )  # fmt: skip
        if record.accepted:
            remove_int8(float_graph)
            write_accepted(candidate, int8_graph_path(float_graph), record)
    return record


def _check_gate_data(protocol: str, data_root: str) -> None:
    """A missing dataset is one line before minutes of quantising, not a traceback after them."""
    root = Path(data_root)
    if not root.is_dir():
        raise ReidAppError(f"--data-root {data_root}: no such folder")
    if protocol == DG_PROTOCOL:
        if not (root / "peta_reid" / "dg_splits.json").is_file():
            raise ReidAppError(f"--gate dg needs {root / 'peta_reid' / 'dg_splits.json'} (the DG protocol's splits)")
        return
    from fanet.data.datasets import build_dataset  # noqa: PLC0415

    try:
        build_dataset(protocol, data_root)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise ReidAppError(f"--gate {protocol}: {str(exc).splitlines()[0]}") from None
