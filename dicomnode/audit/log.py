"""Write and verify the hash-chained audit trail.

Each row stores ``hash = sha256(prev_hash + canonical_json(content))``; ``seq`` is gapless and the
``audit_head`` row holds the last (seq, hash). Editing a row breaks its own hash, deleting one
breaks the ``seq``/``prev_hash`` link at its successor, truncating the tail disagrees with the head.
Appends lock the head row, so the chain stays linear with many writers (threads, processes, or
machines on PostgreSQL). SQLite and PostgreSQL triggers also refuse UPDATE/DELETE on the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.events import EventKind, Outcome
from dicomnode.schema import AuditEvent, AuditEventStudy, AuditHead

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_HASHED = ("seq", "ts", "event_code", "event_name", "event_type", "action", "outcome",
           "source_aet", "source_host", "dest_aet", "user", "detail", "prev_hash")


# Built once and run as Core statements on the session's connection: an audit event is written
# on every association (accepted, instances received) and the ORM unit of work cost ~1 ms more
# than the statements themselves. The head row is locked exactly as before (FOR UPDATE on
# PostgreSQL; SQLite's write transaction is the lock there).
_HEAD = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
_INSERT_EVENT = insert(AuditEvent)
_INSERT_STUDIES = insert(AuditEventStudy)
_MOVE_HEAD = update(AuditHead).where(AuditHead.id == 1).values(
    seq=bindparam("new_seq"), hash=bindparam("new_hash"))


def study_uids(detail: dict[str, Any]) -> list[str]:
    """The Study Instance UIDs an event's detail names: ``study_uid``, and the keys (or items)
    of ``studies``. Indexed in ``audit_event_studies`` so a study's trail is found fast."""
    found: list[str] = []
    uid = detail.get("study_uid")
    if isinstance(uid, str) and uid:
        found.append(uid)
    studies = detail.get("studies")
    if isinstance(studies, dict | list):
        found += [u for u in studies if isinstance(u, str) and u]
    return sorted({u[:64] for u in found})


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def row_hash(content: dict[str, Any]) -> str:
    payload = content["prev_hash"] + canonical_json({k: content[k] for k in _HASHED})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AuditLog:
    """Appends events. Pass ``session`` to make the event part of a larger transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()  # fewer lock waits in the database; not relied on

    def record(
        self,
        kind: EventKind,
        outcome: Outcome = Outcome.SUCCESS,
        *,
        source_aet: str = "",
        source_host: str = "",
        dest_aet: str = "",
        user: str = "",
        session: Session | None = None,
        **detail: Any,
    ) -> None:
        if session is not None:
            self._append(session, kind, outcome, source_aet, source_host, dest_aet, user, detail)
            return
        with self._lock, self._sessions() as s, s.begin():
            self._append(s, kind, outcome, source_aet, source_host, dest_aet, user, detail)

    def _append(self, s: Session, kind: EventKind, outcome: Outcome, source_aet: str,
                source_host: str, dest_aet: str, user: str, detail: dict[str, Any]) -> None:
        c = s.connection()
        head = c.execute(_HEAD).one()
        content: dict[str, Any] = {
            "seq": head.seq + 1,
            "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
            "event_code": kind.code,
            "event_name": kind.meaning,
            "event_type": kind.type_name,
            "action": kind.action,
            "outcome": int(outcome),
            "source_aet": source_aet[:16],
            "source_host": source_host[:64],
            "dest_aet": dest_aet[:16],
            "user": user[:64],
            "detail": canonical_json(detail),
            "prev_hash": head.hash,
        }
        content["hash"] = row_hash(content)
        c.execute(_INSERT_EVENT, content)
        uids = study_uids(detail)
        if uids:  # the search index beside the chain (not hashed; see AuditEventStudy)
            c.execute(_INSERT_STUDIES, [{"study_uid": u, "seq": content["seq"]} for u in uids])
        c.execute(_MOVE_HEAD, {"new_seq": content["seq"], "new_hash": content["hash"]})
        log.debug("audit %s %s", kind.type_name, detail)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def _rows(s: Session) -> Iterator[AuditEvent]:
    yield from s.execute(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000).scalars()


def verify_chain(sessions: sessionmaker[Session]) -> VerifyResult:
    """Recompute the whole chain; report the first row that was altered, removed or inserted."""
    prev = GENESIS
    expected_seq = 1
    n = 0
    with sessions() as s:
        for row in _rows(s):
            content = {k: getattr(row, k) for k in _HASHED}
            if row.seq != expected_seq:
                return VerifyResult(False, n, expected_seq,
                                    f"row seq {expected_seq} is missing (deleted?); next is "
                                    f"seq {row.seq}")
            if row.prev_hash != prev:
                return VerifyResult(False, n, row.seq,
                                    f"row seq {row.seq} does not link to its predecessor")
            if row_hash(content) != row.hash:
                return VerifyResult(False, n, row.seq,
                                    f"row seq {row.seq} was altered (hash mismatch)")
            prev = row.hash
            expected_seq += 1
            n += 1
        head = s.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one()
        if head.seq != n or head.hash != prev:
            return VerifyResult(False, n, n + 1,
                                f"chain ends at seq {n} but the head records seq {head.seq}: "
                                "rows were removed from the end")
    return VerifyResult(True, n)
