"""Backbones FA-Net can be built on, chosen by name in :class:`~fanet.config.FANetConfig`.

Every backbone is cut the way Sec. III-A cuts ResNet50: a shared *low-level* module that ends at
the stride-8 stage (ResNet50's res_conv3), and a *high-level* part (res_conv4-5) that FA-Net
copies into its foreground and background branches, with the last spatial down-sampling removed.
One module per architecture (timm's habit); this file only maps names to them.
"""

from __future__ import annotations

from fanet.backbones.base import BackboneParts, BackboneSpec
from fanet.backbones.mobilenetv2 import MOBILENETV2
from fanet.backbones.osnet import OSNET
from fanet.backbones.resnet50 import RESNET50

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (RESNET50, MOBILENETV2, OSNET)}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


__all__ = ["BACKBONES", "BackboneParts", "BackboneSpec", "get_backbone"]
