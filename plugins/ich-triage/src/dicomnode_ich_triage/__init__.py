"""``ich-triage``: flag intracranial hemorrhage on head CT (classical baseline, no weights).

Steps (all in millimetres, so slice thickness does not change the meaning of a parameter):

1. *Is this a head?* Bone (> 300 HU) must enclose a cranial cavity of brain-like tissue in
   enough slices; otherwise the study is not applicable (chest, abdomen, phantoms…).
2. *Intracranial mask*: per slice, the holes of the bone mask (the cavity the skull closes),
   minus bone; a rim of ``bone_margin_mm`` next to bone is excluded from seeding, because
   partial volume of bone and brain makes 50–90 HU there too.
3. *Candidates*: after an in-plane median (noise), voxels in ``[hu_min, hu_max]`` inside the mask,
   at least ``contrast_hu`` above the brain's median.
4. *Components* (3D), grown back into the excluded rim (extra-axial bleeds lie against the
   bone); kept if volume ≥ ``min_volume_ml``, thickness (largest inscribed radius) ≥
   ``min_thickness_mm`` (streaks and partial-volume rims are thin) and mean HU in range.
5. *Report*: a TID 1500 SR with the qualitative finding (hemorrhage present/absent) and one
   volumetric group per lesion (volume, maximum diameter, centroid, confidence); a SEG of the
   lesions; a KOS of the slice where each lesion is largest; a critical-finding message.

Confidence is a heuristic score from volume, thickness and contrast (not a calibrated
probability); it is labelled as such in docs/ich-triage.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from dicomnode.plugin import (
    ABSENT,
    DIAMETER,
    GPU,
    LEFT,
    MORPHOLOGICALLY_ALTERED,
    PRESENCE,
    PRESENT,
    RIGHT,
    VOLUME,
    Accepts,
    Code,
    Context,
    Finding,
    Geometry,
    Inputs,
    KeyImages,
    LabelMap,
    Measurement,
    Needs,
    NotApplicable,
    Outputs,
    Params,
    Plugin,
    Segment,
    SeriesInput,
    axial_grid,
    ndimage,
    resample,
    to_numpy,
)

ICH = Code("1386000", "SCT", "Intracranial hemorrhage")
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
CRANIAL_CAVITY = Code("1101003", "SCT", "Cranial cavity")


class ICHParams(Params):
    hu_min: float = 50.0
    hu_max: float = 95.0
    contrast_hu: float = 12.0  # above the brain's median
    bone_hu: float = 300.0
    bone_margin_mm: float = 2.0
    min_volume_ml: float = 0.2
    min_thickness_mm: float = 2.0
    median_mm: float = 2.0  # in-plane median filter size
    max_slice_mm: float = 10.0
    min_slices: int = Field(8, ge=1)
    # series whose planes are more than this off axial are resampled to an axial grid with
    # this slice spacing (gantry tilts up to 30° are processed as they are)
    max_tilt_deg: float = Field(30.0, ge=0, le=90)
    axial_slice_mm: float = Field(2.5, gt=0)
    max_reformat_slice_mm: float = Field(3.0, gt=0)  # thicker non-axial series are refused



IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)  # 2D cross, per slice
PATIENT_LEFT = np.array([1.0, 0.0, 0.0])  # LPS +x


def intracranial_mask(hu: Any, bone_hu: float, ndi: Any, xp: Any = np) -> tuple[Any, Any]:
    """(cavity inside the skull, bone) per slice, on ``hu``'s device. A structuring element in
    the slice plane keeps closing and hole filling inside each slice (every slice's edge is on
    the volume's border), so one call does all slices. (cupyx's morphology wants the
    structuring element on the device too.)"""
    bone = hu > bone_hu
    cross = xp.asarray(IN_PLANE)
    closed = ndi.binary_closing(bone, structure=cross, iterations=2)
    cavity = ndi.binary_fill_holes(closed, structure=cross) & ~closed
    return cavity, bone


def smear_along(mask: Any, g: Geometry, direction: Sequence[float], distance_mm: float,
                ndi: Any, xp: Any = np) -> Any:
    """``mask`` (on grid ``g``) swept ± ``distance_mm`` along the patient-space ``direction``:
    a binary dilation with a line of voxels along it (whole-voxel offsets, sampled every half
    of the finest spacing; on ``mask``'s device)."""
    step = np.linalg.solve(g.affine[:3, :3], np.asarray(direction, dtype=float))  # index/mm
    n = int(np.ceil(distance_mm / (min(g.spacing) / 2)))
    offsets = np.rint(np.outer(np.linspace(-distance_mm, distance_mm, 2 * n + 1), step))
    offsets = offsets.astype(int)
    reach = np.abs(offsets).max(axis=0)
    line = np.zeros(tuple(2 * reach + 1), dtype=bool)
    line[tuple((offsets + reach).T)] = True  # symmetric, so dilation's reflection is moot
    return ndi.binary_dilation(mask, structure=xp.asarray(line))


def max_diameter(points_mm: np.ndarray) -> float:
    """Largest distance between two points of a lesion (on its convex hull when large)."""
    if len(points_mm) < 2:
        return 0.0
    pts = points_mm
    if len(pts) > 2000:
        from scipy.spatial import ConvexHull

        try:
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # flat lesion (one slice): hull of the in-plane points
            pts = pts[np.random.default_rng(0).choice(len(pts), 2000, replace=False)]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    return float(d.max())


@dataclass(frozen=True)
class _Head:
    """What the whole-volume steps found, on the host: HU, cranial cavity, bone, hyperdense
    voxels, their labelled components (``n`` of them), the in-plane blurred HU (partial
    volume), the brain's median HU and how far components grow back towards bone (mm)."""

    hu: np.ndarray
    cavity: np.ndarray
    bone: np.ndarray
    hyper: np.ndarray
    labels: np.ndarray
    n: int
    blurred: np.ndarray
    brain_hu: float
    grow_mm: float


def _cranial_cavity(hu_x: Any, g: Geometry, params: ICHParams, xndi: Any, xp: Any
                    ) -> tuple[Any, Any, float]:
    """Step 1–2: (cavity, bone, brain's median HU). Bone must enclose at least 150 mL over
    30 mm of slices, of tissue with brain's HU; anything else is not a head CT (chest,
    abdomen, phantoms) and the job is not applicable."""
    _, sy, sx = g.spacing
    voxel_ml = g.voxel_ml
    cavity_x, bone_x = intracranial_mask(hu_x, params.bone_hu, xndi, xp)
    cavity_ml = float(cavity_x.sum()) * voxel_ml
    slices_with_cavity = int((cavity_x.sum(axis=(1, 2)) * sy * sx > 2000).sum())  # > 20 cm²
    if cavity_ml < 150 or slices_with_cavity * g.slice_gap_mm < 30:
        raise NotApplicable(f"no cranial cavity found ({cavity_ml:.0f} mL enclosed by "
                            "bone): not a head CT")
    brain_hu = float(xp.median(hu_x[cavity_x]))
    if not -20 < brain_hu < 60:
        raise NotApplicable(f"tissue inside the bone is {brain_hu:.0f} HU, not brain")
    return cavity_x, bone_x, brain_hu


class ICHTriage(Plugin[ICHParams]):
    name = "ich-triage"
    version = "1.0.0"
    description = ("Intracranial hemorrhage on head CT (classical: intracranial mask, "
                   "hyperdense components, shape filters) → SR + SEG + KOS, critical alert")
    algorithm_family = Code("123104", "DCM", "Morphological Operations")
    params_model = ICHParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=2048, timeout_seconds=300)
    accepts = Accepts(modalities=("CT",), min_instances=1)

    @staticmethod
    def _volume(hu: np.ndarray, smooth: np.ndarray, comp: np.ndarray, allowed: np.ndarray,
                brain_hu: float, ndi: Any) -> float:
        """Partial-volume-aware voxel count: around the component, each voxel counts by how far
        its HU lies from brain towards the lesion's core (thick slices cut lesions, a voxel
        half-filled with blood reads half-way)."""
        core = float(np.percentile(hu[comp], 75))
        if core - brain_hu < 5:
            return float(comp.sum())
        ring = ndi.binary_dilation(comp, structure=np.ones((3, 3, 3)), iterations=1) & allowed
        frac = np.clip((smooth[ring] - brain_hu) / (core - brain_hu), 0.0, 1.0)
        return float(frac.sum())

    def run(self, inputs: Inputs, params: ICHParams, ctx: Context) -> Outputs:
        # a study may hold a scout and reformats beside the axial series: take the series
        # closest to axial among those this method can read
        series = inputs.volume(min_slices=params.min_slices, max_gap_mm=params.max_slice_mm)
        self._refuse_unreadable(series, params)
        # the whole-volume work runs on ctx.xp's device (CuPy on a GPU, else NumPy); the
        # per-lesion work that follows is small and runs on the host
        xp = ctx.xp
        xndi = ndimage(xp)
        ndi = ndimage(np)
        src = series.geometry
        hu_x, g = self._on_axial_grid(series.pixels(xp), src, params, ctx)
        head = self._head(hu_x, g, src, params, xndi, xp)
        lesions = self._lesions(head, g, params, ndi)
        if not lesions:
            return Outputs(findings=(Finding(ICH, evaluations=((PRESENCE, ABSENT),),
                                             source_series_uid=series.series_uid),),
                           summary="no intracranial hemorrhage found")
        lesions.sort(key=lambda t: -t[1])
        lesions = lesions[:250]
        label_map = self._label_map(lesions, g, src, xp)
        return self._report(series, head, lesions, label_map, g, ctx)

    @staticmethod
    def _refuse_unreadable(series: SeriesInput, params: ICHParams) -> None:
        """Not CT, too few slices or slices too far apart: triage on such a series would
        miss bleeds or raise false ones, so the job is not applicable rather than negative."""
        g = series.geometry
        if series.modality != "CT":
            raise NotApplicable(f"needs CT, got {series.modality}")
        if g.shape[0] < params.min_slices:
            raise NotApplicable(f"{g.shape[0]} slice(s): a head CT for triage needs at least "
                                f"{params.min_slices}")
        gap = g.slice_gap_mm  # between the planes (gantry tilt: less than the step)
        if gap > params.max_slice_mm:
            raise NotApplicable(f"slices {gap:.1f} mm apart: too coarse for triage "
                                f"(≤ {params.max_slice_mm} mm)")

    @staticmethod
    def _on_axial_grid(hu_x: Any, src: Geometry, params: ICHParams, ctx: Context
                       ) -> tuple[Any, Geometry]:
        """(HU, grid) to work on: the series itself when it is near axial (gantry tilt up to
        ``max_tilt_deg``), else the series resampled to an axial grid."""
        if abs(src.normal[2]) < np.cos(np.radians(params.max_tilt_deg)):
            # coronal, sagittal or steeply oblique: the skull does not close a cavity in
            # every slice, and slices cut extra-axial bleeds tangentially; work on an axial
            # grid (trilinear), and map the lesions back onto the series for the SEG. Thick
            # such slices smear the skull over the convexity (false bleeds): refused.
            gap = src.slice_gap_mm
            off = float(np.degrees(np.arccos(min(1.0, abs(src.normal[2])))))
            if gap > params.max_reformat_slice_mm:
                raise NotApplicable(
                    f"planes {off:.0f}° off axial with slices {gap:.1f} mm apart: send the "
                    f"axial series, or one ≤ {params.max_reformat_slice_mm:g} mm")
            g = axial_grid(src, (params.axial_slice_mm, min(src.spacing[1:]),
                                 min(src.spacing[1:])))
            hu_x = resample(hu_x, src, g, ctx.xp, order=1, cval=-1000.0)
            ctx.log.info("series planes %.0f° off axial: resampled to an axial grid %s",
                         off, g.shape)
            return hu_x, g
        return hu_x, src

    @staticmethod
    def _head(hu_x: Any, g: Geometry, src: Geometry, params: ICHParams, xndi: Any, xp: Any
              ) -> _Head:
        """Steps 1–3 on the whole volume (on ``xp``'s device): the cranial cavity (or the
        refusal of what is not a head), the brain's HU, and the labelled candidate
        components; the arrays the per-lesion steps read come back on the host."""
        cavity_x, bone_x, brain_hu = _cranial_cavity(hu_x, g, params, xndi, xp)
        _, sy, sx = g.spacing
        size = max(1, round(params.median_mm / sx) | 1)
        smooth = xndi.median_filter(hu_x, size=(1, size, size))
        margin = xp.ones_like(cavity_x)
        for k in range(hu_x.shape[0]):  # in-plane distance to bone, mm (per slice: a 3D
            margin[k] = xndi.distance_transform_edt(  # transform is 4× slower on the CPU)
                ~bone_x[k], sampling=(sy, sx)) > params.bone_margin_mm
        grow_mm = params.bone_margin_mm
        if g is not src:
            # a reformatted series' thick voxels average the skull into the brain along
            # their normal, and the axial grid's slices are samples that can pass just above
            # a bone surface the grid does not show: seeds also keep one source slice gap from
            # bone along the series' normal, and one grid slice along z
            margin &= ~smear_along(bone_x, g, src.normal, src.slice_gap_mm, xndi, xp)
            margin &= ~smear_along(bone_x, g, (0.0, 0.0, 1.0), g.spacing[0], xndi, xp)
            grow_mm += src.slice_gap_mm
        low = max(params.hu_min, brain_hu + params.contrast_hu)
        hyper_x = (smooth >= low) & (smooth <= params.hu_max) & cavity_x
        labels_x, n = xndi.label(hyper_x & margin, structure=xp.ones((3, 3, 3)))
        in_plane = xndi.gaussian_filter(hu_x, sigma=(0, 0.7, 0.7))  # for partial volume
        hu, cavity, bone, hyper, labels, blurred = (
            to_numpy(a) for a in (hu_x, cavity_x, bone_x, hyper_x, labels_x, in_plane))
        return _Head(hu, cavity, bone, hyper, labels, int(n), blurred, brain_hu, grow_mm)

    def _lesions(self, head: _Head, g: Geometry, params: ICHParams, ndi: Any
                 ) -> list[tuple[np.ndarray, float, float, float]]:
        """Step 4: each candidate component grown back into the rim next to bone and kept
        if its volume, thickness and mean HU are those of a bleed: (mask, mL, mm, HU)."""
        _, sy, sx = g.spacing
        voxel_ml = g.voxel_ml
        hu, hyper = head.hu, head.hyper
        lesions: list[tuple[np.ndarray, float, float, float]] = []
        for lab in range(1, head.n + 1):
            comp = head.labels == lab
            if comp.sum() * voxel_ml < params.min_volume_ml / 3:
                continue
            # grow back into the rim next to bone (extra-axial bleeds touch it)
            grown = ndi.binary_dilation(comp, structure=np.ones((1, 3, 3)),
                                        iterations=max(1, int(np.ceil(head.grow_mm / sx)) + 1),
                                        mask=hyper)
            volume = self._volume(hu, head.blurred, grown, head.cavity & ~head.bone,
                                  head.brain_hu, ndi) * voxel_ml
            if volume < params.min_volume_ml:
                continue
            thickness = max(float(ndi.distance_transform_edt(grown[k], sampling=(sy, sx)).max())
                            for k in np.unique(np.argwhere(grown)[:, 0]))
            if thickness < params.min_thickness_mm / 2:  # inscribed radius vs thickness
                continue
            mean_hu = float(hu[grown].mean())
            if not params.hu_min - 5 <= mean_hu <= params.hu_max:
                continue
            lesions.append((grown, volume, thickness, mean_hu))
        return lesions

    @staticmethod
    def _label_map(lesions: list[tuple[np.ndarray, float, float, float]], g: Geometry,
                   src: Geometry, xp: Any) -> np.ndarray:
        """The lesions numbered 1… (largest first) on the series' own voxels: the SEG
        references the series, so a lesion found on an axial grid is mapped back (nearest),
        and one too small to survive that is kept as its centre voxel."""
        label_map = np.zeros(g.shape, dtype=np.uint8)
        for i, (mask, *_rest) in enumerate(lesions, start=1):
            label_map[mask] = i
        if g is not src:  # back onto the series' own voxels (nearest), no lesion lost
            work = label_map
            label_map = to_numpy(resample(xp.asarray(work), g, src, xp, order=0))
            for i, (mask, *_rest) in enumerate(lesions, start=1):
                if not (label_map == i).any():
                    c = np.linalg.inv(src.affine) @ np.array(
                        [*g.to_patient(np.argwhere(mask).mean(axis=0)), 1.0])
                    k, r, col = (int(np.clip(round(v), 0, n - 1))
                                 for v, n in zip(c[:3], src.shape, strict=True))
                    label_map[k, r, col] = i
        return label_map

    @staticmethod
    def _report(series: SeriesInput, head: _Head,
                lesions: list[tuple[np.ndarray, float, float, float]], label_map: np.ndarray,
                g: Geometry, ctx: Context) -> Outputs:
        """Step 5: one finding per lesion (volume, diameter, centre, side, confidence), the
        SEG's segments, the key image where each lesion is largest, the critical message."""
        src = series.geometry
        midline = g.to_patient(np.argwhere(head.cavity).mean(axis=0))
        findings = [Finding(ICH, evaluations=((PRESENCE, PRESENT),),
                            source_series_uid=series.series_uid)]
        key_uids: list[str] = []
        total = 0.0
        for i, (mask, volume, thickness, mean_hu) in enumerate(lesions, start=1):
            idx = np.argwhere(mask)
            centre = g.to_patient(idx.mean(axis=0))
            points = np.array([g.to_patient(p) for p in idx[:: max(1, len(idx) // 5000)]])
            diameter = max_diameter(points)
            confidence = float(np.clip(0.5 + 0.15 * np.log2(max(volume, 0.05) / 0.5)
                                       + 0.05 * (thickness - 1.0)
                                       + 0.01 * (mean_hu - head.brain_hu - 20), 0.05, 0.99))
            # side from the lesion's offset to the cavity's centre along the patient's left
            # axis (LPS +x, whatever the slice plane; the head may be turned, so the cavity,
            # not x = 0, is the midline); within 5 mm of it: no side
            offset = float(np.dot(np.subtract(centre, midline), PATIENT_LEFT))
            side = LEFT if offset > 5 else RIGHT if offset < -5 else None
            findings.append(Finding(
                ICH, site=CRANIAL_CAVITY, laterality=side,
                measurements=(Measurement(VOLUME, round(volume, 3), "ml"),
                                   Measurement(DIAMETER, round(diameter, 1), "mm")),
                location=centre, segment=i, confidence=confidence,
                source_series_uid=series.series_uid))
            key_slice = int(np.argmax((label_map == i).sum(axis=(1, 2))))
            if series.sop_instance_uids[key_slice] not in key_uids:
                key_uids.append(series.sop_instance_uids[key_slice])
            total += volume
        segments = tuple(Segment(i, f"Hemorrhage {i}", MORPHOLOGICALLY_ALTERED, HEMORRHAGE)
                         for i in range(1, len(lesions) + 1))
        message = (f"Intracranial hemorrhage suspected: {len(lesions)} lesion(s), "
                   f"{total:.1f} mL in total, largest {lesions[0][1]:.1f} mL")
        ctx.log.info(message)
        return Outputs(
            findings=tuple(findings),
            label_maps=(LabelMap(label_map, src, segments, series.series_uid),),
            key_images=(KeyImages(tuple(key_uids)),),
            summary=message, critical=message)
