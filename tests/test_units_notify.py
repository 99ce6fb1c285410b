"""The notifier (``dicomnode/send/notify.py``: ``Notifier``; rows queued by
``dicomnode.run.jobs.queue_notification``) on a real SQLite index, delivering to a real
HTTP server on 127.0.0.1 and to a real command: delivered once, retried with backoff after a
500, given up after ``attempts`` with the audit event."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, Outcome
from dicomnode.config import NotifyConfig
from dicomnode.run.jobs import queue_notification as enqueue
from dicomnode.schema import Job, Notification, utcnow
from dicomnode.send.notify import Notifier
from tests.helpers import wait_until
from tests.unit_db import audit_events, migrated_sqlite

PAYLOAD = {"job_uid": "job-1", "route": "ich", "study_uid": "1.2.3",
           "message": "intracranial hemorrhage, 12 ml"}


class Receiver:
    """An HTTP server that answers each POST with the next status of ``statuses`` (the last
    one for ever after) and keeps what it got: (monotonic time, headers, JSON body)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.got: list[tuple[float, dict[str, str], dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append((time.monotonic(), dict(self.headers), json.loads(body)))
                status = receiver.statuses[min(len(receiver.got), len(receiver.statuses)) - 1]
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine, made = migrated_sqlite(tmp_path)
    yield made
    engine.dispose()


def _queue(sessions: sessionmaker[Session], cfg: NotifyConfig,
           completed_minutes_ago: float = 2.0) -> int:
    """One succeeded job with a critical finding, its notifications queued as the runner
    queues them (in the transaction that ends the job). Returns how many channels."""
    now = utcnow()
    with sessions() as s, s.begin():
        job = Job(uid="job-1", route="ich", level="study", study_uid="1.2.3", revision=1,
                  series_uids="[]", pipeline="[]", state="succeeded", created_at=now)
        s.add(job)
        s.flush()
        return enqueue(s, cfg, job.id, "ich", PAYLOAD,
                       now - timedelta(minutes=completed_minutes_ago))


def _rows(sessions: sessionmaker[Session]) -> list[Notification]:
    with sessions() as s:
        return list(s.execute(select(Notification).order_by(Notification.id)).scalars())


def _run(sessions: sessionmaker[Session], until: Any, timeout: float = 30) -> None:
    notifier = Notifier(sessions, AuditLog(sessions), poll_seconds=0.05)
    notifier.start()
    try:
        wait_until(until, timeout=timeout, interval=0.05, what="notifications")
        time.sleep(0.5)  # ten more polls: nothing further may be sent
    finally:
        notifier.stop()


def test_a_webhook_is_delivered_once_and_audited(sessions: sessionmaker[Session]) -> None:
    receiver = Receiver([204])
    try:
        assert _queue(sessions, NotifyConfig(webhook=receiver.url)) == 1
        _run(sessions, lambda: receiver.got and _rows(sessions)[0].state == "sent")
    finally:
        receiver.close()
    [row] = _rows(sessions)
    assert (row.state, row.attempts, row.last_error) == ("sent", 1, "")
    assert row.sent_at is not None and row.sent_at >= row.created_at
    [(_, headers, body)] = receiver.got  # once
    assert body == {**PAYLOAD, "notification_id": row.id}
    assert headers["Content-Type"] == "application/json"
    [(outcome, detail)] = audit_events(sessions, "critical-notified")
    assert outcome == Outcome.SUCCESS
    assert detail["channel"] == f"webhook {receiver.url}" and detail["attempts"] == 1
    assert detail["detail"] == "HTTP 204" and detail["notification_id"] == row.id
    assert (detail["job_uid"], detail["route"], detail["study_uid"], detail["message"]) == (
        "job-1", "ich", "1.2.3", PAYLOAD["message"])
    assert 120 <= float(detail["seconds_since_completion"]) < 180  # type: ignore[arg-type]


def test_a_500_is_retried_after_a_backoff_then_delivered(
        sessions: sessionmaker[Session]) -> None:
    receiver = Receiver([500, 200])
    try:
        _queue(sessions, NotifyConfig(webhook=receiver.url, attempts=3))
        _run(sessions, lambda: _rows(sessions)[0].state == "sent")
    finally:
        receiver.close()
    [row] = _rows(sessions)
    assert (row.state, row.attempts) == ("sent", 2)
    assert "500" in row.last_error  # the failure that was retried
    (first, _, body1), (second, _, body2) = receiver.got
    assert body1 == body2 == {**PAYLOAD, "notification_id": row.id}
    assert second - first >= 0.9  # backoff after the first failure: 2 ** 0 = 1 s
    [(outcome, detail)] = audit_events(sessions, "critical-notified")  # the outcome only
    assert outcome == Outcome.SUCCESS and detail["attempts"] == 2


def test_gives_up_after_max_attempts_with_a_failure_audited(
        sessions: sessionmaker[Session]) -> None:
    receiver = Receiver([500])
    try:
        _queue(sessions, NotifyConfig(webhook=receiver.url, attempts=2))
        _run(sessions, lambda: _rows(sessions)[0].state == "failed")
    finally:
        receiver.close()
    [row] = _rows(sessions)
    assert (row.state, row.attempts, row.sent_at) == ("failed", 2, None)
    assert row.last_error.startswith("HTTPError") and "500" in row.last_error
    assert len(receiver.got) == 2  # max_attempts, not one more
    [(outcome, detail)] = audit_events(sessions, "critical-notified")
    assert outcome == Outcome.SERIOUS_FAILURE
    assert detail["attempts"] == 2 and "500" in str(detail["detail"])
    assert detail["notification_id"] == row.id and detail["study_uid"] == "1.2.3"


def test_a_command_gets_the_payload_on_stdin_beside_the_webhook(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    out = tmp_path / "stdin.json"
    command = [sys.executable, "-c",
               f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())"]
    receiver = Receiver([200])
    try:
        assert _queue(sessions, NotifyConfig(webhook=receiver.url, command=command)) == 2
        _run(sessions, lambda: all(r.state == "sent" for r in _rows(sessions)))
    finally:
        receiver.close()
    webhook, cmd = _rows(sessions)
    assert (webhook.channel, cmd.channel) == ("webhook", "command")
    assert json.loads(cmd.target) == command and cmd.attempts == 1
    assert json.loads(out.read_bytes()) == {**PAYLOAD, "notification_id": cmd.id}
    assert [b for _, _, b in receiver.got] == [{**PAYLOAD, "notification_id": webhook.id}]
    channels = {d["channel"]: (o, d["detail"]) for o, d in audit_events(
        sessions, "critical-notified")}
    assert channels == {f"webhook {receiver.url}": (Outcome.SUCCESS, "HTTP 200"),
                        f"command {sys.executable}": (Outcome.SUCCESS, "exit 0")}


def test_a_failing_command_is_reported_with_its_exit_status(
        sessions: sessionmaker[Session]) -> None:
    command = [sys.executable, "-c", "import sys; sys.stderr.write('pager down'); sys.exit(3)"]
    assert _queue(sessions, NotifyConfig(command=command, attempts=1)) == 1
    _run(sessions, lambda: _rows(sessions)[0].state == "failed")
    [row] = _rows(sessions)
    assert (row.attempts, row.last_error) == (1, "RuntimeError: exit 3: pager down")
    [(outcome, detail)] = audit_events(sessions, "critical-notified")
    assert outcome == Outcome.SERIOUS_FAILURE and detail["channel"] == f"command {sys.executable}"


def test_nothing_is_queued_without_a_channel(sessions: sessionmaker[Session]) -> None:
    assert _queue(sessions, NotifyConfig()) == 0
    assert _rows(sessions) == []


def test_a_pending_notification_survives_a_restart(sessions: sessionmaker[Session],
                                                   tmp_path: Path) -> None:
    receiver = Receiver([500, 204])
    try:
        _queue(sessions, NotifyConfig(webhook=receiver.url, attempts=3))
        _run(sessions, lambda: _rows(sessions)[0].attempts == 1)  # failed once, then stopped
        assert _rows(sessions)[0].state == "pending"
        engine, restarted = migrated_sqlite(tmp_path)  # a new process on the same index
        try:
            _run(restarted, lambda: _rows(restarted)[0].state == "sent")
        finally:
            engine.dispose()
    finally:
        receiver.close()
    [row] = _rows(sessions)
    assert (row.state, row.attempts) == ("sent", 2) and len(receiver.got) == 2
    assert [o for o, _ in audit_events(sessions, "critical-notified")] == [Outcome.SUCCESS]
