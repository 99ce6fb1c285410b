"""Never let a peer decide how much memory we allocate.

pynetdicom 3.0.4 reads whatever length a PDU header claims (``socket.recv(pdu_length)``, growing a
bytearray 4 KiB at a time), so a peer announcing a 4 GiB PDU can exhaust memory. This replaces
``DULServiceProvider._read_pdu_data`` with a version that checks the length *before* reading:

* P-DATA-TF: at most the maximum PDU length we negotiated (plus a small tolerance for peers that
  count the PDV header), never more than :data:`HARD_CAP`;
* any other PDU (association request, release, abort): at most :data:`CONTROL_PDU_CAP`.

A PDU over the limit is treated as an invalid PDU (event 19): the state machine sends A-ABORT and
closes the connection; the body is never read. The callback ``ae._dicomnode_on_violation`` (set by
the receive stage) audits it.

It also reads PDU bodies with ``recv_into`` a buffer of the right size in large chunks instead of
4 KiB appends: fewer Python round trips for big PDUs (part of how ingest keeps up with Orthanc).

The replaced method is private; ``pynetdicom`` is pinned to 3.0.4 in ``pyproject.toml`` and
:func:`install` refuses to patch another version.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import pynetdicom
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = "3.0.4"
CONTROL_PDU_CAP = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts × many syntaxes fits easily
HARD_CAP = 64 << 20
PDATA_TOLERANCE = 64
_CHUNK = 1 << 20
_VALID_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)


def _local_max(dul: Any) -> int:
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    value = int(getattr(local, "maximum_length", 0) or 0)
    return HARD_CAP if value <= 0 else min(value + PDATA_TOLERANCE, HARD_CAP)


def _violation(dul: Any, reason: str) -> None:
    log.error("protocol violation, aborting association: %s", reason)
    callback = getattr(dul.assoc.ae, "_dicomnode_on_violation", None)
    if callback is not None:
        try:
            callback(dul.assoc, reason)
        except Exception:
            log.exception("violation callback failed")
    dul.event_queue.put("Evt19")  # invalid PDU → A-ABORT, close


def _recv_exact(sock: Any, view: memoryview) -> int:
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], min(_CHUNK, total - got))
        if n == 0:
            break
        got += n
    return got


def _guarded_read_pdu_data(self: Any) -> None:
    raw = self.socket.socket
    header = bytearray(6)
    try:
        if _recv_exact(raw, memoryview(header)) != 6:
            self.event_queue.put("Evt17")  # closed before a whole header arrived
            return
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in _VALID_TYPES:
        log.error("unknown PDU type 0x%02X", pdu_type)
        self.event_queue.put("Evt19")
        return
    limit = _local_max(self) if pdu_type == 0x04 else CONTROL_PDU_CAP
    if pdu_length > limit:
        _violation(self, f"PDU type 0x{pdu_type:02X} announces {pdu_length} bytes, "
                         f"limit is {limit}")
        return
    buf = bytearray(6 + pdu_length)
    buf[:6] = header
    try:
        got = _recv_exact(raw, memoryview(buf)[6:])
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    if got != pdu_length:
        log.error("connection closed mid-PDU (%d of %d bytes)", got, pdu_length)
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(buf)
    except Exception:
        log.exception("cannot decode PDU")
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


def install() -> None:
    """Patch pynetdicom once; raise if the installed version is not the one this was written for."""
    if getattr(DULServiceProvider, "_dicomnode_guarded", False):
        return
    if pynetdicom.__version__ != SUPPORTED_PYNETDICOM:
        raise RuntimeError(
            f"dicomnode's PDU guard supports pynetdicom {SUPPORTED_PYNETDICOM}, found "
            f"{pynetdicom.__version__}: pin it (pip install pynetdicom=={SUPPORTED_PYNETDICOM})"
        )
    setattr(DULServiceProvider, "_read_pdu_data", _guarded_read_pdu_data)  # noqa: B010
    setattr(DULServiceProvider, "_dicomnode_guarded", True)  # noqa: B010
