"""The PETA re-ID subsets and the domain-generalisation (DG) protocol laid out on them.

PETA (Deng et al., ACM MM 2014) gathers crops of ten older person datasets; eight keep their
person ids. The folder ``peta_reid/`` (or ``<root>/peta_reid/``) holds ``images/<subset>/...``,
``labels.csv`` (``file,subset,pid,camid,...``; pids prefixed by their subset, ``camid`` -1 where
the subset records no camera) and ``dg_splits.json``, the fixed DG test protocol: ten splits of
VIPeR, PRID, GRID and i-LIDS into query and gallery. Those four subsets are **test only**; a model
whose DG figures are reported trains on the other four (:data:`PETA_TRAIN_SUBSETS`) at most.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from fanet.data.datasets import (
    UNKNOWN_CAMERA,
    DatasetLayoutError,
    ReIDDataset,
    Sample,
    _first_layout,
    _require_root,
    relabel_train,
)

PETA_FOLDER = "peta_reid"
PETA_LABELS = "labels.csv"
DG_SPLITS = "dg_splits.json"
_PETA_COLUMNS = ("file", "subset", "pid", "camid")
# The DG protocol's test sets, in the order the reports print them; never trained on.
DG_TEST_SUBSETS: tuple[str, ...] = ("VIPeR", "PRID", "GRID", "i-LID")
# What a DG run may train on from PETA: every subset with ids that is not a test set.
PETA_TRAIN_SUBSETS: tuple[str, ...] = ("CAVIAR4REID", "3DPeS", "SARC3D", "TownCentre")


@dataclass(frozen=True, slots=True)
class PetaImage:
    """One row of ``labels.csv``: absolute path, subset, subset-prefixed pid and camid (-1 = unknown)."""

    path: str
    subset: str
    pid: str
    camid: int


def _is_peta_folder(folder: Path) -> bool:
    return (folder / PETA_LABELS).is_file() and (folder / "images").is_dir()


def find_peta_folder(root: str | Path) -> Path:
    """``root/peta_reid`` or ``root`` itself, whichever holds ``labels.csv`` and ``images/``."""
    root = Path(root).expanduser()
    _require_root(root)
    folder = _first_layout([root / PETA_FOLDER, root], _is_peta_folder)
    if folder is None:
        raise DatasetLayoutError(
            f"PETA re-ID sets not found under {root}: expected {PETA_LABELS} and images/ in "
            f"{root / PETA_FOLDER} (or in {root} itself)"
        )
    return folder


def read_peta_labels(root: str | Path) -> dict[str, PetaImage]:
    """``labels.csv`` keyed by its ``file`` column (relative to the PETA folder)."""
    folder = find_peta_folder(root)
    images: dict[str, PetaImage] = {}
    with open(folder / PETA_LABELS, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not set(_PETA_COLUMNS) <= set(reader.fieldnames):
            raise DatasetLayoutError(f"PETA: {folder / PETA_LABELS} must have the columns {', '.join(_PETA_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                camid = int(row["camid"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"PETA: {folder / PETA_LABELS} line {line}: camid {row['camid']!r} is not an integer"
                ) from None
            images[row["file"]] = PetaImage(str(folder / row["file"]), row["subset"], row["pid"], camid)
    return images


def read_dg_splits(root: str | Path) -> list[dict[str, dict[str, list[str]]]]:
    """The splits of ``dg_splits.json``: per split, per test subset, ``query`` and ``gallery`` files."""
    path = find_peta_folder(root) / DG_SPLITS
    try:
        splits = json.loads(path.read_text())["splits"]
        for split in splits:
            for subset in DG_TEST_SUBSETS:
                split[subset]["query"], split[subset]["gallery"]  # noqa: B018 (a shape check)
    except FileNotFoundError:
        raise DatasetLayoutError(f"PETA: {path} is missing (the DG test protocol)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetLayoutError(
            f"PETA: {path} must hold 'splits', each mapping {', '.join(DG_TEST_SUBSETS)} to query and "
            f"gallery lists ({exc})"
        ) from None
    return splits


def read_peta_train(root: str | Path, subsets: tuple[str, ...] = PETA_TRAIN_SUBSETS) -> ReIDDataset:
    """The PETA subsets that are not DG test sets, as one training set (no query/gallery).

    Pids stay apart per subset (they are subset-prefixed). Camera ids are kept per subset
    (``CAVIAR4REID`` cameras 0/1 and ``TownCentre`` camera 0 become three classes); images of a
    subset without cameras (3DPeS, SARC3D) get camid -1, which the camera loss skips.
    """
    forbidden = sorted(set(subsets) & set(DG_TEST_SUBSETS))
    if forbidden:
        raise ValueError(f"PETA: {', '.join(forbidden)} are DG test sets and cannot be trained on")
    images = [image for image in read_peta_labels(root).values() if image.subset in subsets]
    missing = sorted(set(subsets) - {image.subset for image in images})
    if missing:
        raise DatasetLayoutError(f"PETA: labels.csv has no images of {', '.join(missing)}")
    pid_of = {pid: index for index, pid in enumerate(sorted({image.pid for image in images}))}
    camera_of = {
        key: index
        for index, key in enumerate(sorted({(i.subset, i.camid) for i in images if i.camid != UNKNOWN_CAMERA}))
    }
    train = [
        Sample(
            image.path,
            pid_of[image.pid],
            UNKNOWN_CAMERA if image.camid == UNKNOWN_CAMERA else camera_of[(image.subset, image.camid)],
        )
        for image in images
    ]
    train, num_pids, num_cams = relabel_train(train, keep_unknown_cameras=True)
    return ReIDDataset("peta", find_peta_folder(root), train, [], [], num_pids, num_cams)
