"""End to end: ``dicomnode simulate ct`` → dcmtk storescu → node → ct-recon → Orthanc.

A scan of raw projections becomes a CT series in PACS that passes dciodvfy, sits in the raw
data's study and frame of reference, points at every projection it came from, and has the
phantom's HU values. Bad raw data (views missing) fails the job with the reason; nothing is sent.
"""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.helpers import storescu, wait_until
from tests.test_ct_recon import FOV, TRUTH, N, metrics
from tests.test_pipeline import make_node, pipeline_config, wait_jobs
from tests.validators import dciodvfy_errors

RECON = {"name": "raw-ct", "level": "series",
         "match": {"Modality": "CT", "SeriesDescription": {"regex": "DICOM-CT-PD"}},
         "pipeline": [{"plugin": "ct-recon",
                       "params": {"matrix": N, "fov_mm": FOV, "filter": "shepp-logan"}}],
         "send_to": ["pacs"]}


def simulate(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "dicomnode", "simulate", "ct", "--out", str(out),
           "--geometry", "fan", "--views", "180", "--detector-pixels", "160", *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    return sorted(glob.glob(str(out / "*.dcm")))


def test_raw_projections_to_a_valid_ct_series_in_orthanc(node_factory, orthanc, generated,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    cfg = pipeline_config(orthanc, [RECON])
    cfg["assemble"] = {"level": "series", "quiet_seconds": 1}
    node = make_node(node_factory, cfg)
    files = generated("raw-ct-fan", simulate)  # the same scan for SQLite and PostgreSQL
    storescu(node.port, files, aet="CT_SCANNER")
    wait_until(lambda: len(orthanc.series()) == 1, timeout=120, what="recon series in Orthanc")
    [series] = orthanc.series()
    [inst] = series["Instances"]
    path = orthanc.instance_file(inst, tmp_path / "recon.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    raw = pydicom.dcmread(files[0])
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.StudyInstanceUID == raw.StudyInstanceUID and ds.PatientID == raw.PatientID
    assert ds.FrameOfReferenceUID == raw.FrameOfReferenceUID
    refs = {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence}
    assert refs == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert ds.ConvolutionKernel == "SHEPP-LOGAN" and float(ds.ReconstructionDiameter) == FOV
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([FOV / N, FOV / N])
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(
        [-(N - 1) / 2 * FOV / N, -(N - 1) / 2 * FOV / N, 0.0])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert metrics(hu.astype(np.float64), TRUTH)["rmse"] < 60
    [job] = node.jobs()
    assert job["state"] == "succeeded" and job["deliveries"][0]["state"] == "sent"

    # the same scan with views missing: the job fails with the reason, nothing is sent
    broken = [f for f in generated("raw-ct-fan-noisy", lambda d: simulate(d, "--noise-i0", "1e5"))
              if not f.endswith(("proj00050.dcm", "proj00051.dcm"))]
    storescu(node.port, broken, aet="CT_SCANNER")
    jobs = wait_jobs(node, lambda js: any(j["state"] in ("failed", "dead") for j in js),
                     "the broken scan's job to fail")
    failed = [j for j in jobs if j["state"] in ("failed", "dead")]
    assert failed and "missing views" in failed[0]["reason"]
    assert len(orthanc.series()) == 1
