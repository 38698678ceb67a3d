"""Readers for the re-ID datasets of the paper (Sec. IV-A) and for a generic folder layout.

Each reader follows the official folder layout exactly as torchreid and fast-reid read it, so a
user can point ``--data-root`` at the unpacked data:

* Market-1501: ``<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}``,
  files ``0002_c1s1_000451_03.jpg`` (pid 2, camera 1). pid -1 marks junk images (skipped) and
  pid 0 distractors (kept in the gallery, as the standard protocol does).
* DukeMTMC-reID: ``<root>/DukeMTMC-reID/`` with the same three folders, files
  ``0001_c2_f0046182.jpg``.
* MSMT17 V1/V2: ``<root>/MSMT17_V1/{train,test}`` or ``<root>/MSMT17_V2/{mask_train_v2,
  mask_test_v2}`` plus the list files ``list_{train,val,query,gallery}.txt`` whose lines read
  ``0000/0000_000_01_0303morning_0015_0.jpg 0``; the camera is the third ``_`` field of the name.
* CUHK03 "labeled" (Li et al., DeepReID, CVPR 2014) as JPEG files with a CSV index:
  ``<root>/cuhk03_labeled_64x128/`` (or ``<root>`` itself) holding ``images/PPPP_SS.jpg``,
  ``labels.csv`` (``file,pid,camid,shot,cam_pair_probable``) and ``split_np.json`` (lists of
  ``file`` for ``train``/``query``/``gallery``, a CUHK03-NP-shaped split). CUHK03 has five
  camera pairs; the camera ID is ``cam_pair_probable * 2 + camid - 2`` (0-9).
* Generic folders: ``<root>/{train,query,gallery}/<person_id>/*.jpg``; camera IDs come from a
  ``c<N>`` token in the file name when every image has one.

Conventions: camera IDs are 0-based for the official datasets (``c1`` -> 0). Training pids are
relabelled to ``0..N-1`` and training camids to ``0..C-1`` (sorted by their original value);
query/gallery keep the original pids and camids, which evaluation only compares for equality.
A camid of -1 means "camera unknown" (generic folders without camera tokens).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fanet.config import DatasetName

logger = logging.getLogger(__name__)

UNKNOWN_CAMERA = -1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# Market-1501 and DukeMTMC-reID names start with "<pid>_c<camera>"; pid may be -1 (junk).
_OFFICIAL_NAME = re.compile(r"^(-?\d+)_c(\d)")
# A camera token in a custom file name: "c<N>" at the start or after a separator ("..._c3_...",
# "0002_c1s1_..."), so words such as "coat" or "abc3" do not count.
_CAMERA_TOKEN = re.compile(r"(?:^|[_\-.\s])[cC](\d+)")


class DatasetLayoutError(FileNotFoundError):
    """The data root does not hold the expected folder layout (message names what is expected)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: its path, person ID and 0-based camera ID (-1 = unknown)."""

    path: str
    pid: int
    camid: int


@dataclass
class ReIDDataset:
    """The three splits of a re-ID dataset.

    ``train`` pids are ``0..num_train_pids-1`` and camids ``0..num_train_cams-1``;
    ``num_train_cams == 0`` means the data has no camera IDs (the background branch of FA-Net,
    which classifies cameras, cannot be trained on it).
    """

    name: str
    root: Path
    train: list[Sample] = field(default_factory=list)
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    num_train_pids: int = 0
    num_train_cams: int = 0
    # Several sources combined (:func:`combine_sources`): how many of the train pids each source
    # holds, in order (its pids follow the previous sources'); empty for one source.
    pids_per_source: tuple[int, ...] = ()

    @property
    def num_cameras(self) -> int:
        """Number of camera classes for the background branch (0 = no camera IDs)."""
        return self.num_train_cams

    @property
    def has_cameras(self) -> bool:
        return self.num_train_cams > 0

    def summary(self) -> str:
        """A few lines of statistics, in the style of torchreid's dataset report."""
        lines = [f"dataset {self.name} at {self.root}"]
        for split, samples in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            pids = {s.pid for s in samples}
            cams = {s.camid for s in samples if s.camid != UNKNOWN_CAMERA}
            lines.append(f"  {split:<8}{len(pids):>6} ids{len(samples):>8} images{len(cams):>4} cameras")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Shared helpers


def relabel_train(
    samples: Sequence[Sample], keep_unknown_cameras: bool = False
) -> tuple[list[Sample], int, int]:
    """Map training pids to ``0..N-1`` and camids to ``0..C-1`` (both in sorted order).

    Returns the relabelled samples, N and C. By default C is 0 when any camid is unknown (-1): a
    single dataset either has cameras or not. With ``keep_unknown_cameras`` (several sources, some
    without cameras) the known camids are numbered and the unknown ones stay -1, which the camera
    loss skips.
    """
    pid_map = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    camids = {s.camid for s in samples}
    known = sorted(camids - {UNKNOWN_CAMERA})
    if UNKNOWN_CAMERA in camids and not keep_unknown_cameras:
        cam_map = {camid: UNKNOWN_CAMERA for camid in camids}
        num_cams = 0
    else:
        cam_map = {camid: label for label, camid in enumerate(known)}
        cam_map[UNKNOWN_CAMERA] = UNKNOWN_CAMERA
        num_cams = len(known)
    relabelled = [Sample(s.path, pid_map[s.pid], cam_map[s.camid]) for s in samples]
    return relabelled, len(pid_map), num_cams


def _first_layout(candidates: Iterable[Path], is_valid: Callable[[Path], bool]) -> Path | None:
    for candidate in candidates:
        if is_valid(candidate):
            return candidate
    return None


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {root} does not exist or is not a folder")


def _image_files(folder: Path) -> list[Path]:
    # Sorted so that every run (and every replica) sees the same sample order.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------
# Market-1501 and DukeMTMC-reID


_BBOX_SPLITS = ("bounding_box_train", "query", "bounding_box_test")


def _has_bbox_splits(folder: Path) -> bool:
    return all((folder / split).is_dir() for split in _BBOX_SPLITS)


def _read_bbox_folder(folder: Path, max_camera: int, dataset_label: str) -> list[Sample]:
    samples = []
    for path in sorted(folder.glob("*.jpg")):
        match = _OFFICIAL_NAME.match(path.name)
        if match is None:
            raise ValueError(
                f"{dataset_label}: file name {path.name!r} in {folder} does not follow the "
                f"official '<pid>_c<camera>...' pattern"
            )
        pid, camera = int(match.group(1)), int(match.group(2))
        if pid == -1:
            continue  # junk images are excluded from every split (standard protocol)
        if pid < 0 or not 1 <= camera <= max_camera:
            raise ValueError(
                f"{dataset_label}: {path.name!r} has pid {pid} / camera {camera}; expected pid >= -1 "
                f"and camera 1..{max_camera}"
            )
        samples.append(Sample(str(path), pid, camera - 1))
    return samples


def _read_bbox_dataset(name: str, data_dir: Path, max_camera: int, dataset_label: str) -> ReIDDataset:
    train = _read_bbox_folder(data_dir / "bounding_box_train", max_camera, dataset_label)
    query = _read_bbox_folder(data_dir / "query", max_camera, dataset_label)
    gallery = _read_bbox_folder(data_dir / "bounding_box_test", max_camera, dataset_label)
    for split, samples in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        if not samples:
            raise DatasetLayoutError(f"{dataset_label}: no .jpg images in {data_dir / split}")
    train, num_pids, num_cams = relabel_train(train)
    return ReIDDataset(name, data_dir, train, query, gallery, num_pids, num_cams)


def _read_bbox_release(
    root: str | Path, name: DatasetName, label: str, official: str, alias: str, num_cameras: int
) -> ReIDDataset:
    """A release in the bounding_box_train/query/bounding_box_test layout, found at
    ``root/official``, ``root/alias/official``, ``root/alias`` or ``root`` itself."""
    root = Path(root).expanduser()
    _require_root(root)
    candidates = [root / official, root / alias / official, root / alias, root]
    data_dir = _first_layout(candidates, _has_bbox_splits)
    if data_dir is None:
        raise DatasetLayoutError(
            f"{label} not found under {root}: expected folders {', '.join(_BBOX_SPLITS)} in "
            f"{root / official} (or {root / alias / official}, or {root} itself)"
        )
    return _read_bbox_dataset(name.value, data_dir, num_cameras, label)


def read_market1501(root: str | Path) -> ReIDDataset:
    """Market-1501 (Zheng et al., ICCV 2015): 751 train ids, 6 cameras."""
    return _read_bbox_release(
        root, DatasetName.MARKET1501, "Market-1501", "Market-1501-v15.09.15", "market1501", 6
    )


def read_dukemtmc(root: str | Path) -> ReIDDataset:
    """DukeMTMC-reID (Zheng et al., ICCV 2017): 702 train ids, 8 cameras."""
    return _read_bbox_release(root, DatasetName.DUKEMTMC, "DukeMTMC-reID", "DukeMTMC-reID", "dukemtmc-reid", 8)


# --------------------------------------------------------------------------------------------
# MSMT17

# Version folder -> (train image folder, test image folder), as in the official releases.
MSMT17_VERSIONS: dict[str, tuple[str, str]] = {
    "MSMT17_V1": ("train", "test"),
    "MSMT17_V2": ("mask_train_v2", "mask_test_v2"),
}
_MSMT17_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def _is_msmt17_version(folder: Path) -> bool:
    version = MSMT17_VERSIONS.get(folder.name)
    return (
        version is not None
        and all((folder / sub).is_dir() for sub in version)
        and all((folder / name).is_file() for name in _MSMT17_LISTS)
    )


def _read_msmt17_list(list_path: Path, image_dir: Path) -> list[Sample]:
    samples = []
    for line_number, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            relative_path, pid_text = fields
            pid = int(pid_text)
            # "0000_000_01_0303morning_0015_0.jpg": pid, index, camera (1-based), date+time, ...
            camid = int(Path(relative_path).name.split("_")[2]) - 1
        except (ValueError, IndexError):
            raise ValueError(
                f"MSMT17: {list_path.name} line {line_number} is {line.strip()!r}; expected "
                f"'<pid>/<pid>_<idx>_<camera>_<time>_<frame>_<n>.jpg <pid>'"
            ) from None
        samples.append(Sample(str(image_dir / relative_path), pid, camid))
    if samples and not Path(samples[0].path).is_file():
        raise DatasetLayoutError(
            f"MSMT17: {list_path.name} lists {samples[0].path}, which does not exist "
            f"(list files and image folder {image_dir} do not match)"
        )
    return samples


def read_msmt17(root: str | Path, include_val: bool = False) -> ReIDDataset:
    """MSMT17 (Wei et al., CVPR 2018), V1 or V2, whichever is present (V1 first).

    ``include_val`` adds ``list_val.txt`` to the training set. The default (False) trains on
    ``list_train.txt`` only: 30,248 images of 1,041 ids, the split the paper describes and what
    torchreid and fast-reid use unless ``combineall`` is set.
    """
    root = Path(root).expanduser()
    _require_root(root)
    candidates = [base / version for base in (root, root / "msmt17") for version in MSMT17_VERSIONS]
    candidates.append(root)  # root itself may be MSMT17_V1 or MSMT17_V2
    data_dir = _first_layout(candidates, _is_msmt17_version)
    if data_dir is None:
        raise DatasetLayoutError(
            f"MSMT17 not found under {root}: expected {root / 'MSMT17_V1'} with train/, test/ or "
            f"{root / 'MSMT17_V2'} with mask_train_v2/, mask_test_v2/, each holding "
            f"{', '.join(_MSMT17_LISTS)}"
        )
    train_dir_name, test_dir_name = MSMT17_VERSIONS[data_dir.name]
    train_dir, test_dir = data_dir / train_dir_name, data_dir / test_dir_name
    train = _read_msmt17_list(data_dir / "list_train.txt", train_dir)
    if include_val:
        train += _read_msmt17_list(data_dir / "list_val.txt", train_dir)
    query = _read_msmt17_list(data_dir / "list_query.txt", test_dir)
    gallery = _read_msmt17_list(data_dir / "list_gallery.txt", test_dir)
    for list_name, samples in (("list_train.txt", train), ("list_query.txt", query), ("list_gallery.txt", gallery)):
        if not samples:
            raise DatasetLayoutError(f"MSMT17: {data_dir / list_name} lists no images")
    train, num_pids, num_cams = relabel_train(train)
    return ReIDDataset(DatasetName.MSMT17.value, data_dir, train, query, gallery, num_pids, num_cams)


# --------------------------------------------------------------------------------------------
# CUHK03 (labeled), CSV-indexed JPEGs

CUHK03_FOLDER = "cuhk03_labeled_64x128"
_CUHK03_FILES = ("labels.csv", "split_np.json", "images")
_CUHK03_COLUMNS = ("file", "pid", "camid", "shot", "cam_pair_probable")
CUHK03_CAMERA_PAIRS = 5


def _is_cuhk03_folder(folder: Path) -> bool:
    return all((folder / name).exists() for name in _CUHK03_FILES)


def cuhk03_camera(camid: int, camera_pair: int) -> int:
    """CUHK03's 10 cameras numbered 0-9: pair p (1-5) holds cameras 2p-2 (camid 0) and 2p-1."""
    if camid not in (0, 1) or not 1 <= camera_pair <= CUHK03_CAMERA_PAIRS:
        raise ValueError(f"camid {camid} / camera pair {camera_pair}; expected 0-1 / 1-{CUHK03_CAMERA_PAIRS}")
    return camera_pair * 2 + camid - 2


def read_cuhk03(root: str | Path) -> ReIDDataset:
    """CUHK03 labeled: 1,467 ids over 5 camera pairs; the split of ``split_np.json``."""
    import csv  # noqa: PLC0415
    import json  # noqa: PLC0415

    root = Path(root).expanduser()
    _require_root(root)
    data_dir = _first_layout([root / CUHK03_FOLDER, root], _is_cuhk03_folder)
    if data_dir is None:
        raise DatasetLayoutError(
            f"CUHK03 not found under {root}: expected {', '.join(_CUHK03_FILES)} in "
            f"{root / CUHK03_FOLDER} (or in {root} itself)"
        )
    labels: dict[str, tuple[int, int]] = {}
    with open(data_dir / "labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not set(_CUHK03_COLUMNS) <= set(reader.fieldnames):
            raise DatasetLayoutError(
                f"CUHK03: {data_dir / 'labels.csv'} must have the columns {', '.join(_CUHK03_COLUMNS)}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                labels[row["file"]] = (int(row["pid"]), cuhk03_camera(int(row["camid"]), int(row["cam_pair_probable"])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"CUHK03: {data_dir / 'labels.csv'} line {line}: {exc}") from None
    try:
        split = json.loads((data_dir / "split_np.json").read_text())
        files = {name: list(split[name]) for name in ("train", "query", "gallery")}
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetLayoutError(
            f"CUHK03: {data_dir / 'split_np.json'} must map train, query and gallery to lists of files ({exc})"
        ) from None
    splits: dict[str, list[Sample]] = {}
    for name, names in files.items():
        unknown = [f for f in names if f not in labels]
        if unknown:
            raise ValueError(
                f"CUHK03: {len(unknown)} {name} file(s) of split_np.json are not in labels.csv, e.g. {unknown[0]}"
            )
        if not names:
            raise DatasetLayoutError(f"CUHK03: the {name} split of {data_dir / 'split_np.json'} is empty")
        splits[name] = [Sample(str(data_dir / f), *labels[f]) for f in names]
    train, num_pids, num_cams = relabel_train(splits["train"])
    return ReIDDataset(
        DatasetName.CUHK03.value, data_dir, train, splits["query"], splits["gallery"], num_pids, num_cams
    )


# --------------------------------------------------------------------------------------------
# Generic folders

_FOLDER_SPLITS = ("train", "query", "gallery")


def _scan_person_folders(split_dir: Path) -> list[tuple[str, Path]]:
    """(person folder name, image path) for every image under ``split_dir/<person_id>/``."""
    items = []
    for person_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        items.extend((person_dir.name, image) for image in _image_files(person_dir))
    if not items:
        raise DatasetLayoutError(f"folder dataset: no images in {split_dir}; expected {split_dir}/<person_id>/*.jpg")
    return items


def _camera_of(image: Path) -> int | None:
    match = _CAMERA_TOKEN.search(image.stem)
    return int(match.group(1)) if match else None


def read_folder(root: str | Path) -> ReIDDataset:
    """Custom data laid out as ``<root>/{train,query,gallery}/<person_id>/*.jpg``.

    Camera IDs are read from a ``c<N>`` token of each file name (``cam7_..`` does not count,
    ``..._c7_..`` and ``0002_c7s1_...`` do) and used only if every image has one; otherwise
    all camids are -1, ``num_train_cams`` is 0 and a warning says that the camera-ID
    (background) branch cannot be trained. Query/gallery pids are the folder names when all of
    them are integers, else the sorted folder names numbered 0..M-1 (shared by both splits).
    """
    root = Path(root).expanduser()
    _require_root(root)
    missing = [split for split in _FOLDER_SPLITS if not (root / split).is_dir()]
    if missing:
        raise DatasetLayoutError(
            f"folder dataset: {root} lacks {', '.join(missing)}/; expected "
            f"{root}/train/<person_id>/*.jpg, {root}/query/<person_id>/*.jpg and "
            f"{root}/gallery/<person_id>/*.jpg"
        )
    splits = {split: _scan_person_folders(root / split) for split in _FOLDER_SPLITS}
    cameras = {image: _camera_of(image) for items in splits.values() for _, image in items}
    without_camera = sum(camera is None for camera in cameras.values())
    if without_camera:
        logger.warning(
            "folder dataset %s: %d of %d images have no c<N> camera token in their file name, so "
            "camera IDs are disabled (num_train_cams=0) and the background (camera-ID) branch "
            "cannot be trained on this data",
            root,
            without_camera,
            len(cameras),
        )

    def camid(image: Path) -> int:
        camera = cameras[image]
        return UNKNOWN_CAMERA if without_camera or camera is None else camera

    train_names = sorted({name for name, _ in splits["train"]})
    train_pid = {name: index for index, name in enumerate(train_names)}
    train = [Sample(str(image), train_pid[name], camid(image)) for name, image in splits["train"]]

    test_names = sorted({name for split in ("query", "gallery") for name, _ in splits[split]})
    if all(re.fullmatch(r"-?\d+", name) for name in test_names):
        test_pid = {name: int(name) for name in test_names}
    else:
        test_pid = {name: index for index, name in enumerate(test_names)}
    query, gallery = (
        [Sample(str(image), test_pid[name], camid(image)) for name, image in splits[split]]
        for split in ("query", "gallery")
    )
    train, num_pids, num_cams = relabel_train(train)
    if num_cams == 1:
        logger.warning(
            "folder dataset %s: all training images come from one camera, so the background "
            "(camera-ID) branch has a single class and learns nothing",
            root,
        )
    return ReIDDataset(DatasetName.FOLDER.value, root, train, query, gallery, num_pids, num_cams)


# --------------------------------------------------------------------------------------------
# Entry point

_READERS: dict[DatasetName, Callable[..., ReIDDataset]] = {
    DatasetName.MARKET1501: read_market1501,
    DatasetName.DUKEMTMC: read_dukemtmc,
    DatasetName.MSMT17: read_msmt17,
    DatasetName.CUHK03: read_cuhk03,
    DatasetName.FOLDER: read_folder,
}


def _read_peta(root: str | Path) -> ReIDDataset:
    from fanet.data.peta import read_peta_train  # noqa: PLC0415 (peta imports this module)

    return read_peta_train(root)


_READERS[DatasetName.PETA] = _read_peta


def build_dataset(name: DatasetName | str, root: str | Path, **options: object) -> ReIDDataset:
    """Read dataset ``name`` from ``root`` (see the module docstring for the layouts).

    ``options`` go to the reader (only ``include_val`` for MSMT17 exists).
    """
    try:
        dataset_name = DatasetName(name)
    except ValueError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(d.value for d in DatasetName)}") from None
    dataset = _READERS[dataset_name](root, **options)
    logger.info("%s", dataset.summary())
    return dataset


def combine_sources(datasets: Sequence[ReIDDataset]) -> ReIDDataset:
    """Several training sets as one: identities and cameras kept apart per source (each source's
    labels are offset past the previous sources'), images without a camera stay -1. The query and
    gallery are the first source's, so training evaluates on it."""
    if not datasets:
        raise ValueError("combine_sources needs at least one dataset")
    if len(datasets) == 1:
        return datasets[0]
    train: list[Sample] = []
    pid_offset = cam_offset = 0
    for dataset in datasets:
        train.extend(
            Sample(
                s.path,
                s.pid + pid_offset,
                UNKNOWN_CAMERA if s.camid == UNKNOWN_CAMERA or not dataset.has_cameras else s.camid + cam_offset,
            )
            for s in dataset.train
        )
        pid_offset += dataset.num_train_pids
        cam_offset += dataset.num_train_cams
    first = datasets[0]
    name = "+".join(d.name for d in datasets)
    pids_per_source = tuple(d.num_train_pids for d in datasets)
    return ReIDDataset(name, first.root, train, first.query, first.gallery, pid_offset, cam_offset, pids_per_source)
