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
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Fewest tracks a mean is taken over (module docstring): a camera with fewer uses the site's mean,
#: a site with fewer is not centred at all.
MIN_CENTRING_TRACKS = 50
#: Key of the site's mean (all crops) in :attr:`CameraCentring.means`.
SITE = "*"


class TooFewTracks(ValueError):
    """The site holds fewer than :data:`MIN_CENTRING_TRACKS` tracks."""


@dataclass(frozen=True)
class CameraCentring:
    """Mean features per camera id (strings) and of the whole site (:data:`SITE`)."""

    means: Mapping[str, np.ndarray]

    @classmethod
    def fit(
        cls, features: np.ndarray, cameras: Sequence[str | None], tracks: Sequence[Hashable] | None = None
    ) -> CameraCentring:
        """The means of l2-normalised ``features`` (N, D) over tracks (``tracks[i]``: crop i's track
        within its camera; None: every crop its own track): of the whole site, and of each camera
        with at least :data:`MIN_CENTRING_TRACKS` tracks. Raises :class:`TooFewTracks` when the site
        holds fewer."""
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
        sums = np.zeros((len(order), features.shape[1]), dtype=np.float64)
        np.add.at(sums, owner, features)
        track_means = sums / np.bincount(owner, minlength=len(order))[:, None]
        track_camera = np.array([camera for camera, _ in order], dtype=object)
        if len(order) < MIN_CENTRING_TRACKS:
            raise TooFewTracks(
                f"camera centring needs at least {MIN_CENTRING_TRACKS} tracks and the site has {len(order)} "
                "(a mean over fewer people is their look, not the cameras')"
            )
        means = {SITE: track_means.mean(axis=0).astype(np.float32)}
        for camera in sorted(set(track_camera) - {SITE}):
            rows = track_camera == camera
            if rows.sum() >= MIN_CENTRING_TRACKS:
                means[camera] = track_means[rows].mean(axis=0).astype(np.float32)
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
