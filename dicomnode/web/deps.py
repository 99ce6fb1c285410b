"""What every request needs, as FastAPI dependencies: the node's state, the person behind the
request, their permission, CSRF protection, and database sessions.

- :func:`principal` reads the ``dn_session`` cookie (browser) or an ``Authorization: Bearer``
  token (API). Without one: 401 (pages redirect to the login page instead).
- :func:`require` (``Depends(require("jobs:write"))``) answers 403 for a role without that
  permission, and audits the refusal (``access-denied``).
- A request that changes something with a cookie must carry the session's CSRF token, in the
  ``X-CSRF-Token`` header (htmx sends it for every request, see ``base.html``) or a
  ``csrf_token`` form field. Bearer requests need none: a browser never adds that header by
  itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import Settings
from dicomnode.database import reading
from dicomnode.web.auth import Principal, principal_for

if TYPE_CHECKING:
    from dicomnode.store import InstanceStore

SESSION_COOKIE = "dn_session"
LOGIN_CSRF_COOKIE = "dn_login_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class WebState:
    """The node's parts the web layer uses; one per app (``app.state.node``)."""

    settings: Settings
    sessions: sessionmaker[Session]  # writing
    audit: AuditLog
    # the node's store (``dicomnode serve``: STOW-RS shares C-STORE's store and index lock);
    # ``dicomnode web`` alone makes its own at the first STOW-RS request
    instance_store: InstanceStore | None = None
    _store_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store(self) -> InstanceStore:
        with self._store_lock:
            if self.instance_store is None:
                from dicomnode.store import FileStore, InstanceStore

                files = FileStore(self.settings.storage.path, self.settings.storage.min_free_mb)
                self.instance_store = InstanceStore(files, self.sessions, self.audit,
                                                    self.settings.storage.duplicate_policy,
                                                    workers=4)
            return self.instance_store

    @property
    def reads(self) -> sessionmaker[Session]:
        """Read-only sessions: never take SQLite's write lock (ingest goes first)."""
        return reading(self.sessions)


class NotLoggedIn(HTTPException):
    def __init__(self) -> None:
        super().__init__(401, "not authenticated: log in, or send an Authorization: Bearer "
                              "token from POST /api/token",
                         headers={"WWW-Authenticate": "Bearer"})


def node(request: Request) -> WebState:
    state: WebState = request.app.state.node
    return state


def remote_of(request: Request) -> str:
    return request.client.host if request.client else ""


def principal(request: Request, st: WebState = Depends(node)) -> Principal:
    """The logged-in person, or 401."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    token, kind = None, ""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        token, kind = auth[7:].strip(), "bearer"
    elif request.cookies.get(SESSION_COOKIE):
        token, kind = request.cookies[SESSION_COOKIE], "cookie"
    if not token:
        raise NotLoggedIn()
    with st.reads() as s:
        who = principal_for(s, token, kind)
    if who is None:
        raise NotLoggedIn()
    request.state.principal = who
    return who


async def _csrf_ok(request: Request, who: Principal) -> bool:
    if request.method in SAFE_METHODS or who.via != "cookie":
        return True
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else None
    return sent is not None and sent == who.csrf_token


def require(permission: str | None) -> Callable[..., Any]:
    """Dependency: the principal, if their role has ``permission`` (else 403, audited; None:
    any logged-in person) and a cookie request that changes something carries the CSRF token
    (else 403, audited)."""

    async def dependency(request: Request, who: Principal = Depends(principal),
                         st: WebState = Depends(node)) -> Principal:
        if permission is not None and not who.can(permission):
            st.audit.record(EventKind.ACCESS_DENIED, Outcome.MINOR_FAILURE, user=who.name,
                            source_host=remote_of(request), method=request.method,
                            path=request.url.path, needs=permission, role=str(who.role))
            raise HTTPException(403, f"your role ({who.role}) may not do this "
                                     f"(needs {permission})")
        if not await _csrf_ok(request, who):
            st.audit.record(EventKind.ACCESS_DENIED, Outcome.SERIOUS_FAILURE, user=who.name,
                            source_host=remote_of(request), method=request.method,
                            path=request.url.path, reason="missing or wrong CSRF token")
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try "
                                     "again")
        return who

    dependency.permission = permission  # type: ignore[attr-defined]  # read by the tests
    return dependency


def read_session(st: WebState = Depends(node)) -> Iterator[Session]:
    """A read-only database session for one request."""
    with st.reads() as s:
        yield s
