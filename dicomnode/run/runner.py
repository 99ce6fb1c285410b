"""The embedded runner: jobs from SQL, each in its own spawned process, with a timeout.

The interface the rest of the node uses is ``submit(job_id)``: a Celery runner (several machines)
will implement the same, and nothing here assumes one process (all state is in SQL; the
runner process is only the one writer of job state transitions). After a crash, jobs left
``running`` are queued again. Each pipeline step's results are delivered as soon as the job
process reports that step done (its record synced: see :func:`~dicomnode.run.execute.run_job`),
while later steps still run; one delivery per step and destination (a unique key), and a
re-run keeps recorded steps, so each result is sent once.
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
from dicomnode.database import reading
from dicomnode.plugin import GPU
from dicomnode.run.execute import child_main, read_step, spare_main, step_record
from dicomnode.run.registry import discover
from dicomnode.schema import Completion, Delivery, Job, Notification, Study, utcnow
from dicomnode.send.notify import enqueue

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job_id: int
    uid: str
    process: Any
    outcome: Path
    deadline: float
    gpu: int | None = None
    conn: Any = None  # the job process reports finished steps here
    progress: threading.Event | None = None  # set when it did
    delivered: set[int] | None = None  # steps whose deliveries exist


class EmbeddedRunner:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 audit: AuditLog, on_success: Callable[[], None] | None = None,
                 on_notify: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._on_success = on_success or (lambda: None)
        self._on_notify = on_notify or (lambda: None)
        self._notified = False
        self.sessions = sessions
        self.readers = reading(sessions)
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
            warm = self._warm_process(job_id, outcome, gpu_index)
            if warm is not None:
                p, conn = warm
            else:
                conn, child = self._ctx.Pipe(duplex=False)
                p = self._ctx.Process(target=child_main, name=f"job-{job_id}",
                                      args=(self._settings_json, job_id, str(outcome),
                                            gpu_index, child))
                p.start()
                child.close()
            r = _Running(job_id, uid, p, outcome, time.monotonic() + timeout, gpu_index,
                         conn, threading.Event(), set())
            self._running[job_id] = r
            # reap it the moment it exits, deliver a step the moment it is done
            threading.Thread(target=self._watch, args=(r,), name=f"job-{job_id}-watch",
                             daemon=True).start()
            log.info("job %d started (pid %d%s)", job_id, p.pid,
                     f", GPU slot {gpu_index}" if gpu_index is not None else "")

    def _watch(self, r: _Running) -> None:
        """Wake the runner when the job process reports a step done, and when it exits (waits
        on the exit sentinel without reaping: _reap, on the runner thread, joins it)."""
        conn: Any = r.conn
        waiting = [r.process.sentinel, conn]
        while r.process.sentinel in waiting:
            for ready in multiprocessing.connection.wait(waiting):
                if ready == r.process.sentinel:
                    waiting.remove(ready)
                    continue
                try:
                    conn.recv()
                    assert r.progress is not None
                    r.progress.set()
                except (EOFError, OSError):
                    waiting.remove(conn)
            self._wake.set()
        conn.close()

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

    def _warm_process(self, job_id: int, outcome: Path,
                      gpu_index: int | None) -> tuple[Any, Any] | None:
        """Hand the job to a warm spare: (process, its pipe); None when there is none alive."""
        while self._spares:
            p, conn = self._spares.pop(0)
            try:
                if p.is_alive():
                    conn.send((job_id, str(outcome), gpu_index))
                    return p, conn
            except OSError:  # died between the check and the send
                pass
            conn.close()
            p.join(5)
        return None

    def _cancelled(self) -> set[int]:
        if not self._running:
            return set()
        with self.readers() as s:
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
            if r.progress is not None and r.progress.is_set():
                r.progress.clear()
                with self.sessions() as s, s.begin():
                    self._deliver_steps(s, s.get_one(Job, r.job_id), r)
                self._on_success()  # wake the senders
                if self._notified:
                    self._notified = False
                    self._on_notify()
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

    def _notify(self, s: Session, job: Job, message: str, step: int, results: int) -> None:
        """Queue the route's notification of a critical finding, in the transaction that
        queues the results of the step that made it (so before they can reach a PACS)."""
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
                   "step": step, "results": results}
        if enqueue(s, route.notify, job.id, job.route, payload, completed_at, step):
            self._notified = True

    def _deliver_steps(self, s: Session, job: Job, r: _Running) -> list[str]:
        """Deliveries (one per destination) for every step the job process has recorded as
        done and that has none yet, and the notification of a critical finding the step made
        (once: none is queued for a step that has one); returns the result files of all
        recorded steps."""
        out_dir = r.outcome.parent
        delivered = r.delivered if r.delivered is not None else set()
        files: list[str] = []
        for step in range(len(json.loads(job.pipeline))):
            record = read_step(step_record(out_dir, step))
            if record is None:
                continue
            files += record["results"]
            if step in delivered:
                continue
            have = set(s.execute(select(Delivery.destination).where(
                Delivery.job_fk == job.id, Delivery.step == step)).scalars())
            for dest in json.loads(job.send_to):
                if dest not in have:
                    s.add(Delivery(job_fk=job.id, destination=dest, state="pending",
                                   attempts=0, next_attempt_at=utcnow(), created_at=utcnow(),
                                   step=step, results=json.dumps(record["results"])))
            if record.get("critical") and s.execute(select(Notification.id).where(
                    Notification.job_fk == job.id, Notification.step == step)).first() is None:
                self._notify(s, job, str(record["critical"]), step, len(record["results"]))
            delivered.add(step)
            log.info("job %d: step %d done, %d result(s) queued for sending", job.id, step,
                     len(record["results"]))
        return files

    def _finish(self, r: _Running, outcome: dict[str, Any]) -> None:
        del self._running[r.job_id]
        state = outcome["state"]
        with self.sessions() as s, s.begin():
            job = s.get_one(Job, r.job_id)
            job.finished_at = utcnow()
            job.reason = str(outcome.get("reason", ""))[:4000]
            if state == "cancelled":
                # nothing more is sent: deliveries of steps done before the cancel wait no more
                s.execute(update(Delivery).where(Delivery.job_fk == job.id,
                                                 Delivery.state == "pending")
                          .values(state="cancelled"))
            else:
                # every step recorded as done is delivered, even when a later one failed
                sent = self._deliver_steps(s, job, r)
                job.results = json.dumps(outcome.get("results", sent)
                                         if state == "succeeded" else sent)
            if state == "succeeded":
                job.state = "succeeded"
                job.summary = str(outcome.get("summary", ""))[:4000]
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
        log.info("job %d %s%s", r.job_id, state,
                 f": {outcome.get('reason')}" if outcome.get("reason") else "")
        if state == "succeeded":
            self._on_success()
        if self._notified:
            self._notified = False
            self._on_notify()
        self._wake.set()
