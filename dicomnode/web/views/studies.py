"""Studies: search, one study's whole story (series, completion, jobs, results, deliveries,
audit trail, timeline), and forcing a study complete.

Forcing completion makes the same move as the assembler (:mod:`dicomnode.assemble.assembler`)
— receiving → complete, a ``completions`` row for the router, a ``study-completed`` event —
in one transaction, plus a ``study-forced-complete`` event with the admin's name. It is for a
study a modality will not finish (a sender that keeps the association open, an operator who
wants results now); instances that arrive later re-open the study as the next revision, as
always.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.audit import EventKind
from dicomnode.schema import (
    ArrivalState,
    AuditEvent,
    Completion,
    Delivery,
    Job,
    Patient,
    Series,
    Study,
    utcnow,
)
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, read_session, remote_of, require
from dicomnode.web.views._common import (
    CursorQ,
    LimitQ,
    deliveries_of,
    delivery_json,
    event_json,
    iso,
    job_json,
    not_found,
    page_of,
    trail,
)

api = APIRouter(tags=["studies"])
pages = APIRouter(include_in_schema=False)

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})")


def _dicom_date(value: str | None, name: str) -> str | None:
    if not value:
        return None
    m = _DATE.match(value.strip())
    if not m:
        raise HTTPException(422, f"{name}: write the date as YYYYMMDD or YYYY-MM-DD")
    return "".join(m.groups())


def search(s: Session, *, patient: str | None = None, accession: str | None = None,
           date_from: str | None = None, date_to: str | None = None,
           modality: str | None = None, state: str | None = None, cursor: int | None = None,
           limit: int = 50) -> dict[str, Any]:
    q = select(Study).join(Patient, Study.patient_fk == Patient.id)
    if patient:
        p = patient.strip().lower()
        q = q.where(or_(func.lower(Patient.patient_name).contains(p, autoescape=True),
                        func.lower(Patient.patient_id).contains(p, autoescape=True)))
    if accession:
        q = q.where(Study.accession_number == accession.strip())
    if (d := _dicom_date(date_from, "date_from")) is not None:
        q = q.where(Study.study_date >= d)
    if (d := _dicom_date(date_to, "date_to")) is not None:
        q = q.where(Study.study_date <= d)
    if modality:
        q = q.where(exists().where(Series.study_fk == Study.id,
                                   Series.modality == modality.strip().upper()))
    if state:
        try:
            q = q.where(Study.state == ArrivalState(state))
        except ValueError:
            raise HTTPException(422, "state: receiving or complete") from None
    rows, nxt = page_of(s, q, Study.id, cursor, limit)
    ids = [r.id for r in rows]
    mods: dict[int, set[str]] = {i: set() for i in ids}
    series_n: dict[int, int] = dict.fromkeys(ids, 0)
    if ids:
        for fk, mod in s.execute(select(Series.study_fk, Series.modality)
                                 .where(Series.study_fk.in_(ids))):
            mods[fk].add(mod)
            series_n[fk] += 1
    patients = {p.id: p for p in s.execute(select(Patient).where(
        Patient.id.in_({r.patient_fk for r in rows}))).scalars()} if rows else {}
    items = []
    for r in rows:
        pt = patients[r.patient_fk]
        items.append({
            "id": r.id, "study_uid": r.study_uid, "patient_name": pt.patient_name,
            "patient_id": pt.patient_id, "study_date": r.study_date,
            "accession_number": r.accession_number, "description": r.study_description,
            "modalities": sorted(m for m in mods[r.id] if m), "series": series_n[r.id],
            "instances": r.num_instances, "state": str(r.state), "revision": r.revision,
            "first_received_at": iso(r.first_received_at),
            "last_received_at": iso(r.last_received_at), "completed_at": iso(r.completed_at)})
    return {"items": items, "next_cursor": nxt}


@api.get("/studies", summary="Search studies (newest first, by cursor)")
def list_studies(patient: str | None = Query(None, description="name or ID, any part"),
                 accession: str | None = None,
                 date_from: str | None = Query(None, description="YYYYMMDD or YYYY-MM-DD"),
                 date_to: str | None = None, modality: str | None = None,
                 state: str | None = Query(None, description="receiving | complete"),
                 cursor: int | None = CursorQ, limit: int = LimitQ,
                 _: Principal = Depends(require("studies:read")),
                 s: Session = Depends(read_session)) -> dict[str, Any]:
    return search(s, patient=patient, accession=accession, date_from=date_from,
                  date_to=date_to, modality=modality, state=state, cursor=cursor, limit=limit)


def study_detail(s: Session, study_uid: str) -> dict[str, Any]:
    st = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if st is None:
        raise not_found(f"study {study_uid}")
    pt = s.get_one(Patient, st.patient_fk)
    series = s.execute(select(Series).where(Series.study_fk == st.id).order_by(Series.id)
                       ).scalars().all()
    completions = s.execute(select(Completion).where(Completion.study_uid == study_uid)
                            .order_by(Completion.id)).scalars().all()
    jobs = s.execute(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)
                     ).scalars().all()
    dels = deliveries_of(s, [j.id for j in jobs])
    all_dels = [d for j in jobs for d in dels[j.id]]
    events = trail(s, study_uid=study_uid, job_ids=[j.id for j in jobs],
                   delivery_ids=[d.id for d in all_dels])
    out = {
        "study": {"id": st.id, "study_uid": st.study_uid, "study_date": st.study_date,
                  "study_time": st.study_time, "accession_number": st.accession_number,
                  "study_id": st.study_id, "description": st.study_description,
                  "referring_physician": st.referring_physician, "state": str(st.state),
                  "revision": st.revision, "instances": st.num_instances,
                  "first_received_at": iso(st.first_received_at),
                  "last_received_at": iso(st.last_received_at),
                  "completed_at": iso(st.completed_at)},
        "patient": {"patient_id": pt.patient_id, "issuer": pt.issuer,
                    "patient_name": pt.patient_name, "birth_date": pt.birth_date,
                    "sex": pt.sex},
        "series": [{"series_uid": se.series_uid, "series_number": se.series_number,
                    "modality": se.modality, "description": se.series_description,
                    "body_part": se.body_part, "instances": se.num_instances,
                    "state": str(se.state), "revision": se.revision,
                    "last_received_at": iso(se.last_received_at),
                    "completed_at": iso(se.completed_at)} for se in series],
        "completions": [{"id": c.id, "level": c.level, "series_uid": c.series_uid,
                         "revision": c.revision, "instances": c.num_instances,
                         "completed_at": iso(c.completed_at),
                         "routed_at": iso(c.consumed_at)} for c in completions],
        "jobs": [job_json(j, dels[j.id]) for j in jobs],
        "results": [{"job_id": j.id, "route": j.route, "files": job_json(j)["results"],
                     "summary": j.summary} for j in jobs if j.results not in ("", "[]")],
        "deliveries": [delivery_json(d) for d in all_dels],
        "audit": [event_json(e) for e in events],
    }
    out["timeline"] = timeline(st, completions, jobs, all_dels, events)
    return out


def timeline(st: Study, completions: Any, jobs: Any, deliveries: list[Delivery],
             events: list[AuditEvent]) -> list[dict[str, Any]]:
    """What happened to the study, in time order: from its rows and its audit trail."""
    items: list[tuple[datetime, str, str, str]] = [
        (st.first_received_at, "received", "first instance received", "")]
    if st.last_received_at != st.first_received_at:
        items.append((st.last_received_at, "received",
                      f"last instance received ({st.num_instances} in all)", ""))
    for c in completions:
        what = f"{c.level} complete, revision {c.revision} ({c.num_instances} instances)"
        items.append((c.completed_at, "completed", what, ""))
        if c.consumed_at is not None:
            items.append((c.consumed_at, "routed", f"routed (revision {c.revision})", ""))
    for j in jobs:
        if j.started_at is not None:
            items.append((j.started_at, "job", f"job {j.id} ({j.route}) started", ""))
        if j.finished_at is not None:
            items.append((j.finished_at, "job", f"job {j.id} ({j.route}) {j.state}",
                          str(j.state)))
    for d in deliveries:
        if d.sent_at is not None:
            items.append((d.sent_at, "delivery", f"results of job {d.job_fk} sent to "
                                                 f"{d.destination}", "sent"))
    for e in events:  # what the rows do not keep: dead letters, people's actions
        if e.event_type in ("send-failed", "study-forced-complete", "delivery-state",
                            "job-state") and (e.user or e.outcome >= 8):
            ts = datetime.fromisoformat(e.ts)
            d = event_json(e)["detail"]
            if e.event_type == "send-failed":
                text = (f"results of job {d.get('job_id')} dead for {d.get('destination')}: "
                        f"{d.get('reason', '')}")
                items.append((ts, "delivery", text, "dead"))
            else:
                who = f" by {e.user}" if e.user else ""
                if e.event_type == "study-forced-complete":
                    text = "completion forced"
                elif e.event_type == "delivery-state":
                    text = f"delivery {d.get('delivery_id')} {d.get('from')} → {d.get('to')}"
                else:
                    text = f"job {d.get('job_id')} {d.get('from')} → {d.get('to')}"
                items.append((ts, "action", text + who, ""))
    items.sort(key=lambda t: t[0])
    return [{"at": iso(t), "kind": k, "what": w, "state": s} for t, k, w, s in items]


def _viewed(st: WebState, request: Request, who: Principal, study_uid: str) -> None:
    st.audit.record(EventKind.STUDY_VIEWED, user=who.name, source_host=remote_of(request),
                    study_uid=study_uid, via=who.via)


@api.get("/studies/{study_uid}", summary="One study: series, jobs, deliveries, audit trail",
         responses={404: {"description": "no such study"}})
def get_study(study_uid: str, request: Request, who: Principal = Depends(require("studies:read")),
              st: WebState = Depends(node), s: Session = Depends(read_session)
              ) -> dict[str, Any]:
    """Audited as ``study-viewed`` with your name."""
    out = study_detail(s, study_uid)
    _viewed(st, request, who, study_uid)
    return out


class AlreadyComplete(Exception):
    pass


def force_complete(st: WebState, study_uid: str, who: Principal, remote: str
                   ) -> dict[str, Any]:
    """Complete the study now (and its receiving series), as the assembler would: one
    transaction; 404 unknown study, 409 when it is complete already."""
    level = st.settings.assemble.level
    now = utcnow()
    with st.sessions() as s, s.begin():
        study = s.execute(select(Study).where(Study.study_uid == study_uid)
                          .with_for_update()).scalar_one_or_none()
        if study is None:
            raise not_found(f"study {study_uid}")
        n = s.execute(update(Study).where(Study.id == study.id,
                                          Study.state == ArrivalState.RECEIVING)
                      .values(state=ArrivalState.COMPLETE, completed_at=now)
                      .execution_options(synchronize_session=False)
                      ).rowcount  # type: ignore[attr-defined]
        if n != 1:
            raise HTTPException(409, f"study {study_uid} is complete already (revision "
                                     f"{study.revision}); late instances re-open it")
        s.refresh(study)
        series = s.execute(select(Series).where(Series.study_fk == study.id,
                                                Series.state == ArrivalState.RECEIVING)
                           ).scalars().all()
        made: list[str] = []
        for se in series:
            se.state, se.completed_at = ArrivalState.COMPLETE, now
            if level == "series":
                s.add(Completion(level="series", study_uid=study_uid,
                                 series_uid=se.series_uid, revision=se.revision,
                                 num_instances=se.num_instances, completed_at=now))
                st.audit.record(EventKind.SERIES_COMPLETED, session=s, study_uid=study_uid,
                                series_uid=se.series_uid, revision=se.revision,
                                instances=se.num_instances, forced_by=who.name)
                made.append(se.series_uid)
        if level == "study":
            s.add(Completion(level="study", study_uid=study_uid, series_uid=None,
                             revision=study.revision, num_instances=study.num_instances,
                             completed_at=now))
            st.audit.record(EventKind.STUDY_COMPLETED, session=s, study_uid=study_uid,
                            series_uid=None, revision=study.revision,
                            instances=study.num_instances, forced_by=who.name)
        st.audit.record(EventKind.STUDY_FORCED_COMPLETE, session=s, user=who.name,
                        source_host=remote, study_uid=study_uid, revision=study.revision,
                        instances=study.num_instances, level=level,
                        series_completed=len(series))
        return {"study_uid": study_uid, "state": "complete", "revision": study.revision,
                "instances": study.num_instances, "level": level,
                "completions": 1 if level == "study" else len(made)}


@api.post("/studies/{study_uid}/complete", summary="Force a receiving study complete now",
          responses={404: {"description": "no such study"},
                     409: {"description": "the study is complete already"}})
def complete_study(study_uid: str, request: Request,
                   who: Principal = Depends(require("studies:write")),
                   st: WebState = Depends(node)) -> dict[str, Any]:
    """Completes the study as the quiet period would have (a completion row for the router,
    ``study-completed``), audited as ``study-forced-complete`` with your name."""
    return force_complete(st, study_uid, who, remote_of(request))


# -- pages --------------------------------------------------------------------------------------


@pages.get("/studies", response_class=HTMLResponse)
def studies_page(request: Request, patient: str = "", accession: str = "", date_from: str = "",
                 date_to: str = "", modality: str = "", state: str = "",
                 cursor: int | None = CursorQ, limit: int = LimitQ,
                 who: Principal = Depends(require("studies:read")),
                 s: Session = Depends(read_session)) -> HTMLResponse:
    from dicomnode.web.app import render

    filters = {"patient": patient, "accession": accession, "date_from": date_from,
               "date_to": date_to, "modality": modality, "state": state}
    result = search(s, cursor=cursor, limit=limit,
                    **{k: v or None for k, v in filters.items()})
    return render(request, "studies.html", result=result, filters=filters)


@pages.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(study_uid: str, request: Request,
               who: Principal = Depends(require("studies:read")),
               st: WebState = Depends(node), s: Session = Depends(read_session)
               ) -> HTMLResponse:
    from dicomnode.web.app import render

    detail = study_detail(s, study_uid)
    _viewed(st, request, who, study_uid)
    return render(request, "study.html", d=detail, message="")


@pages.post("/studies/{study_uid}/complete", response_class=HTMLResponse)
def study_complete_page(study_uid: str, request: Request,
                        who: Principal = Depends(require("studies:write")),
                        st: WebState = Depends(node)) -> Response:
    from dicomnode.web.app import render

    try:
        force_complete(st, study_uid, who, remote_of(request))
        message, ok = "Study completed: the router takes it from here.", True
    except HTTPException as e:
        if e.status_code == 404:
            raise
        message, ok = str(e.detail), False
    return render(request, "_force_complete.html", message=message, ok=ok,
                  study_uid=study_uid)
