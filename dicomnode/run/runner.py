"""The embedded runner: jobs from SQL, each in its own spawned process, with a timeout.

It implements :class:`~dicomnode.run.jobs.Runner` on top of the executor's plain functions
(:mod:`dicomnode.run.jobs`: claim with a lease, record the outcome, hand results to the
senders), which a Celery task calls unchanged; nothing here assumes one process or machine
(all state is in SQL, every state change goes through :func:`dicomnode.state.transition`).
After a crash, the jobs this node held are queued again at once; another runner's jobs only
when their lease expires. Each pipeline step's results are delivered as soon as the job
process reports that step done (its record synced: see :func:`~dicomnode.run.execute.run_job`),
while later steps still run; one delivery per step and destination (a unique key), and a
re-run keeps recorded steps, so each result is sent once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog
from dicomnode.config import Settings
from dicomnode.database import reading
from dicomnode.plugin import GPU
from dicomnode.run import jobs
from dicomnode.run.execute import child_main, spare_main
from dicomnode.run.jobs import JobOutcome
from dicomnode.run.registry import discover
from dicomnode.schema import Job, JobState
from dicomnode.state import Actor

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
    progress: threading.Event = field(default_factory=threading.Event)  # set when it did
    delivered: set[int] = field(default_factory=set)  # steps whose deliveries exist


def embedded_owner(settings: Settings) -> str:
    """The lease owner name of this node's embedded runner: the same across restarts (so a
    restarted node takes back its own jobs at once), different for every node."""
    return f"embedded:{socket.gethostname()}:{settings.storage.path.resolve()}"


class EmbeddedRunner:
    """Runs jobs in spawned processes on this machine (:class:`~dicomnode.run.jobs.Runner`)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 audit: AuditLog, on_success: Callable[[], None] | None = None,
                 on_notify: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._on_success = on_success or (lambda: None)
        self._on_notify = on_notify or (lambda: None)
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
        self.owner = embedded_owner(settings)
        self.actor = Actor.system("runner")
        self._lease = settings.runner.lease_seconds
        self._renewed = 0.0  # monotonic time of the last lease renewal

    # -- interface -------------------------------------------------------------------------
    def submit(self, job_id: int) -> None:
        """The job row exists and is queued; run it when a slot is free."""
        self._wake.set()

    def recover(self) -> int:
        """Jobs this node held when it stopped (crash, SIGKILL) are queued again at once (their
        attempt is counted), and any runner's whose lease expired."""
        with self.sessions() as s, s.begin():
            n = jobs.recover(s, self.audit, owner=self.owner, by=self.actor)
            n += jobs.expire_leases(s, self.audit, by=self.actor)
        return n

    def cancel(self, job_id: int) -> None:
        """The job's state says ``cancelling``: the next pass stops it if it runs here."""
        self._wake.set()

    # -- loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        self._thread.start()

    def stop(self, grace_seconds: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_seconds + 5)
        for process, conn in self._spares:
            # idle (no job, nothing to lose): ended at once rather than waited for; a spare
            # still importing would otherwise hold the stop up to 2 s
            conn.close()
            process.terminate()
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
                self._keep_leases()
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

    def _fits(self, job: Job, chosen: dict[str, Any]) -> bool:
        """Whether a slot here can run the job now; its timeout and GPU slot into ``chosen``."""
        timeout, need = self._needs(json.loads(job.pipeline))
        gpu_index = self._free_gpu() if need != GPU.NO else None
        if need == GPU.REQUIRED and gpu_index is None:
            return False  # waits for a GPU slot; CPU jobs behind it may go first
        chosen.update(gpu=gpu_index, timeout=timeout)
        return True

    def _claim(self) -> None:
        while len(self._running) < self.settings.runner.processes:
            chosen: dict[str, Any] = {}
            with self.sessions() as s, s.begin():
                got = jobs.claim(s, self.audit, owner=self.owner, lease_seconds=self._lease,
                                 pick=partial(self._fits, chosen=chosen), by=self.actor)
            if got is None:
                return
            job_id, uid = got.job_id, got.uid
            gpu_index, timeout = chosen["gpu"], chosen["timeout"]
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
            r = _Running(job_id, uid, p, outcome, time.monotonic() + timeout, gpu_index, conn)
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

    def _keep_leases(self) -> None:
        """Renew the leases of the jobs running here (every third of a lease), and queue again
        the jobs of runners whose leases expired."""
        if time.monotonic() - self._renewed < self._lease / 3:
            return
        self._renewed = time.monotonic()
        with self.sessions() as s, s.begin():
            jobs.renew_leases(s, owner=self.owner, job_ids=list(self._running),
                              lease_seconds=self._lease)
            if jobs.expire_leases(s, self.audit, by=self.actor):
                self._wake.set()

    def _cancelled(self) -> set[int]:
        if not self._running:
            return set()
        with self.readers() as s:
            return set(s.execute(select(Job.id).where(Job.id.in_(list(self._running)),
                                                      Job.state == JobState.CANCELLING)
                                 ).scalars())

    def _kill(self, r: _Running) -> None:
        r.process.terminate()
        r.process.join(5)
        if r.process.is_alive():
            r.process.kill()
            r.process.join(5)

    def _reap(self) -> None:
        for job_id in self._cancelled():
            r = self._running[job_id]
            self._kill(r)
            self._finish(r, JobOutcome(state=JobState.CANCELLED, reason="cancelled by admin"))
        for r in list(self._running.values()):
            if r.progress.is_set():
                r.progress.clear()
                self._hand_over(r)
            if r.process.is_alive():
                if time.monotonic() > r.deadline:
                    self._kill(r)
                    self._finish(r, JobOutcome.failed(
                        "timed out (plugin needs.timeout_seconds)"))
                continue
            r.process.join()
            self._finish(r, self._read_outcome(r))

    @staticmethod
    def _read_outcome(r: _Running) -> JobOutcome:
        """The outcome the job process wrote; a failure worth a retry when it wrote none (it
        died: killed, out of memory, a crash in native code)."""
        try:
            return JobOutcome.model_validate_json(r.outcome.read_bytes())
        except (OSError, ValidationError):
            return JobOutcome.failed(f"job process died (exit code {r.process.exitcode})")

    def _hand_over(self, r: _Running) -> None:
        """Deliver the steps the job process has reported done, while later steps run."""
        with self.sessions() as s, s.begin():
            handed = jobs.deliver_done_steps(s, self.settings, s.get_one(Job, r.job_id),
                                             r.outcome.parent, r.delivered)
        self._on_success()  # wake the senders
        if handed.notified:
            self._on_notify()

    def _finish(self, r: _Running, outcome: JobOutcome) -> None:
        del self._running[r.job_id]
        with self.sessions() as s, s.begin():
            handed = jobs.record_outcome(s, self.audit, self.settings, s.get_one(Job, r.job_id),
                                         outcome, r.outcome.parent, r.delivered, self.actor)
        log.info("job %d %s%s", r.job_id, outcome.state,
                 f": {outcome.reason}" if outcome.reason else "")
        if outcome.state == JobState.SUCCEEDED or handed.queued:
            self._on_success()
        if handed.notified:
            self._on_notify()
        self._wake.set()
