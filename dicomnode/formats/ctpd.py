"""DICOM-CT-PD: the open format for CT projection data (Chen et al., Med Phys 2015; the format of
the public LDCT-and-Projection-data set). Public API for reconstruction plugins and the
simulator: read a series of projections into one :class:`ScanGeometry` + sinogram, or write one.

One instance per projection (CT Image Storage); pixel values × RescaleSlope + RescaleIntercept
are line integrals of the linear attenuation coefficient (mm⁻¹ × mm, dimensionless). Geometry
lives in private groups 7029/7031/7033/7037/7039/7041, block 0x10 (elements 0x10xx), with the
coordinate conventions of the format:

* the *detector focal centre* is at cylindrical (ρ0, φ0, z0) around the isocentre: x = −ρ0 sin φ0,
  y = ρ0 cos φ0 (rad, mm); the focal spot is that plus the source shifts (Δφ, Δz, Δρ);
* the detector is a cylinder (``CYLINDRICAL``, equiangular columns) or a plane (``FLAT``) at
  ``ConstantRadialDistance`` d0 from the focal centre; element (column X, row Y) of
  ``DetectorCentralElement`` (1-based, as in the format) is on the line focal centre → isocentre;
* column spacing and row spacing are measured at the detector (mm).

``TypeofProjectionGeometry`` is ``FANBEAM`` in the LDCT data (fan with one row, circular cone
beam with several); ``CONEBEAM`` is accepted as a synonym and ``PARALLEL`` is this node's
extension for parallel-beam data (spacings then measured at the isocentre; ρ0 and d0 unused).
``TypeofProjectionData`` ``AXIAL`` (circular) is reconstructed; ``HELICAL`` is refused clearly.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

PRIVATE_CREATOR = "DICOM-CT-PD"


@dataclass(frozen=True)
class _Tag:
    group: int
    element: int  # 0x10xx: block 0x10 of the group
    vr: str
    keyword: str
    vm: int = 1


TAGS = {t.keyword: t for t in (
    _Tag(0x7029, 0x1010, "US", "NumberofDetectorRows"),
    _Tag(0x7029, 0x1011, "US", "NumberofDetectorColumns"),
    _Tag(0x7029, 0x1002, "FL", "DetectorElementTransverseSpacing"),
    _Tag(0x7029, 0x1006, "FL", "DetectorElementAxialSpacing"),
    _Tag(0x7029, 0x100B, "CS", "DetectorShape"),
    _Tag(0x7031, 0x1001, "FL", "DetectorFocalCenterAngularPosition"),
    _Tag(0x7031, 0x1002, "FL", "DetectorFocalCenterAxialPosition"),
    _Tag(0x7031, 0x1003, "FL", "DetectorFocalCenterRadialDistance"),
    _Tag(0x7031, 0x1031, "FL", "ConstantRadialDistance"),
    _Tag(0x7031, 0x1033, "FL", "DetectorCentralElement", 2),
    _Tag(0x7033, 0x100B, "FL", "SourceAngularPositionShift"),
    _Tag(0x7033, 0x100C, "FL", "SourceAxialPositionShift"),
    _Tag(0x7033, 0x100D, "FL", "SourceRadialDistanceShift"),
    _Tag(0x7033, 0x100E, "CS", "FlyingFocalSpotMode"),
    _Tag(0x7033, 0x1013, "US", "NumberofSourceAngularSteps"),
    _Tag(0x7037, 0x1009, "CS", "TypeofProjectionData"),
    _Tag(0x7037, 0x100A, "CS", "TypeofProjectionGeometry"),
    _Tag(0x7041, 0x1001, "DS", "WaterAttenuationCoefficient"),
)}
GROUPS = sorted({t.group for t in TAGS.values()})
PER_VIEW = ("DetectorFocalCenterAngularPosition", "DetectorFocalCenterAxialPosition",
            "DetectorFocalCenterRadialDistance", "SourceAngularPositionShift",
            "SourceAxialPositionShift", "SourceRadialDistanceShift")


class RawDataError(ValueError):
    """The projections cannot be reconstructed as sent; the message says what is wrong."""


@dataclass(frozen=True)
class ScanGeometry:
    """Everything a reconstruction needs to know about one scan: circular, or helical (the
    source moves along z at a constant feed per radian; ``z_per_view`` holds its positions).

    Angles are the source's azimuth φ (rad, unwrapped, in acquisition order); positions in the
    scanner frame (x, y in the gantry plane, z along the table; mm), with the isocentre at the
    origin. ``u0``/``v0`` are 0-based (column, row) indices of the central element.
    """

    kind: str  # "parallel" | "fan" | "cone"
    detector: str  # "flat" | "cylindrical" (ignored for parallel)
    angles: np.ndarray  # [views]
    rows: int
    columns: int
    du: float  # column spacing at the detector (mm); parallel: at the isocentre
    dv: float  # row spacing at the detector (mm)
    u0: float
    v0: float
    sod: float  # source (focal spot) to isocentre, mm (0 for parallel)
    sdd: float  # source to detector, mm (0 for parallel)
    z: float  # axial position of the source (mm); helical: at the first view
    mu_water: float  # mm⁻¹
    z_per_view: np.ndarray | None = None  # helical: source z (mm) of each view

    @property
    def helical(self) -> bool:
        return self.z_per_view is not None

    @property
    def source_z(self) -> np.ndarray:
        """Axial source position (mm) of each view."""
        if self.z_per_view is not None:
            return np.asarray(self.z_per_view, dtype=np.float64)
        return np.full(self.views, self.z, dtype=np.float64)

    @property
    def feed_per_turn(self) -> float:
        """Table feed per rotation (mm, signed; 0 for a circular scan)."""
        if self.z_per_view is None or self.views < 2:
            return 0.0
        zs = self.source_z
        return float((zs[-1] - zs[0]) / (self.angles[-1] - self.angles[0]) * 2 * np.pi)

    @property
    def pitch(self) -> float:
        """Helical pitch: feed per rotation ÷ the detector's z coverage at the isocentre."""
        return abs(self.feed_per_turn) / (self.rows * self.dv / self.magnification)

    @property
    def views(self) -> int:
        return int(self.angles.size)

    @property
    def magnification(self) -> float:
        return 1.0 if self.kind == "parallel" else self.sdd / self.sod

    @property
    def angular_range(self) -> float:
        """Covered azimuth range (rad): span of the angles plus one step."""
        if self.views < 2:
            return 0.0
        step = abs(float(np.median(np.diff(self.angles))))
        return float(abs(self.angles[-1] - self.angles[0]) + step)

    @property
    def fan_half_angle(self) -> float:
        """Half the fan angle δ (rad) covered by the detector columns."""
        if self.kind == "parallel":
            return 0.0
        half = max(self.u0, self.columns - 1 - self.u0) + 0.5
        if self.detector == "cylindrical":
            return half * self.du / self.sdd
        return float(np.arctan(half * self.du / self.sdd))


def _decode(raw: Any, vr: str, vm: int) -> Any:
    """Value of a private element that may have arrived as bytes (implicit VR: UN)."""
    if not isinstance(raw, bytes | bytearray):
        return raw
    if vr == "FL":
        vals = struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4])
        return list(vals) if vm > 1 else vals[0]
    if vr == "US":
        return struct.unpack("<H", raw[:2])[0]
    return raw.decode("ascii", "replace").strip("\0 ")


def get(ds: Dataset, keyword: str) -> Any:
    """A DICOM-CT-PD value by keyword, whatever the private creator string; None if absent."""
    tag = TAGS[keyword]
    elem = ds.get((tag.group, tag.element))
    if elem is None or elem.value in (None, "", b""):
        return None
    value = _decode(elem.value, tag.vr, tag.vm)
    if tag.vr == "DS":
        return float(value if not isinstance(value, str) else value.strip())
    return value


def put(ds: Dataset, keyword: str, value: Any) -> None:
    tag = TAGS[keyword]
    creator_tag = (tag.group, 0x0010)
    if creator_tag not in ds:
        ds.add_new(creator_tag, "LO", PRIVATE_CREATOR)
    if tag.vr == "FL" and tag.vm > 1:
        value = [float(v) for v in value]
    elif tag.vr == "FL":
        value = float(value)
    elif tag.vr == "DS":
        value = f"{float(value):.8g}"
    ds.add_new((tag.group, tag.element), tag.vr, value)


def _require(ds: Dataset, keyword: str) -> Any:
    value = get(ds, keyword)
    if value is None:
        raise RawDataError(f"missing {keyword} ({TAGS[keyword].group:04X},"
                           f"{TAGS[keyword].element:04X}) in projection "
                           f"{ds.get('InstanceNumber', '?')}")
    return value


def is_projection_data(ds: Dataset) -> bool:
    return get(ds, "NumberofDetectorColumns") is not None


def read_scan(datasets: Sequence[Dataset]) -> tuple[ScanGeometry, np.ndarray]:
    """(geometry, sinogram [views, rows, columns] float32 line integrals) of one scan.

    Projections are ordered by acquisition (InstanceNumber); every scan-level value must agree
    across them, angles must advance monotonically by an even step with no gap, so mixed scans,
    missing views and a broken geometry fail here with a message that names the problem.
    """
    ordered, numbers = _in_acquisition_order(datasets)
    first = ordered[0]
    scan, parallel = _scan_values(ordered)
    helical, rows, cols, shape = _detector(scan)
    per_view = {k: np.array([float(get(d, k) or 0.0) for d in ordered]) for k in PER_VIEW}
    missing = [k for k in PER_VIEW[:3] if any(get(d, k) is None for d in ordered)
               and not (parallel and k == "DetectorFocalCenterRadialDistance")]
    if missing:
        raise RawDataError(f"{missing[0]} missing in some projections")
    phi = _source_angles(per_view, first, numbers)
    z = _source_z(per_view, helical, parallel, rows)
    rho = per_view["DetectorFocalCenterRadialDistance"] + per_view["SourceRadialDistanceShift"]
    if not parallel and (np.ptp(rho) > 1e-3 or rho[0] <= 0):
        raise RawDataError("DetectorFocalCenterRadialDistance must be positive and constant")
    central = _require(first, "DetectorCentralElement")
    if not isinstance(central, list | tuple) or len(central) != 2:
        raise RawDataError("DetectorCentralElement must hold two values (column, row)")
    sdd = float(scan["ConstantRadialDistance"] or 0.0)
    if not parallel and sdd <= float(rho[0]):
        raise RawDataError(f"ConstantRadialDistance {sdd} mm must exceed the focal radial "
                           f"distance {rho[0]} mm")
    mu = float(scan["WaterAttenuationCoefficient"])
    if not 0.001 < mu < 0.1:
        raise RawDataError(f"WaterAttenuationCoefficient {mu} is not in mm⁻¹ (expected ~0.02)")
    kind = "parallel" if parallel else ("fan" if rows == 1 else "cone")
    geometry = ScanGeometry(
        kind=kind, detector="flat" if parallel else shape.lower(), angles=phi,
        rows=rows, columns=cols, du=float(scan["DetectorElementTransverseSpacing"]),
        dv=float(scan["DetectorElementAxialSpacing"]), u0=float(central[0]) - 1,
        v0=float(central[1]) - 1, sod=0.0 if parallel else float(rho[0]),
        sdd=sdd if not parallel else 0.0, z=float(z[0]), mu_water=mu,
        z_per_view=z.astype(np.float64) if helical else None)
    if geometry.du <= 0 or geometry.dv <= 0:
        raise RawDataError("detector element spacings must be positive")
    return geometry, _sinogram(ordered, numbers, rows, cols)


def _in_acquisition_order(datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[int]]:
    """(projections, their InstanceNumbers) in acquisition order; two projections with one
    number are two scans (or a resend of another) mixed in one series."""
    if not datasets:
        raise RawDataError("no projections")
    ordered = sorted(datasets, key=lambda d: int(d.get("InstanceNumber") or 0))
    numbers = [int(d.get("InstanceNumber") or 0) for d in ordered]
    if len(set(numbers)) != len(numbers):
        raise RawDataError("two projections share an InstanceNumber (mixed scans or a resend "
                           "of another scan in this series)")
    return ordered, numbers


def _scan_values(ordered: list[Dataset]) -> tuple[dict[str, Any], bool]:
    """(the scan-level values, whether the beam is parallel): each must be present (a
    parallel beam has no source-to-detector distance) and the same in every projection, or
    the series holds more than one scan."""
    first = ordered[0]
    scan_keys = ("NumberofDetectorRows", "NumberofDetectorColumns",
                 "DetectorElementTransverseSpacing", "DetectorElementAxialSpacing",
                 "DetectorShape", "ConstantRadialDistance", "TypeofProjectionGeometry",
                 "TypeofProjectionData", "WaterAttenuationCoefficient")
    geometry_type = str(_require(first, "TypeofProjectionGeometry")).upper()
    if geometry_type not in ("PARALLEL", "FANBEAM", "CONEBEAM"):
        raise RawDataError(f"TypeofProjectionGeometry {geometry_type!r} is not PARALLEL, "
                           "FANBEAM or CONEBEAM")
    parallel = geometry_type == "PARALLEL"
    scan = {}
    for key in scan_keys:
        if parallel and key == "ConstantRadialDistance":
            scan[key] = get(first, key)
            continue
        scan[key] = _require(first, key)
        for ds in ordered[1:]:
            other = get(ds, key)
            if other != scan[key] and not (isinstance(other, float)
                                           and np.isclose(other, scan[key], rtol=1e-5)):
                raise RawDataError(f"{key} differs between projections ({scan[key]} vs "
                                   f"{other}): more than one scan in this series?")
    return scan, parallel


def _detector(scan: dict[str, Any]) -> tuple[bool, int, int, str]:
    """(helical, rows, columns, detector shape) from the scan-level values, each checked
    against what the reconstructions know."""
    data_type = str(scan["TypeofProjectionData"]).upper()
    if data_type not in ("AXIAL", "HELICAL"):
        raise RawDataError(f"TypeofProjectionData {data_type!r} is not AXIAL or HELICAL")
    helical = data_type == "HELICAL"
    rows, cols = int(scan["NumberofDetectorRows"]), int(scan["NumberofDetectorColumns"])
    if rows < 1 or cols < 2:
        raise RawDataError(f"detector of {rows} rows × {cols} columns")
    shape = str(scan["DetectorShape"]).upper()
    if shape not in ("FLAT", "CYLINDRICAL"):
        raise RawDataError(f"DetectorShape {shape!r} is not FLAT or CYLINDRICAL")
    return helical, rows, cols, shape


def _source_angles(per_view: dict[str, np.ndarray], first: Dataset, numbers: list[int]
                   ) -> np.ndarray:
    """The source's azimuth per view (unwrapped): it must advance monotonically by an even
    step (a gap is a missing view) that matches the views per rotation, when given."""
    phi = np.unwrap(per_view["DetectorFocalCenterAngularPosition"]
                    + per_view["SourceAngularPositionShift"])
    if phi.size >= 2:
        steps = np.diff(phi)
        step = float(np.median(steps))
        if step == 0 or np.any(np.sign(steps) != np.sign(step)):
            raise RawDataError("projection angles do not advance monotonically (mixed scans?)")
        if np.max(np.abs(steps - step)) > 0.01 * abs(step) + 1e-6:
            gap = int(np.argmax(np.abs(steps - step)))
            raise RawDataError(f"uneven angular step after projection {numbers[gap]} "
                               f"({steps[gap]:.5f} vs {step:.5f} rad): missing views?")
        per_rotation = get(first, "NumberofSourceAngularSteps")
        if per_rotation and not np.isclose(abs(step), 2 * np.pi / float(per_rotation),
                                           rtol=0.01):
            raise RawDataError(f"angular step {abs(step):.5f} rad does not match "
                               f"NumberofSourceAngularSteps {per_rotation}")
    return np.asarray(phi)


def _source_z(per_view: dict[str, np.ndarray], helical: bool, parallel: bool, rows: int
              ) -> np.ndarray:
    """The source's z per view: constant for an axial scan; for a helical one, a cone beam
    advancing by an even step per view (an uneven feed is missing views or mixed scans)."""
    z: np.ndarray = (per_view["DetectorFocalCenterAxialPosition"]
                     + per_view["SourceAxialPositionShift"])
    if not helical and np.ptp(z) > 1e-3:
        raise RawDataError("the source moves along z but TypeofProjectionData is AXIAL")
    if helical:
        if parallel or rows < 2:
            raise RawDataError("helical data is reconstructed from a cone beam (FANBEAM "
                               "geometry with two or more detector rows)")
        dz = np.diff(z)
        feed = float(np.median(dz)) if dz.size else 0.0
        if feed == 0 or np.max(np.abs(dz - feed)) > 0.01 * abs(feed) + 1e-4:
            raise RawDataError("helical scan: the source must advance along z by an even step "
                               "per view (missing views, or mixed scans?)")
    return z


def _sinogram(ordered: list[Dataset], numbers: list[int], rows: int, cols: int) -> np.ndarray:
    """The projections' rescaled values as [views, rows, columns] float32 line integrals
    (the LDCT data set stores columns as Rows: transposed back)."""
    sino = np.empty((len(ordered), rows, cols), dtype=np.float32)
    for k, ds in enumerate(ordered):
        arr = ds.pixel_array.astype(np.float32)
        if arr.shape == (cols, rows) and rows != cols:
            arr = arr.T  # LDCT files store columns as Rows
        if arr.shape != (rows, cols):
            raise RawDataError(f"projection {numbers[k]} is {arr.shape}, detector is "
                               f"{rows}×{cols}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        sino[k] = arr * slope + intercept
    return sino


def write_tags(ds: Dataset, g: ScanGeometry, view: int) -> None:
    """The DICOM-CT-PD elements of projection ``view`` of ``g`` (inverse of :func:`read_scan`)."""
    put(ds, "NumberofDetectorRows", g.rows)
    put(ds, "NumberofDetectorColumns", g.columns)
    put(ds, "DetectorElementTransverseSpacing", g.du)
    put(ds, "DetectorElementAxialSpacing", g.dv)
    put(ds, "DetectorShape", "FLAT" if g.kind == "parallel" else g.detector.upper())
    put(ds, "DetectorFocalCenterAngularPosition", float(np.mod(g.angles[view], 2 * np.pi)))
    put(ds, "DetectorFocalCenterAxialPosition", float(g.source_z[view]))
    put(ds, "DetectorFocalCenterRadialDistance", g.sod)
    put(ds, "ConstantRadialDistance", g.sdd)
    put(ds, "DetectorCentralElement", [g.u0 + 1, g.v0 + 1])
    put(ds, "SourceAngularPositionShift", 0.0)
    put(ds, "SourceAxialPositionShift", 0.0)
    put(ds, "SourceRadialDistanceShift", 0.0)
    put(ds, "FlyingFocalSpotMode", "FFSNONE")
    step = abs(float(np.median(np.diff(g.angles)))) if g.views > 1 else 2 * np.pi
    put(ds, "NumberofSourceAngularSteps", round(2 * np.pi / step))
    put(ds, "TypeofProjectionData", "HELICAL" if g.helical else "AXIAL")
    put(ds, "TypeofProjectionGeometry", "PARALLEL" if g.kind == "parallel" else "FANBEAM")
    put(ds, "WaterAttenuationCoefficient", g.mu_water)
