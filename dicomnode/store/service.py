"""The store stage: one received instance in, one DICOM status out.

validate (structure, UIDs, SOP class) → make the file durable (it was written while it arrived:
an fsync) → one index transaction (shared with concurrent associations): dedup by SOP
Instance UID, then index (or discard the copy of a duplicate) → success. Every refusal gets a
specific status, an ErrorComment a human can act on, and an audit event.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

from pydicom.uid import UID
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.database import reading
from dicomnode.schema import (
    ArrivalState,
    Association,
    Instance,
    Patient,
    Series,
    Study,
    utcnow,
)
from dicomnode.store import digest as content
from dicomnode.store.files import DiskFull, FileStore, Staged, StreamingFile
from dicomnode.store.hotindex import GroupCommit, HotIndex
from dicomnode.store.parse import (
    IndexAttributes,
    MalformedDataset,
    check_complete,
    read_index_attributes,
)

log = logging.getLogger(__name__)


class Status(IntEnum):
    """C-STORE response statuses the node uses (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk below storage.min_free_mb, or index unavailable: retry later
    SOP_CLASS_MISMATCH = 0xA900  # dataset's SOP Class UID differs from the request's
    MALFORMED = 0xC001  # truncated or structurally invalid dataset
    MISSING_UID = 0xC002  # SOP Instance / Study / Series UID missing or not a valid UID
    SOP_INSTANCE_MISMATCH = 0xC003  # dataset's SOP Instance UID differs from the request's
    DUPLICATE_REFUSED = 0xC004  # same SOP Instance UID, other content, duplicate_policy: reject


@dataclass(frozen=True)
class Received:
    """One C-STORE request as the receive stage hands it over."""

    meta: bytes  # Part 10 file meta the receive stage built (preamble included)
    dataset: bytes | memoryview  # the dataset exactly as it arrived on the wire
    transfer_syntax: str
    sop_class_uid: str  # from the command (Affected SOP Class UID)
    sop_instance_uid: str  # from the command (Affected SOP Instance UID)
    association_id: int | None = None
    calling_aet: str = ""
    peer_host: str = ""
    # the same bytes, already written to their file (and hashed) while they arrived; meta is
    # already in the file
    stream: StreamingFile | None = None


@dataclass(frozen=True)
class StoreResult:
    status: int
    outcome: str  # stored | duplicate | kept-first | replaced | refused
    reason: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


@dataclass
class _Refusal(Exception):
    status: Status
    reason: str
    attrs: IndexAttributes | None = field(default=None)


# Hot-path statements, built once: constructing SQLAlchemy statements per call cost more than
# executing them. Executed on the session's Core connection.
_EXISTING = select(Instance.id, Instance.digest, Instance.path).where(
    Instance.sop_instance_uid == bindparam("sop"))
_STUDY = select(Study.id, Study.state, Study.revision).where(
    Study.study_uid == bindparam("uid")).with_for_update()
_SERIES = select(Series.id, Series.state).where(
    Series.series_uid == bindparam("uid")).with_for_update()
_BUMP_STUDY = update(Study).where(Study.id == bindparam("row")).values(
    num_instances=Study.num_instances + 1, last_received_at=bindparam("now"))
_BUMP_SERIES = update(Series).where(Series.id == bindparam("row")).values(
    num_instances=Series.num_instances + 1, last_received_at=bindparam("now"))
_INSERT_INSTANCE = insert(Instance)
_BUMP_ASSOCIATION = update(Association).where(Association.id == bindparam("row")).values(
    instances_received=Association.instances_received + 1,
    bytes_received=Association.bytes_received + bindparam("size"))


def _valid_uid(value: str) -> bool:
    return bool(value) and UID(value).is_valid


class InstanceStore:
    """Stores instances durably and indexes them. Thread-safe (one per node process)."""

    def __init__(
        self,
        files: FileStore,
        sessions: sessionmaker[Session],
        audit: AuditLog,
        duplicate_policy: str = "keep-first",
        index_lock: threading.Lock | None = None,
        workers: int = 10,
    ) -> None:
        self.files = files
        self.sessions = sessions
        self.readers = reading(sessions)
        self.audit = audit
        self.duplicate_policy = duplicate_policy
        # Serialises index transactions in this process: no lock waits inside SQLite, and no
        # get-or-create races on patient/study/series rows.
        # (shared with the assembler, which flips the same rows to 'complete')
        self._index_lock = index_lock or threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage")
        self._hot = HotIndex(sessions.kw["bind"])
        self._group = GroupCommit(self._hot, self._index_lock)

    # ------------------------------------------------------------------------------------
    def store(self, rx: Received) -> StoreResult:
        if rx.stream is not None:
            return self._store_streamed(rx, rx.stream)
        # Not streamed (the receive stage could not open a file as it arrived): the file is
        # written and fsynced on a pool thread while this one hashes and checks the dataset
        # (both release the GIL). An invalid or duplicate instance's file is simply discarded.
        staging = self._pool.submit(self.files.stage, rx.meta, rx.dataset)
        try:
            digest = content.of(rx.dataset)
            attrs = self._validate(rx)
            staged = staging.result()
        except BaseException as e:
            self._discard_when_done(staging)
            return self._refused_or_failed(rx, e)
        return self._index_or_discard(rx, attrs, staged, digest)

    def _store_streamed(self, rx: Received, stream: StreamingFile) -> StoreResult:
        """The common case: the data set was written to its file (and hashed) while it
        arrived. Check it, then fsync on this thread: handing the fsync to a pool thread to
        overlap the ~0.1 ms check cost three thread switches, more than it saved (bench: ~37 →
        ~29 context switches per instance with four senders, node CPU the same or lower), and
        a refused instance is now removed without being fsynced first."""
        try:
            digest = content.label(stream.hasher)
            attrs = self._validate(rx)
        except BaseException as e:
            stream.abort()
            return self._refused_or_failed(rx, e)
        try:
            staged = stream.finish()
            if staged.size != len(rx.meta) + len(rx.dataset):
                self.files.discard(staged)  # cannot happen unless the receive stage is broken
                raise OSError(f"streamed file holds {staged.size} bytes, expected "
                              f"{len(rx.meta) + len(rx.dataset)}")
        except BaseException as e:
            return self._failed(rx, e)
        return self._index_or_discard(rx, attrs, staged, digest)

    def _index_or_discard(self, rx: Received, attrs: IndexAttributes, staged: Staged,
                          digest: str) -> StoreResult:
        try:
            return self._index_staged(rx, attrs, staged, digest)
        except Exception as e:
            self.files.discard(staged)
            return self._failed(rx, e)

    def _refused_or_failed(self, rx: Received, e: BaseException) -> StoreResult:
        if isinstance(e, _Refusal):
            return self._refuse(rx, e.status, e.reason, e.attrs)
        return self._failed(rx, e)

    def _failed(self, rx: Received, e: BaseException) -> StoreResult:
        if isinstance(e, DiskFull):
            return self._refuse(rx, Status.OUT_OF_RESOURCES, f"disk: {e.strerror}")
        if not isinstance(e, Exception):
            raise e  # KeyboardInterrupt and friends
        # index down, I/O error: never crash the association; the sender may retry later
        log.error("storing %s failed: %s", rx.sop_instance_uid, e, exc_info=e)
        return self._refuse(rx, Status.OUT_OF_RESOURCES, f"internal error: {e}"[:200])

    def _discard_when_done(self, staging: Future[Staged]) -> None:
        # if staging itself failed there is nothing on disk to remove
        with contextlib.suppress(BaseException):
            self.files.discard(staging.result())

    def _validate(self, rx: Received) -> IndexAttributes:
        try:
            plain = check_complete(rx.dataset, rx.transfer_syntax)
            attrs = read_index_attributes(plain)
        except MalformedDataset as e:
            raise _Refusal(Status.MALFORMED, str(e)) from None
        for name, value in (("SOP Instance UID", attrs.sop_instance_uid),
                            ("Study Instance UID", attrs.study_uid),
                            ("Series Instance UID", attrs.series_uid)):
            if not _valid_uid(value):
                raise _Refusal(Status.MISSING_UID, f"{name} missing or invalid: {value!r}", attrs)
        if attrs.sop_class_uid and attrs.sop_class_uid != rx.sop_class_uid:
            raise _Refusal(Status.SOP_CLASS_MISMATCH,
                           f"dataset SOP Class {attrs.sop_class_uid} != request "
                           f"{rx.sop_class_uid}", attrs)
        if attrs.sop_instance_uid != rx.sop_instance_uid:
            raise _Refusal(Status.SOP_INSTANCE_MISMATCH,
                           f"dataset SOP Instance {attrs.sop_instance_uid} != request "
                           f"{rx.sop_instance_uid}", attrs)
        return attrs

    def _index_staged(self, rx: Received, attrs: IndexAttributes, staged: Staged,
                      digest: str) -> StoreResult:
        """One transaction decides: new, identical duplicate, or conflicting duplicate."""
        if self._index_hot(rx, attrs, staged, digest):
            return self._ok(attrs, "stored", "", staged.size)
        try:
            with self._index_lock, self.sessions() as s, s.begin():
                existing = s.connection().execute(
                    _EXISTING, {"sop": attrs.sop_instance_uid}).first()
                if existing is None:
                    self._index(s, rx, attrs, staged, digest)
                    outcome = "stored"
                elif content.same(existing.digest, rx.dataset, digest):
                    self._touch(s, attrs)
                    outcome = "duplicate"
                elif self.duplicate_policy == "replace":
                    self._replace(s, existing.id, staged, digest)
                    outcome = "replaced"
                else:
                    outcome = self.duplicate_policy  # keep-first | reject
        except IntegrityError:
            # another association indexed the same SOP Instance UID a moment ago
            return self._index_staged(rx, attrs, staged, digest)
        if outcome not in ("stored", "replaced"):
            self.files.discard(staged)
        if outcome == "stored":
            return self._ok(attrs, outcome, "", staged.size)
        if outcome == "duplicate":
            return self._ok(attrs, outcome, "identical instance already stored")
        if outcome == "reject":
            return self._refuse(rx, Status.DUPLICATE_REFUSED,
                                "SOP Instance UID already stored with other content", attrs)
        if outcome == "replaced":
            assert existing is not None
            self.files.remove(existing.path)
            self._audit_conflict(rx, attrs, "replaced the stored copy")
            return self._ok(attrs, outcome, "", staged.size)
        self._audit_conflict(rx, attrs, "kept the first copy")
        return self._ok(attrs, "kept-first",
                        "other content under an existing SOP Instance UID: kept first")

    def _index_hot(self, rx: Received, attrs: IndexAttributes, staged: Staged,
                   digest: str) -> bool:
        """The common case (a new instance of a study and series still receiving) on the bare
        driver; False: nothing written, take the ORM path."""
        return bool(self._group.index(
            sop_instance_uid=attrs.sop_instance_uid, sop_class_uid=rx.sop_class_uid,
            study_uid=attrs.study_uid, series_uid=attrs.series_uid,
            instance_number=attrs.instance_number, transfer_syntax_uid=rx.transfer_syntax,
            size=staged.size, digest=digest, path=staged.rel_path,
            association_fk=rx.association_id, now=utcnow()))

    # ------------------------------------------------------------------------------------
    def _index(self, s: Session, rx: Received, attrs: IndexAttributes, staged: Staged,
               digest: str) -> None:
        """Index one new instance. Hot path (study and series known and still receiving): four
        indexed statements in SQL Core; otherwise :meth:`_open_rows` creates or re-opens rows."""
        now = utcnow()
        c = s.connection()
        # FOR UPDATE (PostgreSQL): the assembler may be completing this study right now
        study = c.execute(_STUDY, {"uid": attrs.study_uid}).first()
        series = c.execute(_SERIES, {"uid": attrs.series_uid}).first() if study else None
        if (study is not None and series is not None and study.state == ArrivalState.RECEIVING
                and series.state == ArrivalState.RECEIVING):
            study_id, series_id, revision = study.id, series.id, study.revision
            c.execute(_BUMP_STUDY, {"row": study_id, "now": now})
            c.execute(_BUMP_SERIES, {"row": series_id, "now": now})
        else:
            study_id, series_id, revision = self._open_rows(s, attrs, now)
        c.execute(_INSERT_INSTANCE, {
            "sop_instance_uid": attrs.sop_instance_uid, "sop_class_uid": rx.sop_class_uid,
            "series_fk": series_id, "study_fk": study_id,
            "instance_number": attrs.instance_number, "transfer_syntax_uid": rx.transfer_syntax,
            "size": staged.size, "digest": digest, "path": staged.rel_path,
            "study_revision": revision, "association_fk": rx.association_id, "received_at": now})
        if rx.association_id is not None:
            c.execute(_BUMP_ASSOCIATION, {"row": rx.association_id, "size": staged.size})

    def _open_rows(self, s: Session, attrs: IndexAttributes, now: datetime
                   ) -> tuple[int, int, int]:
        """Create patient/study/series rows as needed, or re-open a complete study or series as
        a new revision (a late instance is kept, never dropped). Returns (study, series, rev)."""
        patient = s.execute(
            select(Patient).where(Patient.patient_id == attrs.patient_id,
                                  Patient.issuer == attrs.issuer)
        ).scalar_one_or_none()
        if patient is None:
            patient = Patient(patient_id=attrs.patient_id, issuer=attrs.issuer,
                              patient_name=attrs.patient_name, birth_date=attrs.birth_date,
                              sex=attrs.sex)
            s.add(patient)
            s.flush()
        study = s.execute(select(Study).where(Study.study_uid == attrs.study_uid)
                          .with_for_update()).scalar_one_or_none()
        if study is None:
            study = Study(study_uid=attrs.study_uid, patient_fk=patient.id,
                          study_date=attrs.study_date, study_time=attrs.study_time,
                          accession_number=attrs.accession_number, study_id=attrs.study_id,
                          study_description=attrs.study_description,
                          referring_physician=attrs.referring_physician,
                          state=ArrivalState.RECEIVING,
                          revision=1, num_instances=0, first_received_at=now,
                          last_received_at=now)
            s.add(study)
            s.flush()
        elif study.state == ArrivalState.COMPLETE:
            study.state = ArrivalState.RECEIVING
            study.revision += 1
            study.completed_at = None
        series = s.execute(select(Series).where(Series.series_uid == attrs.series_uid)
                           .with_for_update()).scalar_one_or_none()
        if series is None:
            series = Series(series_uid=attrs.series_uid, study_fk=study.id,
                            modality=attrs.modality, series_number=attrs.series_number,
                            series_description=attrs.series_description,
                            body_part=attrs.body_part,
                            frame_of_reference_uid=attrs.frame_of_reference_uid,
                            state=ArrivalState.RECEIVING, revision=1, num_instances=0,
                            last_received_at=now)
            s.add(series)
            s.flush()
        elif series.state == ArrivalState.COMPLETE:
            series.state = ArrivalState.RECEIVING
            series.revision += 1
            series.completed_at = None
        study.num_instances += 1
        study.last_received_at = now
        series.num_instances += 1
        series.last_received_at = now
        s.flush()
        return study.id, series.id, study.revision

    def _touch(self, s: Session, attrs: IndexAttributes) -> None:
        """A re-sent instance is activity: a study still receiving must not complete under a
        sender that is re-sending it. A complete study is not re-opened (nothing new arrived)."""
        now = utcnow()
        s.execute(update(Study).where(Study.study_uid == attrs.study_uid,
                                      Study.state == ArrivalState.RECEIVING)
                  .values(last_received_at=now))
        s.execute(update(Series).where(Series.series_uid == attrs.series_uid,
                                       Series.state == ArrivalState.RECEIVING)
                  .values(last_received_at=now))

    def _replace(self, s: Session, instance_id: int, staged: Staged, digest: str) -> None:
        inst = s.get_one(Instance, instance_id)
        now = utcnow()
        inst.path, inst.digest, inst.size, inst.received_at = (
            staged.rel_path, digest, staged.size, now)
        study = s.get_one(Study, inst.study_fk)
        series = s.get_one(Series, inst.series_fk)
        for row in (study, series):
            if row.state == ArrivalState.COMPLETE:  # new content: consumers see a new revision
                row.state = ArrivalState.RECEIVING
                row.revision += 1
                row.completed_at = None
            row.last_received_at = now
        inst.study_revision = study.revision

    # ------------------------------------------------------------------------------------
    def _ok(self, attrs: IndexAttributes, outcome: str, reason: str,
            size: int = 0) -> StoreResult:
        return StoreResult(Status.SUCCESS, outcome, reason, attrs.sop_instance_uid,
                           attrs.study_uid, attrs.series_uid, size)

    def _audit_conflict(self, rx: Received, attrs: IndexAttributes, what: str) -> None:
        self.audit.record(EventKind.DUPLICATE_CONFLICT, Outcome.MINOR_FAILURE,
                          source_aet=rx.calling_aet, source_host=rx.peer_host,
                          sop_instance_uid=attrs.sop_instance_uid, study_uid=attrs.study_uid,
                          policy=self.duplicate_policy, action=what,
                          association_id=rx.association_id)

    def _refuse(self, rx: Received, status: Status, reason: str,
                attrs: IndexAttributes | None = None) -> StoreResult:
        log.warning("refused %s from %s: 0x%04X %s", rx.sop_instance_uid, rx.calling_aet,
                    status, reason)
        try:
            if rx.association_id is not None:
                with self.sessions() as s, s.begin():
                    s.execute(update(Association).where(Association.id == rx.association_id)
                              .values(instances_failed=Association.instances_failed + 1))
            self.audit.record(
                EventKind.STORE_REFUSED,
                Outcome.SERIOUS_FAILURE if status >= 0xC000 else Outcome.MINOR_FAILURE,
                source_aet=rx.calling_aet, source_host=rx.peer_host,
                status=f"0x{status:04X}", reason=reason, sop_class_uid=rx.sop_class_uid,
                sop_instance_uid=rx.sop_instance_uid,
                study_uid=attrs.study_uid if attrs else "", association_id=rx.association_id)
        except Exception:  # the audit store itself is down: still answer the peer
            log.exception("could not audit a refusal")
        return StoreResult(status, "refused", reason, rx.sop_instance_uid,
                           attrs.study_uid if attrs else "", attrs.series_uid if attrs else "")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._index_lock:
            self._hot.close()

    # ------------------------------------------------------------------------------------
    def sweep(self) -> tuple[int, int]:
        """Start-up recovery of unindexed files (see :mod:`dicomnode.store.files`)."""
        def indexed(rel_path: str) -> str | None:
            with self.readers() as s:
                return s.execute(select(Instance.path).where(Instance.path == rel_path)
                                 ).scalar_one_or_none()

        def indexed_under(prefix: str) -> set[str]:
            with self.readers() as s:
                return set(s.execute(select(Instance.path).where(
                    Instance.path.startswith(prefix, autoescape=True))).scalars())
        return self.files.sweep(indexed, indexed_under)
