"""The command line as an admin uses it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.helpers import storescu, with_new_uids


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True,
                          text=True, timeout=120)


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("node:\n  port: 99999\nstorage:\n  min_free: 5\n")
    for cmd in (["serve"], ["studies"], ["audit", "verify"], ["db", "upgrade"]):
        r = run(*cmd, "--config", str(f))
        assert r.returncode == 2, cmd
        assert "node.port" in r.stderr and "storage.min_free: unknown key" in r.stderr
        assert "Traceback" not in r.stderr


def test_echo_studies_and_db_commands(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok = node.cli("echo", "127.0.0.1", str(node.port), "--aet", "DICOMNODE")
    assert "success" in ok.stdout
    bad = node.cli("echo", "127.0.0.1", str(node.port), "--aet", "WRONG_AE", check=False)
    assert bad.returncode == 1 and "echo failed" in bad.stderr
    f = tmp_path / "ct.dcm"
    ds = with_new_uids(get_testdata_file("CT_small.dcm"), f)
    storescu(node.port, [f])
    table = node.cli("studies").stdout
    assert ds.StudyInstanceUID in table and "CompressedSamples^CT1" in table
    [study] = json.loads(node.cli("studies", "--json").stdout)
    [inst] = study["series"][0]["instances"]
    assert inst["sop_instance_uid"] == ds.SOPInstanceUID
    assert inst["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    assert inst["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2" and inst["size"] > 30000
    assert study["state"] in ("receiving", "complete")  # the quiet period may have passed
    assert (study["completed_at"] is None) == (study["state"] == "receiving")
    assert (study["patient_id"], study["revision"], study["num_instances"]) == (
        ds.PatientID, 1, 1)
    from alembic.script import ScriptDirectory

    from dicomnode.database import MIGRATIONS_DIR

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert f"revision {head}" in node.cli("db", "upgrade").stdout
    assert node.cli("db", "current").stdout.strip() == head
    events = json.loads(node.cli("audit", "list", "--json", "--event", "110113").stdout)
    assert {e["event_type"] for e in events} == {"association-accepted", "association-rejected"}
    since = json.loads(node.cli("audit", "list", "--json", "--since", "2999-01-01").stdout)
    assert since == []
    bad_since = node.cli("audit", "list", "--since", "yesterday", check=False)
    assert bad_since.returncode == 2 and "ISO 8601" in bad_since.stderr


def test_simulate_ct_writes_readable_raw_data(tmp_path: Path) -> None:
    from dicomnode.formats import ctpd

    def simulate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomnode", "simulate", "ct", *args],
                              capture_output=True, text=True, timeout=120)

    r = simulate("--out", str(tmp_path / "cone"), "--geometry", "cone", "--views", "24",
                 "--detector-pixels", "48", "--rows", "8", "--detector", "flat",
                 "--noise-i0", "1e5")
    assert r.returncode == 0, r.stderr
    assert "24 cone-beam projections (8×48, flat)" in r.stdout
    files = sorted((tmp_path / "cone").glob("*.dcm"))
    g, sino = ctpd.read_scan([pydicom.dcmread(f) for f in files])
    assert (g.kind, g.detector, g.views, g.rows, g.columns) == ("cone", "flat", 24, 8, 48)
    assert sino.max() > 1.0 and g.mu_water == pytest.approx(0.0192)
    first = pydicom.dcmread(files[0])
    assert first.PatientName == "Synthetic^Phantom" and first.Modality == "CT"
    hu = np.zeros((32, 32), np.float32)
    np.save(tmp_path / "p.npy", hu)
    assert simulate("--out", str(tmp_path / "npy"), "--phantom", str(tmp_path / "p.npy"),
                    "--geometry", "parallel", "--views", "10",
                    "--detector-pixels", "16").returncode == 0
    r = simulate("--out", str(tmp_path / "helix"), "--geometry", "helical", "--views", "12",
                 "--detector-pixels", "32", "--rows", "4", "--turns", "2", "--pitch", "0.8")
    assert r.returncode == 0, r.stderr
    assert "24 helical cone-beam projections (4×32, pitch 0.80" in r.stdout
    g, _ = ctpd.read_scan([pydicom.dcmread(f) for f in sorted((tmp_path / "helix").glob("*"))])
    assert g.helical and g.pitch == pytest.approx(0.8, rel=1e-3)
    bad = simulate("--out", str(tmp_path / "x"), "--geometry", "helical", "--rows", "1")
    assert bad.returncode == 2 and "two or more rows" in bad.stderr
    bad = simulate("--out", str(tmp_path / "x"), "--geometry", "helix")
    assert bad.returncode == 2 and "parallel, fan, cone or helical" in bad.stderr
    bad = simulate("--out", str(tmp_path / "x"), "--phantom", "nope.npy")
    assert bad.returncode == 2 and "neither shepp-logan" in bad.stderr
    bad = simulate("--out", str(tmp_path / "x"), "--geometry", "fan", "--rows", "4")
    assert bad.returncode == 2 and "one detector row" in bad.stderr


def test_every_simulator_writes_conformant_dicom(tmp_path: Path) -> None:
    """What `dicomnode simulate` writes is DICOM the node made: dciodvfy must pass it too."""
    from tests.validators import dciodvfy_errors

    for i, args in enumerate((
                 ["ct", "--geometry", "fan", "--views", "8", "--detector-pixels", "32"],
                 ["ct", "--geometry", "cone", "--views", "8", "--detector-pixels", "32",
                  "--rows", "4", "--detector", "flat"],
                 ["head-ct", "--slices", "3", "--size", "64", "--hemorrhage", "iph"],
                 ["chest-ct", "--slices", "3", "--size", "64", "--nodules", "0"],
                 ["head-ct", "--slices", "3", "--size", "64", "--orientation", "tilted"],
                 ["chest-ct", "--slices", "3", "--size", "64", "--nodules", "0",
                  "--orientation", "sagittal"])):
        out = tmp_path / args[0] / str(i)
        r = run("simulate", *args, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert "Warning" not in r.stderr  # e.g. numpy on a lesion outside a short slab
        first = sorted(out.glob("*.dcm"))[0]
        assert dciodvfy_errors(first) == [], (args, first)
    tilted = pydicom.dcmread(sorted((tmp_path / "head-ct" / "4").glob("*.dcm"))[0])
    assert 10 <= abs(float(tilted.GantryDetectorTilt)) <= 25
    sagittal = pydicom.dcmread(sorted((tmp_path / "chest-ct" / "5").glob("*.dcm"))[0])
    assert [float(v) for v in sagittal.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    bad = run("simulate", "head-ct", "--orientation", "diagonal", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not one of axial, tilted" in bad.stderr
