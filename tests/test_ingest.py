"""Ingest with real senders: dcmtk storescu/echoscu and a pynetdicom SCU sending file bytes
verbatim. Every transfer syntax the node must accept is stored bit for bit, indexed, audited."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.helpers import (
    dcmtk,
    dcmtk_env,
    echoscu,
    free_port,
    split_part10,
    storescu,
    verbatim_scu,
    wait_until,
    with_new_uids,
)

# (transfer syntax, storescu flag proposing it, sample file from pydicom / pydicom-data)
TS_CASES = [
    ("1.2.840.10008.1.2", "-xi", "MR_small_implicit.dcm"),
    ("1.2.840.10008.1.2.1", "-xe", "693_UNCR.dcm"),  # 512² CT, pydicom-data
    ("1.2.840.10008.1.2.2", "-xb", "MR_small_bigendian.dcm"),
    ("1.2.840.10008.1.2.1.99", "-xd", "image_dfl.dcm"),
    ("1.2.840.10008.1.2.4.50", "-xy", "SC_rgb_jpeg_dcmtk.dcm"),
    ("1.2.840.10008.1.2.4.51", "-xx", "JPGExtended.dcm"),
    ("1.2.840.10008.1.2.4.70", "-xs", "JPEG-LL.dcm"),
    ("1.2.840.10008.1.2.4.80", "-xt", "MR_small_jpeg_ls_lossless.dcm"),
    ("1.2.840.10008.1.2.4.81", "-xu", "JPEGLSNearLossless_08.dcm"),
    ("1.2.840.10008.1.2.4.90", "-xv", "693_J2KR.dcm"),
    ("1.2.840.10008.1.2.4.91", "-xw", "JPEG2000.dcm"),
    ("1.2.840.10008.1.2.5", "-xr", "MR_small_RLE.dcm"),
    # multi-frame objects
    ("1.2.840.10008.1.2.4.90", "-xv", "emri_small_jpeg_2k_lossless.dcm"),  # Enhanced MR
    ("1.2.840.10008.1.2.1", "-xe", "liver.dcm"),  # Segmentation
]


def _sample(name: str) -> Path:
    return Path(get_testdata_file(name))  # pydicom ships these; pydicom-data adds the rest


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, Path]]:
    """Each sample copied with fresh UIDs (pydicom's MR_small_* share one SOP Instance UID)."""
    out = tmp_path_factory.mktemp("samples")
    cases = []
    for i, (ts, flag, name) in enumerate(TS_CASES):
        dst = out / f"{i:02d}_{name}"
        with_new_uids(_sample(name), dst)
        assert split_part10(dst)[0] == ts, f"{name} is not in {ts}"
        cases.append((ts, flag, dst))
    return cases


@pytest.fixture(scope="module")
def reference_scp(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """dcmtk storescp in bit-preserving mode: what it writes is exactly what arrived."""
    out = tmp_path_factory.mktemp("storescp")
    port = free_port()
    p = subprocess.Popen([dcmtk("storescp"), "+B", "+xa", "-aet", "DICOMNODE", "-od", str(out),
                          str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_until(lambda: echoscu(port).returncode == 0, what="reference storescp")
    yield port, out
    p.terminate()
    p.wait(10)


def test_echo_with_dcmtk(node) -> None:  # type: ignore[no-untyped-def]
    r = echoscu(node.port)
    assert r.returncode == 0, r.stderr
    accepted = node.audit("association-accepted")
    assert [a["source_aet"] for a in accepted] == ["ECHOSCU"]


def test_every_transfer_syntax_stored_bit_exact(node, samples, reference_scp) -> None:  # type: ignore[no-untyped-def]
    ref_port, ref_dir = reference_scp
    for _ts, flag, path in samples:
        storescu(node.port, [path], flag=flag)
        storescu(ref_port, [path], flag=flag)
    stored = node.instances()
    assert len(stored) == len(samples)
    total = 0
    for ts, _flag, path in samples:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        row = stored[sop]
        assert row["transfer_syntax_uid"] == ts, path.name
        ours_ts, ours = split_part10(node.storage / row["path"])
        ref = next(p for p in ref_dir.iterdir() if p.name.endswith(sop))
        ref_ts, theirs = split_part10(ref)
        assert ours_ts == ref_ts == ts
        assert ours == theirs, f"{path.name}: stored bytes differ from what dcmtk sent"
        assert row["size"] == (node.storage / row["path"]).stat().st_size
        total += row["size"]
        # the stored file is a valid Part 10 file that pydicom reads
        assert pydicom.dcmread(node.storage / row["path"]).SOPInstanceUID == sop
    [summary] = node.audit("instances-received")[-1:]
    assert summary["source_aet"] == "STORESCU"
    assert summary["detail"]["instances"] == 1  # one association per storescu call
    assert node.cli("audit", "verify").returncode == 0
    assert total > 500_000


def test_verbatim_bytes_from_pynetdicom(node, samples) -> None:  # type: ignore[no-untyped-def]
    """A pynetdicom SCU sends file bytes without re-encoding: stored == file, byte for byte."""
    ae = verbatim_scu("PYSCU")
    for ts, _flag, path in samples:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    for _ts, _flag, path in samples:
        status = assoc.send_c_store(path)
        assert status.Status == 0x0000, path.name
    assoc.release()
    stored = node.instances()
    for _ts, _flag, path in samples:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert split_part10(node.storage / stored[sop]["path"]) == split_part10(path)


def test_study_completes_once_after_quiet_period(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    files = [with_new_uids(get_testdata_file("CT_small.dcm"), tmp_path / f"{i}.dcm",
                           study_uid=study, series_uid=series, InstanceNumber=i) and
             tmp_path / f"{i}.dcm" for i in range(5)]
    storescu(node.port, files)
    wait_until(lambda: node.completions(), what="completion")
    [c] = node.completions()
    assert (c["level"], c["study_uid"], c["revision"], c["num_instances"]) == (
        "study", study, 1, 5)
    [st] = node.studies()
    assert st["state"] == "complete" and st["series"][0]["state"] == "complete"
    # a late instance is kept and opens revision 2, which completes on its own
    late = tmp_path / "late.dcm"
    with_new_uids(get_testdata_file("CT_small.dcm"), late, study_uid=study, series_uid=series)
    storescu(node.port, [late])
    wait_until(lambda: len(node.completions()) == 2, what="second completion")
    assert node.completions()[1]["revision"] == 2
    assert node.completions()[1]["num_instances"] == 6
    assert len(node.audit("study-completed")) == 2
    revs = sorted(i["study_revision"] for i in node.instances().values())
    assert revs == [1, 1, 1, 1, 1, 2]


def test_series_level_completion(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(assemble={"level": "series"}).start()
    study = pydicom.uid.generate_uid()
    files = []
    for s in range(2):
        series = pydicom.uid.generate_uid()
        for i in range(2):
            f = tmp_path / f"{s}_{i}.dcm"
            with_new_uids(get_testdata_file("CT_small.dcm"), f, study_uid=study,
                          series_uid=series)
            files.append(f)
    storescu(node.port, files)
    wait_until(lambda: len(node.completions()) == 2, what="two series completions")
    assert {c["level"] for c in node.completions()} == {"series"}
    assert all(c["num_instances"] == 2 for c in node.completions())


def test_duplicates(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    a = tmp_path / "a.dcm"
    ds = with_new_uids(get_testdata_file("CT_small.dcm"), a)
    storescu(node.port, [a])
    storescu(node.port, [a])  # identical bytes: success, no second copy
    assert len(node.instances()) == 1
    ds.PatientName = "Other^Content"
    b = tmp_path / "b.dcm"
    ds.save_as(b, enforce_file_format=True)
    storescu(node.port, [b])  # same SOP Instance UID, other bytes: keep the first, warn
    [row] = node.instances().values()
    stored = pydicom.dcmread(node.storage / row["path"])
    assert str(stored.PatientName) != "Other^Content"
    [conflict] = node.audit("duplicate-conflict")
    assert conflict["outcome"] == 4 and conflict["detail"]["policy"] == "keep-first"
    files = list((node.storage / "objects").rglob("*.dcm"))
    assert len(files) == 1


def test_duplicates_of_instances_indexed_with_sha256(node_factory, db_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Indexes from before migration 0005 hold SHA-256 digests ('sha256:<hex>'); new instances
    get BLAKE3. A duplicate of an old instance is still recognised: same bytes → no-op success,
    other bytes → keep the first and warn."""
    import hashlib

    import blake3
    import sqlalchemy as sa

    from dicomnode.database import make_engine

    node = node_factory().start()
    a = tmp_path / "a.dcm"
    ds = with_new_uids(get_testdata_file("CT_small.dcm"), a)
    storescu(node.port, [a])
    [row] = node.instances().values()
    _, data = split_part10(node.storage / row["path"])
    assert row["digest"] == "blake3:" + blake3.blake3(data).hexdigest()
    node.stop()
    engine = make_engine(db_url)  # as migration 0005 leaves a row indexed before it
    with engine.begin() as c:
        c.execute(sa.text("UPDATE instances SET digest = :d"),
                  {"d": "sha256:" + hashlib.sha256(data).hexdigest()})
    engine.dispose()
    node = node_factory().start()
    storescu(node.port, [a])  # identical bytes
    assert node.audit("duplicate-conflict") == []
    ds.PatientName = "Other^Content"
    b = tmp_path / "b.dcm"
    ds.save_as(b, enforce_file_format=True)
    storescu(node.port, [b])  # other bytes
    [conflict] = node.audit("duplicate-conflict")
    assert conflict["detail"]["policy"] == "keep-first"
    [row] = node.instances().values()
    assert row["digest"].startswith("sha256:")
    assert len(list((node.storage / "objects").rglob("*.dcm"))) == 1


def test_duplicate_policy_reject_and_replace(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(storage={"duplicate_policy": "reject"}).start()
    a = tmp_path / "a.dcm"
    ds = with_new_uids(get_testdata_file("CT_small.dcm"), a)
    storescu(node.port, [a])
    ds.PatientName = "Changed"
    b = tmp_path / "b.dcm"
    ds.save_as(b, enforce_file_format=True)
    r = storescu(node.port, [b], check=False, extra=["-v"])
    assert r.returncode != 0
    assert "Error: CannotUnderstand" in r.stderr  # dcmtk's name for our 0xC004
    [refused] = node.audit("store-refused")
    assert refused["detail"]["status"] == "0xC004"
    node.stop()
    node2 = node_factory(storage={"duplicate_policy": "replace"}).start()
    storescu(node2.port, [b])
    [row] = node2.instances().values()
    assert str(pydicom.dcmread(node2.storage / row["path"]).PatientName) == "Changed"
    assert len(list((node2.storage / "objects").rglob("*.dcm"))) == 1


def test_concurrent_associations(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """4 senders × 1 study each at once; and one study spread over 3 associations."""
    batches = []
    for s in range(4):
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        files = []
        for i in range(10):
            f = tmp_path / f"s{s}_{i}.dcm"
            with_new_uids(get_testdata_file("CT_small.dcm"), f, study_uid=study,
                          series_uid=series)
            files.append(f)
        batches.append(files)
    spread_study = pydicom.uid.generate_uid()
    for a in range(3):
        files = []
        for i in range(5):
            f = tmp_path / f"spread{a}_{i}.dcm"
            with_new_uids(get_testdata_file("CT_small.dcm"), f, study_uid=spread_study)
            files.append(f)
        batches.append(files)
    env = dcmtk_env()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", "DICOMNODE", "-aet", f"SENDER{k}",
                               "127.0.0.1", str(node.port), *map(str, b)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, b in enumerate(batches)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert len(node.instances()) == 4 * 10 + 3 * 5
    wait_until(lambda: len(node.completions()) == 5, what="5 completions")
    by_study = {c["study_uid"]: c for c in node.completions()}
    assert by_study[spread_study]["num_instances"] == 15
    assert len(node.completions()) == 5  # one completion each, the spread study included
    senders = {e["source_aet"] for e in node.audit("instances-received")}
    assert senders == {f"SENDER{k}" for k in range(7)}
    # every sender released properly: none recorded as aborted (the peer's close can race
    # pynetdicom's own "released" mark)
    assert {e["detail"]["ended"] for e in node.audit("instances-received")} == {"released"}
    assert os.listdir(node.storage / "tmp") == []


def test_open_association_holds_completion_back(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Quiet for longer than quiet_seconds, but the sender's association is still open."""
    from tests.helpers import verbatim_scu

    study = pydicom.uid.generate_uid()
    files = []
    for i in range(2):
        f = tmp_path / f"{i}.dcm"
        with_new_uids(get_testdata_file("CT_small.dcm"), f, study_uid=study)
        files.append(f)
    ae = verbatim_scu("SLOWSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    for f in files:
        assert assoc.send_c_store(f).Status == 0
    import time

    time.sleep(3.0)  # three quiet periods
    assert node.completions() == []
    assoc.release()
    wait_until(lambda: node.completions(), what="completion after release")
    assert node.completions()[0]["num_instances"] == 2


def test_busy_node_rejects_and_audits(node_factory) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import verbatim_scu

    node = node_factory(node={"max_associations": 1}).start()
    ae = verbatim_scu("FIRST")
    ae.add_requested_context("1.2.840.10008.1.1")
    # the harness's readiness probe (a bare TCP connect) may hold the only slot for a few
    # milliseconds more under load: retry until it is gone
    first = wait_until(lambda: (lambda a: a if a.is_established else None)(
        ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")), timeout=10,
        what="the first association")
    second = echoscu(node.port, aet="SECOND")
    assert second.returncode != 0
    first.release()
    rejected = node.audit("association-rejected")
    rej = rejected[-1]
    assert rej["source_aet"] == "SECOND" and "max_associations" in rej["detail"]["reason"]
    assert echoscu(node.port).returncode == 0  # capacity back once the first one is gone


def test_receiver_processes_share_concurrent_senders(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """node.receiver_processes: 2 — four senders at once are spread over the node and its
    receiver worker; every instance stored bit-exact and indexed, one completion per study,
    the audit chain intact (two processes appending), and SIGTERM stops both."""
    import psutil

    node = node_factory(node={"receiver_processes": 2}).start()
    node.receiver_workers_ready()
    batches, studies = [], []
    for s in range(4):
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        studies.append(study)
        files = []
        for i in range(12):
            f = tmp_path / f"s{s}_{i}.dcm"
            # a 512² CT without trailing padding (storescu drops CT_small's (FFFC,FFFC))
            with_new_uids(_sample("693_UNCR.dcm"), f, study_uid=study, series_uid=series,
                          InstanceNumber=i + 1)
            files.append(f)
        batches.append(files)
    env = dcmtk_env()
    # -xe: explicit VR little endian only, as the files are (storescu would otherwise
    # convert them to the implicit VR the node lists first), so stored bytes must be the files'
    procs = [subprocess.Popen([dcmtk("storescu"), "-xe", "-aec", "DICOMNODE", "-aet",
                               f"SENDER{k}", "127.0.0.1", str(node.port), *map(str, b)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, b in enumerate(batches)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    inst = node.instances()
    assert len(inst) == 48
    for f in (f for b in batches for f in b):
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert split_part10(node.storage / inst[sop]["path"])[1] == split_part10(f)[1]
    wait_until(lambda: len(node.completions()) == 4, what="4 completions")
    assert sorted(c["study_uid"] for c in node.completions()) == sorted(studies)
    assert all(c["num_instances"] == 12 for c in node.completions())
    pids = {e["detail"]["pid"] for e in node.audit("association-accepted")
            if e["source_aet"].startswith("SENDER")}
    assert node.proc.pid in pids and len(pids) == 2, pids  # both processes received
    [worker] = pids - {node.proc.pid}
    assert psutil.Process(worker).ppid() == node.proc.pid
    assert {e["detail"]["ended"] for e in node.audit("instances-received")} == {"released"}
    assert node.cli("audit", "verify").returncode == 0
    assert node.terminate(timeout=60) == 0
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"
    assert "Traceback" not in node.log()


def test_max_associations_is_shared_by_receiver_processes(node_factory) -> None:  # type: ignore[no-untyped-def]
    """node.max_associations: 2 over node.receiver_processes: 2 — one association each; a
    third at once is rejected as busy (each process alone would have taken two)."""
    node = node_factory(node={"max_associations": 2, "receiver_processes": 2}).start()
    node.receiver_workers_ready()
    held = []
    for aet in ("FIRST", "SECOND"):
        ae = verbatim_scu(aet)
        ae.add_requested_context("1.2.840.10008.1.1")
        # the harness's readiness probe may hold a slot for a few milliseconds more
        try:
            held.append(wait_until(lambda ae=ae: (lambda a: a if a.is_established else None)(
                ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")), timeout=10,
                what=f"association {aet}"))
        except AssertionError as e:  # seen once in CI (PostgreSQL): say what held the slots
            seen = [(x["event_type"], x["source_aet"], x["detail"].get("pid"))
                    for x in node.audit() if x["event_type"].startswith("association")]
            raise AssertionError(f"{e}\naudit: {seen[:20]}\nlog:\n{node.log()[-3000:]}") from e
    pids = {e["detail"]["pid"] for e in node.audit("association-accepted")}
    assert len(pids) == 2  # one in the node, one in the worker
    assert echoscu(node.port, aet="THIRD").returncode != 0
    rej = [e for e in node.audit("association-rejected") if e["source_aet"] == "THIRD"]
    assert rej and "max_associations" in rej[-1]["detail"]["reason"]
    for a in held:
        a.release()
    wait_until(lambda: echoscu(node.port, aet="FOURTH").returncode == 0, timeout=10,
               what="capacity back")
