"""``GET /api/health``: for load balancers and monitoring, without authentication.

Answers 200 when the node can do its job (database reachable, disk above
``storage.min_free_mb``), else 503; runner and destination figures are reported for
monitoring but do not fail the check (a PACS that is down is not the node's fault). It says
nothing about patients or studies.
"""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text

from dicomnode import __version__
from dicomnode.schema import Delivery, DeliveryState, Job, JobState, utcnow
from dicomnode.web.deps import WebState, node

api = APIRouter(tags=["health"])


def health_report(st: WebState) -> tuple[bool, dict[str, Any]]:
    report: dict[str, Any] = {"version": __version__}
    ok = True
    try:
        with st.reads() as s:
            s.execute(text("SELECT 1"))
            jobs: dict[Any, int] = dict(s.execute(select(Job.state, func.count()).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING]))
                .group_by(Job.state)).all())
            stuck = s.execute(select(func.count()).select_from(Job).where(
                Job.state == JobState.RUNNING, Job.lease_expires_at < utcnow())).scalar_one()
            dests: dict[str, dict[str, Any]] = {}
            for dest, state, n, oldest in s.execute(
                    select(Delivery.destination, Delivery.state, func.count(),
                           func.min(Delivery.created_at))
                    .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.DEAD]))
                    .group_by(Delivery.destination, Delivery.state)):
                d = dests.setdefault(dest, {"pending": 0, "dead": 0})
                d[str(state)] = n
                if state == DeliveryState.PENDING and oldest is not None:
                    if oldest.tzinfo is None:  # SQLite aggregate: no type processing
                        from datetime import UTC
                        oldest = oldest.replace(tzinfo=UTC)
                    d["oldest_pending_seconds"] = round((utcnow() - oldest).total_seconds())
        report["database"] = {"ok": True, "backend": st.sessions.kw["bind"].dialect.name}
        report["runner"] = {"queued": jobs.get(JobState.QUEUED, 0),
                            "running": jobs.get(JobState.RUNNING, 0),
                            "lease_expired": stuck}
        for name in st.settings.destinations:
            dests.setdefault(name, {"pending": 0, "dead": 0})
        report["destinations"] = dests
    except Exception as e:
        ok = False
        report["database"] = {"ok": False, "error": type(e).__name__}
    path = st.settings.storage.path
    try:
        usage = shutil.disk_usage(path)
        free_mb = usage.free // (1024 * 1024)
        disk_ok = free_mb >= st.settings.storage.min_free_mb
        report["disk"] = {"ok": disk_ok, "free_mb": free_mb,
                          "min_free_mb": st.settings.storage.min_free_mb,
                          "used_percent": round(100 * usage.used / usage.total, 1)}
        ok &= disk_ok
    except OSError as e:
        ok = False
        report["disk"] = {"ok": False, "error": e.strerror}
    report["ok"] = ok
    return ok, report


@api.get("/health", summary="Is the node able to work (no authentication)")
def health(st: WebState = Depends(node)) -> JSONResponse:
    ok, report = health_report(st)
    return JSONResponse(report, status_code=200 if ok else 503)


