"""Synthetic studies for tests, benchmarks and demos (no patient data anywhere).

Data made here is labelled as synthetic in PatientName/SeriesDescription. ``ct_dataset`` is
the one CT header every simulator writes (``simulate_ct``, ``simulate_head``,
``simulate_chest`` via ``write_ct_series``), so all of them are dciodvfy-clean alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.package.series import ds_value


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


def ct_dataset(path: Path, study_uid: str, series_uid: str, frame_uid: str, *,
               patient_id: str, patient_name: str, accession: str, series_number: int,
               instance_number: int, description: str) -> FileDataset:
    """The header every synthetic CT Image Storage instance shares (patient, study, series,
    equipment, image plane orientation, pixel description); the caller adds position, spacing,
    rescale and pixels. Conformant as written: dciodvfy-clean (tests/test_cli.py)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        study_uid, series_uid, frame_uid)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        patient_name, patient_id, "19700101", "O")
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = (
        "20261121", "080000", accession, "1")
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = (
        "", "CT", series_number, instance_number)
    ds.Laterality = ""  # Type 2C: dciodvfy cannot know the body part is unpaired
    ds.SeriesDescription, ds.Manufacturer = description, "dicomnode-simulator"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = 120, 1, "HFS"
    return ds


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
    half = (cols - 1) / 2 * pixel_mm
    for i in range(n):
        path = out / f"ct{i:04d}.dcm"
        ds = ct_dataset(path, study_uid, series, frame, patient_id=patient_id,
                        patient_name=patient_name, accession="SYN1", series_number=1,
                        instance_number=i + 1, description=series_description)
        ds.ImagePositionPatient = [ds_value(-half), ds_value(-half),
                                   ds_value(-i * slice_mm if z_mm is None else z_mm[i])]
        ds.PixelSpacing = [ds_value(pixel_mm), ds_value(pixel_mm)]
        ds.SliceThickness = ds_value(slice_mm)
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.clip(np.rint(hu[i] + 1024), 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
