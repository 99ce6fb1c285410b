"""The Query/Retrieve SCP against real dcmtk clients: findscu (Patient and Study Root, every
matching type), movescu into a dcmtk storescp and getscu into a folder (bit for bit), refusals,
max_results, C-CANCEL, malformed identifiers; every query and retrieve audited."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, insert, select, text

from dicomnode.schema import AuditEvent, Patient, Study, utcnow
from dicomnode.simulate.series import write_ct_series
from tests.helpers import (
    IN_CI,
    NodeProc,
    dcmtk,
    dcmtk_env,
    free_port,
    split_part10,
    storescu,
    wait_until,
)
from tests.orthanc import ORTHANC, Orthanc

STUDY_A, STUDY_B = generate_uid(), generate_uid()
MAX_RESULTS = 1000


def _prepare(tmp: Path) -> dict[str, Path]:
    """Study A: Doe^John, 2024-01-05, 4 CT slices. Study B: Müller^Anna (Latin-1 on the
    wire), 2024-06-10, an RLE-compressed MR (stored compressed)."""
    files: dict[str, Path] = {}
    for p in write_ct_series(tmp / "a", n=4, size=32, study_uid=STUDY_A, patient_id="P1",
                             patient_name="Doe^John"):
        ds = pydicom.dcmread(p)
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240105", "101500", "ACC1"
        ds.save_as(p)
        files[ds.SOPInstanceUID] = p
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_B, generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = "Müller^Anna", "P2"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240610", "230000", "ACC2"
    p = tmp / "b.dcm"
    ds.save_as(p, enforce_file_format=True)
    files[ds.SOPInstanceUID] = p
    return files


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("qr")
    files = _prepare(tmp / "in")
    store_port, orthanc_port = free_port(), free_port()
    modalities = {
        "ws": {"ae_title": "FINDSCU", "host": "127.0.0.1", "port": 1, "allow": ["find"]},
        "mover": {"ae_title": "MOVESCU", "host": "127.0.0.1", "port": 1,
                  "allow": ["find", "move"]},
        "getter": {"ae_title": "GETSCU", "host": "127.0.0.1", "port": 1, "allow": ["get"]},
        "sink": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": store_port},
        "sender": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 1,
                   "allow": ["store"]},
        "orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port,
                    "allow": ["find", "move"]},
    }
    node = NodeProc(workdir=tmp / "node", db_url=f"sqlite:///{tmp / 'node' / 'index.sqlite3'}",
                    overrides={"modalities": modalities,
                               "query": {"max_results": MAX_RESULTS},
                               "access": {"allowed_calling_aets": ["STORESCU"]}})
    node.start()
    sink_dir = tmp / "sink"
    sink_dir.mkdir()
    sink = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "+xa", "-od",
                             str(sink_dir), str(store_port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        storescu(node.port, [f for f in files.values() if f.name != "b.dcm"])
        # the RLE MR in its own association, proposed only in RLE: stored compressed
        storescu(node.port, [tmp / "in" / "b.dcm"], flag="-xr")
        engine = create_engine(node.db_url)
        wait_until(lambda: _count(engine, "instances") == len(files), what="instances indexed")
        yield {"node": node, "files": files, "tmp": tmp, "sink": sink_dir, "engine": engine,
               "orthanc_port": orthanc_port}
    finally:
        sink.terminate()
        sink.wait(10)
        node.stop()


def _count(engine: Any, table: str) -> int:
    with engine.connect() as c:
        return int(c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def _events(engine: Any, kind: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        rows = c.execute(select(AuditEvent).where(AuditEvent.event_type == kind)
                         .order_by(AuditEvent.seq)).all()
    return [{**r._mapping, "detail": json.loads(r.detail)} for r in rows]


def findscu(qr: dict[str, Any], keys: list[str], *, model: str = "-S", aet: str = "FINDSCU",
            extra: list[str] = (), query_file: Path | None = None,  # type: ignore[assignment]
            ) -> tuple[list[pydicom.Dataset], str]:
    out = Path(qr["tmp"]) / f"find-{generate_uid()[-12:]}"
    out.mkdir()
    cmd = [dcmtk("findscu"), "-v", model, "-aec", "DICOMNODE", "-aet", aet, "-X", "-od",
           str(out), "-to", "20", *extra]
    for k in keys:
        cmd += ["-k", k]
    cmd += ["127.0.0.1", str(qr["node"].port)]
    if query_file is not None:
        cmd.append(str(query_file))
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120,
                       env=dcmtk_env())
    found = [pydicom.dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]
    shutil.rmtree(out)
    return found, p.stdout + p.stderr


# how dcmtk (3.6.7, -v) names a final status
_DCMTK_NAMES = {0xA900: "datasetdoesnotmatchsopclass", 0xA700: "outofresources",
                0xFE00: "cancel", 0xA801: "movedestinationunknown", 0x0124: "0x0124"}


def _shows(out: str, status: int) -> bool:
    low = out.lower().replace(" ", "")
    return f"0x{status:04x}" in low or f"0x{status:x}" in low or _DCMTK_NAMES[status] in low


def _study_uids(found: list[pydicom.Dataset]) -> list[str]:
    return sorted(str(d.StudyInstanceUID) for d in found)


def test_find_study_root_matching(qr: dict[str, Any]) -> None:
    both = sorted([STUDY_A, STUDY_B])
    L = "QueryRetrieveLevel=STUDY"
    # single value, UID list, wildcard, date range, universal
    assert _study_uids(findscu(qr, [L, f"StudyInstanceUID={STUDY_A}"])[0]) == [STUDY_A]
    assert _study_uids(findscu(qr, [L, f"StudyInstanceUID={STUDY_A}\\{STUDY_B}"])[0]) == both
    assert _study_uids(findscu(qr, [L, "PatientName=Doe*", "StudyInstanceUID"])[0]) == [
        STUDY_A]
    assert _study_uids(findscu(qr, [L, "AccessionNumber=ACC?", "StudyInstanceUID"])[0]) == both
    assert _study_uids(findscu(qr, [L, "StudyDate=20240201-", "StudyInstanceUID"])[0]) == [
        STUDY_B]
    assert _study_uids(findscu(qr, [L, "StudyDate=-20240131", "StudyInstanceUID"])[0]) == [
        STUDY_A]
    assert _study_uids(findscu(qr, [L, "StudyDate=20240101-20241231",
                                    "StudyInstanceUID"])[0]) == both
    assert _study_uids(findscu(qr, [L, "PatientName=*", "StudyInstanceUID"])[0]) == both
    # case-sensitive unless query.fuzzy_person_names
    assert findscu(qr, [L, "PatientName=doe*", "StudyInstanceUID"])[0] == []
    # empty = return the value
    found, _ = findscu(qr, [L, f"StudyInstanceUID={STUDY_A}", "PatientName", "StudyDate",
                            "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                            "InstitutionName"])
    (d,) = found
    assert str(d.PatientName) == "Doe^John" and d.StudyDate == "20240105"
    assert d.ModalitiesInStudy == "CT" and int(d.NumberOfStudyRelatedInstances) == 4
    assert d.InstitutionName == ""  # not in the index: returned empty
    assert d.QueryRetrieveLevel == "STUDY"
    events = _events(qr["engine"], "query")
    assert any(e["source_aet"] == "FINDSCU" and e["detail"]["query"].get("PatientName")
               == "Doe*" for e in events)


def test_find_patient_root_and_lower_levels(qr: dict[str, Any]) -> None:
    found, _ = findscu(qr, ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName=Doe^John",
                            "NumberOfPatientRelatedStudies"], model="-P")
    (d,) = found
    assert d.PatientID == "P1" and int(d.NumberOfPatientRelatedStudies) == 1
    found, _ = findscu(qr, ["QueryRetrieveLevel=SERIES", "PatientID=P1",
                            f"StudyInstanceUID={STUDY_A}", "SeriesInstanceUID", "Modality=CT",
                            "NumberOfSeriesRelatedInstances"], model="-P")
    (d,) = found
    assert int(d.NumberOfSeriesRelatedInstances) == 4
    found, _ = findscu(qr, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_A}",
                            f"SeriesInstanceUID={d.SeriesInstanceUID}", "SOPInstanceUID",
                            "InstanceNumber"])
    assert len(found) == 4 and {int(x.InstanceNumber) for x in found} == {1, 2, 3, 4}
    # Study Root has no PATIENT level
    found, out = findscu(qr, ["QueryRetrieveLevel=PATIENT", "PatientID"], model="-S")
    assert found == [] and _shows(out, 0xA900)


def test_find_character_set(qr: dict[str, Any]) -> None:
    """A Latin-1 request (ISO_IR 100) matches the name stored from a Latin-1 instance; the
    answer comes in UTF-8 (ISO_IR 192)."""
    q = pydicom.Dataset()
    q.SpecificCharacterSet = "ISO_IR 100"
    q.QueryRetrieveLevel = "STUDY"
    q.PatientName = "Müller*"
    q.StudyInstanceUID = ""
    path = Path(qr["tmp"]) / "latin1.dcm"
    q.save_as(path, implicit_vr=False, little_endian=True)
    assert b"M\xfcller" in path.read_bytes()
    found, _ = findscu(qr, [], query_file=path)
    (d,) = found
    assert d.StudyInstanceUID == STUDY_B and str(d.PatientName) == "Müller^Anna"
    assert d.SpecificCharacterSet == "ISO_IR 192"


def test_refusals_and_bad_identifiers(qr: dict[str, Any]) -> None:
    engine = qr["engine"]
    before = len(_events(engine, "query-refused"))
    found, out = findscu(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], aet="STRANGER")
    assert found == []
    assert _shows(out, 0x0124) or "rejected" in out.lower()
    found, out = findscu(qr, ["QueryRetrieveLevel=STUDY", "StudyDate=notadate"])
    assert found == [] and _shows(out, 0xA900)
    found, out = findscu(qr, ["QueryRetrieveLevel=STUDY", "PatientName=" + "x" * 65000])
    assert found == [] and _shows(out, 0xA900)
    found, out = findscu(qr, ["QueryRetrieveLevel=STUDY", "(0009,0010)=PRIVATE"])
    assert found == [] and _shows(out, 0xA900)
    refused = _events(engine, "query-refused")[before:]
    reasons = " | ".join(e["detail"]["reason"] for e in refused)
    assert "not a DA" in reasons and "more than the 324" in reasons and "private" in reasons


def test_max_results_and_cancel(qr: dict[str, Any]) -> None:
    engine = qr["engine"]
    now = utcnow()
    with engine.begin() as c:
        pk = c.execute(insert(Patient).values(patient_id="BULK", issuer="",
                                              patient_name="Bulk^Patient", birth_date="",
                                              sex="")).inserted_primary_key[0]
        c.execute(insert(Study), [
            {"study_uid": f"1.2.826.0.1.3680043.99.{i}", "patient_fk": pk,
             "study_date": "20200101", "study_time": "", "accession_number": "",
             "study_id": "", "study_description": "", "referring_physician": "",
             "state": "complete", "revision": 1, "num_instances": 0,
             "first_received_at": now, "last_received_at": now} for i in range(5000)])
    found, out = findscu(qr, ["QueryRetrieveLevel=STUDY", "PatientID=BULK",
                              "StudyInstanceUID"])
    assert len(found) == MAX_RESULTS
    assert _shows(out, 0xA700) or "out of resources" in out.lower(), out[-2000:]
    cut = [e for e in _events(engine, "query") if e["detail"].get("truncated")]
    assert cut and cut[-1]["detail"]["matches"] == MAX_RESULTS
    # C-CANCEL after 10 responses
    found, out = findscu(qr, ["QueryRetrieveLevel=STUDY", "PatientID=BULK",
                              "StudyInstanceUID"], extra=["--cancel", "10"])
    assert len(found) < MAX_RESULTS
    assert _shows(out, 0xFE00) or "cancel" in out.lower()
    wait_until(lambda: any(e["detail"].get("cancelled") for e in _events(engine, "query")),
               what="the cancelled query audited")


def _dataset_bytes(path: Path) -> tuple[str, bytes]:
    return split_part10(path)


def _stored(qr: dict[str, Any], uid: str) -> Path:
    """The node's file of an instance: the bytes it received, which retrieval must send."""
    with qr["engine"].connect() as c:
        rel = c.execute(text("SELECT path FROM instances WHERE sop_instance_uid = :u"),
                        {"u": uid}).scalar_one()
    return Path(qr["node"].storage) / rel


def test_move_bit_for_bit(qr: dict[str, Any]) -> None:
    sink: Path = qr["sink"]
    for uid in (STUDY_A, STUDY_B):
        p = subprocess.run([dcmtk("movescu"), "-v", "-S", "-aec", "DICOMNODE", "-aet",
                            "MOVESCU", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={uid}", "127.0.0.1",
                            str(qr["node"].port)], capture_output=True, text=True,
                           timeout=120, env=dcmtk_env())
        assert p.returncode == 0, p.stdout + p.stderr
    wait_until(lambda: len(list(sink.iterdir())) >= len(qr["files"]), what="instances moved")
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
           for f in sink.iterdir()}
    for uid in qr["files"]:
        assert _dataset_bytes(got[uid]) == _dataset_bytes(_stored(qr, uid)), uid
    # the RLE MR went in RLE (storescp +xa accepts it): as stored, not decompressed
    assert any(_dataset_bytes(f)[0] == "1.2.840.10008.1.2.5" for f in got.values())
    moved = _events(qr["engine"], "instances-moved")
    assert moved[-1]["dest_aet"] == "STORESCP" and moved[-1]["detail"]["completed"] == 1
    assert moved[-2]["detail"]["completed"] == 4


def test_move_to_unknown_destination(qr: dict[str, Any]) -> None:
    p = subprocess.run([dcmtk("movescu"), "-v", "-S", "-aec", "DICOMNODE", "-aet", "MOVESCU",
                        "-aem", "NOBODY", "-k", "QueryRetrieveLevel=STUDY", "-k",
                        f"StudyInstanceUID={STUDY_A}", "127.0.0.1", str(qr["node"].port)],
                       capture_output=True, text=True, timeout=60, env=dcmtk_env())
    out = p.stdout + p.stderr
    assert _shows(out, 0xA801), out
    refused = _events(qr["engine"], "retrieve-refused")
    assert refused[-1]["dest_aet"] == "NOBODY" and refused[-1]["detail"]["status"] == "0xA801"


def _getscu(qr: dict[str, Any], out: Path, extra: list[str]) -> str:
    out.mkdir()
    p = subprocess.run([dcmtk("getscu"), "-v", "-S", "-aec", "DICOMNODE", "-aet", "GETSCU",
                        *extra, "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k",
                        f"StudyInstanceUID={STUDY_A}\\{STUDY_B}", "127.0.0.1",
                        str(qr["node"].port)], capture_output=True, text=True, timeout=120,
                       env=dcmtk_env())
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.mark.parametrize("offer", ["uncompressed", "rle"])
def test_get_bit_for_bit_and_fallback(qr: dict[str, Any], offer: str) -> None:
    """C-GET: for the classes getscu will store (role selection) the node takes getscu's
    transfer syntax order. An instance stored in the syntax taken arrives bit for bit; any
    other is converted with pydicom (decompressed, or RLE-encoded when getscu takes only
    RLE): same SOP Instance UID, same pixels."""
    tmp = Path(qr["tmp"])
    _getscu(qr, tmp / f"get-{offer}", ["+xr"] if offer == "rle" else [])
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
           for f in (tmp / f"get-{offer}").iterdir()}
    assert set(got) == set(qr["files"])
    as_stored = 0
    for uid, src in qr["files"].items():
        stored = _stored(qr, uid)
        arrived_ts = _dataset_bytes(got[uid])[0]
        if arrived_ts == _dataset_bytes(stored)[0]:
            assert _dataset_bytes(got[uid]) == _dataset_bytes(stored), uid
            as_stored += 1
        else:
            a, b = pydicom.dcmread(got[uid]), pydicom.dcmread(src)
            assert np.array_equal(a.pixel_array, b.pixel_array), uid
            assert a.PatientName == b.PatientName and a.StudyDate == b.StudyDate
            assert arrived_ts == ("1.2.840.10008.1.2.5" if offer == "rle"
                                  else "1.2.840.10008.1.2.1")
    # uncompressed: the 4 CT as stored (Explicit VR LE), the RLE MR decompressed;
    # rle: the MR as stored, the 4 CT RLE-encoded
    assert as_stored == (4 if offer == "uncompressed" else 1)
    events = _events(qr["engine"], "instances-retrieved")
    assert events[-1]["source_aet"] == "GETSCU" and events[-1]["detail"]["completed"] == 5


def test_get_not_allowed(qr: dict[str, Any]) -> None:
    out = Path(qr["tmp"]) / "get-refused"
    out.mkdir()
    p = subprocess.run([dcmtk("getscu"), "-v", "-S", "-aec", "DICOMNODE", "-aet", "MOVESCU",
                        "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k",
                        f"StudyInstanceUID={STUDY_A}", "127.0.0.1", str(qr["node"].port)],
                       capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert list(out.iterdir()) == []
    assert _shows(p.stdout + p.stderr, 0x0124), p.stdout + p.stderr
    refused = _events(qr["engine"], "retrieve-refused")
    assert refused[-1]["source_aet"] == "MOVESCU" and "not allowed to get" in \
        refused[-1]["detail"]["reason"]


@pytest.mark.orthanc
def test_orthanc_as_query_retrieve_client(qr: dict[str, Any]) -> None:
    """Orthanc (Debian) queries the node through its REST API (/modalities/{id}/query) and
    retrieves a study by C-MOVE to itself: the instances arrive in Orthanc as stored."""
    if not Path(ORTHANC).exists():
        if IN_CI:
            raise AssertionError("Orthanc (Debian package orthanc) must be installed in CI")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    o = Orthanc(Path(qr["tmp"]) / "orthanc", port=qr["orthanc_port"],
                modalities={"node": ["DICOMNODE", "127.0.0.1", qr["node"].port]})
    try:
        q = o.post("/modalities/node/query", {"Level": "Study",
                                              "Query": {"PatientName": "Doe*",
                                                        "StudyDate": "20240101-20240131"}})
        answers = o.get(f"/queries/{q['ID']}/answers")
        assert len(answers) == 1
        content = o.get(f"/queries/{q['ID']}/answers/0/content?simplify")
        assert content["StudyInstanceUID"] == STUDY_A
        o.post(f"/queries/{q['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
        wait_until(lambda: len(o.get("/instances")) == 4, what="the study in Orthanc")
        for iid in o.get("/instances"):
            f = o.instance_file(iid, Path(qr["tmp"]) / f"orthanc-{iid}.dcm")
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert _dataset_bytes(f)[1] == _dataset_bytes(_stored(qr, uid))[1]
    finally:
        o.stop()
    queries = [e for e in _events(qr["engine"], "query") if e["source_aet"] == "ORTHANC"]
    assert queries and queries[-1]["detail"]["matches"] == 1
    moved = [e for e in _events(qr["engine"], "instances-moved") if e["dest_aet"] == "ORTHANC"]
    assert moved and moved[-1]["detail"]["completed"] == 4


def test_find_case_insensitive_names_when_configured(tmp_path: Path) -> None:
    """query.fuzzy_person_names: true → PatientName matches whatever the case. The index rows
    are written through SQL: a C-FIND needs no files."""
    node = NodeProc(workdir=tmp_path / "node",
                    db_url=f"sqlite:///{tmp_path / 'node' / 'index.sqlite3'}",
                    overrides={"query": {"fuzzy_person_names": True},
                               "modalities": {"ws": {"ae_title": "FINDSCU",
                                                     "host": "127.0.0.1", "port": 1,
                                                     "allow": ["find"]}}})
    node.start()
    try:
        engine = create_engine(node.db_url)
        now, uid = utcnow(), generate_uid()
        with engine.begin() as c:
            pk = c.execute(insert(Patient).values(patient_id="F1", issuer="",
                                                  patient_name="DOE^JANE", birth_date="",
                                                  sex="")).inserted_primary_key[0]
            c.execute(insert(Study).values(
                study_uid=uid, patient_fk=pk, study_date="20240101", study_time="",
                accession_number="", study_id="", study_description="",
                referring_physician="", state="complete", revision=1, num_instances=0,
                first_received_at=now, last_received_at=now))
        found, _ = findscu({"tmp": tmp_path, "node": node},
                           ["QueryRetrieveLevel=STUDY", "PatientName=doe^j*",
                            "StudyInstanceUID"])
        assert [str(d.StudyInstanceUID) for d in found] == [uid]
        found, _ = findscu({"tmp": tmp_path, "node": node},
                           ["QueryRetrieveLevel=STUDY", "PatientName=Doe^Jane",
                            "StudyInstanceUID"])
        assert [str(d.PatientName) for d in found] == ["DOE^JANE"]
    finally:
        node.stop()
