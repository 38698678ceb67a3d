"""ResNet50, the paper's backbone (Sec. III-A): stem + res_conv2-3 shared, res_conv4-5 per branch."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from fanet.backbones.base import BackboneParts, BackboneSpec
from fanet.weights import RESNET50_IMAGENET_FILE, RESNET50_IMAGENET_URL


def build(last_stride: int, weights: Path | None) -> BackboneParts:
    resnet = torchvision.models.resnet50(weights=None)
    if weights is not None:
        resnet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    block = resnet.layer4[0]
    block.conv2.stride = (last_stride, last_stride)
    block.downsample[0].stride = (last_stride, last_stride)
    return BackboneParts(
        low_level=nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2),
        high_level=nn.Sequential(resnet.layer3, resnet.layer4),
    )


RESNET50 = BackboneSpec(
    name="resnet50",
    title="ImageNet ResNet50",
    channels=2048,
    weights_file=RESNET50_IMAGENET_FILE,
    weights_source=RESNET50_IMAGENET_URL,
    build=build,
    locate_weights=None,
)
