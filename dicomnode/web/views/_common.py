"""Parts shared by the operators' views (studies, jobs, deliveries, destinations, …): cursor
pages, rows as JSON, the audit trail of a study or job, and the HTML helpers.

Not a resource module (it is not in ``MODULES``): it defines no routers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from dicomnode.schema import AuditEvent, Delivery, Job, utcnow

MAX_LIMIT = 500

LimitQ = Query(50, ge=1, le=MAX_LIMIT, description="rows per page")
CursorQ = Query(None, ge=1, description="next_cursor of the previous page")


def iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="seconds") if dt is not None else None


def age_seconds(dt: datetime | None) -> int | None:
    return None if dt is None else max(0, round((utcnow() - dt).total_seconds()))


def page_of(s: Session, q: Select[Any], key: Any, cursor: int | None, limit: int
            ) -> tuple[list[Any], int | None]:
    """One page of ``q`` (rows of one entity), newest first by the integer ``key``: the rows
    with ``key < cursor``; the cursor of the next page, or None on the last one."""
    if cursor is not None:
        q = q.where(key < cursor)
    rows = list(s.execute(q.order_by(key.desc()).limit(limit + 1)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (getattr(rows[-1], key.key) if more and rows else None)


def loads(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "job_id": d.job_fk, "destination": d.destination, "state": str(d.state),
            "attempts": d.attempts, "step": d.step, "last_status": d.last_status,
            "last_error": d.last_error, "created_at": iso(d.created_at),
            "next_attempt_at": iso(d.next_attempt_at), "sent_at": iso(d.sent_at)}


def job_json(j: Job, deliveries: list[Delivery] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": j.id, "uid": j.uid, "route": j.route, "level": j.level, "study_uid": j.study_uid,
        "revision": j.revision, "state": str(j.state), "attempts": j.attempts,
        "max_attempts": j.max_attempts, "reason": j.reason, "summary": j.summary,
        "pipeline": loads(j.pipeline, []), "send_to": loads(j.send_to, []),
        "series_uids": loads(j.series_uids, []), "results": loads(j.results, []),
        "created_at": iso(j.created_at), "started_at": iso(j.started_at),
        "finished_at": iso(j.finished_at)}
    if deliveries is not None:
        out["deliveries"] = [delivery_json(d) for d in deliveries]
    return out


def deliveries_of(s: Session, job_ids: list[int]) -> dict[int, list[Delivery]]:
    out: dict[int, list[Delivery]] = {i: [] for i in job_ids}
    if job_ids:
        for d in s.execute(select(Delivery).where(Delivery.job_fk.in_(job_ids))
                           .order_by(Delivery.id)).scalars():
            out[d.job_fk].append(d)
    return out


def event_json(e: AuditEvent) -> dict[str, Any]:
    return {"seq": e.seq, "ts": e.ts, "event_type": e.event_type, "event_name": e.event_name,
            "outcome": e.outcome, "user": e.user, "source_aet": e.source_aet,
            "dest_aet": e.dest_aet, "source_host": e.source_host,
            "detail": loads(e.detail, {})}


def trail(s: Session, *, study_uid: str | None = None, job_ids: Sequence[int] = (),
          delivery_ids: Sequence[int] = (), limit: int = 2000) -> list[AuditEvent]:
    """Audit events that name the study (through the ``audit_event_studies`` index), or one
    of its jobs or deliveries, oldest first. Job and delivery events are looked for (a text
    match on the canonical JSON: ``"job_id":7,`` or ``"job_id":7}``) only from the study's
    first event on, so the scan is bounded by the study's age, not the table's."""
    from sqlalchemy import and_, func

    from dicomnode.schema import AuditEventStudy

    terms: list[Any] = []
    start = None
    if study_uid:
        by_study = select(AuditEventStudy.seq).where(AuditEventStudy.study_uid == study_uid)
        terms.append(AuditEvent.seq.in_(by_study))
        start = s.execute(select(func.min(AuditEventStudy.seq))
                          .where(AuditEventStudy.study_uid == study_uid)).scalar()
    text: list[Any] = []
    for key, ids in (("job_id", job_ids), ("delivery_id", delivery_ids)):
        for i in ids:
            text += [AuditEvent.detail.contains(f'"{key}":{int(i)},'),
                     AuditEvent.detail.contains(f'"{key}":{int(i)}}}')]
    if text:
        terms.append(and_(AuditEvent.seq >= start, or_(*text)) if start is not None
                     else or_(*text))
    if not terms:
        return []
    return list(s.execute(select(AuditEvent).where(or_(*terms)).order_by(AuditEvent.seq)
                          .limit(limit)).scalars())


def not_found(what: str) -> HTTPException:
    return HTTPException(404, f"no {what}: check the id (it may have been typed wrong)")


def is_htmx(request: Request) -> bool:
    return bool(request.headers.get("hx-request"))


def fragment(request: Request, template: str, **ctx: Any) -> HTMLResponse:
    from dicomnode.web.app import render

    return render(request, template, **ctx)


def ago(seconds: int | None) -> str:
    """A short human age: 45 s, 12 min, 3 h, 2 d."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
