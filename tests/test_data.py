"""Data layer: dataset readers on real-photo datasets in the official layouts, the PK sampler,
transforms and loaders."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from fanet.config import DataConfig, DatasetName
from fanet.data import (
    UNKNOWN_CAMERA,
    DatasetLayoutError,
    PKSampler,
    ReIDImageDataset,
    ReIDTransform,
    Sample,
    build_dataset,
    build_test_loaders,
    build_train_loader,
    load_datasets,
)
from fanet.data.loaders import usable_cpus

# ------------------------------------------------------------------------------------------
# Readers


def _pid_cams(samples: list[Sample]) -> dict[int, Counter]:
    result: dict[int, Counter] = {}
    for sample in samples:
        result.setdefault(sample.pid, Counter())[sample.camid] += 1
    return result


def test_market1501_layout(tiny_market_root: Path) -> None:
    dataset = build_dataset("market1501", tiny_market_root)
    assert dataset.name == "market1501"
    assert dataset.root == tiny_market_root / "Market-1501-v15.09.15"
    # Train pids 2, 7, 10, 11 -> 0..3 in sorted order; cameras c1..c6 -> 0..5.
    assert dataset.num_train_pids == 4 and dataset.num_train_cams == 6
    assert _pid_cams(dataset.train) == {
        0: Counter({0: 4, 1: 4, 2: 4}),
        1: Counter({0: 4, 1: 3}),
        2: Counter({1: 3, 5: 3}),
        3: Counter({0: 2, 3: 3, 4: 2}),
    }
    assert all(Path(s.path).name.startswith("0007_") for s in dataset.train if s.pid == 1)
    # Query/gallery keep original pids and 0-based cameras; junk (-1) skipped, distractors (0) kept.
    assert _pid_cams(dataset.query) == {1: Counter({0: 1, 1: 1}), 3: Counter({3: 1, 4: 1})}
    assert _pid_cams(dataset.gallery) == {
        1: Counter({0: 2, 1: 2, 2: 2}),
        3: Counter({3: 2, 4: 2, 5: 2}),
        0: Counter({1: 1, 4: 1}),
    }
    assert len(list((dataset.root / "bounding_box_test").glob("-1_*.jpg"))) == 1
    assert all(Path(s.path).is_file() for s in dataset.train + dataset.query + dataset.gallery)
    assert "train" in dataset.summary() and dataset.has_cameras


def test_market1501_alternative_roots(tiny_market_root: Path, tmp_path: Path) -> None:
    data_dir = tiny_market_root / "Market-1501-v15.09.15"
    # The official folder itself, and torchreid's <root>/market1501/Market-1501-v15.09.15.
    assert len(build_dataset(DatasetName.MARKET1501, data_dir).train) == 32
    shutil.copytree(data_dir, tmp_path / "market1501" / "Market-1501-v15.09.15")
    assert len(build_dataset("market1501", tmp_path).gallery) == 14


def test_dukemtmc_layout(tiny_duke_root: Path) -> None:
    dataset = build_dataset("dukemtmc", tiny_duke_root)
    assert dataset.root.name == "DukeMTMC-reID"
    # Cameras c3..c8 used in train -> relabelled 0..5.
    assert dataset.num_train_pids == 4 and dataset.num_train_cams == 6
    assert _pid_cams(dataset.train)[0] == Counter({0: 4, 1: 4, 2: 4})
    assert _pid_cams(dataset.query) == {1: Counter({2: 1, 3: 1}), 3: Counter({5: 1, 6: 1})}
    assert sum(len(c) for c in _pid_cams(dataset.gallery).values()) == 6


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_layout(version: str, tiny_msmt17_root: Path, tiny_msmt17_v2_root: Path) -> None:
    root = tiny_msmt17_root if version == "MSMT17_V1" else tiny_msmt17_v2_root
    dataset = build_dataset("msmt17", root)
    assert dataset.root.name == version
    # list_train.txt only: pids 0, 1, 2; cameras 01, 07, 12, 15 -> 0..3.
    assert dataset.num_train_pids == 3 and dataset.num_train_cams == 4
    assert _pid_cams(dataset.train) == {
        0: Counter({0: 3, 1: 2}),
        1: Counter({1: 3, 2: 2}),
        2: Counter({3: 4}),
    }
    assert _pid_cams(dataset.query) == {0: Counter({2: 1}), 1: Counter({8: 1})}
    assert _pid_cams(dataset.gallery) == {0: Counter({2: 1, 3: 2}), 1: Counter({8: 1, 9: 2})}
    assert all(Path(s.path).is_file() for s in dataset.train + dataset.query + dataset.gallery)
    with_val = build_dataset("msmt17", root, include_val=True)
    assert len(with_val.train) == len(dataset.train) + 2
    assert _pid_cams(with_val.train)[0] == Counter({0: 3, 1: 2, 2: 1})


@pytest.mark.parametrize("name", ["market1501", "dukemtmc", "msmt17", "folder"])
def test_wrong_layout_is_a_clear_error(name: str, tmp_path: Path, tiny_market_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_dataset(name, tmp_path / "nowhere")
    (tmp_path / "query").mkdir()
    expected = {
        "market1501": "bounding_box_train",
        "dukemtmc": "DukeMTMC-reID",
        "msmt17": "MSMT17_V1",
        "folder": "train",
    }[name]
    with pytest.raises(FileNotFoundError, match=expected) as error:
        build_dataset(name, tmp_path)
    assert "\n" not in str(error.value)
    if name != "market1501":  # a Market folder is not another dataset
        with pytest.raises(DatasetLayoutError):
            build_dataset(name, tiny_market_root)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of market1501, dukemtmc, msmt17, cuhk03, folder"):
        build_dataset("viper", tmp_path)


def test_market_bad_file_name(tiny_market_root: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "Market-1501-v15.09.15"
    shutil.copytree(tiny_market_root / "Market-1501-v15.09.15", data_dir)
    shutil.copy(next((data_dir / "query").glob("*.jpg")), data_dir / "query" / "person.jpg")
    with pytest.raises(ValueError, match="person.jpg"):
        build_dataset("market1501", tmp_path)


def test_msmt17_list_not_matching_images(tiny_msmt17_root: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_msmt17_root / "MSMT17_V1", tmp_path / "MSMT17_V1")
    list_path = tmp_path / "MSMT17_V1" / "list_query.txt"
    list_path.write_text(list_path.read_text().replace("0000/0000_", "0000/9999_"))
    with pytest.raises(DatasetLayoutError, match="list_query.txt lists"):
        build_dataset("msmt17", tmp_path)


def test_folder_layout_with_cameras(tiny_folder_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fanet.data.datasets"):
        dataset = build_dataset("folder", tiny_folder_root)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert dataset.num_train_pids == 3 and dataset.num_train_cams == 3
    # anna, ben, chris -> 0, 1, 2; cameras 1, 2, 3 -> 0, 1, 2.
    assert _pid_cams(dataset.train) == {
        0: Counter({0: 3, 1: 2}),
        1: Counter({1: 2, 2: 2}),
        2: Counter({0: 2, 2: 2}),
    }
    # Numeric test folder names are the pids; test cameras keep the token's number.
    assert _pid_cams(dataset.query) == {101: Counter({1: 1}), 102: Counter({2: 1})}
    assert _pid_cams(dataset.gallery) == {101: Counter({2: 2}), 102: Counter({1: 2}), 103: Counter({3: 1})}


def test_folder_layout_without_cameras(tiny_folder_root_no_cameras: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fanet.data.datasets"):
        dataset = build_dataset("folder", tiny_folder_root_no_cameras)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "background (camera-ID) branch" in warnings[0] and "20 of 20 images" in warnings[0]
    assert dataset.num_train_cams == 0 and dataset.num_cameras == 0 and not dataset.has_cameras
    assert dataset.num_train_pids == 3
    assert {s.camid for s in dataset.train + dataset.query + dataset.gallery} == {UNKNOWN_CAMERA}


def test_folder_layout_partial_camera_tokens(
    tiny_folder_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(tiny_folder_root, tmp_path / "data")
    image = next((tmp_path / "data" / "gallery" / "0103").glob("*.jpg"))
    image.rename(image.with_name("no_token.jpg"))
    with caplog.at_level(logging.WARNING, logger="fanet.data.datasets"):
        dataset = build_dataset("folder", tmp_path / "data")
    assert dataset.num_train_cams == 0
    assert any("1 of 20 images" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------
# PK sampler


def _synthetic_samples() -> list[Sample]:
    """Identities with different camera spreads (the sampler only reads pid and camid)."""
    layout = {
        0: {0: 4, 1: 4, 2: 4},  # 3 cameras, 12 images
        1: {0: 3, 1: 3, 2: 3},  # 3 cameras, 9 images
        2: {3: 2, 4: 1},  # fewer than K images
        3: {0: 20},  # one camera
        4: {1: 5, 5: 5, 2: 6},
        5: {0: 1},  # a single image
        6: {2: 8, 3: 1},
        7: {0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 5: 2},
    }
    return [
        Sample(f"{pid}_{cam}_{i}.jpg", pid, cam)
        for pid, cams in layout.items()
        for cam, count in cams.items()
        for i in range(count)
    ]


def _batches(sampler: PKSampler) -> list[list[int]]:
    indices = list(sampler)
    size = sampler.batch_size
    assert len(indices) == len(sampler) and len(indices) % size == 0
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_pk_batches_and_camera_diversity() -> None:
    samples = _synthetic_samples()
    sampler = PKSampler(samples, num_identities=4, num_instances=8, seed=3)
    # Chunks per identity: 1 + 1 + 1 + 2 + 2 + 1 + 1 + 1 = 10 -> 10 // 4 = 2 batches.
    assert len(sampler) == 2 * 32
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in _batches(sampler):
            groups = [batch[i : i + 8] for i in range(0, 32, 8)]
            pids = [{samples[i].pid for i in group} for group in groups]
            assert all(len(p) == 1 for p in pids) and len(set.union(*pids)) == 4
            for group in groups:
                pid = samples[group[0]].pid
                available = Counter(s.camid for s in samples if s.pid == pid)
                used = Counter(samples[i].camid for i in group)
                if sum(available.values()) >= 16:
                    continue  # later chunks of an identity are balanced over what remains
                # As many cameras as the identity has (up to K), balanced within one image
                # unless a camera runs out of images.
                assert len(used) == min(len(available), 8)
                short = [cam for cam in used if used[cam] < max(used.values()) - 1]
                assert all(used[cam] == available[cam] for cam in short)
                if len(group) > len(set(group)):  # repeats only when the identity has < K images
                    assert sum(available.values()) < 8


def test_pk_three_cameras_balanced_on_real_market(tiny_market_root: Path) -> None:
    dataset = build_dataset("market1501", tiny_market_root)
    sampler = PKSampler(dataset.train, num_identities=4, num_instances=8, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in _batches(sampler):
            group = next(batch[i : i + 8] for i in range(0, 32, 8) if dataset.train[batch[i]].pid == 0)
            # pid 0 (Market 0002) has 4 images in each of 3 cameras: 3/3/2 in some order.
            assert sorted(Counter(dataset.train[i].camid for i in group).values()) == [2, 3, 3]
            assert len(set(group)) == 8


def test_pk_deterministic_per_seed_and_epoch() -> None:
    samples = _synthetic_samples()
    first, second = (PKSampler(samples, 2, 4, seed=7) for _ in range(2))
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)
    second.set_epoch(4)
    assert list(first) != list(second)
    other_seed = PKSampler(samples, 2, 4, seed=8)
    other_seed.set_epoch(3)
    assert list(other_seed) != list(first)


def test_pk_distributed_shards_are_disjoint_and_equal() -> None:
    samples = _synthetic_samples()
    shards = [PKSampler(samples, 2, 4, seed=1, rank=rank, world_size=2) for rank in range(2)]
    for sampler in shards:
        sampler.set_epoch(2)
    shard_batches = [_batches(shard) for shard in shards]
    assert len(shard_batches[0]) == len(shard_batches[1]) == shards[0].batches_per_replica > 0
    assert len(shards[0]) == len(shards[1])
    as_tuples = [{tuple(b) for b in batches} for batches in shard_batches]
    assert not as_tuples[0] & as_tuples[1]  # no batch is given to both replicas
    everything = shards[0].epoch_batches(2)
    assert sorted(map(tuple, everything)) == sorted(as_tuples[0] | as_tuples[1])
    # 3 + 2 + 1 + 5 + 4 + 1 + 2 + 3 = 21 chunks of K=4 -> 10 batches -> 5 per replica.
    assert shards[0].batches_per_replica == 5 and len(everything) == 10


def test_pk_needs_enough_identities() -> None:
    with pytest.raises(ValueError, match="at least P=16 identities"):
        PKSampler(_synthetic_samples(), 16, 8)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(_synthetic_samples(), 2, 4, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------
# Transforms and loaders


def test_transform_size_range_and_flip(tiny_market_root: Path) -> None:
    path = next((tiny_market_root / "Market-1501-v15.09.15" / "query").glob("*.jpg"))
    with Image.open(path) as image:
        plain = ReIDTransform(384, 128)(image)
        flipped = ReIDTransform(384, 128, flip_prob=1.0)(image)
    assert plain.shape == (3, 384, 128) and plain.dtype == torch.float32
    assert plain.min() >= 0.0 and plain.max() <= 1.0 and plain.max() > 0.5  # not normalised
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    # p = 0.5: both outcomes occur, fixed by the generator.
    outcomes = []
    generator = torch.Generator().manual_seed(0)
    with Image.open(path) as image:
        for _ in range(20):
            outcomes.append(torch.equal(ReIDTransform(384, 128, 0.5)(image, generator), flipped))
    assert 3 <= sum(outcomes) <= 17
    with pytest.raises(ValueError):
        ReIDTransform(384, 128, flip_prob=1.5)


def test_image_dataset_items(tiny_market_root: Path) -> None:
    dataset = build_dataset("market1501", tiny_market_root)
    images = ReIDImageDataset(dataset.query, ReIDTransform(64, 32))
    item = images[1]
    assert item["image"].shape == (3, 64, 32)
    assert (item["pid"], item["camid"], item["path"], item["index"]) == (
        dataset.query[1].pid,
        dataset.query[1].camid,
        dataset.query[1].path,
        1,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_batches_and_replay(tiny_market_root: Path, workers: int) -> None:
    config = DataConfig(
        root=str(tiny_market_root), height=64, width=32, num_identities=2, num_instances=4, workers=workers
    )
    dataset = build_dataset(config.dataset, config.root)
    loader = build_train_loader(dataset, config, seed=5)
    # 12, 7, 6 and 7 images: 3 + 1 + 1 + 1 = 6 chunks of K=4 -> 3 batches of P=2.
    assert len(loader) == 3

    def run(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader.set_epoch(epoch)
        return [(batch["image"], batch["pid"]) for batch in loader]

    epoch1 = run(1)
    assert len(epoch1) == 3
    for images, pids in epoch1:
        assert images.shape == (8, 3, 64, 32) and images.min() >= 0 and images.max() <= 1
        assert sorted(Counter(pids.tolist()).values()) == [4, 4]
    replay = run(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1, replay, strict=True))
    epoch2 = run(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch1, epoch2, strict=True))


def test_test_loaders_and_config_datasets(tiny_market_root: Path) -> None:
    config = DataConfig(root=str(tiny_market_root), height=64, width=32, workers=0)
    train, test = load_datasets(config)
    assert train is test
    query_loader, gallery_loader = build_test_loaders(test, config, batch_size=5)
    gallery = [batch for batch in gallery_loader]
    assert [len(b["path"]) for b in gallery] == [5, 5, 4]
    assert [p for b in gallery for p in b["path"]] == [s.path for s in test.gallery]
    assert torch.cat([b["pid"] for b in gallery]).tolist() == [s.pid for s in test.gallery]
    query = next(iter(query_loader))
    # No augmentation at test time: the same image twice gives the same tensor.
    assert torch.equal(query["image"], next(iter(query_loader))["image"])
    assert query["image"].shape == (4, 3, 64, 32)
    # More workers than usable CPUs would only add processes: the test loaders take at most one a CPU.
    many = dataclasses.replace(config, workers=usable_cpus() + 3)
    assert {loader.num_workers for loader in build_test_loaders(test, many)} == {usable_cpus()}


def test_train_loaders_of_two_replicas(tiny_market_root: Path) -> None:
    config = DataConfig(root=str(tiny_market_root), height=32, width=16, num_identities=2, num_instances=2)
    config.workers = 0
    dataset = build_dataset(config.dataset, config.root)
    loaders = [build_train_loader(dataset, config, seed=9, rank=rank, world_size=2) for rank in range(2)]
    for loader in loaders:
        loader.set_epoch(4)
    steps = [[tuple(batch["path"]) for batch in loader] for loader in loaders]
    # 6 + 3 + 3 + 3 = 15 chunks of K=2 -> 7 batches of P=2 -> 4 steps on each replica.
    assert len(steps[0]) == len(steps[1]) == len(loaders[0]) == 4
    assert not set(steps[0]) & set(steps[1])
