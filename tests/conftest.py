"""Fixtures: a real node process on SQLite or PostgreSQL, a fresh database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import IN_CI, NodeProc
from tests.orthanc import ORTHANC, Orthanc

PG_ADMIN_URL = os.environ.get("DICOMNODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_connect(dbname: str | None = None):  # type: ignore[no-untyped-def]
    import psycopg

    url = PG_ADMIN_URL if dbname is None else PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite file, or a new PostgreSQL database on the local server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
        return
    try:
        admin = _pg_connect()
    except Exception as e:
        if IN_CI:
            raise AssertionError(
                f"PostgreSQL must be reachable in CI ({PG_ADMIN_URL}): {e}") from e
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
    name = f"dicomnode_t_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with _pg_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def node_factory(tmp_path: Path, db_url: str) -> Iterator[object]:
    """Make (and always clean up) node processes sharing one database and storage folder."""
    made: list[NodeProc] = []

    def make(env: dict[str, str] | None = None, **overrides: object) -> NodeProc:
        n = NodeProc(tmp_path / "node", db_url, overrides=dict(overrides), env=env or {})
        if made:
            n.port = made[-1].port  # a restart keeps the address senders know
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def node(node_factory) -> NodeProc:  # type: ignore[no-untyped-def]
    return node_factory().start()  # type: ignore[no-any-return]


@pytest.fixture
def orthanc(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not Path(ORTHANC).exists():
        if IN_CI:
            raise AssertionError("Orthanc (Debian package orthanc) must be installed in CI")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()


@pytest.fixture(scope="session")
def generated(
        tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], Any]], Any]:
    """Synthetic studies made once per session: ``generated(name, make)`` calls ``make(folder)``
    the first time a name is asked for and returns what it returned then, every time.

    Simulating a chest or head CT takes seconds to tens of seconds on 2 cores; a test that
    runs on SQLite and on PostgreSQL sends the same files (read only) to two nodes."""
    made: dict[str, Any] = {}

    def get(name: str, make: Callable[[Path], Any]) -> Any:
        if name not in made:
            made[name] = make(tmp_path_factory.mktemp(name))
        return made[name]

    return get


# the console's fixtures (a live console with one user per role; headless Chromium)
from tests.web import browser, web  # noqa: E402, F401
