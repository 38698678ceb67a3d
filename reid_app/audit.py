"""The audit trail: who searched, changed a case, exported, changed the watchlist or was alerted, and when.

Operators of surveillance systems are asked to show this. Each entry (:class:`reid_app.store.AuditEntry`)
is appended — by the same transaction as the change it records where there is one (a case verdict
and its entry commit together or not at all) — and never changed or deleted by any command: the
table has no update path in the code, and erasure (``forget``) leaves it alone (entries hold ids
and counts, no image and no vector).

Who: ``cli:<user>`` for a command (the operating-system account that ran it), ``api:<address>``
for a request to the server (the client's address; the server has one access token, no user names).
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from reid_app.store import AuditEntry, Database, as_utc, utc_now

MAX_ENTRIES = 10_000
#: Items of a list kept in an entry's details (the rest is counted), and the details' longest text.
LIST_ITEMS = 50
MAX_DETAILS = 4000


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no account name (a container without passwd entry)
        return "cli:unknown"


def ensure_table(db: Database) -> None:
    db.ensure_tables([AuditEntry.__table__])


def add(session: Session, actor: str, action: str, target: str = "", **details: Any) -> None:
    """Append an entry inside the caller's write transaction (the table must exist: :func:`ensure_table`)."""
    session.add(AuditEntry(at=utc_now(), actor=actor[:200], action=action[:64], target=str(target)[:200],
                           details=_details_json(details)))  # fmt: skip


def _details_json(details: dict[str, Any]) -> str:
    """The details as JSON that fits the column whole: long lists keep their first ids and a count."""
    long_lists = {k: len(v) for k, v in details.items() if isinstance(v, list) and len(v) > LIST_ITEMS}
    shown = {key: (value[:LIST_ITEMS] if key in long_lists else value) for key, value in details.items()}
    shown |= {f"{key}_count": count for key, count in long_lists.items()}
    text = json.dumps(shown, default=str)
    return text if len(text) <= MAX_DETAILS else json.dumps({"truncated": True, "keys": sorted(details)[:20]})


def record(db: Database, actor: str, action: str, target: str = "", **details: Any) -> None:
    """Append one entry in its own transaction (an action that writes nothing else: a search, an export)."""
    ensure_table(db)
    db.write(lambda session: add(session, actor, action, target, **details))


def entries(db: Database, since: datetime | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Entries from ``since`` on, oldest first, at most ``limit``."""
    ensure_table(db)
    query = select(AuditEntry).order_by(AuditEntry.id)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    with db.read() as session:
        rows = session.scalars(query.limit(max(1, min(limit, MAX_ENTRIES)))).all()
        return [
            {"id": r.id, "at": as_utc(r.at).isoformat(), "actor": r.actor, "action": r.action, "target": r.target,
             "details": json.loads(r.details) if r.details else {}}
            for r in rows
        ]  # fmt: skip
