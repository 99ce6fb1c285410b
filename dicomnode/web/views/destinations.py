"""Destinations: each configured DICOM peer with its backlog (pending, oldest pending),
dead letters, last error and last delivery, and "send every dead letter again" for one
destination (each move audited with the admin's name)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.schema import Delivery, DeliveryState, utcnow
from dicomnode.state import Actor, transition
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, read_session, require
from dicomnode.web.views._common import age_seconds, ago, iso

api = APIRouter(tags=["destinations"])
pages = APIRouter(include_in_schema=False)


def _aware(dt: datetime | None) -> datetime | None:
    # aggregates skip the column type's processing on SQLite: naive UTC
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def destinations(st: WebState, s: Session) -> list[dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {}
    for dest, state, n, oldest, last_sent in s.execute(
            select(Delivery.destination, Delivery.state, func.count(),
                   func.min(Delivery.created_at), func.max(Delivery.sent_at))
            .group_by(Delivery.destination, Delivery.state)):
        d = stats.setdefault(dest, {"pending": 0, "dead": 0, "sent": 0, "cancelled": 0,
                                    "oldest_pending": None, "last_sent": None})
        d[str(state)] = n
        if state == DeliveryState.PENDING:
            d["oldest_pending"] = _aware(oldest)
        if state == DeliveryState.SENT:
            d["last_sent"] = _aware(last_sent)
    out = []
    names = list(st.settings.destinations) + sorted(set(stats) - set(st.settings.destinations))
    for name in names:
        cfg = st.settings.destinations.get(name)
        d = stats.get(name, {"pending": 0, "dead": 0, "sent": 0, "cancelled": 0,
                             "oldest_pending": None, "last_sent": None})
        err = s.execute(select(Delivery.last_error, Delivery.id).where(
            Delivery.destination == name, Delivery.last_error != "")
            .order_by(Delivery.id.desc()).limit(1)).first()
        out.append({
            "name": name, "configured": cfg is not None,
            "ae_title": cfg.ae_title if cfg else None, "host": cfg.host if cfg else None,
            "port": cfg.port if cfg else None,
            "max_retries": cfg.max_retries if cfg else None,
            "pending": d["pending"], "dead": d["dead"], "sent": d["sent"],
            "oldest_pending_seconds": age_seconds(d["oldest_pending"]),
            "oldest_pending_age": ago(age_seconds(d["oldest_pending"])),
            "last_error": err[0] if err else "", "last_sent_at": iso(d["last_sent"])})
    return out


@api.get("/destinations", summary="Destinations: backlog, dead letters, last error")
def destinations_api(_: Principal = Depends(require("destinations:read")),
                     st: WebState = Depends(node), s: Session = Depends(read_session)
                     ) -> dict[str, Any]:
    return {"items": destinations(st, s)}


def retry_dead(st: WebState, name: str, who: Principal) -> int:
    if name not in st.settings.destinations:
        raise HTTPException(404, f"no destination {name!r} in the configuration "
                                 f"(configured: {', '.join(st.settings.destinations) or 'none'})")
    by = Actor.user(who.name)
    with st.sessions() as s, s.begin():
        dead = s.execute(select(Delivery).where(Delivery.destination == name,
                                                Delivery.state == DeliveryState.DEAD)
                         .with_for_update()).scalars().all()
        for d in dead:
            transition(s, d, DeliveryState.PENDING, by=by, audit=st.audit, job_id=d.job_fk,
                       destination=name, step=d.step, bulk=True)
            d.attempts, d.next_attempt_at, d.last_error = 0, utcnow(), ""
    return len(dead)


@api.post("/destinations/{name}/retry-dead", summary="Send every dead letter of one "
                                                    "destination again",
          responses={404: {"description": "no such destination"}})
def retry_dead_api(name: str, who: Principal = Depends(require("deliveries:write")),
                   st: WebState = Depends(node)) -> dict[str, Any]:
    """Each dead delivery goes back to pending (audited, one event each, with your name)."""
    return {"destination": name, "requeued": retry_dead(st, name, who)}


@pages.get("/destinations", response_class=HTMLResponse)
def destinations_page(request: Request, _: Principal = Depends(require("destinations:read")),
                      st: WebState = Depends(node), s: Session = Depends(read_session)
                      ) -> HTMLResponse:
    from dicomnode.web.app import render

    return render(request, "destinations.html", dests=destinations(st, s), message="")


@pages.post("/destinations/{name}/retry-dead", response_class=HTMLResponse)
def retry_dead_page(name: str, request: Request,
                    who: Principal = Depends(require("deliveries:write")),
                    st: WebState = Depends(node)) -> HTMLResponse:
    from dicomnode.web.app import render

    n = retry_dead(st, name, who)
    with st.reads() as s:
        items = destinations(st, s)
    return render(request, "destinations.html", dests=items,
                  message=f"{n} dead deliver{'y' if n == 1 else 'ies'} of {name} queued to "
                          "be sent again.")
