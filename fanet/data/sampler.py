"""PK identity sampler with camera diversity (Sec. IV-B: "16 pedestrians each with 8 images ...
taken from different cameras as much as possible").

Per epoch, each identity's images are ordered round-robin over its cameras (camera order and
the images within a camera shuffled), so any K consecutive images cover as many cameras as
remain, balanced to within one image; that order is cut into chunks of K (a remainder shorter
than K is dropped, as in torchreid's ``RandomIdentitySampler``). An identity with fewer than K
images uses each of them once and fills the remaining places by repeating images of its
least-used cameras. Batches of P chunks from P different identities are then drawn at random.

The epoch's batch list depends only on (seed, epoch), so a resumed run replays it exactly, and
it is the same on every replica: replica ``rank`` takes batches ``rank, rank + world_size, ...``.
The number of batches is fixed, ``ceil((total chunks // P) / world_size)`` per replica; the
random draw can strand chunks of a few identities at the end, and the missing batches are then
filled with fresh camera-diverse chunks of P random identities.

``max_per_identity`` caps the images an identity gives one epoch (a prefix of its camera-diverse
order, so a fresh draw each epoch): sets cut from video tracks, tens of frames per person, then do
not fill most batches of a multi-source epoch.

``len(sampler)`` is (batches per replica) x P x K: the sampler yields a flat stream of dataset
indices, to be cut into batches of P x K by the DataLoader (each P x K is one replica's batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from torch.utils.data import Sampler


class _Labelled(Protocol):
    pid: int
    camid: int


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """A generator fixed by (seed, epoch, stream); independent across the three."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch, stream])


class PKSampler(Sampler[int]):
    """P identities x K images per batch, K images spread over the identity's cameras.

    Args:
        samples: the training samples (anything with ``pid`` and ``camid``), e.g.
            ``ReIDDataset.train``; indices yielded refer to this sequence.
        num_identities: P. num_instances: K.
        seed: base seed; call ``set_epoch`` before each epoch.
        rank, world_size: this replica and the number of replicas (distributed training).
    """

    def __init__(
        self,
        samples: Sequence[_Labelled],
        num_identities: int = 16,
        num_instances: int = 8,
        max_per_identity: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_identities < 1 or num_instances < 1:
            raise ValueError(f"P and K must be >= 1, got P={num_identities}, K={num_instances}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        # pid -> camid -> dataset indices; sorted keys so the epoch draw is reproducible.
        by_identity: dict[int, dict[int, list[int]]] = {}
        for index, sample in enumerate(samples):
            by_identity.setdefault(sample.pid, {}).setdefault(sample.camid, []).append(index)
        self._by_identity = {
            pid: {cam: by_identity[pid][cam] for cam in sorted(by_identity[pid])} for pid in sorted(by_identity)
        }
        if len(self._by_identity) < num_identities:
            raise ValueError(
                f"PK sampling needs at least P={num_identities} identities, the training set has "
                f"{len(self._by_identity)}; lower the number of identities per batch"
            )
        if max_per_identity is not None and max_per_identity < num_instances:
            raise ValueError(f"max_per_identity ({max_per_identity}) must be >= K={num_instances}")
        self.num_identities = num_identities
        self.num_instances = num_instances
        self.max_per_identity = max_per_identity
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        total_chunks = sum(max(1, self._epoch_images(cams) // num_instances) for cams in self._by_identity.values())
        self.batches_per_replica = math.ceil((total_chunks // num_identities) / world_size)

    def _epoch_images(self, cameras: dict[int, list[int]]) -> int:
        """How many of an identity's images one epoch uses (all, or at most ``max_per_identity``)."""
        count = sum(map(len, cameras.values()))
        return count if self.max_per_identity is None else min(count, self.max_per_identity)

    @property
    def batch_size(self) -> int:
        return self.num_identities * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_replica * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for batch in self.epoch_batches(self.epoch)[self.rank :: self.world_size]:
            yield from batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All replicas' batches of ``epoch`` (``batches_per_replica * world_size`` of them)."""
        rng = epoch_rng(self.seed, epoch)
        k = self.num_instances
        chunks: dict[int, list[list[int]]] = {}
        for pid, cameras in self._by_identity.items():
            # The round-robin order is camera-diverse in every prefix, so a capped identity still
            # shows as many of its cameras as it can; the shuffle draws a new subset each epoch.
            order = self._camera_diverse_order(cameras, rng)[: max(self._epoch_images(cameras), k)]
            chunks[pid] = [order[i : i + k] for i in range(0, len(order) - k + 1, k)]

        target = self.batches_per_replica * self.world_size
        batches: list[list[int]] = []
        while len(batches) < target:
            available = [pid for pid, left in chunks.items() if left]
            if len(available) < self.num_identities:
                break
            # Weight identities by their remaining chunks so that few are stranded at the end.
            weights = np.array([len(chunks[pid]) for pid in available], dtype=np.float64)
            chosen = rng.choice(len(available), self.num_identities, replace=False, p=weights / weights.sum())
            batches.append([index for i in chosen for index in chunks[available[i]].pop()])

        identities = list(self._by_identity)
        while len(batches) < target:
            chosen = rng.choice(len(identities), self.num_identities, replace=False)
            batches.append(
                [
                    index
                    for i in chosen
                    for index in self._camera_diverse_order(self._by_identity[identities[i]], rng)[:k]
                ]
            )
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def _camera_diverse_order(self, cameras: dict[int, list[int]], rng: np.random.Generator) -> list[int]:
        """The identity's images, round-robin over its cameras; at least K long (see module doc)."""
        queues = [
            [cameras[cam][i] for i in rng.permutation(len(cameras[cam]))]
            for cam in (list(cameras)[j] for j in rng.permutation(len(cameras)))
        ]
        order: list[int] = []
        depth = 0
        while len(order) < sum(map(len, queues)):
            order.extend(queue[depth] for queue in queues if depth < len(queue))
            depth += 1
        # Fewer than K images: repeat images of the least-used camera (ties: the shuffled camera
        # order), cycling through that camera's images.
        used = [len(queue) for queue in queues]
        while len(order) < self.num_instances:
            cam = min(range(len(queues)), key=lambda c: used[c])
            order.append(queues[cam][used[cam] % len(queues[cam])])
            used[cam] += 1
        return order
