"""Image files given by the user (queries, ``visualize`` inputs): their size is read from the file
header and checked before anything is decoded, so a small file that decodes to gigabytes (a
30000×30000 PNG is 875 KB on disk and 2.7 GB as pixels) is refused at once instead of exhausting
memory.

The work of decoding is bounded too, not only its memory: each scan of a progressive JPEG is a
pass over every coefficient of the image, and nothing in libjpeg limits how many there are (a
93 KB 4096×4096 file with 6,000 empty scans costs 9 s of CPU; 20 MB can hold 2 million). So the
markers of a JPEG are read first and more than :data:`MAX_JPEG_SCANS` scans are refused.

And so is what a decoded image holds while it is searched: an image of more than
:data:`MAX_DECODED_MEGAPIXELS` is decoded at 1/2, 1/4 or 1/8 of its width and height (the
detector sees 640 pixels a side, the embedder 256; a person in it keeps plenty), a JPEG by the
decoder itself, without ever holding all its pixels; and a process decodes at most
:data:`MAX_CONCURRENT_DECODES` images at once (the server's threads would otherwise each hold a
full-size one: a 160 KB 7000×7000 PNG is 147 MB of pixels).
"""

from __future__ import annotations

import re
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from reid_app.errors import ReidAppError

#: Largest image accepted, in megapixels: a 48 MP camera photo (8000×6000) passes; decoded as
#: BGR it is 150 MB. Documented in README.md (Limits).
MAX_IMAGE_MEGAPIXELS = 50
#: Most scans accepted in a JPEG: a baseline one has 1 to 3, libjpeg's progressive script 10,
#: encoders that tune their scripts a few dozen. Decoding cost grows with each one.
MAX_JPEG_SCANS = 100
#: Most marker segments walked in a JPEG before its first pixel: real files have tens; without a
#: bound, millions of tiny segments would make this check itself the slow part.
MAX_JPEG_SEGMENTS = 2000
#: Largest image kept at full resolution, in megapixels: a 16 MP phone photo is.
MAX_DECODED_MEGAPIXELS = 16
#: Images decoded at the same time in one process.
MAX_CONCURRENT_DECODES = 2
_DECODES = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_JPEG_MAGIC = b"\xff\xd8"
#: A start-of-scan marker. libjpeg reads a marker wherever 0xFF (any number of them) is followed by
#: a byte other than 0x00, skipping whatever else lies between markers, so every scan it decodes
#: starts at one of these two bytes: their count in the file bounds the scans, however the file
#: is crafted (a thumbnail or profile inside it can only add to the count, never hide a scan).
_SOS = b"\xff\xda"
#: The next marker as libjpeg finds it (``next_marker`` in jdmarker.c): fill bytes, then its code.
JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")
#: Start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers without a length field: RST0-7, SOI, EOI, TEM.
_NO_LENGTH = frozenset((*range(0xD0, 0xDA), 0x01))


class DecodedImage(NamedTuple):
    """An image file as decoded for searching."""

    #: BGR uint8, upright (the decoder applies the EXIF orientation), reduced by ``reduction``.
    pixels: np.ndarray
    #: 1, 2, 4 or 8: how many of the file's pixels each pixel here stands for, along each side.
    reduction: int
    #: (width, height) of the upright image at full size: what a viewer of the file shows.
    size: tuple[int, int]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header of the image file ``path``, without decoding its pixels
    (for a JPEG, :func:`jpeg_header` is the faster and bounded way)."""
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
    """``path`` as a Path, once it is known to be an image file of at most MAX_IMAGE_MEGAPIXELS
    (and, a JPEG, of at most MAX_JPEG_SCANS scans)."""
    path = Path(path)
    checked_size(path, what)
    return path


def checked_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) of the image file ``path`` as its header gives it (before any EXIF
    rotation), once the checks of :func:`check_image_file` have passed."""
    if not path.exists():
        raise ReidAppError(f"{what} not found: {path}")
    if not path.is_file():
        raise ReidAppError(f"{what} is not a file: {path}")
    with open(path, "rb") as handle:
        is_jpeg = handle.read(len(_JPEG_MAGIC)) == _JPEG_MAGIC
        # A JPEG is read whole (at most the upload limit for the server): its scans are counted
        # in all of it. Other formats keep to Pillow's header reading.
        data = _JPEG_MAGIC + handle.read() if is_jpeg else b""
    # The JPEG rules first: they cost a few milliseconds at C speed whatever the file holds,
    # while Pillow's JPEG header walk runs in Python, segment by segment and junk byte by junk
    # byte (a million empty comments: a second of CPU); it is not used for a JPEG at all.
    width, height = jpeg_header(data, path) if is_jpeg else image_size(path)
    if width * height > MAX_IMAGE_MEGAPIXELS * 1_000_000:
        raise ReidAppError(_too_large(path, (width, height)))
    return width, height


def jpeg_header(data: bytes, path: Path) -> tuple[int, int]:
    """(width, height) of the JPEG ``data`` (the file ``path``), read from its frame header the
    way libjpeg finds it; refused when it holds more than MAX_JPEG_SCANS scans (counted as
    :data:`_SOS` markers) or more than MAX_JPEG_SEGMENTS marker segments before its first scan."""
    if data.count(_SOS) > MAX_JPEG_SCANS:
        raise ReidAppError(_too_many_scans(path))
    size: tuple[int, int] | None = None
    position = len(_JPEG_MAGIC)
    for _ in range(MAX_JPEG_SEGMENTS):
        found = JPEG_MARKER.search(data, position)  # as libjpeg: bytes between markers are skipped
        if found is None:
            break
        marker = found[1][0]
        if marker in (0xDA, 0xD9):  # the first scan (the frame header came before it), or the end
            break
        position = found.end()
        if marker in _NO_LENGTH:
            continue
        segment = data[position : position + 7]
        if marker in _SOF and size is None and len(segment) >= 7:
            # length (2), precision (1), height (2), width (2)
            size = (int.from_bytes(segment[5:7], "big"), int.from_bytes(segment[3:5], "big"))
        position += int.from_bytes(segment[:2], "big")
    else:
        raise ReidAppError(_too_many_scans(path))
    if size is None:
        raise ReidAppError(f"not an image (its header cannot be read): {path}")
    return size


def _too_many_scans(path: Path) -> str:
    return (
        f"image {path} is a JPEG of more than {MAX_JPEG_SCANS} scans (or {MAX_JPEG_SEGMENTS} marker segments), "
        "and each scan is one more pass of the decoder over the whole image: save it again as an ordinary "
        "JPEG or PNG"
    )


def read_image(path: str | Path, what: str = "image") -> DecodedImage:
    """The image at ``path``, after the checks of :func:`check_image_file`, decoded upright and
    reduced by :func:`decode_reduction` when it is large (module docstring)."""
    path = Path(path)
    width, height = checked_size(path, what)
    reduction = decode_reduction(width, height)
    with _DECODES:
        pixels = cv2.imread(str(path), _REDUCED[reduction])
    if pixels is None or pixels.size == 0:
        raise ReidAppError(f"not an image (OpenCV cannot decode it): {path}")
    # The decoder turns the image upright by its EXIF orientation; a quarter turn swaps its sides
    # (whichever formats this OpenCV reads the tag of: the decoded shape says what it did).
    turned = (pixels.shape[1] - pixels.shape[0]) * (width - height) < 0
    return DecodedImage(pixels, reduction, (height, width) if turned else (width, height))


def decode_reduction(width: int, height: int) -> int:
    """1, 2, 4 or 8: the least reduction of each side that leaves at most MAX_DECODED_MEGAPIXELS."""
    return next((r for r in (1, 2, 4) if width * height <= MAX_DECODED_MEGAPIXELS * 1_000_000 * r * r), 8)


def _too_large(path: Path, size: tuple[int, int] | None) -> str:
    dims = f" ({size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} megapixels)" if size else ""
    return (
        f"image {path} is too large{dims}: at most {MAX_IMAGE_MEGAPIXELS} megapixels are accepted; "
        "crop or shrink it first"
    )
