"""Send job results to destinations (C-STORE SCU), one thread per destination.

A destination that is down never delays another: each has its own thread and its own queue
(``deliveries`` rows). Failures are retried with exponential backoff
(``retry_delay_seconds × retry_multiplier^(n-1)``, capped at ``retry_max_delay_seconds``); after
``max_retries`` the delivery is a dead letter (``dicomnode jobs`` shows it, ``dicomnode jobs
retry ID`` re-queues it). Statuses as PS3.4 B.2.3 defines them: success and warnings (0x0001,
0xBxxx) are delivered; 0xA7xx (out of resources) and transport failures are retried; 0xA9xx and
0xCxxx (the data is wrong for that peer) are permanent: dead at once. Output UIDs are
deterministic, so a re-send after a partial failure only duplicates what the peer already has,
and PACS discard duplicates.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import DestinationConfig, Settings
from dicomnode.database import reading
from dicomnode.network.node_ae import NodeAE
from dicomnode.schema import Delivery, DeliveryState, Job, utcnow
from dicomnode.state import Actor, transition

log = logging.getLogger(__name__)


class SendError(Exception):
    def __init__(self, message: str, *, retry: bool, status: str = "") -> None:
        super().__init__(message)
        self.retry = retry
        self.status = status


def classify(status: int) -> str:
    """'ok', 'retry' or 'permanent' for a C-STORE response status."""
    if status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "ok"
    if 0xA700 <= status <= 0xA7FF:
        return "retry"
    return "permanent"  # 0xA9xx dataset/SOP class mismatch, 0xCxxx cannot understand, others


def send_files(dest: DestinationConfig, calling_aet: str, files: list[Path]) -> int:
    """C-STORE every file, over ``dest.associations`` associations at once (each waits on the
    peer's responses, so several overlap that wait); raise SendError on a failure. With more
    than one failure, a permanent one wins: retrying would not help the batch."""
    n = max(1, min(dest.associations, len(files)))
    if n == 1:
        return _send_batch(dest, calling_aet, files)
    batches = [files[i::n] for i in range(n)]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="send") as pool:
        futures = [pool.submit(_send_batch, dest, calling_aet, b) for b in batches]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        permanent = [e for e in errors if isinstance(e, SendError) and not e.retry]
        raise (permanent or errors)[0]  # type: ignore[misc]
    return sum(f.result() for f in futures)


def _send_batch(dest: DestinationConfig, calling_aet: str, files: list[Path]) -> int:
    """C-STORE files over one association; raise SendError on the first failure."""
    # the node's own AE (receive.node_ae): TCP_NODELAY, the PDU length guard and the
    # event-driven reactors on these associations only, the same transport as the SCP's;
    # each file's dataset bytes sent as stored instead of decoded and re-encoded
    ae = NodeAE(ae_title=calling_aet, send_files_as_stored=True,
                log_handlers=logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
    contexts: dict[str, set[str]] = {}
    for f in files:
        meta = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=[]).file_meta
        contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
            str(meta.TransferSyntaxUID))
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise SendError(f"no association with {dest.ae_title}@{dest.host}:{dest.port} "
                        "(refused, rejected or unreachable)", retry=True)
    sent = 0
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            status = getattr(rsp, "Status", None)
            if status is None:
                raise SendError(f"no response for {f.name} (timeout or abort)", retry=True)
            verdict = classify(int(status))
            if verdict != "ok":
                comment = str(getattr(rsp, "ErrorComment", ""))
                raise SendError(f"{f.name}: status 0x{int(status):04X} {comment}".strip(),
                                retry=verdict == "retry", status=f"0x{int(status):04X}")
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


class DestinationWorker:
    def __init__(self, name: str, dest: DestinationConfig, settings: Settings,
                 sessions: sessionmaker[Session], audit: AuditLog) -> None:
        self.name = name
        self.dest = dest
        self.calling_aet = dest.calling_aet or settings.node.ae_title
        self.sessions = sessions
        self.readers = reading(sessions)
        self.audit = audit
        self.actor = Actor.system(f"sender {name}")
        self.poll = 0.5
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"send-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout=self.dest.timeout_seconds + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while self._send_one():
                    pass
            except Exception:
                log.exception("sender %s failed; retrying", self.name)
            self.wake.wait(self.poll)
            self.wake.clear()

    def _send_one(self) -> bool:
        with self.readers() as s:
            row = s.execute(
                select(Delivery.id, Delivery.results, Job.results, Job.uid, Job.id,
                       Job.study_uid, Delivery.step)
                .join(Job, Delivery.job_fk == Job.id)
                .where(Delivery.destination == self.name, Delivery.state == DeliveryState.PENDING,
                       Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.next_attempt_at).limit(1)).first()
        if row is None or self._stop.is_set():
            return False
        delivery_id, step_results, job_results, job_uid, job_id, study_uid, step = row
        # a step's own results; a whole-job delivery (made before step deliveries) the job's
        files = [Path(p) for p in json.loads(step_results if step_results is not None
                                             else job_results)]
        t0 = time.monotonic()
        try:
            n = send_files(self.dest, self.calling_aet, files) if files else 0
        except SendError as e:
            self._failed(delivery_id, job_id, study_uid, e)
            return True
        except Exception as e:  # e.g. a result file unreadable: retry, keep the reason
            self._failed(delivery_id, job_id, study_uid, SendError(str(e), retry=True))
            return True
        with self.sessions() as s, s.begin():
            d = s.get_one(Delivery, delivery_id)
            d.sent_at, d.attempts, d.last_error = utcnow(), d.attempts + 1, ""
            transition(s, d, DeliveryState.SENT, by=self.actor, audit=self.audit,
                       event=EventKind.RESULTS_SENT, source_aet=self.calling_aet,
                       dest_aet=self.dest.ae_title, destination=self.name,
                       host=f"{self.dest.host}:{self.dest.port}", job_id=job_id,
                       job_uid=job_uid, study_uid=study_uid, step=step, instances=n,
                       seconds=round(time.monotonic() - t0, 3))
        log.info("job %d: %d object(s) sent to %s", job_id, n, self.name)
        return True

    def _failed(self, delivery_id: int, job_id: int, study_uid: str, e: SendError) -> None:
        with self.sessions() as s, s.begin():
            d = s.get_one(Delivery, delivery_id)
            d.attempts += 1
            d.last_error, d.last_status = str(e)[:2000], e.status
            what: dict[str, Any] = {
                "source_aet": self.calling_aet, "dest_aet": self.dest.ae_title,
                "destination": self.name, "job_id": job_id, "study_uid": study_uid,
                "attempt": d.attempts, "reason": str(e)[:500]}
            if not e.retry or d.attempts > self.dest.max_retries:  # a dead letter
                transition(s, d, DeliveryState.DEAD, by=self.actor, audit=self.audit,
                           event=EventKind.SEND_FAILED, outcome=Outcome.SERIOUS_FAILURE,
                           state=str(DeliveryState.DEAD), **what)
            else:  # still pending: no state change, the failed attempt is audited
                delay = min(self.dest.retry_delay_seconds
                            * self.dest.retry_multiplier ** (d.attempts - 1),
                            self.dest.retry_max_delay_seconds)
                d.next_attempt_at = utcnow() + timedelta(seconds=delay)
                self.audit.record(EventKind.SEND_FAILED, Outcome.MINOR_FAILURE, session=s,
                                  state=str(d.state), **what)
        log.warning("job %d → %s: %s (%s)", job_id, self.name, e,
                    "dead letter" if not e.retry else "will retry")


class Sender:
    """All destination workers."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 audit: AuditLog) -> None:
        self.workers = {name: DestinationWorker(name, dest, settings, sessions, audit)
                        for name, dest in settings.destinations.items()}

    def wake(self) -> None:
        for w in self.workers.values():
            w.wake.set()

    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
