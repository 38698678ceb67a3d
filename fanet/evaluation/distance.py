"""Feature/array helpers shared by the ranking and re-ranking code.

Distances are cosine distances ``1 - <a, b> / (|a| |b|)``, the metric FA-Net uses at test time
(paper, Sec. IV-B). For l2-normalised features this equals half the squared Euclidean distance.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Same floor as torch.nn.functional.normalize, so all-zero feature rows do not divide by zero.
NORM_EPS = 1e-12


def to_numpy(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Return ``array`` as a numpy array (torch tensors are detached and moved to CPU, no copy on CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    try:
        return np.asarray(array)
    except Exception as exc:  # pragma: no cover - depends on exotic inputs
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}") from exc


def as_float32_features(features: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Return a 2-D float32 CPU tensor sharing memory with ``features`` whenever possible."""
    if isinstance(features, torch.Tensor):
        tensor = features.detach().cpu()
    else:
        array = to_numpy(features, name)
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
        if not array.flags.writeable:
            # torch.from_numpy warns on read-only buffers; a float32 copy is made below anyway if needed.
            array = np.array(array, dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_images, dim), got shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    return tensor


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` bounds covering ``range(num_rows)`` in chunks of ``chunk_size`` rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Row-wise l2 normalisation (a new tensor), identical to ``F.normalize(x, dim=1)``."""
    return torch.nn.functional.normalize(features, p=2.0, dim=1, eps=NORM_EPS)


def row_norms(features: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Row l2 norms clamped at ``NORM_EPS``, computed chunk by chunk to avoid a full-size temporary."""
    norms = torch.empty(features.shape[0], dtype=torch.float32)
    for start, stop in row_chunks(features.shape[0], chunk_size):
        norms[start:stop] = torch.linalg.vector_norm(features[start:stop], dim=1)
    return norms.clamp_min_(NORM_EPS)


def cosine_distance_chunk(
    query_chunk: torch.Tensor, gallery: torch.Tensor, gallery_norms: torch.Tensor
) -> torch.Tensor:
    """Cosine distances between a chunk of query rows and every gallery row (float32).

    The gallery is divided by its norms after the product instead of being normalised up front, so
    no normalised copy of a (possibly multi-GB) gallery is ever made.
    """
    similarity = l2_normalize(query_chunk) @ gallery.T
    similarity.div_(gallery_norms)
    return similarity.neg_().add_(1.0)


def cosine_distance(
    query_features: np.ndarray | torch.Tensor, gallery_features: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Full cosine distance matrix (float32, num_query x num_gallery). Only for small inputs."""
    query = as_float32_features(query_features, "query_features")
    gallery = as_float32_features(gallery_features, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery feature dims differ: {query.shape[1]} vs {gallery.shape[1]}")
    return cosine_distance_chunk(query, gallery, row_norms(gallery)).numpy()
