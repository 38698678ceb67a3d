"""Who ingests which video: a claim row with an owner and a lease, in the shared database.

A claim (:class:`reid_app.store.IngestClaim`) is taken in the transaction that creates or resets
the video row, renewed by a heartbeat thread every third of the lease, checked by every batch
commit and deleted by the commit that completes the video (or by the cleanup of a failed run).
Times are the database's clock (:meth:`reid_app.store.Database.server_time`), so hosts whose own
clocks differ still agree on when a lease ends.

A claim held by someone else blocks an ingest of the same (video, camera) until:

* its lease ends (the owner died, hung, or lost the network): another host takes the video over
  and redoes it (:mod:`reid_app.ingest`); or
* its owner is a process of this very host (same host name) that no longer exists: taken over at
  once, as a local file lock would be. Containers that share a host name but not their process
  ids must be told apart with ``REID_APP_HOST``.

An owner that finds its claim taken (its lease ran out while it was stalled) stops with an
error and deletes nothing: the rows are the new owner's now.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from reid_app.errors import ReidAppError
from reid_app.store import Database, IngestClaim

#: Overrides the host name recorded in claims (containers sharing one host name).
HOST_ENV = "REID_APP_HOST"


def host_name() -> str:
    return (os.environ.get(HOST_ENV) or socket.gethostname())[:255]


def new_owner() -> str:
    """An owner id unique to this run: host, process id and a random part."""
    return f"{host_name()}:{os.getpid()}:{secrets.token_hex(4)}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def claim_is_free(claim: IngestClaim | None, owner: str, now_s: float) -> bool:
    """Whether ``owner`` may take (or keep) the claim of a video now."""
    if claim is None or claim.owner == owner or claim.lease_until_s <= now_s:
        return True
    return claim.host == host_name() and _process_gone(claim.pid)


def owner_process_gone(owner: str) -> bool:
    """Whether ``owner`` (:func:`new_owner`'s form) is a process of this host that no longer exists."""
    host, pid, _ = (owner.rsplit(":", 2) + ["", ""])[:3]
    return host == host_name() and pid.isdigit() and _process_gone(int(pid))


def take(session: Session, video_id: int, owner: str, now_s: float, lease_s: float, what: str) -> None:
    """Claim ``video_id`` for ``owner`` inside the caller's write transaction, or raise a one-line
    error naming the holder when someone else's claim is still valid."""
    claim = session.get(IngestClaim, video_id)
    if not claim_is_free(claim, owner, now_s):
        raise ReidAppError(
            f"{what} is being ingested by another process right now (host {claim.host}, pid {claim.pid}; its "
            f"claim runs {claim.lease_until_s - now_s:.0f} s more unless renewed; if that process died, another "
            "ingest takes the video over once the claim has expired)"
        )
    if claim is None:
        claim = IngestClaim(video_id=video_id)
        session.add(claim)
    claim.owner, claim.host, claim.pid = owner, host_name(), os.getpid()
    claim.lease_until_s = now_s + lease_s


def holds(session: Session, video_id: int, owner: str) -> bool:
    claim = session.get(IngestClaim, video_id)
    return claim is not None and claim.owner == owner


def unclaimed(session: Session, video_id: int) -> bool:
    return session.get(IngestClaim, video_id) is None


def check_held(session: Session, video_id: int, owner: str) -> None:
    """Raise when ``owner`` no longer holds the claim (another host took the video over)."""
    if not holds(session, video_id, owner):
        raise ClaimLost(
            f"this ingest lost its claim on video id {video_id}: it stalled past its lease and another "
            "process took the video over; nothing more is written by this one"
        )


def release(session: Session, video_id: int, owner: str) -> None:
    session.execute(delete(IngestClaim).where(IngestClaim.video_id == video_id, IngestClaim.owner == owner))


class ClaimLost(ReidAppError):
    """The claim of a running ingest was taken over."""


class Heartbeat:
    """Renews a claim every third of its lease from a background thread, until stopped."""

    def __init__(self, db: Database, video_id: int, owner: str, lease_s: float) -> None:
        self.db, self.video_id, self.owner, self.lease_s = db, video_id, owner, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease covers two more
                continue

    def renew(self) -> bool:
        now_s = self.db.server_time()

        def work(session: Session) -> bool:
            result = session.execute(
                update(IngestClaim)
                .where(IngestClaim.video_id == self.video_id, IngestClaim.owner == self.owner)
                .values(lease_until_s=now_s + self.lease_s)
            )
            return result.rowcount == 1

        held = self.db.write(work)
        self.lost = self.lost or not held
        return held
