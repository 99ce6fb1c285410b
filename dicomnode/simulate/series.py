"""Synthetic CT series (no patient data anywhere), and the CT header every simulator shares.

Data made here is labelled as synthetic in PatientName/SeriesDescription. ``ct_dataset`` is
the one CT header every simulator writes (``simulate.ct``, ``simulate.head``,
``simulate.chest`` via ``write_ct_series``), so all of them are dciodvfy-clean alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


ORIENTATIONS = ("axial", "tilted", "oblique", "coronal", "sagittal")


@dataclass(frozen=True)
class SlicePlan:
    """Where a simulator's slices lie (LPS mm): in-plane directions, the step from one slice to
    the next and the centre of the first slice. ``tilted`` is a gantry-tilted acquisition: the
    planes lean about the patient's left–right axis and are stacked along the table (z), so the
    stack is sheared, as real tilted head CTs are; ``oblique`` planes are turned about two axes
    and stacked along their normal; ``coronal``/``sagittal`` are the usual planes."""

    orientation: str
    row: tuple[float, float, float]
    col: tuple[float, float, float]
    step: tuple[float, float, float]
    centre0: tuple[float, float, float]
    thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    def centre(self, k: float) -> np.ndarray:
        return np.asarray(self.centre0) + k * np.asarray(self.step)

    def points(self, k: int, yx: np.ndarray, depth: float = 0.0) -> np.ndarray:
        """Patient coordinates [rows, cols, 3] of slice ``k``'s pixel centres, ``depth`` mm
        along the normal (to integrate over the slice's thickness)."""
        yy, xx = np.meshgrid(yx, yx, indexing="ij")
        return np.asarray(self.centre(k) + depth * self.normal
                          + xx[..., None] * np.asarray(self.row)
                          + yy[..., None] * np.asarray(self.col))

    def geometry(self, shape: tuple[int, int, int], pixel_mm: float,
                 frame_of_reference_uid: str = "") -> Any:
        from dicomnode.plugin import Geometry

        half = (shape[2] - 1) / 2 * pixel_mm
        origin = self.centre(0) - half * np.asarray(self.row) - half * np.asarray(self.col)
        step = np.asarray(self.step)
        return Geometry(origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
                        row_direction=self.row, column_direction=self.col,
                        slice_direction=tuple(float(v) for v in step / np.linalg.norm(step)),  # type: ignore[arg-type]
                        spacing=(float(np.linalg.norm(step)), pixel_mm, pixel_mm),
                        shape=shape, frame_of_reference_uid=frame_of_reference_uid)


def _unit(v: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=float)
    a = a / np.linalg.norm(a)
    return (float(a[0]), float(a[1]), float(a[2]))


def slice_plan(orientation: str, rng: np.random.Generator, slices: int, slice_mm: float,
               offset_mm: float = 0.0) -> SlicePlan:
    """A :class:`SlicePlan` of ``slices`` planes ``slice_mm`` apart (along their normal),
    centred ``offset_mm`` along the normal from the origin; tilt angles are drawn from
    ``rng``."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {', '.join(ORIENTATIONS)}")
    row: tuple[float, float, float]
    col: tuple[float, float, float]
    if orientation == "axial":
        row, col = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    elif orientation == "coronal":
        row, col = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
    elif orientation == "sagittal":
        row, col = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
    elif orientation == "tilted":  # gantry tilt 10–25° either way, about the x axis
        t = np.radians(rng.uniform(10, 25) * rng.choice([-1, 1]))
        row, col = (1.0, 0.0, 0.0), (0.0, float(np.cos(t)), float(np.sin(t)))
    else:  # oblique: about x by 10–25° and about y by 5–15°, either way: at most 29° off
        # axial in all (an angled acquisition or reconstruction stays within the ±30° a
        # gantry tilts; steeper planes are what coronal/sagittal stand for)
        a = np.radians(rng.uniform(10, 25) * rng.choice([-1, 1]))
        b = np.radians(rng.uniform(5, 15) * rng.choice([-1, 1]))
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        m = ry @ rx
        row, col = _unit(m[:, 0]), _unit(m[:, 1])
    normal = np.cross(row, col)
    if orientation == "tilted":  # planes slice_mm apart, the table moves along z
        step = np.array([0.0, 0.0, slice_mm / normal[2]])
    else:
        step = slice_mm * normal
    c0 = offset_mm * normal - (slices - 1) / 2 * step
    return SlicePlan(orientation, row, col, (float(step[0]), float(step[1]), float(step[2])),
                     (float(c0[0]), float(c0[1]), float(c0[2])), slice_mm)


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
                    plan: SlicePlan | None = None) -> list[Path]:
    """Write a CT Image Storage series, one file per slice (slice k at z = -k·slice_mm, or
    at ``z_mm[k]``, or where ``plan`` puts it)."""
    if hu is None:
        hu = (hu_fn or ellipse_phantom)((n, size, size))
    n, rows, cols = hu.shape
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    files = []
    half = (cols - 1) / 2 * pixel_mm
    geometry = plan.geometry((n, rows, cols), pixel_mm) if plan is not None else None
    for i in range(n):
        path = out / f"ct{i:04d}.dcm"
        ds = ct_dataset(path, study_uid, series, frame, patient_id=patient_id,
                        patient_name=patient_name, accession="SYN1", series_number=1,
                        instance_number=i + 1, description=series_description)
        if plan is not None and geometry is not None:
            ds.ImageOrientationPatient = [ds_value(v) for v in (*plan.row, *plan.col)]
            ds.ImagePositionPatient = [ds_value(v) for v in geometry.to_patient([i, 0, 0])]
            if plan.orientation != "axial":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if plan.orientation == "tilted"
                                else "REFORMATTED"]
            if plan.orientation == "tilted":  # nominal degrees (DICOM: not for computation;
                ds.GantryDetectorTilt = ds_value(float(np.degrees(  # the geometry is in IPP/IOP)
                    np.arctan2(-plan.col[2], plan.col[1]))))
        else:
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
