"""What a backbone module provides to FA-Net."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass
class BackboneParts:
    """A backbone cut in two: ``low_level`` (shared, ends at stride 8) and ``high_level`` (the
    stages after it, last stride already applied; FA-Net copies it into both branches)."""

    low_level: nn.Module
    high_level: nn.Module


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone by name: how to build it and where its ImageNet weights come from.

    ``build(last_stride, weights)`` returns the parts, loading ``weights`` (a state-dict file)
    when given and raising on a file that does not fit. ``locate_weights`` is the last place the
    weights resolution looks (a library download or an installed package); it raises when the
    file is not there.
    """

    name: str
    title: str  # for messages: "ImageNet ResNet50"
    channels: int  # channels of the high-level output map
    weights_file: str
    weights_source: str
    build: Callable[[int, Path | None], BackboneParts]
    locate_weights: Callable[[], Path] | None = None
