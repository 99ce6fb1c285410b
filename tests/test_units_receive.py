"""The receive stage's patches to pynetdicom: TCP_NODELAY, C-STORE command and response fast
paths byte-identical to pynetdicom's, data set fragments, read-ahead, presentation contexts,
remembered UID checks, the reactor's waits, receiver workers (ready routing, stream table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest


def test_association_sockets_have_tcp_nodelay() -> None:
    """Without TCP_NODELAY a sender stalls ~40 ms per object on the peer's delayed ACK (bench
    e2e: 54 ms/object); the node's AE (NodeSocket) sets it on outgoing and accepted sockets."""
    import socket
    import threading

    from pynetdicom import evt

    from dicomnode.network.node_ae import NodeAE as AE
    from tests.helpers import free_port

    accepted: list[int] = []
    got = threading.Event()

    def on_echo(event) -> int:  # type: ignore[no-untyped-def]
        sock = event.assoc.dul.socket.socket
        accepted.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        got.set()
        return 0

    scp = AE(ae_title="PEER")
    scp.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
    try:
        scu = AE(ae_title="NODE")
        scu.add_requested_context("1.2.840.10008.1.1")
        assoc = scu.associate("127.0.0.1", port, ae_title="PEER")
        assert assoc.is_established
        outgoing = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert got.wait(5)
    finally:
        server.shutdown()
    assert outgoing != 0 and accepted and accepted[0] != 0


@pytest.mark.parametrize("status,comment,sop_class,sop_instance", [
    (0x0000, None, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),
    (0xC001, "truncated: value of (7FE0,0010)", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45"),
    (0xA700, "odd", None, "1.2"),
    (0x0000, None, "1.2.840.10008.5.1.4.1.1.4", None),
])
def test_fast_c_store_response_is_byte_identical(status: int, comment: str | None,
                                                 sop_class: str | None,
                                                 sop_instance: str | None) -> None:
    """The receive stage encodes C-STORE-RSP command sets itself; pynetdicom's generic encoder
    is the reference."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicomnode.network.node_ae import encode_c_store_rsp

    p = C_STORE()
    p.MessageIDBeingRespondedTo = 7
    p.Status = status
    p.ErrorComment = comment
    if sop_class:
        p.AffectedSOPClassUID = sop_class
    if sop_instance:
        p.AffectedSOPInstanceUID = sop_instance
    msg = C_STORE_RSP()
    msg.primitive_to_message(p)
    reference = b"".join(pdv[1:] for pd in msg.encode_msg(1, 16384)
                         for _, pdv in pd.presentation_data_value_list if pdv[0] & 1)
    assert encode_c_store_rsp(p) == reference
    p.OffendingElement = [0x00100010]
    assert encode_c_store_rsp(p) is None  # not covered: pynetdicom encodes it


@pytest.mark.parametrize("pdu_args", [
    ["--max-send-pdu", "4096"],  # ~130 PDUs per CT slice
    [],  # dcmtk's default 128 KiB PDUs, as in bench/ingest
])
def test_data_set_fragments_fast_path_keeps_every_byte(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path,
                                                       pdu_args: list[str]) -> None:
    """The P-DATA PDUs of a C-STORE (its command, its data set fragments, the last one
    included) skip pynetdicom's PDU objects and state machine (node_ae._pdu_received).
    dcmtk sends the same files once with those paths and once without: the handler's request
    and data set and the stream sink's hash must be the same, byte for byte, for several
    instances on one association."""
    import hashlib
    import threading

    from pydicom.data import get_testdata_file
    from pynetdicom import evt

    from dicomnode.network import node_ae
    from tests.helpers import free_port, split_part10, storescu, with_new_uids

    original = node_ae._pdu_received
    files = []
    for i, name in enumerate(["693_UNCR.dcm", "CT_small.dcm", "693_UNCR.dcm"]):
        files.append(tmp_path / f"{i}.dcm")
        with_new_uids(Path(get_testdata_file(name)), files[-1])

    class Sink:
        def __init__(self) -> None:
            self.sha = hashlib.sha256()

        def write(self, data) -> None:  # type: ignore[no-untyped-def]
            self.sha.update(data)

    def receive(fast: bool) -> tuple[dict[str, tuple[bytes, str, str, int, int]],
                                     list[bool]]:
        taken: list[bool] = []

        def fragments(dul, buf):  # type: ignore[no-untyped-def]
            taken.append(original(dul, buf) if fast else False)
            return taken[-1]

        monkeypatch.setattr(node_ae, "_pdu_received", fragments)
        received: dict[str, tuple[bytes, str, str, int, int]] = {}
        done = threading.Event()

        def on_store(event) -> int:  # type: ignore[no-untyped-def]
            rq = event.request
            data = rq.DataSet
            received[str(rq.AffectedSOPInstanceUID)] = (
                data.getvalue(), data.stream.sha.hexdigest(), str(rq.AffectedSOPClassUID),
                rq.MessageID, rq.Priority)
            if len(received) == len(files):
                done.set()
            return 0

        # as the receive stage sets it (no PDU logging handlers unless DEBUG: the fast path is
        # off while pynetdicom logs every PDU)
        scp = node_ae.NodeAE(ae_title="DICOMNODE", log_handlers=False,
                             stream_factory=lambda assoc, msg: Sink())
        scp.maximum_pdu_size = 4 << 20
        scp.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        port = free_port()
        server = scp.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            storescu(port, files, flag="-xe", extra=pdu_args)
            assert done.wait(10)
        finally:
            server.shutdown()
        return received, taken

    fast, taken_fast = receive(True)
    slow, taken_slow = receive(False)
    # every P-DATA of these C-STOREs, commands and last fragments too, took a fast path
    assert len(taken_fast) > 2 * len(files) and all(taken_fast)
    assert len(taken_slow) == len(taken_fast) and not any(taken_slow)
    assert fast == slow
    for data, streamed, *_ in fast.values():
        assert streamed == hashlib.sha256(data).hexdigest()
    uncompressed_ct = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    assert fast[uncompressed_ct][0] == split_part10(files[0])[1]  # dcmtk sends it verbatim


def _c_store_rq_command(message_id: int, instance: str, priority: int,
                        move_originator: str | None) -> tuple[Any, bytes]:
    """A C-STORE request primitive and its command set as pynetdicom encodes it."""
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    p = C_STORE()
    p.MessageID = message_id
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = instance
    p.Priority = priority
    if move_originator:
        p.MoveOriginatorApplicationEntityTitle = move_originator
        p.MoveOriginatorMessageID = 3
    p.DataSet = io.BytesIO(b"\x08\x00")
    out = C_STORE_RQ()
    out.primitive_to_message(p)
    encoded = b"".join(pdv[1:] for pd in out.encode_msg(1, 16384)
                       for _, pdv in pd.presentation_data_value_list if pdv[0] & 1)
    return p, encoded


@pytest.mark.parametrize("move_originator,priority,instance", [
    (None, 0, "1.2.826.0.1.3680043.8.498.1234567890123"),  # odd length: NUL-padded
    ("MOVESCU", 2, "1.2.3.44"),
    (None, 1, "1.2.840.113619.2.55.3.604688119.969.1268071029.320.1"),
])
def test_fast_c_store_request_primitive_matches_pynetdicoms(move_originator: str | None,
                                                            priority: int,
                                                            instance: str) -> None:
    """The receive stage reads C-STORE-RQ command sets itself; pynetdicom's generic
    message_to_primitive is the reference. Anything it does not cover goes back to it."""
    import io
    import struct

    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
    from pynetdicom.dsutils import decode

    from dicomnode.network.node_ae import _original_to_primitive, c_store_rq_primitive

    _, encoded = _c_store_rq_command(7, instance, priority, move_originator)

    def received(command: bytes) -> DIMSEMessage:
        msg = DIMSEMessage()
        msg.encoded_command_set.write(command)
        msg.command_set = decode(msg.encoded_command_set, True, True)
        msg.__class__ = C_STORE_RQ
        msg.context_id = 5
        msg.data_set = io.BytesIO(b"data")
        return msg

    msg = received(encoded)
    ours, theirs = c_store_rq_primitive(msg), _original_to_primitive(msg)
    assert ours is not None
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                 "DataSet", "_context_id", "_dataset_path", "_dataset_file"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.AffectedSOPInstanceUID == instance
    # not covered: an element a C-STORE-RQ does not have, a cut-off element, two values
    extra = encoded + struct.pack("<HHL", 0, 0x0902, 4) + b"oops"
    assert c_store_rq_primitive(received(extra)) is None
    assert c_store_rq_primitive(received(encoded[:-3])) is None
    two = encoded.replace(b"1.2.840.10008.5.1.4.1.1.2\0", b"1.2.840.10008.5.1.4.1.1.2\\")
    assert c_store_rq_primitive(received(two)) is None


def test_read_ahead_returns_every_pdu_whole_however_the_bytes_arrive() -> None:
    """node_ae.ReadAhead: PDU bodies read with what follows them. PDUs of many sizes
    (some larger than the read-ahead buffer) sent in odd-sized pieces come back whole and in
    order; a peer that closes mid-body gives a short read, not a hang."""
    import random
    import socket
    import struct
    import threading

    from dicomnode.network.node_ae import ReadAhead

    rng = random.Random(7)
    pdus = [bytes([k % 7 + 1, 0]) + struct.pack(">L", n) + rng.randbytes(n)
            for k, n in enumerate([0, 1, 5, 6, 7, 100, 4096, 70_000, 300_000, 12, 131_072])]
    stream = b"".join(pdus)
    ours, theirs = socket.socketpair()
    ours.settimeout(10)  # a broken reader fails, never hangs

    def send() -> None:
        at = 0
        while at < len(stream):
            n = rng.choice([1, 3, 6, 1000, 65_536, 200_000])
            theirs.sendall(stream[at:at + n])
            at += n
        theirs.sendall(b"\x04\x00\x00\x00\x01\x00" + b"cut")  # a body 65536 long, cut short
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    rx = ReadAhead(64 * 1024)
    for expected in pdus:
        assert rx.fill(ours, 6)
        header = bytearray(6)
        assert rx.take(memoryview(header)) == 6
        body = bytearray(struct.unpack(">L", header[2:])[0])
        assert rx.read_into(ours, memoryview(body)) == len(body)
        assert bytes(header + body) == expected
    assert rx.fill(ours, 6)
    rx.take(memoryview(bytearray(6)))
    assert rx.read_into(ours, memoryview(bytearray(65_536))) == 3  # the peer closed
    assert not rx.fill(ours, 6) and len(rx) == 0
    sender.join()
    ours.close()


def test_c_store_command_fast_path_builds_the_message_pynetdicom_would() -> None:
    """A C-STORE-RQ's command PDU is read directly (node_ae._c_store_command): the
    request primitive is the one pynetdicom's own path makes from the same PDU. A command
    the direct reader cannot convert (two values) is decoded through pydicom after all and
    converted by pynetdicom; PDUs it does not cover are left to pynetdicom untouched."""
    import io
    import struct
    from types import SimpleNamespace

    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    from dicomnode.network import node_ae

    p, encoded = _c_store_rq_command(9, "1.2.826.0.1.3680043.8.498.1234567890123", 2,
                                     "MOVESCU")

    def pdu(*pdvs: tuple[int, bytes]) -> bytearray:
        body = b"".join(struct.pack(">LBB", len(v) + 2, 5, control) + v for control, v in pdvs)
        return bytearray(struct.pack(">BBL", 4, 0, len(body)) + body)

    def ours(command: bytes, *more: tuple[int, bytes]) -> tuple[bool, object]:
        dul = SimpleNamespace(assoc=SimpleNamespace(dimse=SimpleNamespace(message=None),
                                                    ae=SimpleNamespace()))
        taken = node_ae._c_store_command(dul, pdu((0x03, command), *more))
        return taken, dul.assoc.dimse.message

    def primitive(message: object) -> C_STORE:
        message.data_set.write(b"\x08\x00")  # type: ignore[attr-defined]
        return node_ae._message_to_primitive(message)  # type: ignore[no-any-return]

    reference = DIMSEMessage()
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[5, b"\x03" + encoded]]
    assert reference.decode_msg(pdata) is False  # command done, data set to come
    reference.data_set = io.BytesIO(b"\x08\x00")
    theirs = node_ae._original_to_primitive(reference)

    taken, message = ours(encoded)
    assert taken and type(message) is C_STORE_RQ
    assert message._dicomnode_uids == (p.AffectedSOPClassUID,  # type: ignore[attr-defined]
                                       p.AffectedSOPInstanceUID)
    mine = primitive(message)
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                 "_context_id"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.DataSet.getvalue() == theirs.DataSet.getvalue() == b"\x08\x00"

    # two values in a UID: taken, but converted by pynetdicom from the decoded command set
    two = encoded.replace(b"1.2.840.10008.5.1.4.1.1.2\0", b"1.2.840.10008.5.1.4.1.1.2\\")
    taken, message = ours(two)
    assert taken
    fallback = primitive(message)
    assert fallback.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert message.command_set.MessageID == 9  # type: ignore[attr-defined]

    # left to pynetdicom: another command, no data set, a split command, more than one PDV
    command_field = struct.pack("<HHLH", 0, 0x0100, 2, 0x0001)
    data_set_type = struct.pack("<HHLH", 0, 0x0800, 2, 0x0001)
    assert command_field in encoded and data_set_type in encoded
    echo = encoded.replace(command_field, struct.pack("<HHLH", 0, 0x0100, 2, 0x0030))
    no_data = encoded.replace(data_set_type, struct.pack("<HHLH", 0, 0x0800, 2, 0x0101))
    for command, more in ((echo, ()), (no_data, ()), (encoded, ((0x00, b"\x08\x00"),))):
        assert ours(command, *more) == (False, None)
    dul = SimpleNamespace(assoc=SimpleNamespace(dimse=SimpleNamespace(message=None)))
    assert not node_ae._c_store_command(dul, pdu((0x01, encoded)))  # not the last part
    assert dul.assoc.dimse.message is None


def test_presentation_context_copies_are_independent() -> None:
    """Associations copy the supported contexts cheaply (shared UIDs, node_ae.copy_contexts);
    a copy must still be its own object: negotiating one association cannot change another's
    contexts."""
    from pynetdicom.presentation import build_context

    from dicomnode.network import node_ae

    original = build_context("1.2.840.10008.5.1.4.1.1.2",
                             ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    original.context_id = 1
    [clone] = node_ae.copy_contexts([original])
    assert clone is not original and clone.context_id == 1
    assert clone.abstract_syntax == original.abstract_syntax
    assert clone.transfer_syntax == original.transfer_syntax
    clone.transfer_syntax = ["1.2.840.10008.1.2"]
    clone.context_id = 3
    assert len(original.transfer_syntax) == 2 and original.context_id == 1


def test_remembered_uid_checks_answer_as_pynetdicom_does() -> None:
    """Class and syntax UIDs are checked once and remembered (node_ae 7: the contexts and
    syntax sub-items the node's DUL decodes from an A-ASSOCIATE-RQ); the answers are
    pynetdicom's own: the same UID objects, duplicates dropped, invalid values refused every
    time with the field's name, instance UIDs never remembered."""
    import struct

    from pydicom.uid import UID
    from pynetdicom.pdu_items import PresentationContextItemRQ

    from dicomnode.network import node_ae

    def sub_items(*items: tuple[int, bytes]) -> list[Any]:
        """Sub-items as an A-ASSOCIATE-RQ carries them, decoded as the node's DUL does."""
        raw = b"".join(struct.pack(">BBH", t, 0, len(v)) + v for t, v in items)
        return node_ae._context_sub_items(PresentationContextItemRQ(), raw)

    too_long = "1." + "2" * 70
    for _ in range(2):  # a second time: from the cache, or raising again
        cx = node_ae.CachedContext()
        cx.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
        assert isinstance(cx.abstract_syntax, UID) and cx.abstract_syntax.is_valid
        cx.add_transfer_syntax(b"1.2.840.10008.1.2.1")
        cx.add_transfer_syntax("1.2.840.10008.1.2.1")
        cx.add_transfer_syntax(UID("1.2.840.10008.1.2"))
        cx.add_transfer_syntax(None)
        assert cx.transfer_syntax == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
        assert all(isinstance(ts, UID) for ts in cx.transfer_syntax)
        with pytest.raises(ValueError, match="transfer_syntax"):
            cx.add_transfer_syntax(too_long)
        with pytest.raises(ValueError, match="abstract_syntax"):
            cx.abstract_syntax = too_long
        item, ts = sub_items((0x30, b"1.2.840.10008.5.1.4.1.1.2"),
                             (0x40, b"1.2.840.10008.1.2\0"))  # a NUL-padded one
        assert item.abstract_syntax_name == cx.abstract_syntax
        assert ts.transfer_syntax_name == "1.2.840.10008.1.2"
        with pytest.raises(ValueError, match="Abstract Syntax Name"):
            sub_items((0x30, too_long.encode()))
    before = node_ae._set_uid_cached.cache_info().currsize
    for i in range(50):
        instance = node_ae._set_uid(f"1.2.3.{i}", "Affected SOP Instance UID")
        node_ae._set_uid("1.2.840.10008.5.1.4.1.1.2", "Affected SOP Class UID")
        assert instance == f"1.2.3.{i}"
    assert node_ae._set_uid_cached.cache_info().currsize - before <= 1


def test_reactor_does_not_wait_on_the_socket_with_events_queued(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The DUL reactor checks the socket before each queued event: with events still queued
    (a new connection queues Evt5, then its A-ASSOCIATE-RQ Evt6) the check must not wait
    IDLE_WAIT, or every association is accepted that much later. With nothing queued and
    nothing to read, it does wait (an idle association wakes rarely)."""
    import queue
    import socket
    import time

    from dicomnode.network import node_ae

    monkeypatch.setattr(node_ae, "IDLE_WAIT", 3.0)

    class Sock:  # the attributes of pynetdicom's AssociationSocket that _ready reads
        _is_connected = True

        def __init__(self, s: socket.socket) -> None:
            self.socket = s
            self.event_queue: queue.Queue[str] = queue.Queue()

    a, b = socket.socketpair()
    try:
        s = Sock(a)
        s.event_queue.put("Evt6")
        t0 = time.monotonic()
        assert node_ae._ready(s) is False  # nothing to read, and it did not wait
        assert time.monotonic() - t0 < 1.5
        s.event_queue.get()
        t0 = time.monotonic()
        assert node_ae._ready(s) is False
        assert time.monotonic() - t0 >= 2.5  # idle: it waited for data or a wake-up
        b.sendall(b"x")
        assert node_ae._ready(s) is True
    finally:
        a.close()
        b.close()


def test_reactor_thread_does_not_give_up_the_lock_for_a_zero_sleep(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """pynetdicom's DUL reactor calls time.sleep(0) after every turn without an event (its
    loop delay is 0 in the node's DUL: the wait is in _ready's select); the node's DUL runs
    that reactor with the name `time` bound to a shim (pynetdicom.dul keeps the real one).
    On the reactor's own thread that sleep returns without a system call; any other sleep,
    and a zero sleep on any other thread (stop_dul waiting for the reactor to end), still
    sleeps."""
    import threading
    import time

    import pynetdicom.dul

    from dicomnode.network import node_ae

    shim = node_ae.NodeDUL.run_reactor.__globals__["time"]
    assert shim is node_ae.DUL_TIME and pynetdicom.dul.time is time
    assert isinstance(shim, node_ae._DULTime) and shim.monotonic is time.monotonic
    slept: list[tuple[str, float]] = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: slept.append(
        (threading.current_thread().name, s)))

    class Reactor(pynetdicom.dul.DULServiceProvider):
        def __init__(self) -> None:  # a thread of the reactor's class, nothing else
            threading.Thread.__init__(self, name="reactor")

        def run(self) -> None:
            shim.sleep(0)
            shim.sleep(0.001)

    r = Reactor()
    r.start()
    r.join()
    shim.sleep(0)
    monkeypatch.setattr(time, "sleep", real_sleep)
    assert slept == [("reactor", 0.001), (threading.current_thread().name, 0)]


def test_receiver_pool_hands_connections_only_to_ready_workers() -> None:
    """node.receiver_processes: each accepted connection goes to the least busy process, but
    never to a worker that has not said "ready" yet (a spawned worker imports for seconds; a
    connection handed to it would wait that long): the node runs it itself meanwhile. A
    dead worker gets none either."""
    from types import SimpleNamespace

    from dicomnode.receive.workers import ReceiverPool

    ran_here: list[str] = []
    handed: list[str] = []

    class Conn:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            pass

    alive = [True]
    worker = SimpleNamespace(ready=False, active=0, index=1,
                             process=SimpleNamespace(is_alive=lambda: alive[0]),
                             hand_over=lambda conn, _addr: handed.append(conn.name))
    pool = ReceiverPool(None, None, None, None)  # type: ignore[arg-type]
    pool.workers = [worker]  # type: ignore[list-item]
    server = SimpleNamespace(process_request=lambda conn, _addr: ran_here.append(conn.name))
    pool.install(server)

    def connect(name: str) -> None:
        server.process_request(Conn(name), ("127.0.0.1", 1))

    connect("first")  # a tie: the node's own
    connect("while-starting")  # the worker runs nothing, but has not said ready
    worker.ready = True
    connect("ready")  # now the least busy process is the worker
    worker.active = 1
    connect("tie")  # 2 in the node (nothing reported closed) vs 1: the worker
    worker.active = 5
    connect("busy")
    alive[0] = False
    worker.active = 0
    connect("dead")
    assert ran_here == ["first", "while-starting", "busy", "dead"]
    assert handed == ["ready", "tie"]
    assert pool.local_active == 4


def test_stream_table_names_what_each_association_writes(tmp_path: Path) -> None:
    """A receiver worker's stream table (read by the node once the worker has died): one
    slot per association, emptied when its instance is stored, reused by the next; what is
    read back is exactly the files being written at that moment."""
    from dicomnode.receive.workers import StreamTable

    path = tmp_path / "receivers" / "1.streams"
    table = StreamTable(path, 3)
    assert StreamTable.read(path) == set()
    table.record(101, "/data/objects/a.dcm")
    table.record(102, "/data/objects/b.dcm")
    assert StreamTable.read(path) == {"/data/objects/a.dcm", "/data/objects/b.dcm"}
    table.record(101, "/data/objects/c-longer-name.dcm")  # next instance, same association
    table.record(102, None)  # stored
    assert StreamTable.read(path) == {"/data/objects/c-longer-name.dcm"}
    for key in (103, 104):
        table.record(key, f"/data/objects/{key}.dcm")
    table.record(105, "/data/objects/105.dcm")  # no slot left: not tracked, no error
    assert StreamTable.read(path) == {"/data/objects/c-longer-name.dcm",
                                      "/data/objects/103.dcm", "/data/objects/104.dcm"}
    for key in (101, 103, 104, 105):
        table.record(key, None)
    assert StreamTable.read(path) == set()
    table.close()
    assert StreamTable(path, 3) and StreamTable.read(path) == set()  # a new worker: empty
    assert StreamTable.read(tmp_path / "missing") == set()
