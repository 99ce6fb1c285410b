"""Unit tests of the pieces under the node: config, the dataset walker, audit chain, sweep."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.audit import AuditLog, EventKind, Outcome, verify_chain
from dicomnode.config import ConfigError, load_settings
from dicomnode.database import make_engine, make_sessionmaker, upgrade
from dicomnode.store.files import DiskFull, FileStore
from dicomnode.store.parse import MalformedDataset, check_complete, read_index_attributes
from tests.helpers import split_part10

TEST_FILES = os.path.dirname(get_testdata_file("CT_small.dcm"))


# --- configuration ---------------------------------------------------------------------------

def test_defaults_and_example_file_load() -> None:
    s = load_settings(Path(__file__).parent.parent / "dicomnode.example.yaml")
    assert s.node.ae_title == "DICOMNODE" and s.assemble.level == "study"
    assert s.database_url.startswith("sqlite:///")


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node:\n  prot: 104\nassemble:\n  level: patient\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    msg = str(e.value)
    assert "node.prot: unknown key (did you mean 'port'?)" in msg
    assert "assemble.level" in msg and "'study' or 'series'" in msg


@pytest.mark.parametrize("text,key", [
    ("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}", "node.ae_title"),
    ("node: {port: 70000}", "node.port"),
    ("access: {allowed_calling_aets: ['A\\\\B']}", "access.allowed_calling_aets"),
    ("storage: {duplicate_policy: overwrite}", "storage.duplicate_policy"),
    ("[1, 2]", "top level"),
    ("node: {port: [}", "not valid YAML"),
])
def test_each_bad_value_is_reported(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(f)


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node: {port: 104, ae_title: FROMFILE}\n")
    monkeypatch.setenv("DICOMNODE_NODE__PORT", "11113")
    monkeypatch.setenv("DICOMNODE_ACCESS__ALLOWED_CALLING_AETS", '["CT1", "MR1"]')
    s = load_settings(f)
    assert s.node.port == 11113 and s.node.ae_title == "FROMFILE"
    assert s.access.allowed_calling_aets == ["CT1", "MR1"]


# --- the structural walker -------------------------------------------------------------------

def _samples() -> list[str]:
    files = sorted(glob.glob(TEST_FILES + "/*.dcm"))
    out = []
    for f in files:
        try:
            split_part10(f)
        except Exception:
            continue  # no file meta: not something a network peer sends us as-is
        out.append(f)
    return out


def test_walker_accepts_pydicom_corpus_and_catches_its_truncated_files() -> None:
    bad = {}
    for f in _samples():
        ts, data = split_part10(f)
        try:
            read_index_attributes(check_complete(data, ts))
        except MalformedDataset as e:
            bad[os.path.basename(f)] = str(e)
    assert set(bad) == {"MR_truncated.dcm", "rtplan_truncated.dcm"}, bad
    assert len(_samples()) > 50


@pytest.mark.parametrize("cut", [1, 7, 100, 2000])
def test_walker_catches_truncation_anywhere(cut: int) -> None:
    checked = 0
    for f in _samples():
        ts, data = split_part10(f)
        if "truncated" in f or ts == "1.2.840.10008.1.2.1.99":
            continue  # deflate: trailing padding after the stream end is legal
        if len(data) <= cut:
            continue
        with pytest.raises(MalformedDataset):
            check_complete(data[: len(data) - cut], ts)
        checked += 1
    assert checked > 40


def test_deflated_truncation_detected() -> None:
    ts, data = split_part10(get_testdata_file("image_dfl.dcm"))
    with pytest.raises(MalformedDataset, match="deflate"):
        check_complete(data[:-50], ts)


def test_index_attributes() -> None:
    ts, data = split_part10(get_testdata_file("CT_small.dcm"))
    a = read_index_attributes(check_complete(data, ts))
    assert a.modality == "CT" and a.patient_name == "CompressedSamples^CT1"
    assert a.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"


def test_fast_pixel_values_equal_pydicoms() -> None:
    """Plugins' pixels read native little-endian data in place; on every single-frame sample
    pydicom decodes, and with bits set above BitsStored (cleared, or sign-extended), the
    values must equal pydicom's ``pixel_array``."""
    from dicomnode.run.inputs import stored_values

    checked = 0
    for f in _samples():
        try:
            ds = pydicom.dcmread(f)
            ref = ds.pixel_array
        except Exception:
            continue
        if ref.ndim != 2:
            continue
        assert np.array_equal(stored_values(ds), ref), f
        checked += 1
    assert checked > 20
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # signed, 16 of 16 bits
    for signed in (0, 1):
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, 12, 11
        raw = np.array([[0x0FFF, 0x1800], [0xF800, 0x0801]], dtype=np.uint16)
        ds.Rows, ds.Columns, ds.PixelData = 2, 2, raw.tobytes()
        ref = ds.pixel_array
        assert np.array_equal(stored_values(ds), ref), signed
        assert stored_values(ds).dtype == ref.dtype


def test_fast_index_decoding_agrees_with_pydicom() -> None:
    """Plain-ASCII values are read without pydicom; on every sample and every character-set
    file the result must be exactly what the all-pydicom reference gives."""
    from pydicom.data import get_charset_files

    from dicomnode.store.parse import read_index_attributes_pydicom

    checked = 0
    for f in _samples() + get_charset_files("*.dcm"):
        try:
            ts, data = split_part10(f)
            plain = check_complete(data, ts)
        except (MalformedDataset, ValueError, KeyError, AttributeError):
            continue
        assert read_index_attributes(plain) == read_index_attributes_pydicom(plain), f
        checked += 1
    assert checked > 60
    # the fast path's edges: padding, signs, odd numbers, multi-values, escapes
    from dicomnode.store.parse import _TAGS, PlainDataset

    def one(kw: str, value: bytes, vr: bytes) -> PlainDataset:
        return PlainDataset(value, False, True, {_TAGS[kw]: (vr, len(value), 0)})

    for kw, vr, value in [("SeriesNumber", b"IS", b" +12 "), ("InstanceNumber", b"IS", b"-3"),
                          ("InstanceNumber", b"IS", b"1.5 "), ("SeriesNumber", b"IS", b"x"),
                          ("PatientName", b"PN", b"A^B \x00"), ("PatientID", b"LO", b" ID "),
                          ("PatientID", b"LO", b"A\\B"), ("StudyDescription", b"LO", b"\x1b$B"),
                          ("SOPInstanceUID", b"UI", b"1.2.3\x00"), ("Modality", b"CS", b"")]:
        plain = one(kw, value, vr)
        assert read_index_attributes(plain) == read_index_attributes_pydicom(plain), (kw, value)


def test_streamed_file_equals_staged_file(tmp_path: Path) -> None:
    import blake3

    fs = FileStore(tmp_path, min_free_mb=0)
    data = os.urandom(700_000)
    stream = fs.open_stream(b"META")
    for k in range(0, len(data), 65536):  # fragments as they come off the network
        stream.write(memoryview(data)[k: k + 65536])
    staged = stream.finish()
    assert staged.size == 4 + len(data) and not stream.open
    assert stream.hasher.hexdigest() == blake3.blake3(data).hexdigest()
    assert fs.path_of(staged.rel_path).read_bytes() == b"META" + data
    bucket = fs.path_of(staged.rel_path).parent
    # abandoned half-way (peer gone): nothing left behind
    half = fs.open_stream(b"META")
    half.write(data[:1000])
    half.abort()
    half.abort()
    assert os.listdir(bucket) == [fs.path_of(staged.rel_path).name]


def test_stream_write_error_is_kept_and_reported_at_finish(tmp_path: Path) -> None:
    import errno

    fs = FileStore(tmp_path, min_free_mb=0)
    stream = fs.open_stream(b"META")
    stream.write(b"first")
    os.close(stream._fd)  # type: ignore[arg-type]  # the disk goes away under the stream
    stream._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
    stream.write(b"second")  # on the network thread: must not raise
    assert isinstance(stream.error, OSError) and stream.error.errno == errno.EBADF
    with pytest.raises(OSError):
        stream.finish()
    assert not stream.path.exists()
    with pytest.raises(DiskFull, match="min_free_mb"):
        FileStore(tmp_path, min_free_mb=10**9).open_stream(b"META")


def test_garbage_is_malformed() -> None:
    with pytest.raises(MalformedDataset):
        check_complete(os.urandom(4096), "1.2.840.10008.1.2.1")
    with pytest.raises(MalformedDataset):
        check_complete(b"", "1.2.840.10008.1.2")


# --- audit -----------------------------------------------------------------------------------

def test_event_kinds_are_distinct() -> None:
    # Enum members with equal values become aliases: that once recorded every 110104 event as
    # 'instances-received'. Every kind must keep its own type name.
    names = [k.type_name for k in EventKind]
    assert len(names) == len(EventKind.__members__) == len(set(names))
    assert EventKind.DUPLICATE_CONFLICT.type_name == "duplicate-conflict"
    assert EventKind.DUPLICATE_CONFLICT.code == "110104"


def test_chain_links_and_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite3'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    log = AuditLog(sessions)
    for i in range(20):
        log.record(EventKind.STORE_REFUSED, Outcome.SERIOUS_FAILURE, source_aet="X", n=i)
    r = verify_chain(sessions)
    assert r.ok and r.checked == 20


def test_group_commit_indexes_concurrent_instances_once_each(tmp_path: Path) -> None:
    """Threads share index transactions; every new instance is indexed exactly once, and
    anything the fast path does not cover (duplicate, unknown or complete study) is left to
    the ORM path, with nothing written for it."""
    import threading

    from sqlalchemy import func, select

    from dicomnode.schema import Instance, Patient, Series, Study, utcnow
    from dicomnode.store.hotindex import GroupCommit, HotIndex

    url = f"sqlite:///{tmp_path / 'g.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    now = utcnow()
    with sessions() as s, s.begin():
        p = Patient(patient_id="P", issuer="", patient_name="", birth_date="", sex="")
        s.add(p)
        s.flush()
        for uid, state in (("1.2.1", "receiving"), ("1.2.2", "complete")):
            st = Study(study_uid=uid, patient_fk=p.id, state=state, revision=1,
                       num_instances=0, first_received_at=now, last_received_at=now)
            s.add(st)
            s.flush()
            s.add(Series(series_uid=uid + ".1", study_fk=st.id, state=state, revision=1,
                         num_instances=0, last_received_at=now))
    group = GroupCommit(HotIndex(engine), threading.Lock())

    def request(sop: str, study: str) -> dict[str, object]:
        return dict(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    study_uid=study, series_uid=study + ".1", instance_number=1,
                    transfer_syntax_uid="1.2.840.10008.1.2", size=10, digest="blake3:" + "0" * 64,
                    path=f"objects/x/{sop}", association_fk=None, now=utcnow())

    results: dict[str, bool] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(25):
            sop = f"1.3.{k}.{i}"
            ok = group.index(**request(sop, "1.2.1"))
            with lock:
                results[sop] = ok

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 150 and all(results.values())
    assert group.index(**request("1.3.0.0", "1.2.1")) is False  # duplicate: ORM path decides
    assert group.index(**request("1.4", "1.2.2")) is False  # complete study: re-open via ORM
    assert group.index(**request("1.5", "9.9")) is False  # unknown study
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 150
        assert s.scalar(select(Study.num_instances).where(Study.study_uid == "1.2.1")) == 150
        assert s.scalar(select(Series.num_instances).where(
            Series.series_uid == "1.2.1.1")) == 150
    # another receiving process holds the writers' queue (<index>.writers): the transaction
    # waits for it instead of sleeping in SQLite's busy handler, and goes ahead once it is free
    from dicomnode.store.hotindex import WriterQueue

    other = WriterQueue(str(tmp_path / "g.sqlite3.writers"))
    assert other.acquire()
    done = threading.Event()
    waiting = threading.Thread(
        target=lambda: (group.index(**request("1.6", "1.2.1")), done.set()))
    waiting.start()
    assert not done.wait(0.3)
    other.release()
    assert done.wait(5)
    waiting.join()
    other.close()
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 151


# --- file store ------------------------------------------------------------------------------

def test_writer_queue_excludes_other_writers_and_dies_with_its_process(tmp_path: Path) -> None:
    """The hot-path transactions of several receiving processes queue on a flock (each
    HotIndex its own open file, so it also excludes within one process); a holder that is
    killed releases it (the kernel closes its file)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from dicomnode.store.hotindex import WriterQueue

    path = str(tmp_path / "index.sqlite3.writers")
    a, b = WriterQueue(path), WriterQueue(path)
    assert a.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (b.acquire(), got.set()))
    waiter.start()
    assert not got.wait(0.2)  # held by a
    a.release()
    assert got.wait(5)  # handed over within a poll interval
    waiter.join()
    b.release()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dicomnode.store.hotindex import WriterQueue; "
        f"q = WriterQueue({path!r}); q.acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        done = threading.Event()
        threading.Thread(target=lambda: (a.acquire(), done.set()), daemon=True).start()
        assert not done.wait(0.2)
        holder.send_signal(signal.SIGKILL)
        assert done.wait(5) and time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    a.release()
    a.close()
    b.close()


def test_every_sqlite_write_transaction_queues_and_reads_do_not(tmp_path: Path) -> None:
    """ORM write transactions (audit events, association rows, the assembler) take the same
    writers' queue as the hot path, from BEGIN until the DBAPI commit or rollback has
    returned; read-only sessions (the node's pollers) never touch it."""
    import fcntl
    import threading

    from sqlalchemy import text

    from dicomnode.database import WriterQueue, reading

    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    probe = WriterQueue(str(tmp_path / "w.sqlite3.writers"))

    def free() -> bool:
        try:
            fcntl.flock(probe.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        probe.release()
        return True

    assert free()
    with sessions() as s, s.begin():
        s.execute(text("SELECT 1"))
        assert not free()  # held from BEGIN IMMEDIATE …
    assert free()  # … to after COMMIT
    with sessions() as s:
        s.begin()
        s.execute(text("SELECT 1"))
        assert not free()
        s.rollback()
        assert free()
    with pytest.raises(ZeroDivisionError), sessions() as s, s.begin():
        s.execute(text("SELECT 1"))
        raise ZeroDivisionError
    assert free()
    with reading(sessions)() as s:
        s.execute(text("SELECT 1"))
        assert free()  # a read holds neither SQLite's write lock nor the queue
    # another process's writer holds the queue: a write waits for it, a read does not
    assert probe.acquire()
    log = AuditLog(sessions)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (
        log.record(EventKind.STORE_REFUSED, Outcome.MINOR_FAILURE, n=1), done.set()))
    writer.start()
    with reading(sessions)() as s:
        assert s.execute(text("SELECT count(*) FROM audit_events")).scalar_one() == 0
    assert not done.wait(0.3)
    probe.release()
    assert done.wait(5)
    writer.join()
    assert free()
    assert verify_chain(sessions).checked == 1
    probe.close()
    engine.dispose()


def test_stage_and_sweep(tmp_path: Path) -> None:
    fs = FileStore(tmp_path, min_free_mb=0)
    a = fs.stage(b"META", b"DATASET-A")  # indexed and acknowledged
    fs.stage(b"META", b"PARTIAL")  # crashed before its index commit
    assert fs.path_of(a.rel_path).read_bytes() == b"METADATASET-A"
    # a store from before files were born in place: one indexed file still in tmp/, junk
    legacy = "2026010100-" + "ab" * 16
    (fs.tmp / f"{legacy}.dcm").write_bytes(b"METADATASET-B")
    (fs.tmp / "junk.part").write_bytes(b"x")
    from dicomnode.store.files import final_rel_path
    # an old bucket is never scanned (its unindexed file is somebody else's business)
    old = fs.root / "objects" / "20200101" / "00"
    old.mkdir(parents=True)
    (old / "foreign.dcm").write_bytes(b"x")
    indexed = {a.rel_path, final_rel_path(legacy)}
    forward, deleted = fs.sweep(
        lambda rel: rel if rel in indexed else None,
        lambda prefix: {p for p in indexed if p.startswith(prefix)})
    assert (forward, deleted) == (1, 2)
    assert fs.path_of(final_rel_path(legacy)).read_bytes() == b"METADATASET-B"
    assert fs.path_of(a.rel_path).read_bytes() == b"METADATASET-A"
    newest = fs.root / a.rel_path.rsplit("/", 1)[0]
    assert sorted(os.listdir(newest)) == [a.rel_path.rsplit("/", 1)[1]]  # PARTIAL is gone
    assert os.listdir(fs.tmp) == [] and os.listdir(old) == ["foreign.dcm"]


def test_watermark(tmp_path: Path) -> None:
    fs = FileStore(tmp_path, min_free_mb=10**9)
    with pytest.raises(DiskFull, match="min_free_mb"):
        fs.stage(b"", b"x")
    assert os.listdir(fs.tmp) == []


def test_index_attributes_match_pydicom_in_every_character_set() -> None:
    """The walker hands pydicom only the indexed elements; decoding must match a full read."""
    import pydicom
    from pydicom.data import get_charset_files

    from dicomnode.store.meta import part10_header

    checked = 0
    for f in get_charset_files("*.dcm"):
        ds = pydicom.dcmread(f)
        if "PatientName" not in ds or "SpecificCharacterSet" not in ds:
            continue
        ts, data = split_part10(f) if ds.file_meta else ("", b"")
        if not data:
            continue
        a = read_index_attributes(check_complete(data, ts))
        assert a.patient_name == str(ds.PatientName)[:324], f
        checked += 1
    assert checked >= 10
    # and the hand-built file meta reads back as pydicom would write it
    h = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2", "NODE", "CT1")
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble
    fp = io.BytesIO(h)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    assert fp.tell() == len(h) and meta.SendingApplicationEntityTitle == "CT1"
    assert meta.FileMetaInformationGroupLength == len(h) - 128 - 4 - 12


@pytest.mark.parametrize("status,verdict", [
    (0x0000, "ok"), (0x0001, "ok"), (0xB000, "ok"), (0xB007, "ok"),  # success, warnings
    (0xA700, "retry"), (0xA702, "retry"),  # out of resources: try again later
    (0xA900, "permanent"), (0xC000, "permanent"), (0xC211, "permanent"),  # wrong data
    (0x0122, "permanent"),  # SOP class not supported
])
def test_send_status_classification(status: int, verdict: str) -> None:
    from dicomnode.send.sender import classify

    assert classify(status) == verdict


def test_results_go_over_parallel_associations(tmp_path: Path) -> None:
    """send_files splits one job's results over destination.associations associations."""
    import threading

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from dicomnode.config import DestinationConfig
    from dicomnode.send.sender import send_files
    from dicomnode.simulate import write_ct_series
    from tests.helpers import free_port

    seen: dict[str, set[int]] = {}
    lock = threading.Lock()

    def on_store(event) -> int:  # type: ignore[no-untyped-def]
        with lock:
            seen.setdefault(event.request.AffectedSOPInstanceUID, set()).add(id(event.assoc))
        return 0x0000

    scp = AE(ae_title="PACS")
    for cx in AllStoragePresentationContexts:
        scp.add_supported_context(cx.abstract_syntax, "1.2.840.10008.1.2.1")
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        files = write_ct_series(tmp_path / "r", n=9, size=16)
        dest = DestinationConfig(ae_title="PACS", host="127.0.0.1", port=port, associations=3)
        assert send_files(dest, "DICOMNODE", files) == 9
    finally:
        server.shutdown()
    assert len(seen) == 9  # every object arrived once
    assert len(set().union(*seen.values())) == 3  # over three associations


def test_association_sockets_have_tcp_nodelay() -> None:
    """Without TCP_NODELAY a sender stalls ~40 ms per object on the peer's delayed ACK (bench
    e2e: 54 ms/object); the node's AE (NodeSocket) sets it on outgoing and accepted sockets."""
    import socket
    import threading

    from pynetdicom import evt

    from dicomnode.receive.node_ae import NodeAE as AE
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

    from dicomnode.receive.node_ae import encode_c_store_rsp

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

    from dicomnode.receive import node_ae
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

    from dicomnode.receive.node_ae import _original_to_primitive, c_store_rq_primitive

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

    from dicomnode.receive.node_ae import ReadAhead

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

    from dicomnode.receive import node_ae

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

    from dicomnode.receive import node_ae

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


def test_migrations_reach_the_models_and_keep_old_deliveries(db_url: str) -> None:
    """`dicomnode db upgrade` from 0003 (a delivery of a whole job, an instance with a SHA-256)
    to head: the row stays a whole-job delivery (step -1, results from the job), the digest
    is kept as 'sha256:<hex>', and the migrated schema is the one the models describe (no
    difference left for autogenerate to find)."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from dicomnode.schema import Base

    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    with engine.begin() as c:
        c.execute(sa.text(
            "INSERT INTO jobs (id, uid, route, level, study_uid, revision, series_uids, "
            "pipeline, send_to, state, attempts, max_attempts, reason, summary, results, "
            "created_at) VALUES (1, 'j1', 'r', 'study', '1.2', 1, '[]', '[]', '[\"pacs\"]', "
            "'succeeded', 1, 3, '', '', '[\"a.dcm\"]', CURRENT_TIMESTAMP)"))
        c.execute(sa.text(
            "INSERT INTO deliveries (job_fk, destination, state, attempts, next_attempt_at, "
            "last_status, last_error, created_at) VALUES (1, 'pacs', 'pending', 0, "
            "CURRENT_TIMESTAMP, '', '', CURRENT_TIMESTAMP)"))
        c.execute(sa.text(
            "INSERT INTO patients (id, patient_id, issuer, patient_name, birth_date, sex) "
            "VALUES (1, 'P', '', '', '', '')"))
        c.execute(sa.text(
            "INSERT INTO studies (id, study_uid, patient_fk, study_date, study_time, "
            "accession_number, study_id, study_description, referring_physician, state, "
            "revision, num_instances, first_received_at, last_received_at) VALUES (1, '1.2', 1, "
            "'', '', '', '', '', '', 'complete', 1, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        c.execute(sa.text(
            "INSERT INTO series (id, series_uid, study_fk, modality, series_number, "
            "series_description, body_part, frame_of_reference_uid, state, revision, "
            "num_instances, last_received_at) VALUES (1, '1.2.3', 1, 'CT', '', '', '', '', "
            "'complete', 1, 1, CURRENT_TIMESTAMP)"))
        c.execute(sa.text(
            "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, series_fk, study_fk, "
            "transfer_syntax_uid, size, sha256, path, study_revision, received_at) VALUES (1, "
            "'1.2.3.4', '1.2.840.10008.5.1.4.1.1.2', 1, 1, '1.2.840.10008.1.2', 10, :h, "
            "'objects/x.dcm', 1, CURRENT_TIMESTAMP)"), {"h": "ab" * 32})
    upgrade(db_url)
    with engine.begin() as c:
        assert c.execute(sa.text("SELECT step, results FROM deliveries")).one() == (-1, None)
        # indexed before BLAKE3: the SHA-256 is kept, labelled (store/digest.py)
        assert c.execute(sa.text("SELECT digest FROM instances")).scalar_one() == (
            "sha256:" + "ab" * 32)
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    engine.dispose()
    assert diff == [], diff


def test_remembered_uid_checks_answer_as_pynetdicom_does() -> None:
    """Class and syntax UIDs are checked once and remembered (node_ae 7: the contexts and
    syntax sub-items the node's DUL decodes from an A-ASSOCIATE-RQ); the answers are
    pynetdicom's own: the same UID objects, duplicates dropped, invalid values refused every
    time with the field's name, instance UIDs never remembered."""
    import struct

    from pydicom.uid import UID
    from pynetdicom.pdu_items import PresentationContextItemRQ

    from dicomnode.receive import node_ae

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

    from dicomnode.receive import node_ae

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

    from dicomnode.receive import node_ae

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
