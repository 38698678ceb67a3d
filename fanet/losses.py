"""FA-Net's training objective, Eq. 6: L = 1/2 (L_f + L_b) + L_t.

L_f and L_b are softmax (cross-entropy) losses of the person classifiers and the camera
classifiers, averaged over the HPP stripes so the backbone's gradient scale does not depend on
the number of stripes (the paper does not say; this keeps the Table I rows comparable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import Tensor

from fanet.config import FANetConfig, TALVariant
from fanet.model import FANetOutput


def spatial_l2_normalise(feature_map: Tensor, eps: float = 1e-12) -> Tensor:
    """Eq. 5: each channel divided by its l2 norm over the spatial positions."""
    norm = feature_map.flatten(2).norm(dim=2).clamp_min(eps)
    return feature_map / norm[:, :, None, None]


def target_attention_loss(
    foreground_map: Tensor,
    background_map: Tensor,
    foreground_mask: Tensor | None,
    variant: TALVariant | str = TALVariant.EQ4,
) -> Tensor:
    """The target attention loss (Eq. 4) and its Table II variants (Eq. 7).

    ``foreground_map`` F and ``background_map`` B are the raw branch outputs (N, C, H, W);
    ``foreground_mask`` is Z^f (N, 1, H, W). The mask is not detached: TAL is meant to train
    TEM as well as both branches.
    """
    variant = TALVariant(variant)
    if variant is TALVariant.V1:
        return (foreground_map + background_map).mean()
    if foreground_mask is None:
        raise ValueError(f"TAL variant {variant.value!r} needs the TEM mask")
    if variant is TALVariant.EQ4:
        foreground_map = spatial_l2_normalise(foreground_map)
        background_map = spatial_l2_normalise(background_map)
    elif variant is not TALVariant.V2:
        raise ValueError(f"no target attention loss for variant {variant.value!r}")
    return (foreground_map * (1.0 - foreground_mask) + background_map * foreground_mask).mean()


def _mean_cross_entropy(logits: list[Tensor], targets: Tensor) -> Tensor:
    return torch.stack([functional.cross_entropy(x, targets) for x in logits]).mean()


class FANetLoss:
    """Computes every term of Eq. 6 for one batch; returns them by name ("total" is the sum)."""

    def __init__(self, config: FANetConfig) -> None:
        self.config = config

    def __call__(self, output: FANetOutput, person_ids: Tensor, camera_ids: Tensor) -> dict[str, Tensor]:
        person_loss = _mean_cross_entropy(output.person_logits, person_ids)
        terms = {"person_id": person_loss}
        if output.camera_logits:
            camera_loss = _mean_cross_entropy(output.camera_logits, camera_ids)
            terms["camera_id"] = camera_loss
            total = 0.5 * (person_loss + camera_loss)
            if self.config.tal is not TALVariant.NONE:
                terms["target_attention"] = target_attention_loss(
                    output.foreground_map, output.background_map, output.foreground_mask, self.config.tal
                )
                total = total + terms["target_attention"]
        else:
            # Without the background branch the objective is the person-ID loss alone (rows 1-2).
            total = person_loss
        terms["total"] = total
        return terms
