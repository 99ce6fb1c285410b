"""The SQL index: group commit across threads, the writers' queue (flock) across processes and
for every SQLite write transaction, migrations from 0003 to head equal to the models."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.audit import AuditLog, EventKind, Outcome, verify_chain
from dicomnode.database import make_engine, make_sessionmaker, upgrade


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
