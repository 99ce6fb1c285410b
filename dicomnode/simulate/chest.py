"""Synthetic chest CT with lung nodules (or none) and its ground truth:
``dicomnode simulate chest-ct``. For detector tests and benchmarks; no patient data anywhere.

Anatomy (mm, partial volume over each slice): body with subcutaneous fat, mediastinum and heart,
spine and ribs (bone), two lungs (−860 HU parenchyma with texture) and pulmonary vessels as
branching tubes: from each hilum, random trees whose radius shrinks at each branching (6 → 0.6
mm), blurred to soft-tissue HU by partial volume. Nodules 3–30 mm: solid (lobulated spheres,
20–60 HU) or ground glass (−650…−350 HU), placed in lung parenchyma (some touching a vessel),
0–4 per scan. Noise σ 12 HU × √(1.25/slice). Truth: ``truth.json`` (per nodule: type, diameter,
volume, centroid LPS) and ``truth-mask.npy`` (nodule k = label k).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.simulate.series import SlicePlan, slice_plan, write_ct_series


@dataclass
class Nodule:
    kind: str  # "solid" | "ground-glass"
    diameter_mm: float
    volume_ml: float
    centroid_lps: tuple[float, float, float]
    hu: float


@dataclass
class ChestTruth:
    seed: int
    nodules: list[Nodule] = field(default_factory=list)
    slice_mm: float = 1.25
    pixel_mm: float = 0.8
    z_mm: list[float] = field(default_factory=list)
    orientation: str = "axial"
    plan: SlicePlan | None = None  # where the slices lie (the DICOM files say the same)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


LUNG_R = np.array([55.0, 75.0, 95.0])  # semi-axes of one lung (x, y, z)
LUNG_C = ((-70.0, 0.0, 0.0), (70.0, 0.0, 0.0))


def _inside_lungs(p: np.ndarray) -> np.ndarray:
    out = np.zeros(p.shape[:-1], dtype=bool)
    for c in LUNG_C:
        q = (p - np.array(c)) / LUNG_R
        out |= np.sum(q * q, axis=-1) <= 1
    heart = (p - np.array([25.0, -5.0, -30.0])) / np.array([55.0, 50.0, 55.0])
    return np.asarray(out & (np.sum(heart * heart, axis=-1) > 1))


def _vessel_tree(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius mm) of branching vessels from both hila."""
    segments = []
    for side in (-1, 1):
        roots = [np.array([side * 1.0, 0.0, dz]) for dz in (-0.8, 0.0, 0.8)]
        stack = [(np.array([side * 38.0, 0.0, 0.0]), d / np.linalg.norm(d), 5.0, 0)
                 for d in roots]
        while stack:
            start, direction, radius, depth = stack.pop()
            length = rng.uniform(18, 34) * (0.8 ** depth)
            d = direction + rng.normal(0, 0.35, 3)
            d /= np.linalg.norm(d)
            end = start + d * length
            if not _inside_lungs(end[None])[0] and depth > 0:
                continue
            segments.append((start, end, radius))
            if radius > 0.8 and depth < 8:
                for _ in range(2):
                    stack.append((end, d, radius * rng.uniform(0.62, 0.78), depth + 1))
    return segments


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
    return np.asarray(np.linalg.norm(p - (a + t[..., None] * ab), axis=-1))


def chest_ct(seed: int, *, nodules: int | None = None, slices: int = 120,
             slice_mm: float = 1.25, size: int = 320, pixel_mm: float = 0.8,
             sub: int = 2, specs: list[tuple[str, float]] | None = None,
             orientation: str = "axial",
             ) -> tuple[np.ndarray, ChestTruth, np.ndarray]:
    """(HU [slice, row, column], truth, nodule labels, same shape). ``specs``: (kind, diameter
    mm) of each nodule instead of random ones; ``orientation``: one of
    :data:`dicomnode.simulate.ORIENTATIONS`."""
    rng = np.random.default_rng(seed)
    count = int(rng.choice([0, 0, 1, 1, 2, 3, 4])) if nodules is None else nodules
    if specs is not None:
        count = len(specs)
    plan = slice_plan(orientation, np.random.default_rng([seed, 1]), slices, slice_mm)
    geometry = plan.geometry((slices, size, size), pixel_mm)
    z = np.array([plan.centre(k)[2] for k in range(slices)])
    yx = (np.arange(size) - (size - 1) / 2) * pixel_mm
    vessels = _vessel_tree(rng)
    truth = ChestTruth(seed=seed, slice_mm=slice_mm, pixel_mm=pixel_mm,
                       z_mm=[float(v) for v in z], orientation=orientation, plan=plan)
    zmin, zmax = (z[0] + 10, z[-1] - 10) if orientation == "axial" else (-85.0, 85.0)
    placed = _place_nodules(rng, count, specs, geometry, (zmin, zmax), slice_mm, pixel_mm)
    vol = np.zeros((slices, size, size), dtype=np.float32)
    labels_frac = np.zeros((len(placed), slices, size, size), dtype=np.float32)
    texture = rng.normal(size=(slices, size, size)).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(texture, (0.5, 2.0, 2.0))
    texture /= texture.std() + 1e-6
    for k in range(slices):
        acc = np.zeros((size, size), dtype=np.float32)
        frac = np.zeros((len(placed), size, size), dtype=np.float32)
        for dz in (np.arange(sub) - (sub - 1) / 2) * slice_mm / sub:
            p = plan.points(k, yx, dz)
            hu, lungs = _chest_tissues(p, texture[k], size)
            # vessels and nodules: only near the point of the slice plane this sample is at
            centre = plan.centre(k) + dz * plan.normal
            _draw_vessels(hu, lungs, p, vessels, centre, plan, pixel_mm)
            _draw_nodules(hu, frac, p, lungs, placed, centre, plan.normal)
            acc += hu
        vol[k] = acc / sub
        labels_frac[:, k] = frac / sub
    vol += rng.normal(0, 12.0 * np.sqrt(1.25 / slice_mm), vol.shape).astype(np.float32)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    for i, (_c, d, kind, nhu, _) in enumerate(placed):
        f = labels_frac[i]
        labels[f >= 0.5] = i + 1
        idx = np.argwhere(f > 0)
        w = f[f > 0]
        cen = (idx * w[:, None]).sum(0) / w.sum()
        truth.nodules.append(Nodule(kind, float(d), float(w.sum() * geometry.voxel_ml),
                                    geometry.to_patient(cen), nhu))
    return vol, truth, labels


_Placed = tuple[np.ndarray, float, str, float, list[tuple[int, float]]]


def _place_nodules(rng: np.random.Generator, count: int,
                   specs: list[tuple[str, float]] | None, geometry: Any,
                   z_range: tuple[float, float], slice_mm: float, pixel_mm: float
                   ) -> list[_Placed]:
    """(centre, diameter, kind, HU, lobulation) of each nodule: random places inside the
    lungs and the imaged slab (10 mm in), apart from each other; a nodule that finds no
    place in 500 tries is left out (the truth lists only those placed)."""
    to_index = np.linalg.inv(geometry.affine)
    zmin, zmax = z_range
    placed: list[_Placed] = []
    margin = np.array([10.0 / slice_mm, 10.0 / pixel_mm, 10.0 / pixel_mm])
    for n_i in range(count):
        for _attempt in range(500):
            c = np.array([rng.choice([-1, 1]) * rng.uniform(40, 100), rng.uniform(-60, 55),
                          rng.uniform(zmin, zmax)])
            d = float(np.exp(rng.uniform(np.log(3.0), np.log(30.0)))) if specs is None \
                else specs[n_i][1]
            probe = c + rng.normal(0, d / 4, (40, 3))
            if not _inside_lungs(probe).all():
                continue
            index = (to_index @ np.append(c, 1.0))[:3]  # inside the imaged slab, 10 mm in
            if np.any(index < margin) or np.any(index > np.array(geometry.shape) - 1 - margin):
                continue
            if any(np.linalg.norm(c - o[0]) < (d + o[1]) / 2 + 5 for o in placed):
                continue
            kind = ("solid" if rng.random() < 0.7 else "ground-glass") if specs is None \
                else specs[n_i][0]
            nod_hu = float(rng.uniform(20, 60) if kind == "solid"
                           else rng.uniform(-650, -350))
            lobes = [(int(k), float(rng.uniform(0, 2 * np.pi))) for k in (3, 5)]
            placed.append((c, d, kind, nod_hu, lobes))
            break
    return placed


def _chest_tissues(p: np.ndarray, texture: np.ndarray, size: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """(HU, lungs) of one sample plane at patient points ``p``: air, fat, muscle, textured
    lungs, spine and the ribs (which wind along z)."""
    xx, yy, zz = p[..., 0], p[..., 1], p[..., 2]
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = (xx / 160) ** 2 + (yy / 115) ** 2 <= 1
    hu[body] = -100.0  # fat
    muscle = (xx / 148) ** 2 + (yy / 104) ** 2 <= 1
    hu[muscle] = 45.0
    lungs = _inside_lungs(p)
    hu[lungs] = -860.0 + 25 * texture[lungs]
    spine = ((xx / 18) ** 2 + ((yy - 80) / 18) ** 2) <= 1
    hu[spine] = 700.0
    ang = np.arctan2(yy, xx)
    ring = np.abs(np.hypot(xx / 150, yy / 106) - 0.93) < 0.03
    for rib_angle in np.linspace(0.35, np.pi - 0.35, 7):
        hu[ring & (np.abs(((ang - rib_angle + zz / 60) + np.pi) % (2 * np.pi) - np.pi)
                   < 0.12)] = 650.0
        hu[ring & (np.abs(((ang + rib_angle + zz / 60) + np.pi) % (2 * np.pi) - np.pi)
                   < 0.12)] = 650.0
    return hu, lungs


def _draw_vessels(hu: np.ndarray, lungs: np.ndarray, p: np.ndarray,
                  vessels: list[tuple[np.ndarray, np.ndarray, float]], centre: np.ndarray,
                  plan: SlicePlan, pixel_mm: float) -> None:
    """Vessels (40 HU) into the lungs of ``hu``: each segment only in the window of pixels
    its bounding box covers (a distance for every pixel and segment was the slow part)."""
    size = hu.shape[0]
    normal, row, col = plan.normal, np.asarray(plan.row), np.asarray(plan.col)
    for a, b, r in vessels:
        lo = np.minimum(a, b) - r - 1
        hi = np.maximum(a, b) + r + 1
        corners = np.array([[x, y, w] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for w in (lo[2], hi[2])]) - centre
        depth = corners @ normal
        if depth.min() > 0 or depth.max() < 0:
            continue
        u = corners @ row / pixel_mm + (size - 1) / 2  # column index
        v = corners @ col / pixel_mm + (size - 1) / 2  # row index
        c0, c1 = max(int(u.min()), 0), min(int(np.ceil(u.max())) + 1, size)
        r0, r1 = max(int(v.min()), 0), min(int(np.ceil(v.max())) + 1, size)
        if c0 >= c1 or r0 >= r1:
            continue
        sel = lungs[r0:r1, c0:c1]
        if not sel.any():
            continue
        dist = _segment_distance(p[r0:r1, c0:c1][sel], a, b)
        window = hu[r0:r1, c0:c1]
        window[sel] = np.where(dist <= r, 40.0, window[sel])


def _draw_nodules(hu: np.ndarray, frac: np.ndarray, p: np.ndarray, lungs: np.ndarray,
                  placed: list[_Placed], centre: np.ndarray, normal: np.ndarray) -> None:
    """The lobulated nodules into ``hu`` (inside the lungs), each one's coverage of this
    sample added to ``frac`` (the truth's partial volume)."""
    for i, (c, d, _kind, nhu, lobes) in enumerate(placed):
        if abs(float((c - centre) @ normal)) > d:
            continue
        rel = p - c
        rr = np.linalg.norm(rel, axis=-1)
        ang_n = np.arctan2(rel[..., 1], rel[..., 0])
        bump = 1 + sum(0.08 * np.cos(kk * ang_n + ph) for kk, ph in lobes)
        m = (rr <= d / 2 * bump) & lungs
        hu[m] = nhu
        frac[i] += m


def write_chest_ct(out: Path, seed: int, **kw: Any) -> tuple[list[Path], ChestTruth]:
    hu, truth, labels = chest_ct(seed, **kw)
    files = write_ct_series(out, hu=hu, pixel_mm=truth.pixel_mm, slice_mm=truth.slice_mm,
                            series_description="SYNTHETIC CHEST CT", plan=truth.plan,
                            patient_id=f"SYNTH-CHEST-{seed}")
    (out / "truth.json").write_text(truth.to_json())
    np.save(out / "truth-mask.npy", labels)
    return files, truth
