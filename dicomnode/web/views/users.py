"""Users: who may log in, with which role, and their state (active, locked, disabled, single
sign-on); add, disable/enable, unlock, new password, new role — the functions of
:mod:`dicomnode.web.auth` (the same as ``dicomnode users``), each audited as ``user-changed``
with the admin's name. An admin cannot disable or demote themselves (the node would be left
without anyone to undo it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.schema import Role, User
from dicomnode.web import auth
from dicomnode.web.auth import Principal, UserError
from dicomnode.web.deps import WebState, node, read_session, require
from dicomnode.web.views._common import iso

api = APIRouter(tags=["users"])
pages = APIRouter(include_in_schema=False)


def user_json(u: User) -> dict[str, Any]:
    state = ("disabled" if u.disabled else "locked" if u.locked_at is not None else "active")
    return {"name": u.name, "display_name": u.display_name, "role": str(u.role),
            "state": state, "sso": u.sso_subject is not None,
            "password": bool(u.password_hash), "failed_logins": u.failed_logins,
            "locked_at": iso(u.locked_at), "last_login_at": iso(u.last_login_at),
            "last_failed_at": iso(u.last_failed_at), "created_at": iso(u.created_at)}


def users_of(s: Session) -> list[dict[str, Any]]:
    return [user_json(u) for u in s.execute(select(User).order_by(User.name)).scalars()]


def _status(e: UserError) -> int:
    msg = str(e)
    if msg.startswith("no user"):
        return 404
    if "exists already" in msg:
        return 409
    return 422


def change(st: WebState, name: str, fn: Callable[[Session], None]) -> dict[str, Any]:
    """Run one change of ``auth`` in a transaction; its UserError becomes 404/409/422."""
    try:
        with st.sessions() as s, s.begin():
            fn(s)
            s.flush()
            return user_json(auth.get_user(s, name))
    except UserError as e:
        raise HTTPException(_status(e), str(e)) from None


def _not_self(who: Principal, name: str, what: str) -> None:
    if who.name == name:
        raise HTTPException(409, f"you cannot {what} yourself: ask another administrator "
                                 "(this keeps the node from being left without one)")


class NewUser(BaseModel):
    name: str
    role: str
    password: str | None = None  # None: single sign-on only
    display_name: str = ""


class NewPassword(BaseModel):
    password: str


class NewRole(BaseModel):
    role: str


def add(st: WebState, who: Principal, body: NewUser) -> dict[str, Any]:
    def do(s: Session) -> None:
        auth.add_user(s, st.audit, body.name, body.role, body.password, by=who.name,
                      display_name=body.display_name)

    return change(st, body.name.strip(), do)


def disable(st: WebState, who: Principal, name: str, disabled: bool) -> dict[str, Any]:
    if disabled:
        _not_self(who, name, "disable")
    return change(st, name, lambda s: auth.set_disabled(s, st.audit, name, disabled,
                                                        by=who.name))


def unlock(st: WebState, who: Principal, name: str) -> dict[str, Any]:
    return change(st, name, lambda s: auth.unlock(s, st.audit, name, by=who.name))


def password(st: WebState, who: Principal, name: str, new: str) -> dict[str, Any]:
    return change(st, name, lambda s: auth.set_password(s, st.audit, name, new, by=who.name))


def role(st: WebState, who: Principal, name: str, new: str) -> dict[str, Any]:
    if who.name == name and new != Role.ADMIN.value:
        _not_self(who, name, "demote")
    return change(st, name, lambda s: auth.set_role(s, st.audit, name, new, by=who.name))


@api.get("/users", summary="Users, their role and state")
def users_api(_: Principal = Depends(require("users:read")),
              s: Session = Depends(read_session)) -> dict[str, Any]:
    return {"items": users_of(s)}


@api.post("/users", status_code=201, summary="Add a user",
          responses={409: {"description": "the name is taken"},
                     422: {"description": "bad name, role or password"}})
def add_api(body: NewUser, who: Principal = Depends(require("users:write")),
            st: WebState = Depends(node)) -> dict[str, Any]:
    """``password`` at least 10 characters; omit it for a single-sign-on-only user."""
    return add(st, who, body)


@api.post("/users/{name}/disable", summary="Disable a user (their logins end at once)")
def disable_api(name: str, who: Principal = Depends(require("users:write")),
                st: WebState = Depends(node)) -> dict[str, Any]:
    return disable(st, who, name, True)


@api.post("/users/{name}/enable", summary="Enable a disabled user")
def enable_api(name: str, who: Principal = Depends(require("users:write")),
               st: WebState = Depends(node)) -> dict[str, Any]:
    return disable(st, who, name, False)


@api.post("/users/{name}/unlock", summary="Unlock a user locked by failed logins")
def unlock_api(name: str, who: Principal = Depends(require("users:write")),
               st: WebState = Depends(node)) -> dict[str, Any]:
    return unlock(st, who, name)


@api.post("/users/{name}/password", summary="Set a new password (their logins end)")
def password_api(name: str, body: NewPassword, who: Principal = Depends(require("users:write")),
                 st: WebState = Depends(node)) -> dict[str, Any]:
    return password(st, who, name, body.password)


@api.post("/users/{name}/role", summary="Change a user's role (applies at their next login)")
def role_api(name: str, body: NewRole, who: Principal = Depends(require("users:write")),
             st: WebState = Depends(node)) -> dict[str, Any]:
    return role(st, who, name, body.role)


# -- pages --------------------------------------------------------------------------------------


def _page(request: Request, st: WebState, message: str = "", error: str = "",
          status: int = 200) -> HTMLResponse:
    from dicomnode.web.app import render

    with st.reads() as s:
        users = users_of(s)
    return render(request, "users.html", users=users, roles=[r.value for r in Role],
                  message=message, error=error, status_code=status)


@pages.get("/users", response_class=HTMLResponse)
def users_page(request: Request, _: Principal = Depends(require("users:read")),
               st: WebState = Depends(node)) -> HTMLResponse:
    return _page(request, st)


@pages.post("/users", response_class=HTMLResponse)
async def users_action(request: Request, who: Principal = Depends(require("users:write")),
                       st: WebState = Depends(node)) -> HTMLResponse:
    """One form for every change: ``action`` = add | disable | enable | unlock | password |
    role."""
    from fastapi.concurrency import run_in_threadpool

    form = {k: str(v) for k, v in (await request.form()).items()}
    action, name = form.get("action", ""), form.get("name", "").strip()

    def do() -> str:
        if action == "add":
            add(st, who, NewUser(name=name, role=form.get("role", ""),
                                 password=form.get("password") or None,
                                 display_name=form.get("display_name", "")))
            return f"User {name} added."
        if action in ("disable", "enable"):
            disable(st, who, name, action == "disable")
            return f"User {name} {action}d."
        if action == "unlock":
            unlock(st, who, name)
            return f"User {name} unlocked."
        if action == "password":
            password(st, who, name, form.get("password", ""))
            return f"Password of {name} changed; their logins ended."
        if action == "role":
            role(st, who, name, form.get("role", ""))
            return f"{name} is now {form.get('role')} (from their next login)."
        raise HTTPException(422, f"unknown action {action!r}")

    try:
        message = await run_in_threadpool(do)
    except HTTPException as e:
        if e.status_code == 403:
            raise
        return _page(request, st, error=str(e.detail), status=e.status_code)
    return _page(request, st, message=message)
