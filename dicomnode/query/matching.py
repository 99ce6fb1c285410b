"""Identifier → SQL: the matching rules of PS3.4 C.2.2.2, answered from the index alone.

A query (C-FIND identifier or QIDO-RS parameters) names attributes by keyword with a value each.
Every attribute the index holds maps to one column (or to a count or list computed in SQL);
:func:`build_select` turns the matching keys into a ``WHERE`` clause and :func:`run_query` turns
the rows into response identifiers. No instance file is ever opened: an attribute the index does
not hold is answered empty (zero length), which PS3.4 C.2.2.1.1 allows for an optional key.

Matching (PS3.4 C.2.2.2), per value:

* empty → return key only (no condition); ``*`` alone → universal matching (no condition);
* single value → equality; for PN also case-insensitive when ``fuzzy`` is set
  (``query.fuzzy_person_names`` or QIDO ``fuzzymatching=true``);
* UID list (``UI``, backslash separated) → ``IN``; wildcards are not allowed in UIDs;
* ``*`` and ``?`` (any VR but DA, TM, DT, UI and numbers) → ``LIKE`` (``GLOB`` on SQLite,
  whose ``LIKE`` ignores case), literal ``%``/``_``/``[`` escaped;
* date, time and date-time ranges ``A-B``, ``A-``, ``-B`` → ``BETWEEN``/``>=``/``<=`` on the
  stored strings (``YYYYMMDD``; times are compared after padding the upper bound so that
  ``-1300`` includes 13:00:59.999999);
* counts (``NumberOf…Related…``) and ``ModalitiesInStudy`` are returned, computed in SQL;
  ``ModalitiesInStudy`` also matches (a study with a series of one of the listed modalities).

Values arrive already decoded (pydicom decodes a data set with its Specific Character Set);
the response uses ISO_IR 192 (UTF-8) whenever a value is not ASCII.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from pydicom import datadict
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, func, literal, or_, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session

from dicomnode.schema import Instance, Patient, Series, Study


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


class Model(StrEnum):
    """The information model: Patient Root has a PATIENT level, Study Root does not."""

    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"


class QueryError(ValueError):
    """The identifier cannot be answered; ``status`` is the DICOM status to send.

    0xA900 "Identifier does not match SOP Class" for a bad key or value, 0xC000-range
    "Unable to process" otherwise; QIDO-RS answers HTTP 400 with ``str(error)``.
    """

    def __init__(self, message: str, status: int = 0xA900) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Attr:
    keyword: str
    level: Level
    kind: str  # uid | pn | date | time | text | cs | int | count | modalities
    column: Any = None  # an ORM column, or None for computed/unsupported


# The attributes the index holds, by the level whose entity holds them.
ATTRS: dict[str, Attr] = {a.keyword: a for a in (
    Attr("PatientName", Level.PATIENT, "pn", Patient.patient_name),
    Attr("PatientID", Level.PATIENT, "text", Patient.patient_id),
    Attr("IssuerOfPatientID", Level.PATIENT, "text", Patient.issuer),
    Attr("PatientBirthDate", Level.PATIENT, "date", Patient.birth_date),
    Attr("PatientSex", Level.PATIENT, "cs", Patient.sex),
    Attr("NumberOfPatientRelatedStudies", Level.PATIENT, "count"),
    Attr("NumberOfPatientRelatedSeries", Level.PATIENT, "count"),
    Attr("NumberOfPatientRelatedInstances", Level.PATIENT, "count"),
    Attr("StudyInstanceUID", Level.STUDY, "uid", Study.study_uid),
    Attr("StudyDate", Level.STUDY, "date", Study.study_date),
    Attr("StudyTime", Level.STUDY, "time", Study.study_time),
    Attr("AccessionNumber", Level.STUDY, "text", Study.accession_number),
    Attr("StudyID", Level.STUDY, "text", Study.study_id),
    Attr("StudyDescription", Level.STUDY, "text", Study.study_description),
    Attr("ReferringPhysicianName", Level.STUDY, "pn", Study.referring_physician),
    Attr("ModalitiesInStudy", Level.STUDY, "modalities"),
    Attr("NumberOfStudyRelatedSeries", Level.STUDY, "count"),
    Attr("NumberOfStudyRelatedInstances", Level.STUDY, "count", Study.num_instances),
    Attr("SeriesInstanceUID", Level.SERIES, "uid", Series.series_uid),
    Attr("Modality", Level.SERIES, "cs", Series.modality),
    Attr("SeriesNumber", Level.SERIES, "int", Series.series_number),
    Attr("SeriesDescription", Level.SERIES, "text", Series.series_description),
    Attr("BodyPartExamined", Level.SERIES, "cs", Series.body_part),
    Attr("FrameOfReferenceUID", Level.SERIES, "uid", Series.frame_of_reference_uid),
    Attr("NumberOfSeriesRelatedInstances", Level.SERIES, "count", Series.num_instances),
    Attr("SOPInstanceUID", Level.IMAGE, "uid", Instance.sop_instance_uid),
    Attr("SOPClassUID", Level.IMAGE, "uid", Instance.sop_class_uid),
    Attr("InstanceNumber", Level.IMAGE, "int", Instance.instance_number),
    Attr("AvailableTransferSyntaxUID", Level.IMAGE, "uid", Instance.transfer_syntax_uid),
)}

# The unique key of each level (PS3.4 C.6): always in a response at that level and below.
UNIQUE_KEYS = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID",
               Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
# Keys that are not matched or returned, only describe the query itself.
CONTROL_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC",
                          "QueryRetrieveView", "RetrieveAETitle", "InstanceAvailability"})

# PS3.5 Table 6.2-1 maximum lengths (a range of two dates/times is ``2 × max + 1``)
_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DA": 18, "DS": 16, "DT": 53, "IS": 12, "LO": 64,
            "PN": 324, "SH": 16, "TM": 28, "UI": 64, "LT": 10240, "ST": 1024, "UT": 10240,
            "UC": 10240, "UR": 10240}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DATETIME = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
MAX_UIDS = 5000  # a UID list longer than this is refused


@dataclass
class Query:
    """One query: level, information model, and keyword → value (``""`` = return key).

    Values are decoded text (a multi-valued value joined with backslashes, as on the wire).
    """

    level: Level
    keys: dict[str, str] = field(default_factory=dict)
    model: Model = Model.STUDY_ROOT
    fuzzy: bool = False

    def __post_init__(self) -> None:
        if self.model is Model.STUDY_ROOT and self.level is Level.PATIENT:
            raise QueryError("QueryRetrieveLevel PATIENT is not in the Study Root model")
        for keyword, value in self.keys.items():
            _check_value(keyword, value)


def _check_value(keyword: str, value: str) -> None:
    vr = datadict.dictionary_VR(keyword) if datadict.tag_for_keyword(keyword) else None
    if vr is None:
        raise QueryError(f"unknown attribute {keyword!r}")
    attr = ATTRS.get(keyword)
    if vr == "SQ":
        if value:
            raise QueryError(f"{keyword}: sequence matching is not supported")
        return
    parts = value.split("\\")
    if attr is not None and attr.kind == "uid":
        if len(parts) > MAX_UIDS:
            raise QueryError(f"{keyword}: more than {MAX_UIDS} UIDs in a list")
        for part in parts:
            if (part and part != "*" and not _UID.match(part)) or len(part) > 64:
                raise QueryError(f"{keyword}: {part[:70]!r} is not a UID (UI: digits and dots, "
                                 "at most 64 characters; no wildcards)")
        return
    limit = _MAX_LEN.get(vr.split(" ")[0])
    for part in parts:
        if limit is not None and len(part) > limit:
            raise QueryError(f"{keyword}: value of {len(part)} characters, more than the "
                             f"{limit} that VR {vr} allows")
    if attr is None or not value or value == "*":
        return
    if attr.kind in ("date", "time"):
        pattern = _DATE if attr.kind == "date" else _TIME
        if value.count("-") > 1 or "\\" in value:
            raise QueryError(f"{keyword}: {value!r} is not a {vr} value or range")
        for bound in value.split("-"):
            if bound and not pattern.match(bound):
                raise QueryError(f"{keyword}: {value!r} is not a {vr} value or range "
                                 f"({'YYYYMMDD' if vr == 'DA' else 'HHMMSS.FFFFFF'}[-…])")
        if value == "-":
            raise QueryError(f"{keyword}: '-' is not a range")
    elif attr.kind in ("int", "count") and not re.match(r"^[+-]?\d+$", value.strip()):
        raise QueryError(f"{keyword}: {value!r} is not an integer string")


def query_from_dataset(identifier: Dataset, model: Model, fuzzy: bool = False) -> Query:
    """A C-FIND/MOVE/GET identifier as a :class:`Query`; :class:`QueryError` if malformed.

    Private and unknown tags, group lengths and VRs other than the dictionary's are refused:
    an SCU that sends them expects something the node cannot do.
    """
    try:
        level_value = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    except Exception as exc:  # undecodable
        raise QueryError(f"QueryRetrieveLevel unreadable: {exc}") from exc
    if not level_value:
        raise QueryError("no QueryRetrieveLevel in the identifier")
    try:
        level = Level(level_value)
    except ValueError:
        raise QueryError(f"QueryRetrieveLevel {level_value[:20]!r} is not PATIENT, STUDY, "
                         "SERIES or IMAGE") from None
    keys: dict[str, str] = {}
    for tag in list(identifier.keys()):
        try:
            elem = identifier[tag]
        except Exception as exc:
            raise QueryError(f"attribute {tag} cannot be decoded: {exc}") from exc
        if tag.is_private:
            raise QueryError(f"private attribute {tag} is not a query key")
        if tag.element == 0:
            continue  # group length
        keyword = datadict.keyword_for_tag(tag)
        if not keyword:
            raise QueryError(f"unknown attribute {tag}")
        if keyword in CONTROL_KEYS:
            continue
        expected = datadict.dictionary_VR(tag)
        if elem.VR not in expected.split(" or ") and elem.VR not in ("UN",):
            raise QueryError(f"{keyword} {tag} has VR {elem.VR}, the dictionary says {expected}")
        if elem.VR == "SQ":
            if elem.value and any(len(item) for item in elem.value):
                raise QueryError(f"{keyword}: sequence matching is not supported")
            keys[keyword] = ""
            continue
        keys[keyword] = _text(elem.value)
    return Query(level=level, keys=keys, model=model, fuzzy=fuzzy)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        raise QueryError("binary value in a query key")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(_text(v) for v in value)
    return str(value).strip()


# -- SQL ----------------------------------------------------------------------------------


def _wildcard(column: Any, value: str, dialect: str, fold: bool) -> ColumnElement[bool]:
    """``*``/``?`` matching, case-sensitive unless ``fold``."""
    if fold:
        escaped = (value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                   .replace("*", "%").replace("?", "_"))
        return cast(ColumnElement[bool],
                    func.lower(column).like(func.lower(literal(escaped)), escape="\\"))
    if dialect == "sqlite":  # SQLite's LIKE ignores ASCII case; GLOB does not
        return cast(ColumnElement[bool], column.op("GLOB")(value.replace("[", "[[]")))
    escaped = (value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
               .replace("*", "%").replace("?", "_"))
    return cast(ColumnElement[bool], column.like(escaped, escape="\\"))


def _condition(attr: Attr, value: str, query: Query, dialect: str) -> ColumnElement[bool] | None:
    if not value or value == "*" or (attr.kind != "uid" and set(value) <= {"*"}):
        return None  # return key / universal matching
    column = attr.column
    if attr.kind == "modalities":
        wanted = [v for v in value.split("\\") if v]
        return select(Series.id).where(Series.study_fk == Study.id,
                                       Series.modality.in_(wanted)).exists()
    if attr.kind == "count" or column is None:
        return None  # returned only; PS3.4 has no matching on counts
    if attr.kind == "uid":
        uids = [v for v in value.split("\\") if v]
        return cast(ColumnElement[bool], column == uids[0] if len(uids) == 1
                    else column.in_(uids))
    if attr.kind in ("date", "time"):
        if "-" not in value:
            # a partial time (HH, HHMM) matches every time that starts with it
            return cast(ColumnElement[bool],
                        column.like(value + "%") if attr.kind == "time" else column == value)
        low, high = value.split("-")
        if attr.kind == "time" and high and len(high) < 13:
            high = high + "235959.999999"[len(high):]  # "-1300" includes 13:00:59.999999
        conds = []
        if low:
            conds.append(column >= low)
        if high:
            conds.append(column <= high)
        conds.append(column != "")
        return and_(*conds)
    if attr.kind == "int":
        if attr.column is Series.series_number:
            return cast(ColumnElement[bool], column == value.strip())
        return cast(ColumnElement[bool], column == int(value))
    fold = query.fuzzy and attr.kind == "pn"
    values = value.split("\\")
    conds = []
    for v in values:
        if "*" in v or "?" in v:
            conds.append(_wildcard(column, v, dialect, fold))
        elif fold:
            conds.append(func.lower(column) == v.lower())
        else:
            conds.append(column == v)
    return conds[0] if len(conds) == 1 else or_(*conds)


_ENTITY = {Level.PATIENT: Patient, Level.STUDY: Study, Level.SERIES: Series,
           Level.IMAGE: Instance}


def _base(level: Level, columns: Iterable[Any]) -> Select[Any]:
    stmt = select(*columns)
    if level is Level.PATIENT:
        return stmt.select_from(Patient)
    if level is Level.STUDY:
        return stmt.select_from(Study).join(Patient, Study.patient_fk == Patient.id)
    if level is Level.SERIES:
        return (stmt.select_from(Series).join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id))
    return (stmt.select_from(Instance).join(Series, Instance.series_fk == Series.id)
            .join(Study, Instance.study_fk == Study.id)
            .join(Patient, Study.patient_fk == Patient.id))


def where_clause(query: Query, dialect: str) -> ColumnElement[bool]:
    """The matching keys of ``query`` as one condition over patients/studies/series/instances
    (joined as :func:`build_select` joins them). Keys below the query level are ignored."""
    conds: list[ColumnElement[bool]] = []
    for keyword, value in query.keys.items():
        attr = ATTRS.get(keyword)
        if attr is None or attr.level.depth > query.level.depth:
            continue
        cond = _condition(attr, value, query, dialect)
        if cond is not None:
            conds.append(cond)
    return and_(true(), *conds)


def _row_columns(level: Level) -> list[InstrumentedAttribute[Any]]:
    cols: list[Any] = [_ENTITY[lv].id.label(f"{lv.value.lower()}_pk")  # type: ignore[attr-defined]
                       for lv in Level if lv.depth <= level.depth]
    cols += [a.column.label(a.keyword) for a in ATTRS.values()
             if a.column is not None and a.level.depth <= level.depth]
    return cols


def build_select(query: Query, dialect: str = "postgresql", *, limit: int | None = None,
                 offset: int = 0) -> Select[Any]:
    """The matching entities at ``query.level`` in a stable order (the index's own ids)."""
    entity = _ENTITY[query.level]
    stmt = _base(query.level, _row_columns(query.level)).where(where_clause(query, dialect))
    stmt = stmt.order_by(entity.id)  # type: ignore[attr-defined]
    if offset:
        stmt = stmt.offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return stmt


def select_instances(query: Query, dialect: str = "postgresql") -> Select[Any]:
    """Every instance under the entities ``query`` matches (for C-MOVE/C-GET and WADO-RS):
    id, SOP Class/Instance UID, transfer syntax, path and size, in series then instance order.
    """
    stmt = _base(Level.IMAGE, [Instance.id, Instance.sop_class_uid, Instance.sop_instance_uid,
                               Instance.transfer_syntax_uid, Instance.path, Instance.size,
                               Study.study_uid, Series.series_uid])
    level_query = Query(level=Level.IMAGE, keys={k: v for k, v in query.keys.items()
                                                  if k in ATTRS and ATTRS[k].level.depth
                                                  <= query.level.depth},
                        model=query.model, fuzzy=query.fuzzy)
    return stmt.where(where_clause(level_query, dialect)).order_by(Series.id, Instance.id)


@dataclass
class QueryResult:
    rows: list[dict[str, Any]]  # keyword → value (str, int, list[str] or None = empty)
    truncated: bool  # more than ``max_results`` matched: the response was cut


def run_query(session: Session, query: Query, *, limit: int | None = None, offset: int = 0,
              max_results: int = 1000, extra: Iterable[str] = ()) -> QueryResult:
    """Run ``query`` and build response identifiers (as keyword → value dicts).

    Each row has ``QueryRetrieveLevel``, the unique keys of its level and those above it
    (``PatientID`` only in Patient Root or when asked), every key asked for and the ``extra``
    keywords (QIDO's default attributes); keys the index does not hold are ``None`` (empty).
    ``limit``/``offset`` page the matches (QIDO); ``max_results`` is a hard cap:
    ``truncated`` says more matched.
    """
    bind = session.get_bind()
    dialect = bind.dialect.name
    cap = max_results if limit is None else min(limit, max_results)
    stmt = build_select(query, dialect, limit=cap + 1, offset=offset)
    raw = [r._mapping for r in session.execute(stmt)]
    truncated = len(raw) > cap and (limit is None or limit > max_results)
    raw = raw[:cap]
    wanted = [k for k in query.keys if k not in CONTROL_KEYS]
    for k in extra:
        if k not in wanted:
            wanted.append(k)
    for lv in Level:
        if lv.depth <= query.level.depth and lv is not Level.PATIENT \
                and UNIQUE_KEYS[lv] not in wanted:
            wanted.append(UNIQUE_KEYS[lv])
    if (query.level is Level.PATIENT or query.model is Model.PATIENT_ROOT) \
            and "PatientID" not in wanted:
        wanted.insert(0, "PatientID")
    computed = _computed(session, query.level, wanted, raw)
    rows: list[dict[str, Any]] = []
    for r in raw:
        out: dict[str, Any] = {"QueryRetrieveLevel": query.level.value}
        for kw in wanted:
            attr = ATTRS.get(kw)
            if attr is None or attr.level.depth > query.level.depth:
                out[kw] = None
            elif kw in computed:
                pk = r[f"{attr.level.value.lower()}_pk"]
                out[kw] = computed[kw].get(pk, 0 if attr.kind == "count" else [])
            elif attr.column is not None:
                v = r[kw]
                out[kw] = None if v == "" else v
            else:
                out[kw] = None
        rows.append(out)
    return QueryResult(rows=rows, truncated=truncated)


def _computed(session: Session, level: Level, wanted: list[str],
              raw: list[Any]) -> dict[str, dict[int, Any]]:
    """Counts and ModalitiesInStudy for the rows of this page, one grouped query each."""
    out: dict[str, dict[int, Any]] = {}
    if not raw:
        return out
    patients = sorted({r["patient_pk"] for r in raw})
    studies = sorted({r["study_pk"] for r in raw}) if level.depth >= 1 else []

    def grouped(stmt: Any) -> dict[int, Any]:
        return {k: v for k, v in session.execute(stmt)}

    if "NumberOfPatientRelatedStudies" in wanted:
        out["NumberOfPatientRelatedStudies"] = grouped(
            select(Study.patient_fk, func.count(Study.id)).where(Study.patient_fk.in_(patients))
            .group_by(Study.patient_fk))
    if "NumberOfPatientRelatedSeries" in wanted:
        out["NumberOfPatientRelatedSeries"] = grouped(
            select(Study.patient_fk, func.count(Series.id)).join(Series, Series.study_fk
                                                                 == Study.id)
            .where(Study.patient_fk.in_(patients)).group_by(Study.patient_fk))
    if "NumberOfPatientRelatedInstances" in wanted:
        out["NumberOfPatientRelatedInstances"] = grouped(
            select(Study.patient_fk, func.sum(Study.num_instances))
            .where(Study.patient_fk.in_(patients)).group_by(Study.patient_fk))
    if studies and "NumberOfStudyRelatedSeries" in wanted:
        out["NumberOfStudyRelatedSeries"] = grouped(
            select(Series.study_fk, func.count(Series.id)).where(Series.study_fk.in_(studies))
            .group_by(Series.study_fk))
    if studies and "ModalitiesInStudy" in wanted:
        mods: dict[int, list[str]] = {}
        for study_fk, modality in session.execute(
                select(Series.study_fk, Series.modality).distinct()
                .where(Series.study_fk.in_(studies), Series.modality != "")
                .order_by(Series.study_fk, Series.modality)):
            mods.setdefault(study_fk, []).append(modality)
        out["ModalitiesInStudy"] = dict(mods)
    return out


def to_dataset(row: Mapping[str, Any]) -> Dataset:
    """A response identifier for C-FIND; ISO_IR 192 (UTF-8) when a value is not ASCII."""
    ds = Dataset()
    non_ascii = False
    for kw, value in row.items():
        if value is None:
            setattr(ds, kw, None if datadict.dictionary_VR(kw) != "SQ" else [])
            continue
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        vr = datadict.dictionary_VR(kw)
        if vr == "IS" and isinstance(value, str):
            value = value.strip() or None
        setattr(ds, kw, value)
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
