"""Domain-generalisation (DG) evaluation: a model tested on four small re-ID sets it never trained on.

The protocol (as in the DG re-ID literature: DIMN, DualNorm, SNR, MetaBIN) is laid out on the PETA
re-ID subsets by ``peta_reid/dg_splits.json`` (see :mod:`fanet.data.peta` and the folder's
PROVENANCE.md): ten fixed random splits (seed 20141) of VIPeR, PRID, GRID and i-LIDS into query and
gallery images. This module evaluates it exactly so:

* for each split and each of the four sets, the query and gallery images are embedded, ranked by
  cosine distance, and scored by single-query CMC rank-1 and mAP
  (:func:`fanet.evaluation.rank.evaluate_features`, no re-ranking);
* **no camera filtering at all**: every gallery image is kept whatever its camera (GRID keeps
  same-camera gallery images; i-LIDS records no camera). Every query is given camera 0 and every
  gallery image camera 1, so the Market-1501 rule "drop same person AND same camera" removes
  nothing. Query and gallery never share a file, so no query can match itself;
* per set, the figure is the mean over the splits of R1 and of mAP; the **DG mean** is the mean of
  the four sets' figures;
* every unique image is embedded once per model (features are cached by file across splits);
* images are resized straight to the model's input size (PIL bilinear, no padding or crop:
  :func:`fanet.data.transforms.resize_rgb`, the evaluator's own resize).

The model is any callable mapping a list of absolute image paths to (N, D) features
(:data:`PathEmbedder`), so FA-Net (:func:`fanet_embedder`) and external peers are scored by the
same code. The four sets are test only: a model whose DG figures are reported must not have
trained on any of their images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fanet.data.peta import DG_TEST_SUBSETS, PetaImage, read_dg_splits, read_peta_labels
from fanet.data.transforms import resize_rgb
from fanet.evaluation.rank import evaluate_features
from fanet.inference import embed_images

#: Maps absolute image paths to their (N, D) features, one row per path, in order.
PathEmbedder = Callable[[list[str]], np.ndarray]
#: One split of ``dg_splits.json``: set name -> {"query": [files], "gallery": [files]}, files
#: relative to the PETA folder.
DGSplit = Mapping[str, Mapping[str, Sequence[str]]]

#: Paths handed to the embedder at once: bounds the decoded images held in memory (256 images of
#: 256x128 are 100 MB as float32) whatever the number of unique images.
EMBED_CHUNK = 256
#: The camera ids every query and every gallery image are given: different, so nothing is filtered.
QUERY_CAMERA, GALLERY_CAMERA = 0, 1


@dataclass(frozen=True)
class DGSetResult:
    """One test set: the mean over splits of rank-1 and mAP (fractions), and each split's value."""

    name: str
    rank1: float
    mAP: float
    split_rank1: tuple[float, ...]
    split_mAP: tuple[float, ...]
    num_query: int  # of the first split (every split of a set has the same sizes in dg_splits.json)
    num_gallery: int

    def as_dict(self) -> dict[str, object]:
        return {
            "rank1": self.rank1,
            "mAP": self.mAP,
            "split_rank1": list(self.split_rank1),
            "split_mAP": list(self.split_mAP),
            "num_query": self.num_query,
            "num_gallery": self.num_gallery,
        }


@dataclass(frozen=True)
class DGResult:
    """The four sets' results (in :data:`DG_TEST_SUBSETS` order) and their mean (the DG mean)."""

    sets: tuple[DGSetResult, ...]
    num_splits: int
    num_images: int  # unique images embedded
    embed_seconds: float
    seconds: float
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def mean_rank1(self) -> float:
        return float(np.mean([s.rank1 for s in self.sets]))

    @property
    def mean_mAP(self) -> float:
        return float(np.mean([s.mAP for s in self.sets]))

    def set(self, name: str) -> DGSetResult:
        for result in self.sets:
            if result.name == name:
                return result
        raise KeyError(name)

    @staticmethod
    def table_header(names: Sequence[str] = DG_TEST_SUBSETS) -> str:
        """The markdown header (two lines) matching :meth:`table_row`."""
        columns = ["model", *(f"{n} R1 / mAP" for n in names), "DG mean R1 / mAP"]
        return "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|"

    def table_row(self, model: str) -> str:
        """One markdown row: per set R1 / mAP in %, then the DG mean."""
        cells = [f"{s.rank1:.1%} / {s.mAP:.1%}".replace("%", "") for s in self.sets]
        mean = f"**{self.mean_rank1:.1%} / {self.mean_mAP:.1%}**".replace("%", "")
        return "| " + " | ".join([model, *cells, mean]) + " |"

    def as_dict(self) -> dict[str, object]:
        return {
            "protocol": "dg (PETA dg_splits.json; cosine, single-query, no camera filtering)",
            "num_splits": self.num_splits,
            "num_images": self.num_images,
            "sets": {s.name: s.as_dict() for s in self.sets},
            "mean_rank1": self.mean_rank1,
            "mean_mAP": self.mean_mAP,
            "embed_seconds": self.embed_seconds,
            "seconds": self.seconds,
            **self.extra,
        }


def _check_splits(
    splits: Sequence[DGSplit], labels: Mapping[str, PetaImage], sets: Sequence[str] = DG_TEST_SUBSETS
) -> None:
    if not splits:
        raise ValueError("the DG protocol needs at least one split")
    for number, split in enumerate(splits):
        for name in sets:
            if name not in split:
                raise ValueError(f"DG split {number} has no {name} set")
            query, gallery = split[name]["query"], split[name]["gallery"]
            if not query or not gallery:
                raise ValueError(f"DG split {number}, {name}: the query and the gallery must not be empty")
            unknown = next((f for f in (*query, *gallery) if f not in labels), None)
            if unknown is not None:
                raise ValueError(f"DG split {number}, {name}: {unknown} is not in labels.csv")
            if set(query) & set(gallery):
                # A query found in its own gallery would be a free rank-1 match.
                raise ValueError(f"DG split {number}, {name}: query and gallery share images")
            gallery_pids = {labels[f].pid for f in gallery}
            lonely = next((f for f in query if labels[f].pid not in gallery_pids), None)
            if lonely is not None:
                # The ranking would skip such a query silently and report figures over fewer queries.
                raise ValueError(f"DG split {number}, {name}: query {lonely} has no image of its person in the gallery")


def embed_files(embed: PathEmbedder, paths: Sequence[str], chunk: int = EMBED_CHUNK) -> np.ndarray:
    """``embed`` over ``paths``, ``chunk`` paths at a time, as one float32 (N, D) array."""
    parts = []
    for start in range(0, len(paths), chunk):
        batch = list(paths[start : start + chunk])
        features = np.asarray(embed(batch), dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(batch):
            raise ValueError(f"the embedder returned shape {features.shape} for {len(batch)} images; expected (N, D)")
        if not np.isfinite(features).all():
            raise ValueError(f"the embedder returned non-finite features (e.g. for {batch[0]})")
        parts.append(features)
    return np.concatenate(parts)


def evaluate_dg(
    embed: PathEmbedder,
    peta_root: str | Path,
    splits: Sequence[DGSplit] | None = None,
    *,
    chunk: int = EMBED_CHUNK,
    sets: Sequence[str] = DG_TEST_SUBSETS,
) -> DGResult:
    """The DG protocol of this module's docstring for the model behind ``embed``.

    ``peta_root`` is the ``peta_reid`` folder or the folder holding it. ``splits`` defaults to
    the ten of ``dg_splits.json``; a subset of them (or of their files, for a quick check) may be
    passed instead, but then the figures are not the protocol's. ``sets`` scores only those sets
    (their mean is then not the DG mean: site adaptation scores one set at a time).
    """
    start = time.perf_counter()
    labels = read_peta_labels(peta_root)
    splits = read_dg_splits(peta_root) if splits is None else splits
    unknown = [name for name in sets if name not in DG_TEST_SUBSETS]
    if not sets or unknown:
        raise ValueError(f"DG sets are among {', '.join(DG_TEST_SUBSETS)}; got {', '.join(sets) or 'none'}")
    _check_splits(splits, labels, sets)

    # Each unique file once, in first-seen order, so every model sees the same order.
    files = list(
        dict.fromkeys(f for split in splits for name in sets for key in ("query", "gallery")
                      for f in split[name][key])
    )
    embed_start = time.perf_counter()
    features = embed_files(embed, [labels[f].path for f in files], chunk)
    embed_seconds = time.perf_counter() - embed_start
    row_of = {f: i for i, f in enumerate(files)}

    results = []
    for name in sets:
        rank1, mean_ap = [], []
        for split in splits:
            query, gallery = list(split[name]["query"]), list(split[name]["gallery"])
            metrics = evaluate_features(
                features[[row_of[f] for f in query]],
                features[[row_of[f] for f in gallery]],
                np.array([labels[f].pid for f in query]),
                np.array([labels[f].pid for f in gallery]),
                np.full(len(query), QUERY_CAMERA),
                np.full(len(gallery), GALLERY_CAMERA),
                max_rank=1,
            )
            rank1.append(metrics.rank1)
            mean_ap.append(metrics.mAP)
        first = splits[0][name]
        results.append(
            DGSetResult(
                name,
                float(np.mean(rank1)),
                float(np.mean(mean_ap)),
                tuple(float(v) for v in rank1),
                tuple(float(v) for v in mean_ap),
                len(first["query"]),
                len(first["gallery"]),
            )
        )
    return DGResult(tuple(results), len(splits), len(files), embed_seconds, time.perf_counter() - start)


def load_images(paths: Sequence[str], height: int, width: int) -> torch.Tensor:
    """0-1 RGB (N, 3, height, width) float tensor of the images at ``paths``, read as the trainer's
    evaluator reads them (PIL, :func:`fanet.data.transforms.resize_rgb`)."""
    batch = torch.empty((len(paths), 3, height, width), dtype=torch.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                batch[i] = resize_rgb(image, height, width)
        except OSError as error:
            # ValueError: the one-line kind of error the CLI reports (a corrupt file is not a machine failure).
            raise ValueError(f"cannot read image {path}: {error}") from None
    return batch


def fanet_embedder(
    model: nn.Module,
    height: int,
    width: int,
    *,
    flip: bool = True,
    batch_size: int | None = None,
) -> PathEmbedder:
    """A :data:`PathEmbedder` of an FA-Net (or any module mapping 0-1 RGB images to features):
    images loaded by :func:`load_images`, embedded by :func:`fanet.inference.embed_images`
    (flip-averaged by default, as FA-Net is evaluated: Sec. IV-B), l2-normalised."""

    def embed(paths: list[str]) -> np.ndarray:
        images = load_images(paths, height, width)
        return embed_images(model, images, flip=flip, batch_size=batch_size).numpy()

    return embed

