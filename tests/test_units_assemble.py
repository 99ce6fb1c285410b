"""The assemble stage (``dicomnode/assemble/assembler.py``) on a real SQLite index, fed by the
real store stage: the quiet period, an open association holding completion, a late instance
re-opening the study as a new revision, series-level completion, and a restart (a completion
is never emitted again; the quiet period counts from the start)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.assemble.assembler import Assembler, Completed
from dicomnode.audit import AuditLog
from dicomnode.schema import (
    Association,
    AssociationState,
    Completion,
    Series,
    Study,
    utcnow,
)
from dicomnode.simulate import write_ct_series
from dicomnode.store.files import FileStore
from dicomnode.store.service import InstanceStore, Received
from tests.helpers import split_part10
from tests.unit_db import audit_events, migrated_sqlite

QUIET = 30.0  # seconds; every "now" below is given explicitly, nothing sleeps
LONG_AGO = utcnow() - timedelta(days=1)  # a node started long before the test's instances


@dataclass
class Stages:
    sessions: sessionmaker[Session]
    audit: AuditLog
    store: InstanceStore
    lock: threading.Lock
    tmp: Path

    def assembler(self, level: str = "study", started_at: datetime = LONG_AGO) -> Assembler:
        return Assembler(self.sessions, self.audit, quiet_seconds=QUIET, level=level,
                         index_lock=self.lock, started_at=started_at)

    def receive(self, files: list[Path], association_id: int | None = None) -> None:
        """Hand files to the store stage as the receive stage would (not streamed)."""
        for path in files:
            ts, data = split_part10(path)
            raw = path.read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            result = self.store.store(Received(
                meta=raw[: len(raw) - len(data)], dataset=data, transfer_syntax=ts,
                sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                association_id=association_id, calling_aet="CT1", peer_host="127.0.0.1"))
            assert result.outcome == "stored", result

    def series(self, study_uid: str, n: int = 3) -> list[Path]:
        """A new CT series of ``n`` small slices in ``study_uid``."""
        return write_ct_series(self.tmp / generate_uid(), n=n, size=16, study_uid=study_uid)

    def last_received(self, study_uid: str) -> datetime:
        with self.sessions() as s:
            return s.execute(select(Study.last_received_at).where(
                Study.study_uid == study_uid)).scalar_one()

    def completions(self) -> list[tuple[str, str, str | None, int, int]]:
        with self.sessions() as s:
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(Completion.level, Completion.study_uid, Completion.series_uid,
                       Completion.revision, Completion.num_instances)
                .order_by(Completion.id)).all()]


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[Stages]:
    engine, sessions = migrated_sqlite(tmp_path)
    audit = AuditLog(sessions)
    lock = threading.Lock()
    store = InstanceStore(FileStore(tmp_path / "store", min_free_mb=0), sessions, audit,
                          "keep-first", lock, workers=2)
    yield Stages(sessions, audit, store, lock, tmp_path)
    store.close()
    engine.dispose()


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_study_completes_once_after_the_quiet_period(stages: Stages) -> None:
    study = generate_uid()
    files = stages.series(study, n=3)
    stages.receive(files)
    assembler = stages.assembler()
    last = stages.last_received(study)
    assert assembler.run_once(last + timedelta(seconds=QUIET - 1)) == []  # still quiet-counting
    assert stages.completions() == []
    done = assembler.run_once(last + timedelta(seconds=QUIET + 1))
    assert done == [Completed("series", study, _series_uid(files), 1, 3),
                    Completed("study", study, None, 1, 3)]
    # level study: only the study's completion goes to the router, audited once
    assert stages.completions() == [("study", study, None, 1, 3)]
    [(outcome, detail)] = audit_events(stages.sessions, "study-completed")
    assert outcome == 0 and detail["study_uid"] == study and detail["instances"] == 3
    assert audit_events(stages.sessions, "series-completed") == []
    assert assembler.run_once(last + timedelta(hours=1)) == []  # never twice
    assert stages.completions() == [("study", study, None, 1, 3)]


def test_an_open_association_holds_completion(stages: Stages) -> None:
    study = generate_uid()
    with stages.sessions() as s, s.begin():
        assoc = Association(calling_aet="CT1", called_aet="DICOMNODE", peer_host="127.0.0.1",
                            peer_port=4000, state="open", started_at=utcnow())
        s.add(assoc)
        s.flush()
        assoc_id = assoc.id
    stages.receive(stages.series(study, n=2), association_id=assoc_id)
    other = generate_uid()  # sent without the association: not held
    stages.receive(stages.series(other, n=1))
    assembler = stages.assembler()
    later = stages.last_received(study) + timedelta(hours=1)
    assert [(c.level, c.study_uid) for c in assembler.run_once(later)] == [
        ("series", other), ("study", other)]
    assert assembler.run_once(later) == []  # the sender may still send more of `study`
    with stages.sessions() as s:
        assert s.execute(select(Study.state).where(Study.study_uid == study)).scalar_one() == (
            "receiving")
    with stages.sessions() as s, s.begin():
        s.get_one(Association, assoc_id).state = AssociationState.RELEASED
    assert [(c.level, c.study_uid, c.num_instances) for c in assembler.run_once(later)] == [
        ("series", study, 2), ("study", study, 2)]
    assert stages.completions() == [("study", other, None, 1, 1), ("study", study, None, 1, 2)]


def test_a_late_instance_reopens_the_study_as_the_next_revision(stages: Stages) -> None:
    study = generate_uid()
    first = stages.series(study, n=3)
    stages.receive(first[:2])
    assembler = stages.assembler()
    assert len(assembler.run_once(stages.last_received(study) + timedelta(hours=1))) == 2
    stages.receive(first[2:])  # late: the same series, after its study completed
    with stages.sessions() as s:
        assert s.execute(select(Study.state, Study.revision).where(
            Study.study_uid == study)).one() == ("receiving", 2)
        assert s.execute(select(Series.state, Series.revision).where(
            Series.series_uid == _series_uid(first))).one() == ("receiving", 2)
    last = stages.last_received(study)
    assert assembler.run_once(last + timedelta(seconds=QUIET - 1)) == []
    done = assembler.run_once(last + timedelta(seconds=QUIET + 1))
    assert done == [Completed("series", study, _series_uid(first), 2, 3),
                    Completed("study", study, None, 2, 3)]
    assert stages.completions() == [("study", study, None, 1, 2), ("study", study, None, 2, 3)]
    assert [d["revision"] for _, d in audit_events(stages.sessions, "study-completed")] == [1, 2]


def test_series_level_emits_one_completion_per_series(stages: Stages) -> None:
    study = generate_uid()
    a, b = stages.series(study, n=2), stages.series(study, n=3)
    stages.receive(a + b)
    assembler = stages.assembler(level="series")
    done = assembler.run_once(stages.last_received(study) + timedelta(hours=1))
    assert sorted((c.level, c.series_uid, c.num_instances) for c in done) == sorted([
        ("series", _series_uid(a), 2), ("series", _series_uid(b), 3), ("study", None, 5)])
    assert sorted(stages.completions()) == sorted([
        ("series", study, _series_uid(a), 1, 2), ("series", study, _series_uid(b), 1, 3)])
    assert sorted(d["series_uid"] for _, d in audit_events(
        stages.sessions, "series-completed")) == sorted([_series_uid(a), _series_uid(b)])
    assert audit_events(stages.sessions, "study-completed") == []


def test_after_a_restart_completions_survive_and_the_quiet_period_counts_from_the_start(
        stages: Stages) -> None:
    done_before, pending = generate_uid(), generate_uid()
    stages.receive(stages.series(done_before, n=2))
    before = stages.assembler()
    assert len(before.run_once(stages.last_received(done_before) + timedelta(hours=1))) == 2
    stages.receive(stages.series(pending, n=2))  # then the node stops before it is quiet
    restarted_at = stages.last_received(pending) + timedelta(hours=2)
    after = stages.assembler(started_at=restarted_at)  # a new node on the same index
    # long quiet, but a sender cut off by the restart gets one quiet period to reconnect
    assert after.run_once(restarted_at + timedelta(seconds=QUIET - 1)) == []
    done = after.run_once(restarted_at + timedelta(seconds=QUIET + 1))
    assert [(c.level, c.study_uid, c.revision) for c in done] == [
        ("series", pending, 1), ("study", pending, 1)]
    # the study completed before the restart is not emitted again
    assert stages.completions() == [("study", done_before, None, 1, 2),
                                    ("study", pending, None, 1, 2)]
    assert after.run_once(restarted_at + timedelta(hours=1)) == []
