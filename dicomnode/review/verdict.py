"""A radiologist's verdict on an AI finding, sent back to PACS as a verified SR.

:func:`review_finding` does it all in the caller's transaction: checks the decision and that
the finding is still pending, builds the verdict SR from the finding's SR, writes it durably
under the job's results folder, queues it for the job's destinations (``deliveries``, step
``REVIEW_STEP_BASE + review id``: pipeline steps are 0…n-1, so they never collide; the existing
sender sends it with its retries and dead letters), moves the finding's status through
:func:`dicomnode.state.transition` and audits ``finding-reviewed`` with the user's name.

What is sent (PS3.3 C.17.2, SR Document General module):

- **accept**: a new instance of the document, VERIFIED by the radiologist
  (VerifyingObserverSequence), COMPLETE, FINAL, Predecessor Documents Sequence → the document
  it was made from;
- **reject**: a corrected revision without the finding's measurement group, VERIFIED;
- **amend**: a revision that keeps the group and adds a TEXT (121106, DCM, "Comment") item with
  the radiologist's comment inside it, VERIFIED.

Several findings of one SR are reviewed one after the other: each verdict is made from the
latest verdict of that SR (or the original), so the newest document in PACS carries every
decision so far, and its Predecessor Documents Sequence names the one it supersedes. The SR's
findings are locked while a verdict is made (``FOR UPDATE`` on PostgreSQL; SQLite has one writer).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.audit import AuditLog, EventKind
from dicomnode.config import Settings
from dicomnode.package.provenance import output_uid
from dicomnode.review.sr_read import COMMENT, group_items, imaging_measurements
from dicomnode.schema import (
    Delivery,
    DeliveryState,
    Finding,
    FindingReview,
    FindingStatus,
    Job,
    utcnow,
)
from dicomnode.state import Actor, transition
from dicomnode.store.files import fsync_dir

__all__ = [
    "DECISIONS",
    "REVIEW_STEP_BASE",
    "AlreadyReviewed",
    "FindingNotFound",
    "InvalidDecision",
    "ReviewError",
    "ReviewResult",
    "build_verdict",
    "review_finding",
    "review_step",
]

#: Delivery.step of a verdict SR: REVIEW_STEP_BASE + the review's id. Pipeline steps are
#: 0…n-1 (and -1 for whole-job deliveries made before migration 0004), so the unique key
#: (job, destination, step) never meets a pipeline step's delivery.
REVIEW_STEP_BASE = 1000

#: what the web may send → the finding's new status
DECISIONS: dict[str, FindingStatus] = {
    "accept": FindingStatus.ACCEPTED, "accepted": FindingStatus.ACCEPTED,
    "reject": FindingStatus.REJECTED, "rejected": FindingStatus.REJECTED,
    "amend": FindingStatus.AMENDED, "amended": FindingStatus.AMENDED,
}


class ReviewError(Exception):
    """A review that cannot be made; nothing was written."""


class FindingNotFound(ReviewError, LookupError):
    """No finding has this id (HTTP 404)."""


class AlreadyReviewed(ReviewError):
    """The finding was reviewed before (HTTP 409): a verdict is final."""


class InvalidDecision(ReviewError, ValueError):
    """Not accept, reject or amend; an amendment without a comment; no user (HTTP 422)."""


@dataclass(frozen=True)
class ReviewResult:
    review_id: int
    finding_id: int
    status: FindingStatus
    verdict_sop_instance_uid: str
    verdict_path: Path
    predecessor_sop_instance_uid: str
    delivery_step: int
    destinations: tuple[str, ...]  # queued for these (the job's send_to)


def review_step(review_id: int) -> int:
    """The Delivery.step of a review's verdict SR."""
    return REVIEW_STEP_BASE + review_id


def person_name(display: str) -> str:
    """A PN value: ``Family^Given`` as given, else "Given Family" turned into ``Family^Given``
    (one word: the family name)."""
    display = " ".join(display.split())
    if "^" in display or " " not in display:
        return display[:64]
    given, _, family = display.rpartition(" ")
    return f"{family}^{given}"[:64]


def _dt(now: datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S.%f") + now.strftime("%z")


def build_verdict(base: Dataset, decision: FindingStatus, tracking_uid: str, *,
                  sop_instance_uid: str, observer: str, organization: str,
                  comment: str = "", now: datetime | None = None) -> Dataset:
    """The verdict SR made from ``base`` (the finding's SR, or the latest verdict of it): a new
    instance, VERIFIED by ``observer`` (a PN), with ``base`` as its predecessor; a rejected
    finding's group removed, an amended one's commented. ``base`` is not changed."""
    if decision not in (FindingStatus.ACCEPTED, FindingStatus.REJECTED, FindingStatus.AMENDED):
        raise InvalidDecision(f"{decision!r} is no verdict")
    now = (now or datetime.now()).astimezone()
    ds = copy.deepcopy(base)
    groups = [g for g in group_items(ds) if any(
        i.get("ValueType") == "UIDREF" and str(i.get("UID", "")) == tracking_uid
        for i in g.get("ContentSequence", []))]
    if not groups:
        raise ReviewError(f"the SR {base.SOPInstanceUID} has no measurement group with "
                          f"tracking UID {tracking_uid}")
    group = groups[0]
    if decision == FindingStatus.REJECTED:
        container = imaging_measurements(ds)
        assert container is not None  # the group was found inside it
        container.ContentSequence.remove(group)
        if len(container.ContentSequence) == 0:  # no finding left: no empty container
            ds.ContentSequence.remove(container)
    elif decision == FindingStatus.AMENDED:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        name = Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = COMMENT
        item.ConceptNameCodeSequence = [name]
        item.TextValue = comment
        group.ContentSequence.append(item)

    ref = Dataset()
    ref.ReferencedSOPClassUID = base.SOPClassUID
    ref.ReferencedSOPInstanceUID = base.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = base.SeriesInstanceUID
    series.ReferencedSOPSequence = [ref]
    study = Dataset()
    study.StudyInstanceUID = base.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    ds.PredecessorDocumentsSequence = [study]

    verifier = Dataset()
    verifier.VerifyingObserverName = observer
    verifier.VerifyingObserverIdentificationCodeSequence = []
    verifier.VerifyingOrganization = organization[:64]
    verifier.VerificationDateTime = _dt(now)
    ds.VerifyingObserverSequence = [verifier]
    ds.VerificationFlag = "VERIFIED"
    ds.CompletionFlag = "COMPLETE"
    ds.PreliminaryFlag = "FINAL"

    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_instance_uid)
    ds.InstanceNumber = int(base.get("InstanceNumber") or 1) + 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    return ds


def _write_durably(path: Path, ds: Dataset) -> None:
    """Write → fsync → rename → fsync the directory: the file the delivery names is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(buf.getvalue())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _decision(decision: str) -> FindingStatus:
    status = DECISIONS.get(str(decision).strip().lower())
    if status is None:
        raise InvalidDecision(f"decision {decision!r} is not one of accept, reject, amend")
    return status


def review_finding(s: Session, settings: Settings, audit: AuditLog, finding_id: int,
                   decision: str, comment: str, user: str, user_display: str, *,
                   organization: str | None = None) -> ReviewResult:
    """Record a radiologist's ``decision`` (accept | reject | amend) on a finding and queue
    the verdict SR for the job's destinations, in ``s``'s transaction (the caller commits).

    ``user``: the login name (audit, ``reviewed_by``); ``user_display``: the person's name for
    the SR's VerifyingObserverName (``Family^Given``, or "Given Family"); ``organization``:
    VerifyingOrganization (default: the SR's InstitutionName, else the node's AE title).
    Raises :class:`InvalidDecision` (422), :class:`FindingNotFound` (404),
    :class:`AlreadyReviewed` (409); nothing is written then."""
    status = _decision(decision)
    comment = comment.strip()
    if not user:
        raise InvalidDecision("a review must name the user who made it")
    if status == FindingStatus.AMENDED and not comment:
        raise InvalidDecision("an amendment needs a comment saying what is amended")
    finding = s.get(Finding, finding_id, with_for_update=True)
    if finding is None:
        raise FindingNotFound(f"no finding {finding_id}")
    if finding.status != FindingStatus.PENDING:
        raise AlreadyReviewed(f"finding {finding_id} was already {finding.status} by "
                              f"{finding.reviewed_by or 'someone'}"
                              + (f" at {finding.reviewed_at:%Y-%m-%d %H:%M} UTC"
                                 if finding.reviewed_at else ""))
    # the SR's findings, locked: two verdicts on one SR are made one after the other
    s.execute(select(Finding.id).where(
        Finding.sr_sop_instance_uid == finding.sr_sop_instance_uid).with_for_update()).all()
    latest = s.execute(
        select(FindingReview.verdict_path).join(Finding, FindingReview.finding_fk == Finding.id)
        .where(Finding.sr_sop_instance_uid == finding.sr_sop_instance_uid)
        .order_by(FindingReview.id.desc()).limit(1)).scalar_one_or_none()
    base = pydicom.dcmread(latest or finding.sr_path)
    job = s.get_one(Job, finding.job_fk)
    uid = output_uid(job.uid, "verdict", finding.sr_sop_instance_uid, finding.tracking_uid)
    org = organization or str(base.get("InstitutionName") or "") or settings.node.ae_title
    verdict = build_verdict(base, status, finding.tracking_uid, sop_instance_uid=uid,
                            observer=person_name(user_display or user), organization=org,
                            comment=comment)
    path = settings.storage.path / "results" / job.uid / "review" / f"finding{finding.id}.dcm"
    _write_durably(path, verdict)

    now = utcnow()
    review = FindingReview(finding_fk=finding.id, decision=status, comment=comment,
                           user=user[:64], user_display=user_display[:324], at=now,
                           verdict_sop_instance_uid=uid, verdict_path=str(path))
    s.add(review)
    s.flush()
    step = review_step(review.id)
    destinations = tuple(json.loads(job.send_to))
    for dest in destinations:
        s.add(Delivery(job_fk=job.id, destination=dest, state=DeliveryState.PENDING,
                       attempts=0, next_attempt_at=now, created_at=now, step=step,
                       results=json.dumps([str(path)])))
    finding.reviewed_by, finding.reviewed_at = user[:64], now
    transition(s, finding, status, by=Actor.user(user), audit=audit,
               event=EventKind.FINDING_REVIEWED, decision=str(status), comment=comment[:500],
               user_display=user_display[:128], review_id=review.id, job_id=job.id,
               study_uid=finding.study_uid, sr_sop_instance_uid=finding.sr_sop_instance_uid,
               tracking_uid=finding.tracking_uid,
               predecessor_sop_instance_uid=str(base.SOPInstanceUID),
               verdict_sop_instance_uid=uid, destinations=list(destinations), step=step)
    s.flush()
    return ReviewResult(review.id, finding.id, status, uid, path, str(base.SOPInstanceUID),
                        step, destinations)
