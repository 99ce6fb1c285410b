"""The store stage: one received instance in, one DICOM status out.

validate (structure, UIDs, SOP class) → dedup by SOP Instance UID → stage the file durably →
index it in SQL → publish the file → success. Every refusal gets a specific status, an
ErrorComment a human can act on, and an audit event.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from enum import IntEnum

from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.schema import Association, Instance, Patient, Series, Study, utcnow
from dicomnode.store.files import DiskFull, FileStore, Staged
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
    ) -> None:
        self.files = files
        self.sessions = sessions
        self.audit = audit
        self.duplicate_policy = duplicate_policy
        # Serialises index transactions in this process: no lock waits inside SQLite, and no
        # get-or-create races on patient/study/series rows.
        # (shared with the assembler, which flips the same rows to 'complete')
        self._index_lock = index_lock or threading.Lock()

    # ------------------------------------------------------------------------------------
    def store(self, rx: Received) -> StoreResult:
        try:
            attrs = self._validate(rx)
            return self._store_valid(rx, attrs)
        except _Refusal as r:
            return self._refuse(rx, r.status, r.reason, r.attrs)
        except DiskFull as e:
            return self._refuse(rx, Status.OUT_OF_RESOURCES, f"disk: {e.strerror}")
        except Exception as e:  # index down, I/O error: never crash the association
            log.exception("storing %s failed", rx.sop_instance_uid)
            return self._refuse(rx, Status.OUT_OF_RESOURCES, f"internal error: {e}"[:200])

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

    def _existing(self, sop_uid: str) -> tuple[int, str, str] | None:
        with self.sessions() as s:
            row = s.execute(
                select(Instance.id, Instance.sha256, Instance.path)
                .where(Instance.sop_instance_uid == sop_uid)
            ).first()
        return None if row is None else (row[0], row[1], row[2])

    def _store_valid(self, rx: Received, attrs: IndexAttributes) -> StoreResult:
        existing = self._existing(attrs.sop_instance_uid)
        if existing is not None:
            digest = hashlib.sha256(rx.dataset).hexdigest()
            if digest == existing[1]:
                self._touch(attrs)
                return self._ok(rx, attrs, "duplicate", "identical instance already stored")
            if self.duplicate_policy == "reject":
                raise _Refusal(Status.DUPLICATE_REFUSED,
                               "SOP Instance UID already stored with other content", attrs)
            if self.duplicate_policy == "keep-first":
                self._audit_conflict(rx, attrs, "kept the first copy")
                return self._ok(rx, attrs, "kept-first",
                                "other content under an existing SOP Instance UID: kept first")

        staged = self.files.stage(rx.meta, rx.dataset)
        try:
            with self._index_lock, self.sessions() as s, s.begin():
                if existing is not None:  # policy: replace
                    self._replace(s, existing[0], attrs, staged)
                else:
                    self._index(s, rx, attrs, staged)
        except IntegrityError:
            # another association indexed the same SOP Instance UID a moment ago
            self.files.discard(staged)
            return self._store_valid(rx, attrs)
        except BaseException:
            self.files.discard(staged)
            raise
        self.files.publish(staged)
        if existing is not None:
            self.files.remove(existing[2])
            self._audit_conflict(rx, attrs, "replaced the stored copy")
            return self._ok(rx, attrs, "replaced", "", staged.size)
        return self._ok(rx, attrs, "stored", "", staged.size)

    # ------------------------------------------------------------------------------------
    def _index(self, s: Session, rx: Received, attrs: IndexAttributes, staged: Staged) -> None:
        now = utcnow()
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
        # FOR UPDATE (PostgreSQL): the assembler may be completing this study right now
        study = s.execute(select(Study).where(Study.study_uid == attrs.study_uid)
                          .with_for_update()).scalar_one_or_none()
        if study is None:
            study = Study(study_uid=attrs.study_uid, patient_fk=patient.id,
                          study_date=attrs.study_date, study_time=attrs.study_time,
                          accession_number=attrs.accession_number, study_id=attrs.study_id,
                          study_description=attrs.study_description,
                          referring_physician=attrs.referring_physician, state="receiving",
                          revision=1, num_instances=0, first_received_at=now,
                          last_received_at=now)
            s.add(study)
            s.flush()
        elif study.state == "complete":
            # A late instance: keep it, and open a new revision of the study.
            study.state = "receiving"
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
                            state="receiving", revision=1, num_instances=0, last_received_at=now)
            s.add(series)
            s.flush()
        elif series.state == "complete":
            series.state = "receiving"
            series.revision += 1
            series.completed_at = None
        study.num_instances += 1
        study.last_received_at = now
        series.num_instances += 1
        series.last_received_at = now
        s.add(Instance(sop_instance_uid=attrs.sop_instance_uid, sop_class_uid=rx.sop_class_uid,
                       series_fk=series.id, study_fk=study.id,
                       instance_number=attrs.instance_number,
                       transfer_syntax_uid=rx.transfer_syntax, size=staged.size,
                       sha256=staged.sha256, path=staged.rel_path,
                       study_revision=study.revision, association_fk=rx.association_id,
                       received_at=now))
        if rx.association_id is not None:
            s.execute(update(Association).where(Association.id == rx.association_id).values(
                instances_received=Association.instances_received + 1,
                bytes_received=Association.bytes_received + staged.size))
        s.flush()

    def _touch(self, attrs: IndexAttributes) -> None:
        """A re-sent instance is activity: a study still receiving must not complete under a
        sender that is re-sending it. A complete study is not re-opened (nothing new arrived)."""
        now = utcnow()
        with self._index_lock, self.sessions() as s, s.begin():
            s.execute(update(Study).where(Study.study_uid == attrs.study_uid,
                                          Study.state == "receiving")
                      .values(last_received_at=now))
            s.execute(update(Series).where(Series.series_uid == attrs.series_uid,
                                           Series.state == "receiving")
                      .values(last_received_at=now))

    def _replace(self, s: Session, instance_id: int, attrs: IndexAttributes,
                 staged: Staged) -> None:
        inst = s.get_one(Instance, instance_id)
        now = utcnow()
        inst.path, inst.sha256, inst.size, inst.received_at = (
            staged.rel_path, staged.sha256, staged.size, now)
        study = s.get_one(Study, inst.study_fk)
        series = s.get_one(Series, inst.series_fk)
        for row in (study, series):
            if row.state == "complete":  # new content: consumers must see a new revision
                row.state = "receiving"
                row.revision += 1
                row.completed_at = None
            row.last_received_at = now
        inst.study_revision = study.revision

    # ------------------------------------------------------------------------------------
    def _ok(self, rx: Received, attrs: IndexAttributes, outcome: str, reason: str,
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

    # ------------------------------------------------------------------------------------
    def sweep(self) -> tuple[int, int]:
        """Start-up recovery of tmp/ (see :mod:`dicomnode.store.files`)."""
        def indexed(name: str) -> str | None:
            with self.sessions() as s:
                return s.execute(select(Instance.path).where(
                    Instance.path == f"objects/{name[:2]}/{name[2:4]}/{name}.dcm")
                ).scalar_one_or_none()
        return self.files.sweep(indexed)
