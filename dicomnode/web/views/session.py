"""Logging in and out: the login page (cookie session), ``POST /api/token`` (OAuth2 password
flow → bearer token), logout, and where each role lands.

A failed login waits ``web.failure_delay_seconds`` before it answers (throttling guessing),
and the account locks after ``web.lockout_failures`` consecutive failures. The login form is
protected against login CSRF by a double-submit cookie.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from dicomnode.web.auth import LoginRefused, Principal, authenticate, end_session, has_users
from dicomnode.web.auth import start_session as _start
from dicomnode.web.deps import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    WebState,
    node,
    principal,
    remote_of,
    require,
)

api = APIRouter(tags=["session"])
pages = APIRouter(include_in_schema=False)


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


async def login_or_refuse(st: WebState, name: str, password: str, remote: str, kind: str
                          ) -> tuple[str, Principal]:
    try:
        return await run_in_threadpool(_login_committing, st, name, password, remote, kind)
    except LoginRefused:
        await asyncio.sleep(st.settings.web.failure_delay_seconds)
        raise


def _login_committing(st: WebState, name: str, password: str, remote: str, kind: str
                      ) -> tuple[str, Principal]:
    # authenticate() records failures in the same transaction as it refuses: keep them
    with st.sessions() as s:
        s.begin()
        try:
            user = authenticate(s, st.audit, st.settings.web, name, password, remote=remote,
                                via=kind)
        except LoginRefused:
            s.commit()
            raise
        token, row = _start(s, user, st.settings.web, kind=kind, remote=remote)
        who = Principal(user.id, user.name, user.display_name or user.name, user.role, row.id,
                        row.csrf_token, kind)
        s.commit()
    return token, who


@api.post("/token", response_model=Token, summary="Log in for an API bearer token",
          responses={401: {"description": "wrong user name or password"},
                     403: {"description": "account locked"}})
async def token(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()],
                st: WebState = Depends(node)) -> Token:
    """OAuth2 password flow: form fields ``username`` and ``password``. The token lasts
    ``web.session_hours``; send it as ``Authorization: Bearer <token>``."""
    try:
        tok, _ = await login_or_refuse(st, form.username, form.password, remote_of(request),
                                       "bearer")
    except LoginRefused as e:
        raise HTTPException(403 if e.locked else 401, str(e),
                            headers={"WWW-Authenticate": "Bearer"}) from None
    return Token(access_token=tok, expires_in=int(st.settings.web.session_hours * 3600))


@api.post("/logout", status_code=204, summary="End this login (cookie or token)")
def logout_api(request: Request, who: Principal = Depends(require(None)),
               st: WebState = Depends(node)) -> Response:
    with st.sessions() as s, s.begin():
        end_session(s, st.audit, who, remote_of(request))
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@api.get("/me", summary="Who am I, and what may I do")
def me(who: Principal = Depends(principal)) -> dict[str, object]:
    from dicomnode.web.auth import PERMISSIONS

    return {"name": who.name, "display_name": who.display_name, "role": str(who.role),
            "permissions": sorted(PERMISSIONS[who.role]), "via": who.via}


def _login_page(request: Request, st: WebState, error: str = "", status: int = 200,
                nxt: str = "/") -> HTMLResponse:
    from dicomnode.web.app import render

    csrf = secrets.token_urlsafe(24)
    with st.reads() as s:
        no_users = not has_users(s)
    response = render(request, "login.html", status_code=status, error=error,
                      login_csrf=csrf, next=_safe_next(nxt), no_users=no_users,
                      oidc=st.settings.web.oidc)
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, httponly=True, samesite="strict",
                        secure=st.settings.web.base_url.startswith("https:"), path="/login")
    return response


def _safe_next(nxt: str | None) -> str:
    """Only a path on this site (no open redirect to another host)."""
    if not nxt or not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        return "/"
    return nxt


@pages.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/", st: WebState = Depends(node)
               ) -> HTMLResponse:
    return _login_page(request, st, nxt=next)


@pages.post("/login", response_class=HTMLResponse)
async def login_submit(request: Request, username: Annotated[str, Form()],
                       password: Annotated[str, Form()], csrf_token: Annotated[str, Form()],
                       next: Annotated[str, Form()] = "/", st: WebState = Depends(node)
                       ) -> Response:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not secrets.compare_digest(expected, csrf_token):
        return _login_page(request, st, "The login form expired: please try again.", 403,
                           next)
    try:
        tok, who = await login_or_refuse(st, username, password, remote_of(request), "cookie")
    except LoginRefused as e:
        return _login_page(request, st, str(e), 401, next)
    target = _safe_next(next)
    response = RedirectResponse(who.home if target == "/" else target, status_code=303)
    set_session_cookie(response, st, tok)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


def set_session_cookie(response: Response, st: WebState, token: str) -> None:
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax",
                        secure=st.settings.web.base_url.startswith("https:"), path="/",
                        max_age=int(st.settings.web.session_hours * 3600))


@pages.post("/logout")
def logout_page(request: Request, who: Principal = Depends(require(None)),
                st: WebState = Depends(node)) -> Response:
    with st.sessions() as s, s.begin():
        end_session(s, st.audit, who, remote_of(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


__all__ = ["api", "login_or_refuse", "pages", "set_session_cookie"]
