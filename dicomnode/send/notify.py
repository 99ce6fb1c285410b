"""Critical-finding notifications: a webhook POST and/or a local command, durable and audited.

When a job step reports ``Outputs.critical``, the runner writes one
:class:`~dicomnode.schema.Notification` row per channel *in the same transaction* that queues
the step's results (:func:`dicomnode.run.jobs.queue_notification`); the :class:`Notifier`
thread delivers pending rows, retrying with backoff
(``attempts``, ``timeout_seconds``), and after a crash or restart simply goes on with what is
still pending — a critical finding is never silently lost. Delivery is at least once (a crash
between the receiver's answer and the row update re-sends it); the payload carries the job UID
and ``notification_id`` for de-duplication. The payload (JSON) names the job, route, study,
patient ID, accession number, the message and when the study completed; the final outcome of
each channel is an audit event (``critical-notified``) with the seconds from study completion
to delivery, so an admin can show when the radiologist could have known.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import urllib.request
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.database import reading
from dicomnode.schema import Notification, NotificationState, utcnow
from dicomnode.state import Actor, transition

log = logging.getLogger(__name__)


def _post(url: str, body: bytes, timeout: float) -> str:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "dicomnode"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return f"HTTP {r.status}"


def _run(command: list[str], body: bytes, timeout: float) -> str:
    p = subprocess.run(command, input=body, capture_output=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
    return "exit 0"


def _send(channel: str, target: str, body: bytes, timeout: float) -> str:
    if channel == "webhook":
        return _post(target, body, timeout)
    return _run(json.loads(target), body, timeout)


class Notifier:
    """Delivers pending notifications (one thread; each attempt outside any transaction)."""

    def __init__(self, sessions: sessionmaker[Session], audit: AuditLog,
                 poll_seconds: float = 1.0) -> None:
        self.sessions = sessions
        self.readers = reading(sessions)
        self.audit = audit
        self.actor = Actor.system("notifier")
        self.poll = poll_seconds
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self._deliver_one():
                    pass
            except Exception:
                log.exception("notifier pass failed; retrying")
            self.wake.wait(self.poll)
            self.wake.clear()

    def _deliver_one(self) -> bool:
        with self.readers() as s:
            row = s.execute(select(Notification).where(
                Notification.state == NotificationState.PENDING,
                Notification.next_attempt_at <= utcnow())
                .order_by(Notification.next_attempt_at).limit(1)).scalar_one_or_none()
            if row is None:
                return False
            nid, channel, target, body = row.id, row.channel, row.target, row.payload
            timeout = row.timeout_seconds
        name = f"{channel} {target if channel == 'webhook' else json.loads(target)[0]}"
        try:
            detail, ok = _send(channel, target, body.encode(), timeout), True
        except Exception as e:  # any failure of the receiver: retry later, then audit it
            detail, ok = f"{type(e).__name__}: {e}", False
        with self.sessions() as s, s.begin():
            row = s.get_one(Notification, nid)
            row.attempts += 1
            if ok:
                row.sent_at = utcnow()
            elif row.attempts >= row.max_attempts:
                row.last_error = detail[:2000]
            else:
                row.last_error = detail[:2000]
                row.next_attempt_at = utcnow() + timedelta(
                    seconds=min(2.0 ** (row.attempts - 1), 10.0))
                log.warning("notification %d via %s failed (attempt %d): %s", nid, name,
                            row.attempts, detail)
                return True
            payload = json.loads(row.payload)
            completed = row.study_completed_at
            latency = (utcnow() - completed).total_seconds() if completed else None
            transition(
                s, row, NotificationState.SENT if ok else NotificationState.FAILED,
                by=self.actor, audit=self.audit, event=EventKind.CRITICAL_NOTIFIED,
                outcome=Outcome.SUCCESS if ok else Outcome.SERIOUS_FAILURE,
                channel=name, attempts=row.attempts, detail=detail[:500],
                seconds_since_completion=None if latency is None else round(latency, 3),
                job_uid=payload["job_uid"], route=payload["route"],
                study_uid=payload["study_uid"], message=payload["message"][:500])
        return True
