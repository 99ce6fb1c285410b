"""``/``: the dashboard — what came in over the last 24 hours, what is waiting, what is failing,
the disk, and the last errors — for those who may see it; everyone else goes to their own
start page. ``GET /api/dashboard`` gives the same figures as JSON.

Counts per hour are grouped in SQL (one query per chart, whatever the volume); the charts are
server-rendered SVG (no JavaScript).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.schema import AuditEvent, Instance, Study, utcnow
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, principal, require
from dicomnode.web.views._common import event_json

api = APIRouter(tags=["dashboard"])
pages = APIRouter(include_in_schema=False)

HOURS = 24


def _hour_key(s: Session, column: Any) -> Any:
    if s.get_bind().dialect.name == "sqlite":  # stored as naive UTC text
        return func.strftime("%Y-%m-%d %H", column)
    return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD HH24")


def per_hour(s: Session, column: Any, now: datetime) -> list[dict[str, Any]]:
    """Rows per UTC hour over the last :data:`HOURS` hours, oldest first (zeros included)."""
    start = (now - timedelta(hours=HOURS - 1)).replace(minute=0, second=0, microsecond=0)
    key = _hour_key(s, column)
    rows = s.execute(select(key, func.count()).where(column >= start).group_by(key))
    counts: dict[str, int] = {str(k): int(n) for k, n in rows}
    out = []
    for i in range(HOURS):
        h = start + timedelta(hours=i)
        out.append({"hour": h.isoformat(timespec="minutes"),
                    "count": int(counts.get(h.strftime("%Y-%m-%d %H"), 0))})
    return out


def bar_chart(series: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Geometry of a small bar chart (drawn by the template as SVG)."""
    width, height, pad = 480, 110, 14
    top = max((p["count"] for p in series), default=0) or 1
    bw = width / max(len(series), 1)
    bars = []
    for i, p in enumerate(series):
        h = (height - pad) * p["count"] / top
        bars.append({"x": round(i * bw + 1, 1), "y": round(height - pad - h, 1),
                     "w": round(bw - 2, 1), "h": round(h, 1), "count": p["count"],
                     "hour": p["hour"][11:16], "title": f"{p['hour']} UTC: {p['count']}"})
    return {"label": label, "width": width, "height": height, "bars": bars, "max": top,
            "total": sum(p["count"] for p in series), "base": height - pad}


def dashboard(st: WebState, s: Session) -> dict[str, Any]:
    from dicomnode.web.views.destinations import destinations
    from dicomnode.web.views.health import health_report
    from dicomnode.web.views.jobs import delivery_counts, job_counts

    now = utcnow().astimezone(UTC)
    _, health = health_report(st)
    errors = s.execute(select(AuditEvent).where(AuditEvent.outcome >= 8)
                       .order_by(AuditEvent.seq.desc()).limit(10)).scalars().all()
    dests = destinations(st, s)
    return {
        "instances_per_hour": per_hour(s, Instance.received_at, now),
        "studies_per_hour": per_hour(s, Study.first_received_at, now),
        "jobs": job_counts(s), "deliveries": delivery_counts(s),
        "failing_destinations": [d for d in dests if d["dead"] or d["last_error"]],
        "destinations": dests,
        "disk": health.get("disk", {}), "database": health.get("database", {}),
        "last_errors": [event_json(e) for e in errors]}


@api.get("/dashboard", summary="The dashboard's figures")
def dashboard_api(_: Principal = Depends(require("dashboard:read")),
                  st: WebState = Depends(node)) -> dict[str, Any]:
    with st.reads() as s:
        return dashboard(st, s)


def readable(e: dict[str, Any]) -> str:
    """One line for an error event: what failed, where, and why."""
    d = e["detail"]
    parts = [str(d[k]) for k in ("destination", "route", "path", "reason", "error", "state")
             if d.get(k) not in (None, "")]
    if "job_id" in d:
        parts.insert(0, f"job {d['job_id']}")
    return " · ".join(parts)[:300]


@pages.get("/")
def home(request: Request, who: Principal = Depends(principal),
         st: WebState = Depends(node)) -> Response:
    if not who.can("dashboard:read"):
        return RedirectResponse(who.home, status_code=303)
    from dicomnode.web.app import render

    with st.reads() as s:
        d = dashboard(st, s)
    for e in d["last_errors"]:
        e["text"] = readable(e)
    charts = [bar_chart(d["instances_per_hour"], "Instances received per hour"),
              bar_chart(d["studies_per_hour"], "Studies received per hour")]
    return render(request, "dashboard.html", d=d, charts=charts)
