"""The SQL state every stage shares: the contract between receive, store, assemble and later stages.

Stages never talk through globals; they read and write these tables. Changing a table means an
Alembic migration in ``db/versions`` (``dicomnode db upgrade``), tested on SQLite and PostgreSQL.

Hierarchy: patients → studies → series → instances. ``associations`` records every DICOM
association, ``completions`` is the queue of "this study/series is complete" events the routing
stage consumes, and ``audit_events`` is the append-only, hash-chained audit trail.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)  # PS3.5 UI: at most 64 characters


class UTCDateTime(TypeDecorator[datetime]):
    """Always timezone-aware UTC in Python, whatever the backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use dicomnode.schema.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- states, defined once -------------------------------------------------------------------
# Each aggregate's legal moves are in dicomnode/state (``transition``): nothing else writes them.


class JobState(StrEnum):
    """queued → running → succeeded | failed | not-applicable | dead (retries exhausted);
    running → queued (retry, lease expired); queued → cancelled; running → cancelling →
    cancelled; failed | dead → queued (an admin's retry)."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"
    CANCELLED = "cancelled"
    DEAD = "dead"


class DeliveryState(StrEnum):
    """pending → sent | dead (dead letter) | cancelled; dead → pending (an admin's retry)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    CANCELLED = "cancelled"


class NotificationState(StrEnum):
    """pending → sent | failed (after ``max_attempts``)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class AssociationState(StrEnum):
    """open → released | aborted | interrupted (the node stopped or crashed while it was
    open, or its receiver process died)."""

    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


class ArrivalState(StrEnum):
    """A study's or series' completion: receiving → complete (quiet for
    ``assemble.quiet_seconds``) → receiving (a late instance: revision + 1)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class FindingStatus(StrEnum):
    """A finding a plugin reported, as a radiologist judged it: pending → accepted | rejected |
    amended (once; each decision sends a verdict SR to PACS, dicomnode/review/verdict.py)."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    AMENDED = "amended"


S = TypeVar("S", bound=StrEnum)


class StateColumn(TypeDecorator[S], Generic[S]):
    """A state stored as its string value (no DDL change, no database enum type) and read back
    as the enum, so an unknown value in the table fails loudly instead of drifting."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum: type[S]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: S | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> S | None:
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # PatientID + IssuerOfPatientID identify a patient; names change (marriage, corrections).
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    studies: Mapped[list[Study]] = relationship(back_populates="patient")
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    # Completion state: 'receiving' until quiet for assemble.quiet_seconds, then 'complete'.
    # A late instance re-opens the study as revision+1 (never dropped).
    state: Mapped[ArrivalState] = mapped_column(StateColumn(ArrivalState),
                                                default=ArrivalState.RECEIVING, index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[str] = mapped_column(String(12), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")
    state: Mapped[ArrivalState] = mapped_column(StateColumn(ArrivalState),
                                                default=ArrivalState.RECEIVING, index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.id"
    )


class Association(Base):
    __tablename__ = "associations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    called_aet: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    # open → released | aborted | interrupted (node stopped or crashed while it was open)
    state: Mapped[AssociationState] = mapped_column(
        StateColumn(AssociationState), default=AssociationState.OPEN, index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    size: Mapped[int] = mapped_column(BigInteger)
    # '<algorithm>:<hex>' of the data set as received (store/digest.py): blake3, or sha256
    # for instances indexed before migration 0005
    digest: Mapped[str] = mapped_column(String(80))
    # Relative to storage.path; generated by the node, never from a UID.
    path: Mapped[str] = mapped_column(String(255), unique=True)
    study_revision: Mapped[int] = mapped_column(Integer, default=1)
    association_fk: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id"), nullable=True, index=True
    )
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    series: Mapped[Series] = relationship(back_populates="instances")


class Completion(Base):
    """A study (or series) became complete: the event the routing stage consumes from SQL."""

    __tablename__ = "completions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[str] = mapped_column(String(8))  # study | series
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    revision: Mapped[int] = mapped_column(Integer)
    num_instances: Mapped[int] = mapped_column(Integer)
    completed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    consumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (
        # one event per (level, study/series, revision): a restart can never emit it twice
        UniqueConstraint(
            "level", "study_uid", "series_uid", "revision", name="uq_completions_key"
        ),
        Index("ix_completions_pending", "consumed_at"),
    )


class AuditEvent(Base):
    """Append-only, hash-chained audit record (DICOM PS3.15 A.5 vocabulary).

    ``hash = sha256(prev_hash || canonical_json(content))`` where content is every other column
    but ``id``; ``seq`` is gapless, so a deleted row breaks the chain at its successor.
    """

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    ts: Mapped[str] = mapped_column(String(32), index=True)  # UTC ISO 8601, µs
    event_code: Mapped[str] = mapped_column(String(16), index=True)  # e.g. 110104
    event_name: Mapped[str] = mapped_column(String(64))  # e.g. Instances Transferred
    event_type: Mapped[str] = mapped_column(String(64), index=True)  # ours, e.g. store-refused
    action: Mapped[str] = mapped_column(String(1))  # C R U D E
    outcome: Mapped[int] = mapped_column(Integer)  # 0 success, 4 minor, 8 serious, 12 major
    source_aet: Mapped[str] = mapped_column(String(16), default="")
    source_host: Mapped[str] = mapped_column(String(64), default="")
    dest_aet: Mapped[str] = mapped_column(String(16), default="")
    user: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    __table_args__ = (
        # the console's audit page: filtered by user or event type, newest first
        Index("ix_audit_events_user_seq", "user", "seq"),
        Index("ix_audit_events_type_seq", "event_type", "seq"),
        # … by outcome (failures are rare: without it a page of them scans the table) and by
        # AE title, source or destination (migration 0009)
        Index("ix_audit_events_outcome_seq", "outcome", "seq"),
        Index("ix_audit_events_source_aet_seq", "source_aet", "seq"),
        Index("ix_audit_events_dest_aet_seq", "dest_aet", "seq"),
    )


class AuditEventStudy(Base):
    """Which audit events name which study: a search index beside the chain, not part of it.

    Filled when an event is appended (from ``study_uid`` and the keys of ``studies`` in its
    detail) and by migration 0009 for older rows. The study's trail in the console is a walk
    down ``(study_uid, seq)`` instead of a LIKE over every row's JSON. The hashed rows are
    unchanged, so :func:`dicomnode.audit.verify_chain` is unaffected; the rows here can be
    rebuilt from ``audit_events.detail`` at any time (append-only too, by trigger).
    """

    __tablename__ = "audit_event_studies"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class AuditHead(Base):
    """One row: the last seq and hash, so truncating the tail of the chain is detected too."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class Job(Base):
    """One pipeline run for one completed study/series revision and one route.

    States and moves: :class:`JobState`; retried until ``attempts`` reaches ``max_attempts``,
    then dead. ``uid`` seeds every output UID, so a re-run
    re-creates the same SOP Instance UIDs.
    """

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    route: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(8))
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    revision: Mapped[int] = mapped_column(Integer)
    series_uids: Mapped[str] = mapped_column(Text)  # JSON list: the inputs
    pipeline: Mapped[str] = mapped_column(Text)  # JSON: [{plugin, params}]
    send_to: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of destinations
    completion_fk: Mapped[int | None] = mapped_column(ForeignKey("completions.id"),
                                                      nullable=True)
    state: Mapped[JobState] = mapped_column(StateColumn(JobState), default=JobState.QUEUED,
                                            index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    reason: Mapped[str] = mapped_column(Text, default="")
    summary: Mapped[str] = mapped_column(Text, default="")
    results: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of result files
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # who runs it (a runner's ``worker_id``) and until when: a running job whose lease has
    # expired is queued again by any runner (its worker died or lost the database)
    lease_owner: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (
        # one job per route per completion: the router can never queue the same work twice
        UniqueConstraint("completion_fk", "route", name="uq_jobs_completion_route"),
    )


class Delivery(Base):
    """Sending one pipeline step's results to one destination, with its own retry schedule.

    pending → sent | (retry: pending with a later ``next_attempt_at``) | dead (dead letter) |
    cancelled (the job was cancelled before it was sent). A step's results are delivered as
    soon as that step is packaged and synced, while later steps still run; ``step`` -1 and
    ``results`` NULL: a delivery of all of the job's results (rows made before 0004).
    """

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[DeliveryState] = mapped_column(
        StateColumn(DeliveryState), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_status: Mapped[str] = mapped_column(String(64), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=-1, server_default="-1")
    results: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list of files
    # one delivery per step and destination: a re-run never sends a step twice
    __table_args__ = (UniqueConstraint("job_fk", "destination", "step",
                                       name="uq_deliveries_job_dest_step"),)


class Notification(Base):
    """A critical-finding notification on one channel (webhook or command), written in the
    job's success transaction so it survives a crash: pending → sent | failed (after
    ``attempts``). Delivered at least once; ``id`` and the job UID let a receiver de-duplicate.
    """

    __tablename__ = "notifications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    route: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))  # webhook | command
    target: Mapped[str] = mapped_column(Text)  # URL, or the command as a JSON argv list
    payload: Mapped[str] = mapped_column(Text)  # the JSON body
    state: Mapped[NotificationState] = mapped_column(
        StateColumn(NotificationState), default=NotificationState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    timeout_seconds: Mapped[float] = mapped_column(Float, default=10.0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    study_completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=-1, server_default="-1")  # which made it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Role(StrEnum):
    """What a console or API user may do (``dicomnode.web.auth.PERMISSIONS``)."""

    ADMIN = "admin"  # everything
    RADIOLOGIST = "radiologist"  # studies, AI findings and their review
    AUDITOR = "auditor"  # the audit trail: read, export, verify; nothing else


class User(Base):
    """A person who uses the console or the REST API. Passwords are argon2id hashes; an SSO
    user (OpenID Connect) has ``sso_subject`` and no password. Never deleted (audit events name
    users): disabled instead."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[Role] = mapped_column(StateColumn(Role))
    password_hash: Mapped[str] = mapped_column(String(256), default="")
    sso_subject: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    disabled: Mapped[bool] = mapped_column(default=False)
    # consecutive failed logins; at web.lockout_failures the account is locked
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebSession(Base):
    """A login: a browser session (cookie) or an API bearer token. Only a SHA-256 of the
    random token is stored, so a copy of the database logs nobody in."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # cookie | bearer
    csrf_token: Mapped[str] = mapped_column(String(64), default="")
    remote: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Finding(Base):
    """One TID 1500 measurement group of a result SR, indexed when the job step that made it
    is recorded (dicomnode/review/index.py), for radiologists to review.

    Unique per (SR SOP Instance UID, tracking UID): a re-delivered step or a retried job
    never indexes a group twice. ``priority`` 0: the step raised a critical finding (its step
    record's ``critical`` text, e.g. a hemorrhage); 1: anything else. JSON columns:
    ``measurements`` [{name, value, unit}], ``evaluations`` [{name, value}], ``location``
    [x, y, z] (LPS mm) or null, ``key_images`` [SOP Instance UID] (the SEG frames of the
    finding's segment, largest area first, or the step's KOS)."""

    __tablename__ = "findings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    step: Mapped[int] = mapped_column(Integer)
    sr_path: Mapped[str] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    tracking_uid: Mapped[str] = mapped_column(UID)
    tracking_id: Mapped[str] = mapped_column(String(64), default="")
    group_index: Mapped[int] = mapped_column(Integer)  # 0-based, in the original SR
    finding_value: Mapped[str] = mapped_column(String(64), default="")
    finding_scheme: Mapped[str] = mapped_column(String(16), default="")
    finding_meaning: Mapped[str] = mapped_column(String(128), default="")
    site: Mapped[str] = mapped_column(String(128), default="")
    laterality: Mapped[str] = mapped_column(String(64), default="")
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    measurements: Mapped[str] = mapped_column(Text, default="[]")
    evaluations: Mapped[str] = mapped_column(Text, default="[]")
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    seg_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    segment_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    location: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_images: Mapped[str] = mapped_column(Text, default="[]")
    priority: Mapped[int] = mapped_column(Integer, default=1)  # 0 critical, 1 other
    critical: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[FindingStatus] = mapped_column(
        StateColumn(FindingStatus), default=FindingStatus.PENDING, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reviewed_by: Mapped[str] = mapped_column(String(64), default="")
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (
        UniqueConstraint("sr_sop_instance_uid", "tracking_uid", name="uq_findings_sr_tracking"),
        Index("ix_findings_worklist", "status", "priority", "created_at"),
    )


class FindingReview(Base):
    """A radiologist's decision on one finding, and the verdict SR it sent to PACS. One per
    finding (unique): a second review is refused."""

    __tablename__ = "finding_reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    finding_fk: Mapped[int] = mapped_column(ForeignKey("findings.id"), unique=True)
    decision: Mapped[FindingStatus] = mapped_column(StateColumn(FindingStatus))
    comment: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(64))
    user_display: Mapped[str] = mapped_column(String(324), default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    verdict_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    verdict_path: Mapped[str] = mapped_column(Text)
