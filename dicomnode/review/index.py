"""AI findings → the ``findings`` table, when a job step's results are recorded.

Called by :func:`dicomnode.run.jobs.deliver_done_steps` in the transaction that queues the
step's deliveries, so a step's findings appear in the worklist exactly when its results go to
PACS. Each TID 1500 measurement group of each SR the step wrote becomes one row; the unique key
(SR SOP Instance UID, tracking UID) and a look-up before inserting make a re-delivered step or a
retried job (same UIDs: they derive from the job) add nothing. A result file that cannot be read
is logged and skipped: the findings index must never hold back the results themselves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from dicomnode.review.sr_read import (
    KOS_CLASS,
    SEG_CLASS,
    SR_CLASSES,
    MeasurementGroup,
    kos_references,
    measurement_groups,
    segment_masks,
    sop_class_of,
)
from dicomnode.schema import Finding, FindingStatus, Job, utcnow

log = logging.getLogger(__name__)

#: key images kept per finding (the slices where its segment is largest)
MAX_KEY_IMAGES = 4


class _StepObjects:
    """The SR, SEG and KOS files among a step's results, read lazily and once."""

    def __init__(self, results: list[str]) -> None:
        self.srs: list[Path] = []
        self.segs: list[Path] = []
        self.kos: list[Path] = []
        for name in results:
            path = Path(name)
            if path.suffix != ".dcm" or "volume" in path.parent.name:
                continue  # derived image series: never an SR, SEG or KOS
            try:
                cls = sop_class_of(path)
            except Exception as e:  # unreadable: skipped, logged
                log.warning("findings index: %s unreadable (%s)", path, e)
                continue
            if cls in SR_CLASSES:
                self.srs.append(path)
            elif cls == SEG_CLASS:
                self.segs.append(path)
            elif cls == KOS_CLASS:
                self.kos.append(path)
        self._segs: dict[str, tuple[Path, Dataset]] | None = None
        self._kos: list[str] | None = None

    def seg(self, uid: str) -> tuple[Path, Dataset] | None:
        if self._segs is None:
            self._segs = {}
            for p in self.segs:
                ds = pydicom.dcmread(p)
                self._segs[str(ds.SOPInstanceUID)] = (p, ds)
        return self._segs.get(uid)

    def key_images(self) -> list[str]:
        if self._kos is None:
            self._kos = [u for p in self.kos for u in kos_references(pydicom.dcmread(p))]
        return self._kos[:MAX_KEY_IMAGES]


def _segment_key_images(seg: Dataset, segment: int) -> list[str]:
    """The source images of a segment's frames, largest area first."""
    masks = segment_masks(seg, segment)
    area = {uid: int(np.count_nonzero(m)) for uid, m in masks.items()}
    ranked = sorted((uid for uid, a in area.items() if a > 0), key=lambda u: -area[u])
    return ranked[:MAX_KEY_IMAGES]


def _row(job: Job, step: int, sr: Path, sr_uid: str, g: MeasurementGroup,
         objects: _StepObjects, critical: str) -> Finding:
    seg_uid = seg_path = None
    segment = None
    key_images: list[str] = []
    if g.segment is not None:
        seg_uid, segment = g.segment
        found = objects.seg(seg_uid)
        if found is not None:
            seg_path = str(found[0])
            key_images = _segment_key_images(found[1], segment)
    if not key_images:
        key_images = objects.key_images()
    return Finding(
        job_fk=job.id, study_uid=job.study_uid, step=step, sr_path=str(sr),
        sr_sop_instance_uid=sr_uid, tracking_uid=g.tracking_uid, tracking_id=g.tracking_id[:64],
        group_index=g.index,
        finding_value=g.finding.value[:64] if g.finding else "",
        finding_scheme=g.finding.scheme[:16] if g.finding else "",
        finding_meaning=g.finding.meaning[:128] if g.finding else "",
        site=g.site[:128], laterality=g.laterality[:64], confidence=g.confidence,
        measurements=json.dumps([{"name": m.name, "value": m.value, "unit": m.unit}
                                 for m in g.measurements]),
        evaluations=json.dumps([{"name": n, "value": v} for n, v in g.evaluations]),
        seg_sop_instance_uid=seg_uid, seg_path=seg_path, segment_number=segment,
        location=None if g.location is None else json.dumps(list(g.location)),
        key_images=json.dumps(key_images), priority=0 if critical else 1, critical=critical,
        status=FindingStatus.PENDING, created_at=utcnow(), reviewed_by="")


def index_step(s: Session, job: Job, step: int, record: dict[str, Any]) -> int:
    """Index the findings of one recorded step (its step record: ``results``, ``critical``)
    in the caller's transaction. Returns how many rows it added (0 when they exist)."""
    critical = str(record.get("critical") or "")
    objects = _StepObjects([str(r) for r in record.get("results", [])])
    added = 0
    for sr in objects.srs:
        try:
            ds = pydicom.dcmread(sr)
            groups = [g for g in measurement_groups(ds) if g.tracking_uid]
        except Exception as e:  # a result the index cannot read still goes to PACS
            log.warning("findings index: job %s step %d: %s not read (%s)", job.uid, step,
                        sr, e)
            continue
        sr_uid = str(ds.SOPInstanceUID)
        have = set(s.execute(select(Finding.tracking_uid).where(
            Finding.sr_sop_instance_uid == sr_uid)).scalars())
        for g in groups:
            if g.tracking_uid in have:
                continue
            try:
                row = _row(job, step, sr, sr_uid, g, objects, critical)
            except Exception as e:  # e.g. a SEG that does not decode: index without it
                log.warning("findings index: job %s step %d group %d: %s", job.uid, step,
                            g.index, e)
                continue
            s.add(row)
            have.add(g.tracking_uid)
            added += 1
    if added:
        s.flush()
        log.info("job %d step %d: %d finding(s) indexed for review", job.id, step, added)
    return added


def worklist(status: FindingStatus | None = FindingStatus.PENDING,
             study_uid: str | None = None) -> Select[Finding]:
    """The review worklist as a query (the caller pages it): critical findings first, then
    the oldest. ``status`` None: every status."""
    q = select(Finding)
    if status is not None:
        q = q.where(Finding.status == status)
    if study_uid is not None:
        q = q.where(Finding.study_uid == study_uid)
    return q.order_by(Finding.priority, Finding.created_at, Finding.id)
