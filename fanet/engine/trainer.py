"""FA-Net training (Sec. IV-B): PK batches, SGD with two learning-rate groups, warmup + steps,
AMP on CUDA, one process per GPU under ``torchrun``.

A run folder holds, like an ultralytics run:

* ``config.json`` — the effective :class:`~fanet.config.TrainConfig` (after any automatic
  change, e.g. the background branch switched off for data without camera IDs);
* ``results.csv`` — one row per epoch: lr, every loss term (the camera-ID loss gives Fig. 6),
  mAP/CMC when evaluated, seconds; the ``init`` column says ``imagenet`` or ``random``;
* ``last.pt`` (every epoch) and ``best.pt`` (best mAP) — training checkpoints that resume
  exactly: weights, optimiser, scheduler, GradScaler, epoch/iteration counters and the RNG
  states of every replica. They hold only tensors and plain containers and load with
  ``torch.load(weights_only=True)``; :func:`fanet.load_inference_model` reads them too;
* ``model_final.pt`` (and ``model_best.pt``) — foreground-only inference checkpoints for
  ``reid-app ingest --weights``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import pickle
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fanet.backbones import get_backbone
from fanet.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    TRAINING_KIND,
    CheckpointError,
    read_checkpoint,
    save_atomically,
    save_inference_checkpoint,
    state_dict_mismatch,
)
from fanet.config import (
    SOURCE_SEPARATOR,
    Backbone,
    DatasetName,
    FANetConfig,
    OptimizerName,
    TALVariant,
    TrainConfig,
    config_from_dict,
    model_config_differences,
    model_config_to_dict,
)
from fanet.engine import distributed
from fanet.engine.distillation import TEACHER_CACHE_FILE, TeacherFeatures
from fanet.engine.distributed import DistContext
from fanet.engine.mixstyle import attach_mixstyle
from fanet.engine.recalibration import recalibrate_batchnorm
from fanet.engine.scheduler import WarmupMultiStepLR
from fanet.losses import FANetLoss
from fanet.model import FANet
from fanet.weights import WeightsNotFoundError, resolve_weights

if TYPE_CHECKING:
    from fanet.data.datasets import ReIDDataset

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
FINAL_INFERENCE = "model_final.pt"
BEST_INFERENCE = "model_best.pt"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.csv"

# The scheduler settings a resumed run takes from its config rather than from the checkpoint.
SCHEDULE_FIELDS = ("base_lr", "warmup_start_lr", "warmup_epochs", "milestones", "gamma", "base_lrs")

LOSS_TERMS = ("total", "person_id", "camera_id", "target_attention", "triplet", "distillation")
RESULTS_COLUMNS = (
    "epoch", "init", "lr", "pretrained_lr",
    "loss", "person_id_loss", "camera_id_loss", "target_attention_loss", "triplet_loss",
    "distillation_loss", "mAP", "R1", "R5", "R10", "R20", "DG_R1", "DG_mAP", "time_s",
)  # fmt: skip


class PretrainedWeightsError(WeightsNotFoundError):
    """No ImageNet weights file for the backbone and random init not asked for."""


# --------------------------------------------------------------------------------------------
# Initialisation helpers


def resolve_imagenet_weights(config: TrainConfig) -> Path | None:
    """The backbone's ImageNet weights file to start from, or None for an explicitly asked
    random init."""
    if config.random_init:
        if config.pretrained:
            raise ValueError("choose either a pretrained file or random init, not both")
        return None
    if config.init_from is not None:
        return None  # every weight comes from the earlier run's checkpoint
    backbone = get_backbone(config.model.backbone.value)
    try:
        return resolve_weights(
            backbone.weights_file, config.pretrained, source=backbone.weights_source,
            download=backbone.locate_weights,
        )
    except WeightsNotFoundError as exc:
        raise PretrainedWeightsError(
            f"FA-Net starts from {backbone.title}: {exc}; pass --pretrained PATH, put the file in "
            f"$REID_WEIGHTS_DIR or weights/, or pass --random-init to train from scratch"
        ) from None


def disable_background_branch(config: FANetConfig) -> FANetConfig:
    """The model config without the camera-ID branch (and the parts that need it)."""
    return dataclasses.replace(config, use_background=False, use_interaction=False, tal=TALVariant.NONE)


def distilled_pids(config: TrainConfig, dataset: ReIDDataset) -> Tensor | None:
    """Whether each training pid's images take part in the distillation term (``None``: all do)."""
    wanted = config.loss.distill_sources
    if not wanted:
        return None
    counts = dataset.pids_per_source or (dataset.num_train_pids,)
    flags = [source in wanted for source, count in zip(config.data.sources, counts, strict=True) for _ in range(count)]
    return torch.tensor(flags, dtype=torch.bool)


def init_label(config: TrainConfig) -> str:
    if config.init_from is not None:
        return "checkpoint"
    if config.random_init:
        return "random"
    # What the backbone's weights were trained for: ImageNet, or re-ID already (OSNet from 0267).
    return "reid" if config.model.backbone is Backbone.OSNET else "imagenet"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(device: torch.device) -> dict[str, Tensor]:
    """Python, NumPy and torch RNG states as tensors (loadable with ``weights_only=True``)."""
    version, python_keys, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    state = {
        "python_keys": torch.tensor(python_keys, dtype=torch.int64),
        "python_meta": torch.tensor([version, python_gauss is not None], dtype=torch.int64),
        "python_gauss": torch.tensor([python_gauss or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_meta": torch.tensor([numpy_pos, numpy_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([numpy_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def restore_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    version, has_gauss = (int(v) for v in state["python_meta"].tolist())
    python_gauss = float(state["python_gauss"][0]) if has_gauss else None
    random.setstate((version, tuple(int(k) for k in state["python_keys"].tolist()), python_gauss))
    numpy_pos, numpy_has_gauss = (int(v) for v in state["numpy_meta"].tolist())
    np.random.set_state((
        "MT19937",
        state["numpy_keys"].numpy().astype(np.uint32),
        numpy_pos,
        numpy_has_gauss,
        float(state["numpy_gauss"][0]),
    ))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resolve_resume_path(resume: str | os.PathLike[str]) -> Path:
    """``RUN_DIR`` → ``RUN_DIR/last.pt``; a file is taken as it is."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    return path


def read_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    payload = read_checkpoint(path)
    if payload.get("kind") != TRAINING_KIND:
        raise CheckpointError(
            f"{path} is a {payload.get('kind', 'unknown')!r} checkpoint, not a training checkpoint "
            f"(it has no optimiser state to resume from)"
        )
    return payload


def load_training_model(path: str | os.PathLike[str]) -> tuple[FANet, dict[str, Any]]:
    """The full FA-Net (with the background branch and classifiers) of a training checkpoint,
    in eval mode, and the checkpoint payload."""
    payload = read_training_checkpoint(path)
    try:
        config = config_from_dict(FANetConfig, payload["config"])
        model = FANet(config, num_classes=int(payload["num_classes"]), num_cameras=int(payload["num_cameras"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match the FA-Net architecture ({state_dict_mismatch(exc)})") from None
    return model.eval(), payload


def trained_on(train_config: dict[str, Any]) -> str | None:
    """The training sources of a stored TrainConfig as ``--dataset`` takes them (``cuhk03+peta``)."""
    data = train_config.get("data", {})
    if data.get("dataset") is None:
        return None
    return SOURCE_SEPARATOR.join([data["dataset"], *data.get("extra_sources", [])])


def training_stages(payload: dict[str, Any], source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The training stages behind a training checkpoint, first stage first: one dict per run
    (file name, how it started, epochs, dataset). A run started with ``init_from`` is preceded
    by the stages of that checkpoint when it can still be read; otherwise it stands alone."""
    stages: list[dict[str, Any]] = []
    seen: set[Path] = set()
    current: dict[str, Any] | None = payload
    path = Path(source)
    while current is not None and len(stages) < 16:
        train_config = current.get("train_config", {})
        stages.append({
            "source": path.name,
            "init": current.get("init"),
            "epochs": int(current.get("epoch", 0)),
            "dataset": trained_on(train_config),
        })
        seen.add(path.resolve())
        earlier = train_config.get("init_from")
        current = None
        if earlier:
            path = Path(earlier)
            if path.is_file() and path.resolve() not in seen:
                try:
                    current = read_training_checkpoint(path)
                except (CheckpointError, OSError):
                    current = None
    return stages[::-1]


def earlier_teacher_cache(config: TrainConfig) -> Path | None:
    """The teacher features a run may start from: the one named, else its --init-from run's."""
    if config.teacher_cache is not None:
        return Path(config.teacher_cache)
    return Path(config.init_from).parent / TEACHER_CACHE_FILE if config.init_from else None


def next_free_run_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is empty or new, else ``path2``, ``path3``, ... (ultralytics' rule)."""
    path = Path(path).expanduser()
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    index = 2
    while True:
        candidate = path.with_name(f"{path.name}{index}")
        if not candidate.exists():
            return candidate
        index += 1


def _unwrap(model: nn.Module) -> FANet:
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]


def _set_loader_epoch(loader: Any, epoch: int) -> None:
    """The train loader fixes the epoch's PK batches and flips from (seed, epoch)."""
    for candidate in (loader, getattr(loader, "sampler", None)):
        if candidate is not None and hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class EpochResult:
    epoch: int  # 1-based, as printed and written to results.csv
    lr: float
    pretrained_lr: float
    losses: dict[str, float]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    def csv_row(self, init: str) -> dict[str, str]:
        row = {
            "epoch": str(self.epoch),
            "init": init,
            "lr": repr(self.lr),
            "pretrained_lr": repr(self.pretrained_lr),
            "time_s": f"{self.seconds:.3f}",
        }
        names = {"total": "loss", "person_id": "person_id_loss", "camera_id": "camera_id_loss",
                 "target_attention": "target_attention_loss", "triplet": "triplet_loss",
                 "distillation": "distillation_loss"}
        for term, column in names.items():
            row[column] = repr(self.losses[term]) if term in self.losses else ""
        for key in ("mAP", "R1", "R5", "R10", "R20", "DG_R1", "DG_mAP"):
            row[key] = repr(self.metrics[key]) if key in self.metrics else ""
        return row


@dataclass
class TrainResult:
    run_dir: Path
    epochs: list[EpochResult]
    best_map: float | None
    final_inference_checkpoint: Path | None


def read_results_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains FA-Net as configured by a :class:`TrainConfig`.

    ``resume`` (a run folder or a ``last.pt``/``best.pt``) continues that run in its folder;
    ``config`` may then be None (the checkpoint's config is used) or the checkpoint's config with
    run-time fields changed (more epochs, another device...). The model config must match.
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        resume: str | os.PathLike[str] | None = None,
        sync_bn: bool | None = None,
        show_progress: bool = True,
        console: Console | None = None,
        teacher: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.resume_payload: dict[str, Any] | None = None
        if resume is not None:
            resume_path = resolve_resume_path(resume)
            self.resume_payload = read_training_checkpoint(resume_path)
            if "optimizer" not in self.resume_payload:
                raise CheckpointError(
                    f"{resume_path} holds averaged weights (reid-app average), no run to resume: "
                    "start a new stage from it with --init-from"
                )
            if config is None:
                config = TrainConfig.from_dict(self.resume_payload["train_config"])
            self.run_dir = resume_path.parent
        elif config is None:
            raise ValueError("Trainer needs a config or a checkpoint to resume")
        self.config = config = dataclasses.replace(config)
        if config.loss.distill_weight > 0 and teacher is None:
            raise ValueError("a distillation weight is set but no teacher model was given")
        # A resumed run reads its own cache (saved after every epoch), so a moved earlier one is no loss.
        if self.resume_payload is None and config.teacher_cache and not Path(config.teacher_cache).is_file():
            raise FileNotFoundError(f"teacher cache {config.teacher_cache} not found")
        # Maps a batch of 0-1 RGB images (on the CPU) to the teacher's features (N, D); each
        # training image goes through it once, the first time a batch holds it (TeacherFeatures).
        self.teacher = teacher if config.loss.distill_weight > 0 else None
        self.teacher_features: TeacherFeatures | None = None
        if sync_bn is not None:
            config.sync_bn = sync_bn
        self.sync_bn = config.sync_bn
        self.show_progress = show_progress
        self.context: DistContext = distributed.init_distributed(config.device)
        self.device = self.context.device
        self.console = console or Console(stderr=True)
        self.use_amp = config.solver.amp and self.device.type == "cuda"
        self.use_cpu_bf16 = config.solver.cpu_bf16 and self.device.type == "cpu"
        self.autocast_dtype = torch.bfloat16 if self.use_cpu_bf16 else torch.float16
        # The log is written by the main process only; the others stay quiet.
        self.quiet = not self.context.is_main
        self._setup()

    # ---------------------------------------------------------------- setup

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(escape(message), highlight=False)

    def warn(self, message: str) -> None:
        if not self.quiet:
            warnings.warn(message, UserWarning, stacklevel=3)
            self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    def _setup(self) -> None:
        from fanet.data import build_train_loader  # noqa: PLC0415 (heavy, optional)
        from fanet.data.loaders import build_training_set  # noqa: PLC0415

        config = self.config
        test_name = config.data.test_dataset or config.data.dataset
        if config.eval_period > 0 and test_name is DatasetName.PETA:
            raise ValueError(
                "peta is a training source without a query/gallery split: name a dataset with one first "
                "(--dataset cuhk03+peta), or pass --test-dataset, or --eval-period 0"
            )
        if config.dg_root is not None:
            from fanet.data.peta import read_dg_splits  # noqa: PLC0415

            read_dg_splits(config.dg_root)  # a wrong folder fails now, not at the first evaluation
        self.dataset = build_training_set(config.data)
        # After the data: a wrong --data-root is the mistake to report, not a missing weights file.
        imagenet_file = resolve_imagenet_weights(config)
        self.num_classes = self.dataset.num_train_pids
        self.num_cameras = self.dataset.num_train_cams
        self.distilled_pids = distilled_pids(config, self.dataset)
        if config.model.use_background and self.num_cameras == 0:
            self.warn(
                f"dataset {config.data.source_label} at {config.data.root} has no camera IDs: the "
                f"background (camera-ID) branch, the interaction and the target attention loss are "
                f"switched off (only the foreground branch is trained)"
            )
            config.model = disable_background_branch(config.model)
        if self.resume_payload is not None:
            self._check_resume_compatible(self.resume_payload)
        init_payload: dict[str, Any] | None = None
        if config.init_from is not None and self.resume_payload is None:
            if config.random_init:
                raise ValueError("choose either --init-from or random init, not both")
            init_payload = read_training_checkpoint(config.init_from)
            self._check_resume_compatible(init_payload, action="start from")
            self.log(f"weights from {config.init_from} (epoch {int(init_payload['epoch'])} of its run)")
        if config.random_init:
            self.warn(
                "training from RANDOM initialisation (--random-init): no ImageNet backbone weights, "
                "so results are not comparable with the paper's"
            )
        elif config.init_from is None:
            self.log(f"{get_backbone(config.model.backbone.value).title} weights: {imagenet_file}")

        # Identical initial weights on every replica (DDP also broadcasts rank 0's weights).
        seed_everything(config.seed)
        try:
            model = FANet(config.model, self.num_classes, self.num_cameras, imagenet_weights=imagenet_file)
        except (RuntimeError, OSError, pickle.UnpicklingError) as exc:
            if imagenet_file is None:
                raise
            reason = state_dict_mismatch(exc)
            backbone = get_backbone(config.model.backbone.value)
            raise PretrainedWeightsError(
                f"{imagenet_file} is not a torchvision {backbone.title.removeprefix('ImageNet ')} ImageNet "
                f"state dict ({reason}); get {backbone.weights_file} from {backbone.weights_source}"
            ) from None
        if init_payload is not None:
            model.load_state_dict(init_payload["state_dict"])
        if config.solver.freeze_low_level:
            model.freeze_low_level()
        if config.solver.mixstyle_prob > 0:
            attach_mixstyle(model, config.solver.mixstyle_prob, config.solver.mixstyle_alpha)
        if self.sync_bn and self.context.is_distributed:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self.warn("SyncBatchNorm needs CUDA; training with per-process BatchNorm")
        # oneDNN runs the CPU convolutions (the depthwise ones of OSNet/MobileNetV2 most of all)
        # faster on NHWC tensors; the weights follow the input's layout. GPUs keep theirs.
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.criterion = FANetLoss(config.model, config.loss)
        self.optimizer = self._build_optimizer(self.model)
        self.scheduler = WarmupMultiStepLR.from_config(self.optimizer, config.solver)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)
        self.train_model: nn.Module = self.model
        if self.context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)

        # Data order and augmentation differ per replica; the PK sampler shards by rank itself.
        seed_everything(config.seed + self.context.rank)
        self.train_loader = build_train_loader(
            self.dataset,
            config.data,
            seed=config.seed,
            rank=self.context.rank,
            world_size=self.context.world_size,
            pin_memory=self.device.type == "cuda",
        )
        self.start_epoch = 0
        self.iteration = 0
        self.best_map: float | None = None
        if self.resume_payload is not None:
            self._restore(self.resume_payload)
        else:
            self.run_dir = next_free_run_dir(config.output_dir) if self.context.is_main else Path(config.output_dir)
            self.run_dir = Path(distributed.broadcast_object(str(self.run_dir), self.context))
        self._test_loaders: tuple[Any, Any] | None = None

    def _build_optimizer(self, model: FANet) -> torch.optim.Optimizer:
        solver = self.config.solver
        groups = [
            {"params": model.pretrained_parameters(), "lr": solver.base_lr * solver.pretrained_lr_mult,
             "name": "pretrained"},
            {"params": model.new_parameters(), "lr": solver.base_lr, "name": "new"},
        ]
        if solver.optimizer is OptimizerName.ADAM:
            return torch.optim.Adam(groups, lr=solver.base_lr, betas=solver.adam_betas,
                                    weight_decay=solver.weight_decay)
        if solver.optimizer is OptimizerName.ADAMW:
            return torch.optim.AdamW(groups, lr=solver.base_lr, betas=solver.adam_betas,
                                     weight_decay=solver.weight_decay)
        return torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum,
                               weight_decay=solver.weight_decay)

    def _check_resume_compatible(self, payload: dict[str, Any], action: str = "resume") -> None:
        changed = model_config_differences(payload["config"], self.config.model)
        if changed:
            raise CheckpointError(f"cannot {action}: the checkpoint's model config differs in {', '.join(changed)}")
        expected = (int(payload["num_classes"]), int(payload["num_cameras"]))
        if expected != (self.num_classes, self.num_cameras):
            raise CheckpointError(
                f"cannot {action}: the checkpoint was trained with {expected[0]} ids / {expected[1]} "
                f"cameras, the dataset has {self.num_classes} / {self.num_cameras}"
            )

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["state_dict"])
        configured = {name: getattr(self.scheduler, name) for name in SCHEDULE_FIELDS}
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self._follow_configured_schedule(configured)
        if self.use_amp and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.start_epoch = int(payload["epoch"])
        self.iteration = int(payload["iteration"])
        best = payload.get("best_map")
        self.best_map = None if best is None else float(best)
        rng_states = payload["rng"]
        if len(rng_states) != self.context.world_size:
            self.warn(
                f"resuming a {len(rng_states)}-process run with {self.context.world_size} processes: "
                f"the data order and augmentation will not replay exactly"
            )
        restore_rng_state(rng_states[self.context.rank % len(rng_states)], self.device)
        self.log(f"resumed {self.run_dir} after epoch {self.start_epoch} (iteration {self.iteration})")

    def _follow_configured_schedule(self, configured: dict[str, Any]) -> None:
        # A resumed run may be given a longer schedule (more epochs, later milestones, another
        # lr): the learning rate then follows the config, not the schedule saved in the
        # checkpoint. With the same settings nothing changes and the run replays exactly.
        changed = [name for name, value in configured.items() if getattr(self.scheduler, name) != value]
        if not changed:
            return
        self.scheduler.__dict__.update(configured)
        lrs = self.scheduler.get_lr()
        for group, base, lr in zip(self.optimizer.param_groups, configured["base_lrs"], lrs, strict=True):
            group["initial_lr"], group["lr"] = base, lr
        self.scheduler._last_lr = list(lrs)
        self.log(f"resuming with the configured schedule (changed: {', '.join(changed)})")

    # ---------------------------------------------------------------- training

    def iterations_per_epoch(self) -> int:
        count = len(self.train_loader)
        if self.config.max_iters_per_epoch is not None:
            count = min(count, self.config.max_iters_per_epoch)
        if self.context.is_distributed:
            # Every replica must run the same number of steps or the gradient all-reduce hangs.
            box = torch.tensor([count], device=self.device)
            torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN)
            count = int(box.item())
        return count

    def train(self) -> TrainResult:
        config = self.config
        results: list[EpochResult] = []
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            self._truncate_results(self.start_epoch)
        self.log(
            f"training FA-Net on {config.data.source_label} ({self.num_classes} ids, {self.num_cameras} "
            f"cameras) for {config.solver.epochs} epochs on {self.device} x{self.context.world_size}, "
            f"init={init_label(config)}, run folder {self.run_dir}"
        )
        iterations = self.iterations_per_epoch()
        if self.teacher is not None:
            self.teacher_features = TeacherFeatures(
                self.teacher, Path(config.teacher or "teacher").name, self.dataset.train,
                config.data.height, config.data.width, self.run_dir / TEACHER_CACHE_FILE, log=self.log,
                earlier_cache=earlier_teacher_cache(config),
            )  # fmt: skip
        try:
            if self.start_epoch == 0 and config.solver.recalibrate_bn_batches > 0:
                self._recalibrate_batchnorm(config.solver.recalibrate_bn_batches)
            for epoch in range(self.start_epoch, config.solver.epochs):
                result = self._train_epoch(epoch, iterations)
                if self._should_evaluate(epoch):
                    # An evaluation draws from the RNGs (its loaders' seeds): with their states put
                    # back, the next epoch is the same whether or not this one was evaluated (a
                    # run resumed from a shorter run's final, evaluated epoch replays exactly).
                    rng_before = capture_rng_state(self.device)
                    result.metrics = self.evaluate()
                    restore_rng_state(rng_before, self.device)
                    self._log_metrics(result.metrics)
                results.append(result)
                self._end_epoch(epoch, result)
            final = self._finish()
        finally:
            distributed.shutdown(self.context)
        return TrainResult(self.run_dir, results, self.best_map, final)

    def _recalibrate_batchnorm(self, batches: int) -> None:
        _set_loader_epoch(self.train_loader, 0)
        images = (
            batch["image"].to(self.device).contiguous(memory_format=self.memory_format)
            for batch in itertools.islice(self.train_loader, batches)
        )
        seen = recalibrate_batchnorm(self.model, images)
        self.log(f"BatchNorm statistics re-estimated on {seen} training batches")

    def _train_epoch(self, epoch: int, iterations: int) -> EpochResult:
        self.train_model.train()
        _set_loader_epoch(self.train_loader, epoch)
        lrs = {group.get("name"): group["lr"] for group in self.optimizer.param_groups}
        sums = {term: torch.zeros((), device=self.device, dtype=torch.float64) for term in LOSS_TERMS}
        counts = dict.fromkeys(LOSS_TERMS, 0)
        start = time.perf_counter()
        with self._progress() as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{self.config.solver.epochs}", total=iterations)
            for step, batch in enumerate(self.train_loader):
                if step >= iterations:
                    break
                terms = self.train_step(batch)
                for term, value in terms.items():
                    sums[term] += value.detach().double()
                    counts[term] += 1
                self.iteration += 1
                if step % 10 == 0 or step == iterations - 1:
                    progress.update(task, completed=step + 1, loss=float(terms["total"].detach()))
                else:
                    progress.advance(task)
        if not math.isfinite(float(sums["total"])):
            raise FloatingPointError(f"the training loss is not finite in epoch {epoch + 1}; lower the lr")
        losses = {term: float(sums[term]) / counts[term] for term in LOSS_TERMS if counts[term]}
        losses = distributed.all_reduce_mean(losses, self.context)
        return EpochResult(
            epoch=epoch + 1,
            lr=lrs.get("new", self.optimizer.param_groups[-1]["lr"]),
            pretrained_lr=lrs.get("pretrained", self.optimizer.param_groups[0]["lr"]),
            losses=losses,
            seconds=time.perf_counter() - start,
        )

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        """One SGD step on a loader batch (a dict with ``image``, ``pid``, ``camid``); returns the
        loss terms of the batch (before the step)."""
        self.train_model.train()
        teacher_features = distill_rows = None
        if self.teacher_features is not None:
            indices = batch["index"]
            if self.distilled_pids is not None:
                distill_rows = self.distilled_pids[batch["pid"]]
                indices = indices[distill_rows]
                distill_rows = distill_rows.to(self.device, non_blocking=True)
            if len(indices) >= 2:
                teacher_features = self.teacher_features(indices).to(self.device, non_blocking=True)
        images = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        pids = batch["pid"].to(self.device, non_blocking=True)
        camids = batch["camid"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.use_amp or self.use_cpu_bf16):
            output = self.train_model(images)
            terms = self.criterion(output, pids, camids, teacher_features, distill_rows)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def _progress(self) -> Progress:
        return _ProgressWithLoss(console=self.console, disable=self.quiet or not self.show_progress)

    def _should_evaluate(self, epoch: int) -> bool:
        period = self.config.eval_period
        if period <= 0:
            return False
        return (epoch + 1) % period == 0 or epoch + 1 == self.config.solver.epochs

    # ---------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """mAP and CMC of the current weights on the test split (main process only)."""
        from fanet.engine.evaluator import build_test_data, evaluate_model  # noqa: PLC0415

        result = None
        if self.context.is_main:
            if self._test_loaders is None:
                self._test_loaders = build_test_data(self.config, train_dataset=self.dataset)
            query_loader, gallery_loader = self._test_loaders
            try:
                result = evaluate_model(self.model, query_loader, gallery_loader, flip=True)
            except ValueError as exc:  # e.g. no query has a match in another camera
                self.warn(f"evaluation skipped: {exc}")
                result = None
            finally:
                self.model.train()
        metrics = result.metrics() if result is not None else {}
        if self.context.is_main and self.config.dg_root is not None:
            metrics.update(self._evaluate_dg())
        return distributed.broadcast_object(metrics, self.context)

    def _evaluate_dg(self) -> dict[str, float]:
        """The domain-generalisation protocol's mean R1/mAP (cameras the run never saw)."""
        from fanet.evaluation.dg import evaluate_dg, fanet_embedder  # noqa: PLC0415

        try:
            embed = fanet_embedder(self.model, self.config.data.height, self.config.data.width)
            result = evaluate_dg(embed, self.config.dg_root)
        finally:
            self.model.train()
        return {"DG_R1": result.mean_rank1, "DG_mAP": result.mean_mAP}

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        if "mAP" in metrics:
            self.log(
                f"  mAP {metrics['mAP']:.2%}  R1 {metrics['R1']:.2%}  R5 {metrics['R5']:.2%}  "
                f"R10 {metrics['R10']:.2%}" + ("  (random init)" if self.config.random_init else "")
            )
        if "DG_R1" in metrics:
            self.log(f"  DG protocol: mean R1 {metrics['DG_R1']:.2%}  mean mAP {metrics['DG_mAP']:.2%}")

    # ---------------------------------------------------------------- checkpoints and logs

    def checkpoint_payload(self, epoch: int, rng_states: list[dict[str, Tensor]]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": TRAINING_KIND,
            "config": model_config_to_dict(self.config.model),
            "train_config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "num_cameras": self.num_cameras,
            "init": init_label(self.config),
            # SyncBatchNorm keeps BatchNorm's names, so this loads into a plain FANet.
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else {},
            "epoch": epoch + 1,  # completed epochs; the sampler epoch to resume with
            "iteration": self.iteration,
            "best_map": self.best_map,
            "world_size": self.context.world_size,
            "rng": rng_states,
        }

    def _end_epoch(self, epoch: int, result: EpochResult) -> None:
        self.scheduler.step()
        if self.teacher_features is not None and self.context.is_main:
            self.teacher_features.save()
        mean_ap = result.metrics.get("mAP")
        is_best = mean_ap is not None and (self.best_map is None or mean_ap > self.best_map)
        if is_best:
            self.best_map = mean_ap
        # RNG states are captured after the epoch so the next epoch replays.
        rng_states = distributed.all_gather_objects(capture_rng_state(self.device), self.context)
        if self.context.is_main:
            payload = self.checkpoint_payload(epoch, rng_states)
            save_atomically(payload, self.run_dir / LAST_CHECKPOINT)
            if is_best:
                save_atomically(payload, self.run_dir / BEST_CHECKPOINT)
                save_inference_checkpoint(self.model, self.run_dir / BEST_INFERENCE, **self._meta(epoch))
            self._append_result(result)
            text = "  ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
            note = "  [random init]" if self.config.random_init else ""
            self.log(f"epoch {result.epoch}: lr {result.lr:.4g}  {text}  ({result.seconds:.1f}s){note}")
        distributed.barrier(self.context)

    def _meta(self, epoch: int) -> dict[str, Any]:
        return {
            "init": init_label(self.config),
            "epochs_trained": epoch + 1,
            "dataset": self.config.data.source_label,
            "best_map": self.best_map,
            "input_size": [self.config.data.height, self.config.data.width],
        }

    def _finish(self) -> Path | None:
        if not self.context.is_main:
            return None
        path = save_inference_checkpoint(
            self.model, self.run_dir / FINAL_INFERENCE, **self._meta(self.config.solver.epochs - 1)
        )
        self.log(f"inference checkpoint: {path}" + ("  [RANDOM INIT]" if self.config.random_init else ""))
        return path

    def _append_result(self, result: EpochResult) -> None:
        path = self.run_dir / RESULTS_FILE
        new_file = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULTS_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(result.csv_row(init_label(self.config)))

    def _truncate_results(self, completed_epochs: int) -> None:
        """On resume, drop rows of epochs after the checkpoint (they will be trained again)."""
        path = self.run_dir / RESULTS_FILE
        if not path.exists():
            return
        rows = [row for row in read_results_csv(path) if int(row["epoch"]) <= completed_epochs]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULTS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


class _ProgressWithLoss(Progress):
    """A rich progress bar with the running loss."""

    def __init__(self, console: Console, disable: bool) -> None:
        super().__init__(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
            console=console,
            disable=disable,
        )

    def add_task(self, description: str, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("loss", float("nan"))
        return super().add_task(description, **kwargs)

