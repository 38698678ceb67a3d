"""The OSNet backbone and its re-ID weights from Intel's 0267 ONNX file (../shared).

The checks that matter: every tensor of the file is accounted for (loaded by name, or one of the
head tensors FA-Net replaces), and the backbone is the file's network: with the file's own head
put back on top it gives OpenVINO's embeddings of real person crops.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fanet import FANet, FANetConfig
from fanet.backbones.osnet import (
    UNUSED_PREFIXES,
    OSNetHighLevel,
    OSNetLowLevel,
    build,
    load_0267_weights,
    read_onnx_initializers,
)
from fanet.checkpoint import read_checkpoint
from fanet.config import DataConfig, OptimizerName, SolverConfig, TrainConfig
from fanet.engine.mixstyle import attach_mixstyle
from fanet.engine.recalibration import recalibrate_batchnorm
from fanet.engine.trainer import PretrainedWeightsError, Trainer, resolve_imagenet_weights
from reid_app.cli import typer_app
from reid_app.errors import ReidAppError
from reid_app.external_model import openvino_core

OMZ = Path("weights/openvino_omz_person_reid/intel")
FILE_0267 = OMZ / "person-reidentification-retail-0287/person-reidentification-retail-0267.onnx"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def file_0267(shared_dir: Path) -> Path:
    return shared_dir / FILE_0267


@pytest.fixture(scope="module")
def viper_crops(shared_dir: Path) -> np.ndarray:
    """Eight real VIPeR crops (four people, both cameras), BGR uint8 at 256x128."""
    files = sorted((shared_dir / "data/peta_reid/images/VIPeR").glob("*.png"))[:8]
    return np.stack([cv2.resize(cv2.imread(str(path)), (128, 256)) for path in files])


def test_every_tensor_of_0267_is_loaded_or_a_replaced_head_tensor(file_0267: Path) -> None:
    tensors = read_onnx_initializers(file_0267)
    parts = build(2, file_0267)
    loaded = {f"{k}": v for k, v in parts.low_level.state_dict().items()}
    loaded.update(parts.high_level.state_dict())
    used = {k for k in tensors if not k.startswith(UNUSED_PREFIXES)}
    assert used == set(loaded)  # nothing of the backbone left out, nothing of ours left random
    assert {k.split(".")[0] for k in set(tensors) - used} == {"global_avgpool", "fc", "classifier"}
    assert len(tensors) == 562 and len(used) == 551
    for key in used:
        torch.testing.assert_close(loaded[key], tensors[key], msg=key)


@pytest.fixture(scope="module")
def network_0267(file_0267: Path) -> nn.Module:
    """Our backbone with the 0267 head put back on top, rebuilt here from the tensors FA-Net does
    not use: a 16x8 depthwise pooling, fc 256->256, BatchNorm1d, PReLU — the file's whole network."""
    tensors = read_onnx_initializers(file_0267)
    parts = build(2, file_0267)
    pooling = nn.Conv2d(256, 256, (16, 8), groups=256)
    fc, norm, prelu = nn.Linear(256, 256), nn.BatchNorm1d(256), nn.PReLU()
    state = {
        pooling: {"weight": "global_avgpool.weight", "bias": "global_avgpool.bias"},
        fc: {"weight": "fc.0.weight", "bias": "fc.0.bias"},
        norm: {n: f"fc.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
        prelu: {"weight": "fc.2.weight"},
    }
    for module, names in state.items():
        module.load_state_dict({name: tensors[key] for name, key in names.items()})
    return nn.Sequential(parts.low_level, parts.high_level, pooling, nn.Flatten(), fc, norm, prelu).eval()


def test_backbone_with_the_files_head_reproduces_openvino_on_real_crops(
    file_0267: Path, network_0267: nn.Module, viper_crops
) -> None:
    pytest.importorskip("openvino")
    network = network_0267
    rgb = torch.from_numpy(viper_crops[:, :, :, ::-1].copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ours = network((rgb / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)  # FA-Net's own normalisation
    core = openvino_core()
    model = core.read_model(str(file_0267))
    model.reshape([-1, 3, 256, 128])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    reference = torch.from_numpy(compiled(rgb.numpy())[0])  # the file takes RGB 0..255
    cosine = nn.functional.cosine_similarity(ours, reference)
    assert float(cosine.min()) > 0.999, cosine
    # ... and the other channel order is measurably not the same network.
    with torch.no_grad():
        swapped = network((rgb.flip(1) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
    assert float(nn.functional.cosine_similarity(swapped, reference).min()) < 0.99


def test_the_0267_network_sees_rgb(network_0267: nn.Module, shared_dir: Path) -> None:
    """The file's network was trained on RGB (the OpenVINO IR of 0287 takes BGR only because its
    conversion reversed the channels): fed RGB, it re-identifies VIPeR people far better than fed BGR."""
    folder = shared_dir / "data/peta_reid/images/VIPeR"
    people = sorted({path.name.split("_")[0] for path in folder.glob("*.png")})[:100]
    views = [sorted(folder.glob(f"{person}_*.png")) for person in people]
    crops = np.stack([cv2.resize(cv2.imread(str(v[i])), (128, 256)) for i in (0, 1) for v in views])  # BGR
    def rank1(images: np.ndarray) -> float:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            features = nn.functional.normalize(network_0267((x - IMAGENET_MEAN) / IMAGENET_STD), dim=1)
        query, gallery = features[: len(people)], features[len(people) :]
        return float(((query @ gallery.t()).argmax(dim=1) == torch.arange(len(people))).float().mean())

    as_rgb, as_bgr = rank1(crops[:, :, :, ::-1].copy()), rank1(crops)
    assert as_rgb > as_bgr + 0.05, (as_rgb, as_bgr)


def test_fanet_on_osnet_loads_the_weights_into_both_branches(file_0267: Path) -> None:
    config = FANetConfig(backbone="osnet", last_stride=2)
    model = FANet(config, num_classes=3, num_cameras=2, imagenet_weights=file_0267)
    tensors = read_onnx_initializers(file_0267)
    for branch in (model.foreground_branch, model.background_branch):
        torch.testing.assert_close(branch.conv4[1].gate.gn.weight, tensors["conv4.1.gate.gn.weight"])
    torch.testing.assert_close(model.low_level.conv2[0].gate.fc1.weight, tensors["conv2.0.gate.fc1.weight"])
    assert isinstance(model.foreground_branch.conv3[2][1], nn.AvgPool2d)
    assert isinstance(build(1, None).high_level.conv3[2][1], nn.Identity)  # last stride 1: no pooling
    # Backbone parameters are the "pretrained" group (their own learning rate), the head is new.
    pretrained = {id(p) for p in model.pretrained_parameters()}
    assert {id(p) for p in model.low_level.parameters()} <= pretrained
    assert {id(p) for p in model.target_enhancement.parameters()}.isdisjoint(pretrained)


def test_a_file_of_another_network_is_refused_with_a_clear_message(shared_dir: Path, tmp_path: Path) -> None:
    # torchreid's OSNet x0.25 export: other names (BN folded into the convs), so nothing fits.
    with pytest.raises(ValueError, match="fit no part of the OSNet backbone"):
        load_0267_weights(OSNetLowLevel(), OSNetHighLevel(2), shared_dir / "weights/osnet_x0_25_msmt17.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        load_0267_weights(OSNetLowLevel(), OSNetHighLevel(2), junk)
    tensors = read_onnx_initializers(shared_dir / FILE_0267)
    state = tmp_path / "state.pt"  # a .pt state dict with the file's names loads the same way
    torch.save(tensors, state)
    low, high = OSNetLowLevel(), OSNetHighLevel(2)
    load_0267_weights(low, high, state)
    torch.testing.assert_close(high.conv5.conv.weight, tensors["conv5.conv.weight"])
    torch.save({**tensors, "conv5.conv.weight": tensors["conv5.conv.weight"][:128]}, state)  # x0.25-wide
    with pytest.raises(ValueError, match=r"does not fit the OSNet x0.5 backbone \(high_level\)"):
        load_0267_weights(low, high, state)
    del tensors["conv4.1.gate.gn.bias"]
    torch.save(tensors, state)
    with pytest.raises(ValueError, match="does not fit.*Missing key"):
        load_0267_weights(low, high, state)


def test_training_without_the_0267_file_names_it_and_its_source(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))
    config = TrainConfig(model=FANetConfig(backbone="osnet"))
    with pytest.raises(PretrainedWeightsError, match="person-reidentification-retail-0267.onnx.*Open Model Zoo"):
        resolve_imagenet_weights(config)


def test_a_run_moved_towards_0267_keeps_its_head_and_a_stage_recalibrates_batchnorm(
    file_0267: Path, shared_dir: Path, tiny_market_root: Path, tmp_path: Path
) -> None:
    """``reid-app average RUN --pretrained 0267 --pretrained-weight w`` (WiSE-FT): every float tensor
    of the backbone becomes (1 - w) * run + w * 0267, FA-Net's own layers stay the run's; a wrong
    file or weight is a one-line error writing nothing. ``train --recalibrate-bn N`` from the result
    re-estimates BatchNorm statistics, the frozen low-level module's included."""
    config = TrainConfig(
        model=FANetConfig(backbone="osnet", last_stride=1),
        data=DataConfig(root=str(tiny_market_root), height=128, width=64, num_identities=4, num_instances=2,
                        workers=0),
        solver=SolverConfig(optimizer=OptimizerName.ADAMW, epochs=1, base_lr=1e-3, warmup_start_lr=1e-3,
                            warmup_epochs=0, milestones=()),
        pretrained=str(file_0267), eval_period=0, max_iters_per_epoch=2, output_dir=str(tmp_path / "run"),
    )
    Trainer(config, show_progress=False).train()
    run = read_checkpoint(tmp_path / "run" / "last.pt")
    moved_file = tmp_path / "moved.pt"
    runner = CliRunner()
    result = runner.invoke(typer_app, ["average", str(tmp_path / "run" / "last.pt"), "--pretrained", str(file_0267),
                                       "--pretrained-weight", "0.25", "--output", str(moved_file)])
    assert result.exit_code == 0, result.output
    moved = read_checkpoint(moved_file)
    start = FANet(config.model, run["num_classes"], run["num_cameras"], file_0267).state_dict()
    backbone_names = [k for k, v in run["state_dict"].items()
                      if k.split(".")[0] in FANet.BACKBONE_MODULES and v.is_floating_point()]
    assert len(backbone_names) > 700 and any(k.startswith("background_branch.") for k in backbone_names)
    assert any(not torch.equal(run["state_dict"][k], start[k]) for k in backbone_names)  # the run trained
    for name, tensor in moved["state_dict"].items():
        if name in backbone_names:
            torch.testing.assert_close(tensor, 0.75 * run["state_dict"][name] + 0.25 * start[name], msg=name)
        else:
            assert torch.equal(tensor, run["state_dict"][name]), name
    assert moved["toward_pretrained"] == {"source": file_0267.name, "weight": 0.25, "from": "last.pt"}
    assert "best_map" not in moved  # the run's figure is not these weights
    assert "optimizer" not in moved
    refused = tmp_path / "refused.pt"
    for args, message in (
        (["--pretrained", str(shared_dir / "weights/osnet_x0_25_msmt17.onnx")],
         "not a weights file of the osnet backbone"),
        (["--pretrained", str(file_0267), "--pretrained-weight", "1"], "between 0 and 1"),
        (["--pretrained-weight", "0.5"], "needs --pretrained"),
        ([], "at least two"),
    ):
        result = runner.invoke(typer_app, ["average", str(tmp_path / "run" / "last.pt"), *args,
                                           "--output", str(refused)])
        assert isinstance(result.exception, ReidAppError), result.output
        assert message in str(result.exception) and "\n" not in str(result.exception)
        assert not refused.exists()

    pretrained_copy = tmp_path / file_0267.name  # never risk the shared file itself
    pretrained_copy.write_bytes(file_0267.read_bytes())
    result = runner.invoke(typer_app, ["average", str(tmp_path / "run" / "last.pt"), "--pretrained",
                                       str(pretrained_copy), "--output", str(pretrained_copy)])
    assert isinstance(result.exception, ReidAppError) and "is the --pretrained file" in str(result.exception)
    assert pretrained_copy.read_bytes() == file_0267.read_bytes()

    # The BN update itself: each running mean/var becomes the plain average of the batches' own
    # statistics (the frozen stem's too), measured without MixStyle even where it is attached.
    model = FANet(config.model, run["num_classes"], run["num_cameras"])
    model.load_state_dict(moved["state_dict"])
    model.freeze_low_level()
    stem_norm, late_norm = model.low_level.conv2[0].conv1.bn, model.foreground_branch.conv4[0].conv1.bn
    seen: dict[str, list[torch.Tensor]] = {"stem": [], "late": []}
    handles = [
        norm.register_forward_hook(lambda module, inputs, output, key=key: seen[key].append(inputs[0].detach()))
        for key, norm in (("stem", stem_norm), ("late", late_norm))
    ]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(6, 3, 128, 64, generator=generator), torch.rand(6, 3, 128, 64, generator=generator) * 0.5]
    attach_mixstyle(model, prob=1.0, alpha=0.1)
    assert recalibrate_batchnorm(model, batches) == 2
    for handle in handles:
        handle.remove()
    for key, norm in (("stem", stem_norm), ("late", late_norm)):
        means = [x.mean(dim=(0, 2, 3)) for x in seen[key]]
        variances = [x.var(dim=(0, 2, 3)) for x in seen[key]]
        torch.testing.assert_close(norm.running_mean, (means[0] + means[1]) / 2, msg=key)
        torch.testing.assert_close(norm.running_var, (variances[0] + variances[1]) / 2, msg=key)
    plain = FANet(config.model, run["num_classes"], run["num_cameras"])
    plain.load_state_dict(moved["state_dict"])
    recalibrate_batchnorm(plain, batches)
    torch.testing.assert_close(late_norm.running_var, plain.foreground_branch.conv4[0].conv1.bn.running_var)
    assert stem_norm.momentum == 0.1 and model.training and not model.low_level.training  # as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left as it was

    stage = dataclasses.replace(
        config, pretrained=None, init_from=str(moved_file), output_dir=str(tmp_path / "stage"),
        solver=dataclasses.replace(config.solver, freeze_low_level=True, recalibrate_bn_batches=1),
    )
    Trainer(stage, show_progress=False).train()
    after = read_checkpoint(tmp_path / "stage" / "last.pt")["state_dict"]
    key = "low_level.conv2.0.conv1.bn.running_mean"  # frozen: only the recalibration moves it
    assert not torch.equal(after[key], moved["state_dict"][key])
    weight = "low_level.conv2.0.conv1.conv.weight"
    assert torch.equal(after[weight], moved["state_dict"][weight])
