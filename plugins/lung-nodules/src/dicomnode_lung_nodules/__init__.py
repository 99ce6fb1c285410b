"""``lung-nodules``: find lung nodules on chest CT (classical baseline, no weights).

1. *Lungs*: air-like tissue (< −400 HU) inside the body, not connected to the air around the
   patient; holes filled slice by slice so vessels and nodules inside the lungs belong to
   them. Under 300 mL → not applicable (head, abdomen, MR…).
2. *Candidates, multi-scale*: Hessian "dot" filter (Li et al. 2003: |λ3|²/|λ1| where all three
   eigenvalues are negative) at scales 1.5–6 mm (scale-normalised), on the lung region; local
   maxima above ``dot_threshold``. Tubes (vessels) have one eigenvalue near zero: low response.
   (10 HU: a ground-glass nodule's contrast is half a solid one's, and so is its response.)
3. *Segmentation*: from each candidate, the connected voxels above the half-way HU between lung
   and the candidate's core, within a sphere of 2.5× its scale.
4. *False-positive reduction*: size (``min_diameter_mm``–35 mm), elongation (largest / smallest
   principal axis ≤ ``max_elongation``: vessels are long), compactness, candidates merged when
   they overlap.
5. *Measurements*: long-axis and perpendicular short-axis diameter on the slice where the
   nodule is largest (in the plane of the images: axial, or the coronal/sagittal/oblique
   plane of such a series), mean diameter (Lung-RADS uses it), volume (voxels above the
   half-way HU), consistency (solid if the core is denser than −300 HU, else sub-solid),
   centroid, and a Lung-RADS-style size category (v2022 baseline sizes: solid < 6 mm → 2,
   6–8 → 3, 8–15 → 4A, ≥ 15 → 4B; sub-solid < 30 mm → 2, ≥ 30 → 3). A size category only:
   Lung-RADS itself needs a radiologist and history.

Research use; tested on synthetic studies only (``dicomnode simulate chest-ct``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from dicomnode.plugin import (
    DIAMETER,
    GPU,
    LEFT,
    LONG_AXIS,
    MORPHOLOGICALLY_ALTERED,
    RIGHT,
    SHORT_AXIS,
    VOLUME,
    Accepts,
    Code,
    Context,
    Finding,
    Geometry,
    Inputs,
    LabelMap,
    Measurement,
    Needs,
    NotApplicable,
    Outputs,
    Params,
    Plugin,
    Segment,
    SeriesInput,
    ndimage,
    to_numpy,
)

NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung structure")
# PS3.16 has no codes for these summaries: private coding scheme 99DCMNODE
CONSISTENCY = Code("DN-CONSIST", "99DCMNODE", "Nodule consistency")
SOLID = Code("DN-SOLID", "99DCMNODE", "Solid")
SUBSOLID = Code("DN-SUBSOLID", "99DCMNODE", "Sub-solid")
SIZE_CATEGORY = Code("DN-LRSIZE", "99DCMNODE", "Lung-RADS-style size category")


def _category(code: str) -> Code:
    return Code(f"DN-LR{code}", "99DCMNODE", f"Category {code}")


class NoduleParams(Params):
    scales_mm: tuple[float, ...] = (1.5, 2.5, 4.0, 6.5, 10.0)
    dot_threshold: float = 10.0  # scale-normalised dot response, HU
    min_diameter_mm: float = 3.0
    max_diameter_mm: float = 35.0
    max_elongation: float = 2.0  # 3D: largest / smallest principal axis
    max_axis_ratio: float = 1.4  # in-plane: long / short axis (vessel junctions are oblong)
    max_candidates: int = Field(400, ge=1)
    min_slices: int = Field(16, ge=1)



IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)  # 2D cross, per slice
PATIENT_LEFT = np.array([1.0, 0.0, 0.0])  # LPS +x
MAX_GAP_MM = 3.0  # thicker slices blur small nodules away


def lung_mask(hu: Any, ndi: Any, xp: Any = np) -> Any:
    """Air inside the body (components not touching the volume's in-plane edges), holes filled
    per slice (an in-plane structuring element: one call for all slices); on ``hu``'s
    device."""
    air = hu < -400
    labels, n = ndi.label(air)
    n = int(n)
    if n == 0:
        return xp.zeros(air.shape, dtype=bool)
    border = xp.unique(xp.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    keep = xp.ones(n + 1, dtype=bool)
    keep[0] = False
    keep[border] = False
    return ndi.binary_fill_holes(keep[labels], structure=xp.asarray(IN_PLANE))


def dot_response(hu: Any, lungs: Any, spacing: tuple[float, float, float],
                 scales: tuple[float, ...], ndi: Any, xp: Any = np) -> tuple[Any, Any]:
    """(max over scales of the dot filter, the scale index that gave it), zero outside lungs;
    on ``hu``'s device (``xp``: NumPy or CuPy)."""
    vol = xp.where(lungs, xp.clip(hu, -1000, 200), -1000).astype(xp.float32)
    best = xp.zeros(hu.shape, dtype=xp.float32)
    which = xp.zeros(hu.shape, dtype=xp.int8)
    idx = xp.nonzero(lungs)
    for s_i, s in enumerate(scales):
        sigma = tuple(s / sp for sp in spacing)
        h = {}
        for a in range(3):
            for b in range(a, 3):
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                h[a, b] = ndi.gaussian_filter(vol, sigma, order=order)[idx] * s * s
        # negative definite needs negative diagonal: only those voxels get eigenvalues
        cand = (h[0, 0] < 0) & (h[1, 1] < 0) & (h[2, 2] < 0)
        m = xp.empty((int(cand.sum()), 3, 3), dtype=xp.float32)
        for (a, b), v in h.items():
            m[:, a, b] = v[cand]
            m[:, b, a] = v[cand]
        ev = xp.linalg.eigvalsh(m)  # ascending: ev[:, 0] most negative
        l1, l3 = ev[:, 0], ev[:, 2]  # |λ1| ≥ |λ3| when all are negative
        dot = xp.where(l3 < 0, (l3 * l3) / xp.maximum(-l1, 1e-3), 0.0).astype(xp.float32)
        where = tuple(i[cand] for i in idx)
        cur = best[where]
        better = dot > cur
        best[tuple(i[better] for i in where)] = dot[better]
        which[tuple(i[better] for i in where)] = s_i
    return best, which


def _feret(points: np.ndarray) -> tuple[float, float]:
    """(long axis, perpendicular short axis) of 2D points (mm)."""
    if len(points) < 2:
        return 0.0, 0.0
    pts = points
    if len(pts) > 1500:
        pts = pts[np.random.default_rng(0).choice(len(pts), 1500, replace=False)]
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    i, j = np.unravel_index(np.argmax(d), d.shape)
    axis = (pts[j] - pts[i]) / max(d[i, j], 1e-6)
    normal = np.array([-axis[1], axis[0]])
    proj = points @ normal
    return float(d[i, j]), float(proj.max() - proj.min())


def confidence(dot: float, elongation: float) -> float:
    """A heuristic score in (0, 1), the same scale in every scan (so detections from many
    scans can be ranked together, as a FROC does): stronger dot response up, elongation (vessel
    pieces, junctions) down. Not a calibrated probability."""
    z = float(np.log(max(dot, 1e-3))) - 3.0 * (elongation - 1.0)
    return round(float(1.0 / (1.0 + np.exp(-2.0 * (z - 2.5)))), 3)


def size_category(solid: bool, mean_diameter: float) -> str:
    if solid:
        return "2" if mean_diameter < 6 else "3" if mean_diameter < 8 else \
            "4A" if mean_diameter < 15 else "4B"
    return "2" if mean_diameter < 30 else "3"


@dataclass(frozen=True)
class _Chest:
    """The whole-volume results, on the host: HU, lungs, the dot filter's response, the
    index of the scale that gave it, and its local maxima above threshold (candidates)."""

    hu: np.ndarray
    lungs: np.ndarray
    dot: np.ndarray
    which: np.ndarray
    peaks: np.ndarray


class LungNodules(Plugin[NoduleParams]):
    name = "lung-nodules"
    version = "1.0.0"
    description = ("Lung nodules on chest CT (classical: lung mask, multi-scale Hessian dot "
                   "filter, shape filters) → SR + SEG with size category")
    algorithm_family = Code("123104", "DCM", "Morphological Operations")
    params_model = NoduleParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=4096, timeout_seconds=600)
    accepts = Accepts(modalities=("CT",), min_instances=1)

    @staticmethod
    def _segment(hu: np.ndarray, lungs: np.ndarray, c: np.ndarray, scale: float,
                 radius: float, lung_hu: float, spacing: tuple[float, float, float],
                 ndi: Any, opening: float) -> Any:
        """(mask in its box, box, core HU), "runs-out" if it leaves the ball, or None."""
        sz, sy, sx = spacing
        shape = np.array(hu.shape)
        lo = np.maximum(c - np.ceil(radius / np.array(spacing)).astype(int), 0)
        hi = np.minimum(c + np.ceil(radius / np.array(spacing)).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        sub = hu[box]
        zz, yy, xx = np.meshgrid(*(np.arange(a, b) - cc for a, b, cc in
                                   zip(lo, hi, c, strict=True)), indexing="ij")
        r2 = (zz * sz) ** 2 + (yy * sy) ** 2 + (xx * sx) ** 2
        ball = r2 <= radius**2
        core = float(np.median(sub[r2 <= max(scale * 0.8, 1.0) ** 2]))
        if core < -800:
            return None
        level = (lung_hu + min(core, 100.0)) / 2
        lab, _ = ndi.label((sub > level) & ball & lungs[box])
        if lab[tuple(c - lo)] == 0:
            return None
        mask = lab == lab[tuple(c - lo)]
        # detach vessels: opening with a ball (a fraction of the scale); keep the candidate's
        # part
        r_open = max(1.0, scale * opening)
        rz, ry, rx = (int(np.ceil(r_open / sp)) for sp in spacing)
        oz, oy, ox = np.meshgrid(*(np.arange(-r, r + 1) for r in (rz, ry, rx)), indexing="ij")
        structure = (oz * sz) ** 2 + (oy * sy) ** 2 + (ox * sx) ** 2 <= r_open**2
        lab2, _ = ndi.label(ndi.binary_opening(mask, structure=structure))
        if lab2[tuple(c - lo)]:
            mask = lab2 == lab2[tuple(c - lo)]
        if mask.sum() < 3:
            return None
        edge = ball & ~ndi.binary_erosion(ball)
        if (mask & edge).sum() > max(6, 0.02 * edge.sum()):
            return "runs-out"
        return mask, box, core

    @staticmethod
    def _shape(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float,
                                                                            float]:
        """(3D elongation, long axis, short axis on the image slice where it is largest)."""
        pts = np.argwhere(mask) * np.array(spacing)
        cov = np.cov(pts.T) if len(pts) > 3 else np.eye(3)
        evals = np.sort(np.linalg.eigvalsh(cov))
        elongation = float(np.sqrt(evals[2] / max(evals[0], 1e-6)))
        k = int(np.argmax(mask.sum(axis=(1, 2))))
        long_axis, short_axis = _feret(np.argwhere(mask[k]) * np.array(spacing[1:]))
        # voxel centres span one voxel less than the object
        return elongation, long_axis + spacing[2], short_axis + spacing[2]

    def run(self, inputs: Inputs, params: NoduleParams, ctx: Context) -> Outputs:
        # a study may hold a scout, thick and thin series and reformats: take the series
        # closest to axial among those with thin enough slices
        series = inputs.volume(min_slices=params.min_slices, max_gap_mm=MAX_GAP_MM)
        self._refuse_unreadable(series, params)
        chest = self._candidates(series, params, ctx.xp)
        found, label_map = self._nodules(chest, series.geometry, params, ctx)
        if not found:
            return Outputs(summary="no lung nodule found")
        return self._report(series, chest.lungs, found, label_map, ctx)

    @staticmethod
    def _refuse_unreadable(series: SeriesInput, params: NoduleParams) -> None:
        """Not CT, too few slices or slices too thick: small nodules would be blurred away,
        so the job is not applicable rather than negative."""
        g = series.geometry
        if series.modality != "CT":
            raise NotApplicable(f"needs CT, got {series.modality}")
        if g.shape[0] < params.min_slices:
            raise NotApplicable(f"{g.shape[0]} slice(s): nodule detection needs at least "
                                f"{params.min_slices} thin slices")
        if g.slice_gap_mm > MAX_GAP_MM:
            raise NotApplicable(f"slices {g.slice_gap_mm:.1f} mm apart: nodules need "
                                f"≤ {MAX_GAP_MM:g} mm")

    @staticmethod
    def _candidates(series: SeriesInput, params: NoduleParams, xp: Any) -> _Chest:
        """The whole-volume work (lungs, Hessians at every scale, peaks) on ``xp``'s device
        (CuPy on a GPU, else NumPy); refuses a scan without lungs (not a chest CT). The
        arrays the per-candidate segmentation reads come back on the host."""
        g = series.geometry
        xndi = ndimage(xp)
        hu_x = series.pixels(xp)
        voxel_ml = g.voxel_ml
        lungs_x = lung_mask(hu_x, xndi, xp)
        lung_ml = float(lungs_x.sum()) * voxel_ml
        if lung_ml < 300:
            raise NotApplicable(f"no lungs found ({lung_ml:.0f} mL of air inside the body): "
                                "not a chest CT")
        # (a gantry-tilted stack is sheared: the filters treat it as orthogonal, a small
        # error at the tilts scanners use)
        dot_x, which_x = dot_response(hu_x, lungs_x, g.spacing, params.scales_mm, xndi, xp)
        peaks_x = (dot_x == xndi.maximum_filter(dot_x, size=(3, 5, 5))) \
            & (dot_x > params.dot_threshold)
        hu, lungs, dot, which, peaks = (to_numpy(a) for a in (hu_x, lungs_x, dot_x, which_x,
                                                              peaks_x))
        return _Chest(hu, lungs, dot, which, peaks)

    def _nodules(self, chest: _Chest, g: Geometry, params: NoduleParams, ctx: Context
                 ) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Each peak, strongest first, segmented and kept if its size is a nodule's and it
        does not overlap one kept already: (nodules, label map numbering them 1…)."""
        ndi = ndimage(np)
        hu, lungs, dot, which = chest.hu, chest.lungs, chest.dot, chest.which
        voxel_ml = g.voxel_ml
        coords = np.argwhere(chest.peaks)
        order = np.argsort(-dot[chest.peaks])[: params.max_candidates]
        label_map = np.zeros(g.shape, dtype=np.uint16)
        found: list[dict[str, Any]] = []
        lung_hu = float(np.median(hu[lungs]))
        for c in coords[order]:
            if label_map[tuple(c)]:
                continue  # inside a nodule already kept
            scale = params.scales_mm[int(which[tuple(c)])]
            got, why = self._fit(hu, lungs, c, scale, lung_hu, g, params, ndi)
            if got is None:
                ctx.log.debug("candidate %s (scale %.1f): %s", c, scale, why)
                continue
            mask, box, core, elongation, long_axis, short_axis = got
            volume = float(mask.sum() * voxel_ml)
            equiv = float((6 * volume * 1000 / np.pi) ** (1 / 3))
            if not params.min_diameter_mm <= equiv <= params.max_diameter_mm:
                ctx.log.debug("candidate %s: diameter %.1f mm", c, equiv)
                continue
            full = np.zeros(g.shape, dtype=bool)
            full[box] = mask
            if (label_map[full] > 0).any():
                continue
            solid = core > -300
            mean_d = (long_axis + short_axis) / 2
            found.append({"mask": full, "volume": volume, "long": long_axis,
                          "short": short_axis, "mean": mean_d, "solid": solid,
                          "centre": g.to_patient(np.argwhere(full).mean(axis=0)),
                          "score": float(dot[tuple(c)]), "elongation": elongation})
            label_map[full] = len(found)
            ctx.log.debug("nodule %d at %s: dot %.1f core %.0f HU lung %.0f HU volume %.3f mL "
                          "elongation %.2f axes %.1f/%.1f mm", len(found), c, found[-1]["score"],
                          core, lung_hu, volume, elongation, long_axis, short_axis)
        return found, label_map

    def _fit(self, hu: np.ndarray, lungs: np.ndarray, c: np.ndarray, scale: float,
             lung_hu: float, g: Geometry, params: NoduleParams, ndi: Any) -> tuple[Any, str]:
        """(mask, box, core HU, elongation, long axis, short axis) of the nodule at ``c``, or
        None and why not. Grows the ball until the nodule fits; at each size, opens harder
        (vessels run through ground glass and hug solid nodules) until the shape is a
        nodule's."""
        got: Any = None
        why = "no region"
        radius = 2.5 * scale + 2.0
        while got is None and radius <= params.max_diameter_mm:
            for opening in (1 / 3, 1 / 2, 3 / 4):
                seg = self._segment(hu, lungs, c, scale, radius, lung_hu, g.spacing, ndi,
                                    opening)
                if seg is None or isinstance(seg, str):
                    why = seg or why
                    continue
                shape = self._shape(seg[0], g.spacing)
                if shape[0] > params.max_elongation:
                    why = f"elongation {shape[0]:.1f}"
                    continue
                if shape[1] > params.max_axis_ratio * shape[2]:
                    why = f"long/short axis {shape[1]:.1f}/{shape[2]:.1f} mm"
                    continue
                got = (*seg, *shape)
                break
            if why != "runs-out":
                break
            radius *= 1.6
        return got, why

    @staticmethod
    def _report(series: SeriesInput, lungs: np.ndarray, found: list[dict[str, Any]],
                label_map: np.ndarray, ctx: Context) -> Outputs:
        """One finding per nodule (axes, mean diameter, volume, side, consistency, size
        category, confidence) and the SEG's label map."""
        g = series.geometry
        findings = []
        segments = []
        midline = g.to_patient(np.argwhere(lungs).mean(axis=0))
        for i, f in enumerate(found, start=1):
            category = size_category(f["solid"], f["mean"])
            # which lung: the side of the body's midline (patient's left = +x in LPS)
            offset = float(np.dot(np.subtract(f["centre"], midline), PATIENT_LEFT))
            findings.append(Finding(
                NODULE, site=LUNG, laterality=LEFT if offset > 0 else RIGHT,
                measurements=(Measurement(LONG_AXIS, round(f["long"], 1), "mm"),
                              Measurement(SHORT_AXIS, round(f["short"], 1), "mm"),
                              Measurement(DIAMETER, round(f["mean"], 1), "mm"),
                              Measurement(VOLUME, round(f["volume"], 4), "ml")),
                location=f["centre"], segment=i,
                confidence=confidence(f["score"], f["elongation"]),
                source_series_uid=series.series_uid,
                evaluations=((CONSISTENCY, SOLID if f["solid"] else SUBSOLID),
                             (SIZE_CATEGORY, _category(category)))))
            segments.append(Segment(i, f"Nodule {i}", MORPHOLOGICALLY_ALTERED, NODULE))
        summary = (f"{len(found)} nodule(s); largest {max(f['mean'] for f in found):.1f} mm "
                   "mean diameter")
        ctx.log.info(summary)
        return Outputs(findings=tuple(findings),
                       label_maps=(LabelMap(label_map.astype(np.uint8) if len(found) < 256
                                            else label_map, g, tuple(segments),
                                            series.series_uid),),
                       summary=summary)
