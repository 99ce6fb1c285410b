"""dicomnode.query: PS3.4 C.2.2.2 matching over the index, on SQLite and PostgreSQL (no files)."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.database import make_engine, upgrade
from dicomnode.query import Level, Model, Query, QueryError, query_from_dataset, run_query
from dicomnode.schema import Instance, Patient, Series, Study, utcnow


def _fill(session: Session) -> None:
    now = utcnow()
    p1 = Patient(patient_id="P1", patient_name="Müller^Anna", birth_date="19700101", sex="F")
    p2 = Patient(patient_id="P2", patient_name="DOE^JOHN", birth_date="19800202", sex="M")
    p3 = Patient(patient_id="P_3%", patient_name="doe^jane", birth_date="", sex="F")
    session.add_all([p1, p2, p3])
    session.flush()
    rows = [(p1, "1.2.1", "20240105", "101500", "ACC1", [("CT", 3), ("SR", 1)]),
            (p1, "1.2.2", "20240610", "230000", "ACC2", [("MR", 2)]),
            (p2, "1.2.3", "20231231", "080000", "ACC3", [("CT", 1)]),
            (p3, "1.2.4", "20250101", "130030", "X_%", [("SEG", 1)])]
    n = 0
    for patient, uid, date, time, acc, series in rows:
        st = Study(study_uid=uid, patient_fk=patient.id, study_date=date, study_time=time,
                   accession_number=acc, study_description="head " + uid,
                   num_instances=sum(c for _, c in series), first_received_at=now,
                   last_received_at=now)
        session.add(st)
        session.flush()
        for i, (mod, count) in enumerate(series):
            se = Series(series_uid=f"{uid}.{i}", study_fk=st.id, modality=mod,
                        series_number=str(i + 1), num_instances=count, last_received_at=now)
            session.add(se)
            session.flush()
            for j in range(count):
                n += 1
                session.add(Instance(sop_instance_uid=f"{uid}.{i}.{j}", sop_class_uid="1.2.3.4",
                                     series_fk=se.id, study_fk=st.id, instance_number=j + 1,
                                     transfer_syntax_uid="1.2.840.10008.1.2.1", size=10,
                                     digest="x", path=f"f{n}", received_at=now))
    session.commit()


@pytest.fixture
def session(db_url: str) -> Any:
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = sessionmaker(engine)
    with sessions() as s:
        _fill(s)
        yield s
    engine.dispose()


def _uids(session: Session, level: Level = Level.STUDY, fuzzy: bool = False,
          model: Model = Model.STUDY_ROOT, **keys: str) -> list[Any]:
    res = run_query(session, Query(level=level, keys=keys, model=model, fuzzy=fuzzy))
    kw = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID",
          Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}[level]
    return sorted(r[kw] for r in res.rows)


def test_matching_types(session: Session) -> None:
    assert _uids(session, StudyInstanceUID="1.2.3") == ["1.2.3"]  # single value
    assert _uids(session, StudyInstanceUID="1.2.1\\1.2.4") == ["1.2.1", "1.2.4"]  # UID list
    assert _uids(session, PatientName="DOE*") == ["1.2.3"]  # wildcard, case-sensitive
    assert _uids(session, PatientName="DOE*", fuzzy=True) == ["1.2.3", "1.2.4"]
    assert _uids(session, PatientName="do?^ja*") == ["1.2.4"]
    assert _uids(session, PatientName="Müller*") == ["1.2.1", "1.2.2"]  # decoded text
    assert _uids(session, AccessionNumber="X_%") == ["1.2.4"]  # LIKE metacharacters literal
    assert _uids(session, AccessionNumber="X*") == ["1.2.4"]
    assert _uids(session, AccessionNumber="A_*") == []
    assert _uids(session, StudyDate="20240101-") == ["1.2.1", "1.2.2", "1.2.4"]
    assert _uids(session, StudyDate="-20240131") == ["1.2.1", "1.2.3"]
    assert _uids(session, StudyDate="20240101-20241231") == ["1.2.1", "1.2.2"]
    assert _uids(session, StudyTime="-1300") == ["1.2.1", "1.2.3", "1.2.4"]
    assert _uids(session, StudyTime="23") == ["1.2.2"]
    assert _uids(session, StudyDate="", PatientName="*") == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]
    assert _uids(session, ModalitiesInStudy="SR\\MR") == ["1.2.1", "1.2.2"]
    assert _uids(session, Level.SERIES, StudyInstanceUID="1.2.1", Modality="CT") == ["1.2.1.0"]
    assert _uids(session, Level.IMAGE, SeriesInstanceUID="1.2.1.0") == [
        "1.2.1.0.0", "1.2.1.0.1", "1.2.1.0.2"]
    assert _uids(session, Level.PATIENT, model=Model.PATIENT_ROOT, PatientSex="F") == [
        "P1", "P_3%"]
    assert _uids(session, Level.PATIENT, model=Model.PATIENT_ROOT, PatientID="P_*") == ["P_3%"]


def test_returned_keys(session: Session) -> None:
    res = run_query(session, Query(level=Level.STUDY, keys={
        "StudyInstanceUID": "1.2.1", "PatientName": "", "ModalitiesInStudy": "",
        "NumberOfStudyRelatedInstances": "", "NumberOfStudyRelatedSeries": "",
        "InstitutionName": "", "StudyDate": ""}))
    (row,) = res.rows
    assert row == {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.1",
                   "PatientName": "Müller^Anna", "ModalitiesInStudy": ["CT", "SR"],
                   "NumberOfStudyRelatedInstances": 4, "NumberOfStudyRelatedSeries": 2,
                   "InstitutionName": None, "StudyDate": "20240105"}
    res = run_query(session, Query(level=Level.PATIENT, model=Model.PATIENT_ROOT, keys={
        "PatientID": "P1", "NumberOfPatientRelatedStudies": "",
        "NumberOfPatientRelatedInstances": ""}))
    assert res.rows == [{"QueryRetrieveLevel": "PATIENT", "PatientID": "P1",
                         "NumberOfPatientRelatedStudies": 2,
                         "NumberOfPatientRelatedInstances": 6}]


def test_limit_offset_and_max_results(session: Session) -> None:
    q = Query(level=Level.STUDY, keys={"StudyInstanceUID": ""})
    assert run_query(session, q, max_results=3).truncated
    assert len(run_query(session, q, max_results=3).rows) == 3
    assert not run_query(session, q, max_results=4).truncated
    page = run_query(session, q, limit=2, offset=1)
    assert [r["StudyInstanceUID"] for r in page.rows] == ["1.2.2", "1.2.3"]
    assert not page.truncated


@pytest.mark.parametrize("keys, message", [
    ({"StudyDate": "2024-01-01"}, "not a DA"),
    ({"StudyDate": "abc"}, "not a DA"),
    ({"StudyInstanceUID": "1.2.*"}, "not a UID"),
    ({"PatientName": "x" * 65536}, "more than the 324"),
    ({"NoSuchKeyword": "1"}, "unknown attribute"),
])
def test_bad_values(keys: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        Query(level=Level.STUDY, keys=keys)


def test_from_dataset() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller*"
    ds.StudyDate = ""
    q = query_from_dataset(ds, Model.STUDY_ROOT)
    assert q.keys == {"PatientName": "Müller*", "StudyDate": ""}
    ds.add_new(0x00091010, "LO", "x")
    with pytest.raises(QueryError, match="private"):
        query_from_dataset(ds, Model.STUDY_ROOT)
    ds2 = Dataset()
    ds2.QueryRetrieveLevel = "PATIENT"
    with pytest.raises(QueryError, match="Study Root"):
        query_from_dataset(ds2, Model.STUDY_ROOT)
