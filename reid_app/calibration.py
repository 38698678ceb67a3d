"""The default thresholds of a model: search (similarity of a hit), identities (cosine distance up
to which tracks merge) and watchlist alerts (similarity), and their re-calibration for an adapted
model.

The defaults in :class:`reid_app.config.AppConfig` and :mod:`reid_app.watchlist` are calibrated for
the shipped model (weights/README.md): each lets a known share of different-person pairs through.
A model adapted to a site (``reid-app adapt``: camera means and whitening, :mod:`fanet.centring`)
scores on another scale: on the DG sites its different-person pairs sit around 0 instead of 0.15,
so the shipped model's 0.25 would drop about half of its true matches and its identity threshold
would merge almost nothing. The adapted checkpoint therefore carries its own thresholds, set
without labels on the site's own tracks: for each default, the share of cross-camera track pairs
the *starting* model passes at it is measured, and the adapted model's threshold is the score that
passes the same share of the same pairs (quantile matching). Nearly all pairs of tracks from two
cameras are two different people, so this keeps each default's different-person pass rate; on the
four DG sites it kept or lowered that rate and kept or raised the same-person rate at every default
(benchmarks/RESULTS.md, issue 21). The strictest defaults pass a few in ten thousand pairs, so a
small site (few pairs) cannot place them finely: the threshold then lands near its highest pair's
score, on the strict side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from reid_app.config import AppConfig

#: Checkpoint-metadata key of a model's own thresholds.
THRESHOLDS_META_KEY = "thresholds"
#: Most tracks whose pairs are scored (a random subset beyond it: 2,000 tracks give ~2 M pairs).
MAX_CALIBRATION_TRACKS = 2000


@dataclass(frozen=True)
class Thresholds:
    search: float  # lowest cosine similarity of a search hit
    identity: float  # cosine distance (1 - similarity) up to which identities merge tracks
    watch: float  # lowest similarity of a watchlist alert

    @classmethod
    def defaults(cls) -> Thresholds:
        """The shipped model's calibrated defaults."""
        from reid_app.watchlist import DEFAULT_THRESHOLD  # noqa: PLC0415 (watchlist imports the pipeline)

        return cls(AppConfig.search_threshold, AppConfig.identity_threshold, DEFAULT_THRESHOLD)

    @classmethod
    def of_model(cls, meta: Mapping[str, Any] | None) -> Thresholds:
        """A checkpoint's own thresholds (metadata written by ``adapt``), else :meth:`defaults`."""
        stored = (meta or {}).get(THRESHOLDS_META_KEY)
        if not stored:
            return cls.defaults()
        return cls(float(stored["search"]), float(stored["identity"]), float(stored["watch"]))

    def to_meta(self, pairs: int) -> dict[str, float | int]:
        return {**{name: round(value, 4) for name, value in asdict(self).items()}, "pairs": pairs}


def calibrate(
    starting_features: np.ndarray, adapted_features: np.ndarray, cameras: Sequence[str], seed: int = 0
) -> tuple[Thresholds, int]:
    """The adapted model's thresholds (module docstring) from one feature per track of the site
    under each model (rows l2-normalised, in the same order) and each track's camera; and how many
    pairs they were set on. Pairs of tracks of two cameras; a site of one camera: every pair."""
    if len(starting_features) != len(adapted_features) or len(cameras) != len(starting_features):
        raise ValueError("calibration needs one starting feature, adapted feature and camera per track")
    rows = np.arange(len(cameras))
    if len(rows) > MAX_CALIBRATION_TRACKS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_CALIBRATION_TRACKS, replace=False))
    camera = np.array([str(cameras[i]) for i in rows], dtype=object)
    pairs = np.triu(np.ones((len(rows), len(rows)), dtype=bool), k=1)
    if len(set(camera)) > 1:
        pairs &= camera[:, None] != camera[None, :]
    if not pairs.any():
        raise ValueError("calibration needs at least two tracks")
    starting = (starting_features[rows] @ starting_features[rows].T)[pairs]
    adapted = (adapted_features[rows] @ adapted_features[rows].T)[pairs]
    defaults = Thresholds.defaults()

    def matched(similarity: float) -> float:
        share = float(np.mean(starting >= similarity))
        return float(np.quantile(adapted, 1.0 - share))

    thresholds = Thresholds(
        search=matched(defaults.search),
        identity=1.0 - matched(1.0 - defaults.identity),
        watch=matched(defaults.watch),
    )
    return thresholds, int(pairs.sum())


def database_thresholds(weights: str | None, info: Any, warn: Callable[[str], None] | None = None) -> Thresholds:
    """The default thresholds for a database's scores, for a command that loads no model: those of
    the checkpoint ``weights`` names (None: the shipped one) when it is the model the database was
    embedded with (``info``: its :class:`reid_app.store.DatabaseInfo`, same sha256), else
    :meth:`Thresholds.defaults` (and ``warn`` is told why, unless the database's model is untrained:
    then no threshold means anything)."""
    from fanet.checkpoint import CheckpointError, read_checkpoint  # noqa: PLC0415
    from fanet.weights import sha256_file  # noqa: PLC0415
    from reid_app.embed import _resolve_checkpoint  # noqa: PLC0415
    from reid_app.errors import ReidAppError  # noqa: PLC0415

    if weights is not None and weights.strip().lower() == "untrained":
        return Thresholds.defaults()
    try:
        path = _resolve_checkpoint(weights)
        if info.model_weights_sha256 is not None and sha256_file(path) == info.model_weights_sha256:
            return Thresholds.of_model(read_checkpoint(path).get("meta"))
        why = f"{path.name} is not the model this database was embedded with"
    except (CheckpointError, FileNotFoundError, ReidAppError, OSError) as exc:
        why = str(exc).splitlines()[0]
    if warn is not None and info.model_is_trained:
        warn(f"default threshold: the shipped model's ({why}; --weights FILE names the database's model)")
    return Thresholds.defaults()
