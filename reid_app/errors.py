"""User-facing errors: each carries one line that the CLI prints to stderr before exiting non-zero.

:func:`describe_failure` gives the same one line for the failures of the machine rather than of
the code (a full disk, a read-only or foreign file, a database the process may not write, a
value out of range), so that they too reach the operator as one line saying what to do instead
of a traceback.
"""

from __future__ import annotations

import errno

#: How to act on an OSError, by errno.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run again",
    errno.EACCES: "permission denied: run as the user that owns it or fix its permissions",
    errno.EPERM: "operation not permitted: run as the user that owns it or fix its permissions",
    errno.EROFS: "the file system is read-only: use a writable --db / --data-dir location",
    errno.ENAMETOOLONG: "a file name is too long (at most 255 bytes per path component): use a shorter path",
    errno.EISDIR: "it is a directory: give a file path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EIO: "input/output error: the storage is failing or was removed; check it and run again",
}

#: How to act on a database error, by a fragment of the driver's message (SQLite's wording).
_DATABASE_HINTS = (
    ("disk i/o error", "the disk is full or failing: free some space (or check the storage) and run again"),
    ("database or disk is full", "the disk is full: free some space and run again"),
    (
        "readonly database",
        "this user cannot write the database file or its folder, and SQLite writes beside the file even to read "
        "it: run as its owner, or give this user write access to both",
    ),
    ("unable to open database file", "cannot open the database file: check that --db names a writable file"),
    ("file is not a database", "--db does not point at a SQLite database file"),
    ("no such table", "this is not a reid-app database (its tables are missing): check --db"),
    ("no such column", "this database was made by another version of reid-app: check --db"),
    ("could not connect", "the database server cannot be reached: check the host, port and credentials in --db"),
    ("connection refused", "the database server cannot be reached: check the host, port and credentials in --db"),
    ("password authentication failed", "the database server refused the credentials in --db"),
)


class ReidAppError(Exception):
    """An error the operator can act on (bad input, missing file, wrong database...)."""

    exit_code: int = 2


def short_path(path: object, keep: int = 40) -> str:
    """``path`` for a message, each over-long component cut in the middle with its length noted."""
    parts = str(path).split("/")
    return "/".join(p if len(p) <= 2 * keep else f"{p[:keep]}…({len(p)} characters)…{p[-8:]}" for p in parts)


def _first_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_failure(exc: BaseException, *, with_paths: bool = True) -> str | None:
    """One line for an environment failure, or None for anything else (a bug: keep its traceback).
    ``with_paths=False``: without the file names, nor the driver's own message (a PostgreSQL error
    names the server's host, port and user), for an answer to someone who is not the operator."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 (kept out of the import of this module)

    if isinstance(exc, OSError):
        names = (exc.filename, exc.filename2) if with_paths else ()
        where = " ".join(short_path(name) for name in names if name is not None)
        what = exc.strerror or type(exc).__name__
        hint = _OS_HINTS.get(exc.errno or 0, "")
        # The hint first: a long path must not push what to do out of the line.
        return _first_line(f"{what}" + (f" ({hint})" if hint else "") + (f": {where}" if where else ""))
    if isinstance(exc, SQLAlchemyError):
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
        lowered = detail.lower()
        hint = next((text for fragment, text in _DATABASE_HINTS if fragment in lowered), "check --db")
        if not with_paths:  # what to do is the operator's to know: the client learns what failed
            return "the database cannot answer now: the server's log says why"
        return _first_line(f"database error: {detail} ({hint})")
    if isinstance(exc, OverflowError):
        return _first_line(
            f"a number or a time is out of range ({exc}): an input is beyond the limits in README.md "
            "(Limits), or a stored row is damaged"
        )
    if isinstance(exc, MemoryError):
        return "out of memory: an input is too large for this machine (see the limits in README.md)"
    return None
