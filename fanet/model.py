"""FA-Net: the end-to-end foreground-aware network (Liu et al., IEEE TIP), Sec. III.

A ResNet50 (or another backbone of :mod:`fanet.backbones`, cut the same way) with its last
spatial down-sampling removed is cut before res_conv4: the stem, res_conv2 and res_conv3 form
the shared low-level module; res_conv4 and res_conv5 are copied into a foreground (person-ID)
branch and a background (camera-ID) branch that share no weights.
The target enhancement module (TEM) turns the foreground map F into a soft mask Z that gates F
(F * Z) and, with the interaction (IA), the background map B (B * (1 - Z)). Horizontal pyramid
pooling (HPP, 1/2/4/8 stripes) embeds every stripe of both gated maps to 256-d and feeds one
classifier per stripe. Inference runs the low-level module and the foreground branch only.

Every ablation row of Table I is a :class:`~fanet.config.FANetConfig`; parts a row does not use
are not built, so they cannot receive gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from fanet.backbones import get_backbone
from fanet.config import FANetConfig


class TargetEnhancementModule(nn.Module):
    """TEM (Fig. 4, Eq. 1): conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1 to k maps, mean, sigmoid."""

    def __init__(self, in_channels: int, mid_channels: tuple[int, int] = (256, 128), k: int = 256) -> None:
        super().__init__()
        first, second = mid_channels
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
        )
        self.context = nn.Sequential(
            nn.Conv2d(first, second, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(second),
            nn.ReLU(inplace=True),
        )
        self.attention_maps = nn.Conv2d(second, k, kernel_size=1)

    def forward(self, foreground_map: Tensor) -> Tensor:
        raw = self.attention_maps(self.context(self.reduce(foreground_map)))
        # Averaging k maps before the sigmoid is what the paper credits for a robust mask (Fig. 5).
        return torch.sigmoid(raw.mean(dim=1, keepdim=True))


class StripeEmbedding(nn.Module):
    """One HPP stripe's embedding: its pooled 2048-d vector to 256-d (linear + BN)."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels, embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.bn(self.embed(pooled))


class PyramidPooling(nn.Module):
    """Horizontal pyramid pooling: the map is cut into 1, 2, 4, 8 horizontal stripes."""

    def __init__(self, in_channels: int, stripes: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.stripes = stripes
        self.embeddings = nn.ModuleList(
            StripeEmbedding(in_channels, embed_dim) for _ in range(sum(stripes))
        )

    def forward(self, feature_map: Tensor) -> list[Tensor]:
        # Each stripe is pooled with avg + max, as in HPM [33]. Rows are reduced once and every
        # stripe is read off those (N, C, H) rows, instead of pooling 15 slices of the full map.
        row_mean, row_max = feature_map.mean(dim=3), feature_map.amax(dim=3)
        height = feature_map.shape[2]
        out: list[Tensor] = []
        index = 0
        for count in self.stripes:
            # Stripe borders follow torch's adaptive pooling rule so any height works.
            for i in range(count):
                top, bottom = (i * height) // count, -(-(i + 1) * height // count)
                pooled = row_mean[:, :, top:bottom].mean(dim=2) + row_max[:, :, top:bottom].amax(dim=2)
                out.append(self.embeddings[index](pooled))
                index += 1
        return out


class GlobalPooling(nn.Module):
    """The baseline's head: global average pooling of the 2048-channel map."""

    def forward(self, feature_map: Tensor) -> list[Tensor]:
        return [functional.adaptive_avg_pool2d(feature_map, 1).flatten(1)]


@dataclass
class FANetOutput:
    """What the training forward pass returns; the loss reads it."""

    person_logits: list[Tensor]
    camera_logits: list[Tensor] = field(default_factory=list)
    foreground_map: Tensor | None = None  # F (raw, before gating)
    background_map: Tensor | None = None  # B (raw, before gating)
    foreground_mask: Tensor | None = None  # Z^f, (N, 1, H, W)
    features: Tensor | None = None  # the inference feature of this batch


class FANet(nn.Module):
    """FA-Net and its ablations.

    ``num_classes`` person IDs and ``num_cameras`` camera IDs size the classifiers; with
    ``num_classes=0`` no classifier is built (an inference model), and with ``num_cameras=0``
    the background branch is not built. In eval mode ``model(images)`` takes 0-1 RGB images
    (N, 3, H, W) and returns the foreground features (N, ``config.feature_dim``).
    """

    #: Attributes holding the backbone's modules (state-dict prefixes of the backbone's tensors).
    BACKBONE_MODULES = ("low_level", "foreground_branch", "background_branch")

    def __init__(
        self,
        config: FANetConfig | None = None,
        num_classes: int = 0,
        num_cameras: int = 0,
        imagenet_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or FANetConfig()
        self.num_classes = num_classes
        self.num_cameras = num_cameras if config.use_background else 0
        self.low_level_frozen = False
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

        backbone = get_backbone(config.backbone.value)
        parts = backbone.build(config.last_stride, Path(imagenet_weights) if imagenet_weights else None)
        self.low_level = parts.low_level
        self.foreground_branch = parts.high_level
        self.background_branch = copy.deepcopy(parts.high_level) if self.num_cameras > 0 else None
        channels = backbone.channels
        self.target_enhancement = (
            TargetEnhancementModule(channels, config.tem_mid_channels, config.tem_k) if config.use_tem else None
        )
        self.foreground_pooling = self._pooling(channels)
        self.background_pooling = self._pooling(channels) if self.background_branch is not None else None
        stripe_dim = config.embed_dim if config.use_hpp else channels
        stripe_count = len(self.foreground_pooling.embeddings) if config.use_hpp else 1
        self.person_classifiers = nn.ModuleList(
            nn.Linear(stripe_dim, num_classes) for _ in range(stripe_count if num_classes > 0 else 0)
        )
        self.camera_classifiers = nn.ModuleList(
            nn.Linear(stripe_dim, self.num_cameras) for _ in range(stripe_count if self.num_cameras > 0 else 0)
        )

    def _pooling(self, channels: int) -> nn.Module:
        if self.config.use_hpp:
            return PyramidPooling(channels, self.config.hpp_stripes, self.config.embed_dim)
        return GlobalPooling()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def backbone_modules(self) -> list[nn.Module]:
        """The modules built from the backbone (and loaded from its pretrained weights): the shared
        low-level module and the two branches (attribute names in ``BACKBONE_MODULES``)."""
        modules = [getattr(self, name) for name in self.BACKBONE_MODULES]
        return [m for m in modules if m is not None]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters that train (at ``pretrained_lr_mult`` x the base lr)."""
        return [p for m in self.backbone_modules() for p in m.parameters() if p.requires_grad]

    def freeze_low_level(self) -> None:
        """Keep the shared low-level module as it is: no gradients, and its norm layers use their
        stored statistics even in training mode (see ``SolverConfig.freeze_low_level``)."""
        self.low_level_frozen = True
        self.low_level.requires_grad_(False)
        self.low_level.eval()

    def train(self, mode: bool = True) -> FANet:
        super().train(mode)
        if self.low_level_frozen:
            self.low_level.eval()
        return self

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters FA-Net adds on top of the backbone (TEM, stripe embeddings, classifiers)."""
        backbone = {id(p) for m in self.backbone_modules() for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

    def drop_background(self) -> None:
        """Remove everything inference does not run (background branch and all classifiers)."""
        self.background_branch = None
        self.background_pooling = None
        self.person_classifiers = nn.ModuleList()
        self.camera_classifiers = nn.ModuleList()
        self.num_classes = 0
        self.num_cameras = 0

    def _foreground(self, low: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        foreground_map = self.foreground_branch(low)
        mask = self.target_enhancement(foreground_map) if self.target_enhancement is not None else None
        gated = foreground_map * mask if mask is not None else foreground_map
        return foreground_map, mask, gated

    def _normalise(self, images: Tensor) -> Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def features(self, images: Tensor) -> Tensor:
        """The inference feature (the foreground stripes' embeddings, concatenated) in either mode:
        what evaluation returns, and what unsupervised adaptation trains (:mod:`fanet.engine.adapt`)."""
        low = self.low_level(self._normalise(images))
        _, _, gated_foreground = self._foreground(low)
        return torch.cat(self.foreground_pooling(gated_foreground), dim=1)

    def forward(self, images: Tensor) -> Tensor | FANetOutput:
        if not self.training:
            return self.features(images)
        low = self.low_level(self._normalise(images))
        foreground_map, mask, gated_foreground = self._foreground(low)
        person_embeddings = self.foreground_pooling(gated_foreground)
        features = torch.cat(person_embeddings, dim=1)
        if not self.person_classifiers:
            raise RuntimeError("this FANet has no person classifier (num_classes=0): it is inference-only")
        output = FANetOutput(
            person_logits=[clf(e) for clf, e in zip(self.person_classifiers, person_embeddings, strict=True)],
            foreground_map=foreground_map,
            foreground_mask=mask,
            features=features,
        )
        if self.background_branch is not None:
            background_map = self.background_branch(low)
            use_gate = self.config.use_interaction and mask is not None
            gated_background = background_map * (1.0 - mask) if use_gate else background_map
            camera_embeddings = self.background_pooling(gated_background)
            output.background_map = background_map
            output.camera_logits = [
                clf(e) for clf, e in zip(self.camera_classifiers, camera_embeddings, strict=True)
            ]
        return output

    @torch.no_grad()
    def attention_maps(self, images: Tensor) -> dict[str, Tensor]:
        """F, Z and (when the branch exists) B for visualisation (Fig. 7), each (N, 1, H, W):
        feature maps are reduced to their per-position l2 energy."""
        low = self.low_level(self._normalise(images))
        foreground_map, mask, _ = self._foreground(low)
        maps = {"F": foreground_map.norm(dim=1, keepdim=True)}
        if mask is not None:
            maps["Z"] = mask
        if self.background_branch is not None:
            maps["B"] = self.background_branch(low).norm(dim=1, keepdim=True)
        return maps
