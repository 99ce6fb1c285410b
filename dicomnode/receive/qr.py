"""The Query/Retrieve SCP on the node's AE: C-FIND, C-MOVE and C-GET, Patient and Study Root.

Answered from the SQL index alone (:mod:`dicomnode.query`): a C-FIND never opens a file.
Retrieval sends each instance's data set exactly as it was stored (``send_files_as_stored``:
the bytes after the file meta, no decode/re-encode) when the peer accepted the stored transfer
syntax, and otherwise decodes it with pydicom (decompressing where needed) and sends it in
Explicit or Implicit VR Little Endian.

Who may do what: ``modalities`` (config). A caller not listed, or listed without ``find``/
``move``/``get``, is refused with 0x0124 (Refused: Not authorized); a C-MOVE destination that is
not listed gets 0xA801. A response cut by ``query.max_results`` ends with 0xA700 (Out of
resources) and an error comment saying so. Every query and retrieve is audited
(110112 Query, 110104 DICOM Instances Transferred), refusals included. See docs/query-retrieve.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import Settings
from dicomnode.network.node_ae import StoredFile
from dicomnode.query import (
    ATTRS,
    Model,
    Query,
    QueryError,
    query_from_dataset,
    run_query,
    select_instances,
    to_dataset,
)

log = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QR_CLASSES = {PATIENT_ROOT_FIND: Model.PATIENT_ROOT, PATIENT_ROOT_MOVE: Model.PATIENT_ROOT,
              PATIENT_ROOT_GET: Model.PATIENT_ROOT, STUDY_ROOT_FIND: Model.STUDY_ROOT,
              STUDY_ROOT_MOVE: Model.STUDY_ROOT, STUDY_ROOT_GET: Model.STUDY_ROOT}

NOT_AUTHORIZED = 0x0124  # PS3.7 C.5: Refused: Not authorized
OUT_OF_RESOURCES = 0xA700
CANCEL = 0xFE00
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        # PS3.7: ErrorComment is LO, at most 64 characters
        ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds


def _summary(query: Query) -> dict[str, str]:
    """The identifier as audited: level and each key's value (cut at 64 characters)."""
    keys = {k: (v if len(v) <= 64 else v[:61] + "...") for k, v in list(query.keys.items())[:40]}
    return {"level": query.level.value, "model": query.model.value, **keys}


class _Counts:
    """C-STORE sub-operation outcomes, counted from the responses the peer sends."""

    def __init__(self) -> None:
        self.completed = 0
        self.warning = 0
        self.failed = 0
        self.lock = threading.Lock()

    def on_recv(self, event: Any) -> None:
        cs = getattr(event.message, "command_set", None)
        if cs is None or int(getattr(cs, "CommandField", 0)) != 0x8001:
            return
        status = int(cs.Status)
        with self.lock:
            if status == 0:
                self.completed += 1
            elif status in (0xB000, 0xB007, 0xB006) or status >> 12 == 0xB:
                self.warning += 1
            else:
                self.failed += 1


def _wait_reactor_resumed(assoc: Any, timeout: float = 2.0) -> None:
    """Before the next C-STORE on a C-MOVE's association: let its reactor thread wake from
    the pause of the previous one. pynetdicom's ``send_c_store`` clears the reactor's
    checkpoint and goes on as soon as ``_is_paused`` is true; if the reactor has not yet woken
    from the last pause, that flag is stale, the reactor then runs one turn unpaused and takes
    the C-STORE response off the DIMSE queue ("Received unexpected C-STORE service message"),
    and the sub-operation hangs until the DIMSE timeout. Seen with a busy CPU on 300-instance
    moves; the wait is one thread switch."""
    deadline = time.monotonic() + timeout
    while getattr(assoc, "_is_paused", False) and assoc.is_established \
            and time.monotonic() < deadline:
        time.sleep(0.0001)


class QueryRetrieve:
    """The C-FIND/C-MOVE/C-GET handlers the receive stage binds on the node's AE."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], audit: AuditLog,
                 storage_root: Path) -> None:
        self.settings = settings
        self.sessions = sessions
        self.audit = audit
        self.root = storage_root
        self.by_aet = {m.ae_title: m for m in settings.modalities.values()}

    def handlers(self) -> list[Any]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move),
                (evt.EVT_C_GET, self.on_get)]

    # -- who -----------------------------------------------------------------------------
    @staticmethod
    def _who(assoc: Any) -> tuple[str, str]:
        rq = assoc.requestor
        return str(rq.ae_title or "").strip(), str(rq.address or "")

    def _may(self, calling: str, service: str) -> bool:
        modality = self.by_aet.get(calling)
        return modality is not None and modality.may(service)

    def _refusal(self, service: str, calling: str) -> str:
        if calling not in self.by_aet:
            return f"calling AE {calling!r} is not in modalities: no {service}"
        return f"modality {calling!r} is not allowed to {service} (modalities.*.allow)"

    def _parse(self, event: Any) -> Query:
        model = QR_CLASSES.get(str(event.request.AffectedSOPClassUID))
        if model is None:
            raise QueryError("not a Query/Retrieve SOP class")
        try:
            identifier = event.identifier
        except Exception as exc:  # pynetdicom could not decode it
            raise QueryError(f"identifier cannot be decoded: {exc}") from exc
        return query_from_dataset(identifier, model,
                                  fuzzy=self.settings.query.fuzzy_person_names)

    # -- C-FIND --------------------------------------------------------------------------
    def on_find(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        calling, host = self._who(event.assoc)
        if not self._may(calling, "find"):
            reason = self._refusal("find", calling)
            self.audit.record(EventKind.QUERY_REFUSED, Outcome.SERIOUS_FAILURE,
                              source_aet=calling, source_host=host, reason=reason)
            yield _status(NOT_AUTHORIZED, reason), None
            return
        try:
            query = self._parse(event)
        except QueryError as exc:
            self.audit.record(EventKind.QUERY_REFUSED, Outcome.MINOR_FAILURE,
                              source_aet=calling, source_host=host, reason=str(exc),
                              status=f"0x{exc.status:04X}")
            yield _status(exc.status, str(exc)), None
            return
        max_results = self.settings.query.max_results
        with self.sessions() as s:
            result = run_query(s, query, max_results=max_results)
        # FF01: a key the index does not hold was returned empty (PS3.4 C.4.1.1.4)
        pending = 0xFF01 if any(k not in ATTRS for k in query.keys) else 0xFF00
        detail: dict[str, Any] = {"query": _summary(query), "matches": len(result.rows)}
        for sent, row in enumerate(result.rows):
            if event.is_cancelled:
                self.audit.record(EventKind.QUERY, Outcome.SUCCESS, source_aet=calling,
                                  source_host=host, **detail, sent=sent, cancelled=True)
                yield CANCEL, None
                return
            yield pending, to_dataset(row)
        if result.truncated:
            reason = f"more than query.max_results ({max_results}) matches: narrow the query"
            self.audit.record(EventKind.QUERY, Outcome.MINOR_FAILURE, source_aet=calling,
                              source_host=host, **detail, truncated=True, reason=reason)
            yield _status(OUT_OF_RESOURCES, reason), None
            return
        self.audit.record(EventKind.QUERY, Outcome.SUCCESS, source_aet=calling,
                          source_host=host, **detail)

    # -- what to send --------------------------------------------------------------------
    def _instances(self, query: Query) -> list[Any]:
        with self.sessions() as s:
            dialect = s.get_bind().dialect.name
            return list(s.execute(select_instances(query, dialect)).all())

    def _item(self, row: Any, accepted: set[tuple[str, str]]) -> Dataset:
        """What to yield for one instance: the stored file's path (sent as stored) when the
        peer accepted its class in the stored transfer syntax, else a decoded data set in
        an uncompressed one (pydicom decompresses; pynetdicom encodes it for the context)."""
        path: str = os.fspath(self.root / str(row.path))
        if (row.sop_class_uid, row.transfer_syntax_uid) in accepted:
            return StoredFile(path, row.sop_class_uid, row.sop_instance_uid)
        ds: Dataset = dcmread(path)
        if UID(row.transfer_syntax_uid).is_compressed:
            # pydicom's pixel data handlers; the same instance (a lossless change of TS)
            ds.decompress(generate_instance_uid=False)
        if not any((row.sop_class_uid, ts) in accepted for ts in UNCOMPRESSED):
            # the peer took only a compressed syntax for this class (getscu +xr: RLE):
            # encode in it if pydicom can (RLE Lossless natively), else the C-STORE fails
            offered = [ts for cls, ts in accepted if cls == row.sop_class_uid]
            for ts in offered:
                try:
                    ds.compress(ts, generate_instance_uid=False)
                    break
                except Exception as exc:  # no encoder for it
                    log.info("cannot encode %s in %s: %s", row.sop_instance_uid, ts, exc)
        # the file meta says how the data set is encoded now; pynetdicom converts between
        # Explicit and Implicit VR Little Endian for whichever context the peer accepted
        return ds

    @staticmethod
    def _contexts(rows: list[Any]) -> list[Any]:
        """For each SOP class: a context per stored transfer syntax (sent as stored if
        accepted), and one uncompressed fallback (Explicit/Implicit VR Little Endian), at
        most 128 in all."""
        contexts: list[Any] = []
        seen: set[tuple[str, str]] = set()
        classes: list[str] = []
        for row in rows:
            key = (row.sop_class_uid, row.transfer_syntax_uid)
            if key not in seen:
                seen.add(key)
                if row.sop_class_uid not in classes:
                    classes.append(row.sop_class_uid)
                contexts.append(build_context(row.sop_class_uid, [row.transfer_syntax_uid]))
        contexts += [build_context(c, list(UNCOMPRESSED)) for c in classes]
        return contexts[:MAX_CONTEXTS]

    @staticmethod
    def _accepted(assoc: Any) -> set[tuple[str, str]]:
        return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts}

    # -- C-MOVE --------------------------------------------------------------------------
    def on_move(self, event: Any) -> Iterator[Any]:
        calling, host = self._who(event.assoc)
        dest_aet = str(event.move_destination or "").strip()
        destination = self.by_aet.get(dest_aet)
        if destination is None:
            self.audit.record(EventKind.RETRIEVE_REFUSED, Outcome.SERIOUS_FAILURE,
                              source_aet=calling, source_host=host, dest_aet=dest_aet[:16],
                              reason=f"move destination {dest_aet!r} is not in modalities",
                              status="0xA801")
            yield None, None  # pynetdicom answers 0xA801 Move destination unknown
            return
        refusal: tuple[int, str] | None = None
        query: Query | None = None
        rows: list[Any] = []
        if not self._may(calling, "move"):
            refusal = (NOT_AUTHORIZED, self._refusal("move", calling))
        else:
            try:
                query = self._parse(event)
                rows = self._instances(query)
            except QueryError as exc:
                refusal = (exc.status, str(exc))
        counts = _Counts()
        holder: dict[str, Any] = {}

        def accepted(ev: Any) -> None:
            holder["assoc"] = ev.assoc

        contexts = self._contexts(rows) or [build_context(UID("1.2.840.10008.1.1"))]
        yield destination.host, destination.port, {
            "contexts": contexts,
            "evt_handlers": [(evt.EVT_ACCEPTED, accepted), (evt.EVT_DIMSE_RECV, counts.on_recv)],
        }
        if refusal is not None:
            self.audit.record(EventKind.RETRIEVE_REFUSED, Outcome.SERIOUS_FAILURE,
                              source_aet=calling, source_host=host, dest_aet=dest_aet,
                              reason=refusal[1], status=f"0x{refusal[0]:04X}")
            yield 1
            yield _status(*refusal), None
            return
        assert query is not None
        yield len(rows)
        yield from self._send(event, rows, holder, counts, calling, host, dest_aet, query,
                              EventKind.INSTANCES_MOVED)

    def _send(self, event: Any, rows: list[Any], holder: dict[str, Any], counts: _Counts,
              calling: str, host: str, dest_aet: str, query: Query,
              kind: EventKind) -> Iterator[Any]:
        accepted: set[tuple[str, str]] | None = None
        cancelled = False
        for row in rows:
            if event.is_cancelled:
                cancelled = True
                yield CANCEL, None
                break
            assoc = holder.get("assoc")
            if accepted is None:
                accepted = self._accepted(assoc) if assoc is not None else set()
            elif kind is EventKind.INSTANCES_MOVED and assoc is not None:
                _wait_reactor_resumed(assoc)
            try:
                item: Any = self._item(row, accepted)
            except Exception as exc:  # unreadable file, undecodable pixel data
                log.warning("cannot send %s: %s", row.sop_instance_uid, exc)
                item = Dataset()  # pynetdicom counts a failed sub-operation
                item.SOPInstanceUID = row.sop_instance_uid
            yield 0xFF00, item
        studies = sorted({r.study_uid for r in rows})
        outcome = Outcome.SUCCESS if not counts.failed and not cancelled else \
            Outcome.MINOR_FAILURE
        self.audit.record(kind, outcome, source_aet=calling, source_host=host,
                          dest_aet=dest_aet[:16], query=_summary(query), instances=len(rows),
                          completed=counts.completed, warning=counts.warning,
                          failed=counts.failed, cancelled=cancelled,
                          studies=studies[:100])

    # -- C-GET ---------------------------------------------------------------------------
    def on_get(self, event: Any) -> Iterator[Any]:
        calling, host = self._who(event.assoc)
        if not self._may(calling, "get"):
            reason = self._refusal("get", calling)
            self.audit.record(EventKind.RETRIEVE_REFUSED, Outcome.SERIOUS_FAILURE,
                              source_aet=calling, source_host=host, reason=reason,
                              status=f"0x{NOT_AUTHORIZED:04X}")
            yield 1
            yield _status(NOT_AUTHORIZED, reason), None
            return
        try:
            query = self._parse(event)
            rows = self._instances(query)
        except QueryError as exc:
            self.audit.record(EventKind.RETRIEVE_REFUSED, Outcome.MINOR_FAILURE,
                              source_aet=calling, source_host=host, reason=str(exc),
                              status=f"0x{exc.status:04X}")
            yield 1
            yield _status(exc.status, str(exc)), None
            return
        counts = _Counts()
        event.assoc.bind(evt.EVT_DIMSE_RECV, counts.on_recv)
        try:
            yield len(rows)
            yield from self._send(event, rows, {"assoc": event.assoc}, counts, calling, host,
                                  calling, query, EventKind.INSTANCES_RETRIEVED)
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, counts.on_recv)
