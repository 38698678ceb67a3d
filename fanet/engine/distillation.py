"""Teacher features for distillation: each training image embedded once, cached in the run folder.

The teacher (any callable from 0-1 RGB images to features: ``reid_app`` hands in an OpenVINO or
ONNX re-ID model, so ``fanet`` stays pure PyTorch) embeds a training image the first time a batch
holds it, un-augmented at the training input size, and never again. The relational distillation
term (:func:`fanet.losses.relational_distillation_loss`) compares the student's features of the
augmented batch with the teacher's similarities of the same images.

Why cached: a strong teacher costs more than the student's own training step on a CPU (Intel's
0277 takes ~4-8 s for a 64-image batch on 2 cores, a step of the OSNet FA-Net ~4 s), and a run sees
each image tens of times. Why un-augmented: the teacher's view of who resembles whom is the target,
and it is best on clean images; the student learns to keep it under its augmentations. Why on first
use rather than all up front: a short run (or a smoke test) pays only for the images it sees.

The cache (``teacher_features.pt``, written atomically after each epoch) records the teacher's name
and the image list; a resumed run (or one given an earlier run's cache) reuses the features of the
images both lists hold, and only when the teacher is the same; the rest are computed on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from fanet.checkpoint import save_atomically
from fanet.data.datasets import Sample
from fanet.data.transforms import resize_rgb

logger = logging.getLogger(__name__)

TEACHER_CACHE_FILE = "teacher_features.pt"
Teacher = Callable[[Tensor], Tensor]


class TeacherFeatures:
    """The teacher's feature of every training image, looked up (or computed on first use) by the
    batch's dataset indices."""

    def __init__(
        self,
        teacher: Teacher,
        teacher_name: str,
        samples: Sequence[Sample],
        height: int,
        width: int,
        cache_file: Path,
        log: Callable[[str], None] = logger.info,
        earlier_cache: Path | None = None,
    ) -> None:
        self.teacher = teacher
        self.teacher_name = teacher_name
        self.paths = [sample.path for sample in samples]
        self.height, self.width = height, width
        self.cache_file = cache_file
        self.features: Tensor | None = None  # (N, D), allocated at the first teacher call
        self.known = torch.zeros(len(self.paths), dtype=torch.bool)
        self._unsaved = False
        if self.cache_file.is_file():
            self._load(self.cache_file, log)
        elif earlier_cache is not None and earlier_cache.is_file():
            # A second stage (--init-from) with the same teacher and images starts from the first
            # stage's cache instead of paying for the teacher again; it then saves its own copy.
            self._unsaved = self._load(earlier_cache, log)

    def _load(self, cache_file: Path, log: Callable[[str], None]) -> bool:
        """Take the features cached in ``cache_file`` if they are this teacher's: by image path, so
        an earlier run on more images (``cuhk03+peta`` for a ``cuhk03`` run) serves the ones it knows."""
        try:
            payload = torch.load(cache_file, map_location="cpu", weights_only=True)
            if payload["teacher"] != self.teacher_name:
                log(f"teacher features in {cache_file} are another teacher's: starting afresh")
                return False
            features = payload["features"]
            # A cache written whole (no mask) knows every image.
            known = payload.get("known", torch.ones(len(payload["paths"]), dtype=torch.bool))
            row_of = {path: row for row, path in enumerate(payload["paths"]) if bool(known[row])}
        except (OSError, RuntimeError, KeyError, TypeError, IndexError) as exc:
            log(f"teacher features in {cache_file} unreadable ({type(exc).__name__}): starting afresh")
            return False
        if payload["paths"] == self.paths:
            self.features, self.known = features, known.clone()
        else:
            rows = [(index, row_of[path]) for index, path in enumerate(self.paths) if path in row_of]
            if not rows:
                log(f"teacher features in {cache_file} are of other images: starting afresh")
                return False
            mine, theirs = (torch.tensor(column) for column in zip(*rows, strict=True))
            self.features = torch.zeros(len(self.paths), features.shape[1], dtype=features.dtype)
            self.features[mine] = features[theirs]
            self.known[mine] = True
        log(f"teacher features: {int(self.known.sum())} of {len(self.paths)} images cached in {cache_file}")
        return True

    def __call__(self, indices: Tensor) -> Tensor:
        indices = indices.cpu()
        missing = torch.unique(indices[~self.known[indices]])
        if len(missing):
            images = torch.stack([self._clean_image(int(i)) for i in missing])
            with torch.no_grad():
                computed = self.teacher(images).float().cpu()
            if self.features is None:
                self.features = torch.zeros(len(self.paths), computed.shape[1])
            self.features[missing] = computed
            self.known[missing] = True
            self._unsaved = True
        assert self.features is not None
        return self.features[indices]

    def _clean_image(self, index: int) -> Tensor:
        with Image.open(self.paths[index]) as image:
            return resize_rgb(image, self.height, self.width)

    def save(self) -> None:
        """Write what is known so far (atomically), if anything new was computed."""
        if self._unsaved and self.features is not None:
            payload = {"teacher": self.teacher_name, "paths": self.paths}
            save_atomically(payload | {"features": self.features, "known": self.known}, self.cache_file)
            self._unsaved = False
