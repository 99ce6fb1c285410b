"""Critical-finding notifications: a webhook POST and/or a local command, audited.

Fired by the runner the moment a job that reported ``Outputs.critical`` succeeds, on a thread
of its own so the runner never waits on a slow receiver. The payload (JSON) names the job,
route, study, patient ID, accession number, the message, and the seconds from study completion;
each attempt's outcome is an audit event (``critical-notified``) with that latency, so an admin
can show when the radiologist could have known.

Limitation (documented in docs/operations.md): a node killed between a job's success and its
notification does not re-send the notification after restart; the audit trail shows the gap.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import urllib.request
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import NotifyConfig
from dicomnode.schema import utcnow

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


def deliver(cfg: NotifyConfig, payload: dict[str, Any], audit: AuditLog,
            sessions: sessionmaker[Session], completed_at: datetime | None) -> None:
    """Send to every configured channel, retrying; audit each channel's final outcome."""
    body = json.dumps(payload).encode()
    channels: list[tuple[str, Any]] = []
    if cfg.webhook:
        channels.append((f"webhook {cfg.webhook}", lambda: _post(cfg.webhook or "", body,
                                                                cfg.timeout_seconds)))
    if cfg.command:
        channels.append((f"command {cfg.command[0]}", lambda: _run(cfg.command or [], body,
                                                                  cfg.timeout_seconds)))
    for name, send in channels:
        detail, ok = "", False
        for attempt in range(1, cfg.attempts + 1):
            try:
                detail, ok = send(), True
                break
            except Exception as e:  # any failure of the receiver: retry, then audit it
                detail = f"{type(e).__name__}: {e}"
                log.warning("notification via %s failed (attempt %d): %s", name, attempt, detail)
                if attempt < cfg.attempts:
                    time.sleep(min(2.0 ** (attempt - 1), 10.0))
        latency = (utcnow() - completed_at).total_seconds() if completed_at else None
        with sessions() as s, s.begin():
            audit.record(EventKind.CRITICAL_NOTIFIED,
                         Outcome.SUCCESS if ok else Outcome.SERIOUS_FAILURE, session=s,
                         channel=name, attempts=attempt, detail=detail[:500],
                         seconds_since_completion=None if latency is None else round(latency, 3),
                         job_uid=payload["job_uid"], route=payload["route"],
                         study_uid=payload["study_uid"], message=payload["message"][:500])


def notify_async(cfg: NotifyConfig, payload: dict[str, Any], audit: AuditLog,
                 sessions: sessionmaker[Session], completed_at: datetime | None) -> None:
    threading.Thread(target=deliver, args=(cfg, payload, audit, sessions, completed_at),
                     name="notify", daemon=True).start()
