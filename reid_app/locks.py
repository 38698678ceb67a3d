"""Local files shared by processes of one host: exclusive file locks and atomic replacement.

Used for each host's own FAISS index files (:mod:`reid_app.index`). Coordination *between*
hosts (who ingests which video) lives in the database instead (:mod:`reid_app.claims`): a file
lock only reaches the processes that see the same file system.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from reid_app.errors import ReidAppError


@contextmanager
def file_lock(path: Path, timeout_s: float, busy_message: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), waiting up to ``timeout_s``; then
    a :class:`ReidAppError` with ``busy_message``. The kernel drops the lock when its process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock_file(path) as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ReidAppError(busy_message or f"timed out waiting for the lock {path}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _open_lock_file(path: Path) -> BinaryIO:
    """The lock file, created if needed. Another user's lock file is opened read-only: flock needs
    an open descriptor, not write access, so users sharing a database folder share its locks."""
    try:
        return open(path, "a+b")  # noqa: SIM115 (the caller's with-block closes it)
    except PermissionError:
        pass
    try:
        return open(path, "rb")  # noqa: SIM115
    except PermissionError:
        raise ReidAppError(
            f"cannot open the lock file {path}: permission denied (it belongs to another user: run as that "
            "user, or let your user read it and write its folder)"
        ) from None


def _new_temporary_file(path: Path) -> str:
    """An empty new file beside ``path`` with the permissions the umask gives any new file
    (mkstemp's 0600 would keep the other users of a shared database from reading the index)."""
    while True:
        name = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(name)


def atomic_write(path: Path, write_to: Callable[[str], None]) -> None:
    """``write_to(temporary path)``, fsync, then move it onto ``path`` in one step."""
    tmp_name = _new_temporary_file(path)
    try:
        write_to(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda name: Path(name).write_bytes(data))

