"""Weights resolution, in one place for the whole project.

Order: an explicit path → ``$REID_WEIGHTS_DIR/<name>`` → ``weights/<name>`` in the repository
→ the owning library's own download (only where the caller says one exists). A miss raises
:class:`WeightsNotFoundError` whose one-line message names the file, every place looked at
and where to get it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

WEIGHTS_DIR_ENV = "REID_WEIGHTS_DIR"
REPO_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

#: torchvision's ImageNet ResNet50 file name and source (IMAGENET1K_V1, the classic init for re-ID).
RESNET50_IMAGENET_FILE = "resnet50-0676ba61.pth"
RESNET50_IMAGENET_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


class WeightsNotFoundError(FileNotFoundError):
    """A weights file could not be found anywhere it is looked for."""


def search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(REPO_WEIGHTS_DIR)
    return dirs


def resolve_weights(
    name: str,
    explicit: str | os.PathLike[str] | None = None,
    *,
    source: str = "",
    download: Callable[[], Path] | None = None,
) -> Path:
    """Return the path of weights file ``name``.

    ``explicit`` (a path given by the user) wins and must exist. ``source`` says where the file
    can be obtained; it goes into the error message. ``download``, when given, is the owning
    library's own fetch (e.g. torchvision's cache), tried last; offline it fails and the
    error says so.
    """
    looked: list[str] = []
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.exists():
            return path
        looked.append(str(path))
    else:
        for folder in search_dirs():
            candidate = folder / name
            if candidate.exists():
                return candidate
            looked.append(str(candidate))
        if download is not None:
            try:
                return download()
            except Exception as exc:  # offline: URLError, OSError, ... — report, don't crash
                looked.append(f"library download ({type(exc).__name__})")
    hint = f"; get it from {source}" if source else ""
    raise WeightsNotFoundError(
        f"weights file {name!r} not found (looked in: {', '.join(looked)}){hint}"
    )


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
