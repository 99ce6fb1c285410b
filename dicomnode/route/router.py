"""Consume completion events: match routes, queue jobs, audit the decision.

One transaction per completion: its jobs are inserted and the completion marked consumed
together, and ``jobs`` is unique per (completion, route), so a crash or a second router can
never queue the same work twice. A completion that matches nothing is audited as such.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.database import reading
from dicomnode.route.rules import Rule, select_series
from dicomnode.runtime.periodic import Periodic
from dicomnode.schema import (
    Association,
    Completion,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    utcnow,
)

log = logging.getLogger(__name__)


def series_attributes(sessions: sessionmaker[Session], storage: Path, study_uid: str,
                      series_uid: str | None) -> list[dict[str, Any]]:
    """Per series: the header of its first instance (keyword → value) + CallingAETitle."""
    with sessions() as s:
        q = (select(Series.series_uid, Instance.path, Association.calling_aet)
             .join(Study, Series.study_fk == Study.id)
             .join(Instance, Instance.series_fk == Series.id)
             .outerjoin(Association, Instance.association_fk == Association.id)
             .where(Study.study_uid == study_uid).order_by(Series.id, Instance.id))
        if series_uid is not None:
            q = q.where(Series.series_uid == series_uid)
        rows = s.execute(q).all()
    seen: dict[str, dict[str, Any]] = {}
    for uid, path, calling in rows:
        if uid in seen:
            continue
        ds = pydicom.dcmread(storage / path, stop_before_pixels=True)
        attrs: dict[str, Any] = {e.keyword: e.value for e in ds if e.keyword and e.VR != "SQ"}
        attrs["CallingAETitle"] = calling or ""
        attrs["SeriesInstanceUID"] = uid
        seen[uid] = attrs
    return list(seen.values())


class Router:
    def __init__(self, sessions: sessionmaker[Session], audit: AuditLog, rules: list[Rule],
                 storage: Path, max_attempts: int = 3, poll_seconds: float = 0.5,
                 submit: Callable[[int], None] | None = None) -> None:
        self.sessions = sessions
        self.readers = reading(sessions)
        self.audit = audit
        self.rules = rules
        self.storage = storage
        self.max_attempts = max_attempts
        self.submit = submit or (lambda _job_id: None)
        self._periodic = Periodic("router", poll_seconds, self.run_once)

    def run_once(self) -> int:
        with self.readers() as s:
            pending = s.execute(select(Completion).where(Completion.consumed_at.is_(None))
                                .order_by(Completion.id).limit(100)).scalars().all()
        for c in pending:
            self._route(c)
        return len(pending)

    def _route(self, c: Completion) -> None:
        series = series_attributes(self.readers, self.storage, c.study_uid, c.series_uid)
        matched: list[tuple[Rule, list[str]]] = []
        for rule in self.rules:
            if rule.level != c.level:
                continue
            picked = select_series(rule, series)
            if picked:
                matched.append((rule, [series[i]["SeriesInstanceUID"] for i in picked]))
        job_ids: list[int] = []
        with self.sessions() as s, s.begin():
            n = s.execute(update(Completion).where(Completion.id == c.id,
                                                   Completion.consumed_at.is_(None))
                          .values(consumed_at=utcnow())).rowcount  # type: ignore[attr-defined]
            if n != 1:
                return  # someone else routed it
            for rule, uids in matched:
                job = Job(uid=uuid.uuid4().hex, route=rule.name, level=c.level,
                          study_uid=c.study_uid, revision=c.revision,
                          series_uids=json.dumps(uids),
                          pipeline=json.dumps([{"plugin": st.plugin,
                                                "params": st.params.model_dump(mode="json")}
                                               for st in rule.steps]),
                          send_to=json.dumps(list(rule.send_to)), completion_fk=c.id,
                          state=JobState.QUEUED, attempts=0, max_attempts=self.max_attempts,
                          created_at=utcnow())
                s.add(job)
                s.flush()
                job_ids.append(job.id)
            if matched:
                self.audit.record(EventKind.ROUTE_MATCHED, session=s, study_uid=c.study_uid,
                                  series_uid=c.series_uid, revision=c.revision,
                                  routes=[r.name for r, _ in matched], jobs=job_ids)
            else:
                self.audit.record(EventKind.NO_ROUTE, Outcome.SUCCESS, session=s,
                                  study_uid=c.study_uid, series_uid=c.series_uid,
                                  revision=c.revision,
                                  modalities=sorted({str(a.get("Modality", "")) for a in series}))
        for job_id in job_ids:
            self.submit(job_id)
        log.info("%s %s rev %d: %s", c.level, c.series_uid or c.study_uid, c.revision,
                 ", ".join(f"{r.name} → job {j}" for (r, _), j in zip(matched, job_ids,
                                                                      strict=True))
                 or "no route matched")

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
