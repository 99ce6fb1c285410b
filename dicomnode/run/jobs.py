"""The job executor's steps as plain functions, and the :class:`Runner` seam.

Claiming a job (``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, with a lease that expires),
recording its outcome and handing its results to the senders are functions of a session and
plain values, with no process, thread or machine assumed: the embedded runner
(:mod:`dicomnode.run.runner`) calls them from its thread, and a Celery task will call the same
ones on another machine. Executing the pipeline itself is
:func:`dicomnode.run.execute.run_job`. Every state change goes through
:func:`dicomnode.state.transition`, so each one is legal and audited with who made it.

Leases: a runner claims a job for ``lease_seconds`` under its ``owner`` name and renews the
lease while the job runs (:func:`renew_leases`). A running job whose lease expired (its
worker died, or lost the database) is queued again by any runner (:func:`expire_leases`); a
restarted embedded runner takes back its own jobs at once (:func:`recover`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import NotifyConfig, Settings
from dicomnode.review.index import index_step
from dicomnode.schema import (
    Completion,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Notification,
    NotificationState,
    Study,
    utcnow,
)
from dicomnode.state import Actor, IllegalTransition, transition

log = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "IllegalTransition",
    "JobOutcome",
    "Runner",
    "claim",
    "deliver_done_steps",
    "expire_leases",
    "queue_notification",
    "read_step",
    "record_outcome",
    "recover",
    "renew_leases",
    "request_cancel",
    "retry",
    "step_record",
]


class Runner(Protocol):
    """What the node asks of a runner (embedded process pool, Celery): all job state is in
    SQL, so any number of runners on any number of machines can serve one database."""

    def submit(self, job_id: int) -> None:
        """The job row exists and is queued: run it when a slot is free."""

    def recover(self) -> int:
        """At start: queue again the jobs this runner's earlier life left running, and any
        whose lease expired. Returns how many."""

    def cancel(self, job_id: int) -> None:
        """The job was asked to stop (state ``cancelling``, see :func:`request_cancel`):
        stop it if it runs here."""

    def start(self) -> None: ...

    def stop(self, grace_seconds: float = 10.0) -> None: ...


class JobOutcome(BaseModel):
    """What running a job's pipeline came to: written by the job process (``outcome.json``),
    read and recorded by :func:`record_outcome`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: Literal[JobState.SUCCEEDED, JobState.FAILED, JobState.NOT_APPLICABLE,
                   JobState.CANCELLED]
    retry: bool = False  # a failure worth another attempt (crash, timeout), not a refusal
    reason: str = ""
    results: list[str] | None = None  # every result file, when it succeeded
    summary: str = ""
    critical: str = ""
    timings: dict[str, float] = Field(default_factory=dict)
    traceback: str = ""

    @classmethod
    def failed(cls, reason: str, *, retry: bool = True) -> JobOutcome:
        return cls(state=JobState.FAILED, retry=retry, reason=reason)


@dataclass(frozen=True)
class Claim:
    """A job a runner now holds: what it needs to start the job's process."""

    job_id: int
    uid: str
    pipeline: list[dict[str, Any]]
    attempt: int


# -- step records: a job process says a step is done by leaving one -------------------------

def step_record(out_dir: Path, step: int) -> Path:
    """Where a finished step's record is: its result files, summary and critical finding."""
    return out_dir / f"step{step}.json"


def read_step(path: Path) -> dict[str, Any] | None:
    """A step record, or None when there is none (or a crash left it unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("results"), list) \
        else None


# -- claiming and leases ------------------------------------------------------------------

def claim(s: Session, audit: AuditLog, *, owner: str, lease_seconds: float,
          pick: Callable[[Job], bool] = lambda job: True, by: Actor) -> Claim | None:
    """Take the oldest queued job that ``pick`` accepts (e.g. it needs a GPU and one is free),
    in the caller's transaction: running, attempt + 1, leased to ``owner``. Rows other
    runners are claiming are skipped, not waited for (PostgreSQL ``SKIP LOCKED``; SQLite has
    one writer at a time anyway)."""
    candidates = s.execute(select(Job).where(Job.state == JobState.QUEUED).order_by(Job.id)
                           .limit(20).with_for_update(skip_locked=True)).scalars().all()
    job = next((c for c in candidates if pick(c)), None)
    if job is None:
        return None
    now = utcnow()
    job.attempts += 1
    job.started_at = now
    job.lease_owner = owner[:128]
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    transition(s, job, JobState.RUNNING, by=by, audit=audit, attempt=job.attempts,
               route=job.route, study_uid=job.study_uid)
    return Claim(job.id, job.uid, json.loads(job.pipeline), job.attempts)


def renew_leases(s: Session, *, owner: str, job_ids: Iterable[int],
                 lease_seconds: float) -> int:
    """Extend the leases ``owner`` holds on these jobs (not audited: nothing changes state).
    Returns how many it still holds; a job missing from the count was taken from it."""
    ids = list(job_ids)
    if not ids:
        return 0
    until = utcnow() + timedelta(seconds=lease_seconds)
    held = s.execute(select(Job).where(Job.id.in_(ids), Job.lease_owner == owner[:128],
                                       Job.state.in_([JobState.RUNNING, JobState.CANCELLING]))
                     ).scalars().all()
    for job in held:
        job.lease_expires_at = until
    return len(held)


def _release(s: Session, audit: AuditLog, job: Job, reason: str, by: Actor) -> None:
    """A job whose runner is gone: queued again (its attempt counted), cancelled if an admin
    had asked, dead if it has used its attempts."""
    job.lease_owner, job.lease_expires_at = "", None
    if job.state == JobState.CANCELLING:
        job.finished_at = utcnow()
        job.reason = "cancelled by admin"
        transition(s, job, JobState.CANCELLED, by=by, audit=audit, reason=reason)
        _cancel_pending_deliveries(s, audit, job, by)
    elif job.attempts >= job.max_attempts:
        job.finished_at = utcnow()
        job.reason = f"{reason}; no attempts left"
        transition(s, job, JobState.DEAD, by=by, audit=audit, outcome=Outcome.SERIOUS_FAILURE,
                   reason=job.reason)
    else:
        job.reason = reason
        transition(s, job, JobState.QUEUED, by=by, audit=audit, outcome=Outcome.MINOR_FAILURE,
                   reason=reason)


def recover(s: Session, audit: AuditLog, *, owner: str, by: Actor) -> int:
    """Jobs ``owner`` held when its process ended (a crash, SIGKILL, power loss): queued
    again at once, without waiting for their leases to expire. Returns how many."""
    jobs = s.execute(select(Job).where(Job.state.in_([JobState.RUNNING, JobState.CANCELLING]),
                                       Job.lease_owner.in_([owner[:128], ""]))
                     .with_for_update()).scalars().all()
    for job in jobs:
        _release(s, audit, job, "node restarted while running", by)
    return len(jobs)


def expire_leases(s: Session, audit: AuditLog, *, by: Actor,
                  now: datetime | None = None) -> int:
    """Running jobs whose lease has expired: their runner is gone; queue them again.
    Returns how many."""
    now = now or utcnow()
    jobs = s.execute(select(Job).where(Job.state.in_([JobState.RUNNING, JobState.CANCELLING]),
                                       Job.lease_expires_at < now)
                     .with_for_update(skip_locked=True)).scalars().all()
    for job in jobs:
        _release(s, audit, job, f"lease of {job.lease_owner or 'its runner'} expired", by)
    return len(jobs)


# -- what people ask for -------------------------------------------------------------------

def request_cancel(s: Session, audit: AuditLog, job: Job, by: Actor) -> JobState:
    """An admin's cancel: a queued job never runs (cancelled now); a running one becomes
    ``cancelling`` and its runner stops it (then cancelled, nothing more sent). Raises
    :class:`IllegalTransition` for a job that already ended. Returns the new state."""
    if job.state == JobState.QUEUED:
        job.reason, job.finished_at = "cancelled by admin", utcnow()
        transition(s, job, JobState.CANCELLED, by=by, audit=audit)
    else:
        transition(s, job, JobState.CANCELLING, by=by, audit=audit)
    return job.state


def retry(s: Session, audit: AuditLog, job: Job, by: Actor) -> tuple[int, bool]:
    """An admin's retry: the job's dead deliveries are sent again, and a failed or dead job
    runs again with fresh attempts. Returns (deliveries re-queued, job re-queued)."""
    dead = s.execute(select(Delivery).where(Delivery.job_fk == job.id,
                                            Delivery.state == DeliveryState.DEAD)
                     ).scalars().all()
    for d in dead:
        d.attempts, d.next_attempt_at, d.last_error = 0, utcnow(), ""
        transition(s, d, DeliveryState.PENDING, by=by, audit=audit, job_id=job.id,
                   destination=d.destination, step=d.step)
    requeued = job.state in (JobState.FAILED, JobState.DEAD)
    if requeued:
        job.attempts, job.reason = 0, f"retried by {by}"
        transition(s, job, JobState.QUEUED, by=by, audit=audit)
    return len(dead), requeued


# -- results to the senders ---------------------------------------------------------------

def queue_notification(s: Session, cfg: NotifyConfig, job_fk: int, route: str,
                       payload: dict[str, Any], completed_at: datetime | None,
                       step: int = -1) -> int:
    """Add the pending notification rows of one critical finding (in the caller's
    transaction: the one that queues the step's results). Returns how many channels."""
    now = utcnow()
    channels = ([("webhook", cfg.webhook)] if cfg.webhook else []) + (
        [("command", json.dumps(cfg.command))] if cfg.command else [])
    for channel, target in channels:
        row = Notification(job_fk=job_fk, step=step, route=route, channel=channel,
                           target=target, payload="", state=NotificationState.PENDING,
                           attempts=0, max_attempts=cfg.attempts,
                           timeout_seconds=cfg.timeout_seconds, next_attempt_at=now,
                           last_error="", study_completed_at=completed_at, created_at=now)
        s.add(row)
        s.flush()
        row.payload = json.dumps({**payload, "notification_id": row.id})
    return len(channels)


def _notify_critical(s: Session, settings: Settings, job: Job, message: str, step: int,
                     results: int) -> bool:
    """Queue the route's notification of a critical finding; False when the route has none."""
    route = next((rc for rc in settings.routes if rc.name == job.route), None)
    if route is None or route.notify is None:
        log.warning("job %s: critical finding but route %r has no notify: %s", job.uid,
                    job.route, message)
        return False
    study = s.scalars(select(Study).where(Study.study_uid == job.study_uid)).first()
    completion = s.get(Completion, job.completion_fk) if job.completion_fk else None
    completed_at = completion.completed_at if completion else None
    payload = {"event": "critical-finding", "message": message, "job_uid": job.uid,
               "route": job.route, "study_uid": job.study_uid,
               "accession_number": study.accession_number if study else "",
               "patient_id": study.patient.patient_id if study else "",
               "study_completed_at": completed_at.isoformat() if completed_at else None,
               "step": step, "results": results}
    return queue_notification(s, route.notify, job.id, job.route, payload, completed_at,
                              step) > 0


@dataclass
class Handed:
    """What :func:`deliver_done_steps` did: result files of every recorded step, and whether
    it queued deliveries or notifications (so the caller wakes the senders/notifier)."""

    files: list[str]
    queued: bool = False
    notified: bool = False
    findings: int = 0  # findings indexed for review (dicomnode/review/index.py)


def deliver_done_steps(s: Session, settings: Settings, job: Job, out_dir: Path,
                       delivered: set[int]) -> Handed:
    """Deliveries (one per destination) for every step the job process recorded as done that
    has none yet, and the notification of a critical finding the step made (once: none is
    queued for a step that has one), and the findings of the step's SRs indexed for review
    (:func:`dicomnode.review.index.index_step`, same transaction). ``delivered`` (steps already
    handled by this caller) is updated; the unique keys (job, destination, step) and (SR,
    tracking UID) make a second caller — a re-delivery, a retried job — harmless."""
    handed = Handed([])
    for step in range(len(json.loads(job.pipeline))):
        record = read_step(step_record(out_dir, step))
        if record is None:
            continue
        handed.files += record["results"]
        if step in delivered:
            continue
        have = set(s.execute(select(Delivery.destination).where(
            Delivery.job_fk == job.id, Delivery.step == step)).scalars())
        for dest in json.loads(job.send_to):
            if dest not in have:
                s.add(Delivery(job_fk=job.id, destination=dest, state=DeliveryState.PENDING,
                               attempts=0, next_attempt_at=utcnow(), created_at=utcnow(),
                               step=step, results=json.dumps(record["results"])))
                handed.queued = True
        if record.get("critical") and s.execute(select(Notification.id).where(
                Notification.job_fk == job.id, Notification.step == step)).first() is None:
            handed.notified |= _notify_critical(s, settings, job, str(record["critical"]),
                                                step, len(record["results"]))
        handed.findings += index_step(s, job, step, record)
        delivered.add(step)
        log.info("job %d: step %d done, %d result(s) queued for sending", job.id, step,
                 len(record["results"]))
    return handed


def _cancel_pending_deliveries(s: Session, audit: AuditLog, job: Job, by: Actor) -> None:
    """Nothing more of a cancelled job is sent: deliveries still waiting wait no more."""
    for d in s.execute(select(Delivery).where(Delivery.job_fk == job.id,
                                              Delivery.state == DeliveryState.PENDING)
                       ).scalars():
        transition(s, d, DeliveryState.CANCELLED, by=by, audit=audit, job_id=job.id,
                   destination=d.destination, step=d.step)


def _final_state(job: Job, outcome: JobOutcome) -> JobState:
    if outcome.state != JobState.FAILED:
        return outcome.state
    if outcome.retry and job.attempts < job.max_attempts:
        # retried on a later pass, unless an admin asked to stop it meanwhile
        return JobState.CANCELLED if job.state == JobState.CANCELLING else JobState.QUEUED
    return JobState.DEAD if outcome.retry else JobState.FAILED


def record_outcome(s: Session, audit: AuditLog, settings: Settings, job: Job,
                   outcome: JobOutcome, out_dir: Path, delivered: set[int],
                   by: Actor) -> Handed:
    """Record how a job ended, in the caller's transaction: every step recorded as done is
    delivered (even when a later step failed), then the job moves to its final state (or is
    queued again for a retry) and the move is audited as ``job-finished``."""
    job.finished_at = utcnow()
    job.reason = outcome.reason[:4000]
    job.lease_owner, job.lease_expires_at = "", None
    if outcome.state == JobState.CANCELLED:
        handed = Handed([])
        _cancel_pending_deliveries(s, audit, job, by)
    else:
        handed = deliver_done_steps(s, settings, job, out_dir, delivered)
        job.results = json.dumps(outcome.results if outcome.state == JobState.SUCCEEDED
                                 and outcome.results is not None else handed.files)
    if outcome.state == JobState.SUCCEEDED:
        job.summary = outcome.summary[:4000]
    to = _final_state(job, outcome)
    took = (job.finished_at - job.started_at).total_seconds() if job.started_at else 0
    result = (Outcome.SUCCESS if to in (JobState.SUCCEEDED, JobState.NOT_APPLICABLE,
                                        JobState.CANCELLED)
              else Outcome.MINOR_FAILURE if to == JobState.QUEUED else Outcome.SERIOUS_FAILURE)
    transition(s, job, to, by=by, audit=audit, event=EventKind.JOB_FINISHED, outcome=result,
               job_uid=job.uid, route=job.route, study_uid=job.study_uid, state=str(to),
               attempt=job.attempts, seconds=round(took, 3), reason=job.reason[:500],
               results=len(json.loads(job.results)), summary=job.summary[:500],
               timings=outcome.timings)
    return handed
