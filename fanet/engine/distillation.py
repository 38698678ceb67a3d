"""Teacher features for distillation, computed once per run and cached in the run folder.

The teacher (any callable from 0-1 RGB images to features: ``reid_app`` hands in an OpenVINO or
ONNX re-ID model, so ``fanet`` stays pure PyTorch) embeds every training image once, un-augmented
at the training input size. The relational distillation term
(:func:`fanet.losses.relational_distillation_loss`) then compares the student's features of the
augmented batch with the teacher's similarities of the same images.

Why cached: a strong teacher costs more than the student's own training step on a CPU (Intel's
0277 takes ~4-8 s for a 64-image batch on 2 cores, a step of the OSNet FA-Net ~4 s), and a run sees
each image tens of times. Why un-augmented: the teacher's view of who resembles whom is the target,
and it is best on clean images; the student learns to keep it under its augmentations.

The cache (``teacher_features.pt``) records the teacher's name and the image list; a resumed run
reuses it only when both match, so a changed teacher or training set recomputes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fanet.checkpoint import save_atomically
from fanet.data.datasets import Sample
from fanet.data.transforms import ReIDImageDataset, ReIDTransform

logger = logging.getLogger(__name__)

TEACHER_CACHE_FILE = "teacher_features.pt"
Teacher = Callable[[Tensor], Tensor]


class TeacherFeatures:
    """The teacher's feature of every training image, looked up by the batch's dataset indices."""

    def __init__(self, features: Tensor) -> None:
        self.features = features

    def __call__(self, indices: Tensor) -> Tensor:
        return self.features[indices.cpu()]

    @classmethod
    def load_or_compute(
        cls,
        teacher: Teacher,
        teacher_name: str,
        samples: Sequence[Sample],
        height: int,
        width: int,
        cache_file: Path,
        *,
        batch_size: int = 64,
        workers: int = 0,
        log: Callable[[str], None] = logger.info,
    ) -> TeacherFeatures:
        """The cached features when ``cache_file`` holds this teacher's for these images, else
        computed (and cached atomically, so an interrupted run never leaves half a file)."""
        paths = [sample.path for sample in samples]
        if cache_file.is_file():
            try:
                payload = torch.load(cache_file, map_location="cpu", weights_only=True)
                if payload["teacher"] == teacher_name and payload["paths"] == paths:
                    log(f"teacher features: {cache_file} ({len(paths)} images)")
                    return cls(payload["features"])
                log(f"teacher features in {cache_file} are another teacher's or image list's: recomputing")
            except (OSError, RuntimeError, KeyError, TypeError) as exc:
                log(f"teacher features in {cache_file} unreadable ({type(exc).__name__}): recomputing")
        images = ReIDImageDataset(samples, ReIDTransform(height, width, flip_prob=0.0))
        loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers)
        log(f"teacher features: embedding {len(paths)} training images with {teacher_name} (once per run)")
        chunks = []
        with torch.no_grad():
            for batch in loader:
                chunks.append(teacher(batch["image"]).float().cpu())
        features = torch.cat(chunks)
        if features.shape[0] != len(paths):
            raise ValueError(f"the teacher returned {features.shape[0]} features for {len(paths)} images")
        save_atomically({"teacher": teacher_name, "paths": paths, "features": features}, cache_file)
        return cls(features)
