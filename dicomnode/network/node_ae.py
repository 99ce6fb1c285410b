"""The node's own pynetdicom 3.0.4 classes: an AE, its association server, request handler,
association, DUL, socket and DIMSE provider, each a subclass that the node's AE creates.
Nothing here changes pynetdicom itself: a stock ``pynetdicom.AE`` in the same process (a
plugin's, a test's) behaves exactly as upstream (see ``docs/pynetdicom.md`` and
``tests/test_pynetdicom_contained.py``).

How the node's classes come in, through pynetdicom's own hooks:

* :class:`NodeAE` (an ``AE``): ``make_server`` builds a :class:`NodeServer` (``start_server``
  passes ``ThreadedAssociationServer``; ``make_server(server_class=...)`` is public), whose
  request handler (``AssociationServer(request_handler=...)``, public) is
  :class:`NodeRequestHandler`; it creates a :class:`NodeAssociation` for each connection. As a
  requestor (the send stage) ``NodeAE._create_socket``, which ``AE.associate`` calls on the
  association it has just made, makes that association a :class:`NodeAssociation`.
* :class:`NodeAssociation` gives itself a :class:`NodeDUL` and a :class:`NodeDIMSE` in place of
  the stock providers ``Association.__init__`` made (same constructor arguments, timeouts
  re-applied), and runs its reactor with a wake event instead of 1 ms sleeps.
* :class:`NodeSocket` is the association's ``AssociationSocket``.

What each changes, relative to upstream 3.0.4:

1. Never let a peer decide how much memory we allocate (:meth:`NodeDUL._read_pdu_data`).
pynetdicom 3.0.4 reads whatever length a PDU header claims (``socket.recv(pdu_length)``, growing
a bytearray 4 KiB at a time; pynetdicom #1086), so a peer announcing a 4 GiB PDU can exhaust
memory. The length is checked *before* reading:

* P-DATA-TF: at most the maximum PDU length we negotiated (plus a small tolerance for peers that
  count the PDV header), never more than :data:`HARD_CAP`;
* any other PDU (association request, release, abort): at most :data:`CONTROL_PDU_CAP`.

A PDU over the limit is treated as an invalid PDU (event 19): the state machine sends A-ABORT and
closes the connection; the body is never read. ``NodeAE.on_violation`` (set by the receive
stage) audits it. PDU bodies are read with ``recv_into`` a buffer of the right size in large
chunks instead of 4 KiB appends.

2. Latency. pynetdicom's DUL reactor polls: ``select(timeout=0)``, then ``sleep(1 ms)`` when idle.
Every instance waits up to 1 ms for its data to be noticed and up to 1 ms more for its response to
be sent; with a synchronous sender that is ~1 ms per instance of pure idling (bench/ingest showed
pynetdicom alone at 0.97 s for 300 × 512² CT, 0.63 s without the idle sleep). Here the reactor
instead blocks in ``select`` on the socket *and* a per-association wake pipe that ``send_pdu``
writes to, for at most :data:`IDLE_WAIT` seconds (:meth:`NodeSocket.ready`): incoming data and
outgoing responses are handled at once, and an idle association wakes only 50 times a second
(pynetdicom's: 1000). A C-STORE response is encoded directly and sent from the association
thread under a send lock (:meth:`NodeDUL.send_pdu`; no hop to the DUL thread). The association
reactor waits on an event that completed DIMSE messages set (:class:`_AssociationTime`), and the
DUL reactor skips its ``time.sleep(0)`` (:class:`_DULTime`).

3. Stream each incoming C-STORE data set to disk while it arrives (:class:`StreamingDataSet`):
writing and hashing ~0.5 MB after the last fragment used to be on the sender's critical path.

4. TCP_NODELAY on the node's association sockets (:class:`NodeSocket`), accepted and outgoing:
pynetdicom never sets it, and a C-STORE (a command PDU, then data PDUs) then waits ~40 ms per
object for the peer's delayed ACK.

5. Copy presentation contexts cheaply when an association starts (shared immutable UIDs,
:meth:`NodeRequestHandler._create_association`), encode C-STORE responses directly
(:func:`encode_c_store_rsp`, :meth:`NodeDIMSE.send_msg`) and decode C-STORE requests directly
(:func:`c_store_rq_primitive`, set on each of the node's own DIMSE messages).

6. The P-DATA PDUs of a C-STORE request — its command set (:func:`_c_store_command`, read
without pydicom) and its data set fragments, the last one included (:func:`_data_fragments`,
:func:`_complete`) — go straight from the socket buffer into the DIMSE message, skipping PDU
objects, the event queue and the state machine. Each PDU body is read together with what
follows it on the socket (:class:`ReadAhead`).

7. Class and syntax UIDs checked once (:func:`_set_uid`, :func:`_add_transfer_syntax`, warmed
at start-up by :func:`warm_uid_checks`) where the node's DUL decodes an A-ASSOCIATE-RQ
(:meth:`NodeDUL._decode_pdu`) and where the node's ACSE negotiates (:class:`NodeACSE`): every
association proposes the same ~100 presentation contexts, and pynetdicom converts and
validates each UID through pydicom's regexes every time. (The A-ASSOCIATE-AC is still encoded
by pynetdicom's state machine, one check per context: ~128 per dcmtk ``storescu``.)

8. pynetdicom's standard logging handlers (which format every PDU and DIMSE message whether or
not anything is logged, ~0.5 ms per instance) are bound to the node's associations only when
``NodeAE.log_handlers`` says so (the ``pynetdicom`` logger at DEBUG), instead of by the
process-global ``_config.LOG_HANDLER_LEVEL``.

The overridden methods are private; ``pynetdicom`` is pinned to 3.0.4 in ``pyproject.toml``,
:func:`check_version` refuses another version, and ``tests/test_pynetdicom_contained.py`` fails
if a release moves or changes what these classes override.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import select
import socket
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pynetdicom
import pynetdicom.presentation
import pynetdicom.utils
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_items import PDU_ITEM_TYPES, AbstractSyntaxSubItem, TransferSyntaxSubItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

log = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = "3.0.4"
CONTROL_PDU_CAP = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts × many syntaxes fits easily
HARD_CAP = 64 << 20
PDATA_TOLERANCE = 64
_CHUNK = 1 << 20
_VALID_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
IDLE_WAIT = 0.02


def _local_max(dul: Any) -> int:
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    value = int(getattr(local, "maximum_length", 0) or 0)
    return HARD_CAP if value <= 0 else min(value + PDATA_TOLERANCE, HARD_CAP)


def _violation(dul: Any, reason: str) -> None:
    log.error("protocol violation, aborting association: %s", reason)
    callback = getattr(dul.assoc.ae, "on_violation", None)  # NodeAE.on_violation
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


class ReadAhead:
    """What was read from an association's socket beyond the PDU being decoded.

    Reading a PDU exactly (its 6-byte header, then its body) costs a ``select`` and two or
    more ``recv`` calls per PDU, each giving up the interpreter lock (a thread switch when
    another association waits for it). Instead, the rest of each body is read with
    ``recvmsg_into`` into the PDU's own buffer *and* this one: whatever the peer sent after
    the PDU (usually the next PDU's header and part of its body) arrives in the same call,
    and the reactor finds it here without asking the socket again (:func:`_ready`). Bounded
    (:data:`READ_AHEAD` bytes), so a peer still never decides how much we allocate; plain
    TCP sockets only (a TLS socket has no ``recvmsg_into``: read exactly, as before).
    """

    __slots__ = ("buf", "end", "start", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def take(self, out: memoryview) -> int:
        """Move up to len(out) buffered bytes into ``out``; returns how many."""
        n = min(len(out), self.end - self.start)
        if n:
            out[:n] = self.view[self.start:self.start + n]
            self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        return n

    def fill(self, sock: Any, need: int) -> bool:
        """Block until at least ``need`` (≤ size) bytes are buffered; False if the peer
        closed the connection first."""
        if self.end - self.start >= need:
            return True
        if self.start:  # fewer than `need` bytes left: move them to the front
            left = bytes(self.view[self.start:self.end])
            self.buf[:len(left)] = left
            self.start, self.end = 0, len(left)
        while self.end < need:
            n = sock.recv_into(self.view[self.end:])
            if n == 0:
                return False
            self.end += n
        return True

    def read_into(self, sock: Any, out: memoryview) -> int:
        """Fill ``out`` from the buffer, then from the socket, reading ahead what follows;
        returns how many bytes of ``out`` were filled (fewer: the peer closed)."""
        got = self.take(out)
        total = len(out)
        while got < total:
            # the buffer is empty here (take() emptied it before out was full)
            n = sock.recvmsg_into([out[got:], self.view])[0]
            if n == 0:
                break
            if n > total - got:
                self.start, self.end = 0, n - (total - got)
                got = total
            else:
                got += n
        return got


READ_AHEAD = 256 * 1024


def _read_ahead(assoc_socket: Any) -> ReadAhead | None:
    rx: Any = getattr(assoc_socket, "_dicomnode_rx", False)
    if rx is False:
        raw = assoc_socket.socket
        plain = type(raw) is socket.socket and hasattr(raw, "recvmsg_into")
        rx = assoc_socket._dicomnode_rx = ReadAhead(READ_AHEAD) if plain else None
    return rx  # type: ignore[no-any-return]


def _guarded_read_pdu_data(self: Any) -> None:
    raw = self.socket.socket
    rx = _read_ahead(self.socket)
    header = bytearray(6)
    try:
        if rx is not None:
            if not rx.fill(raw, 6):
                self.event_queue.put("Evt17")  # closed before a whole header arrived
                return
            rx.take(memoryview(header))
        elif _recv_exact(raw, memoryview(header)) != 6:
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
        body = memoryview(buf)[6:]
        got = rx.read_into(raw, body) if rx is not None else _recv_exact(raw, body)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    if got != pdu_length:
        log.error("connection closed mid-PDU (%d of %d bytes)", got, pdu_length)
        self.event_queue.put("Evt17")
        return
    if pdu_type == 0x04 and _pdu_received(self, buf):
        return
    try:
        pdu, event = self._decode_pdu(buf)
    except Exception:
        log.exception("cannot decode PDU")
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


_PDU_HANDLERS = (evt.EVT_PDU_RECV, evt.EVT_DATA_RECV, evt.EVT_DIMSE_RECV)


def _fast_path_open(dul: Any) -> bool:
    """In data transfer, nothing queued ahead (keep the order), nothing bound that wants to
    see PDUs, data or DIMSE messages (DEBUG logging binds those)."""
    if dul.state_machine.current_state != "Sta6":
        return False
    if not dul.event_queue.empty() or not dul._recv_pdu.empty():
        return False  # keep the order: what came before is still waiting to be processed
    get = dul.assoc.get_handlers
    return not any(get(e) for e in _PDU_HANDLERS)


def _pdu_received(dul: Any, buf: bytearray) -> bool:
    """The P-DATA-TF fast paths: a C-STORE request's command (:func:`_c_store_command`) or
    data set fragments (:func:`_data_fragments`). False: pynetdicom's path decodes it."""
    if not _fast_path_open(dul):
        return False
    if dul.assoc.dimse.message is None:
        return _c_store_command(dul, buf)
    return _data_fragments(dul, buf)


def _c_store_command(dul: Any, buf: bytearray) -> bool:
    """A P-DATA-TF holding exactly one PDV, the whole command set of a C-STORE-RQ that has
    a data set, while no message is being received: start the message from it.

    pynetdicom's path (PDU items, Evt10, DT-2, P-DATA primitive, ``decode_msg``) decodes
    the command set through pydicom (~70 µs) and the stream factory then reads two UIDs
    from it (~40 µs more). Here the command set's elements are read directly
    (:func:`_command_values`); the message's pydicom ``command_set`` is decoded only if a
    consumer needs it (:func:`_message_to_primitive`'s fallback). Anything else — a command
    split over PDVs, another command, more than one PDV — returns False.
    """
    end = len(buf)
    if end < 12:
        return False
    length, context_id, control = struct.unpack_from(">LBB", buf, 6)
    if length < 2 or 10 + length != end or control & 0x03 != 0x03:
        return False
    raw = bytes(buf[12:end])
    values = _command_values(raw)
    if (values is None or values.get(0x0100) != b"\x01\x00"
            or values.get(0x0800, b"\x01\x01") == b"\x01\x01"):
        return False  # not a C-STORE-RQ with a data set
    try:
        uids = (_text_uid(values[0x0002]), _text_uid(values[0x1000]))
    except (KeyError, UnicodeDecodeError):
        return False
    message: Any = _new_message(dul.assoc)
    message.encoded_command_set.write(raw)
    message.context_id = context_id
    message.__class__ = C_STORE_RQ
    message._dicomnode_uids = uids  # (Affected SOP Class UID, Affected SOP Instance UID)
    message._dicomnode_lazy_command = True  # command_set not decoded (see above)
    dul.assoc.dimse.message = message
    return True


def _data_fragments(dul: Any, buf: bytearray) -> bool:
    """A P-DATA-TF that holds only data set fragments of the C-STORE request being received:
    write them straight into the message's data set, and if the last one is among them
    (it must be the PDU's last PDV), complete the message (:func:`_complete`); True.

    This is what pynetdicom's path does with such a PDU (decode it into PDU items, queue
    Evt10, state machine DT-2, P-DATA primitive, ``DIMSEMessage.decode_msg`` → ``data_set.
    write``, ``message_to_primitive`` and the DIMSE queue), without the objects, copies and
    queue hops: every data PDU of a 512² CT slice (dcmtk sends 128 KiB PDUs) takes this
    path. Anything else — a command fragment, another context, a PDV after the last
    fragment, a malformed item list, a message not started by a command — returns False and
    goes through pynetdicom unchanged.
    """
    message = dul.assoc.dimse.message
    if type(message) is not C_STORE_RQ or message.context_id is None:
        return False  # no command decoded yet (class is still DIMSEMessage), or not a C-STORE
    data_set = message.data_set
    if type(data_set) is not StreamingDataSet or message._data_set_file is not None:
        return False
    end = len(buf)
    offset = 6
    spans = []
    last = False
    while offset < end:
        if end - offset < 6:
            return False
        length, context_id, control = struct.unpack_from(">LBB", buf, offset)
        if length < 2 or offset + 4 + length > end:
            return False  # malformed: pynetdicom's decoder decides what happens
        if control & 0x01 or context_id != message.context_id:
            return False  # a command fragment, or another context: the normal path
        spans.append((offset + 6, offset + 4 + length))
        offset += 4 + length
        if control & 0x02:
            if offset != end:
                return False  # something after the last fragment: the normal path
            last = True
    if not spans:
        return False
    view = memoryview(buf)
    for start, stop in spans:
        data_set.write(view[start:stop])
    if last:
        _complete(dul, message)
    return True


def _complete(dul: Any, message: Any) -> None:
    """A whole C-STORE-RQ: its primitive to the DIMSE queue, as pynetdicom's
    ``DIMSEServiceProvider.receive_primitive`` does, and wake the association thread."""
    dimse = dul.assoc.dimse
    try:
        primitive = _message_to_primitive(message)
    except Exception:
        log.exception("received an invalid DIMSE message")
        dul.event_queue.put("Evt19")
        return
    dimse.msg_queue.put((message.context_id, primitive))
    message.encoded_command_set = io.BytesIO()
    message.data_set = io.BytesIO()
    message._data_set_file = None
    message._data_set_path = None
    dimse.message = None
    dul.assoc._dicomnode_msg.set()



# --- 2. a reactor that waits on the socket and a wake pipe -----------------------------------

def _wake_fds(sock: Any) -> tuple[int, int]:
    fds = getattr(sock, "_dicomnode_wake", None)
    if fds is None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        fds = sock._dicomnode_wake = (r, w)
        # closed when the socket object goes away, never while a reactor may still select on it
        weakref.finalize(sock, _close_fds, r, w)
    return fds  # type: ignore[no-any-return,unused-ignore]


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _ready(self: Any) -> bool:
    """Like AssociationSocket.ready, but waits up to IDLE_WAIT for data or a wake-up."""
    if self.socket is None or self._is_connected is False:
        return False
    rx = getattr(self, "_dicomnode_rx", None)
    if rx is not None and len(rx):
        return True  # read ahead with the last PDU (ReadAhead): no need to ask the socket
    r_fd, _ = _wake_fds(self)
    # The reactor handles one event per turn and checks the socket first: with events still
    # queued (a new connection queues Evt5, then its A-ASSOCIATE-RQ Evt6) it must not wait
    # here, or every association is answered IDLE_WAIT late
    wait = IDLE_WAIT if self.event_queue.empty() else 0
    try:
        ready, _, _ = select.select([self.socket, r_fd], [], [], wait)
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")
        return False
    if r_fd in ready:
        with contextlib.suppress(BlockingIOError):
            os.read(r_fd, 4096)
    if getattr(self.socket, "pending", None) is not None and self.socket.pending():
        return True  # TLS: decrypted bytes buffered that select cannot see
    return self.socket in ready


# --- 3. the association reactor wakes when a DIMSE message arrives -------------------------

class _AssociationTime:
    """Stands in for the ``time`` module in the node's copy of pynetdicom's association
    reactor (:attr:`NodeAssociation._run_reactor`; ``pynetdicom.association`` itself keeps
    the real module).

    The acceptor reactor loops on ``time.sleep(0.001)`` before looking for a new DIMSE message;
    here that sleep waits on the association's wake event instead, which
    :meth:`NodeDIMSE.receive_primitive` and :func:`_complete` set as soon as a message is
    complete: no added latency, and an idle association wakes every :data:`IDLE_WAIT` s
    instead of every 1 ms (release and abort are noticed within that). Any other sleep passes
    through unchanged.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        wake = getattr(thread, "_dicomnode_msg", None)
        if wake is None or seconds != 0.001:
            time.sleep(seconds)
            return
        # A requestor's reactor must reach its pause point quickly whenever the user thread
        # sends (send_c_store waits for it): there the 1 ms cadence stays. An acceptor is
        # only ever woken by incoming messages.
        wake.wait(IDLE_WAIT if getattr(thread, "is_acceptor", False) else seconds)
        wake.clear()


class _DULTime:
    """Stands in for the ``time`` module in the node's copy of pynetdicom's DUL reactor
    (:attr:`NodeDUL.run_reactor`; ``pynetdicom.dul`` itself keeps the real module).

    With ``_run_loop_delay`` 0 (the wait is in :func:`_ready`'s select), pynetdicom's reactor
    still calls ``time.sleep(0)`` after every turn that found no event: a system call that
    gives up the interpreter lock and takes it back, ~8 times per received instance, each a
    chance for a thread switch with several associations in one process. On the reactor's own
    thread it returns at once; every other sleep (``stop_dul`` waiting for the reactor to end)
    passes through unchanged.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == 0 and isinstance(threading.current_thread(), DULServiceProvider):
            return
        time.sleep(seconds)


ASSOCIATION_TIME = _AssociationTime()
DUL_TIME = _DULTime()


def with_globals(function: Any, **names: Any) -> Any:
    """Upstream ``function``'s own code, run with some of its module's global ``names``
    bound to stand-ins, in a copy of the module's globals: the module itself, and everyone
    else calling the upstream function, keep the real ones (``tests/
    test_pynetdicom_contained.py`` pins the code this runs)."""
    namespace = dict(function.__globals__)
    namespace.update(names)
    new = types.FunctionType(function.__code__, namespace, function.__name__,
                             function.__defaults__, function.__closure__)
    new.__doc__ = function.__doc__
    new.__qualname__ = function.__qualname__
    return new


class StreamingDataSet(io.BytesIO):
    """The data set buffer of an incoming DIMSE message that, for a C-STORE request, also
    hands every fragment to a sink as it arrives (dicomnode writes it to disk and hashes it
    there, instead of doing both after the last fragment while the sender waits).

    The sink comes from ``ae.stream_factory(assoc, message)`` (:class:`NodeAE`), asked once,
    at the first data fragment (the command set is decoded by then); None means "no
    streaming". The bytes are also kept in memory as pynetdicom always does: the handler still
    gets ``event.request.DataSet`` as a BytesIO and validates it there.
    """

    def __init__(self, assoc: Any, message: Any) -> None:
        super().__init__()
        self._assoc: Any = assoc
        self._message: Any = message
        self.stream: Any = None

    def write(self, data: Any) -> int:
        if self._message is not None:
            message, self._message = self._message, None
            factory = getattr(self._assoc.ae, "stream_factory", None)
            if factory is not None and isinstance(message, C_STORE_RQ):
                try:
                    self.stream = factory(self._assoc, message)
                except Exception:  # no streaming for this one; the handler stores it whole
                    log.exception("cannot open a stream for an incoming instance")
            self._assoc = None
        n = super().write(data)
        if self.stream is not None:
            self.stream.write(data)
        return n


def _new_message(assoc: Any) -> DIMSEMessage:
    """A DIMSE message of the node's own: its data set streamed (:class:`StreamingDataSet`);
    a C-STORE-RQ is converted to its primitive directly (:func:`_message_to_primitive`: by
    :func:`_complete`, or set on the message while :meth:`NodeDIMSE.receive_primitive` runs
    pynetdicom's path; ``DIMSEMessage`` itself is unchanged)."""
    message: Any = DIMSEMessage()
    message.data_set = StreamingDataSet(assoc, message)
    return message  # type: ignore[no-any-return]


# --- 4. TCP_NODELAY on the node's association sockets --------------------------------------

def _nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- 5a. C-STORE responses encoded directly --------------------------------------------------

def _element(group_elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, group_elem, len(value)) + value


def _uid(value: Any) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_c_store_rsp(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP (implicit VR little endian, PS3.7 9.3.1.2), byte for
    byte what pynetdicom's generic path produces (tested), without building a pydicom Dataset
    and encoding it twice (~0.4 ms per instance). None: a case this does not cover."""
    if primitive.OffendingElement is not None or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status is None:
        return None
    parts = []
    if primitive.AffectedSOPClassUID is not None:
        parts.append(_element(0x0002, _uid(primitive.AffectedSOPClassUID)))
    parts.append(_element(0x0100, struct.pack("<H", 0x8001)))
    parts.append(_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)))
    parts.append(_element(0x0800, struct.pack("<H", 0x0101)))
    parts.append(_element(0x0900, struct.pack("<H", primitive.Status)))
    if primitive.ErrorComment is not None:
        try:
            text = str(primitive.ErrorComment).encode("ascii")
        except UnicodeEncodeError:
            return None
        parts.append(_element(0x0902, text + b" " if len(text) % 2 else text))
    if primitive.AffectedSOPInstanceUID is not None:
        parts.append(_element(0x1000, _uid(primitive.AffectedSOPInstanceUID)))
    body = b"".join(parts)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


# --- 5c. C-STORE requests turned into primitives directly ------------------------------------

_original_to_primitive = DIMSEMessage.message_to_primitive  # pynetdicom's own, unchanged
_C_STORE_RQ_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000,
                                  0x1030, 0x1031))


def _us(raw: bytes) -> int:
    return int(struct.unpack("<H", raw)[0])


def _text_uid(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii")


def _command_values(raw: bytes) -> dict[int, bytes] | None:
    """The elements of an encoded C-STORE-RQ command set (implicit VR little endian), by
    element number; None if it holds anything else or is malformed."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = struct.unpack_from("<HHL", raw, offset)
        offset += 8
        if group != 0 or element not in _C_STORE_RQ_ELEMENTS or offset + length > end:
            return None
        values[element] = raw[offset:offset + length]
        offset += length
    return values


def c_store_rq_primitive(message: Any) -> C_STORE | None:
    """The C-STORE primitive of a received C-STORE-RQ, read from its encoded command set
    (implicit VR little endian, PS3.7 9.3.1.1) and set through the primitive's own validating
    setters. pynetdicom's generic ``message_to_primitive`` converts every element through
    pydicom first (~0.2 ms per instance). None: anything this does not cover (another element,
    a value of unexpected length or multiplicity, a value a setter refuses) — pynetdicom's
    path then handles it, refusals included."""
    values = _command_values(message.encoded_command_set.getvalue())
    if values is None:
        return None
    if b"\\" in values.get(0x0002, b"") or b"\\" in values.get(0x1000, b""):
        return None  # multi-valued: pynetdicom warns and takes the first
    primitive = C_STORE()
    try:
        primitive.MessageID = _us(values[0x0110])
        primitive.AffectedSOPClassUID = _text_uid(values[0x0002])
        primitive.AffectedSOPInstanceUID = _text_uid(values[0x1000])
        primitive.Priority = _us(values[0x0700])
        if 0x1030 in values:
            primitive.MoveOriginatorApplicationEntityTitle = values[0x1030].decode("ascii").strip()
        if 0x1031 in values:
            primitive.MoveOriginatorMessageID = _us(values[0x1031])
    except (KeyError, struct.error, UnicodeDecodeError, ValueError, TypeError):
        return None
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def _message_to_primitive(self: Any) -> Any:
    """``DIMSEMessage.message_to_primitive`` for the node's own messages (see
    :func:`_new_message`): a C-STORE-RQ read directly (:func:`c_store_rq_primitive`),
    anything else by pynetdicom."""
    if type(self) is C_STORE_RQ:
        primitive = c_store_rq_primitive(self)
        if primitive is not None:
            return primitive
        if getattr(self, "_dicomnode_lazy_command", False):  # see _c_store_command
            self.command_set = decode(io.BytesIO(self.encoded_command_set.getvalue()), True,
                                      True)
            self._dicomnode_lazy_command = False  # type: ignore[attr-defined]
    return _original_to_primitive(self)


# --- 5b. cheap copies of presentation contexts -----------------------------------------------

def copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """What ``deepcopy(server.contexts)`` gives each new association in pynetdicom's request
    handler, cheaply: each new association copies the ~150 × 40 supported contexts, and a
    generic deepcopy re-validates every transfer syntax UID against a regex (~80 ms of CPU per
    association). UIDs are immutable strings: share them, copy only the list that holds
    them (each copy is still its own object: negotiating one association cannot change
    another's contexts)."""
    out = []
    for cx in contexts:
        # a shallow copy by hand: copy.copy would also leave copyreg's __slotnames__ cache on
        # pynetdicom's class (harmless, but the class should stay as imported)
        new = object.__new__(type(cx))
        new.__dict__.update(cx.__dict__)
        new._transfer_syntax = list(cx._transfer_syntax)
        out.append(new)
    return out


# --- 7. class and syntax UIDs checked once ---------------------------------------------------

_original_set_uid = pynetdicom.utils.set_uid
_original_add_transfer_syntax = PresentationContext.add_transfer_syntax
# the UIDs that name classes and syntaxes (a bounded set, the same on every association);
# instance UIDs (one per C-STORE) are never remembered
_CLASS_UIDS = frozenset({
    "Abstract Syntax Name", "abstract_syntax", "Transfer Syntax Name",
    "Application Context Name", "Implementation Class UID", "SOP Class UID",
    "Service Class UID", "Affected SOP Class UID"})
_UID_CACHE = 4096  # a peer proposing random syntaxes only churns a bounded cache


@functools.lru_cache(maxsize=_UID_CACHE)
def _set_uid_cached(value: str, allow_empty: bool, allow_none: bool,
                    validate: bool) -> Any:
    return _original_set_uid(value, "UID", allow_empty, allow_none, validate)


def _set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
             validate: bool = True) -> Any:
    """pynetdicom's ``set_uid``, remembered for class and syntax UIDs: a UID is immutable, and
    the same abstract and transfer syntaxes come with every association. An invalid value
    still raises every time (exceptions are not cached), with its field's name."""
    if name in _CLASS_UIDS and isinstance(value, str | bytes):  # a pydicom UID is a str
        if isinstance(value, bytes):  # as decoded from a PDU: the same key as the str
            value = pynetdicom.utils.decode_bytes(value)
        try:
            return _set_uid_cached(value, allow_empty, allow_none, validate)
        except ValueError:
            pass  # say it again with the field's name
    return _original_set_uid(value, name, allow_empty, allow_none, validate)


@functools.lru_cache(maxsize=_UID_CACHE)
def _checked_transfer_syntax(value: str) -> Any:
    scratch = PresentationContext()
    _original_add_transfer_syntax(scratch, value)  # validates; logs what is non-conformant
    return scratch._transfer_syntax[0] if scratch._transfer_syntax else None


def _add_transfer_syntax(self: PresentationContext, syntax: Any) -> None:
    """pynetdicom's ``add_transfer_syntax`` with each syntax's checks done once."""
    if isinstance(syntax, bytes):
        with contextlib.suppress(UnicodeDecodeError):  # pynetdicom's own path says why
            syntax = syntax.decode("ascii")
    if not isinstance(syntax, str):
        _original_add_transfer_syntax(self, syntax)
        return
    uid = _checked_transfer_syntax(syntax)
    if uid is not None and uid not in self._transfer_syntax:
        self._transfer_syntax.append(uid)


class CachedContext(PresentationContext):
    """A ``PresentationContext`` whose abstract and transfer syntaxes are checked once per
    process (:func:`_set_uid`, :func:`_add_transfer_syntax`); the presentation contexts the
    node's DUL decodes from an A-ASSOCIATE-RQ (:meth:`NodeDUL._decode_pdu`) are these."""

    @property
    def abstract_syntax(self) -> Any:
        return self._abstract_syntax

    @abstract_syntax.setter
    def abstract_syntax(self, value: Any) -> None:
        self._abstract_syntax = _set_uid(value, "abstract_syntax", True, False, True)

    def add_transfer_syntax(self, syntax: Any) -> None:
        _add_transfer_syntax(self, syntax)


# pynetdicom's negotiation itself, the result contexts it makes CachedContexts
_negotiate_as_acceptor = with_globals(pynetdicom.presentation.negotiate_as_acceptor,
                                      PresentationContext=CachedContext)


def _negotiate_roles_aware(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
    """pynetdicom picks each context's transfer syntax in the *acceptor's* order (the node's:
    uncompressed first, right for receiving). For a SOP class the requestor proposes to be
    the SCP of (SCP/SCU role selection: a C-GET SCU that will receive), the node sends
    stored files, so the requestor's order is taken: the file can then go as it is stored
    when the requestor offered its syntax first (e.g. dcmtk getscu ``+xr``). Nothing changes
    for an association without role selection items."""
    getters = {uid for uid, (_, scp) in (roles or {}).items() if scp}
    if getters:
        order: dict[Any, list[Any]] = {}
        for cx in rq_contexts:
            if cx.abstract_syntax in getters:
                wanted = order.setdefault(cx.abstract_syntax, [])
                wanted += [ts for ts in cx.transfer_syntax if ts not in wanted]
        contexts = []
        for ac in ac_contexts:
            theirs = order.get(ac.abstract_syntax)
            if not theirs:
                contexts.append(ac)
                continue
            cx = CachedContext()
            cx.abstract_syntax = ac.abstract_syntax
            for ts in [t for t in theirs if t in ac.transfer_syntax] + [
                    t for t in ac.transfer_syntax if t not in theirs]:
                cx.add_transfer_syntax(ts)
            cx.scu_role, cx.scp_role = ac.scu_role, ac.scp_role
            contexts.append(cx)
        ac_contexts = contexts
    return _negotiate_as_acceptor(rq_contexts, ac_contexts, roles)


class NodeACSE(ACSE):
    """The node's ACSE: pynetdicom's acceptor negotiation, the accepted and rejected
    contexts it makes :class:`CachedContext` (7); upstream makes plain
    ``PresentationContext`` objects, re-validating each context's UIDs on every
    association. With role selection, the requestor's transfer syntax order for the
    classes it will be SCP of (:func:`_negotiate_roles_aware`)."""

    _negotiate_as_acceptor = with_globals(ACSE._negotiate_as_acceptor,
                                          negotiate_as_acceptor=_negotiate_roles_aware)


def warm_uid_checks(contexts: Any) -> None:
    """Check the UIDs of ``contexts`` (the supported ones) now, at start-up, rather than while
    the first association of each receiving process waits (~20 ms)."""
    for cx in contexts:
        for flags in ((True, True, True), (True, False, True)):
            _set_uid(cx.abstract_syntax, "abstract_syntax", *flags)
        for ts in cx.transfer_syntax:
            _set_uid(ts, "Transfer Syntax Name")
            _checked_transfer_syntax(str(ts))


def _associate_rq_items(pdu: Any, bytestream: bytes) -> list[Any]:
    """``A_ASSOCIATE_RQ._wrap_generate_items`` for an A-ASSOCIATE-RQ the node's DUL decodes
    (set on that one PDU object): its presentation context items decode their syntaxes with
    the remembered checks (:func:`_context_sub_items`) and become :class:`CachedContext`
    primitives (:func:`_context_to_primitive`). The items are pynetdicom's own classes."""
    items = []
    for item_type, item_bytes in pdu._generate_items(bytestream):
        item: Any = PDU_ITEM_TYPES[item_type]()
        if item_type == 0x20:
            item._wrap_generate_items = types.MethodType(_context_sub_items, item)
            item.to_primitive = types.MethodType(_context_to_primitive, item)
        item.decode(item_bytes)
        items.append(item)
    return items


def _context_sub_items(item: Any, bytestream: bytes) -> list[Any]:
    """``PresentationContextItemRQ._wrap_generate_items``, its abstract and transfer syntax
    sub-items' UIDs set through :func:`_set_uid` (what their setters do with pynetdicom's
    ``set_uid``, remembered)."""
    sub_items = []
    for item_type, item_bytes in item._generate_items(bytestream):
        sub: Any = PDU_ITEM_TYPES[item_type]()
        if item_type == 0x30:
            value = sub._wrap_uid_bytes(item_bytes[4:])
            sub._abstract_syntax_name = _set_uid(value, "Abstract Syntax Name")
        elif item_type == 0x40:
            value = sub._wrap_uid_bytes(item_bytes[4:])
            sub._transfer_syntax_name = _set_uid(value, "Transfer Syntax Name") or None
        else:
            sub.decode(item_bytes)
        sub_items.append(sub)
    return sub_items


def _context_to_primitive(item: Any) -> PresentationContext:
    """``PresentationContextItemRQ.to_primitive``, the context a :class:`CachedContext`."""
    context = CachedContext()
    context.context_id = item.presentation_context_id
    for syntax in item.abstract_transfer_syntax_sub_items:
        if isinstance(syntax, TransferSyntaxSubItem):
            context.add_transfer_syntax(syntax.transfer_syntax_name)
        elif isinstance(syntax, AbstractSyntaxSubItem):
            context.abstract_syntax = syntax.abstract_syntax_name
    return context


# --- the node's own classes ------------------------------------------------------------------

class NodeSocket(AssociationSocket):
    """The node's association socket: TCP_NODELAY (4), the waiting :attr:`ready` (2), and the
    read-ahead buffer and wake pipe that :class:`NodeDUL` uses (per socket attributes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.socket is not None:
            _nodelay(self.socket)  # accepted (SCP) sockets; upstream never sets TCP_NODELAY

    def _create_socket(self, address: Any) -> socket.socket:
        sock = super()._create_socket(address)
        _nodelay(sock)  # outgoing (SCU) sockets: a C-STORE is a command PDU then data PDUs,
        return sock     # and with Nagle the data waits ~40 ms for the peer's delayed ACK

    @property
    def ready(self) -> bool:
        """Upstream: ``select(timeout=0)`` (the reactor then sleeps 1 ms); here up to
        :data:`IDLE_WAIT` on the socket and the wake pipe (:func:`_ready`)."""
        return _ready(self)


class NodeDUL(DULServiceProvider):
    """The node's DUL: the PDU length guard and read-ahead (1, 6), P-DATA sent from the
    calling thread (2), and a reactor that waits in ``select`` rather than sleeping."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        # created here, before either thread can look for it (see _AssociationTime)
        assoc._dicomnode_msg = threading.Event()
        self._dicomnode_send_lock = threading.Lock()
        self._run_loop_delay = 0  # the wait happens in NodeSocket.ready's select instead

    # pynetdicom's reactor loop itself, its `time` the shim that skips sleep(0) (_DULTime)
    run_reactor = with_globals(DULServiceProvider.run_reactor, time=DUL_TIME)

    def _read_pdu_data(self) -> None:
        """Upstream reads the whole length a PDU header claims, 4 KiB at a time, and hands
        every PDU to the state machine: here the length is checked first, bodies are read
        with what follows them, and C-STORE P-DATA takes the fast paths."""
        _guarded_read_pdu_data(self)

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """Upstream decodes an A-ASSOCIATE-RQ through items whose setters convert and
        regex-validate every abstract and transfer syntax UID; here the same items and
        primitives, with those checks remembered (7). Any other PDU: upstream's own."""
        if bytestream[:1] != b"\x01":
            return super()._decode_pdu(bytestream)
        b = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": b})
        pdu: Any = A_ASSOCIATE_RQ()
        pdu._wrap_generate_items = types.MethodType(_associate_rq_items, pdu)
        pdu.decode(b)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"

    def _send(self, pdu: Any) -> None:
        """Every PDU the DUL thread sends goes out under the association's send lock (the
        association thread sends C-STORE responses itself, see :meth:`send_pdu`)."""
        with self._dicomnode_send_lock:
            super()._send(pdu)

    def send_pdu(self, primitive: Any) -> None:
        """Upstream queues every primitive for the DUL thread. In data transfer, a P-DATA (a
        C-STORE response) is encoded and sent right here, on the calling thread, under the
        send lock, as the state machine's DT-1 would: handing it to the DUL thread cost a
        thread switch and ~0.7 ms per instance while the sender waits. Anything else, or
        anything queued before it, takes pynetdicom's queue, and the reactor is woken."""
        if (type(primitive) is P_DATA and self.socket is not None
                and self.to_provider_queue.empty()):
            with self._dicomnode_send_lock:
                if self.state_machine.current_state in ("Sta6", "Sta8"):
                    DULServiceProvider._send(self, P_DATA_TF(primitive))
                    return
        super().send_pdu(primitive)
        sock = self.socket
        fds = getattr(sock, "_dicomnode_wake", None) if sock is not None else None
        if fds is not None:
            with contextlib.suppress(OSError):  # pipe full (reactor already awake) or closed
                os.write(fds[1], b"\0")


class NodeDIMSE(DIMSEServiceProvider):
    """The node's DIMSE provider: incoming messages are the node's own (streamed data set,
    direct C-STORE-RQ conversion, :func:`_new_message`) and wake the association reactor;
    C-STORE responses are encoded directly (5a)."""

    def receive_primitive(self, primitive: Any) -> None:
        """Upstream starts each incoming message as a plain ``DIMSEMessage`` (its data set a
        BytesIO, converted through pydicom) and the association reactor finds it on its next
        1 ms poll; here the message is the node's own (:func:`_new_message`) and the reactor
        is woken (:class:`_AssociationTime`)."""
        if self.message is None:
            self.message = _new_message(self.assoc)
        message: Any = self.message
        # set for this call only: a bound method kept on the message would make it a
        # reference cycle, freed by the garbage collector instead of at once
        message.message_to_primitive = types.MethodType(_message_to_primitive, message)
        try:
            super().receive_primitive(primitive)
        finally:
            message.__dict__.pop("message_to_primitive", None)
        self.assoc._dicomnode_msg.set()  # type: ignore[attr-defined]

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Upstream builds a pydicom Dataset for the command set and encodes it (~0.4 ms per
        instance); a C-STORE response is encoded directly (:func:`encode_c_store_rsp`) and
        sent as one P-DATA, unless something wants to see the DIMSE message."""
        if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            encoded = encode_c_store_rsp(primitive)
            limit = self.maximum_pdu_size
            if encoded is not None and (not limit or len(encoded) <= limit - 6):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


_STANDARD_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _log_handlers(ae: Any) -> bool:
    value = getattr(ae, "log_handlers", None)
    return bool(_config.LOG_HANDLER_LEVEL == "standard" if value is None else value)


class NodeAssociation(Association):
    """The node's association: a :class:`NodeDUL` and a :class:`NodeDIMSE`, pynetdicom's
    standard logging handlers only if ``ae.log_handlers`` (8), and a reactor that waits on a
    wake event (:class:`_AssociationTime`)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        adopt(self)

    # pynetdicom's reactor loop itself, its 1 ms sleep a wait on the wake event
    _run_reactor = with_globals(Association._run_reactor, time=ASSOCIATION_TIME)

    def send_c_store(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """Upstream's ``send_c_store``; with ``ae.send_files_as_stored``, a file is sent as
        its data set's bytes are stored (:class:`_FilesAsStored`), and so is a
        :class:`StoredFile` (what the Q/R SCP yields: pynetdicom's C-MOVE/C-GET service
        accepts only Datasets from a handler)."""
        if isinstance(dataset, StoredFile):
            return _send_c_store_as_stored(self, dataset.stored_path, *args, **kwargs)
        if getattr(self.ae, "send_files_as_stored", False):
            return _send_c_store_as_stored(self, dataset, *args, **kwargs)
        return super().send_c_store(dataset, *args, **kwargs)

    def _bind_defaults(self) -> None:
        """Upstream binds the standard logging handlers when the process-global
        ``_config.LOG_HANDLER_LEVEL`` is "standard"; here when the AE says so."""
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))
        if _log_handlers(self.ae):
            for event, handler in _STANDARD_HANDLERS:
                self.bind(event, handler)


class StoredFile(Dataset):
    """A stored Part 10 file to be sent as its data set's bytes are (bit for bit), standing
    in for the data set where pynetdicom wants a ``Dataset`` (a C-MOVE or C-GET handler's
    yields). Only the two UIDs pynetdicom's services read are set; the node's association
    sends the file (:meth:`NodeAssociation.send_c_store`)."""

    def __init__(self, path: str, sop_class_uid: str, sop_instance_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "stored_path", path)

    stored_path: str


class _FilesAsStored:
    """Stands in for ``pynetdicom._config`` in the node's copy of ``send_c_store``
    (:attr:`NodeAssociation.send_c_store`): ``STORE_SEND_CHUNKED_DATASET`` is True there, so
    a file is sent as its data set's bytes are stored, not decoded and re-encoded by pydicom
    (what the process-global setting does for every AE). Every other setting is pynetdicom's
    own."""

    STORE_SEND_CHUNKED_DATASET = True

    def __getattr__(self, name: str) -> Any:
        return getattr(_config, name)


_send_c_store_as_stored = with_globals(Association.send_c_store, _config=_FilesAsStored())


def adopt(assoc: Any) -> None:
    """Give ``assoc`` (just made by ``Association.__init__``, nothing started) the node's
    ACSE, DUL and DIMSE providers in place of the stock ones, with the timeouts re-applied
    (their setters push them into the DUL's timers)."""
    assoc.acse = NodeACSE(assoc)
    assoc.dul = NodeDUL(assoc)
    assoc.dimse = NodeDIMSE(assoc)
    assoc.acse_timeout = assoc.acse_timeout
    assoc.network_timeout = assoc.network_timeout


class NodeRequestHandler(RequestHandler):
    """The node server's request handler: each connection becomes a :class:`NodeAssociation`
    on a :class:`NodeSocket`."""

    def _create_association(self) -> Association:
        """``RequestHandler._create_association`` of pynetdicom 3.0.4, with the node's
        association and socket classes, and the supported contexts copied cheaply
        (:func:`copy_contexts`; upstream: ``deepcopy``)."""
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        sock = NodeSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        # Association Acceptor object -> local AE
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy_contexts(self.server.contexts)
        # Association Requestor object -> remote AE
        assoc.requestor.address_info = self.remote
        # Bind events to handlers
        handlers: Any = self.server._handlers
        for event in handlers:
            if event.is_intervention and handlers[event]:
                assoc.bind(event, *handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class NodeServer(ThreadedAssociationServer):
    """The node's association server: :class:`NodeRequestHandler` per connection (through
    ``AssociationServer``'s public ``request_handler`` argument), and the standard logging
    handlers only if ``ae.log_handlers`` (8)."""

    def __init__(self, *args: Any, request_handler: Any = None, **kwargs: Any) -> None:
        kwargs["request_handler"] = request_handler or NodeRequestHandler
        super().__init__(*args, **kwargs)

    def _bind_defaults(self) -> None:
        """Upstream: the standard logging handlers when ``_config.LOG_HANDLER_LEVEL`` is
        "standard"; here when the AE says so."""
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))
        if _log_handlers(self.ae):
            for event, handler in _STANDARD_HANDLERS:
                self.bind(event, handler)


class NodeAE(AE):
    """The node's application entity (the receive stage's SCP, the send stage's SCU).

    ``on_violation(assoc, reason)``: told of a protocol violation before the association is
    aborted (1). ``stream_factory(assoc, message)``: the sink an incoming C-STORE's data set
    is written to as it arrives (3). ``log_handlers``: bind pynetdicom's standard logging
    handlers (None: as ``_config.LOG_HANDLER_LEVEL`` says, as upstream).
    ``send_files_as_stored``: ``send_c_store(path)`` sends the file's data set bytes as
    stored (upstream: only with the process-global ``_config.STORE_SEND_CHUNKED_DATASET``).
    """

    def __init__(self, ae_title: str = "PYNETDICOM", *,
                 on_violation: Callable[[Any, str], None] | None = None,
                 stream_factory: Callable[[Any, Any], Any] | None = None,
                 log_handlers: bool | None = None,
                 send_files_as_stored: bool = False) -> None:
        check_version()
        super().__init__(ae_title=ae_title)
        self.on_violation = on_violation
        self.stream_factory = stream_factory
        self.log_handlers = log_handlers
        self.send_files_as_stored = send_files_as_stored

    # pynetdicom's own, the contexts they make CachedContexts: the node's ~150 supported
    # classes × ~40 transfer syntaxes are checked through the remembered UID checks (7) at
    # start-up (upstream re-validates all ~6000: ~0.12 s more between start and listening)
    add_supported_context = with_globals(AE.add_supported_context,
                                         PresentationContext=CachedContext)
    add_requested_context = with_globals(AE.add_requested_context,
                                         PresentationContext=CachedContext)

    def make_server(self, address: Any, ae_title: str | None = None,
                    contexts: Any = None, ssl_context: Any = None,
                    evt_handlers: Any = None, server_class: Any = None,
                    **kwargs: Any) -> Any:
        """Upstream's ``make_server``; the server a :class:`NodeServer` (``start_server``
        asks for a ``ThreadedAssociationServer``), or, for a server class of the caller's
        own, run with :class:`NodeRequestHandler`."""
        if server_class is None or server_class is ThreadedAssociationServer:
            server_class = NodeServer
        elif not issubclass(server_class, NodeServer):
            kwargs.setdefault("request_handler", NodeRequestHandler)
        return super().make_server(address, ae_title=ae_title, contexts=contexts,
                                   ssl_context=ssl_context, evt_handlers=evt_handlers,
                                   server_class=server_class, **kwargs)

    def _create_socket(self, assoc: Association, address: Any,
                       tls_args: Any) -> AssociationSocket:
        """``AE.associate`` calls this on the requestor association it has just made
        (nothing started yet): it becomes a :class:`NodeAssociation` (the node's DUL and
        DIMSE, :func:`adopt`; its logging handlers as ``log_handlers`` says) on a
        :class:`NodeSocket`."""
        assoc.__class__ = NodeAssociation
        adopt(assoc)
        if _log_handlers(self) != (_config.LOG_HANDLER_LEVEL == "standard"):
            for event, handler in _STANDARD_HANDLERS:  # as NodeAssociation._bind_defaults
                if _log_handlers(self):
                    assoc.bind(event, handler)
                else:
                    assoc.unbind(event, handler)
        sock = NodeSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def check_version() -> None:
    """Raise if the installed pynetdicom is not the one these classes were written for."""
    if pynetdicom.__version__ != SUPPORTED_PYNETDICOM:
        raise RuntimeError(
            f"dicomnode's pynetdicom classes support pynetdicom {SUPPORTED_PYNETDICOM}, found "
            f"{pynetdicom.__version__}: pin it (pip install pynetdicom=={SUPPORTED_PYNETDICOM})"
        )
