"""CUHK03 (labeled) from ../shared: the reader's counts and cameras, the training augmentation on
its images, and the app seeing a crop exactly as the evaluator does.

CUHK03: Li, Zhao, Xiao, Wang, "DeepReID", CVPR 2014 — non-commercial research use only.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fanet.config import DataConfig
from fanet.data import build_dataset
from fanet.data.datasets import DatasetLayoutError, cuhk03_camera
from fanet.data.transforms import ReIDTransform, build_test_transform
from fanet.inference import preprocess_bgr


@pytest.fixture(scope="module")
def cuhk03(shared_dir: Path):
    return build_dataset("cuhk03", shared_dir / "data")


def test_reader_counts_match_the_split(cuhk03) -> None:
    assert (len(cuhk03.train), cuhk03.num_train_pids, cuhk03.num_train_cams) == (7370, 767, 10)
    assert sorted({s.pid for s in cuhk03.train}) == list(range(767))  # relabelled
    assert len(cuhk03.query) == 1400 and len({s.pid for s in cuhk03.query}) == 700
    assert len(cuhk03.gallery) == 5327 and {s.pid for s in cuhk03.gallery} == {s.pid for s in cuhk03.query}
    assert not {s.pid for s in cuhk03.query} & {int(Path(s.path).name[:4]) for s in cuhk03.train}
    # One query per test person per camera; all but 3 queries (people with a single image in the
    # other camera, which became that camera's query) find their person in the other camera.
    assert Counter((s.pid, s.camid) for s in cuhk03.query).most_common(1)[0][1] == 1
    gallery_cams: dict[int, set[int]] = {}
    for sample in cuhk03.gallery:
        gallery_cams.setdefault(sample.pid, set()).add(sample.camid)
    assert sum(not gallery_cams[q.pid] - {q.camid} for q in cuhk03.query) == 3
    assert {s.camid for s in cuhk03.query} == set(range(10))


def test_camera_ids_follow_the_pairs(shared_dir: Path, cuhk03) -> None:
    assert [cuhk03_camera(c, p) for p in (1, 5) for c in (0, 1)] == [0, 1, 8, 9]
    with pytest.raises(ValueError):
        cuhk03_camera(2, 1)
    labels = {}
    for line in (shared_dir / "data" / "cuhk03_labeled_64x128" / "labels.csv").read_text().splitlines()[1:]:
        file, _, camid, _, pair = line.split(",")
        labels[Path(file).name] = int(pair) * 2 + int(camid) - 2
    assert all(s.camid == labels[Path(s.path).name] for s in cuhk03.query + cuhk03.gallery)


def test_wrong_roots_are_clear_errors(tmp_path: Path, shared_dir: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="labels.csv"):
        build_dataset("cuhk03", tmp_path)
    broken = tmp_path / "cuhk03_labeled_64x128"
    broken.mkdir()
    (broken / "images").mkdir()
    shutil.copy(shared_dir / "data" / "cuhk03_labeled_64x128" / "labels.csv", broken / "labels.csv")
    (broken / "split_np.json").write_text(json.dumps({"train": ["images/none.jpg"], "query": [], "gallery": []}))
    with pytest.raises(ValueError, match="not in labels.csv"):
        build_dataset("cuhk03", tmp_path)


def test_augmentation_is_reproducible_and_keeps_size(cuhk03) -> None:
    with Image.open(cuhk03.train[0].path) as image:
        transform = ReIDTransform(128, 64, flip_prob=0.5, pad=4, erase_prob=1.0)
        first = [transform(image, torch.Generator().manual_seed(s)) for s in range(4)]
        again = [transform(image, torch.Generator().manual_seed(s)) for s in range(4)]
        plain = ReIDTransform(128, 64)(image)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(t.shape == (3, 128, 64) for t in first)
    assert not torch.equal(first[0], first[1])
    # Erasing paints a rectangle with the ImageNet mean colour.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert all(bool(((t - mean).abs().sum(0) < 1e-6).any()) for t in first)
    assert not bool(((plain - mean).abs().sum(0) < 1e-6).any())


def test_app_preprocessing_equals_the_evaluators(cuhk03) -> None:
    """The app reads crops with OpenCV (BGR) and must feed the model what evaluation fed it."""
    transform = build_test_transform(DataConfig(height=128, width=64))
    samples = cuhk03.query[:16]
    crops = [cv2.imread(s.path, cv2.IMREAD_COLOR) for s in samples]
    app = preprocess_bgr(crops, height=128, width=64)
    evaluator = []
    for sample in samples:
        with Image.open(sample.path) as image:
            evaluator.append(transform(image))
    difference = (app - torch.stack(evaluator)).abs()
    # Same resize; JPEG decoders may differ by one grey level at most.
    assert all(float(d.max()) <= 1.5 / 255 for d in difference)
    assert np.isclose(float(difference.mean()), 0, atol=1e-3)
