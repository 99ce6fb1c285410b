"""Who may use the console and API: authentication on every endpoint, roles on every write,
CSRF, lock-out, users from the command line, and nothing sensitive in the logs.

The route lists are taken from the app itself, so an endpoint added later is covered
without editing this file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select

from dicomnode.schema import AuditEvent, Role, User
from dicomnode.web.app import create_app
from dicomnode.web.auth import PERMISSIONS
from tests.web import PASSWORD, WebNode, start_web, web_settings

PUBLIC = {"/api/health", "/api/token", "/login",
          "/login/sso", "/login/sso/callback"}



def _routes(web: WebNode) -> list[tuple[str, str, str | None]]:
    """(method, path, permission) of every route of the app; permission from ``require``."""
    import importlib

    from dicomnode.web.app import MODULES

    create_app(web.settings, web.sessions, web.audit)  # every module imports
    routes: list[tuple[str, APIRoute]] = []
    for name in MODULES:
        module = importlib.import_module(f"dicomnode.web.views.{name}")
        for attr, prefix in (("api", "/api"), ("pages", ""), ("dicomweb", "")):
            if hasattr(module, attr):
                routes += [(prefix, r) for r in getattr(module, attr).routes
                           if isinstance(r, APIRoute)]
    out = []
    for prefix, r in routes:
        perm = None
        stack = list(r.dependant.dependencies)
        while stack:
            d = stack.pop()
            perm = getattr(d.call, "permission", perm)
            stack.extend(d.dependencies)
        for m in r.methods:
            out.append((m, prefix + r.path, perm))
    return out


def _concrete(path: str) -> str:
    return (path.replace("{id}", "1").replace("{job_id}", "1").replace("{study_uid}", "1.2.3")
            .replace("{uid}", "1.2.3").replace("{name}", "nobody").replace("{finding_id}", "1")
            .replace("{delivery_id}", "1").replace("{sop_uid}", "1.2.3")
            .replace("{study}", "1.2.3").replace("{series}", "1.2.4")
            .replace("{instance}", "1.2.5").replace("{frames}", "1").replace("{frame}", "1")
            .replace("{tag}", "7FE00010"))


def test_every_endpoint_but_health_and_login_wants_authentication(web: WebNode) -> None:
    routes = _routes(web)
    assert len(routes) >= 7
    with web.api(None) as c:
        for method, path, _ in routes:
            if path in PUBLIC or method == "HEAD":
                continue
            r = c.request(method, _concrete(path))
            if path.startswith("/api/"):
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["detail"].startswith("not authenticated")
            elif path.startswith("/dicomweb/"):  # HTTP Basic or bearer
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers["www-authenticate"] == 'Basic realm="dicomnode", Bearer'
            else:  # pages send the browser to the login page
                assert r.status_code in (303, 401), (method, path, r.status_code)
                if r.status_code == 303:
                    assert r.headers["location"].startswith("/login?next=")
        assert c.get("/api/health").status_code == 200
        assert c.get("/login").status_code == 200
        assert c.get("/static/app.css").status_code == 200
        assert c.get("/api/openapi.json").status_code == 401
    with web.api("auditor") as c:
        spec = c.get("/api/openapi.json").json()
        assert "/api/token" in spec["paths"] and "/api/health" in spec["paths"]


def test_every_write_is_refused_to_a_role_without_its_permission(web: WebNode) -> None:
    writes = [(m, p, perm) for m, p, perm in _routes(web)
              if m in ("POST", "PUT", "PATCH", "DELETE") and p.startswith("/api/")
              and p not in PUBLIC and perm is not None]
    checked = 0
    for role in ("radiologist", "auditor"):
        with web.api(role) as c:
            for method, path, perm in writes:
                if perm in PERMISSIONS[Role(role)]:
                    continue
                r = c.request(method, _concrete(path), json={})
                assert r.status_code == 403, (role, method, path, r.status_code, r.text)
                assert perm in r.json()["detail"]
                checked += 1
    assert checked > 0  # at least the review of findings is a guarded write
    denied = _events(web, "access-denied")
    assert len(denied) >= checked


def _events(web: WebNode, kind: str) -> list[AuditEvent]:
    with web.sessions() as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.event_type == kind)
                              .order_by(AuditEvent.seq)).scalars())


def test_token_flow_and_logout(web: WebNode) -> None:
    r = httpx.post(f"{web.url}/api/token", data={"username": "auditor", "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "bearer" and len(body["access_token"]) > 30
    h = {"Authorization": f"Bearer {body['access_token']}"}
    me = httpx.get(f"{web.url}/api/me", headers=h).json()
    assert me["role"] == "auditor" and "audit:read" in me["permissions"]
    assert "jobs:write" not in me["permissions"]
    assert httpx.post(f"{web.url}/api/logout", headers=h).status_code == 204
    assert httpx.get(f"{web.url}/api/me", headers=h).status_code == 401
    bad = httpx.post(f"{web.url}/api/token", data={"username": "auditor", "password": "nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{web.url}/api/token", data={"username": "ghost",
                                                    "password": PASSWORD}).status_code == 401
    logins = [json.loads(e.detail) | {"user": e.user} for e in _events(web, "user-login")]
    assert any(e["user"] == "auditor" and e["via"] == "bearer" for e in logins)


def test_cookie_writes_need_the_csrf_token(web: WebNode) -> None:
    with httpx.Client(base_url=web.url) as c:
        page = c.get("/login")
        csrf = page.cookies["dn_login_csrf"]
        r = c.post("/login", data={"username": "admin", "password": PASSWORD,
                                   "csrf_token": "forged", "next": "/"})
        assert r.status_code == 403 and "expired" in r.text  # login CSRF refused
        csrf = c.cookies["dn_login_csrf"]  # the refusal's page set a new one
        r = c.post("/login", data={"username": "admin", "password": PASSWORD,
                                   "csrf_token": csrf, "next": "/"})
        assert r.status_code == 303, r.text
        assert "dn_session" in c.cookies
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        # a write with the session cookie but no CSRF token: refused, audited
        r = c.post("/api/logout")
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        assert c.get("/api/me").status_code == 200  # still logged in
        with web.sessions() as s:
            from dicomnode.schema import WebSession
            csrf_token = s.execute(select(WebSession.csrf_token).order_by(
                WebSession.id.desc()).limit(1)).scalar_one()
        r = c.post("/api/logout", headers={"X-CSRF-Token": csrf_token})
        assert r.status_code == 204
        assert c.get("/api/me").status_code == 401
    refused = [json.loads(e.detail) for e in _events(web, "access-denied")]
    assert any(d.get("reason") == "missing or wrong CSRF token" for d in refused)


def test_account_locks_after_repeated_failures_and_an_admin_unlocks_it(
        tmp_path: Path) -> None:
    w = start_web(web_settings(tmp_path, lockout_failures=3))
    try:
        w.add_user("carol", "radiologist")
        for _ in range(2):
            r = httpx.post(f"{w.url}/api/token", data={"username": "carol", "password": "x"})
            assert r.status_code == 401
        r = httpx.post(f"{w.url}/api/token", data={"username": "carol", "password": "x"})
        assert r.status_code == 403 and "locked" in r.json()["detail"]
        # even the right password is refused now
        r = httpx.post(f"{w.url}/api/token", data={"username": "carol", "password": PASSWORD})
        assert r.status_code == 403 and "administrator" in r.json()["detail"]
        assert [e.user for e in _events(w, "account-locked")] == ["carol"]
        with w.sessions() as s:
            assert s.execute(select(User.locked_at).where(User.name == "carol")).scalar()
        _cli(w, "users", "unlock", "carol")
        r = httpx.post(f"{w.url}/api/token", data={"username": "carol", "password": PASSWORD})
        assert r.status_code == 200
        changes = [json.loads(e.detail) for e in _events(w, "user-changed")]
        assert {"change": "unlocked", "target": "carol"}.items() <= changes[-1].items()
    finally:
        w.stop()


def _cli(w: WebNode, *args: str, stdin: str | None = None, config: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    if config is None:
        config = w.settings.storage.path.parent / "node.yaml"
        config.write_text(json.dumps({"storage": {"path": str(w.settings.storage.path)},
                                      "database": {"url": w.settings.database_url}}))
    r = subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config", str(config)],
                       input=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_users_commands_work_on_a_fresh_installation(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"storage: {{path: {tmp_path / 'data'}}}\n")

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config",
                               str(config)], input=stdin, capture_output=True, text=True,
                              timeout=120)

    r = run("users", "add", "alice", "--role", "admin", "--password-stdin",
            stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "index.sqlite3").exists()  # the schema was made as serve would
    r = run("users", "add", "bob", "--role", "surgeon", "--password-stdin", stdin=PASSWORD)
    assert r.returncode == 1 and "unknown role" in r.stderr
    r = run("users", "add", "bob", "--role", "auditor", "--password-stdin", stdin="short\n")
    assert r.returncode == 1 and "too short" in r.stderr
    r = run("users", "add", "alice", "--role", "auditor", "--password-stdin", stdin=PASSWORD)
    assert r.returncode == 1 and "exists" in r.stderr
    assert run("users", "add", "bob", "--role", "auditor", "--password-stdin",
               stdin=PASSWORD).returncode == 0
    assert run("users", "disable", "bob").returncode == 0
    assert run("users", "passwd", "alice", "--password-stdin",
               stdin="another long password\n").returncode == 0
    listed = json.loads(run("users", "list", "--json").stdout)
    assert {(u["name"], u["role"], u["disabled"]) for u in listed} == {
        ("alice", "admin", False), ("bob", "auditor", True)}
    # the stored hash is argon2id, and no password is anywhere in the database file
    db = (tmp_path / "data" / "index.sqlite3").read_bytes()
    assert b"$argon2id$" in db and PASSWORD.encode() not in db
    assert b"another long password" not in db
    # the new password works and the disabled user cannot log in
    w = start_web(web_settings(tmp_path), users=False)
    try:
        assert httpx.post(f"{w.url}/api/token", data={
            "username": "alice", "password": "another long password"}).status_code == 200
        assert httpx.post(f"{w.url}/api/token", data={
            "username": "bob", "password": PASSWORD}).status_code == 401
    finally:
        w.stop()
    audit = run("audit", "list", "--event", "user-changed", "--json")
    assert audit.returncode == 0
    changes = json.loads(audit.stdout)
    assert len(changes) == 4 and all(c["user"] for c in changes)


def test_nothing_sensitive_in_the_logs(web: WebNode, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    secret_pw = "wrong-but-secret-password"
    with caplog.at_level(logging.DEBUG):
        httpx.post(f"{web.url}/api/token", data={"username": "admin", "password": secret_pw})
        r = httpx.post(f"{web.url}/api/token", data={"username": "admin", "password": PASSWORD})
        token = r.json()["access_token"]
        httpx.get(f"{web.url}/api/me", headers={"Authorization": f"Bearer {token}"})
        httpx.get(f"{web.url}/api/health?probe=secret-query-value")
    # the server's logs (the node's and uvicorn's), not the test client's own
    text = "\n".join(rec.getMessage() for rec in caplog.records
                     if not rec.name.startswith(("httpx", "httpcore")))
    assert "POST /api/token" in text  # the request log is there …
    for secret in (secret_pw, PASSWORD, token, "secret-query-value"):
        assert secret not in text  # … without passwords, tokens or query strings
    with web.sessions() as s:
        details = "\n".join(s.execute(select(AuditEvent.detail)).scalars())
    assert secret_pw not in details and token not in details and PASSWORD not in details


def test_the_first_start_says_how_to_create_a_user(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    port = 0
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config.write_text(f"storage: {{path: {tmp_path / 'data'}}}\nweb: {{port: {port}}}\n")
    p = subprocess.Popen([sys.executable, "-m", "dicomnode", "web", "--config", str(config)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    try:
        out = ""
        assert p.stdout is not None
        for line in p.stdout:
            out += line
            if "/login" in line:
                break
        assert "No console user exists yet" in out
        assert "dicomnode users add NAME --role admin" in out
        # the hint is printed before the app is built and listening: wait for the port
        from tests.helpers import wait_until

        def page() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/login", timeout=30)
            except httpx.ConnectError:
                return None

        r = wait_until(page, timeout=30, what="the console to listen")
        assert r.status_code == 200
        assert "No user exists yet" in r.text and "There is no default password" in r.text
    finally:
        p.terminate()
        p.wait(20)


def _unused(_: Any) -> None:
    pass
