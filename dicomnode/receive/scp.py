"""The receive stage: a pynetdicom SCP for C-ECHO and C-STORE.

Associations are records in SQL (who, from where, when, how many instances and bytes) and every
accept, reject, abort and protocol violation is audited. The C-STORE handler hands the dataset
bytes, exactly as they arrived, to the store stage and answers with the status it returns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, evt
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import Settings
from dicomnode.network import node_ae
from dicomnode.network.node_ae import NodeAE, NodeServer
from dicomnode.receive.qr import QR_CLASSES, QueryRetrieve
from dicomnode.schema import (
    Association,
    AssociationState,
    Instance,
    Series,
    Study,
    utcnow,
)
from dicomnode.state import check_move
from dicomnode.store import InstanceStore, Received
from dicomnode.store.files import StreamingFile
from dicomnode.store.meta import part10_header

log = logging.getLogger(__name__)

RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"
VERIFICATION = "1.2.840.10008.1.1"

# Every standard transfer syntax pydicom knows, uncompressed ones first: when a peer offers
# several in one context we prefer one it can always produce. Data is stored as received, so
# accepting a compressed syntax never means decoding it.
TRANSFER_SYNTAXES: list[str] = [ImplicitVRLittleEndian, ExplicitVRLittleEndian] + [
    str(ts) for ts in AllTransferSyntaxes if ts not in (ImplicitVRLittleEndian,
                                                        ExplicitVRLittleEndian)
]


def storage_sop_classes() -> list[str]:
    """All standard storage SOP classes pynetdicom knows (Raw Data Storage included)."""
    uids = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    if RAW_DATA_STORAGE not in uids:
        uids.append(RAW_DATA_STORAGE)
    return uids


# Association rows, opened and closed once per association, as Core statements built once
# (the ORM unit of work cost more than the statements)
_OPEN_ASSOCIATION = insert(Association).returning(Association.id)
_ASSOCIATION_COUNTS = select(
    Association.state, Association.instances_received, Association.bytes_received,
    Association.instances_failed
).where(Association.id == bindparam("row"))
_CLOSE_ASSOCIATION = update(Association).where(Association.id == bindparam("row")).values(
    state=bindparam("how"), ended_at=bindparam("now"))
_ASSOCIATION_SERIES = (
    select(Study.study_uid, Series.series_uid)
    .join(Instance, Instance.study_fk == Study.id)
    .join(Series, Instance.series_fk == Series.id)
    .where(Instance.association_fk == bindparam("row")).distinct())


@dataclass
class _AssocStats:
    """What only this process knows about an association; the counts live in SQL."""

    row_id: int | None = None
    duplicates: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    stream: StreamingFile | None = None  # the instance being received, if streamed


class _HandedOverServer(NodeServer):
    """A receiver worker's server: it never listens; the node hands it connected sockets
    (see :mod:`dicomnode.receive.workers`), which it runs as pynetdicom's server would."""

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.server_address = ("", 0)

    def server_activate(self) -> None:
        pass


class Receiver:
    def __init__(self, settings: Settings, store: InstanceStore, sessions: sessionmaker[Session],
                 audit: AuditLog, report: Callable[[str], None] | None = None,
                 streams: Callable[[int, str | None], None] | None = None) -> None:
        """Receiving in several processes (:mod:`dicomnode.receive.workers`): ``report`` is
        told of association rows opened and finished and connections closed (the node's view
        of a worker's load), ``streams`` of the file each association is writing (an id per
        association; None once it is stored, refused or abandoned) — what the node cleans up
        if the worker dies."""
        self.settings = settings
        self._report = report
        self._streams = streams
        self.store = store
        self.files = store.files
        self.sessions = sessions
        self.audit = audit
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self.server: Any = None
        self._unbound = False  # a receiver worker's server (start_unbound)
        self.ae_title = settings.node.ae_title
        self.qr = QueryRetrieve(settings, sessions, audit, Path(self.files.root))
        # a calling AE that may not store (access.allowed_calling_aets set, the caller not in
        # it, and listed in modalities without `store`): associations are open to modalities
        self._no_store: frozenset[str] = frozenset(
            m.ae_title for m in settings.modalities.values()
            if settings.access.allowed_calling_aets and not m.may("store")
            and m.ae_title not in settings.access.allowed_calling_aets)
        self.ae = self._build_ae()
        # SQLAlchemy configures every mapper when the first ORM object is made: ~60 ms that
        # would otherwise land on the first association's accept handler
        configure_mappers()

    # -- set-up ----------------------------------------------------------------------------
    def _build_ae(self) -> NodeAE:
        n = self.settings.node
        # the node's own AE (node_ae): its server, associations and their DUL are the node's
        # subclasses; pynetdicom itself, and any other AE in this process, stay as upstream.
        # pynetdicom's standard handlers format every PDU and DIMSE message for its DEBUG log,
        # whether or not anything is logged: ~0.5 ms per instance. Only with logging.level DEBUG.
        ae = NodeAE(ae_title=n.ae_title, on_violation=self._on_violation,
                    stream_factory=self._open_stream,
                    log_handlers=logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG))
        ae.maximum_pdu_size = n.max_pdu_bytes
        # node.max_associations is shared by the receiving processes (node.receiver_processes)
        ae.maximum_associations = n.associations_per_process
        ae.network_timeout = n.network_timeout_seconds
        ae.acse_timeout = n.acse_timeout_seconds
        ae.dimse_timeout = n.dimse_timeout_seconds
        allowed = list(self.settings.access.allowed_calling_aets)
        if allowed:  # the modalities may associate too (what each may do: receive/qr.py)
            allowed += [m.ae_title for m in self.settings.modalities.values()
                        if m.ae_title not in allowed]
        ae.require_calling_aet = allowed
        ae.require_called_aet = self.settings.access.require_called_aet
        ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for uid in QR_CLASSES:
            ae.add_supported_context(uid, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for uid in storage_sop_classes():
            # scp_role: a C-GET SCU proposes to be the storage SCP on its association (role
            # selection, PS3.7 D.3.3.4); without a role item nothing changes for a sender
            ae.add_supported_context(uid, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        # C-MOVE/C-GET send stored files' data sets as they are (bit for bit)
        ae.send_files_as_stored = True
        node_ae.warm_uid_checks(ae.supported_contexts)
        return ae

    def _open_stream(self, assoc: Any, message: Any) -> StreamingFile | None:
        """Called on the network thread at a C-STORE's first data fragment: the file the
        fragments go to as they arrive (see node_ae.StreamingDataSet)."""
        context = assoc._accepted_cx.get(message.context_id)
        if context is None:
            return None  # pynetdicom refuses the message itself
        # read from the encoded command by the receive fast path (node_ae), or decoded
        uids = getattr(message, "_dicomnode_uids", None)
        if uids is None:
            cs = message.command_set
            uids = (str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID))
        calling, _, _, _ = self._peer(assoc)
        meta = part10_header(uids[0], uids[1], str(context.transfer_syntax[0]), self.ae_title,
                             calling, self.ae_title)
        try:
            stream = self.files.open_stream(meta)
        except OSError:
            return None  # below the watermark or unwritable: the handler refuses it
        st = self._stats_for(assoc)
        with self._stats_lock:
            if st.stream is not None:
                st.stream.abort()  # a message abandoned half-way (cannot happen in order)
            st.stream = stream
        if self._streams is not None:
            self._streams(id(assoc), str(stream.path))
        return stream

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            *self.qr.handlers(),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    def start(self) -> None:
        n = self.settings.node
        self.server = self.ae.start_server((n.host, n.port), block=False,
                                           evt_handlers=self.handlers())
        log.info("listening as %s on %s:%d", n.ae_title, n.host, n.port)

    def start_unbound(self) -> None:
        """In a receiver worker: a server that runs the connections given to :meth:`take`."""
        self.server = self.ae.make_server(("", 0), evt_handlers=self.handlers(),
                                          server_class=_HandedOverServer)
        self._unbound = True

    def take(self, conn: socket.socket, address: tuple[Any, ...]) -> None:
        """Run an association on a connection the node accepted (receiver workers)."""
        conn.setblocking(True)  # as the node's accept() gives it
        self.server.process_request(conn, address)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let in-flight C-STOREs finish (up to the grace period), then close.

        The associations are aborted as soon as the instances being stored are done: a
        scanner that goes on sending while we stop gets no further acknowledgement and
        re-sends the rest to whoever runs next (socketserver's shutdown can take up to its
        0.5 s poll interval, during which a fast sender would otherwise get ~100 more
        instances acknowledged by a node that was told to stop)."""
        if self.server is None:
            return
        t0 = time.monotonic()
        closing: threading.Thread | None = None
        if not self._unbound:
            # stop the accept loop and close the listening socket while we drain
            closing = threading.Thread(target=self.server.shutdown, daemon=True,
                                       name="stop-listening")
            closing.start()
        deadline = time.monotonic() + grace_seconds
        with self._inflight_cv:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(timeout=max(0.0, deadline - time.monotonic()))
        log.info("in-flight instances done (%.2fs); closing %d association(s)",
                 time.monotonic() - t0, len(self.ae.active_associations))
        established = self._close_associations([])
        if closing is not None:
            closing.join()
            log.info("stopped listening (%.2fs)", time.monotonic() - t0)
            established += self._close_associations(established)  # any accepted meanwhile
        for assoc in established:
            assoc.join(timeout=5)
        log.info("associations closed (%.2fs)", time.monotonic() - t0)
        self.server = None

    def _close_associations(self, done: list[Any]) -> list[Any]:
        """A-ABORT (or end) every association not in ``done``; returns the established ones."""
        current = [a for a in self.ae.active_associations if a not in done]
        established = [a for a in current if a.is_established]
        for assoc in current:
            if assoc.is_established:
                # A-ABORT to the peer: it will re-send what was not acknowledged
                assoc.abort(block=False)
            else:
                # still negotiating, or a bare TCP connection: pynetdicom's thread sits in a
                # queue wait until acse_timeout; it is a daemon holding nothing of ours
                assoc.kill()
        return established

    # -- association bookkeeping -----------------------------------------------------------
    def _stats_for(self, assoc: Any) -> _AssocStats:
        with self._stats_lock:
            return self._stats.setdefault(id(assoc), _AssocStats())

    @staticmethod
    def _peer(assoc: Any) -> tuple[str, str, int, str]:
        rq = assoc.requestor
        primitive = getattr(rq, "primitive", None)
        called = getattr(primitive, "called_ae_title", "") if primitive else ""
        return (str(rq.ae_title or "").strip(), str(rq.address or ""), int(rq.port or 0),
                str(called or "").strip())

    def _on_accepted(self, event: Any) -> None:
        calling, host, port, called = self._peer(event.assoc)
        st = self._stats_for(event.assoc)
        with self.sessions() as s, s.begin():
            row_id = s.connection().execute(_OPEN_ASSOCIATION, {
                "calling_aet": calling, "called_aet": called, "peer_host": host,
                "peer_port": port, "state": AssociationState.OPEN, "started_at": utcnow(),
                "instances_received": 0, "bytes_received": 0, "instances_failed": 0,
            }).scalar_one()
            st.row_id = row_id
            if self._report is not None:
                self._report(f"open {row_id}")
            self.audit.record(EventKind.ASSOCIATION_ACCEPTED, session=s, source_aet=calling,
                              source_host=host, dest_aet=called, association_id=row_id,
                              event_type_code="110126 Node Authentication",
                              contexts=len(event.assoc.accepted_contexts), pid=os.getpid())

    def _on_rejected(self, event: Any) -> None:
        calling, host, _, called = self._peer(event.assoc)
        allowed = self.settings.access.allowed_calling_aets
        if allowed and calling not in allowed:
            reason = f"calling AE title {calling!r} is not in access.allowed_calling_aets"
        elif self.settings.access.require_called_aet and called != self.settings.node.ae_title:
            reason = f"called AE title {called!r} is not ours ({self.settings.node.ae_title!r})"
        else:
            reason = (f"busy: node.max_associations ({self.settings.node.max_associations}) "
                      "reached, or user identity refused")
        log.warning("rejected association from %s@%s: %s", calling, host, reason)
        self.audit.record(EventKind.ASSOCIATION_REJECTED, Outcome.MINOR_FAILURE,
                          source_aet=calling, source_host=host, dest_aet=called, reason=reason)

    def _on_violation(self, assoc: Any, reason: str) -> None:
        calling, host, _, called = self._peer(assoc)
        self.audit.record(EventKind.PROTOCOL_VIOLATION, Outcome.SERIOUS_FAILURE,
                          source_aet=calling, source_host=host, dest_aet=called, reason=reason)

    def _on_released(self, event: Any) -> None:
        self._finish(event.assoc, AssociationState.RELEASED)

    def _on_aborted(self, event: Any) -> None:
        self._finish(event.assoc, AssociationState.ABORTED)

    def _on_conn_close(self, event: Any) -> None:
        assoc = event.assoc
        if (assoc.is_acceptor and not assoc.is_established
                and getattr(assoc.requestor, "primitive", None) is None):
            # A bare TCP connection (health check, port scan) closed before any A-ASSOCIATE-RQ.
            # pynetdicom would keep its thread, and a max_associations slot, until
            # acse_timeout; a None on the DUL queue is its own "timed out" signal: end it now.
            assoc.dul.to_user_queue.put(None)
        if assoc.is_established and assoc is not threading.current_thread():
            # A peer closes the connection as soon as it has our A-RELEASE-RP, which
            # pynetdicom sends just before it marks the association released: this (the DUL
            # thread) can get here first. Say how it ended once the association thread has
            # (released, aborted, or the connection dropped), without holding this thread.
            threading.Thread(target=self._closed, args=(assoc, True), daemon=True,
                             name="association-closed").start()
            return
        self._closed(assoc, False)

    def _closed(self, assoc: Any, wait: bool) -> None:
        if wait:
            assoc.join(timeout=10)
        # released, or a peer that just dropped the TCP connection: make sure the row is closed
        self._finish(assoc, AssociationState.RELEASED if assoc.is_released
                     else AssociationState.ABORTED)
        with self._stats_lock:
            st = self._stats.pop(id(assoc), None)
        if st is not None and st.stream is not None:
            st.stream.abort()  # the connection went away mid-instance: nothing to keep
        if self._streams is not None:
            self._streams(id(assoc), None)
        if self._report is not None:
            self._report("closed")

    def _finish(self, assoc: Any, how: AssociationState) -> None:
        with self._stats_lock:
            st = self._stats.get(id(assoc))
            if st is None or st.finished or st.row_id is None:
                return
            st.finished = True
        calling, host, _, called = self._peer(assoc)
        finish_association(self.sessions, self.audit, st.row_id, how, calling=calling,
                           host=host, called=called, duplicates=st.duplicates,
                           refusals=st.refusals)
        if self._report is not None:
            self._report(f"finished {st.row_id}")

    # -- services --------------------------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> Dataset | int:
        with self._inflight_cv:
            self._inflight += 1
        try:
            return self._store(event)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()

    def _store(self, event: Any) -> Dataset | int:
        st = self._stats_for(event.assoc)
        calling, host, _, _ = self._peer(event.assoc)
        req = event.request
        stream = getattr(req.DataSet, "stream", None)
        with self._stats_lock:
            if st.stream is stream:
                st.stream = None
        if self._no_store and calling in self._no_store:
            return self._refuse_store(event, st, stream, calling, host)
        if stream is not None and not stream.open:
            stream = None  # aborted meanwhile: store it the ordinary way
        # a view, not a copy, of the bytes exactly as they arrived
        with req.DataSet.getbuffer() as dataset:
            meta = stream.meta if stream is not None else part10_header(
                str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax), self.ae_title, calling, self.ae_title)
            result = self.store.store(Received(
                meta=meta, dataset=dataset, stream=stream,
                transfer_syntax=str(event.context.transfer_syntax),
                sop_class_uid=str(req.AffectedSOPClassUID),
                sop_instance_uid=str(req.AffectedSOPInstanceUID), association_id=st.row_id,
                calling_aet=calling, peer_host=host))
        if stream is not None and self._streams is not None:
            self._streams(id(event.assoc), None)  # indexed, or refused and removed
        if result.ok:
            if result.outcome in ("duplicate", "kept-first"):
                st.duplicates += 1
            return int(result.status)  # a bare status: no Dataset to build and read back
        key = f"0x{result.status:04X}"
        st.refusals[key] = st.refusals.get(key, 0) + 1
        rsp = Dataset()
        rsp.Status = int(result.status)
        rsp.ErrorComment = result.reason[:64]
        return rsp


    def _refuse_store(self, event: Any, st: _AssocStats, stream: StreamingFile | None,
                      calling: str, host: str) -> Dataset:
        if stream is not None:
            stream.abort()
            if self._streams is not None:
                self._streams(id(event.assoc), None)
        reason = f"{calling!r} may not store: not in access.allowed_calling_aets, and " \
            "its modalities entry does not allow store"
        st.refusals["0x0124"] = st.refusals.get("0x0124", 0) + 1
        self.audit.record(EventKind.STORE_REFUSED, Outcome.MINOR_FAILURE, source_aet=calling,
                          source_host=host, reason=reason,
                          sop_instance_uid=str(event.request.AffectedSOPInstanceUID))
        rsp = Dataset()
        rsp.Status = 0x0124  # Refused: Not authorized
        rsp.ErrorComment = "calling AE may not store (modalities.allow)"
        return rsp


def finish_association(sessions: sessionmaker[Session], audit: AuditLog, row_id: int,
                       how: AssociationState, *, calling: str, host: str, called: str,
                       duplicates: int = 0, refusals: dict[str, int] | None = None) -> None:
    """Close an association row and audit what it transferred (also used at start-up for
    associations a crash left open, and for those of a receiver worker that died, with
    ``how=INTERRUPTED``). A row that is closed already stays as it is (nothing audited twice).

    The move is checked against the association's state machine (:func:`dicomnode.state.
    check_move`) but written as two prepared Core statements, not through
    :func:`~dicomnode.state.transition`: this runs once per association on the ingest path, and
    the events that say who did what are the peer's (``instances-received`` with the calling
    AE and host; ``association-aborted`` for any end but a release)."""
    with sessions() as s, s.begin():
        c = s.connection()
        row = c.execute(_ASSOCIATION_COUNTS, {"row": row_id}).one()
        if row.state != AssociationState.OPEN:
            log.info("association %d already %s: not closed again as %s", row_id, row.state,
                     how)
            return
        check_move(Association, row.state, how, row_id)
        c.execute(_CLOSE_ASSOCIATION, {"row": row_id, "how": how, "now": utcnow()})
        studies = c.execute(_ASSOCIATION_SERIES, {"row": row_id}).all()
        by_study: dict[str, list[str]] = {}
        for study_uid, series_uid in studies:
            by_study.setdefault(study_uid, []).append(series_uid)
        if row.instances_received or row.instances_failed or duplicates:
            outcome = Outcome.SUCCESS if not row.instances_failed else Outcome.MINOR_FAILURE
            audit.record(EventKind.INSTANCES_RECEIVED, outcome, session=s, source_aet=calling,
                         source_host=host, dest_aet=called, association_id=row_id,
                         instances=row.instances_received, bytes=row.bytes_received,
                         failed=row.instances_failed, duplicates=duplicates,
                         refusals=refusals or {}, studies=by_study, ended=how)
        if how != AssociationState.RELEASED:
            audit.record(EventKind.ASSOCIATION_ABORTED, Outcome.MINOR_FAILURE, session=s,
                         source_aet=calling, source_host=host, dest_aet=called,
                         association_id=row_id, how=how)
