"""FA-Net training engine: the paper's lr schedule, a real (tiny) training run on real photos,
exact resume, run-folder files, the no-camera fallback, the pretrained-weights error and the
``reid-app train`` / ``reid-app evaluate`` commands.

Everything runs from explicit random init (no ImageNet ResNet50 here) at 64x32 with P x K = 4 x 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fanet.checkpoint import CheckpointError, load_inference_model, read_checkpoint
from fanet.config import DataConfig, SolverConfig, TALVariant, TrainConfig
from fanet.engine.mixstyle import MixStyle
from fanet.engine.scheduler import WarmupMultiStepLR
from fanet.engine.trainer import (
    PretrainedWeightsError,
    Trainer,
    load_training_model,
    read_results_csv,
)
from fanet.weights import RESNET50_IMAGENET_FILE, RESNET50_IMAGENET_URL
from reid_app.cli import typer_app
from reid_app.errors import ReidAppError

HEIGHT, WIDTH = 64, 32


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def tiny_config(root: Path, output: Path, **overrides) -> TrainConfig:
    solver = overrides.pop("solver", SolverConfig(epochs=2))
    data = overrides.pop("data", None) or DataConfig(
        root=str(root), height=HEIGHT, width=WIDTH, num_identities=4, num_instances=2, workers=0
    )
    settings = {"random_init": True, "eval_period": 0, "max_iters_per_epoch": 2, **overrides}
    return TrainConfig(data=data, solver=solver, output_dir=str(output), **settings)


# --------------------------------------------------------------------------------------------
# Schedule


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, 0.06), (9, 0.06 + 0.54 * 9 / 10), (10, 0.6), (39, 0.6), (40, 0.06), (79, 0.06), (80, 0.006),
     (99, 0.006)],
)
def test_scheduler_follows_the_paper(epoch: int, expected: float) -> None:
    solver = SolverConfig()  # the paper's settings
    new = torch.nn.Parameter(torch.zeros(1))
    pretrained = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD(
        [{"params": [pretrained], "lr": solver.base_lr * solver.pretrained_lr_mult},
         {"params": [new], "lr": solver.base_lr}],
        lr=solver.base_lr, momentum=solver.momentum,
    )
    scheduler = WarmupMultiStepLR.from_config(optimizer, solver)
    for _ in range(epoch):
        optimizer.step()
        scheduler.step()
    pretrained_lr, new_lr = (group["lr"] for group in optimizer.param_groups)
    assert new_lr == pytest.approx(expected, rel=1e-9)
    assert pretrained_lr == pytest.approx(0.1 * expected, rel=1e-9)


# --------------------------------------------------------------------------------------------
# Training


def test_loss_goes_down_on_repeated_batches(tiny_market_root: Path, tmp_path: Path) -> None:
    """12 SGD steps on one PK batch of 4 identities: the full FA-Net objective must fall."""
    config = tiny_config(
        tiny_market_root, tmp_path / "run",
        solver=SolverConfig(base_lr=0.1, warmup_start_lr=0.1, warmup_epochs=0, milestones=()),
    )
    trainer = Trainer(config, show_progress=False)
    # The optimiser's two groups are exactly the model's pretrained and new parameters.
    group_ids = [{id(p) for p in group["params"]} for group in trainer.optimizer.param_groups]
    assert group_ids[0] == {id(p) for p in trainer.model.pretrained_parameters()}
    assert group_ids[1] == {id(p) for p in trainer.model.new_parameters()}
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.01, 0.1])

    batch = next(iter(trainer.train_loader))
    assert batch["image"].shape == (8, 3, HEIGHT, WIDTH)
    assert len(set(batch["pid"].tolist())) == 4
    losses = [trainer.train_step(batch) for _ in range(12)]
    totals, person, camera = (
        [float(terms[name].detach()) for terms in losses] for name in ("total", "person_id", "camera_id")
    )
    assert all(math.isfinite(v) for v in totals)
    assert set(losses[0]) == {"total", "person_id", "camera_id", "target_attention"}
    # Measured (1 thread): total 1.95 -> 0.41, person-ID 1.51 -> 0.10, camera-ID 1.91 -> 0.22.
    assert totals[-1] < 0.5 * totals[0], totals
    assert person[-1] < 0.3 * person[0], person
    assert camera[-1] < 0.5 * camera[0], camera


def test_adamw_decays_weights_apart_from_the_gradient(tiny_market_root: Path, tmp_path: Path) -> None:
    """A classifier row whose person is not in the batch gets (almost) no loss gradient. Adam adds
    its weight decay to the gradient and normalises the sum, so such a row moves by ~lr a coordinate
    every step; AdamW's decoupled decay shrinks it by lr x weight decay only. With 1,304 people (16 a
    batch) Adam kept the rows at norm ~0.25 and the logits four times too small."""
    moved = {}
    for name in ("adam", "adamw"):
        solver = SolverConfig(optimizer=name, base_lr=3.5e-4, warmup_start_lr=3.5e-4, warmup_epochs=0, milestones=())
        trainer = Trainer(tiny_config(tiny_market_root, tmp_path / name, solver=solver), show_progress=False)
        rows = trainer.model.person_classifiers[0].weight
        before = rows.detach().clone()
        for _ in range(10):  # steps in which this row gets no loss gradient at all
            for group in trainer.optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = torch.zeros_like(parameter)
            trainer.optimizer.step()
        moved[name] = float(((rows.detach() - before).norm(dim=1) / before.norm(dim=1)).mean())
    assert type(Trainer(tiny_config(tiny_market_root, tmp_path / "w", solver=SolverConfig(optimizer="adamw")),
                        show_progress=False).optimizer) is torch.optim.AdamW  # fmt: skip
    assert moved["adamw"] < 1e-4, moved  # (1 - 3.5e-4 x 5e-4)^10
    assert moved["adam"] > 0.05, moved


def test_cpu_bf16_trains_in_bfloat16_and_keeps_float32_weights(tiny_market_root: Path, tmp_path: Path) -> None:
    """--cpu-bf16: the forward pass runs under bfloat16 autocast, the weights and the optimiser stay
    float32, and the objective still falls on a repeated batch."""
    from reid_app.commands.fanet_cmds import build_train_config  # noqa: PLC0415

    base = tiny_config(
        tiny_market_root, tmp_path / "run",
        solver=SolverConfig(base_lr=0.1, warmup_start_lr=0.1, warmup_epochs=0, milestones=()),
    )
    assert base.solver.cpu_bf16 is False  # off unless asked for
    config = build_train_config(base, cpu_bf16=True)
    assert TrainConfig.from_dict(config.to_dict()).solver.cpu_bf16 is True
    trainer = Trainer(config, show_progress=False)
    seen: list[torch.dtype] = []
    hook = trainer.model.low_level.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = next(iter(trainer.train_loader))
    totals = [float(trainer.train_step(batch)["total"].detach()) for _ in range(12)]
    hook.remove()
    assert set(seen) == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < 0.5 * totals[0], totals


def test_freeze_low_level_keeps_the_stem_as_loaded_and_trains_the_rest(
    tiny_market_root: Path, tmp_path: Path
) -> None:
    """--freeze-low-level: the shared low-level module's weights and norm statistics stay exactly as
    loaded through training steps (its norms in eval mode even in training mode), it is in no
    optimiser group, and the branches and head still learn."""
    from reid_app.commands.fanet_cmds import build_train_config  # noqa: PLC0415

    base = tiny_config(
        tiny_market_root, tmp_path / "run",
        solver=SolverConfig(base_lr=0.05, warmup_start_lr=0.05, warmup_epochs=0, milestones=()),
    )
    assert base.solver.freeze_low_level is False  # the paper trains every layer
    config = build_train_config(base, freeze_low_level=True)
    assert TrainConfig.from_dict(config.to_dict()).solver.freeze_low_level is True
    trainer = Trainer(config, show_progress=False)
    model = trainer.model
    low_before = {k: v.clone() for k, v in model.low_level.state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.foreground_branch.state_dict().items()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.low_level.parameters()}
    assert {id(p) for p in model.foreground_branch.parameters()} <= optimised

    batch = next(iter(trainer.train_loader))
    for _ in range(3):
        trainer.train_step(batch)
    assert model.training and not model.low_level.training
    assert all(torch.equal(v, low_before[k]) for k, v in model.low_level.state_dict().items())
    changed = [k for k, v in model.foreground_branch.state_dict().items() if not torch.equal(v, rest_before[k])]
    assert changed


def test_mixstyle_mixes_feature_styles_only_while_training(tiny_market_root: Path, tmp_path: Path) -> None:
    """--mixstyle-prob: while training, the low-level module's output has each image's channel
    statistics replaced by a mix of its own and another image's (so every per-channel mean lies
    within the batch's range, and they change); in eval mode and when off, the output is the
    module's own; bad values are one-line errors."""
    from reid_app.commands.fanet_cmds import build_train_config  # noqa: PLC0415

    base = tiny_config(tiny_market_root, tmp_path / "run")
    assert base.solver.mixstyle_prob == 0.0  # not the paper's, so off by default
    config = build_train_config(base, mixstyle_prob=1.0)
    assert TrainConfig.from_dict(config.to_dict()).solver.mixstyle_prob == 1.0
    trainer = Trainer(config, show_progress=False)
    model = trainer.model
    images = next(iter(trainer.train_loader))["image"].to(memory_format=torch.channels_last)
    model.train()
    with torch.no_grad():
        own = model.low_level.forward(images)  # forward() bypasses the hooks
        mixed = model.low_level(images)
    assert mixed.shape == own.shape and not torch.allclose(mixed, own, atol=1e-4)
    first_stage = next(iter(model.foreground_branch.children()))  # the branch's hook
    with torch.no_grad():
        branch_input = model.low_level.forward(images)
        assert not torch.allclose(first_stage(branch_input), first_stage.forward(branch_input), atol=1e-4)
    own_means, mixed_means = own.mean(dim=(2, 3)), mixed.mean(dim=(2, 3))
    assert (mixed_means >= own_means.min(dim=0).values - 1e-4).all()
    assert (mixed_means <= own_means.max(dim=0).values + 1e-4).all()
    assert math.isfinite(float(trainer.train_step(next(iter(trainer.train_loader)))["total"]))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.low_level(images), model.low_level.forward(images))

    plain = Trainer(base, show_progress=False).model.train()
    with torch.no_grad():
        assert torch.equal(plain.low_level(images), plain.low_level.forward(images))
    # MixStyle is a module of the model with no state: the checkpoint is that of a plain model.
    assert isinstance(model.mixstyle, MixStyle) and getattr(plain, "mixstyle", None) is None
    assert model.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ReidAppError, match="mixstyle_prob must be in") as refused:
        build_train_config(base, mixstyle_prob=1.5)
    assert "\n" not in str(refused.value)


def straight_and_split_runs(root: Path, work: Path, solver: SolverConfig) -> tuple[Trainer, Path]:
    """The same 2-epoch run made straight (``work/straight``, its trainer returned) and as 1 epoch
    then a resume from its last.pt (``work/split``; its epoch 1, the last, is evaluated, the
    straight run's is not)."""
    straight = Trainer(tiny_config(root, work / "straight", solver=solver, eval_period=2), show_progress=False)
    straight.train()
    first = tiny_config(root, work / "split", eval_period=2, solver=SolverConfig(**{**vars(solver), "epochs": 1}))
    Trainer(first, show_progress=False).train()
    resumed_config = TrainConfig.from_dict(json.loads((work / "split" / "config.json").read_text()))
    assert resumed_config.solver == first.solver  # the run's own config, MixStyle included
    resumed_config.solver.epochs = 2
    resumed = Trainer(resumed_config, resume=work / "split" / "last.pt", show_progress=False).train()
    assert resumed.run_dir == work / "split"  # the resumed run continues the same folder
    return straight, work / "split"


def assert_same_weights(first: Path, second: Path) -> None:
    first_state, second_state = read_checkpoint(first)["state_dict"], read_checkpoint(second)["state_dict"]
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)


def test_training_run_writes_files_and_resumes_exactly(tiny_market_root: Path, tmp_path: Path) -> None:
    """2 epochs in one go == 1 epoch, then resume from last.pt for the 2nd: same losses, same weights."""
    solver = SolverConfig(epochs=2, base_lr=0.05, warmup_start_lr=0.005, warmup_epochs=2)
    straight, split = straight_and_split_runs(tiny_market_root, tmp_path, solver)
    run = straight.run_dir

    for name in ("config.json", "results.csv", "last.pt", "best.pt", "model_final.pt", "model_best.pt"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["random_init"] is True and config["data"]["height"] == HEIGHT
    rows = read_results_csv(run / "results.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(row["init"] == "random" for row in rows)
    # Warmup 0.005 -> 0.05 over 2 epochs: epoch 1 at 0.005, epoch 2 at 0.0275; pretrained at 0.1x.
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.005, 0.0275])
    assert [float(row["pretrained_lr"]) for row in rows] == pytest.approx([0.0005, 0.00275])
    for row in rows:
        for column in ("loss", "person_id_loss", "camera_id_loss", "target_attention_loss"):
            assert math.isfinite(float(row[column])), column
    assert rows[0]["mAP"] == "" and 0.0 <= float(rows[1]["mAP"]) <= 1.0 and 0.0 <= float(rows[1]["R1"]) <= 1.0

    # last.pt is a plain weights_only checkpoint with everything needed to resume.
    payload = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert payload["epoch"] == 2 and payload["iteration"] == 4 and payload["kind"] == "training"
    assert {"optimizer", "scheduler", "scaler", "rng", "train_config"} <= set(payload)
    assert payload["scheduler"]["last_epoch"] == 2
    assert isinstance(payload["rng"][0]["torch"], torch.Tensor)

    # The resumed run replays epoch 2 bit for bit.
    split_rows = read_results_csv(split / "results.csv")
    assert [row["epoch"] for row in split_rows] == ["1", "2"]
    for column in ("loss", "person_id_loss", "camera_id_loss", "target_attention_loss", "lr", "mAP"):
        assert split_rows[1][column] == rows[1][column], column
    assert_same_weights(run / "last.pt", split / "last.pt")
    # The split run's epoch 1 was evaluated (its last) and the straight run's was not: the
    # evaluation leaves the RNGs as it found them, so the two runs end in the same RNG state.
    straight_rng = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["rng"][0]
    resumed_rng = torch.load(split / "last.pt", map_location="cpu", weights_only=True)["rng"][0]
    assert all(torch.equal(straight_rng[k], resumed_rng[k]) for k in straight_rng)

    # The final inference checkpoint is foreground-only and embeds like the trained model.
    inference = load_inference_model(run / "model_final.pt")
    assert inference.background_branch is None
    full, _ = load_training_model(run / "last.pt")
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(inference(images), full(images))


def test_a_run_with_mixstyle_resumes_exactly(tiny_market_root: Path, tmp_path: Path) -> None:
    """MixStyle draws its coins, mixing weights and partners from torch's RNG, which checkpoints
    save: 2 epochs straight == 1 epoch then resume, bit for bit, with MixStyle mixing every batch."""
    solver = SolverConfig(epochs=2, base_lr=0.05, warmup_start_lr=0.005, warmup_epochs=2, mixstyle_prob=1.0)
    straight, split = straight_and_split_runs(tiny_market_root, tmp_path, solver)
    assert isinstance(straight.model.mixstyle, MixStyle)
    run = straight.run_dir
    assert read_results_csv(split / "results.csv")[1]["loss"] == read_results_csv(run / "results.csv")[1]["loss"]
    assert_same_weights(run / "last.pt", split / "last.pt")


def test_missing_pretrained_file_is_one_clear_error(tiny_market_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / RESNET50_IMAGENET_FILE
    config = tiny_config(tiny_market_root, tmp_path / "run", random_init=False, pretrained=str(missing))
    with pytest.raises(PretrainedWeightsError) as info:
        Trainer(config, show_progress=False)
    message = str(info.value)
    assert "\n" not in message
    for part in (RESNET50_IMAGENET_FILE, str(missing), RESNET50_IMAGENET_URL, "--random-init"):
        assert part in message
    assert not (tmp_path / "run").exists()

    # A file that is there but is not a ResNet50 state dict: also one line, naming it.
    corrupt = tmp_path / RESNET50_IMAGENET_FILE
    corrupt.write_bytes(b"<html>404</html>")
    config = tiny_config(tiny_market_root, tmp_path / "run", random_init=False, pretrained=str(corrupt))
    with pytest.raises(PretrainedWeightsError, match="not a torchvision ResNet50") as info:
        Trainer(config, show_progress=False)
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)


def test_default_pretrained_lookup_names_the_search_folders(
    tiny_market_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fanet.weights import REPO_WEIGHTS_DIR

    if (REPO_WEIGHTS_DIR / RESNET50_IMAGENET_FILE).exists():
        pytest.skip("the ImageNet ResNet50 file is present in weights/")
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path / "weights_dir"))
    config = tiny_config(tiny_market_root, tmp_path / "run", random_init=False)
    with pytest.raises(PretrainedWeightsError) as info:
        Trainer(config, show_progress=False)
    assert str(tmp_path / "weights_dir" / RESNET50_IMAGENET_FILE) in str(info.value)
    assert str(REPO_WEIGHTS_DIR / RESNET50_IMAGENET_FILE) in str(info.value)


def test_dataset_without_cameras_switches_background_off(
    tiny_folder_root_no_cameras: Path, tmp_path: Path
) -> None:
    data = DataConfig(dataset="folder", root=str(tiny_folder_root_no_cameras), height=HEIGHT, width=WIDTH,
                      num_identities=3, num_instances=2, workers=0)
    config = tiny_config(tiny_folder_root_no_cameras, tmp_path / "run", data=data)
    assert config.model.use_background
    with pytest.warns(UserWarning, match="no camera IDs"):
        trainer = Trainer(config, show_progress=False)
    assert trainer.num_cameras == 0
    assert trainer.model.background_branch is None and not trainer.model.camera_classifiers
    assert not trainer.config.model.use_background and not trainer.config.model.use_interaction
    assert trainer.config.model.tal is TALVariant.NONE
    terms = trainer.train_step(next(iter(trainer.train_loader)))
    assert set(terms) == {"person_id", "total"} and math.isfinite(float(terms["total"].detach()))


# --------------------------------------------------------------------------------------------
# CLI


def _metrics(output: str) -> dict[str, float]:
    """The last line of ``reid-app evaluate``: "R1 x%  R5 x%  R10 x%  R20 x%  mAP x%"."""
    fields = output.strip().splitlines()[-1].split()
    return {name: float(value.rstrip("%")) for name, value in zip(fields[::2], fields[1::2], strict=True)}


def test_cli_train_cross_dataset_then_evaluate(
    tiny_market_root: Path, tiny_duke_root: Path, tmp_path: Path
) -> None:
    """Train on Market-1501, test on DukeMTMC-reID (Table III protocol), then evaluate the
    saved inference checkpoint on both with ``reid-app evaluate``."""
    runner = CliRunner()
    run = tmp_path / "cli_run"
    result = runner.invoke(typer_app, [
        "train", "--dataset", "market1501", "--data-root", str(tiny_market_root), "--random-init",
        "--test-dataset", "dukemtmc", "--test-root", str(tiny_duke_root),
        "--epochs", "1", "--max-iters-per-epoch", "2", "--height", str(HEIGHT), "--width", str(WIDTH),
        "--batch-p", "4", "--batch-k", "2", "--workers", "0", "--eval-period", "1", "--lr", "0.05",
        "--output", str(run), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "RANDOM INIT" in result.output
    rows = read_results_csv(run / "results.csv")
    assert len(rows) == 1 and rows[0]["init"] == "random" and rows[0]["mAP"] != ""
    config = json.loads((run / "config.json").read_text())
    assert config["solver"]["base_lr"] == 0.05 and config["solver"]["warmup_start_lr"] == pytest.approx(0.005)
    assert config["data"]["num_identities"] == 4 and config["max_iters_per_epoch"] == 2
    assert config["data"]["test_dataset"] == "dukemtmc"

    # Resume the run for a second epoch from the command line.
    result = runner.invoke(typer_app, ["train", "--resume", str(run), "--epochs", "2", "--eval-period", "0"])
    assert result.exit_code == 0, result.output
    rows = read_results_csv(run / "results.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[1]["mAP"] == ""
    assert json.loads((run / "config.json").read_text())["solver"]["epochs"] == 2
    assert read_checkpoint(run / "last.pt")["iteration"] == 4

    evaluated = {}
    for dataset, root in (("dukemtmc", tiny_duke_root), ("market1501", tiny_market_root)):
        result = runner.invoke(typer_app, [
            "evaluate", "--checkpoint", str(run / "model_final.pt"), "--dataset", dataset,
            "--data-root", str(root), "--workers", "0", "--device", "cpu",
        ])
        assert result.exit_code == 0, result.output
        assert "RANDOM init" in result.output
        evaluated[dataset] = metrics = _metrics(result.output)
        assert set(metrics) == {"R1", "R5", "R10", "R20", "mAP"}
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
        assert metrics["R1"] <= metrics["R5"] <= metrics["R10"] <= metrics["R20"]
    # The trainer's evaluation (epoch 1) ran on DukeMTMC-reID: best.pt / model_best.pt hold those
    # weights, and evaluating them on DukeMTMC-reID gives the same numbers.
    result = runner.invoke(typer_app, [
        "evaluate", "--checkpoint", str(run / "best.pt"), "--dataset", "dukemtmc",
        "--data-root", str(tiny_duke_root), "--workers", "0", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    best = _metrics(result.output)
    assert best["mAP"] == pytest.approx(100 * float(rows[0]["mAP"]), abs=0.006)
    assert best["R1"] == pytest.approx(100 * float(rows[0]["R1"]), abs=0.006)


def test_cli_errors_are_one_line(tiny_market_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(typer_app, [
        "train", "--dataset", "market1501", "--data-root", str(tmp_path / "missing"), "--random-init",
    ])
    assert result.exit_code != 0 and isinstance(result.exception, ReidAppError)
    assert "does not exist" in str(result.exception) and "\n" not in str(result.exception)
    # Without ImageNet weights (none offline) a wrong --data-root is still the error reported.
    result = runner.invoke(typer_app, ["train", "--dataset", "market1501", "--data-root", str(tmp_path / "missing")])
    assert isinstance(result.exception, ReidAppError) and "does not exist" in str(result.exception)
    result = runner.invoke(typer_app, [
        "train", "--dataset", "market1501", "--data-root", str(tiny_market_root),
        "--pretrained", str(tmp_path / "r50.pth"),
    ])
    assert isinstance(result.exception, ReidAppError) and RESNET50_IMAGENET_URL in str(result.exception)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    result = runner.invoke(typer_app, [
        "evaluate", "--checkpoint", str(bogus), "--dataset", "market1501", "--data-root", str(tiny_market_root),
    ])
    assert isinstance(result.exception, ReidAppError)
    assert "not a readable FA-Net checkpoint" in str(result.exception)


def test_a_checkpoint_from_before_the_backbone_field_still_resumes(tiny_market_root: Path, tmp_path: Path) -> None:
    """Checkpoints written before ``FANetConfig.backbone`` existed were ResNet50 runs: they resume."""
    config = tiny_config(tiny_market_root, tmp_path / "run", solver=SolverConfig(epochs=1))
    Trainer(config, show_progress=False).train()
    payload = read_checkpoint(tmp_path / "run" / "last.pt")
    del payload["config"]["backbone"]
    del payload["train_config"]["model"]["backbone"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    resumed = Trainer(None, resume=old, show_progress=False)
    assert resumed.start_epoch == 1 and resumed.config.model.backbone == "resnet50"
    payload["config"]["backbone"] = "mobilenetv2"
    torch.save(payload, old)
    with pytest.raises(CheckpointError, match="backbone"):
        Trainer(None, resume=old, show_progress=False)


def test_init_from_starts_a_new_stage_from_a_runs_weights(tiny_market_root: Path, tmp_path: Path) -> None:
    """``--init-from`` copies every weight of an earlier run and starts a fresh schedule at epoch 0
    in a new folder; a checkpoint of another architecture is refused in one line."""
    first = Trainer(tiny_config(tiny_market_root, tmp_path / "stage1", solver=SolverConfig(epochs=1)),
                    show_progress=False)
    first.train()
    stage1 = read_checkpoint(tmp_path / "stage1" / "last.pt")
    config = tiny_config(tiny_market_root, tmp_path / "stage2", solver=SolverConfig(epochs=1),
                         random_init=False, init_from=str(tmp_path / "stage1" / "last.pt"))
    second = Trainer(config, show_progress=False)
    assert second.start_epoch == 0 and second.run_dir == tmp_path / "stage2"
    for name, tensor in second.model.state_dict().items():
        assert torch.equal(tensor, stage1["state_dict"][name]), name
    second.train()
    rows = read_results_csv(tmp_path / "stage2" / "results.csv")
    assert [row["init"] for row in rows] == ["checkpoint"]

    # The exported model counts both stages and names the first one's initialisation.
    exported = tmp_path / "stage2.pt"
    result = CliRunner().invoke(typer_app, [
        "export", "--checkpoint", str(tmp_path / "stage2" / "last.pt"), "--inference-checkpoint", str(exported),
    ])
    assert result.exit_code == 0, result.output
    meta = read_checkpoint(exported)["meta"]
    assert meta["init"] == "random" and meta["epochs_trained"] == 2
    assert [(stage["source"], stage["epochs"]) for stage in meta["stages"]] == [("last.pt", 1), ("last.pt", 1)]

    other = tiny_config(tiny_market_root, tmp_path / "stage3", solver=SolverConfig(epochs=1), random_init=False,
                        init_from=str(tmp_path / "stage1" / "last.pt"))
    other.model = dataclasses.replace(other.model, use_hpp=False)
    with pytest.raises(CheckpointError, match="cannot start from: .*use_hpp"):
        Trainer(other, show_progress=False)
    result = CliRunner().invoke(typer_app, [
        "train", "--dataset", "market1501", "--data-root", str(tiny_market_root),
        "--init-from", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x"),
    ])
    assert isinstance(result.exception, ReidAppError) and "missing.pt" in str(result.exception)


def test_a_resumed_run_follows_a_changed_schedule(tiny_market_root: Path, tmp_path: Path) -> None:
    """Resuming with more epochs and new milestones: the lr follows the config, not the schedule
    saved in last.pt (with the same settings the replay is exact, tested above)."""
    solver = SolverConfig(epochs=1, base_lr=0.05, warmup_start_lr=0.05, warmup_epochs=0, milestones=(5,))
    Trainer(tiny_config(tiny_market_root, tmp_path / "run", solver=solver), show_progress=False).train()
    longer = TrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    longer.solver = SolverConfig(**{**vars(solver), "epochs": 2, "milestones": (1,)})
    trainer = Trainer(longer, resume=tmp_path / "run", show_progress=False)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([0.0005, 0.005])
    trainer.train()
    rows = read_results_csv(tmp_path / "run" / "results.csv")
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.05, 0.005])
    assert read_checkpoint(tmp_path / "run" / "last.pt")["scheduler"]["milestones"] == [1]


def test_average_of_two_stages_is_their_mean_and_starts_or_exports(tiny_market_root: Path, tmp_path: Path) -> None:
    """``reid-app average``: the mean (uniform, or weighted with ``--weights``) of every float
    weight of two runs of one model, integer buffers from the last, no optimiser state; the result
    starts a new stage and exports with the inputs named. Another architecture, one checkpoint, an
    inference checkpoint, wrong weights and the output overwriting an input are refused in one
    line, writing nothing."""
    for name, seed in (("a", 0), ("b", 1)):
        Trainer(tiny_config(tiny_market_root, tmp_path / name, solver=SolverConfig(epochs=1), seed=seed),
                show_progress=False).train()
    a, b = (read_checkpoint(tmp_path / name / "last.pt") for name in ("a", "b"))
    soup = tmp_path / "soup.pt"
    runner = CliRunner()
    result = runner.invoke(typer_app, ["average", str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"),
                                       "--output", str(soup)])
    assert result.exit_code == 0, result.output
    averaged = read_checkpoint(soup)
    floats = [k for k, v in a["state_dict"].items() if v.is_floating_point()]
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in floats)
    for name, tensor in averaged["state_dict"].items():
        expected = (a["state_dict"][name] + b["state_dict"][name]) / 2 if name in floats else b["state_dict"][name]
        assert torch.allclose(tensor, expected, atol=1e-7), name
    assert "optimizer" not in averaged and averaged["kind"] == "training"
    assert averaged["averaged_from"] == [{"source": "last.pt", "epoch": 1}, {"source": "last.pt", "epoch": 1}]
    # Weighted: 1,3 is a quarter of a and three quarters of b (the shares are recorded).
    weighted = tmp_path / "weighted.pt"
    result = runner.invoke(typer_app, ["average", str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"),
                                       "--weights", "1,3", "--output", str(weighted)])
    assert result.exit_code == 0 and "weighted (1,3)" in result.output, result.output
    quarter = read_checkpoint(weighted)
    for name in floats:
        expected = 0.25 * a["state_dict"][name] + 0.75 * b["state_dict"][name]
        assert torch.allclose(quarter["state_dict"][name], expected, atol=1e-6), name
    assert [entry["share"] for entry in quarter["averaged_from"]] == [0.25, 0.75]

    config = tiny_config(tiny_market_root, tmp_path / "next", solver=SolverConfig(epochs=1), random_init=False,
                         init_from=str(soup))
    following = Trainer(config, show_progress=False)
    for name, tensor in following.model.state_dict().items():
        assert torch.equal(tensor, averaged["state_dict"][name]), name
    exported = tmp_path / "soup_inference.pt"
    result = runner.invoke(typer_app, ["export", "--checkpoint", str(soup), "--inference-checkpoint", str(exported)])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(exported)["meta"]["averaged_from"] == averaged["averaged_from"]

    other = tiny_config(tiny_market_root, tmp_path / "c", solver=SolverConfig(epochs=1))
    other.model = dataclasses.replace(other.model, use_hpp=False)
    Trainer(other, show_progress=False).train()
    refused = tmp_path / "refused.pt"
    for args, message in (
        ([tmp_path / "a" / "last.pt", tmp_path / "c" / "last.pt"], "another model .*use_hpp"),
        ([tmp_path / "a" / "last.pt"], "at least two"),
        ([tmp_path / "a" / "last.pt", exported], "not a training checkpoint"),
        ([tmp_path / "a" / "last.pt", tmp_path / "missing.pt"], "missing.pt"),
        ([tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt", "--weights", "1"], "1 averaging weights for 2"),
        ([tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt", "--weights", "1,-1"], "must be positive"),
        ([tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt", "--weights", "1,nan"], "must be positive"),
        ([tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt", "--weights", "1;3"], "comma-separated numbers"),
    ):
        result = runner.invoke(typer_app, ["average", *map(str, args), "--output", str(refused)])
        assert result.exit_code != 0 and isinstance(result.exception, ReidAppError), result.output
        assert re.search(message, str(result.exception)) and "\n" not in str(result.exception)
        assert not refused.exists()
    result = runner.invoke(typer_app, ["average", str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"),
                                       "--output", str(tmp_path / "a" / "last.pt" / "under_a_file.pt")])
    assert isinstance(result.exception, ReidAppError) and str(result.exception).startswith("cannot write")
    with pytest.raises(CheckpointError, match="averaged weights .*--init-from"):
        Trainer(resume=soup, show_progress=False)
    inputs = [str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt")]
    before = (tmp_path / "b" / "last.pt").read_bytes()
    result = runner.invoke(typer_app, ["average", *inputs, "--output", inputs[1]])
    assert isinstance(result.exception, ReidAppError) and "one of the checkpoints" in str(result.exception)
    assert (tmp_path / "b" / "last.pt").read_bytes() == before
