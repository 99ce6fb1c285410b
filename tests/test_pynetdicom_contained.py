"""The node's pynetdicom changes stay in the node's own classes (``dicomnode/network/node_ae.py``,
``docs/pynetdicom.md``).

1. The private pynetdicom API those classes override or call is still there, with the same
   signatures, and the upstream code they run or copy is the code they were written against:
   a new pynetdicom release fails here, by name, before it misbehaves on the wire.
2. A node started in-process (its receiver, sender and all) leaves pynetdicom exactly as a
   fresh import has it, and a stock ``pynetdicom.AE`` in that process behaves as upstream:
   pynetdicom's default maximum PDU, its own association, DUL, DIMSE and socket classes, no
   TCP_NODELAY, its 1 ms reactor delay, its logging handlers, C-ECHO and C-STORE working —
   while the node's own associations in the same process are the node's classes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# sha256 (first 16 hex digits) of the source of each upstream function whose code the node
# runs with other globals (node_ae.with_globals), copies, mirrors or wraps. A change means:
# read the new upstream code, adjust node_ae, then update the pin.
PINNED_SOURCES = {
    "pynetdicom.dul:DULServiceProvider.run_reactor": "e3a10eb3a0931e48",  # with_globals
    "pynetdicom.dul:DULServiceProvider._decode_pdu": "fc71dd1bf853e1ce",  # mirrored (RQ)
    "pynetdicom.dul:DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",  # replaced
    "pynetdicom.dul:DULServiceProvider.send_pdu": "7cbce5da8594124e",  # wrapped
    "pynetdicom.association:Association._run_reactor": "f28838c5559e462a",  # with_globals
    "pynetdicom.association:Association.send_c_store": "fa5a8127f349f8e7",  # with_globals
    "pynetdicom.association:Association._bind_defaults": "4cada43c3a193724",  # mirrored
    "pynetdicom.transport:AssociationServer._bind_defaults": "4cada43c3a193724",  # mirrored
    "pynetdicom.transport:RequestHandler._create_association": "05c8d12b79863cdb",  # copied
    "pynetdicom.transport:AssociationSocket.ready": "3eb58e3d39dc076d",  # replaced
    "pynetdicom.dimse:DIMSEServiceProvider.receive_primitive": "5f99c86b14a15cef",  # mirrored
    "pynetdicom.pdu_items:PresentationContextItemRQ.to_primitive": "820a8752cc816f2c",
    "pynetdicom.pdu_items:PresentationContextItemRQ._wrap_generate_items": "792b12cb596847ab",
    "pynetdicom.pdu:A_ASSOCIATE_RQ._wrap_generate_items": "17e05aa8e1a1bc30",  # mirrored
    "pynetdicom.presentation:PresentationContext.abstract_syntax": "50f27b2cf80fecf2",
    "pynetdicom.presentation:PresentationContext.add_transfer_syntax": "83bb818ef65a6968",
    "pynetdicom.presentation:negotiate_as_acceptor": "d5413f08f0ac7b32",  # with_globals
    "pynetdicom.acse:ACSE._negotiate_as_acceptor": "fffd360957c42a8e",  # with_globals
    "pynetdicom.ae:ApplicationEntity.add_supported_context": "2932641f457f3240",  # with_globals
    "pynetdicom.ae:ApplicationEntity.add_requested_context": "ce2ba20e8b5bfa91",  # with_globals
}

# (module:Class.name, the parameter names it must take) for what node_ae overrides or calls
SIGNATURES = {
    "pynetdicom.dul:DULServiceProvider.__init__": ["self", "assoc"],
    "pynetdicom.dul:DULServiceProvider._read_pdu_data": ["self"],
    "pynetdicom.dul:DULServiceProvider._decode_pdu": ["self", "bytestream"],
    "pynetdicom.dul:DULServiceProvider._send": ["self", "pdu"],
    "pynetdicom.dul:DULServiceProvider.send_pdu": ["self", "primitive"],
    "pynetdicom.dul:DULServiceProvider.run_reactor": ["self"],
    "pynetdicom.transport:AssociationSocket.__init__": ["self", "assoc", "client_socket",
                                                        "address"],
    "pynetdicom.transport:AssociationSocket._create_socket": ["self", "address"],
    "pynetdicom.transport:RequestHandler._create_association": ["self"],
    "pynetdicom.transport:AssociationServer.__init__": [
        "self", "ae", "address", "ae_title", "contexts", "ssl_context", "evt_handlers",
        "request_handler"],
    "pynetdicom.transport:AssociationServer._bind_defaults": ["self"],
    "pynetdicom.dimse:DIMSEServiceProvider.__init__": ["self", "assoc"],
    "pynetdicom.dimse:DIMSEServiceProvider.receive_primitive": ["self", "primitive"],
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg": ["self", "primitive", "context_id"],
    "pynetdicom.dimse_messages:DIMSEMessage.message_to_primitive": ["self"],
    "pynetdicom.association:Association.__init__": ["self", "ae", "mode"],
    "pynetdicom.acse:ACSE.__init__": ["self", "assoc"],
    "pynetdicom.acse:ACSE._negotiate_as_acceptor": ["self"],
    "pynetdicom.presentation:negotiate_as_acceptor": ["rq_contexts", "ac_contexts",
                                                      "roles"],
    "pynetdicom.association:Association._run_reactor": ["self"],
    "pynetdicom.association:Association._bind_defaults": ["self"],
    "pynetdicom.association:Association.send_c_store": [
        "self", "dataset", "msg_id", "priority", "originator_aet", "originator_id"],
    "pynetdicom.ae:ApplicationEntity.__init__": ["self", "ae_title"],
    "pynetdicom.ae:ApplicationEntity.make_server": [
        "self", "address", "ae_title", "contexts", "ssl_context", "evt_handlers",
        "server_class", "kwargs"],
    "pynetdicom.ae:ApplicationEntity._create_socket": ["self", "assoc", "address", "tls_args"],
    "pynetdicom.pdu_items:PresentationContextItemRQ.to_primitive": ["self"],
    "pynetdicom.pdu_items:PDUItem._wrap_uid_bytes": ["bytestream"],
    "pynetdicom.pdu_items:PDUItem._generate_items": ["bytestream"],
    "pynetdicom.pdu:PDU._generate_items": ["bytestream"],
    "pynetdicom.utils:set_uid": ["value", "name", "allow_empty", "allow_none", "validate"],
}


def _resolve(qualified: str) -> Any:
    import importlib

    module, _, path = qualified.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, property):
        return obj.fset or obj.fget
    return obj.__func__ if isinstance(obj, staticmethod | classmethod) else obj


def test_the_private_pynetdicom_api_the_node_relies_on_is_unchanged() -> None:
    """If a pynetdicom release renames, re-signs or rewrites what the node's classes override,
    this names it. (pyproject pins 3.0.4; NodeAE refuses another version at start.)"""
    import pynetdicom
    from pynetdicom import _config, evt
    from pynetdicom._globals import DEFAULT_MAX_LENGTH
    from pynetdicom.acse import ACSE
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu_items import PDU_ITEM_TYPES
    from pynetdicom.presentation import negotiate_as_acceptor
    from pynetdicom.transport import AssociationSocket, RequestHandler

    from dicomnode.network import node_ae

    assert pynetdicom.__version__ == node_ae.SUPPORTED_PYNETDICOM
    problems = []
    for name, params in SIGNATURES.items():
        try:
            got = list(inspect.signature(_resolve(name)).parameters)
        except (AttributeError, ImportError) as e:
            problems.append(f"{name}: gone ({e})")
            continue
        if got != params:
            problems.append(f"{name}: parameters {got}, node_ae expects {params}")
    for name, digest in PINNED_SOURCES.items():
        try:
            source = inspect.getsource(_resolve(name))
        except (AttributeError, ImportError) as e:
            problems.append(f"{name}: gone ({e})")
            continue
        if hashlib.sha256(source.encode()).hexdigest()[:16] != digest:
            problems.append(f"{name}: upstream code changed; re-check node_ae against it")
    assert not problems, "\n".join(problems)

    # the instance state the node's classes read or set
    assoc = Association(pynetdicom.AE(), "requestor")
    for attr in ("event_queue", "to_provider_queue", "_recv_pdu", "state_machine",
                 "_run_loop_delay", "_idle_timer", "artim_timer", "socket", "_kill_thread"):
        assert hasattr(assoc.dul, attr), f"DULServiceProvider.{attr}"
    for attr in ("message", "msg_queue", "maximum_pdu_size", "dul"):
        assert hasattr(assoc.dimse, attr), f"DIMSEServiceProvider.{attr}"
    for attr in ("_accepted_cx", "_handlers", "_reactor_checkpoint", "_is_paused", "acceptor",
                 "requestor", "acse_timeout", "network_timeout", "is_acceptor"):
        assert hasattr(assoc, attr), f"Association.{attr}"
    message = DIMSEMessage()
    for attr in ("encoded_command_set", "data_set", "_data_set_file", "_data_set_path",
                 "context_id"):
        assert hasattr(message, attr), f"DIMSEMessage.{attr}"
    assert isinstance(inspect.getattr_static(AssociationSocket, "ready"), property)
    assert isinstance(inspect.getattr_static(AssociationSocket, "event_queue"), property)
    for name in ("local", "remote", "ae"):
        assert isinstance(inspect.getattr_static(RequestHandler, name), property), name
    assert {0x20, 0x30, 0x40} <= set(PDU_ITEM_TYPES)
    assert evt._INTERVENTION_EVENTS and callable(evt.get_default_handler)
    assert _config.LOG_HANDLER_LEVEL in ("standard", "none")
    assert hasattr(_config, "STORE_SEND_CHUNKED_DATASET")
    assert DEFAULT_MAX_LENGTH == 16382
    # the upstream functions the node runs with other globals use the names it rebinds
    assert "time" in DULServiceProvider.run_reactor.__code__.co_names
    assert "time" in Association._run_reactor.__code__.co_names
    assert "_config" in Association.send_c_store.__code__.co_names
    assert "negotiate_as_acceptor" in ACSE._negotiate_as_acceptor.__code__.co_names
    assert "PresentationContext" in negotiate_as_acceptor.__code__.co_names
    for method in (pynetdicom.AE.add_supported_context, pynetdicom.AE.add_requested_context):
        assert "PresentationContext" in method.__code__.co_names
    assert DIMSEServiceProvider.receive_primitive.__code__.co_names  # (pinned above)


# Runs in a fresh interpreter: a snapshot of pynetdicom as imported, then a whole node started
# in-process beside stock pynetdicom AEs, then the snapshot compared.
_SCRIPT = textwrap.dedent('''
    import importlib, json, pkgutil, socket, sys, threading, time
    from pathlib import Path

    import pynetdicom

    def pynetdicom_modules():
        names = ["pynetdicom"] + [
            f"pynetdicom.{m.name}" for m in pkgutil.iter_modules(pynetdicom.__path__)
            if m.name not in ("apps", "tests", "benchmarks", "__main__")]
        return [importlib.import_module(n) for n in names]

    def snapshot():
        state = {}
        for module in pynetdicom_modules():
            state[module.__name__] = dict(vars(module))
            for value in list(vars(module).values()):
                if isinstance(value, type) and value.__module__ == module.__name__:
                    state[f"{module.__name__}:{value.__qualname__}"] = dict(vars(value))
        return state

    # copyreg caches a class's slot names on the class at its first copy; pynetdicom's own
    # AE.associate (deepcopy of the requested contexts) writes it, as any stock AE here does
    CACHES = {"__slotnames__"}

    def differences(before, after):
        out = []
        for owner, names in before.items():
            now = after.get(owner, {})
            for name in (set(names) | set(now)) - CACHES:
                if names.get(name, "<missing>") is not now.get(name, "<missing>"):
                    out.append(f"{owner}.{name}")
        return sorted(out)

    fresh = snapshot()
    workdir, free_ports, testfile = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    (workdir / "dicomnode.yaml").write_text(json.dumps({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_ports[0],
                 "max_pdu_bytes": 1048576},
        "storage": {"path": str(workdir / "data"), "min_free_mb": 10},
        "database": {"url": f"sqlite:///{workdir / 'index.sqlite3'}"},
        "destinations": {"stock": {"ae_title": "STOCK", "host": "127.0.0.1",
                                   "port": free_ports[1]}},
    }))
    from dicomnode.config import load_settings
    from dicomnode.node import Node
    from dicomnode.send.sender import send_files
    from dicomnode.runtime.process import configure_logging

    configure_logging("INFO")
    node = Node(load_settings(workdir / "dicomnode.yaml"))
    node.start()
    out = {}
    try:
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, _config, evt
        from pynetdicom._globals import DEFAULT_MAX_LENGTH

        CT = "1.2.840.10008.5.1.4.1.1.2"
        VERIFICATION = "1.2.840.10008.1.1"
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

        def nodelay(sock):
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

        def describe(assoc, local):
            return {
                "assoc": type(assoc).__module__ + "." + type(assoc).__name__,
                "dul": type(assoc.dul).__module__ + "." + type(assoc.dul).__name__,
                "dimse": type(assoc.dimse).__module__ + "." + type(assoc.dimse).__name__,
                "acse": type(assoc.acse).__module__ + "." + type(assoc.acse).__name__,
                "socket": type(assoc.dul.socket).__module__ + "."
                          + type(assoc.dul.socket).__name__,
                "local_max_pdu": local.maximum_length,
                "nodelay": nodelay(assoc.dul.socket.socket),
                "run_loop_delay": assoc.dul._run_loop_delay,
                "pdu_log_handlers": len(assoc.get_handlers(evt.EVT_PDU_RECV)),
            }

        # a stock SCP, started after the node, in the node's process
        seen = {}
        stored = {}
        def on_echo(event):
            seen["echo"] = describe(event.assoc, event.assoc.acceptor)
            return 0
        def on_store(event):
            seen["store"] = describe(event.assoc, event.assoc.acceptor)
            stored[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
            return 0
        scp = AE(ae_title="STOCK")
        out["stock_scp_max_pdu"] = scp.maximum_pdu_size
        scp.add_supported_context(VERIFICATION)
        scp.add_supported_context(CT, syntaxes)
        server = scp.start_server(("127.0.0.1", free_ports[1]), block=False,
                                  evt_handlers=[(evt.EVT_C_ECHO, on_echo),
                                                (evt.EVT_C_STORE, on_store)])
        out["stock_server"] = [type(server).__name__, server.RequestHandlerClass.__name__]

        # a stock SCU to it
        scu = AE(ae_title="STOCKSCU")
        scu.add_requested_context(VERIFICATION)
        scu.add_requested_context(CT, syntaxes)
        assoc = scu.associate("127.0.0.1", free_ports[1], ae_title="STOCK")
        out["stock_established"] = assoc.is_established
        out["stock_requestor"] = describe(assoc, assoc.requestor)
        out["stock_peer_max_pdu"] = assoc.acceptor.maximum_length
        out["stock_echo"] = int(assoc.send_c_echo().Status)
        ds = pydicom.dcmread(testfile)
        out["stock_store"] = int(assoc.send_c_store(ds).Status)
        assoc.release()

        # a stock SCU to the node, in the node's process: the node answers with its own
        # classes (and its own maximum PDU); the SCU stays stock
        node_side = {}
        def node_assoc():
            for a in node.receiver.ae.active_associations:
                node_side.update(describe(a, a.acceptor))
        assoc = scu.associate("127.0.0.1", free_ports[0], ae_title="DICOMNODE")
        out["to_node_established"] = assoc.is_established
        out["to_node_requestor"] = describe(assoc, assoc.requestor)
        out["node_max_pdu_seen_by_stock_scu"] = assoc.acceptor.maximum_length
        out["to_node_echo"] = int(assoc.send_c_echo().Status)
        node_assoc()
        out["to_node_store"] = int(assoc.send_c_store(ds).Status)
        assoc.release()
        out["node_acceptor"] = node_side

        # the node's sender (a NodeAE) to the stock SCP: the file's bytes as stored
        out["sent"] = send_files(node.settings.destinations["stock"], "DICOMNODE",
                                 [Path(testfile)])
        out["sender_verbatim"] = stored.get(str(ds.SOPInstanceUID)) == Path(
            testfile).read_bytes()[int(sys.argv[4]):]
        out["stock_acceptor"] = seen
        out["config"] = [_config.LOG_HANDLER_LEVEL, _config.STORE_SEND_CHUNKED_DATASET]
        out["default_max_pdu"] = DEFAULT_MAX_LENGTH
        server.shutdown()
    finally:
        node.stop("test")
    out["differences"] = differences(fresh, snapshot())
    # the comparison has teeth: one patch of the old kind is seen
    from pynetdicom.dul import DULServiceProvider
    from dicomnode.network.node_ae import NodeDUL
    original = DULServiceProvider.__dict__["_read_pdu_data"]
    DULServiceProvider._read_pdu_data = NodeDUL._read_pdu_data
    out["a_patch_is_seen"] = differences(fresh, snapshot())
    DULServiceProvider._read_pdu_data = original
    print("RESULT " + json.dumps(out))
''')


def test_a_started_node_leaves_pynetdicom_as_upstream(tmp_path: Path) -> None:
    """A whole node started in-process (receiver, sender, everything), then stock pynetdicom
    in the same process: a stock SCP and SCU get pynetdicom's default maximum PDU and its own
    classes, no TCP_NODELAY, its 1 ms reactor delay and its logging handlers, and C-ECHO and
    C-STORE work; the node's side of an association is the node's classes; the node's sender
    sends a file's bytes as stored without the process-global setting; and no attribute of
    any pynetdicom module or class differs from a fresh import."""
    import pydicom
    from pydicom.data import get_testdata_file

    from tests.helpers import free_port, split_part10

    testfile = Path(get_testdata_file("CT_small.dcm"))
    # the data set bytes begin where the Part 10 header ends
    offset = len(testfile.read_bytes()) - len(split_part10(testfile)[1])
    ports = [free_port(), free_port()]
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), json.dumps(ports), str(testfile),
         str(offset)], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1][len("RESULT "):])

    default = out["default_max_pdu"]
    assert default == 16382
    # nothing in pynetdicom differs from a fresh import, and the comparison would see it
    assert out["differences"] == [], out["differences"]
    assert out["a_patch_is_seen"] == [
        "pynetdicom.dul:DULServiceProvider._read_pdu_data"]
    assert out["config"] == ["standard", False]  # pynetdicom's own defaults, untouched

    stock = {"assoc": "pynetdicom.association.Association",
             "dul": "pynetdicom.dul.DULServiceProvider",
             "dimse": "pynetdicom.dimse.DIMSEServiceProvider",
             "acse": "pynetdicom.acse.ACSE",
             "socket": "pynetdicom.transport.AssociationSocket",
             "local_max_pdu": default, "nodelay": 0, "run_loop_delay": 0.001}
    assert out["stock_server"] == ["ThreadedAssociationServer", "RequestHandler"]
    assert out["stock_scp_max_pdu"] == default
    assert out["stock_established"] and out["stock_echo"] == 0 and out["stock_store"] == 0
    assert out["stock_peer_max_pdu"] == default
    for side in (out["stock_requestor"], out["stock_acceptor"]["echo"],
                 out["stock_acceptor"]["store"], out["to_node_requestor"]):
        assert {k: side[k] for k in stock} == stock, side
        assert side["pdu_log_handlers"] >= 1  # _config.LOG_HANDLER_LEVEL "standard"

    # the node's own side of an association, in the same process: the node's classes
    node = out["node_acceptor"]
    assert node["assoc"] == "dicomnode.network.node_ae.NodeAssociation"
    assert node["dul"] == "dicomnode.network.node_ae.NodeDUL"
    assert node["dimse"] == "dicomnode.network.node_ae.NodeDIMSE"
    assert node["acse"] == "dicomnode.network.node_ae.NodeACSE"
    assert node["socket"] == "dicomnode.network.node_ae.NodeSocket"
    assert node["local_max_pdu"] == 1048576 == out["node_max_pdu_seen_by_stock_scu"]
    assert node["nodelay"] != 0 and node["run_loop_delay"] == 0
    assert node["pdu_log_handlers"] == 0  # logging.level INFO: no PDU formatting
    assert out["to_node_established"] and out["to_node_echo"] == 0
    assert out["to_node_store"] == 0
    # the sender: one file, its data set bytes exactly as in the file
    assert out["sent"] == 1 and out["sender_verbatim"] is True
    assert pydicom.dcmread(testfile).SOPInstanceUID  # the file the stock SCU sent, decoded


@pytest.mark.parametrize("log_handlers", [False, True])
def test_node_ae_binds_log_handlers_as_told_not_by_the_global(log_handlers: bool) -> None:
    """NodeAE.log_handlers decides for the node's server and requestor associations;
    pynetdicom's _config.LOG_HANDLER_LEVEL stays as it was."""
    from pynetdicom import _config, evt

    from dicomnode.network.node_ae import NodeAE
    from tests.helpers import free_port

    before = _config.LOG_HANDLER_LEVEL
    seen: list[int] = []

    def on_echo(event: Any) -> int:
        seen.append(len(event.assoc.get_handlers(evt.EVT_PDU_RECV)))
        return 0

    scp = NodeAE(ae_title="PEER", log_handlers=log_handlers)
    scp.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
    try:
        scu = NodeAE(ae_title="NODE", log_handlers=log_handlers)
        scu.add_requested_context("1.2.840.10008.1.1")
        assoc = scu.associate("127.0.0.1", port, ae_title="PEER")
        assert assoc.is_established
        assert type(assoc).__name__ == "NodeAssociation"
        requestor = len(assoc.get_handlers(evt.EVT_PDU_RECV))
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        server.shutdown()
    assert before == _config.LOG_HANDLER_LEVEL
    assert (requestor >= 1) is log_handlers
    assert seen and (seen[0] >= 1) is log_handlers
