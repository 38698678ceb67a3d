"""INT8 embedding: the checkpoint's exported graph quantised after training, used only once a
measured gate has accepted it (``reid-app quantize``, then ``--int8`` on ingest/search/serve/evaluate).

**Quantising** (:func:`quantise_graph`): ONNX Runtime's static post-training quantisation of the
float32 export that :mod:`reid_app.backends` caches beside the checkpoint — QDQ format, int8
weights per output channel, uint8 activations whose ranges are the min/max seen on calibration
crops. Both CPU runtimes run that graph in int8 (OpenVINO reads the QDQ pairs itself).

Two kinds of layer are the ones int8 hurts. Layers next to the input: on the MobileNetV2 FA-Net,
quantising its 1st, 2nd or 4th convolution alone moved the features of 64 VIPeR crops to a mean
cosine of 0.985, 0.985 and 0.964 against float32, and any one of its last 50 by less than 0.001
(``benchmarks/int8_probe.py``). And layers on globally pooled features, above all the channel
gates of OSNet's aggregation (pool → 1×1 conv → ReLU → 1×1 conv → sigmoid, which scales a whole
feature map): on the OSNet FA-Net all-int8 gave a mean cosine of 0.950 on those VIPeR crops, all-int8
but its 24 gate layers 0.990, but its 60 depthwise, 80 pointwise or 15 linear layers 0.950–0.951.
Layers on 1×1 (pooled) inputs cost next to nothing, so they always stay float32; then the first K
of the others do too, with K the smallest of 0, 1, 2, 4, 8, ... for which held-out calibration
crops keep a mean cosine of :data:`FEATURE_AGREEMENT` with float32.

**Speed first**: the first int8 graph tried must run :data:`MIN_SPEEDUP` × float32's img/s on this
machine (measured on the held-out crops), else nothing is written and neither the layer search nor
the minutes of the gate are spent: int8 is a trade of accuracy for speed, and without the speed there is no trade.

**The gate** (:func:`quantise_checkpoint`): the float32 and the int8 graph are both scored, flip-averaged as
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
from typing import Any, NamedTuple

import numpy as np

from reid_app.errors import ReidAppError
from reid_app.locks import atomic_write_bytes

#: Largest drop (points of rank-1 and of mAP) on any gate protocol that int8 may cost.
TOLERANCE_POINTS = 1.0
#: Mean cosine between int8 and float32 features of held-out calibration crops that the layers
#: kept in float32 must reach before the gate is run.
FEATURE_AGREEMENT = 0.99
#: int8 must run at least this much faster than float32 on this machine, or it is not worth its
#: accuracy budget: on CPUs without int8 dot-product instructions a depthwise-heavy network (OSNet)
#: ran slower in int8 (ONNX Runtime, AVX2 EPYC: 96 against 145 img/s at batch 32).
MIN_SPEEDUP = 1.1
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
    float_layers: int  # the first layers (not counting pooled ones) kept in float32
    feature_cosine: float  # mean cosine with float32 on held-out calibration crops
    calibration: str  # where the crops came from
    calibration_crops: int
    figures: dict[str, dict[str, dict[str, float]]]  # protocol -> float32|int8 -> R1|mAP (percent)
    accepted: bool
    tolerance_points: float = TOLERANCE_POINTS
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    onnxruntime: str = ""
    pooled_float_layers: int = 0  # layers on globally pooled (1×1) features, always float32
    images_per_second: dict[str, float] = field(default_factory=dict)  # float32|int8 -> batch-32 speed here


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


class Quantised(NamedTuple):
    float_layers: int  # the first layers (not counting pooled ones) kept in float32
    pooled_float_layers: int
    cosine: float  # mean cosine with float32 on the held-out crops
    images_per_second: dict[str, float]  # float32|int8 -> batch-32 speed on this machine


def quantise_graph(
    float_graph: Path,
    calibration: np.ndarray,
    held_out: np.ndarray,
    output: Path,
    threads: int,
    log: Callable[[str], None] = print,
) -> Quantised:
    """Write the int8 graph of ``float_graph`` to ``output``. Both arrays are preprocessed 0-1 RGB
    NCHW batches. Refused (:class:`ReidAppError`, nothing written) when the fully int8 graph is not
    :data:`MIN_SPEEDUP` × faster than float32 here, or when no tried prefix of float32 layers keeps
    :data:`FEATURE_AGREEMENT` on ``held_out``."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    reference = _graph(float_graph, calibration.shape[2:], threads).embed(held_out)
    speed: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="reid-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_graph), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        pooled = pooled_layers(graph)
        layers = [name for name in weighted_layers(graph) if name not in pooled]
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
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=[*pooled, *layers[:keep]],
                )  # fmt: skip
            finally:
                logging.disable(previous)
            if not speed:  # the most int8 graph tried: if it is not faster, none will be
                speed = {"float32": images_per_second(float_graph, held_out, threads),
                         "int8": images_per_second(candidate, held_out, threads)}  # fmt: skip
                log(f"speed at batch 32 here: float32 {speed['float32']:.0f}, int8 {speed['int8']:.0f} img/s")
                if speed["int8"] < MIN_SPEEDUP * speed["float32"]:
                    raise ReidAppError(
                        f"int8 is not faster than float32 on this CPU ({speed['int8']:.0f} against "
                        f"{speed['float32']:.0f} img/s at batch 32; it must be {MIN_SPEEDUP:g}×): not quantised"
                    )
            features = _graph(candidate, calibration.shape[2:], threads).embed(held_out)
            cosine = float((features * reference).sum(axis=1).mean())
            log(
                f"int8 with the first {keep} of {len(layers)} layers (and {len(pooled)} on pooled features) "
                f"in float32: mean cosine {cosine:.4f}"
            )
            if cosine >= FEATURE_AGREEMENT:
                shutil.move(candidate, output)
                return Quantised(keep, len(pooled), cosine, {k: round(v, 1) for k, v in speed.items()})
    raise ReidAppError(
        f"int8 features stay too far from float32 (mean cosine {cosine:.4f} < {FEATURE_AGREEMENT} with "
        f"the first {FLOAT_PREFIXES[-1]} layers in float32): not quantised"
    )


def weighted_layers(model: Any) -> list[str]:
    """Names of an ONNX graph's convolution and linear nodes, in graph order."""
    return [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]


def pooled_layers(model: Any) -> list[str]:
    """Names of the convolution/linear nodes whose input is globally pooled (N×C×1×1 or N×C):
    channel gates and embedding heads, cheap in any precision and the ones int8 hurts most."""
    from onnx import shape_inference  # noqa: PLC0415

    inferred = shape_inference.infer_shapes(model)
    shapes = {
        value.name: [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
        for value in (*inferred.graph.value_info, *inferred.graph.input)
    }

    def pooled(shape: list[int | None] | None) -> bool:
        return shape is not None and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == [1, 1]))

    weighted = set(weighted_layers(inferred))
    return [node.name for node in inferred.graph.node if node.name in weighted and pooled(shapes.get(node.input[0]))]


def images_per_second(graph: Path, images: np.ndarray, threads: int, seconds: float = 1.0) -> float:
    """Unflipped images a second of ``graph`` on ONNX Runtime, in passes of up to 32 of ``images``
    after one warm-up pass, timed for at least ``seconds``."""
    model = _graph(graph, images.shape[2:], threads)
    batch = images[:32]
    model.raw(batch)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or done < 3 * len(batch):
        model.raw(batch)
        done += len(batch)
    return done / elapsed


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
        quantised = quantise_graph(float_graph, calibrating, held_out, candidate, threads, log)
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
            graph_sha256=_sha256(candidate), input_size=(height, width), float_layers=quantised.float_layers,
            feature_cosine=round(quantised.cosine, 6), calibration=source, calibration_crops=len(images),
            figures=figures, accepted=passes(figures), onnxruntime=onnxruntime.__version__,
            pooled_float_layers=quantised.pooled_float_layers, images_per_second=quantised.images_per_second,
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
