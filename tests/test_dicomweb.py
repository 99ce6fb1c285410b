"""DICOMweb (/dicomweb) against a real node (``dicomnode serve`` with its console on a free
port), driven by the ``dicomweb-client`` library and plain HTTP: QIDO-RS, WADO-RS (instances,
metadata, frames, rendered), STOW-RS through the C-STORE store path into a route that runs a
real plugin and sends to a real Orthanc, authentication and bad input."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid

from dicomnode.simulate import write_ct_series
from tests.helpers import NodeProc, free_port, storescu, wait_until
from tests.orthanc import ORTHANC, Orthanc

PASSWORD = "correct horse battery"
STOW_PATIENT = "STOW001"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A node with its console (and DICOMweb) on, a route for the STOW'd patient to a real
    Orthanc, two CT studies received over C-STORE, and one user per role."""
    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    root = tmp_path_factory.mktemp("dicomweb")
    orthanc = Orthanc(root / "orthanc")
    web_port = free_port()
    node = NodeProc(root / "node", f"sqlite:///{root / 'node.db'}", overrides={
        "web": {"enabled": True, "host": "127.0.0.1", "port": web_port,
                "failure_delay_seconds": 0, "lockout_failures": 3},
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": orthanc.port}},
        "routes": [{"name": "stow-threshold",
                    "match": {"Modality": "CT", "PatientID": STOW_PATIENT},
                    "pipeline": [{"plugin": "threshold", "params": {"hu_min": 300}}],
                    "send_to": ["pacs"]}],
        "runner": {"processes": 1, "max_attempts": 1, "poll_seconds": 0.2},
    })
    node.start()
    url = f"http://127.0.0.1:{web_port}"
    wait_until(lambda: _up(url), timeout=60, what="console")
    from dicomnode.audit import AuditLog
    from dicomnode.database import make_engine, make_sessionmaker
    from dicomnode.web.auth import add_user

    sessions = make_sessionmaker(make_engine(node.db_url))
    with sessions() as s, s.begin():
        for role in ("admin", "radiologist", "auditor"):
            add_user(s, AuditLog(sessions), role, role, PASSWORD, by="test")
        add_user(s, AuditLog(sessions), "victim", "radiologist", PASSWORD, by="test")
    a = write_ct_series(root / "a", n=6, size=64, patient_id="PAT-A",
                        patient_name="Alpha^Anna")
    b = write_ct_series(root / "b", n=4, size=64, patient_id="PAT-B",
                        patient_name="Beta^Bert")
    for f in b:  # a second date for range matching
        ds = pydicom.dcmread(f)
        ds.StudyDate = "20200102"
        ds.save_as(f)
    storescu(node.port, a + b)
    wait_until(lambda: len(node.instances()) == 10, what="10 instances indexed")
    tokens = {r: _token(url, r) for r in ("admin", "radiologist", "auditor")}
    yield {"node": node, "url": url, "a": a, "b": b, "tokens": tokens, "orthanc": orthanc,
           "root": root}
    node.stop()
    orthanc.stop()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _token(url: str, name: str) -> str:
    r = httpx.post(f"{url}/api/token", data={"username": name, "password": PASSWORD},
                   timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def client(env: dict[str, Any], who: str = "radiologist") -> DICOMwebClient:
    return DICOMwebClient(url=f"{env['url']}/dicomweb",
                          headers={"Authorization": f"Bearer {env['tokens'][who]}"})


def http(env: dict[str, Any], who: str | None = "radiologist") -> httpx.Client:
    headers = {"Authorization": f"Bearer {env['tokens'][who]}"} if who else {}
    return httpx.Client(base_url=f"{env['url']}/dicomweb", headers=headers, timeout=60)


def uid(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


# -- QIDO-RS --------------------------------------------------------------------------------------


def test_qido_studies_filters_includefield_limit_offset(env: dict[str, Any]) -> None:
    c = client(env)
    studies = c.search_for_studies()
    assert len(studies) == 2
    a_uid = str(pydicom.dcmread(env["a"][0]).StudyInstanceUID)
    [a] = c.search_for_studies(search_filters={"PatientID": "PAT-A"})
    assert uid(a, "0020000D") == a_uid
    assert a["00201208"]["Value"] == [6] and a["00080061"]["Value"] == ["CT"]
    assert a["00100010"]["Value"] == [{"Alphabetic": "Alpha^Anna"}]
    [b] = c.search_for_studies(search_filters={"StudyDate": "20200101-20200131"})
    assert b["00100020"]["Value"] == ["PAT-B"]
    assert len(c.search_for_studies(search_filters={"PatientName": "Alpha*"})) == 1
    # fuzzymatching: person names ignore case
    assert len(c.search_for_studies(search_filters={"PatientName": "alpha^anna"},
                                     fuzzymatching=True)) == 1
    assert c.search_for_studies(search_filters={"PatientName": "alpha^anna"}) == []
    # includefield: a series attribute is not offered at study level; study ones are
    [a2] = c.search_for_studies(search_filters={"PatientID": "PAT-A"},
                                fields=["IssuerOfPatientID", "00100021"])
    assert "00100021" in a2 and "00100021" not in a
    [a3] = c.search_for_studies(search_filters={"PatientID": "PAT-A"}, fields=["all"])
    assert set(a3) > set(a)
    assert len(c.search_for_studies(limit=1)) == 1
    first = c.search_for_studies(limit=1)[0]
    second = c.search_for_studies(limit=1, offset=1)[0]
    assert uid(first, "0020000D") != uid(second, "0020000D")


def test_qido_series_and_instances(env: dict[str, Any]) -> None:
    c = client(env)
    a = pydicom.dcmread(env["a"][0])
    [series] = c.search_for_series(str(a.StudyInstanceUID))
    assert uid(series, "0020000E") == str(a.SeriesInstanceUID)
    assert series["00201209"]["Value"] == [6]
    assert len(c.search_for_series(search_filters={"Modality": "CT"})) == 2
    instances = c.search_for_instances(str(a.StudyInstanceUID), str(a.SeriesInstanceUID))
    assert {uid(i, "00080018") for i in instances} == {
        str(pydicom.dcmread(f).SOPInstanceUID) for f in env["a"]}
    [one] = c.search_for_instances(search_filters={"SOPInstanceUID": str(a.SOPInstanceUID)})
    assert uid(one, "0020000D") == str(a.StudyInstanceUID)
    assert one["00081190"]["Value"][0].endswith(f"/instances/{a.SOPInstanceUID}")
    assert len(c.search_for_instances(str(a.StudyInstanceUID), limit=2, offset=5)) == 1


def test_qido_invalid_parameters_are_400_with_the_reason(env: dict[str, Any]) -> None:
    with http(env) as h:
        for query, reason in (("StudyDate=2020", "YYYYMMDD"), ("limit=-1", "limit"),
                              ("fuzzymatching=maybe", "true or false"),
                              ("NoSuchKeyword=1", "not a DICOM attribute"),
                              ("includefield=Bogus", "not a DICOM attribute"),
                              ("Modality=CT", "series-level"),
                              ("StudyInstanceUID=abc", "not a UID")):
            r = h.get(f"/studies?{query}")
            assert r.status_code == 400, (query, r.text)
            assert reason in r.json()["detail"], (query, r.text)
        assert h.get(f"/studies/{generate_uid()}/series").status_code == 404
    refused = [e for e in env["node"].audit("dicomweb-query") if "refused" in e["detail"]]
    assert any("YYYYMMDD" in e["detail"]["refused"] and e["user"] == "radiologist"
               for e in refused)


# -- WADO-RS --------------------------------------------------------------------------------------


def _stored_paths(env: dict[str, Any]) -> dict[str, Path]:
    node: NodeProc = env["node"]
    return {k: node.storage / v["path"] for k, v in node.instances().items()}


def test_wado_study_is_the_stored_files_byte_for_byte(env: dict[str, Any]) -> None:
    a = pydicom.dcmread(env["a"][0])
    stored = _stored_paths(env)
    with http(env) as h:
        r = h.get(f"/studies/{a.StudyInstanceUID}",
                  headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200, r.text
    ctype = r.headers["content-type"]
    assert ctype.startswith('multipart/related; type="application/dicom"')
    boundary = re.search(r"boundary=(\S+)", ctype).group(1)  # type: ignore[union-attr]
    parts = r.content.split(f"--{boundary}".encode())[1:-1]
    assert len(parts) == 6
    for part in parts:
        body = part.split(b"\r\n\r\n", 1)[1][:-2]
        ds = pydicom.dcmread(io.BytesIO(body))
        assert body == stored[str(ds.SOPInstanceUID)].read_bytes()
    # and through dicomweb-client
    got = client(env).retrieve_study(str(a.StudyInstanceUID))
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(
        str(pydicom.dcmread(f).SOPInstanceUID) for f in env["a"])


def test_wado_metadata_frames_rendered(env: dict[str, Any]) -> None:
    c = client(env)
    a = pydicom.dcmread(env["a"][2])
    meta = c.retrieve_study_metadata(str(a.StudyInstanceUID))
    assert len(meta) == 6
    mine = next(m for m in meta if uid(m, "00080018") == str(a.SOPInstanceUID))
    assert mine["00280010"]["Value"] == [a.Rows]
    assert mine["7FE00010"]["BulkDataURI"].endswith(
        f"/instances/{a.SOPInstanceUID}/bulkdata/7FE00010")
    assert "InlineBinary" not in mine["7FE00010"]
    [frame] = c.retrieve_instance_frames(str(a.StudyInstanceUID), str(a.SeriesInstanceUID),
                                         str(a.SOPInstanceUID), frame_numbers=[1])
    assert frame == a.PixelData
    png = c.retrieve_instance_rendered(str(a.StudyInstanceUID), str(a.SeriesInstanceUID),
                                       str(a.SOPInstanceUID), media_types=("image/png",),
                                       params={"window": "40,400,linear"})
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert img.shape == (a.Rows, a.Columns) and img.dtype == np.uint8
    hu = a.pixel_array.astype(float) * float(a.RescaleSlope) + float(a.RescaleIntercept)
    assert (img[hu <= 40 - 200] == 0).all() and (img[hu >= 40 + 200] == 255).all()
    with http(env) as h:
        base = f"/studies/{a.StudyInstanceUID}/series/{a.SeriesInstanceUID}/instances/" \
               f"{a.SOPInstanceUID}"
        r = h.get(f"{base}/rendered", params={"window": "40"}, headers={"Accept": "image/png"})
        assert r.status_code == 400 and "center,width" in r.text
        r = h.get(f"{base}/frames/2")
        assert r.status_code == 404 and "out of range" in r.text
        r = h.get(base, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                           "transfer-syntax=1.2.840.10008.1.2.4.50"})
        assert r.status_code == 406 and "stored" in r.text
        r = h.get(base, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                           "transfer-syntax=*"})
        assert r.status_code == 200
        assert h.get(f"/studies/{generate_uid()}").status_code == 404
        assert h.get(f"/studies/{a.StudyInstanceUID}/series/{generate_uid()}/metadata"
                     ).status_code == 404


def test_wado_streams_a_large_study_with_flat_memory(env: dict[str, Any]) -> None:
    """~200 MB of files retrieved at once: the node's RSS grows by far less than that."""
    root: Path = env["root"]
    files = write_ct_series(root / "big", n=400, size=512, patient_id="BIG")  # 400 × 0.5 MB
    storescu(env["node"].port, files)
    wait_until(lambda: sum(1 for v in env["node"].instances().values()
                           if v["study_uid"] == str(pydicom.dcmread(files[0]).StudyInstanceUID)
                           ) == 400, timeout=120, what="big study indexed")
    total = sum(f.stat().st_size for f in files)
    assert total > 200e6
    proc = psutil.Process(env["node"].proc.pid)  # type: ignore[union-attr]
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    before = proc.memory_info().rss
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    got = 0
    with http(env) as h, h.stream("GET", f"/studies/{pydicom.dcmread(files[0]).StudyInstanceUID}"
                                  ) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes(1 << 20):
            got += len(chunk)
    done.set()
    t.join()
    assert got > total
    assert peak[0] - before < 60e6, f"RSS grew by {(peak[0] - before) / 1e6:.0f} MB"


# -- STOW-RS --------------------------------------------------------------------------------------


def test_stow_stores_completes_and_routes(env: dict[str, Any]) -> None:
    root: Path = env["root"]
    node: NodeProc = env["node"]
    files = write_ct_series(root / "stow", n=5, size=64, patient_id=STOW_PATIENT)
    datasets = [pydicom.dcmread(f) for f in files]
    study = str(datasets[0].StudyInstanceUID)
    resp = client(env, "admin").store_instances(datasets)
    assert len(resp.ReferencedSOPSequence) == 5
    assert "FailedSOPSequence" not in resp
    [found] = client(env).search_for_studies(search_filters={"StudyInstanceUID": study})
    assert found["00201208"]["Value"] == [5]
    stored = {k: v for k, v in node.instances().items() if v["study_uid"] == study}
    assert len(stored) == 5
    # the assembler completes it (no association) and the route's plugin runs and sends
    wait_until(lambda: any(c["study_uid"] == study for c in node.completions()), timeout=60,
               what="STOW'd study complete")
    wait_until(lambda: any(d["state"] == "sent" for j in node.jobs() for d in j["deliveries"]),
               timeout=120, what="route's results sent")
    assert env["orthanc"].get("/statistics")["CountInstances"] >= 1
    received = [e for e in node.audit("instances-received") if e["user"] == "admin"]
    assert received and received[-1]["detail"]["instances"] == 5
    # the same again: duplicates, stored once
    resp2 = client(env, "admin").store_instances(datasets[:1])
    assert len(resp2.ReferencedSOPSequence) == 1
    assert len({k for k, v in node.instances().items() if v["study_uid"] == study}) == 5


def test_stow_malformed_part_fails_with_reason_nothing_half_stored(env: dict[str, Any]
                                                                   ) -> None:
    root: Path = env["root"]
    node: NodeProc = env["node"]
    [good] = write_ct_series(root / "stow-bad", n=1, size=32, patient_id="STOWBAD")
    raw = good.read_bytes()
    truncated = raw[:len(raw) - 500]  # pixel data cut short
    boundary = "b0undary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in (raw, truncated, b"not dicom at all")) + f"--{boundary}--\r\n".encode()
    before = set(node.instances())
    files_before = {p for p in node.storage.rglob("*") if p.is_file()}
    with http(env, "admin") as h:
        r = h.post("/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert len(out["00081199"]["Value"]) == 1
    failed = out["00081198"]["Value"]
    assert len(failed) == 2
    assert all(f["00081197"]["Value"][0] >= 0xA000 for f in failed)
    assert any("Part 10" in f["00000902"]["Value"][0] for f in failed)
    new = set(node.instances()) - before
    assert new == {str(pydicom.dcmread(good).SOPInstanceUID)}
    files_after = {p for p in node.storage.rglob("*") if p.is_file()}
    assert len(files_after - files_before) == 1  # the good one; nothing of the truncated one
    # the URL's study must match the parts'
    with http(env, "admin") as h:
        r = h.post(f"/studies/{generate_uid()}", content=body.replace(truncated, raw[:0]),
                   headers={"Content-Type": "multipart/related; type=\"application/dicom\"; "
                                            f"boundary={boundary}"})
    assert r.status_code == 409, r.text
    with http(env, "admin") as h:
        r = h.post("/studies", content=raw, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 415 and "boundary" in r.text
    refused = node.audit("store-refused")
    assert any(e["user"] == "admin" and "boundary" in e["detail"]["reason"] for e in refused)


# -- authentication -----------------------------------------------------------------------------


def test_auth(env: dict[str, Any]) -> None:
    url = env["url"] + "/dicomweb/studies"
    r = httpx.get(url)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="dicomnode", Bearer'
    basic = base64.b64encode(f"radiologist:{PASSWORD}".encode()).decode()
    assert httpx.get(url, headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {env['tokens']['radiologist']}"}
                     ).status_code == 200
    r = httpx.get(url, headers={"Authorization": f"Bearer {env['tokens']['auditor']}"})
    assert r.status_code == 403 and "studies:read" in r.text
    # a radiologist reads but does not store
    with http(env, "radiologist") as h:
        r = h.post("/studies", content=b"--x--", headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert r.status_code == 403 and "studies:store" in r.text
    # wrong passwords over Basic count towards the lock-out (lockout_failures: 3)
    wrong = base64.b64encode(b"victim:wrong password!").decode()
    for _ in range(3):
        assert httpx.get(url, headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(f"victim:{PASSWORD}".encode()).decode()
    r = httpx.get(url, headers={"Authorization": f"Basic {right}"})
    assert r.status_code == 401 and "locked" in r.text
    assert httpx.get(url, headers={"Authorization": "Basic !!!"}).status_code == 401


def test_session_cookie_reads_only(env: dict[str, Any]) -> None:
    with httpx.Client(base_url=env["url"], timeout=30) as h:
        page = h.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        data = {"username": "radiologist", "password": PASSWORD}
        if csrf:
            data["csrf_token"] = csrf.group(1)
        r = h.post("/login", data=data)
        assert r.status_code in (200, 303), r.text
        assert h.get("/dicomweb/studies").status_code == 200


def test_cors_only_on_dicomweb(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicomnode.config import Settings
    from dicomnode.database import make_engine, make_sessionmaker, upgrade
    from dicomnode.web.app import create_app

    s = Settings(storage={"path": str(tmp_path / "d")},  # type: ignore[arg-type]
                 database={"url": f"sqlite:///{tmp_path / 'db'}"},  # type: ignore[arg-type]
                 dicomweb={"cors_origins": ["https://viewer.example"]})  # type: ignore[arg-type]
    upgrade(s.database_url)
    app = create_app(s, make_sessionmaker(make_engine(s.database_url)))
    c = TestClient(app)  # type: ignore[arg-type]
    pre = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
           "Access-Control-Request-Headers": "Authorization"}
    r = c.options("/dicomweb/studies", headers=pre)
    assert r.headers.get("access-control-allow-origin") == "https://viewer.example"
    r = c.options("/api/studies", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = c.options("/dicomweb/studies", headers={**pre, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_stow_to_the_console_alone_then_the_node_completes_it(tmp_path: Path) -> None:
    """``dicomnode web`` without the node: STOW-RS stores through its own InstanceStore
    (files and index rows, no association); a node started later on the same database and
    storage completes the study."""
    from tests.web import start_web, web_settings

    w = start_web(web_settings(tmp_path))
    try:
        files = write_ct_series(tmp_path / "ct", n=3, size=32, patient_id="ALONE")
        c = DICOMwebClient(url=f"{w.url}/dicomweb",
                           headers={"Authorization": f"Bearer {w.token('admin')}"})
        resp = c.store_instances([pydicom.dcmread(f) for f in files])
        assert len(resp.ReferencedSOPSequence) == 3
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        got = c.retrieve_study(study)
        assert sorted(d.SOPInstanceUID for d in got) == sorted(
            pydicom.dcmread(f).SOPInstanceUID for f in files)
    finally:
        w.stop()
    node = NodeProc(tmp_path, w.settings.database_url).start()
    try:
        wait_until(lambda: any(c["study_uid"] == study for c in node.completions()),
                   timeout=60, what="the STOW'd study complete")
        [row] = [s for s in node.studies() if s["study_uid"] == study]
        assert row["state"] == "complete"
    finally:
        node.stop()


def test_frames_of_a_compressed_instance_are_decoded(env: dict[str, Any]) -> None:
    """An RLE Lossless instance (stored as sent): its frame comes back as the raw native
    pixel bytes; the instance itself in its stored syntax; metadata says OB."""
    from pydicom.uid import RLELossless

    [f] = write_ct_series(env["root"] / "rle", n=1, size=64, patient_id="RLE")
    ds = pydicom.dcmread(f)
    native = ds.pixel_array.tobytes()
    ds.compress(RLELossless)
    resp = client(env, "admin").store_instances([ds])
    assert len(resp.ReferencedSOPSequence) == 1
    c = client(env)
    ids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    [frame] = c.retrieve_instance_frames(*ids, frame_numbers=[1])
    assert frame == native
    [meta] = c.retrieve_series_metadata(*ids[:2])
    assert meta["7FE00010"]["vr"] == "OB" and "BulkDataURI" in meta["7FE00010"]
    [got] = c.retrieve_series(*ids[:2])
    assert got.file_meta.TransferSyntaxUID == RLELossless
    with http(env) as h:
        r = h.get(f"/studies/{ids[0]}/series/{ids[1]}/instances/{ids[2]}/rendered",
                  headers={"Accept": "image/jpeg"})
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
