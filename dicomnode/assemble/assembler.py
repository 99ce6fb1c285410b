"""When is a study (or series) complete?

DICOM has no "end of study" message, so, like Orthanc's StableAge and MONAI Deploy's payload
timeout, completion is a heuristic: ``assemble.quiet_seconds`` with no new instance, and no open
association that has sent part of it. Late instances happen; the store stage re-opens the study
as revision+1 and it completes again (a new event), so nothing is dropped.

All state is in SQL (``state``, ``revision``, ``last_received_at``), so the "timers" survive a
restart: after a start the node waits one quiet period from the start itself, giving senders
that were cut off time to reconnect before a study is declared complete.

Each completion writes one ``completions`` row (unique per level, UID and revision, so it can
never be emitted twice) for the routing stage, and one audit event.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind
from dicomnode.database import reading
from dicomnode.runtime.periodic import Periodic
from dicomnode.schema import (
    ArrivalState,
    Association,
    AssociationState,
    Completion,
    Instance,
    Series,
    Study,
    utcnow,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    level: str
    study_uid: str
    series_uid: str | None
    revision: int
    num_instances: int


class Assembler:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        audit: AuditLog,
        *,
        quiet_seconds: float,
        level: str,
        poll_seconds: float = 0.5,
        index_lock: threading.Lock | None = None,
        started_at: datetime | None = None,
    ) -> None:
        self.sessions = sessions
        self.readers = reading(sessions)
        self.audit = audit
        self.quiet = timedelta(seconds=quiet_seconds)
        self.level = level
        self.index_lock = index_lock or threading.Lock()
        self.started_at = started_at or utcnow()
        self._periodic = Periodic("assembler", poll_seconds, self.run_once)

    # -- one pass --------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> list[Completed]:
        now = now or utcnow()
        cutoff = now - self.quiet
        if self.started_at > cutoff:
            return []
        done: list[Completed] = []
        done += self._complete(Series, cutoff, now)
        done += self._complete(Study, cutoff, now)
        return done

    def _complete(self, model: type[Study] | type[Series], cutoff: datetime,
                  now: datetime) -> list[Completed]:
        level = "study" if model is Study else "series"
        fk = Instance.study_fk if model is Study else Instance.series_fk
        sent_by_open_association = exists().where(
            Instance.association_fk == Association.id, Association.state == AssociationState.OPEN,
            fk == model.id)
        with self.readers() as s:
            due = s.execute(select(model.id).where(
                model.state == ArrivalState.RECEIVING, model.last_received_at <= cutoff,
                ~sent_by_open_association)).scalars().all()
        out: list[Completed] = []
        for row_id in due:
            with self.index_lock, self.sessions() as s, s.begin():
                n = s.execute(
                    update(model)
                    .where(model.id == row_id, model.state == ArrivalState.RECEIVING,
                           model.last_received_at <= cutoff)
                    .values(state=ArrivalState.COMPLETE, completed_at=now)
                ).rowcount  # type: ignore[attr-defined]
                if n != 1:
                    continue  # an instance arrived meanwhile
                if model is Series:
                    se = s.get_one(Series, row_id)
                    study_uid = s.execute(select(Study.study_uid).where(
                        Study.id == se.study_fk)).scalar_one()
                    c = Completed(level, study_uid, se.series_uid, se.revision,
                                  se.num_instances)
                else:
                    st = s.get_one(Study, row_id)
                    c = Completed(level, st.study_uid, None, st.revision, st.num_instances)
                if self.level == level:
                    self._emit(s, c, now)
                out.append(c)
        return out

    def _emit(self, s: Session, c: Completed, now: datetime) -> None:
        s.add(Completion(level=c.level, study_uid=c.study_uid, series_uid=c.series_uid,
                         revision=c.revision, num_instances=c.num_instances, completed_at=now))
        kind = EventKind.STUDY_COMPLETED if c.level == "study" else EventKind.SERIES_COMPLETED
        self.audit.record(kind, session=s, study_uid=c.study_uid, series_uid=c.series_uid,
                          revision=c.revision, instances=c.num_instances)
        log.info("%s %s complete (revision %d, %d instances)", c.level,
                 c.series_uid or c.study_uid, c.revision, c.num_instances)

    # -- background thread -----------------------------------------------------------------
    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
