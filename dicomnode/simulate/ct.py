"""Simulated CT raw data (DICOM-CT-PD) for tests, benchmarks and demos: ``dicomnode simulate ct``.

The forward model here is deliberately independent of any reconstruction code (no shared
projector, so tests do not commit the "inverse crime"):

* ``shepp-logan``: the Kak–Slaney head phantom as ellipsoids (3D extension with our own z
  semi-axes), projected *analytically*: each detector element's line integral is the exact
  chord length through each ellipsoid times its attenuation (point detector elements);
* ``FILE.npy``: a 2D or 3D HU volume centred on the isocentre, projected by ray marching with
  trilinear interpolation at ¼ voxel steps ("exact enough": < 0.5 % error on smooth objects).

Attenuation: μ = μ_water (1 + HU/1000), μ_water = 0.0192 mm⁻¹ by default (≈ 70 keV). With
``noise_i0``, counts are Poisson(I0·e^(−p)) and p = −ln(counts/I0) (counts ≥ 1). Everything
written is labelled synthetic (PatientName ``Synthetic^Phantom``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from dicomnode.formats.ctpd import ScanGeometry, write_tags
from dicomnode.package.series import ds_value
from dicomnode.simulate.series import ct_dataset

MU_WATER = 0.0192  # mm⁻¹
PHANTOM_RADIUS_MM = 110.0  # Shepp–Logan unit length

# Kak & Slaney (1988) Table 3.1 ellipses (relative attenuation, semi-axes a (x) b (y), centre,
# rotation in degrees; y up), with our z semi-axis c and centre z0 for a 3D head.
_SHEPP_LOGAN = np.array([
    # A      a       b       c      x0     y0       z0     phi
    [2.00, 0.6900, 0.9200, 0.810, 0.00, 0.0000, 0.00, 0.0],
    [-0.98, 0.6624, 0.8740, 0.780, 0.00, -0.0184, 0.00, 0.0],
    [-0.02, 0.1100, 0.3100, 0.220, 0.22, 0.0000, 0.00, -18.0],
    [-0.02, 0.1600, 0.4100, 0.280, -0.22, 0.0000, 0.00, 18.0],
    [0.01, 0.2100, 0.2500, 0.410, 0.00, 0.3500, 0.00, 0.0],
    [0.01, 0.0460, 0.0460, 0.050, 0.00, 0.1000, 0.00, 0.0],
    [0.01, 0.0460, 0.0460, 0.050, 0.00, -0.1000, 0.00, 0.0],
    [0.01, 0.0460, 0.0230, 0.050, -0.08, -0.6050, 0.00, 0.0],
    [0.01, 0.0230, 0.0230, 0.020, 0.00, -0.6060, 0.00, 0.0],
    [0.01, 0.0230, 0.0460, 0.020, 0.06, -0.6050, 0.00, 0.0],
])


def _ellipsoids(radius_mm: float = PHANTOM_RADIUS_MM) -> list[tuple[float, np.ndarray,
                                                                      np.ndarray, np.ndarray]]:
    """(relative attenuation, centre (x, y, z) mm, semi-axes mm, rotation matrix) in the
    scanner/LPS frame (y down: the table's y is flipped so the phantom looks as printed)."""
    out = []
    for amp, a, b, c, x0, y0, z0, phi in _SHEPP_LOGAN:
        t = np.deg2rad(phi)
        rot = np.array([[np.cos(t), np.sin(t), 0], [-np.sin(t), np.cos(t), 0], [0, 0, 1]])
        out.append((float(amp), np.array([x0, -y0, z0]) * radius_mm,
                    np.array([a, b, c]) * radius_mm, rot))
    return out


def shepp_logan_hu(shape: tuple[int, int, int], voxel_mm: float) -> np.ndarray:
    """The phantom sampled at voxel centres, HU [z, y, x], grid centred on the isocentre."""
    nz, ny, nx = shape
    z = (np.arange(nz) - (nz - 1) / 2) * voxel_mm
    y = (np.arange(ny) - (ny - 1) / 2) * voxel_mm
    x = (np.arange(nx) - (nx - 1) / 2) * voxel_mm
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1)
    rel = np.zeros(shape)
    for amp, centre, axes, rot in _ellipsoids():
        q = (pts - centre) @ rot.T / axes
        rel += amp * (np.sum(q * q, axis=-1) <= 1.0)
    return ((rel - 1.0) * 1000.0).astype(np.float32)


def detector_rays(g: ScanGeometry, view: int) -> tuple[np.ndarray, np.ndarray]:
    """(origins, unit directions) [rows, columns, 3] of the rays of one projection.

    Conventions (shared with reconstruction through :mod:`dicomnode.formats.ctpd` only): the
    source is at (−R sin φ, R cos φ, z); the central ray n = (sin φ, −cos φ, 0) runs from the
    source through the isocentre; columns increase along e_u = (cos φ, sin φ, 0); rows along +z.
    Parallel beams run along n, detector coordinate u = p·e_u.
    """
    phi = float(g.angles[view])
    n = np.array([np.sin(phi), -np.cos(phi), 0.0])
    eu = np.array([np.cos(phi), np.sin(phi), 0.0])
    ez = np.array([0.0, 0.0, 1.0])
    u = (np.arange(g.columns) - g.u0) * g.du
    v = (np.arange(g.rows) - g.v0) * g.dv
    vv, uu = np.meshgrid(v, u, indexing="ij")
    if g.kind == "parallel":
        far = 1e4
        origins = (uu[..., None] * eu + (vv + g.z)[..., None] * ez) - far * n
        dirs = np.broadcast_to(n, origins.shape).copy()
        return origins, dirs
    source = np.array([-g.sod * np.sin(phi), g.sod * np.cos(phi), g.source_z[view]])
    if g.detector == "cylindrical":
        gamma = uu / g.sdd
        pts = (source + g.sdd * (np.cos(gamma)[..., None] * n + np.sin(gamma)[..., None] * eu)
               + vv[..., None] * ez)
    else:
        pts = source + g.sdd * n + uu[..., None] * eu + vv[..., None] * ez
    d = pts - source
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return np.broadcast_to(source, d.shape).copy(), d


def project_shepp_logan(g: ScanGeometry, mu_water: float = MU_WATER) -> np.ndarray:
    """Exact line integrals [views, rows, columns] through the ellipsoid phantom."""
    sino = np.zeros((g.views, g.rows, g.columns))
    shapes = _ellipsoids()
    for k in range(g.views):
        s, d = detector_rays(g, k)
        for amp, centre, axes, rot in shapes:
            s1 = (s - centre) @ rot.T / axes
            d1 = d @ rot.T / axes
            a = np.sum(d1 * d1, axis=-1)
            b = np.sum(s1 * d1, axis=-1)
            c = np.sum(s1 * s1, axis=-1) - 1.0
            disc = np.maximum(b * b - a * c, 0.0)
            sino[k] += amp * mu_water * 2.0 * np.sqrt(disc) / a
    return sino.astype(np.float32)


def project_volume(hu: np.ndarray, voxel_mm: float, g: ScanGeometry,
                   mu_water: float = MU_WATER) -> np.ndarray:
    """Line integrals through a HU volume [z, y, x] (2D input: one slice) by ray marching."""
    from scipy.ndimage import map_coordinates

    vol = np.atleast_3d(hu.astype(np.float32)) if hu.ndim == 3 else hu[None].astype(np.float32)
    mu = np.clip(mu_water * (1.0 + vol / 1000.0), 0.0, None)
    nz, ny, nx = mu.shape
    half = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]) * voxel_mm
    reach = float(np.linalg.norm(half)) + voxel_mm
    step = voxel_mm / 4
    ts = np.arange(-reach, reach + step, step)
    sino = np.zeros((g.views, g.rows, g.columns), dtype=np.float32)
    for k in range(g.views):
        s, d = detector_rays(g, k)
        # start each ray at its closest approach to the isocentre minus the reach
        t0 = -np.sum(s * d, axis=-1)
        pts = s[..., None, :] + (t0[..., None] + ts)[..., None] * d[..., None, :]
        idx = (pts + half) / voxel_mm  # (x, y, z) index
        if nz == 1:
            coords = [idx[..., 1].ravel(), idx[..., 0].ravel()]
            vals = map_coordinates(mu[0], coords, order=1, mode="constant", cval=0.0)
        else:
            coords = [idx[..., 2].ravel(), idx[..., 1].ravel(), idx[..., 0].ravel()]
            vals = map_coordinates(mu, coords, order=1, mode="constant", cval=0.0)
        sino[k] = vals.reshape(pts.shape[:-1]).sum(axis=-1) * step
    return sino


def make_geometry(kind: str, views: int, columns: int, rows: int = 1, *,
                  detector: str = "cylindrical", sod: float = 595.0, sdd: float = 1085.6,
                  fov_mm: float = 250.0, arc_deg: float = 360.0, row_mm: float | None = None,
                  mu_water: float = MU_WATER, pitch: float = 0.5,
                  turns: float = 4.0) -> ScanGeometry:
    """A circular scan whose detector covers ``fov_mm`` at the isocentre (default distances
    are those of a clinical scanner). Parallel scans cover 180° unless ``arc_deg`` says.

    ``helical``: a cone beam whose source advances along z by ``pitch`` × the detector's z
    coverage at the isocentre per turn, for ``turns`` turns of ``views`` views each, centred
    on z = 0."""
    if kind == "helical":
        if rows < 2:
            raise ValueError("a helical scan needs a detector of two or more rows")
        if not 0 < pitch <= 2 or turns < 1:
            raise ValueError("helical: 0 < pitch ≤ 2 and at least one turn")
        base = make_geometry("cone", views, columns, rows, detector=detector, sod=sod, sdd=sdd,
                             fov_mm=fov_mm, row_mm=row_mm, mu_water=mu_water)
        total = round(views * turns)
        angles = np.arange(total) * 2 * np.pi / views
        feed = pitch * rows * base.dv / base.magnification
        zs = (angles / (2 * np.pi) - total / views / 2) * feed
        return replace(base, angles=angles, z=float(zs[0]), z_per_view=zs)
    if kind not in ("parallel", "fan", "cone"):
        raise ValueError(f"geometry {kind!r} is not parallel, fan, cone or helical")
    if kind == "fan" and rows != 1:
        raise ValueError("a fan-beam scan has one detector row (use cone for more)")
    if kind == "parallel" and arc_deg == 360.0:
        arc_deg = 180.0
    angles = np.arange(views) * np.deg2rad(arc_deg) / views
    mag = 1.0 if kind == "parallel" else sdd / sod
    if kind == "parallel":
        du = fov_mm / columns
    elif detector == "cylindrical":
        du = 2 * np.arcsin(fov_mm / 2 / sod) * sdd / columns
    else:
        du = 2 * fov_mm / 2 / np.sqrt(sod**2 - (fov_mm / 2) ** 2) * sdd / columns
    dv = (row_mm if row_mm is not None else fov_mm / max(columns, 1)) * mag
    return ScanGeometry(kind=kind, detector="flat" if kind == "parallel" else detector,
                        angles=angles, rows=rows, columns=columns, du=float(du), dv=float(dv),
                        u0=(columns - 1) / 2 + (0.25 if kind != "parallel" else 0.0),
                        v0=(rows - 1) / 2, sod=0.0 if kind == "parallel" else sod,
                        sdd=0.0 if kind == "parallel" else sdd, z=0.0, mu_water=mu_water)


def add_noise(sino: np.ndarray, i0: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.maximum(rng.poisson(i0 * np.exp(-sino.astype(np.float64))), 1)
    return (-np.log(counts / i0)).astype(np.float32)


def write_ctpd_series(out: Path, g: ScanGeometry, sino: np.ndarray, *,
                      study_uid: str | None = None, patient_id: str = "SYNTH-CTPD",
                      description: str = "SYNTHETIC CT RAW DATA (DICOM-CT-PD)") -> list[Path]:
    """One CT Image Storage instance per projection, DICOM-CT-PD tags, uint16 line integrals."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    slope = max(float(sino.max()), 1e-6) / 65000.0
    files = []
    for k in range(g.views):
        path = out / f"proj{k:05d}.dcm"
        ds = ct_dataset(path, study_uid, series, frame, patient_id=patient_id,
                        patient_name="Synthetic^Phantom", accession="SYNRAW1",
                        series_number=2, instance_number=k + 1, description=description)
        ds.ImagePositionPatient = [0, 0, ds_value(float(g.source_z[k]))]
        ds.PixelSpacing, ds.SliceThickness = [ds_value(g.dv), ds_value(g.du)], ds_value(g.dv)
        ds.Rows, ds.Columns = g.rows, g.columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, ds_value(slope), "US"
        write_tags(ds, g, k)
        stored = np.clip(np.rint(sino[k] / float(ds.RescaleSlope)), 0, 65535)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def simulate_ct(out: Path, phantom: str, kind: str, views: int, columns: int, rows: int = 1,
                *, detector: str = "cylindrical", noise_i0: float | None = None,
                voxel_mm: float = 0.5, arc_deg: float = 360.0, seed: int = 0,
                fov_mm: float = 250.0, pitch: float = 0.5,
                turns: float = 4.0) -> tuple[ScanGeometry, np.ndarray]:
    """Simulate and write one scan; returns what was written (geometry, line integrals)."""
    hu = None if phantom == "shepp-logan" else np.load(phantom)
    if hu is not None and hu.ndim not in (2, 3):
        raise ValueError(f"{phantom}: a phantom is a 2D or 3D array, not {hu.ndim}D")
    # a 3D volume on a multi-row detector: one row per voxel layer at the isocentre
    row_mm = voxel_mm if hu is not None and hu.ndim == 3 and rows > 1 else None
    g = make_geometry(kind, views, columns, rows, detector=detector, arc_deg=arc_deg,
                      fov_mm=fov_mm, pitch=pitch, turns=turns, row_mm=row_mm)
    sino = project_shepp_logan(g) if hu is None else project_volume(hu, voxel_mm, g)
    if noise_i0:
        sino = add_noise(sino, noise_i0, seed)
    write_ctpd_series(out, g, sino)
    return g, sino
