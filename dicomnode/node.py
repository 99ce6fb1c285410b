"""The node: wires the stages together and owns start-up recovery and shutdown.

Start: check routes against the installed plugins → migrate the schema → sweep unindexed
files (newest buckets, legacy ``tmp/``) → close associations a crash left open (audited as
interrupted) → requeue jobs left running → audit application start → assembler, router,
runner, senders → SCP.
Stop (SIGTERM/SIGINT): stop accepting → let in-flight instances finish → close associations →
stop assembler, router, runner (running jobs are requeued next start), senders → audit stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

from sqlalchemy import select

from dicomnode import __version__
from dicomnode.assemble import Assembler
from dicomnode.audit import AuditLog, EventKind
from dicomnode.config import Settings
from dicomnode.database import make_engine, make_sessionmaker, reading, upgrade
from dicomnode.receive.scp import Receiver, finish_association
from dicomnode.receive.workers import ReceiverPool
from dicomnode.route import compile_routes
from dicomnode.route.router import Router
from dicomnode.run.jobs import Runner
from dicomnode.run.registry import PluginInfo, discover
from dicomnode.run.runner import EmbeddedRunner
from dicomnode.schema import Association, AssociationState, utcnow
from dicomnode.send.notify import Notifier
from dicomnode.send.sender import Sender
from dicomnode.store import FileStore, InstanceStore

log = logging.getLogger(__name__)


class Node:
    @staticmethod
    def _plugins() -> dict[str, PluginInfo]:
        """Installed plugins; the ones refused (e.g. built for another plugin API major) are
        logged with the reason."""
        plugins = discover()
        for info in plugins.values():
            if info.error:
                log.error("plugin %s (%s) not loaded: %s", info.name, info.distribution,
                          info.error)
        return plugins

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = utcnow()
        # a broken route is a start-up error, not a surprise when the first study arrives
        # plugins are imported only when routes can run them (their imports cost the node
        # ~110 MiB of memory otherwise); one a route names but cannot load stops the start
        self.rules = compile_routes(settings, self._plugins()) if settings.routes else []
        self._stopped = threading.Event()
        upgrade(settings.database_url)
        self.engine = make_engine(settings.database_url, settings.database.echo)
        self.sessions = make_sessionmaker(self.engine)
        self.audit = AuditLog(self.sessions)
        self.files = FileStore(settings.storage.path, settings.storage.min_free_mb)
        self.index_lock = threading.Lock()
        self.store = InstanceStore(self.files, self.sessions, self.audit,
                                   settings.storage.duplicate_policy, self.index_lock,
                                   workers=settings.node.max_associations)
        self.assembler = Assembler(self.sessions, self.audit,
                                   quiet_seconds=settings.assemble.quiet_seconds,
                                   level=settings.assemble.level,
                                   poll_seconds=settings.assemble.poll_seconds,
                                   index_lock=self.index_lock, started_at=self.started_at)
        self.pool = (ReceiverPool(settings, self.sessions, self.audit, self.files.root)
                     if settings.node.receiver_processes > 1 else None)
        self.receiver = Receiver(settings, self.store, self.sessions, self.audit,
                                 report=self.pool.local_report if self.pool else None)
        self.sender = Sender(settings, self.sessions, self.audit)
        self.notifier = Notifier(self.sessions, self.audit)
        self.runner: Runner = EmbeddedRunner(settings, self.sessions, self.audit,
                                             on_success=self.sender.wake,
                                             on_notify=self.notifier.wake.set)
        self.router = Router(self.sessions, self.audit, self.rules, self.files.root,
                             max_attempts=settings.runner.max_attempts,
                             poll_seconds=settings.assemble.poll_seconds,
                             submit=self.runner.submit)

    def _recover(self) -> dict[str, int]:
        forward, deleted = self.store.sweep()
        with reading(self.sessions)() as s:
            stale = s.execute(select(Association.id, Association.calling_aet,
                                     Association.peer_host, Association.called_aet)
                              .where(Association.state == AssociationState.OPEN)).all()
        for row_id, calling, host, called in stale:
            finish_association(self.sessions, self.audit, row_id, AssociationState.INTERRUPTED,
                               calling=calling, host=host, called=called)
        if forward or deleted:
            self.audit.record(EventKind.INSTANCES_SWEPT, rolled_forward=forward,
                              removed_partial=deleted)
        requeued = self.runner.recover()
        return {"rolled_forward": forward, "removed_partial": deleted,
                "interrupted_associations": len(stale), "requeued_jobs": requeued}

    def start(self) -> None:
        recovered = self._recover()
        n = self.settings.node
        self.audit.record(EventKind.APPLICATION_START, source_aet=n.ae_title,
                          source_host=socket.gethostname(), version=__version__, pid=os.getpid(),
                          port=n.port, database=self.engine.url.get_backend_name(),
                          storage=str(self.files.root), recovered=recovered)
        self.router.start()
        self.runner.start()
        self.sender.start()
        self.notifier.start()  # goes on with notifications a crash left pending
        if self.pool is not None:
            self.pool.start()  # after the sweep and recovery above
        self.receiver.start()
        if self.pool is not None:
            self.pool.install(self.receiver.server)
        # the quiet period counts from when senders can reach the node again, not from when
        # the process began (plugin discovery and migrations come first)
        self.assembler.started_at = utcnow()
        self.assembler.start()

    def stop(self, reason: str = "requested") -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping (%s): finishing in-flight instances", reason)
        if self.pool is not None:
            self.pool.begin_stop()  # workers drain while the node's own receiver does
        self.receiver.stop(self.settings.node.shutdown_grace_seconds)
        if self.pool is not None:
            self.pool.stop(self.settings.node.shutdown_grace_seconds)
        self.assembler.stop()
        self.router.stop()
        self.runner.stop()
        self.sender.stop()
        self.notifier.stop()
        self.store.close()
        self.audit.record(EventKind.APPLICATION_STOP, source_aet=self.settings.node.ae_title,
                          source_host=socket.gethostname(), reason=reason, pid=os.getpid())
        self.engine.dispose()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop = threading.Event()
        reason = ["signal"]

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            reason[0] = signal.Signals(signum).name
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        log.info("dicomnode %s ready", __version__)
        while not stop.wait(1.0):
            pass
        self.stop(reason[0])
