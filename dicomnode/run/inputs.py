"""Build a plugin's :class:`~dicomnode.plugin.SeriesInput` from the stored datasets of a series.

Slices are sorted along the slice normal (not by InstanceNumber, which scanners get wrong);
inconsistent geometry is refused with a reason a radiologist or physicist can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.plugin import Geometry, NotApplicable, PluginError, SeriesInput

_TOL_MM = 1e-3


def _floats(ds: Any, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise NotApplicable(f"{keyword} missing or malformed in instance {ds.SOPInstanceUID}")
    return np.asarray([float(v) for v in value])


_NATIVE_LE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


def stored_values(ds: Any) -> np.ndarray:
    """The stored pixel values of a single-frame grayscale image, as pydicom's ``pixel_array``
    gives them. Native little-endian data is read in place (a view of the bytes dcmread
    already holds), the bits above BitsStored cleared or sign-extended only when one is set;
    anything else (compressed, big endian, multi-frame, colour) goes through pydicom."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    bits = int(ds.get("BitsAllocated") or 0)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    data = ds.get("PixelData")
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if (syntax not in _NATIVE_LE or bits not in (8, 16, 32)
            or int(ds.get("SamplesPerPixel", 1)) != 1
            or int(ds.get("NumberOfFrames") or 1) != 1 or not isinstance(data, bytes)
            or len(data) < rows * cols * bits // 8 or rows * cols == 0):
        return np.asarray(ds.pixel_array)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    raw = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    stored = int(ds.get("BitsStored") or bits)
    if 0 < stored < bits:
        if signed:
            lo, hi = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
            if raw.min() < lo or raw.max() > hi:
                shift = dtype.type(bits - stored)
                raw = (raw << shift) >> shift
        elif raw.max() >> stored:
            raw = raw & dtype.type((1 << stored) - 1)
    return raw


def _series(ordered: Sequence[Any], geometry: Geometry, load_pixels: bool) -> SeriesInput:
    """The SeriesInput of datasets already in order; pixels (rescaled, float32) on demand."""
    first = ordered[0]

    def pixels() -> np.ndarray:
        out = np.empty(geometry.shape, dtype=np.float32)
        for k, ds in enumerate(ordered):
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            plane = out[k]
            plane[...] = stored_values(ds)  # one conversion pass, no temporaries
            if slope != 1.0:
                plane *= np.float32(slope)
            if intercept != 0.0:
                plane += np.float32(intercept)
        return out

    return SeriesInput(
        series_uid=str(first.SeriesInstanceUID), modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in ordered), geometry=geometry,
        datasets=tuple(ordered), _pixels=pixels if load_pixels else None)


def series_input(datasets: Sequence[Any], load_pixels: bool = True) -> SeriesInput:
    """Sort, check and describe one single-frame image series."""
    if not datasets:
        raise NotApplicable("empty series")
    first = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", 6)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for ds in datasets[1:]:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6), iop, atol=1e-4):
            raise PluginError("slices have different orientations (mixed series?)")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise PluginError("slices have different matrix sizes (mixed series?)")
    ordered = sorted(datasets, key=lambda d: float(_floats(d, "ImagePositionPatient", 3) @ normal))
    positions = np.array([_floats(d, "ImagePositionPatient", 3) for d in ordered])
    spacing_rc = _floats(first, "PixelSpacing", 2)
    slice_dir = normal
    if len(ordered) > 1:
        steps = np.diff(positions @ normal)
        if np.any(steps < _TOL_MM):
            raise PluginError("two slices at the same position (duplicate or mixed series)")
        gap = float(np.median(steps))
        if np.max(np.abs(steps - gap)) > max(0.01 * gap, 0.01):
            raise PluginError(f"uneven slice spacing ({steps.min():.3f}–{steps.max():.3f} mm)")
        # slices stack along the normal, or, with gantry tilt, along the table: then every
        # slice is shifted in its plane by the same step (a shear); anything else is refused
        step = (positions[-1] - positions[0]) / (len(ordered) - 1)
        off = positions - positions[0] - np.outer(np.arange(len(ordered)), step)
        if np.max(np.abs(off)) > max(0.01 * gap, 0.05):
            raise PluginError("slice positions do not lie on one line (mixed series, or a "
                              "varying gantry tilt)")
        slice_spacing = float(np.linalg.norm(step))
        slice_dir = step / slice_spacing
        tilt = float(np.degrees(np.arccos(np.clip(slice_dir @ normal, -1.0, 1.0))))
        if tilt > 45:
            raise PluginError(f"slices stacked {tilt:.0f}° off their normal: not a gantry tilt "
                              "this node accepts (≤ 45°)")
        if tilt < 0.01:
            slice_dir = normal  # exact, no rounding noise
    else:
        slice_spacing = float(first.get("SliceThickness") or 1.0)
    geometry = Geometry(
        origin=tuple(float(x) for x in positions[0]),  # type: ignore[arg-type]
        row_direction=tuple(float(x) for x in row_dir),  # type: ignore[arg-type]
        column_direction=tuple(float(x) for x in col_dir),  # type: ignore[arg-type]
        slice_direction=tuple(float(x) for x in slice_dir),  # type: ignore[arg-type]
        spacing=(slice_spacing, float(spacing_rc[0]), float(spacing_rc[1])),
        shape=(len(ordered), int(first.Rows), int(first.Columns)),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
    )

    return _series(ordered, geometry, load_pixels)


def projection_input(datasets: Sequence[Any]) -> SeriesInput:
    """A raw projection series (``Accepts.projections``): datasets in acquisition order, no
    image-plane checks; the geometry is the projection stack (views, rows, columns) with the
    detector's pixel pitch where the data give one. Reading the scan geometry is the plugin's
    job (for DICOM-CT-PD: :func:`dicomnode.formats.ctpd.read_scan`)."""
    if not datasets:
        raise NotApplicable("empty series")
    ordered = sorted(datasets, key=lambda d: int(d.get("InstanceNumber") or 0))
    first = ordered[0]
    pitch = first.get("PixelSpacing") or (1.0, 1.0)
    try:
        spacing = (1.0, float(pitch[0]), float(pitch[1]))
    except (TypeError, ValueError, IndexError):
        spacing = (1.0, 1.0, 1.0)
    geometry = Geometry(origin=(0.0, 0.0, 0.0), row_direction=(1.0, 0.0, 0.0),
                        column_direction=(0.0, 1.0, 0.0), slice_direction=(0.0, 0.0, 1.0),
                        spacing=spacing if min(spacing) > 0 else (1.0, 1.0, 1.0),
                        shape=(len(ordered), int(first.get("Rows") or 1),
                               int(first.get("Columns") or 1)),
                        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")))

    return _series(ordered, geometry, True)
