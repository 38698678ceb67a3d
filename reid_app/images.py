"""Image files given by the user (queries, ``visualize`` inputs): their size is read from the file
header and checked before anything is decoded, so a small file that decodes to gigabytes (a
30000×30000 PNG is 875 KB on disk and 2.7 GB as pixels) is refused at once instead of exhausting
memory."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from reid_app.errors import ReidAppError

#: Largest image accepted, in megapixels: a 48 MP camera photo (8000×6000) passes; decoded as
#: BGR it is 150 MB. Documented in README.md (Limits).
MAX_IMAGE_MEGAPIXELS = 50


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header of the image file ``path``, without decoding its pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (or raises, above twice its own limit) about large images at open time;
            # the limit that applies here is MAX_IMAGE_MEGAPIXELS, checked by the caller.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError:
        raise ReidAppError(_too_large(path, None)) from None
    # ImportError: once Ultralytics is imported, its patched Image.open retries an unidentified file
    # with the optional pi-heif plugin, and fails with ModuleNotFoundError when that is not installed.
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError):
        raise ReidAppError(f"not an image (its header cannot be read): {path}") from None


def check_image_file(path: str | Path, what: str = "image") -> Path:
    """``path`` as a Path, once it is known to be an image file of at most MAX_IMAGE_MEGAPIXELS."""
    path = Path(path)
    if not path.exists():
        raise ReidAppError(f"{what} not found: {path}")
    if not path.is_file():
        raise ReidAppError(f"{what} is not a file: {path}")
    width, height = image_size(path)
    if width * height > MAX_IMAGE_MEGAPIXELS * 1_000_000:
        raise ReidAppError(_too_large(path, (width, height)))
    return path


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """The image at ``path`` as BGR uint8, after :func:`check_image_file`."""
    path = check_image_file(path, what)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ReidAppError(f"not an image (OpenCV cannot decode it): {path}")
    return image


def _too_large(path: Path, size: tuple[int, int] | None) -> str:
    dims = f" ({size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} megapixels)" if size else ""
    return (
        f"image {path} is too large{dims}: at most {MAX_IMAGE_MEGAPIXELS} megapixels are accepted; "
        "crop or shrink it first"
    )
