"""Data layer of fanet: dataset readers (official layouts), the camera-diverse PK sampler,
transforms and DataLoaders."""

from fanet.data.datasets import (
    UNKNOWN_CAMERA,
    DatasetLayoutError,
    ReIDDataset,
    Sample,
    build_dataset,
    read_dukemtmc,
    read_folder,
    read_market1501,
    read_msmt17,
)
from fanet.data.loaders import TrainLoader, build_test_loaders, build_train_loader, load_datasets
from fanet.data.sampler import PKSampler
from fanet.data.transforms import (
    ReIDImageDataset,
    ReIDTransform,
    build_test_transform,
    build_train_transform,
)

__all__ = [
    "UNKNOWN_CAMERA",
    "DatasetLayoutError",
    "PKSampler",
    "ReIDDataset",
    "ReIDImageDataset",
    "ReIDTransform",
    "Sample",
    "TrainLoader",
    "build_dataset",
    "build_test_loaders",
    "build_test_transform",
    "build_train_loader",
    "build_train_transform",
    "load_datasets",
    "read_dukemtmc",
    "read_folder",
    "read_market1501",
    "read_msmt17",
]
