"""THE public plugin API of dicomnode (``API_VERSION`` 1.1). Everything a plugin author touches.

Only the names in ``__all__`` are public; a plugin imports nothing else from ``dicomnode``.

A plugin says *what it found or made*, never how to encode it as DICOM: the node's package stage
turns :class:`Outputs` into conformant objects (derived series, TID 1500 SR, SEG, Encapsulated
STL, KOS) with correct references, UIDs and provenance. That keeps plugins small and keeps every
result conformant whoever wrote the plugin.

A plugin is a subclass of :class:`Plugin` registered under the entry-point group
``dicomnode.plugins``::

    # pyproject.toml of the plugin's own distribution
    [project.entry-points."dicomnode.plugins"]
    threshold = "my_pkg.plugin:Threshold"

See ``docs/plugins.md`` for a complete worked example. Values here are immutable and check
themselves on construction, so a mistake fails inside the plugin that made it, with a message
that names the field, not later in packaging.

Nothing in this module assumes one process: plugins get everything through ``inputs`` and
``ctx`` and must not keep state between runs (a job may run on another worker after a retry).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset

from dicomnode.formats.ctpd import RawDataError, ScanGeometry, is_projection_data, read_scan

__all__ = [
    "ABSENT",
    "API_MAJOR",
    "API_VERSION",
    "AREA",
    "CT_ATTRIBUTES",
    "DIAMETER",
    "ENTRY_POINT_GROUP",
    "GPU",
    "LEFT",
    "LONG_AXIS",
    "MORPHOLOGICALLY_ALTERED",
    "PRESENCE",
    "PRESENT",
    "RIGHT",
    "SHORT_AXIS",
    "TISSUE",
    "VOLUME",
    "Accepts",
    "Array",
    "Code",
    "Context",
    "Finding",
    "Geometry",
    "ImageVolume",
    "Inputs",
    "KeyImages",
    "LabelMap",
    "Measurement",
    "Mesh",
    "Needs",
    "NotApplicable",
    "Outputs",
    "Params",
    "Plugin",
    "PluginError",
    "RawDataError",
    "ScanGeometry",
    "Segment",
    "SeriesInput",
    "api_mismatch",
    "axial_grid",
    "is_projection_data",
    "ndimage",
    "read_scan",
    "resample",
    "to_numpy",
]

API_VERSION = "1.1"
"""The version of this API, ``major.minor``, independent of the node's package version.

Compatibility rule: a plugin built for API ``1.x`` loads on a node with any ``1.y``; the minor
number grows when something is added (1.1: the DICOM-CT-PD reader ``read_scan`` and its
``ScanGeometry``), and nothing a plugin uses is removed or changed within a major. A plugin
built for another major (``2.x`` on a ``1.y`` node, or ``1.x`` on a ``2.y`` node) is refused
at start with a message naming the plugin, its API version and the node's
(:func:`api_mismatch`). A plugin that states a bare integer ``N`` means ``N.0``."""
API_MAJOR = int(API_VERSION.split(".")[0])

Array: TypeAlias = Any
"""A NumPy ``ndarray``, or a CuPy one when the job holds a GPU slot (``ctx.xp``). CuPy is an
optional install, so no static type names both: this alias says which values are arrays."""


def api_mismatch(plugin: str, plugin_api: object) -> str:
    """Why a plugin built for ``plugin_api`` cannot load on this node ("" when it can)."""
    text = str(plugin_api)
    head = text.split(".", 1)[0]
    if not head.isdigit() or not all(p.isdigit() for p in text.split(".")[1:]):
        return (f"plugin {plugin!r} states plugin API version {text!r}: not a 'major.minor' "
                f"version (this node has API {API_VERSION})")
    if int(head) != API_MAJOR:
        return (f"plugin {plugin!r} was built for plugin API {text}, this node has API "
                f"{API_VERSION}: refused (a plugin built for {head}.x loads only on a node "
                f"with API {head}.y)")
    return ""
ENTRY_POINT_GROUP = "dicomnode.plugins"


class PluginError(Exception):
    """Raise this from ``run`` for a clear, expected failure (bad input for this plugin): the
    job fails with your message as the reason and is not retried."""


class NotApplicable(PluginError):
    """Raise when the input is not for this plugin (e.g. MR sent to a CT detector). The job ends
    as ``not-applicable`` with your reason; nothing is sent."""


def to_numpy(array: Array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array (outputs may be either; this is for plugins that
    need host-side work, e.g. scikit-image, on a GPU-computed result)."""
    get = getattr(array, "get", None)  # cupy.ndarray.get() copies to the host
    return np.asarray(get() if callable(get) else array)


def ndimage(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy arrays, ``cupyx.scipy.ndimage`` for CuPy ones (the same
    API), so filters, labelling and morphology follow ``ctx.xp``."""
    import importlib

    # scipy and cupyx have no type stubs here: import by name, typed as the module it is
    return importlib.import_module("scipy.ndimage" if xp is np else "cupyx.scipy.ndimage")


# --- what a plugin declares -------------------------------------------------------------------

class GPU(StrEnum):
    NO = "no"  # CPU only
    PREFERRED = "preferred"  # uses a GPU when one is free, else runs on CPU (same code path)
    REQUIRED = "required"  # will not run without one


@dataclass(frozen=True)
class Needs:
    """Resources a run needs; the runner schedules by these (one job per GPU slot)."""

    gpu: GPU = GPU.NO
    memory_mb: int = 2048
    timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.memory_mb <= 0 or self.timeout_seconds <= 0:
            raise ValueError("Needs.memory_mb and Needs.timeout_seconds must be positive")


@dataclass(frozen=True)
class Accepts:
    """Which series a plugin takes. Empty tuples mean "any"."""

    modalities: tuple[str, ...] = ()
    sop_class_uids: tuple[str, ...] = ()
    min_instances: int = 1
    #: True for plugins that take raw projection data (e.g. DICOM-CT-PD, read with
    #: :func:`read_scan`): the series' datasets come in acquisition order (InstanceNumber)
    #: without the image-plane checks of an image series, and ``SeriesInput.geometry`` is then
    #: the projection stack (views, detector rows, detector columns), not a patient-space grid.
    projections: bool = False

    def check(self, modality: str, sop_class_uid: str, num_instances: int) -> str | None:
        """None if accepted, else the reason (shown in the job record)."""
        if self.modalities and modality not in self.modalities:
            return f"modality {modality!r} not in {list(self.modalities)}"
        if self.sop_class_uids and sop_class_uid not in self.sop_class_uids:
            return f"SOP class {sop_class_uid} not accepted"
        if num_instances < self.min_instances:
            return f"{num_instances} instance(s), needs at least {self.min_instances}"
        return None


class Params(BaseModel):
    """Base for a plugin's parameters: unknown keys are errors (caught when the config loads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- what a plugin receives -------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Where voxels are, in the patient coordinate system (LPS, millimetres; PS3.3 C.7.6.2).

    Arrays are indexed ``[slice, row, column]``. ``origin`` is the centre of voxel [0, 0, 0];
    ``row_direction`` is the direction of increasing column index (DICOM's first orientation
    vector), ``column_direction`` of increasing row index, ``slice_direction`` of increasing
    slice index; ``spacing`` is (slice, row, column) in mm.

    ``slice_direction`` is the step from one slice's origin to the next, and is the plane normal
    for nearly every series. A CT with *gantry tilt* is sheared: its slices are tilted planes
    stacked along the table, so ``slice_direction`` leans off the normal and ``spacing[0]`` is
    the step along it. Use :attr:`slice_gap_mm` (distance between the planes) and
    :attr:`voxel_ml` rather than ``spacing[0]`` and ``prod(spacing)``; they are right for both.
    """

    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_direction: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    frame_of_reference_uid: str

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Geometry.spacing must be positive, got {self.spacing}")
        if any(n <= 0 for n in self.shape):
            raise ValueError(f"Geometry.shape must be positive, got {self.shape}")
        for name in ("row_direction", "column_direction", "slice_direction"):
            v = np.asarray(getattr(self, name), dtype=float)
            if not np.isclose(np.linalg.norm(v), 1.0, atol=1e-4):
                raise ValueError(f"Geometry.{name} must be a unit vector, got {tuple(v)}")
        row, col = np.asarray(self.row_direction), np.asarray(self.column_direction)
        if abs(float(row @ col)) > 1e-3:
            raise ValueError("Geometry.row_direction and column_direction must be orthogonal")
        if abs(float(np.asarray(self.slice_direction) @ np.cross(row, col))) < 0.5:
            raise ValueError("Geometry.slice_direction must leave the image plane (it is the "
                             "normal, or within 60° of it for a gantry-tilted stack)")

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping (slice, row, column, 1) indices to LPS mm."""
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.slice_direction) * self.spacing[0]
        a[:3, 1] = np.asarray(self.column_direction) * self.spacing[1]
        a[:3, 2] = np.asarray(self.row_direction) * self.spacing[2]
        a[:3, 3] = self.origin
        return a

    @property
    def normal(self) -> tuple[float, float, float]:
        """Unit normal of the image planes (row × column direction), on the side the slices
        advance to."""
        n = np.cross(self.row_direction, self.column_direction)
        n = n / np.linalg.norm(n)
        if float(n @ np.asarray(self.slice_direction)) < 0:
            n = -n
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def slice_gap_mm(self) -> float:
        """Distance between neighbouring image planes, along their normal (= ``spacing[0]``
        unless the stack is sheared by gantry tilt)."""
        return float(self.spacing[0] * abs(np.asarray(self.slice_direction) @ self.normal))

    @property
    def sheared(self) -> bool:
        """True when slices are stacked off their normal (gantry tilt)."""
        return abs(float(np.asarray(self.slice_direction) @ self.normal)) < 1 - 1e-6

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL (the parallelepiped's, so right for sheared stacks)."""
        return self.slice_gap_mm * self.spacing[1] * self.spacing[2] / 1000.0

    def to_patient(self, index: Sequence[float]) -> tuple[float, float, float]:
        """(slice, row, column) index, fractional allowed → LPS mm."""
        p = self.affine @ np.array([*index, 1.0])
        return (float(p[0]), float(p[1]), float(p[2]))


def axial_grid(g: Geometry, spacing: tuple[float, float, float]) -> Geometry:
    """An axial grid (rows along LPS +y, columns along +x, slices along +z) that covers the
    volume of ``g``, with ``spacing`` (slice, row, column) mm: where to look at an oblique,
    coronal or sagittal series with methods that work slice by slice on axial images."""
    corners = np.array([g.to_patient([k, i, j]) for k in (0, g.shape[0] - 1)
                        for i in (0, g.shape[1] - 1) for j in (0, g.shape[2] - 1)])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    step = np.array([spacing[2], spacing[1], spacing[0]])  # x, y, z
    n = np.floor((hi - lo) / step + 1e-6).astype(int) + 1
    return Geometry(origin=(float(lo[0]), float(lo[1]), float(lo[2])),
                    row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0),
                    slice_direction=(0.0, 0.0, 1.0), spacing=spacing,
                    shape=(int(n[2]), int(n[1]), int(n[0])),
                    frame_of_reference_uid=g.frame_of_reference_uid)


def resample(volume: Array, src: Geometry, dst: Geometry, xp: ModuleType = np, order: int = 1,
             cval: float = 0.0) -> Array:
    """``volume`` (on grid ``src``) sampled at the voxel centres of ``dst`` (same patient
    coordinates): trilinear (``order=1``) for images, nearest (``order=0``) for label maps;
    ``cval`` outside. One output slice at a time, so memory stays at one slice of
    coordinates; on ``xp``'s device (NumPy or CuPy)."""
    ndi = ndimage(xp)
    to_src = np.linalg.inv(src.affine) @ dst.affine  # dst index → src index
    m = xp.asarray(to_src[:3, :3], dtype=xp.float32)
    i, j = xp.meshgrid(xp.arange(dst.shape[1], dtype=xp.float32),
                       xp.arange(dst.shape[2], dtype=xp.float32), indexing="ij")
    out = xp.empty(dst.shape, dtype=volume.dtype)
    for k in range(dst.shape[0]):
        t = xp.asarray(to_src[:3, 3] + to_src[:3, 0] * k, dtype=xp.float32)
        coords = (m[:, 1, None, None] * i + m[:, 2, None, None] * j + t[:, None, None])
        out[k] = ndi.map_coordinates(volume, coords, order=order, mode="constant", cval=cval)
    return out


@dataclass(frozen=True)
class SeriesInput:
    """One input series, slices sorted along ``geometry.slice_direction``."""

    series_uid: str
    modality: str
    description: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]  # in slice order
    geometry: Geometry
    datasets: tuple[Dataset, ...]  # headers; pixel data loaded on demand
    _pixels: Any = field(default=None, repr=False, compare=False)

    def pixels(self, xp: ModuleType = np) -> Array:
        """Pixel data in physical units (HU for CT: RescaleSlope/Intercept applied), float32,
        shape ``geometry.shape``, as an ``xp`` array (NumPy, or CuPy on a GPU)."""
        data = self._pixels() if callable(self._pixels) else self._pixels
        if data is None:
            raise PluginError(f"series {self.series_uid} has no pixel data")
        return xp.asarray(data, dtype=xp.float32)


@dataclass(frozen=True)
class Inputs:
    study_uid: str
    series: tuple[SeriesInput, ...]
    patient: dict[str, str]  # PatientID, PatientName, … as text (for logs; outputs copy it)

    @property
    def primary(self) -> SeriesInput:
        """The first (for most plugins: the only) series the route selected."""
        if not self.series:
            raise NotApplicable("no input series")
        return self.series[0]

    def volume(self, *, min_slices: int = 1, max_gap_mm: float | None = None,
               normal: tuple[float, float, float] = (0.0, 0.0, 1.0)) -> SeriesInput:
        """The series to read as a volume when a study-level route hands over several (a scout,
        the axial series, coronal and sagittal reformats…): of those with ≥ ``min_slices``
        slices and planes ≤ ``max_gap_mm`` apart, the one whose planes are closest to
        ``normal`` (default axial; angles within 5° count as equal), then the one covering the
        most (slices × gap), then the first. None qualifies: :attr:`primary`, so the plugin's
        own checks say why."""
        if not self.series:
            raise NotApplicable("no input series")
        want = np.asarray(normal, dtype=float) / np.linalg.norm(normal)

        def key(k: int) -> tuple[int, float, int]:
            g = self.series[k].geometry
            off = float(np.degrees(np.arccos(min(1.0, abs(float(np.dot(g.normal, want)))))))
            return (int(off // 5), -g.shape[0] * g.slice_gap_mm, k)

        ok = [k for k, si in enumerate(self.series)
              if si.geometry.shape[0] >= min_slices
              and (max_gap_mm is None or si.geometry.slice_gap_mm <= max_gap_mm)]
        return self.series[min(ok, key=key)] if ok else self.primary


@dataclass(frozen=True)
class Context:
    """What the node lends a run: array module, device, scratch space, logger."""

    job_id: str
    xp: ModuleType  # numpy, or cupy when the job holds a GPU slot
    device: str  # "cpu" or "cuda:N"
    work_dir: Path
    log: logging.Logger


# --- what a plugin returns --------------------------------------------------------------------

@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8): e.g. ``Code("118565006", "SCT", "Volume")``."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not (self.value and self.scheme and self.meaning):
            raise ValueError("Code needs value, scheme designator and meaning")


#: CT Image module attributes a plugin may set on its image volume (PS3.3 C.8.2.1).
CT_ATTRIBUTES = frozenset({
    "ConvolutionKernel", "ReconstructionDiameter", "DataCollectionDiameter",
    "DistanceSourceToDetector", "DistanceSourceToPatient", "RotationDirection", "FilterType",
    "KVP", "XRayTubeCurrent", "Exposure", "GantryDetectorTilt", "TableHeight"})


@dataclass(frozen=True)
class ImageVolume:
    """A new image series (→ derived series: MPR, MIP, reconstruction…)."""

    array: Array  # [slice, row, column], physical units (HU for CT)
    geometry: Geometry
    series_description: str
    derivation: str  # DerivationDescription, e.g. "coronal MPR, 3 mm"
    source_series_uid: str
    original: bool = False  # True only for reconstructions from raw data (ORIGINAL\PRIMARY)
    window: tuple[float, float] | None = None  # (center, width)
    #: Extra CT Image attributes by DICOM keyword (only those in ``CT_ATTRIBUTES``), e.g.
    #: ``{"ConvolutionKernel": "HANN", "ReconstructionDiameter": 250.0}``.
    attributes: Mapping[str, str | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in getattr(self.array, "shape", ()))
        if shape != self.geometry.shape:
            raise ValueError(f"ImageVolume.array shape {shape} != geometry.shape "
                             f"{self.geometry.shape}")
        if not self.series_description:
            raise ValueError("ImageVolume.series_description is required")
        unknown = set(self.attributes) - CT_ATTRIBUTES
        if unknown:
            raise ValueError(f"ImageVolume.attributes: {sorted(unknown)} not allowed "
                             f"(allowed: {sorted(CT_ATTRIBUTES)})")


# A few codes most plugins need (SNOMED CT), so that every plugin spells them the same way.
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
VOLUME = Code("118565006", "SCT", "Volume")
AREA = Code("42798000", "SCT", "Area")
DIAMETER = Code("81827009", "SCT", "Diameter")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
SHORT_AXIS = Code("103340004", "SCT", "Short axis")
PRESENCE = Code("705057003", "SCT", "Presence")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
TISSUE = Code("85756007", "SCT", "Tissue")
MORPHOLOGICALLY_ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")


@dataclass(frozen=True)
class Measurement:
    """A number with a unit (UCUM), e.g. ``Measurement(Code("118565006","SCT","Volume"),
    12.5, "ml")``."""

    name: Code
    value: float
    unit: str

    def __post_init__(self) -> None:
        if not np.isfinite(self.value):
            raise ValueError(f"Measurement {self.name.meaning!r} is not finite: {self.value}")


@dataclass(frozen=True)
class Segment:
    number: int  # value in the label map
    label: str
    category: Code
    type: Code

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError("Segment.number starts at 1 (0 is background)")


@dataclass(frozen=True)
class LabelMap:
    """A segmentation (→ SEG): integer labels on a grid, 0 = background."""

    array: Array  # [slice, row, column] integers
    geometry: Geometry
    segments: tuple[Segment, ...]
    source_series_uid: str

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in getattr(self.array, "shape", ()))
        if shape != self.geometry.shape:
            raise ValueError(f"LabelMap.array shape {shape} != geometry.shape "
                             f"{self.geometry.shape}")
        numbers = [s.number for s in self.segments]
        if len(set(numbers)) != len(numbers) or not numbers:
            raise ValueError("LabelMap.segments must be non-empty with distinct numbers")


@dataclass(frozen=True)
class Finding:
    """Something found (→ one TID 1500 measurement group): what, where, how big, how sure."""

    finding: Code
    measurements: tuple[Measurement, ...] = ()
    location: tuple[float, float, float] | None = None  # LPS mm
    segment: int | None = None  # number of the Segment in ``Outputs.label_maps[0]`` if any
    confidence: float | None = None  # 0..1
    source_series_uid: str = ""
    #: Qualitative evaluations (name, value), e.g. ``(Code("705057003", "SCT", "Presence"),
    #: Code("52101004", "SCT", "Present"))`` (→ TID 1500 qualitative evaluations).
    evaluations: tuple[tuple[Code, Code], ...] = ()
    #: Where it is, anatomically (→ TID 1500 finding site), e.g. ``Code("39607008", "SCT",
    #: "Lung structure")``, with laterality ``RIGHT``/``LEFT`` below when it applies.
    site: Code | None = None
    laterality: Code | None = None

    def __post_init__(self) -> None:
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Finding.confidence must be within 0..1, got {self.confidence}")


@dataclass(frozen=True)
class Mesh:
    """A surface (→ Encapsulated STL), vertices in LPS mm."""

    vertices: Array  # (N, 3) float
    faces: Array  # (M, 3) int, counter-clockwise seen from outside
    name: str
    frame_of_reference_uid: str

    def __post_init__(self) -> None:
        v, f = np.asarray(self.vertices), np.asarray(self.faces)
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError("Mesh.vertices and Mesh.faces must be (N, 3) arrays")
        if f.size and (f.min() < 0 or f.max() >= len(v)):
            raise ValueError("Mesh.faces index outside vertices")


@dataclass(frozen=True)
class KeyImages:
    """Images a radiologist should look at first (→ KOS)."""

    sop_instance_uids: tuple[str, ...]
    title: Code = Code("113000", "DCM", "Of Interest")


@dataclass(frozen=True)
class Outputs:
    volumes: tuple[ImageVolume, ...] = ()
    findings: tuple[Finding, ...] = ()
    label_maps: tuple[LabelMap, ...] = ()
    meshes: tuple[Mesh, ...] = ()
    key_images: tuple[KeyImages, ...] = ()
    summary: str = ""  # one line for the job record and logs
    #: Non-empty for a critical finding (e.g. "Intracranial hemorrhage suspected, 12 mL"):
    #: the node fires the route's ``notify`` (webhook and/or command) with this text, audited.
    critical: str = ""
    #: (name, version) of the algorithm that made these results when it is not the plugin
    #: itself (e.g. the model a generic runner ran): recorded in SR/SEG instead of the plugin's.
    algorithm: tuple[str, str] | None = None

    @property
    def empty(self) -> bool:
        return not (self.volumes or self.findings or self.label_maps or self.meshes
                    or self.key_images)


# --- the plugin itself ------------------------------------------------------------------------

P = TypeVar("P", bound=Params)


class Plugin(ABC, Generic[P]):
    """Subclass as ``Plugin[MyParams]``, set the class attributes, implement :meth:`run`."""

    name: ClassVar[str]
    version: ClassVar[str]
    api_version: ClassVar[str | int] = API_VERSION
    description: ClassVar[str] = ""
    #: CID 7162 Algorithm Family, recorded in every SEG and SR the plugin's results become
    #: (required for plugins that return findings or label maps; None for the others),
    #: e.g. Code("123110", "DCM", "Artificial Intelligence"),
    #: Code("123105", "DCM", "Histogram Analysis"), Code("123104", "DCM",
    #: "Morphological Operations").
    algorithm_family: ClassVar[Code | None] = None
    params_model: ClassVar[type[Params]] = Params
    needs: ClassVar[Needs] = Needs()
    accepts: ClassVar[Accepts] = Accepts()

    @abstractmethod
    def run(self, inputs: Inputs, params: P, ctx: Context) -> Outputs:
        """Do the work. Raise :class:`NotApplicable` or :class:`PluginError` for expected
        refusals; any other exception fails the job (and it may be retried)."""
