"""Unsupervised adaptation of a trained FA-Net to a site, from its unlabelled tracklets.

The method (each round is one epoch):

1. **Pseudo-identities from tracklets.** Every crop is embedded (flip-averaged, as searched), each
   tracklet becomes the mean of its crops, and two tracklets are linked when they are *mutual*
   nearest neighbours among the tracklets each may be (k-reciprocal with k = 1), the association
   step of tracklet-based unsupervised re-ID (Li, Zhu & Gong, "Unsupervised Tracklet Person
   Re-Identification", TPAMI 2019). Links are merged into identities largest-similarity first,
   never joining two tracklets that overlap in one camera
   (:meth:`fanet.data.tracklets.Tracklet.overlaps`): a cannot-link the tracker gives for free.
2. **Cluster contrast.** A memory holds one l2-normalised centroid per pseudo-identity; each crop of
   a P×K batch is pulled to its identity's centroid and pushed from every other by a softmax over
   centroid similarities at temperature ``temperature``; the centroids follow the batch features
   with ``momentum`` (Dai et al., "Cluster Contrast for Unsupervised Person Re-Identification",
   ACCV 2022).
3. **Anchored to the starting model.** The relational distillation term of the supervised trainer
   (:func:`fanet.losses.relational_distillation_loss`) with the *starting* model's features as the
   teacher keeps the batch's similarity structure close to the one the model began with, so a few
   wrong pseudo-labels cannot undo what it learnt on labelled data.

4. **Camera-aware centring and whitening** (:mod:`fanet.centring`, after the last epoch): each
   camera's mean feature over the site's crops, computed with the adapted model, is stored in the
   checkpoint and taken from every feature of that camera before it is compared, and the centred
   features are whitened by the camera's own shrinkage whitening. ``epochs=0`` (the default) runs
   this step alone (one embedding pass): on the DG "sites" it is the whole measured gain, every set
   better, while steps 1-3 were neutral (PRID) to harmful (i-LIDS, -1.5 R1) on the shipped model
   (RESULTS.md), so the fine-tuning epochs are opt-in.

CPU budget: the shared low-level module stays frozen (half the step, see
``SolverConfig.freeze_low_level``) and only the foreground branch, TEM and stripe embeddings learn
(Adam, lr ``lr``). State is saved after every epoch (``<output>.adapt-state.pt``); a run started
again with the same inputs resumes from it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image
from torch import Tensor

from fanet.centring import CameraCentring
from fanet.checkpoint import save_atomically
from fanet.data.datasets import Sample
from fanet.data.loaders import TrainLoader
from fanet.data.sampler import PKSampler
from fanet.data.tracklets import Tracklet
from fanet.data.transforms import ReIDImageDataset, ReIDTransform, resize_rgb
from fanet.inference import embed_images
from fanet.losses import relational_distillation_loss
from fanet.model import FANet

STATE_SUFFIX = ".adapt-state.pt"


@dataclass
class AdaptConfig:
    epochs: int = 0  # fine-tuning epochs before the centring; 0: the centring alone (see the docstring)
    lr: float = 3.5e-5
    weight_decay: float = 5e-4
    batch_p: int = 16  # pseudo-identities per batch
    batch_k: int = 4  # crops of each
    temperature: float = 0.05  # cluster-contrast softmax
    momentum: float = 0.2  # centroid update
    anchor_weight: float = 1.0  # relational distillation to the starting model
    anchor_temperature: float = 0.1
    pad: int = 4
    erase_prob: float = 0.3
    seed: int = 0
    camera_centring: bool = True  # step 4 of the module docstring
    camera_whitening: bool = True  # step 4's second moment (fanet.centring); needs camera_centring

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: camera centring only), got {self.epochs}")
        if self.epochs == 0 and not self.camera_centring:
            raise ValueError("0 epochs without camera centring would change nothing")
        if self.batch_p < 2 or self.batch_k < 1:
            raise ValueError(f"need P >= 2 and K >= 1, got P={self.batch_p}, K={self.batch_k}")


@dataclass
class AdaptEpoch:
    epoch: int
    identities: int  # pseudo-identities this epoch
    linked_tracklets: int  # tracklets in an identity of more than one tracklet
    loss: float
    contrast: float
    anchor: float
    seconds: float


Progress = Callable[[str, int, int], None]  # (stage, done, total)


def pseudo_identities(features: np.ndarray, tracklets: list[Tracklet]) -> np.ndarray:
    """An identity index per tracklet (step 1 of the module docstring); ``features`` are the
    tracklets' l2-normalised mean features, (T, D). Two tracklets are linked when each is the
    other's nearest among the tracklets it may be (k-reciprocal with k = 1)."""
    count = len(tracklets)
    similarity = features @ features.T
    # A tracklet's candidates are the tracklets it may be: not itself, not one seen at the same time
    # in its own camera (the tracker's cannot-link).
    blocked = np.array([[a is b or a.overlaps(b) for b in tracklets] for a in tracklets])
    candidate = np.where(blocked, -np.inf, similarity)
    nearest = candidate.argmax(axis=1)
    usable = np.isfinite(candidate[np.arange(count), nearest])
    links = sorted(
        {(min(i, int(j)), max(i, int(j))) for i, j in enumerate(nearest) if usable[i] and nearest[j] == i},
        key=lambda pair: -similarity[pair],
    )
    parent = list(range(count))
    members = {i: [i] for i in range(count)}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        a, b = root(i), root(j)
        if a == b or any(tracklets[x].overlaps(tracklets[y]) for x in members[a] for y in members[b]):
            continue
        parent[b] = a
        members[a] += members.pop(b)
    roots = {r: n for n, r in enumerate(sorted({root(i) for i in range(count)}))}
    return np.array([roots[root(i)] for i in range(count)], dtype=np.int64)


def _clean_images(paths: list[str], height: int, width: int) -> Tensor:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(resize_rgb(image, height, width))
    return torch.stack(images)


def embed_paths(model: FANet, paths: list[str], height: int, width: int, chunk: int = 256) -> Tensor:
    """Flip-averaged, l2-normalised features of image files (as the app searches them)."""
    return torch.cat(
        [embed_images(model, _clean_images(paths[i : i + chunk], height, width)) for i in range(0, len(paths), chunk)]
    )


def inputs_digest(tracklets: list[Tracklet], base_sha256: str, config: AdaptConfig) -> str:
    """What a saved state must match to be resumed: the same starting model, crops and settings."""
    digest = hashlib.sha256(base_sha256.encode())
    for t in tracklets:
        digest.update(f"{t.camera}/{t.track}/{len(t.paths)}/{t.start_s}/{t.end_s}\n".encode())
        for path in t.paths:
            digest.update(path.encode())
    digest.update(repr(sorted(asdict(config).items())).encode())
    return digest.hexdigest()


def adapt(
    model: FANet,
    tracklets: list[Tracklet],
    input_size: tuple[int, int],
    config: AdaptConfig,
    state_file: Path,
    base_sha256: str,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> list[AdaptEpoch]:
    """Adapt ``model`` (an inference FA-Net, changed in place) to ``tracklets``; returns the epochs
    run by this call (a resumed run starts after the saved epoch)."""
    if len(tracklets) < 2:
        raise ValueError(f"adaptation needs at least 2 tracks, got {len(tracklets)}")
    if config.epochs == 0:
        return []
    height, width = input_size
    paths = [p for t in tracklets for p in t.paths]
    owner = np.concatenate([np.full(len(t.paths), i) for i, t in enumerate(tracklets)])
    digest = inputs_digest(tracklets, base_sha256, config)
    torch.manual_seed(config.seed)
    model.to(memory_format=torch.channels_last)  # oneDNN's faster layout on the CPU (as the trainer)
    model.freeze_low_level()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    start_epoch, anchor = 0, None
    if state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state.get("digest") == digest:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, anchor = int(state["epoch"]), state["anchor"]
            log(f"resuming the adaptation after epoch {start_epoch} ({state_file})")
        else:
            log(f"{state_file} is another adaptation's state (other model, crops or settings): starting afresh")
    if anchor is None:
        anchor = _embed_with_progress(model, paths, height, width, progress, "embedding (start)")
    transform = ReIDTransform(height, width, flip_prob=0.5, pad=config.pad, erase_prob=config.erase_prob)
    epochs = []
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        features = anchor if epoch == 0 else _embed_with_progress(model, paths, height, width, progress, "embedding")
        labels = _crop_labels(features, owner, tracklets)
        centroids = _centroids(features, labels)
        samples = [Sample(path, int(label), 0) for path, label in zip(paths, labels, strict=True)]
        sampler = PKSampler(samples, num_identities=min(config.batch_p, int(labels.max()) + 1),
                            num_instances=config.batch_k, seed=config.seed)  # fmt: skip
        loader = TrainLoader(ReIDImageDataset(samples, transform, seed=config.seed), sampler, config.seed)
        loader.set_epoch(epoch)
        model.train()
        sums = np.zeros(3)
        steps = len(loader)
        for step, batch in enumerate(loader):
            images, targets = batch["image"].contiguous(memory_format=torch.channels_last), batch["pid"]
            batch_features = model.features(images)
            normalised = functional.normalize(batch_features, dim=1)
            contrast = functional.cross_entropy(normalised @ centroids.T / config.temperature, targets)
            anchored = relational_distillation_loss(batch_features, anchor[batch["index"]], config.anchor_temperature)
            loss = contrast + config.anchor_weight * anchored
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for label in targets.unique():
                    mean = normalised[targets == label].detach().mean(dim=0)
                    centroids[label] = functional.normalize(
                        config.momentum * centroids[label] + (1 - config.momentum) * mean, dim=0
                    )
            sums += [loss.item(), contrast.item(), anchored.item()]
            if progress is not None:
                progress(f"epoch {epoch + 1}/{config.epochs}", step + 1, steps)
        model.eval()
        if not math.isfinite(sums[0]):
            raise FloatingPointError(f"the adaptation loss is not finite in epoch {epoch + 1}; lower --lr")
        identities = int(labels.max()) + 1
        tracklet_labels = _tracklet_labels(labels, owner, len(tracklets))
        linked = int(sum(np.bincount(tracklet_labels)[tracklet_labels] > 1))
        result = AdaptEpoch(epoch + 1, identities, linked, *(sums / max(steps, 1)), time.perf_counter() - started)
        epochs.append(result)
        log(
            f"epoch {result.epoch}: {identities} pseudo-identities ({linked} of {len(tracklets)} tracks linked "
            f"across cameras), loss {result.loss:.3f} (contrast {result.contrast:.3f}, anchor {result.anchor:.4f}), "
            f"{result.seconds:.0f} s"
        )
        save_atomically(
            {"digest": digest, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "anchor": anchor},
            state_file,
        )  # fmt: skip
    return epochs


def embed_tracklets(
    model: FANet,
    tracklets: list[Tracklet],
    input_size: tuple[int, int],
    progress: Progress | None = None,
    stage: str = "camera centring",
) -> np.ndarray:
    """Every crop of ``tracklets`` (tracklet by tracklet, in order) through ``model``: (N, D) float32."""
    paths = [p for t in tracklets for p in t.paths]
    return _embed_with_progress(model.eval(), paths, *input_size, progress, stage).numpy()


def fit_camera_centring(features: np.ndarray, tracklets: list[Tracklet], whiten: bool = True) -> CameraCentring:
    """Step 4 of the module docstring on :func:`embed_tracklets`'s features of the (adapted) model: the
    site's camera means and, with ``whiten``, the cameras' whitening."""
    cameras = [t.camera for t in tracklets for _ in t.paths]
    tracks = [t.track for t in tracklets for _ in t.paths]
    return CameraCentring.fit(features, cameras, tracks, whiten=whiten)


def tracklet_means(features: np.ndarray, tracklets: list[Tracklet]) -> np.ndarray:
    """One l2-normalised mean feature per tracklet from :func:`embed_tracklets`'s rows."""
    owner = np.repeat(np.arange(len(tracklets)), [len(t.paths) for t in tracklets])
    sums = np.zeros((len(tracklets), features.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, features)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _embed_with_progress(
    model: FANet, paths: list[str], height: int, width: int, progress: Progress | None, stage: str
) -> Tensor:
    chunk, parts = 256, []
    for start in range(0, len(paths), chunk):
        parts.append(embed_paths(model, paths[start : start + chunk], height, width))
        if progress is not None:
            progress(stage, min(start + chunk, len(paths)), len(paths))
    return torch.cat(parts)


def _crop_labels(features: Tensor, owner: np.ndarray, tracklets: list[Tracklet]) -> np.ndarray:
    return pseudo_identities(tracklet_means(features.numpy(), tracklets), tracklets)[owner]


def _tracklet_labels(labels: np.ndarray, owner: np.ndarray, count: int) -> np.ndarray:
    out = np.zeros(count, dtype=np.int64)
    out[owner] = labels
    return out


def _centroids(features: Tensor, labels: np.ndarray) -> Tensor:
    count = int(labels.max()) + 1
    sums = torch.zeros(count, features.shape[1])
    sums.index_add_(0, torch.from_numpy(labels), features)
    return functional.normalize(sums, dim=1)


def card_line(meta: dict[str, Any]) -> str:
    """One line saying what a checkpoint was adapted on (the model card line the app shows)."""
    adapted = meta.get("adapted") or {}
    if not adapted:
        return ""
    centred, skipped = adapted.get("centred_cameras"), adapted.get("centring_skipped")
    whitened = " and whitened" if adapted.get("whitened") else ""
    centring = "" if centred is None else f", centred{whitened} on {centred} camera means"
    centring = f", not centred ({skipped})" if skipped else centring
    return (
        f"adapted from {adapted.get('from')} on {adapted.get('crops')} crops of {adapted.get('tracks')} tracks "
        f"({adapted.get('cameras')} cameras, {adapted.get('source')}), {adapted.get('epochs')} epochs{centring}, "
        f"{adapted.get('at')}"
    )
