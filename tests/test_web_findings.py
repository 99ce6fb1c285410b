"""The radiologist's side of the console, with real parts: a node (``dicomnode serve``, its
console beside the DICOM listener) runs ich-triage on a synthetic head CT with a bleed sent by
dcmtk storescu; the radiologist logs in with headless Chromium, finds the hemorrhage first on
the worklist, opens it (key images with the outline, the SR's measurements), accepts it, and
the VERIFIED SR arrives in a real Orthanc (dciodvfy and dsrdump -Ee clean). The API's answers
(order, refusals, roles) are checked on the same node."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from dicomnode.schema import AuditEvent, Finding, FindingStatus
from dicomnode.simulate.head import write_head_ct
from tests.helpers import IN_CI, NodeProc, free_port, storescu, wait_until
from tests.orthanc import ORTHANC, Orthanc
from tests.test_pipeline import pipeline_config
from tests.validators import dciodvfy_errors, dsrdump_errors
from tests.web import PASSWORD, WebNode, login, screenshot

ROUTE = {"name": "ich", "match": {"Modality": "CT", "SeriesDescription": {"regex": "HEAD"}},
         "pipeline": [{"plugin": "ich-triage"}], "send_to": ["pacs"]}


@dataclass
class Ward:
    node: NodeProc
    orthanc: Orthanc
    web: WebNode


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ward]:
    if not Path(ORTHANC).exists():
        if IN_CI:
            raise AssertionError("Orthanc (Debian package orthanc) must be installed in CI")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    from dicomnode.audit import AuditLog
    from dicomnode.config import load_settings
    from dicomnode.database import make_engine, make_sessionmaker

    tmp = tmp_path_factory.mktemp("ward")
    orthanc = Orthanc(tmp / "orthanc")
    cfg = pipeline_config(orthanc, [ROUTE])
    port = free_port()
    cfg["web"] = {"enabled": True, "port": port, "failure_delay_seconds": 0}
    node = NodeProc(tmp / "node", f"sqlite:///{tmp / 'index.sqlite3'}", overrides=cfg)
    try:
        node.start()
        settings = load_settings(node.config_path)
        sessions = make_sessionmaker(make_engine(node.db_url))
        web = WebNode(settings, sessions, AuditLog(sessions), f"http://127.0.0.1:{port}")
        for name, role in (("admin", "admin"), ("alice", "radiologist"),
                           ("audrey", "auditor")):
            web.add_user(name, role, display_name="Alice Smith" if name == "alice" else "")
        files, _ = write_head_ct(tmp / "bleed", 41, kind="iph", volume_ml=6.0)
        storescu(node.port, files, aet="CT_SCANNER")
        wait_until(lambda: len(orthanc.series()) == 3, timeout=120, what="SR + SEG + KO")
        yield Ward(node, orthanc, web)
    finally:
        node.stop()
        orthanc.stop()


def test_worklist_api_puts_critical_first_and_guards_reviews(ward: Ward) -> None:
    with ward.web.api("alice") as c:
        items = c.get("/api/findings").json()["items"]
        assert len(items) >= 1
        assert items[0]["priority"] == 0 and "hemorrhage" in items[0]["critical"].lower()
        assert [f["priority"] for f in items] == sorted(f["priority"] for f in items)
        assert items[0]["study"]["patient_id"]  # the worklist names the patient
        one = c.get(f"/api/findings/{items[0]['id']}").json()
        assert "error" not in one["sr"], one
        assert one["sr"]["measurements"] or one["sr"]["evaluations"], one
        png = c.get(f"/api/findings/{items[0]['id']}/images/0.png")
        if items[0]["key_images"]:
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(png.content)).size[0] >= 64
        bad = c.post(f"/api/findings/{items[0]['id']}/review", json={"decision": "maybe"})
        assert bad.status_code == 422 and "decision" in bad.text
        amend = c.post(f"/api/findings/{items[0]['id']}/review", json={"decision": "amend"})
        assert amend.status_code == 422  # amend needs a comment
        assert c.post("/api/findings/999999/review",
                      json={"decision": "accept"}).status_code == 404
        # paging: one at a time walks the same list
        seen, cursor = [], None
        while True:
            page = c.get("/api/findings", params={"limit": 1, **(
                {"cursor": cursor} if cursor else {})}).json()
            seen += [f["id"] for f in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == [f["id"] for f in items]
    with ward.web.api("audrey") as c:
        assert c.get("/api/findings").status_code == 403
        assert c.post(f"/api/findings/{items[0]['id']}/review",
                      json={"decision": "accept"}).status_code == 403


def test_critical_findings_come_before_older_routine_ones(ward: Ward) -> None:
    """A nodule-like routine finding (priority 1) found earlier than the hemorrhage is still
    listed after it (the row is a copy of a real one with another tracking UID)."""
    from datetime import timedelta

    with ward.web.sessions() as s, s.begin():
        real = s.execute(select(Finding).order_by(Finding.id)).scalars().first()
        assert real is not None
        routine = Finding(**{c.name: getattr(real, c.name) for c in Finding.__table__.columns
                             if c.name != "id"})
        routine.tracking_uid = real.tracking_uid + ".9"
        routine.priority, routine.critical = 1, ""
        routine.finding_meaning = "Nodule"
        routine.created_at = real.created_at - timedelta(hours=1)
        s.add(routine)
        s.flush()
        routine_id = routine.id
    with ward.web.api("alice") as c:
        ids = [f["id"] for f in c.get("/api/findings").json()["items"]]
    assert ids[-1] == routine_id and len(ids) >= 2
    with ward.web.sessions() as s, s.begin():  # leave the ward as it was
        s.delete(s.get(Finding, routine_id))


def test_radiologist_accepts_a_hemorrhage_and_pacs_gets_the_verified_sr(
        ward: Ward, browser: Any, tmp_path: Path) -> None:
    page = login(browser, ward.web, "alice")
    assert page.url.endswith("/findings")
    nav = page.inner_text("header nav")
    assert "AI findings" in nav and "Audit" not in nav and "Jobs" not in nav
    first = page.locator("table.worklist tbody tr").first
    assert "critical" in first.inner_text()
    screenshot(page, "findings")
    # the lesion (the finding with a segment): its page shows the outlined key images
    with ward.web.api("alice") as c:
        lesion = next(f for f in c.get("/api/findings").json()["items"] if f["segment"])
    page.click(f"a[href='/findings/{lesion['id']}']")
    page.wait_for_selector("form.decision")
    page.wait_for_function("() => document.querySelectorAll('.images img').length > 0 && "
                           "[...document.querySelectorAll('.images img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    facts = page.inner_text(".facts")
    assert "What the AI reported" in facts and " ml" in facts.lower(), facts
    screenshot(page, "review")
    finding_id = int(page.url.rsplit("/", 1)[1])
    page.click("button[value=accept]")
    page.wait_for_selector("[role=status]")
    assert "Accepted" in page.inner_text("[role=status]")
    assert "accepted" in page.inner_text("h1")
    screenshot(page, "review-accepted")
    page.context.close()

    # the verified SR reaches PACS beside the original, through the node's sender
    with ward.web.sessions() as s:
        f = s.get(Finding, finding_id)
        assert f is not None and f.status == FindingStatus.ACCEPTED and f.reviewed_by == "alice"
        original = f.sr_sop_instance_uid

    def verified() -> Path | None:
        for inst in ward.orthanc.get("/instances"):
            tags = ward.orthanc.get(f"/instances/{inst}/simplified-tags")
            if tags.get("VerificationFlag") == "VERIFIED":
                return ward.orthanc.instance_file(inst, tmp_path / "verified.dcm")
        return None

    path = wait_until(verified, timeout=60, what="the VERIFIED SR in Orthanc")
    ds = pydicom.dcmread(path)
    assert ds.VerifyingObserverSequence[0].VerifyingObserverName == "Smith^Alice"
    assert ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == original
    assert dciodvfy_errors(path) == []
    assert dsrdump_errors(path) == []
    # the decision, and the view before it, are audit events with her name
    with ward.web.sessions() as s:
        kinds = [e for e, u in s.execute(select(AuditEvent.event_type, AuditEvent.user)
                                         .where(AuditEvent.user == "alice"))]
    assert "finding-reviewed" in kinds and "study-viewed" in kinds and "user-login" in kinds
    # a second decision on the same finding is refused
    with ward.web.api("alice") as c:
        again = c.post(f"/api/findings/{finding_id}/review", json={"decision": "reject",
                                                                   "comment": "no"})
        assert again.status_code == 409
        done = c.get("/api/findings", params={"status": "accepted"}).json()["items"]
        assert [x["id"] for x in done] == [finding_id]


def test_login_with_the_wrong_password_is_audited(ward: Ward) -> None:
    r = httpx.post(f"{ward.web.url}/api/token", data={"username": "alice", "password": "x"})
    assert r.status_code == 401
    assert httpx.post(f"{ward.web.url}/api/token", data={
        "username": "alice", "password": PASSWORD}).status_code == 200
    with ward.web.sessions() as s:
        failed = [json.loads(d) for d in s.execute(
            select(AuditEvent.detail).where(AuditEvent.event_type == "login-failed",
                                            AuditEvent.user == "alice")).scalars()]
    assert failed and failed[-1]["reason"] == "wrong password"
