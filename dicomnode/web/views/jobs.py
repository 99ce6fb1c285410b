"""Jobs and deliveries: the queue, what failed and why, and the operator's two moves on stuck
work — retry and cancel — plus dead letters sent again.

Every move goes through :func:`dicomnode.state.transition` (``dicomnode.run.jobs.retry`` and
``request_cancel``, the same functions as ``dicomnode jobs retry/cancel``), so the state
machine refuses an illegal one (409, its message) and the audit event names the person.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.schema import Delivery, DeliveryState, Job, JobState, utcnow
from dicomnode.state import Actor, IllegalTransition, transition
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, read_session, require
from dicomnode.web.views._common import (
    CursorQ,
    LimitQ,
    deliveries_of,
    delivery_json,
    event_json,
    job_json,
    not_found,
    page_of,
    trail,
)

api = APIRouter(tags=["jobs"])
pages = APIRouter(include_in_schema=False)


def _state(enum: type[JobState] | type[DeliveryState], value: str | None) -> Any:
    if not value:
        return None
    try:
        return enum(value)
    except ValueError:
        raise HTTPException(422, f"state: one of {', '.join(e.value for e in enum)}") from None


def list_jobs(s: Session, *, state: str | None = None, route: str | None = None,
              study: str | None = None, cursor: int | None = None, limit: int = 50
              ) -> dict[str, Any]:
    q = select(Job)
    if (js := _state(JobState, state)) is not None:
        q = q.where(Job.state == js)
    if route:
        q = q.where(Job.route == route)
    if study:
        q = q.where(Job.study_uid == study.strip())
    rows, nxt = page_of(s, q, Job.id, cursor, limit)
    dels = deliveries_of(s, [j.id for j in rows])
    return {"items": [job_json(j, dels[j.id]) for j in rows], "next_cursor": nxt}


def job_counts(s: Session) -> dict[str, int]:
    counts = dict.fromkeys((str(x) for x in JobState), 0)
    for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[str(state)] = n
    return counts


def delivery_counts(s: Session) -> dict[str, int]:
    counts = dict.fromkeys((str(x) for x in DeliveryState), 0)
    for state, n in s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
        counts[str(state)] = n
    return counts


@api.get("/jobs", summary="Jobs (newest first, by cursor)")
def jobs_api(state: str | None = Query(None, description="queued, running, failed, dead, …"),
             route: str | None = None,
             study: str | None = Query(None, description="Study Instance UID"),
             cursor: int | None = CursorQ, limit: int = LimitQ,
             _: Principal = Depends(require("jobs:read")),
             s: Session = Depends(read_session)) -> dict[str, Any]:
    return list_jobs(s, state=state, route=route, study=study, cursor=cursor, limit=limit)


@api.get("/jobs/{job_id}", summary="One job with its deliveries and audit trail")
def job_api(job_id: int, _: Principal = Depends(require("jobs:read")),
            s: Session = Depends(read_session)) -> dict[str, Any]:
    job = s.get(Job, job_id)
    if job is None:
        raise not_found(f"job {job_id}")
    dels = deliveries_of(s, [job.id])[job.id]
    out = job_json(job, dels)
    out["audit"] = [event_json(e) for e in trail(s, job_ids=[job.id],
                                                 delivery_ids=[d.id for d in dels])]
    return out


def retry_job(st: WebState, job_id: int, who: Principal) -> dict[str, Any]:
    from dicomnode.run.jobs import retry

    with st.sessions() as s, s.begin():
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise not_found(f"job {job_id}")
        n, requeued = retry(s, st.audit, job, Actor.user(who.name))
        if not n and not requeued:
            raise HTTPException(409, f"job {job_id} is {job.state} and has no dead delivery: "
                                     "nothing to retry")
        return {"job_id": job_id, "deliveries_requeued": n, "job_requeued": requeued,
                "state": str(job.state)}


def cancel_job(st: WebState, job_id: int, who: Principal) -> dict[str, Any]:
    from dicomnode.run.jobs import request_cancel

    with st.sessions() as s, s.begin():
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise not_found(f"job {job_id}")
        try:
            state = request_cancel(s, st.audit, job, Actor.user(who.name))
        except IllegalTransition as e:
            raise HTTPException(409, str(e)) from None
        return {"job_id": job_id, "state": str(state)}


def retry_delivery(st: WebState, delivery_id: int, who: Principal) -> dict[str, Any]:
    with st.sessions() as s, s.begin():
        d = s.get(Delivery, delivery_id, with_for_update=True)
        if d is None:
            raise not_found(f"delivery {delivery_id}")
        try:
            transition(s, d, DeliveryState.PENDING, by=Actor.user(who.name), audit=st.audit,
                       job_id=d.job_fk, destination=d.destination, step=d.step)
        except IllegalTransition as e:
            raise HTTPException(409, str(e)) from None
        d.attempts, d.next_attempt_at, d.last_error = 0, utcnow(), ""
        return delivery_json(d)


@api.post("/jobs/{job_id}/retry", summary="Retry a job: dead deliveries, failed/dead job",
          responses={404: {"description": "no such job"},
                     409: {"description": "nothing to retry"}})
def retry_api(job_id: int, who: Principal = Depends(require("jobs:write")),
              st: WebState = Depends(node)) -> dict[str, Any]:
    """Its dead deliveries are sent again; a failed or dead job runs again with fresh
    attempts. Audited with your name."""
    return retry_job(st, job_id, who)


@api.post("/jobs/{job_id}/cancel", summary="Cancel a queued or running job",
          responses={404: {"description": "no such job"},
                     409: {"description": "the job has ended"}})
def cancel_api(job_id: int, who: Principal = Depends(require("jobs:write")),
               st: WebState = Depends(node)) -> dict[str, Any]:
    """A queued job never runs; a running one is stopped (nothing more is sent)."""
    return cancel_job(st, job_id, who)


@api.get("/deliveries", summary="Deliveries (newest first, by cursor)")
def deliveries_api(state: str | None = Query(None, description="pending, sent, dead, "
                                                                "cancelled"),
                   destination: str | None = None, job: int | None = None,
                   cursor: int | None = CursorQ, limit: int = LimitQ,
                   _: Principal = Depends(require("deliveries:read")),
                   s: Session = Depends(read_session)) -> dict[str, Any]:
    q = select(Delivery)
    if (ds := _state(DeliveryState, state)) is not None:
        q = q.where(Delivery.state == ds)
    if destination:
        q = q.where(Delivery.destination == destination)
    if job is not None:
        q = q.where(Delivery.job_fk == job)
    rows, nxt = page_of(s, q, Delivery.id, cursor, limit)
    return {"items": [delivery_json(d) for d in rows], "next_cursor": nxt}


@api.post("/deliveries/{delivery_id}/retry", summary="Send a dead delivery again",
          responses={404: {"description": "no such delivery"},
                     409: {"description": "the delivery is not dead"}})
def retry_delivery_api(delivery_id: int, who: Principal = Depends(require("deliveries:write")),
                       st: WebState = Depends(node)) -> dict[str, Any]:
    """dead → pending with fresh attempts; the sender picks it up. Audited with your name."""
    return retry_delivery(st, delivery_id, who)


# -- pages --------------------------------------------------------------------------------------


@pages.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, state: str = "", route: str = "", study: str = "",
              cursor: int | None = CursorQ, limit: int = LimitQ,
              who: Principal = Depends(require("jobs:read")),
              s: Session = Depends(read_session)) -> HTMLResponse:
    from dicomnode.web.app import render

    result = list_jobs(s, state=state or None, route=route or None, study=study or None,
                       cursor=cursor, limit=limit)
    dead = s.execute(select(Delivery).where(Delivery.state == DeliveryState.DEAD)
                     .order_by(Delivery.id.desc()).limit(100)).scalars().all()
    routes = sorted(r for (r,) in s.execute(select(Job.route).distinct()))
    return render(request, "jobs.html", result=result, counts=job_counts(s),
                  delivery_counts=delivery_counts(s), dead=[delivery_json(d) for d in dead],
                  filters={"state": state, "route": route, "study": study}, routes=routes)


def _job_row(request: Request, st: WebState, job_id: int, error: str = "") -> HTMLResponse:
    from dicomnode.web.app import render

    with st.reads() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise not_found(f"job {job_id}")
        j = job_json(job, deliveries_of(s, [job_id])[job_id])
    return render(request, "_job_row.html", j=j, error=error)


def _job_action(request: Request, st: WebState, job_id: int, who: Principal,
                action: Any) -> HTMLResponse:
    """Do ``action`` (retry or cancel) and answer the job's row again (htmx swaps it in
    place), with the refusal in the row when the move is not allowed."""
    error = ""
    try:
        action(st, job_id, who)
    except HTTPException as e:
        if e.status_code == 404:
            raise
        error = str(e.detail)
    return _job_row(request, st, job_id, error)


@pages.post("/jobs/{job_id}/retry", response_class=HTMLResponse)
def retry_page(job_id: int, request: Request, who: Principal = Depends(require("jobs:write")),
               st: WebState = Depends(node)) -> HTMLResponse:
    return _job_action(request, st, job_id, who, retry_job)


@pages.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_page(job_id: int, request: Request, who: Principal = Depends(require("jobs:write")),
                st: WebState = Depends(node)) -> HTMLResponse:
    return _job_action(request, st, job_id, who, cancel_job)


@pages.post("/deliveries/{delivery_id}/retry", response_class=HTMLResponse)
def retry_delivery_page(delivery_id: int, request: Request,
                        who: Principal = Depends(require("deliveries:write")),
                        st: WebState = Depends(node)) -> HTMLResponse:
    from dicomnode.web.app import render

    error = ""
    try:
        retry_delivery(st, delivery_id, who)
    except HTTPException as e:
        if e.status_code == 404:
            raise
        error = str(e.detail)
    with st.reads() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        dj = delivery_json(d)
    return render(request, "_delivery_row.html", d=dj, error=error)


@pages.get("/deliveries/{delivery_id}/row", response_class=HTMLResponse)
def delivery_row(delivery_id: int, request: Request,
                 _: Principal = Depends(require("deliveries:read")),
                 s: Session = Depends(read_session)) -> HTMLResponse:
    """The row alone: the page polls it while a retried delivery is pending."""
    from dicomnode.web.app import render

    d = s.get(Delivery, delivery_id)
    if d is None:
        raise not_found(f"delivery {delivery_id}")
    return render(request, "_delivery_row.html", d=delivery_json(d), error="")
