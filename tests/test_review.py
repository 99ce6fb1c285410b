"""Radiologists' review of AI findings, with real parts: a node (subprocess) runs ich-triage on a
synthetic head CT with a bleed sent by dcmtk storescu; its SR's measurement groups are indexed
as findings; verdicts (accept, reject, amend) become verified SRs that pass dciodvfy and
dsrdump -Ee; the node's own sender delivers them to a real Orthanc; key images render as PNGs
with the segment outlined. One job is shared by the whole module (module-scoped fixtures)."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, verify_chain
from dicomnode.config import Settings, load_settings
from dicomnode.database import make_engine, make_sessionmaker, upgrade
from dicomnode.review import (
    REVIEW_STEP_BASE,
    AlreadyReviewed,
    FindingNotFound,
    InvalidDecision,
    ReviewResult,
    finding_detail,
    index_step,
    render_key_images,
    review_finding,
)
from dicomnode.review.images import OUTLINE_RGB, outline
from dicomnode.review.sr_read import measurement_groups, segment_masks
from dicomnode.run import jobs
from dicomnode.run.jobs import read_step, step_record
from dicomnode.schema import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Finding,
    FindingReview,
    FindingStatus,
    Job,
    JobState,
    utcnow,
)
from dicomnode.simulate.head import write_head_ct
from tests.helpers import IN_CI, NodeProc, storescu, wait_until
from tests.orthanc import ORTHANC, Orthanc
from tests.test_pipeline import pipeline_config
from tests.validators import dciodvfy_errors, dsrdump_errors

ROUTE = {"name": "ich", "match": {"Modality": "CT", "SeriesDescription": {"regex": "HEAD"}},
         "pipeline": [{"plugin": "ich-triage"}], "send_to": ["pacs"]}


@dataclass
class World:
    node: NodeProc
    orthanc: Orthanc
    settings: Settings
    sessions: sessionmaker[Session]
    audit: AuditLog
    truth: Any
    files: list[Path]
    job_id: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not Path(ORTHANC).exists():
        if IN_CI:
            raise AssertionError("Orthanc (Debian package orthanc) must be installed in CI")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    tmp = tmp_path_factory.mktemp("review")
    orthanc = Orthanc(tmp / "orthanc")
    cfg = pipeline_config(orthanc, [ROUTE])
    cfg["assemble"] = {"quiet_seconds": 1}
    node = NodeProc(tmp / "node", f"sqlite:///{tmp / 'index.sqlite3'}", overrides=cfg)
    engine = None
    try:
        node.start()
        files, truth = write_head_ct(tmp / "bleed", 41, kind="iph", volume_ml=6.0)
        storescu(node.port, files, aet="CT_SCANNER")
        # the job's SR, SEG and KOS in the PACS: the step was recorded and delivered
        wait_until(lambda: len(orthanc.series()) == 3, timeout=90, what="SR + SEG + KO")
        [job] = wait_until(lambda: [j for j in node.jobs() if j["state"] == "succeeded"],
                           timeout=30, what="the job to succeed")
        settings = load_settings(node.config_path)
        engine = make_engine(node.db_url)
        sessions = make_sessionmaker(engine)
        yield World(node, orthanc, settings, sessions, AuditLog(sessions), truth, files,
                    int(job["id"]))
    finally:
        node.stop()
        orthanc.stop()
        if engine is not None:
            engine.dispose()


def _findings(w: World) -> list[Finding]:
    with w.sessions() as s:
        return list(s.execute(select(Finding).order_by(Finding.group_index)).scalars())


def _review(w: World, finding_id: int, decision: str, comment: str = "", *,
            commit: bool = True) -> ReviewResult:
    with w.sessions() as s:
        result = review_finding(s, w.settings, w.audit, finding_id, decision, comment,
                                "alice", "Alice Smith", organization="General Hospital")
        if commit:
            s.commit()
        else:
            s.rollback()
    return result


@pytest.fixture(scope="module")
def verdicts(world: World) -> dict[str, Any]:
    """Each decision once, in this order: an amendment (made, checked, then rolled back:
    nothing of it stays but its file), the presence finding accepted, the lesion rejected
    (made from the accepted verdict: the newest document carries both decisions)."""
    presence, lesion = _findings(world)
    out: dict[str, Any] = {"presence": presence, "lesion": lesion}
    amended = _review(world, lesion.id, "amend", "Volume overestimated: about 4 mL",
                      commit=False)
    # the rejection later writes the same path (one verdict file per finding): keep a copy
    kept = amended.verdict_path.with_name("amended-rolled-back.dcm")
    shutil.copyfile(amended.verdict_path, kept)
    amended = replace(amended, verdict_path=kept)
    out["amend"] = (amended, pydicom.dcmread(kept))
    accepted = _review(world, presence.id, "accept")
    out["accept"] = (accepted, pydicom.dcmread(accepted.verdict_path))
    rejected = _review(world, lesion.id, "Reject", "calcification, not blood")
    out["reject"] = (rejected, pydicom.dcmread(rejected.verdict_path))
    return out


def test_findings_indexed_with_priority_and_measurements_once(world: World) -> None:
    presence, lesion = _findings(world)
    [les] = world.truth.lesions
    for f in (presence, lesion):
        assert f.job_fk == world.job_id and f.step == 0 and f.status == FindingStatus.PENDING
        assert f.priority == 0  # the step raised a critical finding: the hemorrhage
        assert f.critical.startswith("ich-triage: Intracranial hemorrhage suspected")
        assert (f.finding_value, f.finding_scheme) == ("1386000", "SCT")
        assert Path(f.sr_path).exists()
    assert json.loads(presence.evaluations) == [{"name": "Presence", "value": "Present"}]
    assert json.loads(presence.measurements) == [] and presence.segment_number is None
    volume, diameter = json.loads(lesion.measurements)
    assert (volume["name"], volume["unit"], diameter["name"], diameter["unit"]) == (
        "Volume", "ml", "Diameter", "mm")
    assert volume["value"] == pytest.approx(les.volume_ml, rel=0.3)
    assert diameter["value"] > 5.0
    assert lesion.site == "Cranial cavity" and lesion.laterality in ("Left", "Right")
    assert lesion.confidence is not None and 0 < lesion.confidence <= 1
    assert lesion.segment_number == 1 and lesion.seg_path and Path(lesion.seg_path).exists()
    assert lesion.tracking_id == "Finding 2" and lesion.group_index == 1
    # key images: the slices where the segment is largest, largest first
    keys = json.loads(lesion.key_images)
    masks = segment_masks(pydicom.dcmread(lesion.seg_path), 1)
    areas = [int(masks[u].sum()) for u in keys]
    assert 1 <= len(keys) <= 4 and areas == sorted(areas, reverse=True) and areas[0] == max(
        int(m.sum()) for m in masks.values())
    assert json.loads(presence.key_images)  # no segment: the step's KOS
    study_uid = str(pydicom.dcmread(world.files[0]).StudyInstanceUID)
    assert presence.study_uid == lesion.study_uid == study_uid

    # a re-delivered step / retried job (a runner with no memory of what it handed over)
    with world.sessions() as s, s.begin():
        job = s.get_one(Job, world.job_id)
        assert job.state == JobState.SUCCEEDED
        deliveries = s.scalar(select(func.count()).select_from(Delivery))
        handed = jobs.deliver_done_steps(s, world.settings, job,
                                         world.settings.storage.path / "results" / job.uid,
                                         set())
        assert handed.findings == 0 and not handed.queued
        assert s.scalar(select(func.count()).select_from(Delivery)) == deliveries
    assert [f.id for f in _findings(world)] == [presence.id, lesion.id]


def _verified_by_alice(ds: pydicom.Dataset, predecessor: str) -> None:
    assert ds.VerificationFlag == "VERIFIED" and ds.CompletionFlag == "COMPLETE"
    [obs] = ds.VerifyingObserverSequence
    assert str(obs.VerifyingObserverName) == "Smith^Alice"
    assert obs.VerifyingOrganization == "General Hospital" and obs.VerificationDateTime
    assert "VerifyingObserverIdentificationCodeSequence" in obs
    [study] = ds.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [ref] = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == predecessor
    assert study.StudyInstanceUID == ds.StudyInstanceUID


def test_each_verdict_is_a_conformant_verified_sr(world: World,
                                                  verdicts: dict[str, Any]) -> None:
    lesion = verdicts["lesion"]
    original = pydicom.dcmread(lesion.sr_path)
    groups = measurement_groups(original)
    assert len(groups) == 2
    for kind in ("amend", "accept", "reject"):
        result, ds = verdicts[kind]
        assert dciodvfy_errors(result.verdict_path) == [], kind
        assert dsrdump_errors(result.verdict_path) == [], kind
        assert ds.SOPInstanceUID == result.verdict_sop_instance_uid != original.SOPInstanceUID
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (original.StudyInstanceUID,
                                                               original.SeriesInstanceUID)
    _, ds = verdicts["amend"]
    _verified_by_alice(ds, original.SOPInstanceUID)
    assert ds.InstanceNumber == original.InstanceNumber + 1
    kept = {g.tracking_uid: g for g in measurement_groups(ds)}
    assert len(kept) == 2 and kept[lesion.tracking_uid].comments == (
        "Volume overestimated: about 4 mL",)
    accepted, ds = verdicts["accept"]
    _verified_by_alice(ds, original.SOPInstanceUID)  # the first verdict of this SR
    assert ds.InstanceNumber == original.InstanceNumber + 1
    assert len(measurement_groups(ds)) == 2
    rejected, ds = verdicts["reject"]
    _verified_by_alice(ds, accepted.verdict_sop_instance_uid)  # supersedes the accepted one
    assert rejected.predecessor_sop_instance_uid == accepted.verdict_sop_instance_uid
    assert ds.InstanceNumber == original.InstanceNumber + 2
    left = measurement_groups(ds)
    assert [g.tracking_uid for g in left] == [verdicts["presence"].tracking_uid]  # one fewer


def test_amendment_rolled_back_leaves_nothing_but_a_file(world: World,
                                                         verdicts: dict[str, Any]) -> None:
    """A verdict exists only when the caller commits: the rolled-back amendment left no
    review, no delivery of its own, no status and no audit event (its file was later
    overwritten by the rejection's, at the same path)."""
    with world.sessions() as s:
        reviews = s.execute(select(FindingReview.decision).order_by(FindingReview.id)
                            ).scalars().all()
        assert reviews == [FindingStatus.ACCEPTED, FindingStatus.REJECTED]
        steps = s.execute(select(Delivery.step).where(Delivery.step >= REVIEW_STEP_BASE)
                          ).scalars().all()
        assert sorted(steps) == sorted(r.delivery_step for r in (verdicts["accept"][0],
                                                                  verdicts["reject"][0]))
        assert s.get_one(Finding, verdicts["lesion"].id).status == FindingStatus.REJECTED
        events = s.execute(select(AuditEvent.detail).where(
            AuditEvent.event_type == EventKind.FINDING_REVIEWED.type_name)).scalars().all()
        assert all(json.loads(d)["to"] != "amended" for d in events)


def test_accepted_verdict_reaches_orthanc_and_is_audited(world: World,
                                                         verdicts: dict[str, Any]) -> None:
    accepted, _ = verdicts["accept"]
    rejected, _ = verdicts["reject"]
    assert accepted.delivery_step == REVIEW_STEP_BASE + accepted.review_id
    assert accepted.destinations == ("pacs",)

    def in_orthanc() -> dict[str, Any]:
        return {i["MainDicomTags"]["SOPInstanceUID"]: i
                for i in world.orthanc.get("/instances?expand")}
    got = wait_until(lambda: (lambda d: d if {accepted.verdict_sop_instance_uid,
                                              rejected.verdict_sop_instance_uid} <= set(d)
                              else None)(in_orthanc()),
                     timeout=30, what="both verdict SRs in Orthanc")
    path = world.orthanc.instance_file(got[accepted.verdict_sop_instance_uid]["ID"],
                                       world.node.workdir / "from-orthanc.dcm")
    back = pydicom.dcmread(path)
    assert back.VerificationFlag == "VERIFIED"
    assert str(back.VerifyingObserverSequence[0].VerifyingObserverName) == "Smith^Alice"
    with world.sessions() as s:
        d = s.execute(select(Delivery).where(Delivery.step == accepted.delivery_step)
                      ).scalar_one()
        assert d.state == DeliveryState.SENT and d.job_fk == world.job_id
        assert json.loads(d.results or "[]") == [str(accepted.verdict_path)]
        presence = s.get_one(Finding, verdicts["presence"].id)
        lesion = s.get_one(Finding, verdicts["lesion"].id)
        assert (presence.status, lesion.status) == (FindingStatus.ACCEPTED,
                                                    FindingStatus.REJECTED)
        assert presence.reviewed_by == "alice" and presence.reviewed_at is not None
        events = s.execute(select(AuditEvent).where(
            AuditEvent.event_type == EventKind.FINDING_REVIEWED.type_name)
            .order_by(AuditEvent.seq)).scalars().all()
    assert [(e.user, e.event_code, json.loads(e.detail)["to"]) for e in events] == [
        ("alice", "DN0009", "accepted"), ("alice", "DN0009", "rejected")]
    detail = json.loads(events[1].detail)
    assert detail["comment"] == "calcification, not blood"
    assert detail["verdict_sop_instance_uid"] == rejected.verdict_sop_instance_uid
    assert verify_chain(world.sessions).ok


def test_refusals(world: World, verdicts: dict[str, Any]) -> None:
    presence, lesion = verdicts["presence"], verdicts["lesion"]
    with world.sessions() as s, s.begin():
        count = s.scalar(select(func.count()).select_from(FindingReview))
    with pytest.raises(AlreadyReviewed, match=r"already accepted by alice"):
        _review(world, presence.id, "reject")
    with pytest.raises(AlreadyReviewed):
        _review(world, lesion.id, "accept")
    with pytest.raises(InvalidDecision, match="not one of accept, reject, amend"):
        _review(world, presence.id, "maybe")
    with pytest.raises(InvalidDecision, match="comment"):
        _review(world, presence.id, "amend", "  ")
    with pytest.raises(FindingNotFound):
        _review(world, 99999, "accept")
    with world.sessions() as s:
        assert s.scalar(select(func.count()).select_from(FindingReview)) == count
    assert verify_chain(world.sessions).ok


def _png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.mode == "RGB"
    return np.asarray(img)


def test_key_images_render_with_the_segment_outlined(world: World) -> None:
    lesion = _findings(world)[1]
    masks = segment_masks(pydicom.dcmread(lesion.seg_path), 1)
    with world.sessions() as s:
        images = render_key_images(s, world.settings, lesion.id)
        assert 1 <= len(images) <= 4
        assert [i.sop_instance_uid for i in images] == json.loads(lesion.key_images)
        for image in images:
            rgb = _png(image.png)
            assert rgb.shape == (256, 256, 3) and (image.width, image.height) == (256, 256)
            drawn = np.all(rgb == OUTLINE_RGB, axis=-1)
            expected = outline(masks[image.sop_instance_uid])
            assert drawn.sum() == image.outline_pixels > 0
            assert np.array_equal(drawn, expected)  # exactly the mask's boundary
            grey = rgb[~drawn]
            assert (grey[:, 0] == grey[:, 2]).all()  # everything else is grey
            assert "image" in image.frame_label and "segment" in image.frame_label
        # the brain window: the head is not a flat white or black disc
        assert len(np.unique(_png(images[0].png)[..., 1])) > 50
        # a slice of the series where the segment has no pixel: no outline at all
        empty = next(u for u, m in masks.items() if not m.any())
        [plain] = render_key_images(s, world.settings, lesion.id, sop_instance_uids=[empty],
                                    window="lung")
        rgb = _png(plain.png)
        assert plain.outline_pixels == 0 and not np.all(rgb == OUTLINE_RGB, axis=-1).any()
        assert "segment" not in plain.frame_label


def test_finding_detail_reads_the_sr(world: World) -> None:
    lesion = _findings(world)[1]
    with world.sessions() as s:
        detail = finding_detail(s, lesion.id)
    names = [(m.name, m.unit) for m in detail.group.measurements]
    assert names == [("Volume", "ml"), ("Diameter", "mm")]
    assert detail.group.site == "Cranial cavity" and detail.priority == 0
    assert detail.group.segment is not None and detail.group.segment[1] == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_index_and_verdict_on_postgresql(world: World, db_url: str, tmp_path: Path) -> None:
    """The same step record indexed and a finding reviewed on PostgreSQL (row locks, the
    migration's tables): rows once, the verdict queued at step 1000 + review id."""
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    audit = AuditLog(sessions)
    settings = world.settings.model_copy(update={"storage": world.settings.storage.model_copy(
        update={"path": tmp_path})})
    try:
        with world.sessions() as s:
            uid = s.get_one(Job, world.job_id).uid
        record = read_step(step_record(world.settings.storage.path / "results" / uid, 0))
        assert record is not None
        with sessions() as s, s.begin():
            job = Job(uid=uid, route="ich", level="study", study_uid="1.2", revision=1,
                      series_uids="[]", pipeline='[{"plugin": "ich-triage"}]',
                      send_to='["pacs", "backup"]', state=JobState.SUCCEEDED,
                      created_at=utcnow())
            s.add(job)
            s.flush()
            assert index_step(s, job, 0, record) == 2
            assert index_step(s, job, 0, record) == 0
        with sessions() as s:
            lesion = s.execute(select(Finding).where(Finding.segment_number == 1)).scalar_one()
        with sessions() as s, s.begin():
            result = review_finding(s, settings, audit, lesion.id, "amend", "smaller",
                                    "bob", "Jones^Bob")
        assert result.destinations == ("pacs", "backup")
        assert result.verdict_path.is_relative_to(tmp_path)
        with sessions() as s:
            steps = s.execute(select(Delivery.destination, Delivery.step)).all()
            assert sorted(steps) == [("backup", 1000 + result.review_id),
                                     ("pacs", 1000 + result.review_id)]
            assert s.get_one(Finding, lesion.id).status == FindingStatus.AMENDED
        assert dsrdump_errors(result.verdict_path) == []
        assert verify_chain(sessions).ok
    finally:
        engine.dispose()
