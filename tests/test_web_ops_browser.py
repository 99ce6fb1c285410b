"""The operators' pages in a real browser (headless Chromium): an admin sends a dead letter
again from the jobs page and sees it delivered to a real Orthanc; a screenshot of every page.

The destination is Orthanc's DICOM port, but Orthanc starts only after the delivery is dead
(``max_retries: 0``): the admin's click is what gets the results there. The study itself
waits for the admin too (an hour's quiet period) until they press "Force complete".
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.schema import AuditEvent, Delivery, Job
from dicomnode.simulate import write_ct_series
from tests.helpers import IN_CI, NodeProc, free_port, storescu, wait_until
from tests.orthanc import ORTHANC, Orthanc
from tests.test_web_ops import console_for
from tests.web import WebNode, login, screenshot

ROUTE = {"name": "ct-threshold", "match": {"Modality": "CT"},
         "pipeline": [{"plugin": "threshold", "params": {"hu_min": 300}}], "send_to": ["pacs"]}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[NodeProc, WebNode, int]]:
    if not Path(ORTHANC).exists():
        if IN_CI:
            raise AssertionError("Orthanc (Debian package orthanc) must be installed in CI")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    dicom_port = free_port()
    node = NodeProc(tmp_path / "node", f"sqlite:///{tmp_path / 'index.sqlite3'}", overrides={
        "web": {"enabled": False},
        "assemble": {"quiet_seconds": 3600},  # complete only when the admin says so
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": dicom_port, "max_retries": 0,
                                  "timeout_seconds": 10}},
        "routes": [ROUTE],
        "runner": {"processes": 1, "max_attempts": 1, "poll_seconds": 0.2},
    }, env={"PYTHONPATH": os.environ.get("PYTHONPATH", os.pathsep.join(sys.path))})
    node.start()
    web = None
    try:
        web = console_for(node)
        yield node, web, dicom_port
    finally:
        if web is not None:
            web.stop()
        node.stop()


def _dead(web: WebNode) -> Delivery | None:
    with web.sessions() as s:
        d = s.execute(select(Delivery)).scalar_one_or_none()
        job = s.execute(select(Job)).scalar_one_or_none()
        if d is not None and str(d.state) == "dead" and job is not None \
                and str(job.state) == "succeeded":
            s.expunge(d)
            return d
    return None


def test_admin_retries_a_dead_letter_and_it_reaches_orthanc(setup: Any, browser: Any,
                                                             tmp_path: Path) -> None:
    node, web, dicom_port = setup
    files = write_ct_series(tmp_path / "ct", n=8, size=48, patient_name="Doe^Jane",
                            patient_id="PAT-A")
    storescu(node.port, files, aet="CT_SCANNER")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    page = login(browser, web, "admin")
    page.on("dialog", lambda d: d.accept())  # hx-confirm
    # the study waits (an hour's quiet period): the admin completes it now
    page.goto(f"{web.url}/studies/{study_uid}")
    assert "receiving" in page.inner_text("main")
    page.get_by_role("button", name="Force complete").click()
    page.wait_for_selector("text=Study completed")
    dead = wait_until(lambda: _dead(web), timeout=120, interval=0.5,
                      what="the delivery to be a dead letter (Orthanc is not up yet)")
    with web.sessions() as s:
        assert s.get_one(Job, dead.job_fk).study_uid == study_uid
        forced = s.execute(select(AuditEvent).where(
            AuditEvent.event_type == "study-forced-complete")).scalar_one()
        assert forced.user == "admin"
    orthanc = Orthanc(tmp_path / "orthanc", port=dicom_port)
    try:
        assert orthanc.series() == []
        page.goto(f"{web.url}/")
        page.wait_for_selector("svg.chart")
        screenshot(page, "dashboard")
        page.goto(f"{web.url}/destinations")
        dest = page.inner_text("#dest-pacs")
        assert f"127.0.0.1:{dicom_port}" in dest and "no association" in dest
        assert page.get_by_role("button", name="Retry all dead").count() == 1
        screenshot(page, "destinations")
        page.goto(f"{web.url}/jobs")
        row = page.locator(f"#delivery-{dead.id}")
        assert row.get_attribute("data-state") == "dead"
        screenshot(page, "jobs")
        row.get_by_role("button", name="Retry").click()
        # the row is swapped in place (pending), then polls until the sender has sent it
        page.wait_for_selector(f"#delivery-{dead.id}[data-state=sent]", timeout=90_000)
        assert "sent" in page.inner_text(f"#delivery-{dead.id}")
        wait_until(lambda: len(orthanc.series()) == 2, timeout=60, what="results in Orthanc")
        modalities = {s["MainDicomTags"]["Modality"] for s in orthanc.series()}
        assert modalities == {"SEG", "SR"}
        assert all(s["MainDicomTags"].get("SeriesInstanceUID") for s in orthanc.series())
        assert {orthanc.get(f"/series/{s['ID']}/study")["MainDicomTags"]["StudyInstanceUID"]
                for s in orthanc.series()} == {study_uid}
        with web.sessions() as s:
            moves = [json.loads(e.detail) | {"user": e.user} for e in s.execute(
                select(AuditEvent).where(AuditEvent.event_type == "delivery-state")).scalars()]
        assert [(m["from"], m["to"], m["user"]) for m in moves
                if m["delivery_id"] == dead.id] == [("dead", "pending", "admin")]
        page.goto(f"{web.url}/jobs")
        screenshot(page, "jobs-after-retry")
        # the other pages
        page.goto(f"{web.url}/studies")
        page.fill("input[name=patient]", "doe")
        page.click("form.filters button[type=submit]")
        page.wait_for_selector("text=Doe^Jane")
        screenshot(page, "studies")
        page.click("text=Doe^Jane")
        page.wait_for_selector("table.timeline")
        timeline = page.inner_text("table.timeline")
        assert "sent to pacs" in timeline and "dead for pacs" in timeline
        assert "completion forced by admin" in timeline
        screenshot(page, "study")
        page.goto(f"{web.url}/routes")
        page.fill("input[name=study_uid]", study_uid)
        page.click("form.route-test button[type=submit]")
        page.wait_for_selector("text=Would take: ct-threshold")
        screenshot(page, "routes")
        page.goto(f"{web.url}/plugins")
        assert "threshold" in page.inner_text("#plugins")
        screenshot(page, "plugins")
        page.goto(f"{web.url}/users")
        page.fill("#add-user input[name=name]", "newcomer")
        page.select_option("#add-user select[name=role]", "radiologist")
        page.fill("#add-user input[name=password]", "a long enough password")
        page.click("#add-user button[type=submit]")
        page.wait_for_selector("#user-newcomer")
        assert "User newcomer added." in page.inner_text("main")
        screenshot(page, "users")
        page.context.close()
    finally:
        orthanc.stop()
