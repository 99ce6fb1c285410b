"""``/``: the dashboard for those who may see it; everyone else goes to their own start page."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, principal

pages = APIRouter(include_in_schema=False)


@pages.get("/")
def home(request: Request, who: Principal = Depends(principal),
         st: WebState = Depends(node)) -> Response:
    if not who.can("dashboard:read"):
        return RedirectResponse(who.home, status_code=303)
    from dicomnode.web.app import render
    from dicomnode.web.views.health import health_report

    _, report = health_report(st)
    return render(request, "dashboard.html", health=report)
