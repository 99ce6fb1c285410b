"""The web console and REST API: one FastAPI app, built by :func:`create_app`.

Pages are server-rendered (Jinja2) and use htmx for interaction; every asset is in
``dicomnode/web/static`` (nothing from a CDN: the console works offline). The REST API lives
under ``/api`` (OpenAPI at ``/api/openapi.json``). Nothing but ``/api/health``, the login page
and ``/static`` answers without authentication.

Each resource is a module with an ``api`` router (JSON, under ``/api``) and a ``pages``
router (HTML); :data:`MODULES` lists them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicomnode import __version__
from dicomnode.audit import AuditLog
from dicomnode.config import Settings
from dicomnode.store import InstanceStore
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, principal

HERE = Path(__file__).resolve().parent
log = logging.getLogger("dicomnode.web")

#: resource modules under dicomnode.web.views: each may define ``api`` and ``pages`` routers
MODULES = [
    "session",  # login, logout, tokens, OIDC
    "health",
    "home",
    "findings",  # the radiologist's worklist and review
    "sso",  # single sign-on (OpenID Connect), when web.oidc is set
    "studies",  # search, one study's story, force completion
    "jobs",  # jobs and deliveries: queue, retry, cancel, dead letters
    "destinations",  # backlog, dead letters, retry all dead
    "routes",  # routes, dry run, plugins
    "users",  # users and roles
    "audit",  # the audit trail: filter, export (CSV), verify
    "dicomweb",  # DICOMweb (QIDO-RS, WADO-RS, STOW-RS): its ``dicomweb`` router, /dicomweb
    "viewer",  # the OHIF viewer at /viewer (installed by scripts/install-ohif.sh)
]

templates = Jinja2Templates(directory=HERE / "templates")


def render(request: Request, template: str, status_code: int = 200, **context: Any
           ) -> HTMLResponse:
    """A page, with what every page's layout needs (the person, their CSRF token, nav)."""
    who: Principal | None = getattr(request.state, "principal", None)
    return templates.TemplateResponse(request, template, {"who": who, "version": __version__,
                                                          **context}, status_code=status_code)


def _wants_html(request: Request) -> bool:
    path = request.url.path
    return not path.startswith(("/api/", "/dicomweb/")) and path not in ("/api", "/dicomweb")


def _security_headers(response: Response) -> None:
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-ancestors 'none'; form-action 'self' https: http:")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not response.headers.get("Cache-Control"):
        response.headers["Cache-Control"] = "no-store"


def create_app(settings: Settings, sessions: sessionmaker[Session],
               audit: AuditLog | None = None, store: InstanceStore | None = None) -> FastAPI:
    """The app for a node whose database ``sessions`` opens (writing sessions; reads use
    their read-only twin). ``store``: the node's instance store (STOW-RS shares it with
    C-STORE); without one the app makes its own when first needed."""
    app = FastAPI(title="dicomnode", version=__version__, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  description="REST API of the dicomnode console: studies, jobs, deliveries, "
                              "audit, AI findings and their review, routes, plugins, users. "
                              "Authenticate with a bearer token from POST /api/token.")
    app.state.node = WebState(settings, sessions, audit or AuditLog(sessions), store)

    @app.middleware("http")
    async def _headers_and_log(request: Request,
                               call_next: Callable[[Request], Awaitable[Response]]
                               ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        _security_headers(response)
        if request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "public, max-age=3600"
        who = getattr(request.state, "principal", None)
        # the path only: query strings can carry codes (SSO) and search terms (patients)
        log.info("%s %s %d %.0f ms %s", request.method, request.url.path,
                 response.status_code, 1000 * (time.perf_counter() - t0),
                 who.name if who else "-")
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_html(request):
            if exc.status_code == 401:
                nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                if request.headers.get("hx-request"):
                    return Response(status_code=401, headers={"HX-Redirect": "/login"})
                return RedirectResponse(f"/login?next={_quote(nxt)}", status_code=303)
            if getattr(request.state, "principal", None) is None:
                with contextlib.suppress(StarletteHTTPException):  # the header shows who
                    principal(request, request.app.state.node)
            return render(request, "error.html", status_code=exc.status_code,
                          status=exc.status_code, message=str(exc.detail))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = [{"field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]),
                     "problem": e["msg"]} for e in exc.errors()]
        if _wants_html(request):
            return render(request, "error.html", status_code=422, status=422,
                          message="; ".join(f"{p['field']}: {p['problem']}" for p in problems))
        return JSONResponse({"detail": "invalid request", "errors": problems},
                            status_code=422)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(_: Principal = Depends(principal)) -> JSONResponse:
        """The API's OpenAPI description (for a logged-in user or a bearer token)."""
        return JSONResponse(app.openapi())

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for name in MODULES:
        module = importlib.import_module(f"dicomnode.web.views.{name}")
        if hasattr(module, "api"):
            app.include_router(module.api, prefix="/api")
        if hasattr(module, "pages"):
            app.include_router(module.pages)
        if hasattr(module, "dicomweb"):  # mounted at its own prefix (/dicomweb)
            app.include_router(module.dicomweb)
    if settings.dicomweb.cors_origins:
        return _CORSOnDicomweb(app, settings.dicomweb.cors_origins)  # type: ignore[return-value]
    return app


class _CORSOnDicomweb:
    """CORS (Starlette's middleware) for /dicomweb only: a viewer served from another origin
    may read DICOMweb, never the console's pages or API."""

    def __init__(self, app: FastAPI, origins: list[str]) -> None:
        from starlette.middleware.cors import CORSMiddleware

        self.app = app
        self.state = app.state
        self.cors = CORSMiddleware(app, allow_origins=origins,
                                   allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["Authorization", "Accept", "Content-Type"],
                                   expose_headers=["Content-Type", "Content-Length"])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/dicomweb" or path.startswith("/dicomweb/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")
