"""The embedded runner: jobs from SQL, each in its own spawned process, with a timeout.

The interface the rest of the node uses is ``submit(job_id)``: a Celery runner (several machines)
will implement the same, and nothing here assumes one process (all state is in SQL; the
runner process is only the one writer of job state transitions). After a crash, jobs left
``running`` are queued again; a job's deliveries are created in the same transaction as its
success, so each finished job's results are sent once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import Settings
from dicomnode.notify import enqueue
from dicomnode.plugin import GPU
from dicomnode.run.execute import child_main, spare_main
from dicomnode.run.registry import discover
from dicomnode.schema import Completion, Delivery, Job, Study, utcnow

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job_id: int
    uid: str
    process: Any
    outcome: Path
    deadline: float
    gpu: int | None = None


class EmbeddedRunner:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 audit: AuditLog, on_success: Callable[[], None] | None = None,
                 on_notify: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._on_success = on_success or (lambda: None)
        self._on_notify = on_notify or (lambda: None)
        self._notified = False
        self.sessions = sessions
        self.audit = audit
        self._ctx = multiprocessing.get_context("spawn")  # CUDA and threads are not fork-safe
        self._running: dict[int, _Running] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._settings_json = settings.model_dump_json()
        self._spares: list[tuple[Any, Any]] = []  # (process, parent end of its pipe)

    # -- interface -------------------------------------------------------------------------
    def submit(self, job_id: int) -> None:
        """The job row exists and is queued; run it when a slot is free."""
        self._wake.set()

    def recover(self) -> int:
        """Jobs a crash left running are queued again (their attempt is counted)."""
        with self.sessions() as s, s.begin():
            n = s.execute(update(Job).where(Job.state == "running")
                          .values(state="queued", reason="node restarted while running")
                          ).rowcount  # type: ignore[attr-defined]
        return int(n)

    # -- loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        self._thread.start()

    def stop(self, grace_seconds: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_seconds + 5)
        for process, conn in self._spares:  # idle: closing the pipe ends them
            conn.close()
            process.join(2)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._spares.clear()
        for r in list(self._running.values()):  # left running: requeued at next start
            r.process.terminate()
            r.process.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._claim()
                self._keep_spares()
            except Exception:
                log.exception("runner pass failed; retrying")
            self._wake.wait(self.settings.runner.poll_seconds)
            self._wake.clear()

    def _needs(self, pipeline: list[dict[str, Any]]) -> tuple[float, GPU]:
        """(timeout, GPU need) of a pipeline: timeouts add up, the strongest GPU need wins."""
        plugins = discover()
        total, gpu = 0.0, GPU.NO
        order = [GPU.NO, GPU.PREFERRED, GPU.REQUIRED]
        for step in pipeline:
            info = plugins.get(step["plugin"])
            needs = info.cls.needs if info and info.cls else None
            total += needs.timeout_seconds if needs else 600.0
            if needs and order.index(needs.gpu) > order.index(gpu):
                gpu = needs.gpu
        return total + 30.0, gpu  # + process start and packaging

    def _free_gpu(self) -> int | None:
        used = {r.gpu for r in self._running.values() if r.gpu is not None}
        return next((k for k in range(self.settings.runner.gpu_slots) if k not in used), None)

    def _claim(self) -> None:
        while len(self._running) < self.settings.runner.processes:
            with self.sessions() as s, s.begin():
                candidates = s.execute(select(Job).where(Job.state == "queued")
                                       .order_by(Job.id).limit(20)
                                       .with_for_update(skip_locked=True)).scalars().all()
                job, gpu_index, timeout = None, None, 0.0
                for cand in candidates:
                    timeout, need = self._needs(json.loads(cand.pipeline))
                    gpu_index = self._free_gpu() if need != GPU.NO else None
                    if need == GPU.REQUIRED and gpu_index is None:
                        continue  # waits for a GPU slot; CPU jobs behind it may go first
                    job = cand
                    break
                if job is None:
                    return
                job.state = "running"
                job.attempts += 1
                job.started_at = utcnow()
                job_id, uid = job.id, job.uid
            outcome = self.settings.storage.path / "results" / uid / "outcome.json"
            outcome.parent.mkdir(parents=True, exist_ok=True)
            outcome.unlink(missing_ok=True)
            p = self._warm_process(job_id, outcome, gpu_index)
            if p is None:
                p = self._ctx.Process(target=child_main, name=f"job-{job_id}",
                                      args=(self._settings_json, job_id, str(outcome),
                                            gpu_index))
                p.start()
            self._running[job_id] = _Running(job_id, uid, p, outcome,
                                             time.monotonic() + timeout, gpu_index)
            # reap it the moment it exits, not at the next poll
            threading.Thread(target=self._wake_on_exit, args=(p,), name=f"job-{job_id}-exit",
                             daemon=True).start()
            log.info("job %d started (pid %d%s)", job_id, p.pid,
                     f", GPU slot {gpu_index}" if gpu_index is not None else "")

    def _wake_on_exit(self, process: Any) -> None:
        # waits on the exit sentinel without reaping: _reap (the runner thread) joins it
        multiprocessing.connection.wait([process.sentinel])
        self._wake.set()

    def _keep_spares(self) -> None:
        """Keep ``runner.warm_spares`` job processes started, imports done, waiting.

        New spares are started only while no job runs: their imports (~2 s of CPU) would
        otherwise compete with the job that just took the last spare (bench/e2e: reformat
        2.2 s with a spare starting beside it, vs about 1 s alone on 2 cores)."""
        alive = []
        for p, conn in self._spares:
            if p.is_alive():
                alive.append((p, conn))
            else:  # a spare that died idle (killed, out of memory): replaced below
                conn.close()
                p.join(5)
        self._spares = alive
        if self._running:
            return
        while len(self._spares) < self.settings.runner.warm_spares and not self._stop.is_set():
            parent, child = self._ctx.Pipe()
            p = self._ctx.Process(target=spare_main, name="job-spare",
                                  args=(self._settings_json, child))
            p.start()
            child.close()
            self._spares.append((p, parent))

    def _warm_process(self, job_id: int, outcome: Path, gpu_index: int | None) -> Any:
        """Hand the job to a warm spare; None when there is none alive."""
        while self._spares:
            p, conn = self._spares.pop(0)
            try:
                if p.is_alive():
                    conn.send((job_id, str(outcome), gpu_index))
                    conn.close()
                    return p
            except OSError:  # died between the check and the send
                pass
            conn.close()
            p.join(5)
        return None

    def _cancelled(self) -> set[int]:
        if not self._running:
            return set()
        with self.sessions() as s:
            return set(s.execute(select(Job.id).where(Job.id.in_(list(self._running)),
                                                      Job.state == "cancelling")).scalars())

    def _reap(self) -> None:
        for job_id in self._cancelled():
            r = self._running[job_id]
            r.process.terminate()
            r.process.join(5)
            if r.process.is_alive():
                r.process.kill()
                r.process.join(5)
            self._finish(r, {"state": "cancelled", "reason": "cancelled by admin"})
        for r in list(self._running.values()):
            if r.process.is_alive():
                if time.monotonic() > r.deadline:
                    r.process.terminate()
                    r.process.join(5)
                    if r.process.is_alive():
                        r.process.kill()
                        r.process.join(5)
                    self._finish(r, {"state": "failed", "retry": True,
                                     "reason": "timed out (plugin needs.timeout_seconds)"})
                continue
            r.process.join()
            try:
                outcome = json.loads(r.outcome.read_text())
            except (OSError, ValueError):
                outcome = {"state": "failed", "retry": True,
                           "reason": f"job process died (exit code {r.process.exitcode})"}
            self._finish(r, outcome)

    def _notify(self, s: Session, job: Job, message: str) -> None:
        """Queue the route's notification of a critical finding (in the job's transaction)."""
        route = next((rc for rc in self.settings.routes if rc.name == job.route), None)
        if route is None or route.notify is None:
            log.warning("job %s: critical finding but route %r has no notify: %s", job.uid,
                        job.route, message)
            return
        study = s.scalars(select(Study).where(Study.study_uid == job.study_uid)).first()
        completion = s.get(Completion, job.completion_fk) if job.completion_fk else None
        completed_at = completion.completed_at if completion else None
        payload = {"event": "critical-finding", "message": message, "job_uid": job.uid,
                   "route": job.route, "study_uid": job.study_uid,
                   "accession_number": study.accession_number if study else "",
                   "patient_id": study.patient.patient_id if study else "",
                   "study_completed_at": completed_at.isoformat() if completed_at else None,
                   "results": len(json.loads(job.results))}
        if enqueue(s, route.notify, job.id, job.route, payload, completed_at):
            self._notified = True

    def _finish(self, r: _Running, outcome: dict[str, Any]) -> None:
        del self._running[r.job_id]
        state = outcome["state"]
        with self.sessions() as s, s.begin():
            job = s.get_one(Job, r.job_id)
            job.finished_at = utcnow()
            job.reason = str(outcome.get("reason", ""))[:4000]
            if state == "succeeded":
                job.state = "succeeded"
                job.results = json.dumps(outcome.get("results", []))
                job.summary = str(outcome.get("summary", ""))[:4000]
                for dest in json.loads(job.send_to):
                    s.add(Delivery(job_fk=job.id, destination=dest, state="pending",
                                   attempts=0, next_attempt_at=utcnow(), created_at=utcnow()))
            elif state in ("not-applicable", "cancelled"):
                job.state = state
            elif outcome.get("retry") and job.attempts < job.max_attempts:
                job.state = "queued"  # retried on the next pass
            else:
                job.state = "dead" if outcome.get("retry") else "failed"
            took = (job.finished_at - job.started_at).total_seconds() if job.started_at else 0
            self.audit.record(
                EventKind.JOB_FINISHED,
                Outcome.SUCCESS if job.state in ("succeeded", "not-applicable", "cancelled")
                else Outcome.MINOR_FAILURE if job.state == "queued" else Outcome.SERIOUS_FAILURE,
                session=s, job_id=job.id, job_uid=job.uid, route=job.route,
                study_uid=job.study_uid, state=job.state, attempt=job.attempts,
                seconds=round(took, 3), reason=job.reason[:500],
                results=len(json.loads(job.results)), summary=job.summary[:500],
                timings=outcome.get("timings", {}))
            if state == "succeeded" and outcome.get("critical"):
                self._notify(s, job, str(outcome["critical"]))
        log.info("job %d %s%s", r.job_id, state,
                 f": {outcome.get('reason')}" if outcome.get("reason") else "")
        if state == "succeeded":
            self._on_success()
        if self._notified:
            self._notified = False
            self._on_notify()
        self._wake.set()
