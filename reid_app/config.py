"""Application settings for ``reid-app``: every default lives here, CLI flags override them.

Where things are stored:

* the database: ``--db URL`` (any SQLAlchemy URL), default ``sqlite:///data/reid.db``;
* the data folder (JPEG thumbnails of stored crops): ``--data-dir``, default the folder of the
  SQLite file, or ``./data`` for a server database such as PostgreSQL;
* the FAISS index files: next to the SQLite file, or in the data folder for other databases.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from reid_app.backends import parse_backend
from reid_app.errors import ReidAppError

DEFAULT_DATA_DIR = Path("data")
DEFAULT_DB_URL = "sqlite:///data/reid.db"
#: Environment variables that stand in for ``--db`` / ``--data-dir`` (handy for scripts and tests).
DB_URL_ENV = "REID_APP_DB"
DATA_DIR_ENV = "REID_APP_DATA_DIR"
#: Seconds an ingest's claim on a video lasts unless renewed (reid_app.claims).
CLAIM_LEASE_ENV = "REID_APP_CLAIM_LEASE_S"
#: The address operators reach `reid-app serve` at (stands in for ``--public-url``).
PUBLIC_URL_ENV = "REID_APP_PUBLIC_URL"
PUBLIC_URL_HELP = f"Address of `reid-app serve`, for the thumbnail links of watchlist alerts (or ${PUBLIC_URL_ENV})."


@dataclass
class AppConfig:
    """Settings of one ``reid-app`` run."""

    db_url: str = DEFAULT_DB_URL
    data_dir: Path | None = None  # None: derived from the database URL (see module docstring)
    sample_fps: float | None = 2.0  # frames per second fed to the detector; None = every frame
    crops_per_track: int = 4  # best crops kept (and embedded) per track
    commit_every_frames: int = 24  # sampled frames per database transaction during ingest
    embed_batch_size: int = 32  # crops preprocessed at a time; forward passes are sized per device by fanet
    #: A gallery of at least this many vectors is searched through an IVF index instead of an
    #: exact flat one (see reid_app.index).
    ivf_threshold: int = 50_000
    ivf_target_recall: float = 0.95  # recall@10 against exact search that nprobe is tuned for
    thumbnail_max_side: int = 256  # stored JPEG thumbnails are at most this tall/wide
    thumbnail_jpeg_quality: int = 90
    #: Default minimum cosine similarity of a search hit (between the equal-error points on
    #: cameras the model never saw, 0.27, and on CUHK03, 0.22), and the cosine distance up to which
    #: identities merge tracks (similarity 0.55: under 0.1 % of different-person crop pairs pass on
    #: either): both calibrated for the shipped model (benchmarks/dg_report.py --calibrate and
    #: benchmarks/cuhk03_report.py; figures in weights/README.md).
    search_threshold: float = 0.25
    identity_threshold: float = 0.45
    lock_timeout_s: float = 120.0  # waiting for the index file lock
    busy_timeout_s: float = 60.0  # SQLite busy timeout
    #: How long a killed ingest host keeps its video claimed before another host takes it over;
    #: renewed every third of it while the ingest runs.
    claim_lease_s: float = 60.0
    weights: str | None = None  # embedder weights: a path, "untrained", or None (default file)
    device: str = "auto"
    backend: str = "auto"  # embedder runtime: auto, torch, onnxruntime, openvino (reid_app.backends)
    int8: bool = False  # embed with the int8 graph `reid-app quantize` accepted (reid_app.quantize)
    #: Where `reid-app serve` is reached (http://host:port, behind any proxy): watchlist webhooks
    #: link thumbnails under it. Empty: serve uses its own address, an ingest a relative link.
    public_url: str = ""

    def __post_init__(self) -> None:
        try:
            self._url = make_url(self.db_url)
        except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
            shown = re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", self.db_url)  # never echo a password
            raise ReidAppError(f"invalid database URL {shown!r}: {exc}") from None
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)
        self.backend = parse_backend(self.backend).value
        self.public_url = check_public_url(self.public_url)

    @classmethod
    def from_env(cls, db_url: str | None = None, data_dir: str | Path | None = None, **kwargs) -> AppConfig:
        """Build a config from CLI values, falling back to the environment then the defaults."""
        db_url = db_url or os.environ.get(DB_URL_ENV) or DEFAULT_DB_URL
        data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
        lease = os.environ.get(CLAIM_LEASE_ENV)
        if lease and "claim_lease_s" not in kwargs:
            try:
                kwargs["claim_lease_s"] = float(lease)
            except ValueError:
                raise ReidAppError(f"${CLAIM_LEASE_ENV} must be a number of seconds, got {lease[:40]!r}") from None
            if not 1 <= kwargs["claim_lease_s"] <= 86_400:
                raise ReidAppError(f"${CLAIM_LEASE_ENV} must be between 1 and 86400 seconds, got {lease[:40]!r}")
        if not kwargs.get("public_url"):
            kwargs["public_url"] = os.environ.get(PUBLIC_URL_ENV, "")
        return cls(db_url=db_url, data_dir=Path(data_dir) if data_dir else None, **kwargs)

    @property
    def safe_db_url(self) -> str:
        """The database URL to show: its password masked."""
        return self._url.render_as_string(hide_password=True)

    @property
    def is_sqlite(self) -> bool:
        return self._url.get_backend_name() == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None for an in-memory or non-SQLite database."""
        if not self.is_sqlite or not self._url.database or self._url.database == ":memory:":
            return None
        return Path(self._url.database)

    @property
    def storage_dir(self) -> Path:
        """Folder of the data files (thumbnails)."""
        if self.data_dir is not None:
            return self.data_dir
        sqlite_path = self.sqlite_path
        return sqlite_path.parent if sqlite_path is not None else DEFAULT_DATA_DIR

    @property
    def index_dir(self) -> Path:
        """Folder of the FAISS index files: next to the SQLite file, else the data folder."""
        sqlite_path = self.sqlite_path
        return sqlite_path.parent if sqlite_path is not None else self.storage_dir

    @property
    def thumbnails_dir(self) -> Path:
        return self.storage_dir / "thumbnails"

    def database_exists(self) -> bool:
        """False only when we can tell that nothing was ever stored (a missing SQLite file)."""
        if not self.is_sqlite:
            return True
        sqlite_path = self.sqlite_path
        return sqlite_path is None or sqlite_path.exists()


def check_public_url(url: str) -> str:
    """``--public-url``: empty, or an http(s) URL with a host (kept without a trailing slash)."""
    url = (url or "").strip()
    if not url:
        return ""
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ReidAppError(
            f"--public-url (or ${PUBLIC_URL_ENV}) must be an http(s) URL such as https://reid.example.org, "
            f"got {url[:60]!r}"
        )
    return url.rstrip("/")


#: Largest camera ID: it must fit a 32-bit INTEGER column (PostgreSQL's, not only SQLite's).
MAX_CAMERA_ID = 2**31 - 1


def parse_camera_id(text: str | int) -> int:
    """A camera ID is a positive integer up to MAX_CAMERA_ID; anything else is a one-line error."""
    value = str(text).strip()
    # The length test first: int() of a very long digit string is slow (and refused by Python).
    if not (value.isascii() and value.isdigit()) or len(value) > 10 or not 1 <= int(value) <= MAX_CAMERA_ID:
        raise ReidAppError(f"camera ID must be a positive integer up to {MAX_CAMERA_ID}, got {str(text)[:40]!r}")
    return int(value)
