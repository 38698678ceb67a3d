"""Typed configuration for FA-Net. Every default is the paper's setting (Sec. III and IV-B).

One dataclass per concern (model, data, solver) grouped in :class:`TrainConfig`. CLI flags
override fields; ``to_dict``/``from_dict`` round-trip through ``config.json`` in a run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class TALVariant(StrEnum):
    """Target attention loss variants of Table II."""

    NONE = "none"
    EQ4 = "eq4"  # Eq. 4: on spatially l2-normalised F and B (the paper's TAL)
    V1 = "v1"  # Eq. 7: avg[F + B]
    V2 = "v2"  # Eq. 7: avg[F(1-Z) + B Z] without normalisation


class Variant(StrEnum):
    """The rows of Table I."""

    BASELINE = "baseline"
    TEM = "tem"
    TEM_BG = "tem_bg"
    TEM_BG_IA = "tem_bg_ia"
    TEM_BG_IA_TAL = "tem_bg_ia_tal"
    FANET = "fanet"


class DatasetName(StrEnum):
    MARKET1501 = "market1501"
    DUKEMTMC = "dukemtmc"
    MSMT17 = "msmt17"
    CUHK03 = "cuhk03"
    FOLDER = "folder"
    # The PETA re-ID subsets that are not domain-generalisation test sets (training only).
    PETA = "peta"


#: Joins several training sources in ``--dataset`` (``cuhk03+peta``).
SOURCE_SEPARATOR = "+"


class Backbone(StrEnum):
    """Backbones of :mod:`fanet.backbones`; ResNet50 is the paper's."""

    RESNET50 = "resnet50"
    MOBILENETV2 = "mobilenetv2"
    OSNET = "osnet"  # OSNet x0.5 already trained for re-ID (Intel OMZ 0267 weights)


@dataclass
class FANetConfig:
    """Model switches. ``FANetConfig()`` is the full FA-Net; ``FANetConfig.variant(...)`` gives
    each ablation row of Table I."""

    backbone: Backbone = Backbone.RESNET50
    use_tem: bool = True  # target enhancement module on the foreground map
    use_background: bool = True  # camera-ID background branch (training only)
    use_interaction: bool = True  # gate the background map with 1 - Z (IA)
    tal: TALVariant = TALVariant.EQ4
    use_hpp: bool = True  # horizontal pyramid pooling; off = global average pooling
    tem_k: int = 256  # number of attention maps averaged in TEM (Fig. 5)
    tem_mid_channels: tuple[int, int] = (256, 128)
    hpp_stripes: tuple[int, ...] = (1, 2, 4, 8)
    embed_dim: int = 256  # per-stripe embedding size
    last_stride: int = 1  # last spatial down-sampling removed
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        try:
            self.backbone = Backbone(self.backbone)
        except ValueError:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(b.value for b in Backbone)}"
            ) from None
        self.tal = TALVariant(self.tal)
        self.tem_mid_channels = tuple(self.tem_mid_channels)  # type: ignore[assignment]
        self.hpp_stripes = tuple(self.hpp_stripes)
        self.pixel_mean = tuple(self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(self.pixel_std)  # type: ignore[assignment]
        if self.tem_k < 1:
            raise ValueError(f"tem_k must be >= 1, got {self.tem_k}")
        if self.use_interaction and not (self.use_tem and self.use_background):
            raise ValueError("use_interaction needs both use_tem and use_background")
        if self.tal is not TALVariant.NONE and not self.use_background:
            raise ValueError("the target attention loss needs the background branch")
        if self.tal in (TALVariant.EQ4, TALVariant.V2) and not self.use_tem:
            raise ValueError(f"TAL variant {self.tal.value!r} needs TEM (it uses the mask Z)")

    @property
    def feature_dim(self) -> int:
        """Size of the inference feature: 15 x 256 = 3840 with HPP, else the backbone's channels
        (2048 for ResNet50)."""
        return sum(self.hpp_stripes) * self.embed_dim if self.use_hpp else self.backbone_channels

    @property
    def backbone_channels(self) -> int:
        from fanet.backbones import get_backbone  # noqa: PLC0415 (the backbones import torchvision)

        return get_backbone(self.backbone.value).channels

    @classmethod
    def variant(cls, name: str | Variant, **overrides: Any) -> FANetConfig:
        """The configuration of one row of Table I (extra keyword args override fields)."""
        rows: dict[Variant, dict[str, Any]] = {
            Variant.BASELINE: dict(
                use_tem=False, use_background=False, use_interaction=False,
                tal=TALVariant.NONE, use_hpp=False,
            ),
            Variant.TEM: dict(use_background=False, use_interaction=False, tal=TALVariant.NONE, use_hpp=False),
            Variant.TEM_BG: dict(use_interaction=False, tal=TALVariant.NONE, use_hpp=False),
            Variant.TEM_BG_IA: dict(tal=TALVariant.NONE, use_hpp=False),
            Variant.TEM_BG_IA_TAL: dict(use_hpp=False),
            Variant.FANET: {},
        }
        try:
            row = rows[Variant(name)]
        except ValueError:
            raise ValueError(
                f"unknown variant {name!r}; choose one of {', '.join(v.value for v in Variant)}"
            ) from None
        return cls(**{**row, **overrides})


@dataclass
class DataConfig:
    dataset: DatasetName = DatasetName.MARKET1501
    # More training sources after ``dataset`` (each read from ``root``); evaluation uses ``dataset``.
    extra_sources: tuple[DatasetName, ...] = ()
    # Images one identity gives an epoch at most (a fresh camera-diverse draw each epoch; None = all),
    # so sets cut from video tracks (tens of frames a person) do not drown sets with a few per person.
    max_per_identity: int | None = None
    root: str = "data"
    height: int = 384
    width: int = 128
    num_identities: int = 16  # P of the PK batch
    num_instances: int = 8  # K of the PK batch
    flip_prob: float = 0.5
    pad: int = 0  # zero-padding before a random crop back to size (0 = off, the paper)
    erase_prob: float = 0.0  # random erasing probability (0 = off, the paper)
    workers: int = 4
    test_dataset: DatasetName | None = None  # cross-dataset evaluation (Table III); None = same
    test_root: str | None = None

    def __post_init__(self) -> None:
        self.dataset = DatasetName(self.dataset)
        self.extra_sources = tuple(DatasetName(d) for d in self.extra_sources)
        sources = self.sources
        if len(set(sources)) != len(sources):
            raise ValueError(f"a training source is named twice: {self.source_label}")
        if self.max_per_identity is not None and self.max_per_identity < 1:
            raise ValueError(f"max_per_identity must be >= 1, got {self.max_per_identity}")
        if self.test_dataset is not None:
            self.test_dataset = DatasetName(self.test_dataset)

    @property
    def batch_size(self) -> int:
        return self.num_identities * self.num_instances

    @property
    def sources(self) -> tuple[DatasetName, ...]:
        return (self.dataset, *self.extra_sources)

    @property
    def source_label(self) -> str:
        """``cuhk03+peta``: the sources as ``--dataset`` takes them."""
        return SOURCE_SEPARATOR.join(d.value for d in self.sources)


def parse_sources(text: str) -> tuple[DatasetName, tuple[DatasetName, ...]]:
    """``cuhk03+peta`` -> (CUHK03, (PETA,)); raises on an unknown name."""
    names = [part.strip() for part in text.split(SOURCE_SEPARATOR)]
    try:
        sources = [DatasetName(name) for name in names]
    except ValueError:
        unknown = next(n for n in names if n not in {d.value for d in DatasetName})
        raise ValueError(
            f"unknown dataset {unknown!r} in {text!r}; choose from {', '.join(d.value for d in DatasetName)}, "
            f"several joined by '{SOURCE_SEPARATOR}'"
        ) from None
    return sources[0], tuple(sources[1:])


class OptimizerName(StrEnum):
    SGD = "sgd"  # the paper's
    ADAM = "adam"  # as in Luo et al.'s "Bag of Tricks" baseline: robust for short CPU schedules
    # Adam with decoupled weight decay (Loshchilov & Hutter, ICLR 2019). Adam's own (L2 added to
    # the gradient, then normalised) shrinks each classifier row by ~lr every step its person is
    # not in the batch: with 1,304 people (16 a batch) the rows stayed at norm ~0.25 and the
    # person-ID loss at ~5.4, logits four times too small (measured; benchmarks/RESULTS.md).
    ADAMW = "adamw"


@dataclass
class SolverConfig:
    optimizer: OptimizerName = OptimizerName.SGD
    epochs: int = 100
    base_lr: float = 0.6
    warmup_start_lr: float = 0.06
    warmup_epochs: int = 10
    milestones: tuple[int, ...] = (40, 80)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pretrained_lr_mult: float = 0.1  # pretrained (ResNet50) layers learn at 0.1x the base lr
    amp: bool = True  # float16 autocast + grad scaling, used on CUDA only
    # bfloat16 autocast for CPU training: ~2x faster at 256x128 on CPUs with native bf16
    # (avx512_bf16/AMX), slower elsewhere, hence off unless asked for. Evaluation stays float32.
    cpu_bf16: bool = False
    # Keep the shared low-level module (the stem up to the stride-8 stage) as loaded: no gradient,
    # its normalisation layers in eval mode. Not the paper's (it trains every layer). Why offered:
    # that module is most of the step's cost at 256x128 (OSNet: it halves a CPU step), and on a
    # backbone already trained for re-ID it holds the early, domain-general features that a small
    # training set would otherwise pull towards its own cameras.
    freeze_low_level: bool = False
    # MixStyle (Zhou et al., ICLR 2021; fanet/engine/mixstyle.py): probability, drawn per batch at
    # each place, of mixing feature statistics between images after the low-level module and after
    # each branch's first stage (0 = off, the paper), and the Beta(alpha, alpha) of the mixing
    # weight (the MixStyle paper's 0.1).
    mixstyle_prob: float = 0.0
    mixstyle_alpha: float = 0.1
    # Training batches over which a fresh stage first re-estimates every BatchNorm's statistics
    # (0 = off): for weights that are an average (reid-app average), whose stored statistics are
    # not those of their own activations. Not the paper's.
    recalibrate_bn_batches: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        self.optimizer = OptimizerName(self.optimizer)
        self.milestones = tuple(self.milestones)
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if self.recalibrate_bn_batches < 0:
            raise ValueError(f"recalibrate_bn_batches must be >= 0, got {self.recalibrate_bn_batches}")
        if not 0.0 <= self.mixstyle_prob <= 1.0 or self.mixstyle_alpha <= 0:
            raise ValueError(
                "mixstyle_prob must be in [0, 1] and mixstyle_alpha > 0, "
                f"got {self.mixstyle_prob} and {self.mixstyle_alpha}"
            )


@dataclass
class LossConfig:
    """Terms added to Eq. 6. The defaults are the paper's objective; both extras are common re-ID
    recipe choices (BoT, fast-reid) used for the small-data MobileNetV2 model (weights/README.md)."""

    # Softmax label smoothing of the person-ID classifiers (0 = plain cross-entropy, the paper).
    label_smoothing: float = 0.0
    # Weight of a batch-hard triplet loss on the l2-normalised inference feature (0 = off, the paper).
    triplet_weight: float = 0.0
    triplet_margin: float = 0.3
    # Weight of the relational distillation term from a teacher model (0 = off, the paper); the
    # teacher itself is handed to the trainer (TrainConfig.teacher names its file).
    distill_weight: float = 0.0
    distill_temperature: float = 0.1  # softmax temperature over a batch's cosine similarities
    # Training sources whose images the distillation term uses (empty = every source): a teacher
    # that ranks one source worse than the student should learn to (0277 on CUHK03: 39.9 R1)
    # need not pull the student's similarities there.
    distill_sources: tuple[DatasetName, ...] = ()

    def __post_init__(self) -> None:
        self.distill_sources = tuple(DatasetName(d) for d in self.distill_sources)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.triplet_weight < 0 or self.triplet_margin < 0:
            raise ValueError("triplet_weight and triplet_margin must be >= 0")
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ValueError("distill_weight must be >= 0 and distill_temperature > 0")


@dataclass
class TrainConfig:
    model: FANetConfig = field(default_factory=FANetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output_dir: str = "runs/fanet"
    pretrained: str | None = None  # path to torchvision resnet50 ImageNet weights (.pth)
    random_init: bool = False  # must be asked for explicitly when no pretrained file is given
    # A FA-Net training checkpoint whose weights start this run (a second stage with a fresh
    # optimiser and schedule); the ImageNet file is then not needed.
    init_from: str | None = None
    # A trained re-ID model (OpenVINO IR or ONNX) to distil from; read by the caller (reid_app),
    # which hands the trainer a callable, so fanet stays pure PyTorch.
    teacher: str | None = None
    # A teacher-feature cache (teacher_features.pt) of an earlier run with the same teacher and
    # images, e.g. the other rows of an ablation: the teacher is then not run again (default: the
    # --init-from run's cache, if any). One of another teacher or image list is ignored.
    teacher_cache: str | None = None
    # Evaluate the domain-generalisation protocol too (peta_reid/dg_splits.json under this folder)
    # at every evaluation: the figure that says how the model does on cameras it never saw.
    dg_root: str | None = None
    eval_period: int = 10  # epochs; 0 disables periodic evaluation
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sync_bn: bool = False  # SyncBatchNorm across DDP replicas (CUDA)
    max_iters_per_epoch: int | None = None  # for smoke tests; None = a full pass over the data

    def __post_init__(self) -> None:
        foreign = [d.value for d in self.loss.distill_sources if d not in self.data.sources]
        if foreign:
            raise ValueError(
                f"distillation source {', '.join(foreign)} is not a training source ({self.data.source_label})"
            )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(
            model=config_from_dict(FANetConfig, data.get("model", {})),
            data=config_from_dict(DataConfig, data.get("data", {})),
            solver=config_from_dict(SolverConfig, data.get("solver", {})),
            loss=config_from_dict(LossConfig, data.get("loss", {})),
            **{k: v for k, v in data.items() if k not in ("model", "data", "solver", "loss")},
        )


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass, refusing unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    return cls(**data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, StrEnum):
        return value.value
    return value


def model_config_to_dict(config: FANetConfig) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(config))


def model_config_differences(saved: dict[str, Any], current: dict[str, Any] | FANetConfig) -> list[str]:
    """The fields (sorted) in which two model configs differ. Both go through the dataclass, so a
    field added since a checkpoint was written (e.g. the backbone) compares as its default instead
    of as a difference; raises ``ValueError``/``TypeError`` on a config that is not a FANetConfig."""
    if not isinstance(current, FANetConfig):
        current = config_from_dict(FANetConfig, current)
    ours = model_config_to_dict(config_from_dict(FANetConfig, saved))
    theirs = model_config_to_dict(current)
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
