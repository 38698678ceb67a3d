"""OSNet x0.5 (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019)
in the shape of Intel's re-ID model person-reidentification-retail-0287, cut like the paper's ResNet50.

Why this backbone: it is already trained for re-identification (on a large multi-camera set), so
FA-Net starts from features that tell people apart on cameras it has never seen, where an
ImageNet backbone trained on one small re-ID set learns that set's cameras instead.

The network is the one whose PyTorch export ships as ``person-reidentification-retail-0267.onnx``
(torchreid names, x0.5 widths 32/128/192/256). It differs from torchreid's plain OSNet in three
places, all read off that file's graph:

* an affine InstanceNorm on the input image (``in_first``) and InstanceNorm after the stem conv;
* the second block of each stage gates its streams with GroupNorm(16) of the pooled vector and a
  sigmoid (``gate.gn``) instead of the two-layer channel gate (``gate.fc1``/``gate.fc2``);
* a learned 16x8 depthwise pooling and a 256-d fc neck (``global_avgpool``, ``fc.*``), which FA-Net
  replaces by its own pooling head and so does not build.

Cut: ``in_first``, ``conv1``, the max-pool and ``conv2`` (with its transition, output stride 8)
are the shared low-level module; ``conv3`` (its transition's 2x2 average pool is the last
down-sampling, so ``last_stride=1`` removes it), ``conv4`` and ``conv5`` are the high-level part
copied into both branches. Module names follow the file's, so every tensor loads by name
(:func:`load_0267_weights`). The file's network takes **RGB** (the OpenVINO IR of 0287 takes BGR:
its conversion reversed the input channels; the ONNX scores DG mean R1 68.1 with RGB input and 59.5
with BGR), so FA-Net's RGB input needs no channel swap, and ``in_first`` makes the network
indifferent to the per-channel mean/std FA-Net applies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fanet.backbones.base import BackboneParts, BackboneSpec

WEIGHTS_FILE = "person-reidentification-retail-0267.onnx"
WEIGHTS_SOURCE = (
    "Intel Open Model Zoo, person-reidentification-retail-0287 (its PyTorch export "
    "person-reidentification-retail-0267.onnx, Apache-2.0)"
)
CHANNELS = (32, 128, 192, 256)  # x0.5 widths: stem, conv2, conv3, conv4/conv5
BOTTLENECK_REDUCTION = 4
GATE_REDUCTION = 16
GATE_GROUPS = 16
# Tensors of the file that FA-Net does not use, and why: the 0267 head (pooling, fc neck,
# classifier over its training identities) is replaced by FA-Net's own head.
UNUSED_PREFIXES = ("global_avgpool.", "fc.", "classifier.")
_LOW_LEVEL = ("in_first", "conv1", "conv2")
_HIGH_LEVEL = ("conv3", "conv4", "conv5")


class ConvNorm(nn.Module):
    """Conv, then BatchNorm (or affine InstanceNorm), then optionally ReLU (torchreid's ConvLayer,
    Conv1x1 and Conv1x1Linear, by the names ``conv`` and ``bn``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        *,
        instance_norm: bool = False,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.InstanceNorm2d(out_channels, affine=True) if instance_norm else nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class LightConv3x3(nn.Module):
    """1x1 conv, depthwise 3x3 conv, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """OSNet's unified aggregation gate, shared by the four streams of a block.

    ``normalised=False``: pooled vector -> fc1 -> ReLU -> fc2 -> sigmoid (torchreid's gate).
    ``normalised=True``: pooled vector -> GroupNorm(16) -> sigmoid (the 0267 model's second blocks).
    """

    def __init__(self, channels: int, normalised: bool = False) -> None:
        super().__init__()
        if normalised:
            self.gn = nn.GroupNorm(GATE_GROUPS, channels)
        else:
            self.fc1 = nn.Conv2d(channels, channels // GATE_REDUCTION, 1, bias=True)
            self.relu = nn.ReLU(inplace=True)
            self.fc2 = nn.Conv2d(channels // GATE_REDUCTION, channels, 1, bias=True)
        self.normalised = normalised

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        logits = self.gn(pooled) if self.normalised else self.fc2(self.relu(self.fc1(pooled)))
        return x * torch.sigmoid(logits)


class OSBlock(nn.Module):
    """Omni-scale residual block: four streams of 1-4 stacked light 3x3 convs (receptive fields
    3/5/7/9) fused by one shared gate, a 1x1 projection and the identity (projected if needed)."""

    def __init__(self, in_channels: int, out_channels: int, normalised_gate: bool = False) -> None:
        super().__init__()
        mid = out_channels // BOTTLENECK_REDUCTION
        self.conv1 = ConvNorm(in_channels, mid)
        self.conv2a = LightConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(4)))
        self.gate = ChannelGate(mid, normalised=normalised_gate)
        self.conv3 = ConvNorm(mid, out_channels, relu=False)
        self.downsample = ConvNorm(in_channels, out_channels, relu=False) if in_channels != out_channels else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.conv1(x)
        fused = self.gate(self.conv2a(x1)) + self.gate(self.conv2b(x1)) + self.gate(self.conv2c(x1))
        fused = fused + self.gate(self.conv2d(x1))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(self.conv3(fused) + identity)


def _stage(in_channels: int, out_channels: int, transition_stride: int | None) -> nn.Sequential:
    """Two blocks (the second with the normalised gate), then optionally a 1x1 conv and a 2x2
    average pool of stride ``transition_stride`` (1 = no down-sampling: the pool is dropped)."""
    layers: list[nn.Module] = [OSBlock(in_channels, out_channels), OSBlock(out_channels, out_channels, True)]
    if transition_stride is not None:
        pool = nn.AvgPool2d(2, stride=2) if transition_stride == 2 else nn.Identity()
        layers.append(nn.Sequential(ConvNorm(out_channels, out_channels), pool))
    return nn.Sequential(*layers)


class OSNetLowLevel(nn.Module):
    """Input InstanceNorm, 7x7 stem (InstanceNorm), 3x3 max-pool, conv2 stage: stride 8, 128 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.in_first = nn.InstanceNorm2d(3, affine=True)
        self.conv1 = ConvNorm(3, CHANNELS[0], 7, stride=2, instance_norm=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _stage(CHANNELS[0], CHANNELS[1], transition_stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.maxpool(self.conv1(self.in_first(x))))


class OSNetHighLevel(nn.Module):
    """conv3 stage (its transition takes ``last_stride``), conv4 stage, conv5 1x1: 256 channels."""

    def __init__(self, last_stride: int) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"OSNet's last stride must be 1 or 2, got {last_stride}")
        self.conv3 = _stage(CHANNELS[1], CHANNELS[2], transition_stride=last_stride)
        self.conv4 = _stage(CHANNELS[2], CHANNELS[3], transition_stride=None)
        self.conv5 = ConvNorm(CHANNELS[3], CHANNELS[3])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv5(self.conv4(self.conv3(x)))


def read_onnx_initializers(path: Path) -> dict[str, Tensor]:
    """Every initializer of an ONNX file as a tensor, by name (needs the ``onnx`` package)."""
    try:
        import onnx  # noqa: PLC0415
        from onnx import numpy_helper  # noqa: PLC0415
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"reading {path} needs the 'onnx' package (pip install onnx)") from None
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises its own DecodeError on a file that is not ONNX
        raise ValueError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    return {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}


def backbone_state_from_0267(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 0267 tensors FA-Net uses: all but the head it replaces (both take RGB input)."""
    return {k: v for k, v in tensors.items() if not k.startswith(UNUSED_PREFIXES)}


def load_0267_weights(low_level: OSNetLowLevel, high_level: OSNetHighLevel, path: Path) -> None:
    """Copy every tensor of the 0267 file (ONNX, or a ``.pt`` state dict with the same names) into
    the two parts by name; raises on a tensor with no place, a place with no tensor, or a shape that
    does not fit, so nothing is silently left at its random init."""
    if path.suffix.lower() == ".onnx":
        tensors = read_onnx_initializers(path)
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    state = backbone_state_from_0267(tensors)
    parts = {"low_level": (low_level, _LOW_LEVEL), "high_level": (high_level, _HIGH_LEVEL)}
    by_part: dict[str, dict[str, Tensor]] = {name: {} for name in parts}
    unplaced = []
    for key, value in state.items():
        owner = next((name for name, (_, roots) in parts.items() if key.split(".")[0] in roots), None)
        if owner is None:
            unplaced.append(key)
        else:
            by_part[owner][key] = value
    if unplaced:
        raise ValueError(f"{path}: {len(unplaced)} tensor(s) fit no part of the OSNet backbone, e.g. {unplaced[0]}")
    for name, (module, _) in parts.items():
        try:
            module.load_state_dict(by_part[name], strict=True)
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()
            raise ValueError(
                f"{path} does not fit the OSNet x0.5 backbone ({name}): {' '.join(first_line[:3])}"
            ) from None


def build(last_stride: int, weights: Path | None) -> BackboneParts:
    low_level, high_level = OSNetLowLevel(), OSNetHighLevel(last_stride)
    if weights is not None:
        load_0267_weights(low_level, high_level, weights)
    return BackboneParts(low_level=low_level, high_level=high_level)


OSNET = BackboneSpec(
    name="osnet",
    title="re-ID-trained OSNet x0.5 (Intel OMZ 0267)",
    channels=CHANNELS[3],
    weights_file=WEIGHTS_FILE,
    weights_source=WEIGHTS_SOURCE,
    build=build,
    locate_weights=None,
)
