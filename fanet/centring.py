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

Measured on the four DG sets as sites (benchmarks/RESULTS.md, issue 21): +2.7 rank-1 on the shipped
model with no training, every set better. A crop of a camera the site statistics do not know (or do
not hold enough tracks of), and a query photo of unknown camera, is centred by the site's mean,
which keeps most of the gain (+1.8 rank-1 for queries there).

A mean is taken over tracks (each track's mean crop counts once, so one long track does not weigh
more than a passer-by) and only over many of them: a mean of a few people is their own look, not the
camera's, and taking it away pulls those people apart. On the DG sets, means over 3 / 10 / 20 / 50
people per camera moved the mean rank-1 by -11.2 / -1.1 / +1.0 / +2.3 (GRID alone by -36.8 at 3), and
from 50 on every set gained; on the lab4cam footage (13 tracks) the old rule (20 crops) split every
person seen by several cameras apart. Hence :data:`MIN_CENTRING_TRACKS`, for a camera's own mean
and for the site's.

**Whitening** (the second moment, after the first): a camera also stretches the features of everyone
it sees along a few directions (its light varying over the day, its background behind every person),
and those directions then dominate the cosine between two of its people. After centring, each camera
with :data:`MIN_CENTRING_TRACKS` tracks gets its own shrinkage whitening, learnt from its centred
track means: along each principal direction of their covariance (variance v) a feature's component
is scaled by sqrt(r / (v + r)), with the ridge r a fixed fraction (:data:`WHITENING_RIDGE`) of the
camera's total variance, so the few strong camera-wide directions are flattened and the many weak ones
(where identities differ) are kept; the features are l2-normalised again. A camera with fewer tracks,
or a crop of unknown camera, uses the site's whitening. It is the feature-level, per-camera form of
PCA whitening learnt on unlabelled target data (Jégou & Chum, "Negative evidences and co-occurrences in
image retrieval", ECCV 2012), and of camera-specific second-order alignment (CORAL, Sun et al., AAAI
2016). On the DG sets as sites (RESULTS.md, issue 21) centring alone gave +2.7 rank-1 and centring with
the whitening +6.3, every set better; any ridge from 0.5 % to 2.6 % gave at least +5.3.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Fewest tracks a mean is taken over (module docstring): a camera with fewer uses the site's mean,
#: a site with fewer is not centred at all.
MIN_CENTRING_TRACKS = 50
#: A camera's whitening ridge, as a fraction of its centred track means' total variance (module docstring).
WHITENING_RIDGE = 0.01
#: Most principal directions a whitening keeps: past them the scale is within 1 % of 1 on the DG
#: sites, and 256 × 3840 float16 values are 2 MB a camera in the checkpoint.
WHITENING_COMPONENTS = 256
#: Checkpoint-metadata keys of the camera means and of the cameras' whitening.
CENTRING_META_KEY = "camera_centring"
WHITENING_META_KEY = "camera_whitening"
#: Key of the site's mean (all crops) in :attr:`CameraCentring.means`.
SITE = "*"


class TooFewTracks(ValueError):
    """The site holds fewer than :data:`MIN_CENTRING_TRACKS` tracks."""


@dataclass(frozen=True)
class Whitening:
    """Shrinkage whitening of one camera's centred features (module docstring): a feature's
    component along each row of ``basis`` (orthonormal principal directions, (k, D)) is multiplied
    by ``scale`` (k,); the rest of the space is kept as it is."""

    basis: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, track_means: np.ndarray) -> Whitening:
        """The whitening of ``track_means`` (T, D), one row per track of the camera."""
        centred = np.asarray(track_means, dtype=np.float64)
        centred = centred - centred.mean(axis=0)
        count, dim = centred.shape
        if count <= dim:  # the principal directions from the smaller of the two products
            _, singular, directions = np.linalg.svd(centred, full_matrices=False)
            variances = singular**2 / count
        else:
            variances, vectors = np.linalg.eigh(centred.T @ centred / count)
            order = np.argsort(variances)[::-1]
            variances, directions = np.clip(variances[order], 0.0, None), vectors[:, order].T
        ridge = WHITENING_RIDGE * variances.sum()
        if ridge <= 0:  # every track alike: nothing to flatten
            return cls(np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.float32))
        keep = slice(0, WHITENING_COMPONENTS)
        scale = np.sqrt(ridge / (variances[keep] + ridge))
        return cls(directions[keep].astype(np.float32), scale.astype(np.float32))

    def apply(self, features: np.ndarray) -> np.ndarray:
        """``features`` (N, D) whitened (not normalised)."""
        return features + ((features @ self.basis.T) * (self.scale - 1.0)) @ self.basis


@dataclass(frozen=True)
class CameraCentring:
    """Mean features per camera id (strings) and of the whole site (:data:`SITE`), and the
    :class:`Whitening` of the same cameras (empty: centring alone)."""

    means: Mapping[str, np.ndarray]
    whitening: Mapping[str, Whitening] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        cameras: Sequence[str | None],
        tracks: Sequence[Hashable] | None = None,
        whiten: bool = True,
    ) -> CameraCentring:
        """The means of l2-normalised ``features`` (N, D) over tracks (``tracks[i]``: crop i's track
        within its camera; None: every crop its own track): of the whole site, and of each camera
        with at least :data:`MIN_CENTRING_TRACKS` tracks; with ``whiten``, the whitening of the same
        cameras and of the site, from the centred features' track means. Raises
        :class:`TooFewTracks` when the site holds fewer."""
        if len(features) == 0 or len(features) != len(cameras):
            raise ValueError(f"centring needs one camera per feature, got {len(features)} features, {len(cameras)}")
        if tracks is not None and len(tracks) != len(features):
            raise ValueError(f"centring needs one track per feature, got {len(tracks)} for {len(features)}")
        features = np.asarray(features, dtype=np.float32)
        keys = [
            (SITE if camera is None else str(camera), index if tracks is None else tracks[index])
            for index, camera in enumerate(cameras)
        ]
        order = {key: row for row, key in enumerate(dict.fromkeys(keys))}
        owner = np.array([order[key] for key in keys])
        track_camera = np.array([camera for camera, _ in order], dtype=object)
        if len(order) < MIN_CENTRING_TRACKS:
            raise TooFewTracks(
                f"camera centring needs at least {MIN_CENTRING_TRACKS} tracks and the site has {len(order)} "
                "(a mean over fewer people is their look, not the cameras')"
            )
        track_means = _group_means(features, owner, len(order))
        means = {SITE: track_means.mean(axis=0).astype(np.float32)}
        for camera in sorted(set(track_camera) - {SITE}):
            rows = track_camera == camera
            if rows.sum() >= MIN_CENTRING_TRACKS:
                means[camera] = track_means[rows].mean(axis=0).astype(np.float32)
        centring = cls(means)
        if not whiten:
            return centring
        centred_means = _group_means(centring.apply(features, cameras), owner, len(order))
        whitening = {SITE: Whitening.fit(centred_means)}
        for camera in centring.cameras:
            whitening[camera] = Whitening.fit(centred_means[track_camera == camera])
        return cls(means, whitening)

    def apply(self, features: np.ndarray, cameras: Sequence[str | None] | None = None) -> np.ndarray:
        """``features`` (N, D) with their camera's mean (the site's when unknown) taken away, then
        whitened the same way when whitening is held, l2-normalised."""
        if len(features) == 0:
            return np.asarray(features, dtype=np.float32)
        site = self.means[SITE]
        if features.shape[1] != site.shape[0]:
            raise ValueError(f"centring means are {site.shape[0]}-d, the features {features.shape[1]}-d")
        cameras = [None] * len(features) if cameras is None else list(cameras)
        if len(cameras) != len(features):
            raise ValueError(f"{len(cameras)} cameras for {len(features)} features")
        keys = [str(c) if c is not None and str(c) in self.means else SITE for c in cameras]
        offsets = np.stack([self.means[key] for key in keys])
        centred = _normalised(np.asarray(features, dtype=np.float32) - offsets)
        if not self.whitening:
            return centred
        key_of = np.array(keys, dtype=object)
        for key in set(keys):
            rows = key_of == key
            centred[rows] = self.whitening[key].apply(centred[rows])
        return _normalised(centred)

    @property
    def cameras(self) -> list[str]:
        """The cameras with a mean of their own."""
        return [camera for camera in self.means if camera != SITE]

    def to_meta(self) -> dict[str, Any]:
        """The checkpoint-metadata form, under :data:`CENTRING_META_KEY` and :data:`WHITENING_META_KEY`:
        means as plain lists, whitening as tensors (float16 bases) — loadable with weights_only."""
        meta: dict[str, Any] = {
            CENTRING_META_KEY: {camera: [float(v) for v in mean] for camera, mean in self.means.items()}
        }
        if self.whitening:
            meta[WHITENING_META_KEY] = {
                camera: {"basis": torch.from_numpy(w.basis).half(), "scale": torch.from_numpy(w.scale)}
                for camera, w in self.whitening.items()
            }
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> CameraCentring | None:
        """The centring :meth:`to_meta` stored in a checkpoint's metadata ``meta``, or None."""
        means = (meta or {}).get(CENTRING_META_KEY)
        if not means or SITE not in means:
            return None
        stored = (meta or {}).get(WHITENING_META_KEY) or {}
        whitening = {
            str(camera): Whitening(
                torch.as_tensor(w["basis"]).float().numpy(), torch.as_tensor(w["scale"]).float().numpy()
            )
            for camera, w in stored.items()
        }
        return cls({str(camera): np.asarray(mean, dtype=np.float32) for camera, mean in means.items()}, whitening)


def _group_means(features: np.ndarray, owner: np.ndarray, count: int) -> np.ndarray:
    sums = np.zeros((count, features.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, features)
    return sums / np.bincount(owner, minlength=count)[:, None]


def _normalised(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)
