"""First use, as a new user meets the node (issue 19, point 7): what `dicomnode serve` prints
before anything useful, and `dicomnode audit list` in an 80-column terminal."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.helpers import echoscu, storescu, wait_until, with_new_uids

ALEMBIC_NOISE = ("Context impl", "Will assume", "setup plugin", "Running upgrade",
                 "alembic")


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from dicomnode.database import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head
    return head


# --- serve: one line about the schema, not Alembic's chatter ---------------------------------

def test_serve_says_the_schema_revision_in_one_line(node_factory) -> None:  # type: ignore[no-untyped-def]
    head = _head()
    first = node_factory().start()
    first.stop()
    second = node_factory().start()  # same database and log file: the schema exists now
    log = second.log()
    lines = [ln for ln in log.splitlines() if "database schema" in ln]
    assert lines[0].endswith(f"database schema at revision {head} (head; created)"), lines
    assert lines[1].endswith(f"database schema at revision {head} (head)"), lines
    assert len(lines) == 2
    noise = [ln for ln in log.splitlines() if any(n in ln for n in ALEMBIC_NOISE)]
    assert noise == []
    # the schema line comes before the node says it listens
    assert log.index("database schema at revision") < log.index("listening as")


def test_upgrade_from_an_older_revision_is_one_line(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from dicomnode.database import current_revision, upgrade

    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    caplog.set_level(logging.INFO)
    assert upgrade(url, "0003") == "0003"
    caplog.clear()
    head = _head()
    assert upgrade(url) == head == current_revision(url)
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert messages == [("dicomnode.database",
                         f"database schema at revision {head} (head; upgraded from 0003)")]
    # the quieting is undone afterwards: alembic's logger is as it was
    assert logging.getLogger("alembic").level == logging.NOTSET


# --- audit list in 80 columns -----------------------------------------------------------------

def _audit_cli(node, *args: str, columns: int) -> str:  # type: ignore[no-untyped-def]
    env = {**os.environ, **node.env, "COLUMNS": str(columns)}
    env.pop("LINES", None)
    p = subprocess.run([sys.executable, "-m", "dicomnode", "audit", "list", *args,
                        "--config", str(node.config_path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_audit_list_fits_80_columns(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE, _config

    good = tmp_path / "ct.dcm"
    ds = with_new_uids(get_testdata_file("CT_small.dcm"), good)
    storescu(node.port, [good], aet="CT_SCANNER_ROOM1")  # a 16-character AE title
    # a refused instance (a file cut short, re-encoded by pynetdicom's SCU) and a rejection
    half = tmp_path / "half.dcm"
    raw = good.read_bytes()
    half.write_bytes(raw[: len(raw) // 2])
    _config.STORE_SEND_CHUNKED_DATASET = False
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(str(half)).Status == 0xC001
    finally:
        assoc.release()
    assert echoscu(node.port, aec="NOT_US").returncode != 0
    # the study completes after the quiet period: list once nothing more is coming
    wait_until(lambda: node.audit("no-route"), what="the study to complete and be routed")

    events = json.loads(_audit_cli(node, "--json", columns=80))
    kinds = {e["event_type"] for e in events}
    assert {"application-start", "association-accepted", "instances-received",
            "store-refused", "association-rejected"} <= kinds

    out = _audit_cli(node, columns=80)
    lines = out.splitlines()
    too_wide = [ln for ln in lines if len(ln) > 80]
    assert too_wide == []
    assert "…" not in out  # nothing cut short with an ellipsis
    header = lines[0].split()
    assert header[:5] == ["time", "(UTC)", "event", "outcome", "who"] and header[-1] == "summary"
    # one row per event, its type whole in the event column, time HH:MM:SS under its date
    rows = [ln.split() for ln in lines if re.match(r"\d\d:\d\d:\d\d ", ln)]
    assert [r[1] for r in rows] == [e["event_type"] for e in events]
    assert re.search(r"^\d{4}-\d\d-\d\d\s*$", lines[1])
    by_type = {r[1]: r for r in rows}
    refused = by_type["store-refused"]
    assert refused[2:5] == ["serious", "PYSCU", "0xC001"] and refused[5] == "truncated:"
    assert by_type["association-rejected"][2:4] == ["minor", "ECHOSCU"]
    assert "NOT_US" in out
    assert any(r[1] == "instances-received" and r[3] == "CT_SCANNER_ROOM1" and
               r[4:6] == ["1", "stored,"] for r in rows)
    assert by_type["application-start"][2] == "ok"

    # --wide: every column, as before
    wide = _audit_cli(node, "--wide", columns=300)
    for column in ("seq", "time (UTC)", "event", "type", "outcome", "who", "detail"):
        assert column in wide
    assert "110104 DICOM Instances Transferred" in wide
    assert '"reason": "truncated: Pixel Data holds' in wide
    assert re.search(r"│ 1 +│ \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} +│", wide)
