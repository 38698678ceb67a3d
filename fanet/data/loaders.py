"""DataLoaders for training (PK batches, reproducible per epoch) and testing (query/gallery)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from fanet.config import DataConfig
from fanet.data.datasets import ReIDDataset, build_dataset, combine_sources
from fanet.data.sampler import PKSampler
from fanet.data.transforms import (
    ReIDImageDataset,
    build_test_transform,
    build_train_transform,
    mix_seed,
    seed_worker,
)


class TrainLoader(DataLoader):
    """A DataLoader over PK batches whose ``set_epoch(epoch)`` fixes the epoch's batches and
    flips: the same (seed, epoch, workers) replays the same images in the same order."""

    def __init__(
        self, dataset: ReIDImageDataset, sampler: PKSampler, seed: int, rank: int = 0, **kwargs: object
    ) -> None:
        super().__init__(
            dataset,
            batch_size=sampler.batch_size,
            sampler=sampler,
            drop_last=False,  # the sampler yields whole batches only
            worker_init_fn=seed_worker,
            generator=torch.Generator(),
            **kwargs,  # type: ignore[arg-type]
        )
        self.seed = seed
        self.rank = rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        # Worker seeds (hence their flips) come from this generator: reseed it per epoch.
        self.generator.manual_seed(mix_seed(self.seed, epoch, 2, self.rank))  # type: ignore[union-attr]


def build_train_loader(
    dataset: ReIDDataset,
    data_config: DataConfig,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> TrainLoader:
    """PK batches (P = ``num_identities``, K = ``num_instances``) of ``dataset.train``.

    Each of ``world_size`` replicas gets P x K images per step from a disjoint share of the
    epoch's batches; ``seed`` must be the same on every replica (flips still differ by rank).
    Call ``loader.set_epoch(epoch)`` before iterating an epoch;
    ``len(loader)`` is the number of steps per epoch.
    """
    if data_config.workers < 0:
        raise ValueError(f"workers must be >= 0, got {data_config.workers}")
    sampler = PKSampler(
        dataset.train,
        num_identities=data_config.num_identities,
        num_instances=data_config.num_instances,
        max_per_identity=data_config.max_per_identity,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    images = ReIDImageDataset(dataset.train, build_train_transform(data_config), seed=seed, rank=rank)
    return TrainLoader(images, sampler, seed, rank, num_workers=data_config.workers, pin_memory=pin_memory)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def build_test_loaders(
    dataset: ReIDDataset,
    data_config: DataConfig,
    batch_size: int = 128,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """(query loader, gallery loader) in the datasets' order, without augmentation."""
    if data_config.workers < 0:
        raise ValueError(f"workers must be >= 0, got {data_config.workers}")
    transform = build_test_transform(data_config)
    # Test images are not augmented, so the worker count cannot change a feature: more workers than
    # the CPUs this process may use only add processes (and PyTorch's warning on a 2-core machine).
    workers = min(data_config.workers, usable_cpus())
    return tuple(  # type: ignore[return-value]
        DataLoader(
            ReIDImageDataset(samples, transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin_memory,
        )
        for samples in (dataset.query, dataset.gallery)
    )


def build_training_set(data_config: DataConfig) -> ReIDDataset:
    """The training set: ``dataset`` alone, or it and the ``extra_sources`` combined (ids and
    cameras kept apart per source); query/gallery are ``dataset``'s."""
    return combine_sources([build_dataset(name, data_config.root) for name in data_config.sources])


def load_datasets(data_config: DataConfig) -> tuple[ReIDDataset, ReIDDataset]:
    """(training dataset, test dataset) from the config; the test dataset is a different one
    only for cross-dataset evaluation (``test_dataset``/``test_root`` set, Table III)."""
    train = build_training_set(data_config)
    test_name = data_config.test_dataset or data_config.dataset
    test_root = data_config.test_root or data_config.root
    if test_name == data_config.dataset and test_root == data_config.root:
        return train, train
    return train, build_dataset(test_name, test_root)
