"""Synthetic studies for tests, benchmarks and demos (no patient data anywhere).

Data made here is labelled as synthetic in PatientName/SeriesDescription. The CLI's
``dicomnode simulate`` (raw CT projections, head/chest CT with ground truth) will build on this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ellipse_phantom(shape: tuple[int, int, int], seed: int = 7) -> np.ndarray:
    """HU volume [slice, row, column]: body ellipse (40 HU) with noise and a 700 HU 'bone'."""
    n, rows, cols = shape
    yy, xx = np.mgrid[-1:1:rows * 1j, -1:1:cols * 1j]
    body = (xx / 0.85) ** 2 + (yy / 0.65) ** 2 < 1
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=np.float32)
    for i in range(n):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, (rows, cols))
        hu[((xx - 0.3) ** 2 + (yy + 0.1) ** 2) < 0.01 * (1 + np.sin(i / 20))] = 700
        out[i] = hu
    return out


def write_ct_series(out: Path, hu: np.ndarray | None = None, *, n: int = 8, size: int = 64,
                    pixel_mm: float = 0.9765625, slice_mm: float = 1.0,
                    study_uid: str | None = None, series_description: str = "SYNTHETIC CT",
                    patient_id: str = "SYNTH001",
                    hu_fn: Callable[[tuple[int, int, int]], np.ndarray] | None = None,
                    z_mm: Sequence[float] | None = None, patient_name: str = "Synthetic^Phantom",
                    ) -> list[Path]:
    """Write a CT Image Storage series, one file per slice (slice k at z = -k·slice_mm, or
    at ``z_mm[k]``)."""
    if hu is None:
        hu = (hu_fn or ellipse_phantom)((n, size, size))
    n, rows, cols = hu.shape
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"ct{i:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid, series, frame)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            patient_name, patient_id, "19700101", "O")
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = (
            "20261121", "080000", "SYN1", "1")
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = (
            "", "CT", 1, i + 1)
        ds.SeriesDescription, ds.Manufacturer = series_description, "dicomnode-simulator"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        half = (cols - 1) / 2 * pixel_mm
        ds.ImagePositionPatient = [-half, -half, -i * slice_mm if z_mm is None
                                   else round(float(z_mm[i]), 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [pixel_mm, pixel_mm], slice_mm
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = 120, 1, "HFS"
        ds.PixelData = np.clip(np.rint(hu[i] + 1024), 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
