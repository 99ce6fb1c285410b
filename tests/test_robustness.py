"""Crashes, bad peers and bad input: nothing acknowledged is lost, nothing half-written indexed,
every refusal has a proper status and an audit event."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blake3
import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.helpers import (
    dcmtk,
    dcmtk_env,
    echoscu,
    split_part10,
    storescu,
    verbatim_scu,
    wait_until,
    with_new_uids,
)

CT_512 = "693_UNCR.dcm"  # 512² CT from pydicom-data, ~0.5 MB


def make_study(tmp: Path, n: int, name: str = CT_512) -> tuple[str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        f = tmp / f"img{i:04d}.dcm"
        with_new_uids(get_testdata_file(name), f, study_uid=study, series_uid=series,
                      InstanceNumber=i + 1)
        files.append(f)
    return study, files


def acked_files(storescu_verbose_output: str) -> list[str]:
    """Files storescu -v reported a Success response for (sending line precedes response)."""
    acked, current = [], None
    for line in storescu_verbose_output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def send_and_kill_after(node_port: int, files: list[Path], acks: int, kill, aet: str  # type: ignore[no-untyped-def]
                        ) -> list[str]:
    """Run storescu -v; after the ``acks``-th success response call ``kill()``.

    Returns the files that got a success status before the sender ended.
    """
    proc = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", "DICOMNODE", "-aet", aet,
                             "127.0.0.1", str(node_port), *map(str, files)],
                            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    out, seen = [], 0
    for line in proc.stdout:
        out.append(line)
        if "Received Store Response (Success)" in line:
            seen += 1
            if seen == acks:
                kill(proc)
    proc.wait(timeout=60)
    return acked_files("".join(out))


def assert_store_consistent(node) -> dict[str, dict]:  # type: ignore[no-untyped-def,type-arg]
    """Every indexed instance has its file with the indexed hash; no file is unindexed."""
    inst = node.instances()
    for row in inst.values():
        path = node.storage / row["path"]
        _, data = split_part10(path)
        assert "blake3:" + blake3.blake3(data).hexdigest() == row["digest"], row["path"]
        assert pydicom.dcmread(path).SOPInstanceUID == row["sop_instance_uid"]
    on_disk = {str(p.relative_to(node.storage)) for p in (node.storage / "objects").rglob("*.dcm")}
    assert on_disk == {r["path"] for r in inst.values()}, "stray or missing files"
    assert os.listdir(node.storage / "tmp") == [], "temp files left behind"
    return inst


def pyscu_send(port: int, paths: list[Path], aet: str = "PYSCU") -> list[int]:
    ae = verbatim_scu(aet)
    for p in paths:
        ts, _ = split_part10(p)
        ae.add_requested_context(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


# --- senders that die ------------------------------------------------------------------------

KILLED_SENDER = textwrap.dedent("""
    import os, sys, pydicom
    from pynetdicom import AE
    port, files = int(sys.argv[1]), sys.argv[2:]
    ae = AE(ae_title="DYINGSCU")
    ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID,
                             "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    for f in files[:3]:
        assert assoc.send_c_store(f).Status == 0
    # now start the 4th by hand: send half of a P-DATA-TF PDU, then die
    sock = assoc.dul.socket.socket
    sock.sendall(b"\\x04\\x00" + (100000).to_bytes(4, "big") + b"\\x00" * 5000)
    os._exit(9)
""")


def test_sender_killed_mid_association(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, files = make_study(tmp_path, 4)
    script = tmp_path / "dying.py"
    script.write_text(KILLED_SENDER)
    p = subprocess.run([sys.executable, str(script), str(node.port), *map(str, files)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 9, p.stderr
    wait_until(lambda: node.audit("association-aborted"), what="abort recorded")
    inst = assert_store_consistent(node)
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(inst) == 3 and set(inst) < sent
    [summary] = node.audit("instances-received")
    assert summary["source_aet"] == "DYINGSCU" and summary["detail"]["instances"] == 3
    assert summary["detail"]["ended"] == "aborted"
    assert echoscu(node.port).returncode == 0


def test_dcmtk_sender_killed_while_sending(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, files = make_study(tmp_path, 40)
    acked = send_and_kill_after(node.port, files, 10, lambda p: p.kill(), "KILLED")
    wait_until(lambda: any(e["source_aet"] == "KILLED"
                           for e in node.audit("instances-received")), what="association closed")
    inst = assert_store_consistent(node)
    acked_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in acked}
    assert acked_uids <= set(inst)
    assert len(inst) < 40, "sender was not killed mid-study; test proves nothing"


def test_node_sigkill_mid_study_and_restart(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    study, files = make_study(tmp_path, 60)
    # SIGKILL the node (no chance to clean up) right after the 20th acknowledgement
    acked = send_and_kill_after(node.port, files, 20, lambda _p: node.kill(), "SCANNER")
    assert 20 <= len(acked) < 60, f"kill did not land mid-study ({len(acked)} acked)"

    # restart; the scanner re-sends the whole study at once, as scanners do after a failure
    node2 = node_factory().start()
    storescu(node2.port, files, aet="SCANNER")
    inst = assert_store_consistent(node2)
    for f in acked:  # every acknowledged instance is there and readable
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert sop in inst
        assert split_part10(node2.storage / inst[sop]["path"])[1] == split_part10(f)[1]
    [interrupted] = [e for e in node2.audit("association-aborted")
                     if e["detail"]["how"] == "interrupted"]
    assert interrupted["source_aet"] == "SCANNER"

    wait_until(lambda: node2.completions(), what="completion after restart")
    time.sleep(1.5)  # longer than the quiet period: a second completion would show now
    [c] = node2.completions()
    assert (c["study_uid"], c["revision"], c["num_instances"]) == (study, 1, 60)
    assert_store_consistent(node2)
    assert node2.cli("audit", "verify").returncode == 0


def test_sigterm_finishes_in_flight_then_stops(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, files = make_study(tmp_path, 150)
    codes, took = [], []

    def sigterm(_p: object) -> None:
        t0 = time.monotonic()
        codes.append(node.terminate(timeout=30))
        took.append(time.monotonic() - t0)

    acked = send_and_kill_after(node.port, files, 10, sigterm, "SCANNER")
    assert codes == [0]
    assert took[0] < 10, f"stop took {took[0]:.1f}s"
    # the associations are aborted as soon as the instance being stored is done, not after
    # the accept loop has noticed the stop (up to 0.5 s, ~100 more instances on a fast box)
    assert len(acked) < 75, f"the node did not stop promptly ({len(acked)} of 150 acknowledged)"
    inst = assert_store_consistent(node)
    assert {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in acked} <= set(inst)
    stops = node.audit("application-stop")
    assert len(stops) == 1 and stops[0]["detail"]["reason"] == "SIGTERM"
    assert "Traceback" not in node.log()


# --- bad peers and bad input -------------------------------------------------------------------

def test_unknown_calling_ae_and_wrong_called_ae_rejected(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(access={"allowed_calling_aets": ["CT_SCANNER"]}).start()
    assert echoscu(node.port, aet="CT_SCANNER").returncode == 0
    bad = echoscu(node.port, aet="INTRUDER")
    assert bad.returncode != 0
    wrong = echoscu(node.port, aet="CT_SCANNER", aec="NOT_US")
    assert wrong.returncode != 0
    rejected = node.audit("association-rejected")
    assert [r["source_aet"] for r in rejected] == ["INTRUDER", "CT_SCANNER"]
    assert "INTRUDER" in rejected[0]["detail"]["reason"]
    assert "NOT_US" in rejected[1]["detail"]["reason"]
    assert all(r["outcome"] == 4 for r in rejected)


def test_truncated_and_malformed_datasets_refused(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.dcm"
    with_new_uids(get_testdata_file("CT_small.dcm"), good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 5000])  # pixel data cut short
    no_uid = tmp_path / "no_study_uid.dcm"
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.StudyInstanceUID
    ds.save_as(no_uid, enforce_file_format=True)
    statuses = pyscu_send(node.port, [truncated, no_uid, good])
    assert statuses == [0xC001, 0xC002, 0x0000]
    refused = node.audit("store-refused")
    assert [r["detail"]["status"] for r in refused] == ["0xC001", "0xC002"]
    assert "truncated" in refused[0]["detail"]["reason"]
    assert "Study Instance UID" in refused[1]["detail"]["reason"]
    assert len(assert_store_consistent(node)) == 1
    [summary] = node.audit("instances-received")
    assert summary["detail"]["failed"] == 2 and summary["detail"]["instances"] == 1


def _rss(node) -> int:  # type: ignore[no-untyped-def]
    return int(psutil.Process(node.proc.pid).memory_info().rss)


def test_pdu_claiming_4gib_is_aborted_unread(node) -> None:  # type: ignore[no-untyped-def]
    assert echoscu(node.port).returncode == 0
    before = _rss(node)
    # 1) inside an association: a P-DATA-TF header claiming ~4 GiB
    ae = AE(ae_title="EVILSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    sock.sendall(b"\x04\x00" + struct.pack(">L", 0xFFFFFFF0) + b"\x00" * 65536)
    wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=15,
               what="association aborted by the node")
    # 2) before any association: an A-ASSOCIATE-RQ header claiming 4 GiB, then a trickle
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF) + b"\x00" * 65536)
        s.settimeout(10)
        reply = s.recv(10)
        assert reply[:1] == b"\x07", f"expected A-ABORT, got {reply!r}"
    after = _rss(node)
    assert after - before < 30 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MiB"
    assert echoscu(node.port).returncode == 0  # the node still serves
    violations = node.audit("protocol-violation")
    assert len(violations) == 2
    assert "4294967280" in violations[0]["detail"]["reason"]


def test_disk_below_watermark_refused_with_a700(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the "tiny threshold trick": demand more free space than any disk has
    node = node_factory(storage={"min_free_mb": 10**9}).start()
    f = tmp_path / "a.dcm"
    with_new_uids(get_testdata_file("CT_small.dcm"), f)
    assert pyscu_send(node.port, [f]) == [0xA700]
    r = storescu(node.port, [f], check=False, extra=["-v"])
    assert r.returncode != 0 and "Refused: OutOfResources" in r.stderr
    refused = node.audit("store-refused")
    assert [x["detail"]["status"] for x in refused] == ["0xA700", "0xA700"]
    assert "min_free_mb" in refused[0]["detail"]["reason"]
    assert node.instances() == {}
    assert os.listdir(node.storage / "tmp") == []
    assert echoscu(node.port).returncode == 0


# --- the audit trail --------------------------------------------------------------------------

def _tamper(db_url: str, sql: str) -> None:
    """Run SQL as an attacker with database access would: triggers out of the way first."""
    from sqlalchemy import create_engine, text

    url = db_url.replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(url)
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
            c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
        else:
            c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
        c.execute(text(sql))
    engine.dispose()


def test_audit_is_append_only_in_the_database(node) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    assert echoscu(node.port).returncode == 0
    engine = create_engine(node.db_url.replace("postgresql://", "postgresql+psycopg://"))
    for sql in ("UPDATE audit_events SET outcome = 0", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as c:
            c.execute(text(sql))
    engine.dispose()


@pytest.mark.parametrize("attack", ["edit", "delete-middle", "delete-last"])
def test_audit_verify_catches_tampering(node, attack: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        assert echoscu(node.port).returncode == 0
    node.stop()  # application-stop is the last row
    ok = node.cli("audit", "verify")
    assert "intact" in ok.stdout
    rows = node.audit()
    assert len(rows) >= 5
    # the chain the attacks below cut: seq 1…n without a gap, from start to stop
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["event_type"] == "application-start"
    assert rows[-1]["event_type"] == "application-stop"
    if attack == "edit":
        _tamper(node.db_url, "UPDATE audit_events SET source_aet = 'SOMEONE_ELSE' WHERE seq = 3")
        expect = "seq 3"
    elif attack == "delete-middle":
        _tamper(node.db_url, "DELETE FROM audit_events WHERE seq = 2")
        expect = "seq 2"
    else:
        _tamper(node.db_url, f"DELETE FROM audit_events WHERE seq = {len(rows)}")
        expect = f"seq {len(rows)}"
    bad = node.cli("audit", "verify", check=False)
    assert bad.returncode == 1
    assert "BROKEN" in bad.stderr and expect in bad.stderr, bad.stderr



def test_bare_tcp_connects_do_not_hold_association_slots(node_factory) -> None:  # type: ignore[no-untyped-def]
    """Load-balancer health checks and port scans connect and close without an A-ASSOCIATE-RQ;
    pynetdicom alone would hold each slot for acse_timeout (30 s)."""
    node = node_factory(node={"max_associations": 2}).start()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", node.port)):
            pass
    time.sleep(0.5)
    t0 = time.monotonic()
    assert echoscu(node.port).returncode == 0
    assert time.monotonic() - t0 < 5
    assert node.audit("association-rejected") == []


def _half_sent(assoc, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Send the C-STORE of ``path`` on ``assoc`` up to, not including, its last fragment,
    by hand: the receiver has started writing the file and is waiting for the rest."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    _, dataset = split_part10(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    [cx] = [c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID]
    prim = C_STORE()
    prim.MessageID = 999
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 2
    prim.DataSet = BytesIO(dataset)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdus = list(msg.encode_msg(cx.context_id, 16384))
    assert len(pdus) > 3
    sock = assoc.dul.socket.socket
    for p in pdus[:-1]:
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        sock.sendall(pdu.encode())


def test_receiver_process_killed_mid_association(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """node.receiver_processes: 2 — SIGKILL the receiver worker in the middle of a study and
    of an instance: what it acknowledged stays indexed and readable, its association is closed
    as interrupted (so the study can complete), the file it was writing is removed, the
    node's own associations go on, a new worker takes the next connection, and the study
    completes once when the scanner re-sends it."""
    import signal

    # the study completes once, at the end: the node's own association (HELD) sends one of
    # its instances first and stays open until the re-send is done, so however long the kill
    # → noticed → re-send (which waits for the new worker to start) takes under load, the
    # study is held by an open association, not by a quiet period guessed long enough (20 s)
    node = node_factory(node={"receiver_processes": 2}).start()
    node.receiver_workers_ready()
    study, files = make_study(tmp_path, 60)
    sop_class = pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID
    ts = split_part10(files[0])[0]

    def accepted(aet: str) -> list[dict]:  # type: ignore[type-arg]
        return [e for e in node.audit("association-accepted") if e["source_aet"] == aet]

    # an association held open by the node's own receiver (the first connection: the
    # node's), so that the next ones go to the worker; learn the worker's pid from a probe
    held = verbatim_scu("HELD")
    held.add_requested_context(sop_class, ts)
    first = held.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert first.is_established
    assert first.send_c_store(files[0]).Status == 0  # HELD holds the study from now on
    [held_event] = wait_until(lambda: accepted("HELD"), what="HELD accepted")
    assert held_event["detail"]["pid"] == node.proc.pid
    assert echoscu(node.port, aet="PROBE").returncode == 0
    [probe] = wait_until(lambda: accepted("PROBE"), what="PROBE accepted")
    worker = probe["detail"]["pid"]
    assert worker != node.proc.pid and psutil.Process(worker).ppid() == node.proc.pid
    time.sleep(0.5)  # the node hears that the probe's connection closed

    scanner = verbatim_scu("SCANNER")
    scanner.add_requested_context(sop_class, ts)
    assoc = scanner.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    acked = files[:20]  # files[0] again: the same bytes, a duplicate acknowledged as such
    assert [int(assoc.send_c_store(f).Status) for f in acked] == [0] * 20
    _half_sent(assoc, files[20])
    indexed = {r["path"] for r in node.instances().values()}

    def partial() -> list[Path]:
        return [p for p in (node.storage / "objects").rglob("*.dcm")
                if str(p.relative_to(node.storage)) not in indexed]

    wait_until(partial, what="the worker writing the 21st file")
    assert accepted("SCANNER")[0]["detail"]["pid"] == worker
    os.kill(worker, signal.SIGKILL)

    [died] = wait_until(lambda: node.audit("receiver-process-died"), timeout=30,
                        what="the node noticed")
    [aborted] = [e for e in node.audit("association-aborted") if e["source_aet"] == "SCANNER"]
    assert aborted["detail"]["how"] == "interrupted"
    assert died["detail"]["interrupted_associations"] == [aborted["detail"]["association_id"]]
    assert died["detail"]["removed_partial"] == 1 and partial() == []
    assoc.kill()
    # the node's own association was not disturbed
    assert first.send_c_store(files[0]).Status == 0
    inst = assert_store_consistent(node)  # acknowledged kept, nothing partial left
    assert len(inst) == 20
    for f in acked:
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert split_part10(node.storage / inst[sop]["path"])[1] == split_part10(f)[1]
    # the scanner re-sends the study; with HELD still open it goes to the new worker, once
    # that has started (until then the node takes connections itself)
    node.receiver_workers_ready(count=2)
    storescu(node.port, files, aet="SCANNER")
    pids = {e["detail"]["pid"] for e in accepted("SCANNER")}
    assert len(pids) == 2 and node.proc.pid not in pids  # the new worker took it
    first.release()
    wait_until(lambda: node.completions(), timeout=60, what="completion")
    time.sleep(1.5)  # longer than the quiet period: a second completion would show now
    [c] = node.completions()
    assert (c["study_uid"], c["revision"], c["num_instances"]) == (study, 1, 60)
    assert_store_consistent(node)
    assert node.cli("audit", "verify").returncode == 0
    assert node.terminate(timeout=60) == 0
