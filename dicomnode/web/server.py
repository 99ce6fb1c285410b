"""Running the console: in the node's process beside the DICOM listener (``dicomnode
serve``), or alone against the same database (``dicomnode web``)."""

from __future__ import annotations

import logging
import threading

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog
from dicomnode.config import Settings
from dicomnode.store import InstanceStore
from dicomnode.web.app import create_app

log = logging.getLogger("dicomnode.web")


def _server(settings: Settings, sessions: sessionmaker[Session], audit: AuditLog | None,
            store: InstanceStore | None = None) -> uvicorn.Server:
    app = create_app(settings, sessions, audit, store)
    config = uvicorn.Config(app, host=settings.web.host, port=settings.web.port,
                            log_config=None, access_log=False,  # ours logs paths only
                            proxy_headers=settings.web.public_url is not None,
                            server_header=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class WebThread:
    """The console in a thread of the node's process; :meth:`stop` ends it."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 audit: AuditLog | None = None, store: InstanceStore | None = None) -> None:
        self.server = _server(settings, sessions, audit, store)
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.url = settings.web.base_url

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout * 20)):
            if self.server.started or not self.thread.is_alive():
                break
            deadline.wait(0.05)
        if not self.server.started:
            raise OSError(f"the web console did not start on {self.url} "
                          "(port in use? see the log)")
        log.info("console at %s", self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def run_web(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Serve until SIGINT/SIGTERM in this (main) thread."""
    server = _server(settings, sessions, None)
    log.info("console at %s", settings.web.base_url)
    server.run()
