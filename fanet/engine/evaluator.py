"""Test-time evaluation: embed the query and gallery images with the foreground branch
(flip-averaged, Sec. IV-B), then rank by cosine distance (optionally k-reciprocal re-ranking).

Cross-dataset evaluation (Table III) trains on ``DataConfig.dataset`` and tests on
``DataConfig.test_dataset`` at ``DataConfig.test_root``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fanet.config import DataConfig, TrainConfig
from fanet.inference import embed_images

REPORTED_RANKS = (1, 5, 10, 20)


@dataclass
class ExtractedFeatures:
    features: Tensor  # (N, D) float32, l2-normalised, on the CPU
    pids: np.ndarray
    camids: np.ndarray


@dataclass
class EvaluationResult:
    cmc: np.ndarray  # cmc[k] = rank-(k+1) accuracy
    mAP: float
    num_query: int
    num_gallery: int
    seconds: float

    def rank(self, k: int) -> float:
        """Rank-k accuracy. The CMC stops at the gallery size; beyond it every gallery image is
        within the top k, so the curve stays at its last value."""
        if k < 1 or len(self.cmc) == 0:
            return float("nan")
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def metrics(self) -> dict[str, float]:
        """``{"mAP": .., "R1": .., "R5": .., "R10": .., "R20": ..}`` as fractions in [0, 1]."""
        return {"mAP": float(self.mAP), **{f"R{k}": self.rank(k) for k in REPORTED_RANKS}}

    def summary(self) -> str:
        ranks = "  ".join(f"R{k} {self.rank(k):.1%}" for k in REPORTED_RANKS)
        return f"{ranks}  mAP {self.mAP:.1%}  ({self.num_query} queries, {self.num_gallery} gallery images)"


def extract_features(
    model: nn.Module, loader: Iterable[Any], *, flip: bool = True, batch_size: int | None = None
) -> ExtractedFeatures:
    """Features, pids and camids of every image of ``loader`` (batches as the data loaders
    yield them: dicts with ``image``, ``pid``, ``camid``)."""
    features, pids, camids = [], [], []
    for batch in loader:
        features.append(embed_images(model, batch["image"], flip=flip, batch_size=batch_size))
        pids.append(torch.as_tensor(batch["pid"]).numpy())
        camids.append(torch.as_tensor(batch["camid"]).numpy())
    if not features:
        raise ValueError("no images to embed (empty query or gallery split)")
    return ExtractedFeatures(torch.cat(features), np.concatenate(pids), np.concatenate(camids))


def evaluate_model(
    model: nn.Module,
    query_loader: Iterable[Any],
    gallery_loader: Iterable[Any],
    *,
    flip: bool = True,
    rerank: bool = False,
) -> EvaluationResult:
    """Single-query CMC and mAP of ``model`` (any module mapping 0-1 RGB images to features)."""
    from fanet.evaluation import evaluate_features  # noqa: PLC0415 (pulls in faiss)

    start = time.perf_counter()
    query = extract_features(model, query_loader, flip=flip)
    gallery = extract_features(model, gallery_loader, flip=flip)
    result = evaluate_features(
        query.features, gallery.features, query.pids, gallery.pids, query.camids, gallery.camids,
        rerank=rerank, max_rank=max(1, min(50, len(gallery.pids))),
    )
    return EvaluationResult(
        cmc=np.asarray(result.cmc),
        mAP=float(result.mAP),
        num_query=len(query.pids),
        num_gallery=len(gallery.pids),
        seconds=time.perf_counter() - start,
    )


def build_test_data(config: TrainConfig | DataConfig, train_dataset: Any | None = None) -> tuple[Any, Any]:
    """(query loader, gallery loader) of the test dataset: ``test_dataset``/``test_root`` when
    set (cross-dataset), else the training dataset's own test split."""
    from fanet.data import build_dataset, build_test_loaders  # noqa: PLC0415

    data = config.data if isinstance(config, TrainConfig) else config
    test_name = data.test_dataset or data.dataset
    test_root = data.test_root or data.root
    same = test_name == data.dataset and test_root == data.root
    dataset = train_dataset if same and train_dataset is not None else build_dataset(test_name, test_root)
    return build_test_loaders(dataset, data)


def evaluate_checkpoint_model(
    model: nn.Module,
    data: DataConfig,
    *,
    flip: bool = True,
    rerank: bool = False,
    device: torch.device | str = "cpu",
) -> EvaluationResult:
    """Evaluate an inference model on the test split described by ``data``."""
    model = model.to(device).eval()
    query_loader, gallery_loader = build_test_data(data)
    return evaluate_model(model, query_loader, gallery_loader, flip=flip, rerank=rerank)
