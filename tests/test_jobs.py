"""Job, delivery and notification states: the legal moves, who made them (audit), and the
executor's plain functions (claim with a lease, expire, recover, record an outcome, cancel,
retry) against a real database — SQLite and PostgreSQL — without a node running."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.audit import AuditLog, EventKind, verify_chain
from dicomnode.config import Settings
from dicomnode.database import make_engine, make_sessionmaker, upgrade
from dicomnode.run import jobs
from dicomnode.run.jobs import JobOutcome
from dicomnode.schema import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Notification,
    NotificationState,
    utcnow,
)
from dicomnode.state import MOVES, Actor, IllegalTransition, check_move, transition

RUNNER = Actor("runner@test")
ALICE = Actor.user("alice")


@pytest.fixture
def db(db_url: str):  # type: ignore[no-untyped-def]
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    yield sessions, AuditLog(sessions)
    engine.dispose()


def _job(s, *, state: JobState = JobState.QUEUED, attempts: int = 0, max_attempts: int = 3,
         pipeline: int = 1, send_to: tuple[str, ...] = ("pacs",)) -> Job:  # type: ignore[no-untyped-def]
    n = s.execute(select(Job.id)).all()
    job = Job(uid=f"job{len(n)}", route="r", level="study", study_uid="1.2.3", revision=1,
              series_uids="[]", pipeline=json.dumps([{"plugin": "p", "params": {}}] * pipeline),
              send_to=json.dumps(list(send_to)), state=state, attempts=attempts,
              max_attempts=max_attempts, created_at=utcnow())
    s.add(job)
    s.flush()
    return job


def _events(sessions, kind: EventKind) -> list[dict]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.event_type == kind.type_name)
                         .order_by(AuditEvent.seq)).scalars().all()
        return [{"user": r.user, **json.loads(r.detail)} for r in rows]


def test_every_state_has_its_moves_and_final_states_have_none() -> None:
    for kind, table in MOVES.items():
        enum = type(next(iter(table)))
        assert set(table) == set(enum), kind  # no state forgotten
        for to in table.values():
            assert to <= set(enum)
    assert MOVES[Job][JobState.SUCCEEDED] == frozenset()
    check_move(Job, "queued", JobState.RUNNING)  # a plain string from the table is read too
    with pytest.raises(IllegalTransition, match="job 7 is succeeded: it cannot become queued"):
        check_move(Job, JobState.SUCCEEDED, JobState.QUEUED, 7)
    with pytest.raises(IllegalTransition, match="unknown state 'weird'"):
        check_move(Delivery, "weird", DeliveryState.SENT, 1)


def test_transition_writes_state_and_audit_with_who_or_nothing(db) -> None:  # type: ignore[no-untyped-def]
    sessions, audit = db
    with sessions() as s, s.begin():
        job = _job(s)
        before = transition(s, job, JobState.CANCELLED, by=ALICE, audit=audit, why="test")
        assert before == JobState.QUEUED
    with sessions() as s, s.begin():
        job = s.get_one(Job, job.id)
        assert job.state is JobState.CANCELLED  # read back as the enum
        with pytest.raises(IllegalTransition):
            transition(s, job, JobState.RUNNING, by=ALICE, audit=audit)
        assert job.state is JobState.CANCELLED  # an illegal move changes nothing
    (event,) = _events(sessions, EventKind.JOB_STATE)
    assert event["user"] == "alice" and event["by"] == "user alice"
    assert (event["from"], event["to"], event["job_id"], event["why"]) == (
        "queued", "cancelled", job.id, "test")
    assert verify_chain(sessions).ok


def test_claim_leases_and_skips_what_pick_refuses(db) -> None:  # type: ignore[no-untyped-def]
    sessions, audit = db
    with sessions() as s, s.begin():
        first, second = _job(s), _job(s)
    with sessions() as s, s.begin():
        got = jobs.claim(s, audit, owner="w1", lease_seconds=30, by=RUNNER,
                         pick=lambda j: j.id != first.id)
    assert got is not None and got.job_id == second.id and got.attempt == 1
    with sessions() as s:
        job = s.get_one(Job, second.id)
        assert job.state is JobState.RUNNING and job.lease_owner == "w1"
        assert job.lease_expires_at is not None
        assert 25 < (job.lease_expires_at - utcnow()).total_seconds() <= 30
        assert s.get_one(Job, first.id).state is JobState.QUEUED
    with sessions() as s, s.begin():
        assert jobs.claim(s, audit, owner="w1", lease_seconds=30, by=RUNNER,
                          pick=lambda j: False) is None
    (event,) = _events(sessions, EventKind.JOB_STATE)
    assert (event["to"], event["by"], event["user"]) == ("running", "runner@test", "")


def test_expired_lease_requeues_dead_when_out_of_attempts_and_renewal_keeps(db) -> None:  # type: ignore[no-untyped-def]
    sessions, audit = db
    with sessions() as s, s.begin():
        a, b, c = _job(s), _job(s), _job(s, max_attempts=1)
    for owner in ("w1", "w2", "w3"):
        with sessions() as s, s.begin():
            assert jobs.claim(s, audit, owner=owner, lease_seconds=5, by=RUNNER) is not None
    later = utcnow() + timedelta(seconds=10)
    with sessions() as s, s.begin():
        # w2 renews in time: keeps its job; w1's and w3's leases run out
        assert jobs.renew_leases(s, owner="w2", job_ids=[b.id], lease_seconds=60) == 1
        assert jobs.renew_leases(s, owner="w2", job_ids=[a.id], lease_seconds=60) == 0
    with sessions() as s, s.begin():
        assert jobs.expire_leases(s, audit, by=RUNNER, now=later) == 2
    with sessions() as s:
        ja, jb, jc = (s.get_one(Job, x.id) for x in (a, b, c))
        assert ja.state is JobState.QUEUED and "lease of w1 expired" in ja.reason
        assert ja.lease_owner == "" and ja.attempts == 1
        assert jb.state is JobState.RUNNING and jb.lease_owner == "w2"
        assert jc.state is JobState.DEAD and "no attempts left" in jc.reason


def test_recover_takes_back_only_its_own_jobs(db) -> None:  # type: ignore[no-untyped-def]
    sessions, audit = db
    with sessions() as s, s.begin():
        mine, theirs, stopping = _job(s), _job(s), _job(s)
    for owner in ("me", "other", "me"):
        with sessions() as s, s.begin():
            jobs.claim(s, audit, owner=owner, lease_seconds=60, by=RUNNER)
    with sessions() as s, s.begin():
        jobs.request_cancel(s, audit, s.get_one(Job, stopping.id), ALICE)
    with sessions() as s, s.begin():
        assert jobs.recover(s, audit, owner="me", by=RUNNER) == 2
    with sessions() as s:
        assert s.get_one(Job, mine.id).state is JobState.QUEUED
        assert s.get_one(Job, theirs.id).state is JobState.RUNNING  # its lease still holds
        # an admin had asked to stop it: it ends cancelled, not queued again
        assert s.get_one(Job, stopping.id).state is JobState.CANCELLED


def _write_step(out: Path, step: int, results: list[str], critical: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs.step_record(out, step).write_text(json.dumps(
        {"plugin": "p", "results": results, "summary": "ok", "critical": critical}))


def test_record_outcome_delivers_steps_and_retries_until_dead(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, audit = db
    settings = Settings()
    with sessions() as s, s.begin():
        job = _job(s, pipeline=2, send_to=("pacs", "archive"), max_attempts=2)
    _write_step(tmp_path, 0, ["a.dcm"])  # step 0 done, step 1 crashed
    delivered: set[int] = set()
    for attempt, expected in ((1, JobState.QUEUED), (2, JobState.DEAD)):
        with sessions() as s, s.begin():
            assert jobs.claim(s, audit, owner="w", lease_seconds=30, by=RUNNER) is not None
        with sessions() as s, s.begin():
            handed = jobs.record_outcome(s, audit, settings, s.get_one(Job, job.id),
                                         JobOutcome.failed("boom"), tmp_path, delivered, RUNNER)
        assert handed.files == ["a.dcm"]
        assert handed.queued is (attempt == 1)  # the step's deliveries are made once
        with sessions() as s:
            assert s.get_one(Job, job.id).state is expected
    with sessions() as s:
        ds = s.execute(select(Delivery).where(Delivery.job_fk == job.id)).scalars().all()
        assert sorted((d.destination, d.step, d.state) for d in ds) == [
            ("archive", 0, DeliveryState.PENDING), ("pacs", 0, DeliveryState.PENDING)]
    finished = _events(sessions, EventKind.JOB_FINISHED)
    assert [(e["from"], e["to"], e["attempt"]) for e in finished] == [
        ("running", "queued", 1), ("running", "dead", 2)]


def test_critical_finding_queues_one_notification_per_step(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, _audit = db
    settings = Settings.model_validate({"routes": [{
        "name": "r", "match": {}, "pipeline": [{"plugin": "example-threshold"}],
        "notify": {"webhook": "http://127.0.0.1:9/hook"}}]})
    with sessions() as s, s.begin():
        job = _job(s, send_to=())
        job.state, job.started_at = JobState.RUNNING, utcnow()
    _write_step(tmp_path, 0, ["sr.dcm"], critical="p: bleed")
    for delivered in (set(), set()):  # a second caller (a re-run) queues nothing more
        with sessions() as s, s.begin():
            jobs.deliver_done_steps(s, settings, s.get_one(Job, job.id), tmp_path, delivered)
    with sessions() as s:
        (n,) = s.execute(select(Notification)).scalars().all()
        assert n.state is NotificationState.PENDING and n.channel == "webhook"
        payload = json.loads(n.payload)
        assert (payload["message"], payload["notification_id"]) == ("p: bleed", n.id)


def test_cancel_and_retry_by_a_person(db) -> None:  # type: ignore[no-untyped-def]
    sessions, audit = db
    with sessions() as s, s.begin():
        queued, running, done = _job(s), _job(s), _job(s, state=JobState.SUCCEEDED)
        running.state = JobState.RUNNING
        dead = _job(s, state=JobState.DEAD, attempts=3)
        s.add(Delivery(job_fk=dead.id, destination="pacs", state=DeliveryState.DEAD,
                       attempts=5, next_attempt_at=utcnow(), created_at=utcnow(), step=0))
    with sessions() as s, s.begin():
        assert jobs.request_cancel(s, audit, s.get_one(Job, queued.id), ALICE) == \
            JobState.CANCELLED
        assert jobs.request_cancel(s, audit, s.get_one(Job, running.id), ALICE) == \
            JobState.CANCELLING
    with sessions() as s, s.begin(), pytest.raises(IllegalTransition, match="succeeded"):
        jobs.request_cancel(s, audit, s.get_one(Job, done.id), ALICE)
    with sessions() as s, s.begin():
        assert jobs.retry(s, audit, s.get_one(Job, dead.id), ALICE) == (1, True)
    with sessions() as s:
        job = s.get_one(Job, dead.id)
        assert (job.state, job.attempts, job.reason) == (JobState.QUEUED, 0,
                                                         "retried by user alice")
        d = s.execute(select(Delivery).where(Delivery.job_fk == dead.id)).scalar_one()
        assert (d.state, d.attempts) == (DeliveryState.PENDING, 0)
    moves = _events(sessions, EventKind.JOB_STATE) + _events(sessions, EventKind.DELIVERY_STATE)
    assert {(e["from"], e["to"]) for e in moves} == {
        ("queued", "cancelled"), ("running", "cancelling"), ("dead", "queued"),
        ("dead", "pending")}
    assert all(e["user"] == "alice" for e in moves)


def test_outcome_model_refuses_states_a_job_process_cannot_report() -> None:
    with pytest.raises(ValueError):
        JobOutcome.model_validate({"state": "running"})
    assert JobOutcome.model_validate_json(
        '{"state": "succeeded", "results": ["a"], "unknown": 1}').results == ["a"]
