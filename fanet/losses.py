"""FA-Net's training objective, Eq. 6: L = 1/2 (L_f + L_b) + L_t.

L_f and L_b are softmax (cross-entropy) losses of the person classifiers and the camera
classifiers, averaged over the HPP stripes so the backbone's gradient scale does not depend on
the number of stripes (the paper does not say; this keeps the Table I rows comparable).

:class:`~fanet.config.LossConfig` can add label smoothing to L_f, a batch-hard triplet term on
the inference feature and a relational distillation term from a teacher re-ID model; all are off
by default (the paper's objective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import Tensor

from fanet.config import FANetConfig, LossConfig, TALVariant
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


#: Camera id of an image whose camera is not recorded (a source without cameras): no camera loss.
UNKNOWN_CAMERA = -1


def _mean_cross_entropy(logits: list[Tensor], targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return torch.stack(
        [functional.cross_entropy(x, targets, label_smoothing=label_smoothing) for x in logits]
    ).mean()


def camera_id_loss(logits: list[Tensor], camera_ids: Tensor) -> Tensor:
    """L_b over the images whose camera is known; zero (with a gradient path) when none is."""
    known = camera_ids != UNKNOWN_CAMERA
    if bool(known.all()):
        return _mean_cross_entropy(logits, camera_ids)
    if not bool(known.any()):
        return torch.stack([x.sum() for x in logits]).sum() * 0.0
    return _mean_cross_entropy([x[known] for x in logits], camera_ids[known])


def batch_hard_triplet_loss(features: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on l2-normalised features: for each anchor
    its farthest positive and nearest negative in the batch, hinged at ``margin``.

    Normalising first makes the distances those a cosine search ranks by. Anchors without a
    positive or without a negative in the batch are left out (a PK batch has both)."""
    # In float32 even under autocast: hard mining compares distances to within the margin, and a
    # float16/bfloat16 product is off by ~1e-3.
    with torch.autocast(features.device.type, enabled=False):
        features = functional.normalize(features.float(), dim=1)
        # Squared distance of unit vectors is 2 - 2 cos; the clamp keeps sqrt's gradient finite.
        distances = (2.0 - 2.0 * features @ features.t()).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    usable = positive.any(dim=1) & negative.any(dim=1)
    if not bool(usable.any()):
        return features.sum() * 0.0
    hardest_positive = distances.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(~negative, float("inf")).amin(dim=1)
    hinge = functional.relu(hardest_positive - hardest_negative + margin)
    return hinge[usable].mean()


def relational_distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Relational knowledge distillation on a batch: for each image, the distribution of its cosine
    similarities to the other images of the batch (softmax at ``temperature``) under the teacher is
    the target of the student's (KL divergence, mean over images).

    Why relational: it asks the student to rank the batch as the teacher does, which is what
    retrieval uses, and it needs no projection between the two feature spaces (FA-Net's 3840-d
    feature, the teacher's 256-d one). Teacher features carry no gradient."""
    with torch.autocast(student.device.type, enabled=False):
        student = functional.normalize(student.float(), dim=1)
        teacher = functional.normalize(teacher.detach().float(), dim=1)
        count = student.shape[0]
        if count < 2:
            return student.sum() * 0.0
        off_diagonal = ~torch.eye(count, dtype=torch.bool, device=student.device)
        student_logits = (student @ student.t())[off_diagonal].view(count, count - 1) / temperature
        teacher_logits = (teacher @ teacher.t())[off_diagonal].view(count, count - 1) / temperature
        return functional.kl_div(
            functional.log_softmax(student_logits, dim=1),
            functional.log_softmax(teacher_logits, dim=1),
            reduction="batchmean",
            log_target=True,
        )


class FANetLoss:
    """Computes every term of Eq. 6 for one batch; returns them by name ("total" is the sum)."""

    def __init__(self, config: FANetConfig, loss: LossConfig | None = None) -> None:
        self.config = config
        self.loss = loss if loss is not None else LossConfig()

    def __call__(
        self,
        output: FANetOutput,
        person_ids: Tensor,
        camera_ids: Tensor,
        teacher_features: Tensor | None = None,
        distill_rows: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``teacher_features`` are the teacher's features of the batch's images, or with
        ``distill_rows`` (a boolean per batch row) of those rows only, which alone the
        distillation term then compares."""
        person_loss = _mean_cross_entropy(output.person_logits, person_ids, self.loss.label_smoothing)
        terms = {"person_id": person_loss}
        if output.camera_logits:
            camera_loss = camera_id_loss(output.camera_logits, camera_ids)
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
        if self.loss.triplet_weight > 0:
            if output.features is None:
                raise ValueError("the triplet loss needs the batch's inference features")
            terms["triplet"] = batch_hard_triplet_loss(output.features, person_ids, self.loss.triplet_margin)
            total = total + self.loss.triplet_weight * terms["triplet"]
        if self.loss.distill_weight > 0:
            if output.features is None:
                raise ValueError("the distillation term needs the batch's features")
            student = output.features if distill_rows is None else output.features[distill_rows]
            if student.shape[0] < 2:  # no pair of distilled images in this batch
                terms["distillation"] = output.features.sum() * 0.0
            elif teacher_features is None or teacher_features.shape[0] != student.shape[0]:
                raise ValueError("the distillation term needs the teacher's features of the distilled images")
            else:
                terms["distillation"] = relational_distillation_loss(
                    student, teacher_features, self.loss.distill_temperature
                )
            total = total + self.loss.distill_weight * terms["distillation"]
        terms["total"] = total
        return terms
