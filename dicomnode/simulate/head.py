"""Synthetic head CT with or without intracranial hemorrhage, and its ground truth:
``dicomnode simulate head-ct``. For detector tests and benchmarks; no patient data anywhere.

Anatomy in millimetres (analytic shapes, rendered with partial-volume averaging over each
slice's thickness): scalp, a textured skull (inner/outer tables), brain with grey/white contrast
as a smooth random field, two lateral ventricles (CSF), a posterior-fossa bone ridge. Scanner
effects: beam-hardening-like streaks between dense bone (thin lines of ±8 HU), central cupping
and Gaussian noise that grows as slices thin. The head is turned (yaw) and tilted (pitch) at
random, so lesions and streaks are not axis-aligned.

Hemorrhages (50–90 HU, 0.5–50 mL): intraparenchymal (lobulated blob in the parenchyma, clear of
the ventricles), subdural (crescent along the inner table, spreading over the hemisphere),
epidural (biconvex lens against the inner table). Their size is solved for the requested volume.
Ground truth (``truth.json`` beside the DICOM files): kind, volume in mL (exact, from the
fine-sampled shape), centroid (LPS mm), mean HU, and the voxel mask as a ``truth-mask.npy``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.simulate.series import SlicePlan, slice_plan, write_ct_series

KINDS = ("iph", "sdh", "edh")
HEAD = np.array([72.0, 92.0, 78.0])  # outer semi-axes (x, y, z) mm
SKULL_MM = 6.5
SCALP_MM = 4.0


@dataclass
class Lesion:
    kind: str
    volume_ml: float
    centroid_lps: tuple[float, float, float]
    mean_hu: float


@dataclass
class HeadTruth:
    seed: int
    hemorrhage: bool
    lesions: list[Lesion] = field(default_factory=list)
    slice_mm: float = 5.0
    pixel_mm: float = 0.9
    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    z_mm: list[float] = field(default_factory=list)  # slice centres (LPS z), slice order
    orientation: str = "axial"
    plan: SlicePlan | None = None  # where the slices lie (the DICOM files say the same)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return np.asarray(rz @ rx)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.normal(size=shape), sigma)
    return np.asarray(f / (f.std() + 1e-9))


def _rho(p: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius of points p [..., 3] (1 on the surface)."""
    return np.asarray(np.sqrt(np.sum((p / axes) ** 2, axis=-1)))


def _depth(p: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Approximate distance (mm) inward from the ellipsoid surface (negative outside)."""
    rho = _rho(p, axes)
    r = np.linalg.norm(p, axis=-1)
    return np.asarray((1.0 - rho) * r / np.maximum(rho, 1e-6))


class _Shapes:
    """Lesion shapes in head coordinates (mm, origin at the head centre)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.inner = HEAD - SCALP_MM - SKULL_MM

    def ventricles(self, q: np.ndarray) -> np.ndarray:
        left = _rho(q - np.array([-7.0, -5.0, 8.0]), np.array([5.0, 24.0, 9.0])) <= 1
        right = _rho(q - np.array([7.0, -5.0, 8.0]), np.array([5.0, 24.0, 9.0])) <= 1
        return np.asarray(left | right)

    def lesion(self, kind: str, size: float, params: dict[str, Any], q: np.ndarray) -> np.ndarray:
        if kind == "iph":
            c, ax, lob = params["centre"], params["axes"] * size, params["lobes"]
            rho = _rho(q - c, ax)
            bumps = sum(0.12 * np.cos(k * np.arctan2(q[..., 1] - c[1], q[..., 0] - c[0]) + ph)
                        for k, ph in lob)
            return np.asarray(rho <= 1 + bumps)
        # extra-axial: a cap against the inner table; ``size`` is its half-angle (rad), the
        # thickness at its centre is fixed (params), the angle is solved for the volume
        depth = _depth(q, self.inner)
        direction = params["direction"]
        unit = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
        cosang = unit @ direction
        spread = float(np.cos(min(size, 1.5)))
        inside = (depth >= 0) & (cosang >= spread)
        frac = np.clip((cosang - spread) / (1 - spread), 0, 1)  # 0 at the rim, 1 at the centre
        # subdural crescent: even thickness, thinning only near the rim; epidural lens:
        # thickness falls off steeply from the centre
        t = params["thickness"]
        thick = t * np.sqrt(frac) if kind == "sdh" else t * frac**1.5
        return np.asarray(inside & (depth <= thick))


def _lesion_params(kind: str, rng: np.random.Generator, inner: np.ndarray,
                   volume_ml: float) -> dict[str, Any]:
    if kind == "iph":
        for _ in range(100):
            c = rng.uniform(-0.55, 0.55, 3) * inner * np.array([1, 1, 0.7])
            c[2] = abs(c[2]) * rng.choice([-0.6, 1.0])
            if _rho(c - np.array([np.sign(c[0]) * 7.0, -5.0, 8.0]),
                    np.array([14.0, 34.0, 18.0])) > 1:  # clear of the ventricles
                break
        return {"centre": c, "axes": rng.uniform(0.7, 1.3, 3),
                "lobes": [(int(k), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3)]}
    theta = rng.uniform(0, 2 * np.pi)
    z = rng.uniform(-0.1, 0.6)
    d = np.array([np.cos(theta), np.sin(theta) * 1.1, z])
    # thickness at the centre grows with the volume (acute subdurals: a few mm to ~1 cm over a
    # hemisphere; epidurals: thick lenses); the cap's extent is then solved for the volume
    scale = (volume_ml / 10.0) ** (1 / 3) * rng.uniform(0.8, 1.2)
    thickness = 2.5 + 2.5 * scale if kind == "sdh" else 4.0 + 6.0 * scale
    return {"direction": d / np.linalg.norm(d), "thickness": float(thickness)}


def head_ct(seed: int, *, kind: str | None = "random", volume_ml: float | None = None,
            slices: int = 40, slice_mm: float = 4.0, size: int = 256, pixel_mm: float = 0.9,
            sub: int = 3, orientation: str = "axial",
            ) -> tuple[np.ndarray, HeadTruth, np.ndarray]:
    """(HU volume [slice, row, column], truth, lesion label mask, same shape (0 = none,
    k = lesion k)).

    ``kind``: "random" (none in ~40 % of studies), "none", or one of iph/sdh/edh;
    ``volume_ml``: lesion volume (default random, log-uniform 0.5–50 mL); ``orientation``:
    one of :data:`dicomnode.simulate.ORIENTATIONS` (``tilted``: gantry tilt, a sheared stack)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        kind = None if rng.random() < 0.4 else str(rng.choice(KINDS))
    elif kind == "none":
        kind = None
    if kind is not None and kind not in KINDS:
        raise ValueError(f"hemorrhage kind {kind!r} is not one of {', '.join(KINDS)}, none")
    yaw, pitch = rng.uniform(-12, 12), rng.uniform(-10, 10)
    rot = _rotation(np.radians(yaw), np.radians(pitch))
    shapes = _Shapes(rng)
    offset = rng.uniform(-8, 8)
    # the plane's angles come from their own stream: one seed is one head and one bleed in
    # every orientation
    plan = slice_plan(orientation, np.random.default_rng([seed, 1]), slices, slice_mm, offset)
    z = np.array([plan.centre(k)[2] for k in range(slices)])
    sub_z = (np.arange(sub) - (sub - 1) / 2) * slice_mm / sub
    yx = (np.arange(size) - (size - 1) / 2) * pixel_mm
    vol = np.zeros((slices, size, size), dtype=np.float32)
    lesion_frac = np.zeros((slices, size, size), dtype=np.float32)
    target = volume_ml if volume_ml is not None else float(np.exp(rng.uniform(np.log(0.5),
                                                                              np.log(50))))
    params = _lesion_params(kind, rng, shapes.inner, target) if kind else None
    grey_white = _smooth_field(rng, (slices, size // 8, size // 8), 1.2)
    from scipy.ndimage import zoom

    grey_white = zoom(grey_white, (1, 8, 8), order=1)[:, :size, :size]
    texture = _smooth_field(rng, (slices, size, size), 1.5)
    lesion_hu = float(rng.uniform(55, 85)) if kind else 0.0

    def head_coords(k: int, depth: float) -> np.ndarray:
        return np.asarray(plan.points(k, yx, depth) @ rot)  # patient → head frame (orthonormal)

    size_param = _lesion_size(kind, params, shapes, target) if kind is not None else 1.0
    for k in range(slices):
        vol[k], lesion_frac[k] = _head_slice(
            [head_coords(k, dz) for dz in sub_z], shapes, texture[k], grey_white[k], kind,
            size_param, params, lesion_hu)
    _scanner_effects(vol, rng, yx, slice_mm)
    labels = (lesion_frac >= 0.5).astype(np.uint8)
    truth = HeadTruth(seed=seed, hemorrhage=kind is not None and bool(lesion_frac.any()),
                      slice_mm=slice_mm,
                      pixel_mm=pixel_mm, yaw_deg=float(yaw), pitch_deg=float(pitch),
                      z_mm=[float(v) for v in z], orientation=orientation, plan=plan)
    if kind is not None and lesion_frac.any():  # (a short slab may miss the lesion: then
        truth.lesions.append(  # the study truly shows none)
            _lesion_truth(kind, lesion_frac, plan, pixel_mm, slice_mm, lesion_hu))
    return vol, truth, labels.astype(np.uint8) * (1 if kind else 0)


def _lesion_truth(kind: str, lesion_frac: np.ndarray, plan: SlicePlan, pixel_mm: float,
                  slice_mm: float, lesion_hu: float) -> Lesion:
    """The lesion as rendered (partial volume counted): its volume and its weighted centroid
    in patient coordinates, what a detector's measurements are checked against."""
    voxel_ml = pixel_mm * pixel_mm * slice_mm / 1000
    idx = np.argwhere(lesion_frac > 0)
    w = lesion_frac[lesion_frac > 0]
    c = (idx * w[:, None]).sum(axis=0) / w.sum()
    centroid = plan.geometry(lesion_frac.shape, pixel_mm).to_patient(c)
    return Lesion(kind, float(w.sum() * voxel_ml), centroid, lesion_hu)


def _lesion_size(kind: str, params: dict[str, Any] | None, shapes: _Shapes,
                 target: float) -> float:
    """The lesion's size parameter that gives ``target`` mL: bisection on a coarse (2 mm)
    rendering, so the truth's volume is what was asked for whatever the lesion's shape."""
    assert params is not None
    lo, hi = (0.02, 1.5)  # half-angle of an extra-axial cap (rad)
    probe = np.stack(np.meshgrid(*(np.arange(-100, 100, 2.0),) * 3, indexing="ij"), -1)
    brain = _rho(probe, shapes.inner) <= 1
    if kind == "iph":
        r = (3 * target * 1000 / (4 * np.pi)) ** (1 / 3)
        lo, hi = r * 0.5, r * 2.0
    for _ in range(20):
        mid = (lo + hi) / 2
        m = shapes.lesion(kind, mid, params, probe) & brain
        if kind == "iph":
            m &= ~shapes.ventricles(probe)
        got = m.sum() * 2.0**3 / 1000
        lo, hi = (mid, hi) if got < target else (lo, mid)
    return (lo + hi) / 2


def _head_slice(samples: list[np.ndarray], shapes: _Shapes, texture: np.ndarray,
                grey_white: np.ndarray, kind: str | None, size_param: float,
                params: dict[str, Any] | None, lesion_hu: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(HU, lesion fraction) of one slice: the mean of its samples through the slice's
    thickness (head-frame points), each scalp, skull, brain with grey/white texture, the
    falx ridge, ventricles and the lesion — thick slices get partial volume as scanners do."""
    size = texture.shape[0]
    acc = np.zeros((size, size), dtype=np.float32)
    les = np.zeros((size, size), dtype=np.float32)
    for q in samples:
        outer = _rho(q, HEAD)
        bone_out = _rho(q, HEAD - SCALP_MM)
        inner = _rho(q, shapes.inner)
        hu = np.full((size, size), -1000.0, dtype=np.float32)
        hu[outer <= 1] = 40.0  # scalp
        skull = (bone_out <= 1) & (inner > 1)
        hu[skull] = 1100 + 250 * texture[skull]
        ridge = (_rho(q - np.array([0, 55, -45]), np.array([45, 8, 6])) <= 1) & (inner <= 1)
        brain = (inner <= 1) & ~ridge
        hu[brain] = 34 + 4 * grey_white[brain]
        hu[ridge] = 900
        hu[brain & shapes.ventricles(q)] = 6.0
        if kind is not None:
            assert params is not None
            m = shapes.lesion(kind, size_param, params, q) & brain
            if kind == "iph":
                m &= ~shapes.ventricles(q)
            hu[m] = lesion_hu
            les += m
        acc += hu
    return acc / len(samples), les / len(samples)


def _scanner_effects(vol: np.ndarray, rng: np.random.Generator, yx: np.ndarray,
                     slice_mm: float) -> None:
    """What a scanner adds, in place: streaks between dense bone, cupping, and noise
    (thinner slices: noisier), so a detector is not tuned on clean phantoms."""
    yy, xx = np.meshgrid(yx, yx, indexing="ij")
    for k in range(vol.shape[0]):
        for _ in range(int(rng.integers(1, 4))):
            ang = rng.uniform(0, np.pi)
            off = rng.normal(0, 25)
            dist = np.abs(xx * np.cos(ang) + yy * np.sin(ang) - off)
            vol[k] += rng.choice([-8.0, 8.0]) * np.exp(-(dist / 0.9) ** 2) * (vol[k] > -200)
        vol[k] -= 4.0 * np.exp(-(xx**2 + yy**2) / (2 * 40.0**2)) * (vol[k] > -200)
    vol += rng.normal(0, 5.0 * np.sqrt(5.0 / slice_mm), vol.shape).astype(np.float32)


def write_head_ct(out: Path, seed: int, **kw: Any) -> tuple[list[Path], HeadTruth]:
    """Write the study as a CT series (slice k at z_k, LPS) plus truth.json and the mask."""
    hu, truth, labels = head_ct(seed, **kw)
    files = _write(out, hu, truth)
    (out / "truth.json").write_text(truth.to_json())
    np.save(out / "truth-mask.npy", labels)
    return files, truth


def _write(out: Path, hu: np.ndarray, truth: HeadTruth) -> list[Path]:
    return write_ct_series(out, hu=hu, pixel_mm=truth.pixel_mm, slice_mm=truth.slice_mm,
                           series_description="SYNTHETIC HEAD CT", plan=truth.plan,
                           patient_id=f"SYNTH-HEAD-{truth.seed}")
