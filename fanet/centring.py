"""Camera-aware centring: each camera's mean feature, learnt from a site's unlabelled crops, taken
from the features of that camera before they are compared.

Every camera adds something to everyone it sees (its light, its white balance, its angle), and a
re-ID feature keeps part of it, so two people under one camera can look closer than one person
under two. Subtracting each camera's mean feature and l2-normalising again removes that shared
part; no identity label is needed, only which camera each crop came from. It is the feature-level
form of camera-based normalisation (Zhuang et al., "Rethinking the Distribution Gap of Person
Re-identification with Camera-based Batch Normalization", ECCV 2020), which re-estimates
normalisation statistics per camera inside the network; here the statistics are taken once, on the
final features, so any runtime (PyTorch, ONNX Runtime, OpenVINO) embeds as before and the centring
is applied after it.

Measured on the four DG sets as sites (benchmarks/RESULTS.md, issue 21): +2.9 rank-1 on the shipped
model with no training, every set better. A crop of a camera the site statistics do not know (or do
not hold enough crops of), and a query photo of unknown camera, is centred by the site's mean over
all crops, which keeps most of the gain (+1.8 rank-1 for queries there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Fewest crops a camera needs for a mean of its own; a camera with fewer uses the site's mean.
MIN_CAMERA_CROPS = 20
#: Key of the site's mean (all crops) in :attr:`CameraCentring.means`.
SITE = "*"


@dataclass(frozen=True)
class CameraCentring:
    """Mean features per camera id (strings) and of the whole site (:data:`SITE`)."""

    means: Mapping[str, np.ndarray]

    @classmethod
    def fit(cls, features: np.ndarray, cameras: Sequence[str | None]) -> CameraCentring:
        """The means of l2-normalised ``features`` (N, D), per camera with at least
        :data:`MIN_CAMERA_CROPS` crops, and of all crops."""
        if len(features) == 0 or len(features) != len(cameras):
            raise ValueError(f"centring needs one camera per feature, got {len(features)} features, {len(cameras)}")
        features = np.asarray(features, dtype=np.float32)
        means = {SITE: features.mean(axis=0)}
        labels = np.array([SITE if camera is None else str(camera) for camera in cameras], dtype=object)
        for camera in sorted({str(c) for c in cameras if c is not None}):
            rows = labels == camera
            if rows.sum() >= MIN_CAMERA_CROPS:
                means[camera] = features[rows].mean(axis=0)
        return cls(means)

    def apply(self, features: np.ndarray, cameras: Sequence[str | None] | None = None) -> np.ndarray:
        """``features`` (N, D) with their camera's mean (the site's when unknown) taken away, l2-normalised."""
        if len(features) == 0:
            return np.asarray(features, dtype=np.float32)
        site = self.means[SITE]
        if features.shape[1] != site.shape[0]:
            raise ValueError(f"centring means are {site.shape[0]}-d, the features {features.shape[1]}-d")
        cameras = [None] * len(features) if cameras is None else list(cameras)
        if len(cameras) != len(features):
            raise ValueError(f"{len(cameras)} cameras for {len(features)} features")
        offsets = np.stack([self.means.get(str(c), site) if c is not None else site for c in cameras])
        centred = np.asarray(features, dtype=np.float32) - offsets
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return (centred / np.maximum(norms, 1e-12)).astype(np.float32)

    @property
    def cameras(self) -> list[str]:
        """The cameras with a mean of their own."""
        return [camera for camera in self.means if camera != SITE]

    def to_meta(self) -> dict[str, Any]:
        """The checkpoint-metadata form (plain lists: a checkpoint stays loadable with weights_only)."""
        return {camera: [float(v) for v in mean] for camera, mean in self.means.items()}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> CameraCentring | None:
        """The centring stored by :meth:`to_meta` in a checkpoint's metadata, or None."""
        if not meta or SITE not in meta:
            return None
        return cls({str(camera): np.asarray(mean, dtype=np.float32) for camera, mean in meta.items()})
