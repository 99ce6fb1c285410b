"""Shared parts for the console's tests: a live console on a real database, users of each
role, an authenticated API client, and a headless Debian Chromium driven by Playwright.

``WebNode`` serves the real app (uvicorn, in a thread) on a free port against a database made
by the project's migrations; the node's DICOM side is not needed for most console tests (a
test that needs it starts a real node with ``tests.helpers.NodeProc`` on the same database).
Screenshots go to ``$DICOMNODE_SCREENSHOTS`` (default ``build/screenshots``); the README's
come from there.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog
from dicomnode.config import Settings
from dicomnode.database import make_engine, make_sessionmaker, upgrade
from tests.helpers import IN_CI

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("DICOMNODE_SCREENSHOTS", ROOT / "build" / "screenshots"))
CHROMIUM = os.environ.get("DICOMNODE_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery"  # every test user's password (≥ 10 characters)
ROLES = ("admin", "radiologist", "auditor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WebNode:
    """A running console. ``users``: one user per role, named after it (``admin``,
    ``radiologist``, ``auditor``), password :data:`PASSWORD`."""

    settings: Settings
    sessions: sessionmaker[Session]
    audit: AuditLog
    url: str
    server: Any = None
    tokens: dict[str, str] = field(default_factory=dict)

    def add_user(self, name: str, role: str, password: str = PASSWORD,
                 display_name: str = "") -> None:
        from dicomnode.web.auth import add_user

        with self.sessions() as s, s.begin():
            add_user(s, self.audit, name, role, password, by="test",
                     display_name=display_name or f"Dr {name.title()}")

    def token(self, name: str, password: str = PASSWORD) -> str:
        """A bearer token for ``name`` (cached: each login is an audit event)."""
        if name not in self.tokens:
            r = httpx.post(f"{self.url}/api/token",
                           data={"username": name, "password": password}, timeout=30)
            assert r.status_code == 200, r.text
            self.tokens[name] = r.json()["access_token"]
        return self.tokens[name]

    def api(self, name: str | None) -> httpx.Client:
        """An API client logged in as ``name`` with a bearer token (None: anonymous)."""
        headers = {"Authorization": f"Bearer {self.token(name)}"} if name else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60,
                            follow_redirects=False)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def web_settings(root: Path, db_url: str | None = None, **web: Any) -> Settings:
    port = free_port()
    data: dict[str, Any] = {
        "storage": {"path": str(root / "data"), "min_free_mb": 1},
        "web": {"host": "127.0.0.1", "port": port, "failure_delay_seconds": 0, **web},
    }
    if db_url:
        data["database"] = {"url": db_url}
    return Settings(**data)


def start_web(settings: Settings, users: bool = True) -> WebNode:
    from dicomnode.web.server import WebThread

    settings.storage.path.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    audit = AuditLog(sessions)
    w = WebNode(settings, sessions, audit, settings.web.base_url)
    if users:
        for role in ROLES:
            w.add_user(role, role)
    w.server = WebThread(settings, sessions, audit)
    w.server.start()
    return w


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebNode]:
    """A console on SQLite with one user per role, shared by a test module."""
    w = start_web(web_settings(tmp_path_factory.mktemp("web")))
    yield w
    w.stop()


# -- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium (Playwright cannot download its own browsers here)."""
    if not Path(CHROMIUM).exists():
        if IN_CI:
            raise AssertionError(f"Chromium must be installed in CI ({CHROMIUM}: "
                                 "apt-get install chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def login(browser: Any, web: WebNode, name: str, password: str = PASSWORD) -> Any:
    """A new browser context logged in as ``name`` through the login page; returns its
    page."""
    context = browser.new_context(viewport={"width": 1360, "height": 900},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{web.url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "/login" not in page.url, page.inner_text("main")
    return page


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as ``<SCREENSHOTS>/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def copy_screenshots(dest: Path, names: list[str]) -> None:
    """For the README: copy chosen screenshots of the last test run into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(SCREENSHOTS / f"{n}.png", dest / f"{n}.png")
