"""Image transforms and the image Dataset (Sec. IV-B: inputs resized to 384 x 128, random
horizontal flipping as the only augmentation). Padding + random crop and random erasing
(Zhong et al., AAAI 2020) are off by default and can be switched on for small data.

Images become float tensors in [0, 1]; mean/std normalisation belongs to the model, which owns
its pixel mean and std. The random flip draws from an explicit ``torch.Generator`` held by the
dataset (seeded per epoch and per worker by the train loader), so augmentation is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as F

from fanet.config import IMAGENET_MEAN, DataConfig
from fanet.data.datasets import Sample


def resize_rgb(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """The one resize every path uses (training, evaluation and the app's crops): PIL bilinear
    to (height, width), as a 3xHxW float tensor in [0, 1]."""
    image = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    return F.pil_to_tensor(image).float().div_(255.0)


class ReIDTransform:
    """Resize a PIL image to (height, width) (:func:`resize_rgb`), then the training
    augmentation: horizontal flip with probability ``flip_prob``; zero-pad by ``pad`` pixels and
    crop back at a random place; erase a random rectangle (2-40 % of the area, aspect 0.3-3.3)
    with the ImageNet mean colour with probability ``erase_prob``."""

    def __init__(
        self, height: int, width: int, flip_prob: float = 0.0, pad: int = 0, erase_prob: float = 0.0
    ) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        for name, value in (("flip", flip_prob), ("erasing", erase_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} probability must be in [0, 1], got {value}")
        if pad < 0:
            raise ValueError(f"padding must be >= 0, got {pad}")
        self.height = height
        self.width = width
        self.flip_prob = flip_prob
        self.pad = pad
        self.erase_prob = erase_prob

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        tensor = resize_rgb(image, self.height, self.width)
        if self.flip_prob > 0 and torch.rand((), generator=generator).item() < self.flip_prob:
            tensor = tensor.flip(-1)
        if self.pad > 0:
            tensor = self._pad_crop(tensor, generator)
        if self.erase_prob > 0 and torch.rand((), generator=generator).item() < self.erase_prob:
            tensor = self._erase(tensor, generator)
        return tensor

    def _pad_crop(self, tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        padded = torch.nn.functional.pad(tensor, (self.pad,) * 4)
        top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,), generator=generator))
        return padded[:, top : top + self.height, left : left + self.width].contiguous()

    def _erase(self, tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        area = self.height * self.width
        for _ in range(100):  # rejection sampling of a rectangle that fits, as Zhong et al. do
            target, log_aspect = torch.rand(2, generator=generator).tolist()
            target_area = area * (0.02 + 0.38 * target)
            aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * log_aspect)
            h, w = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(torch.randint(0, self.height - h + 1, (), generator=generator))
                left = int(torch.randint(0, self.width - w + 1, (), generator=generator))
                tensor = tensor.clone()
                tensor[:, top : top + h, left : left + w] = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
                return tensor
        return tensor

    def __repr__(self) -> str:
        return (
            f"ReIDTransform(height={self.height}, width={self.width}, flip_prob={self.flip_prob}, "
            f"pad={self.pad}, erase_prob={self.erase_prob})"
        )


def build_train_transform(config: DataConfig) -> ReIDTransform:
    return ReIDTransform(config.height, config.width, config.flip_prob, config.pad, config.erase_prob)


def build_test_transform(config: DataConfig) -> ReIDTransform:
    return ReIDTransform(config.height, config.width, flip_prob=0.0)


class ReIDImageDataset(Dataset):
    """Reads ``samples`` with PIL (RGB) and returns dicts
    ``{"image": 3xHxW float tensor, "pid": int, "camid": int, "path": str, "index": int}``;
    the default collate turns a batch into ``image`` (Bx3xHxW), ``pid``/``camid``/``index``
    (int64 tensors) and ``path`` (list of str).

    ``seed`` and ``rank`` (the replica, so that replicas flip independently) fix the random
    flips: ``set_epoch`` reseeds them in the main process and :func:`seed_worker` (the train
    loader's ``worker_init_fn``) in each worker.
    """

    def __init__(self, samples: Sequence[Sample], transform: ReIDTransform, seed: int = 0, rank: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(mix_seed(self.seed, epoch, 1, self.rank))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            with Image.open(sample.path) as image:
                tensor = self.transform(image, self.generator)
        except OSError as error:
            raise OSError(f"cannot read image {sample.path}: {error}") from None
        return {"image": tensor, "pid": sample.pid, "camid": sample.camid, "path": sample.path, "index": index}


def mix_seed(*keys: int) -> int:
    """A 63-bit seed fixed by the non-negative integers ``keys`` (seed, epoch, stream, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the worker's flip generator from its torch seed,
    which the loader derives from its own (per-epoch reseeded) generator and the worker id."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, ReIDImageDataset):
        info.dataset.generator.manual_seed(info.seed)
