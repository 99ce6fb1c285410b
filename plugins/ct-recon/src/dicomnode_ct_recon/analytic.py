"""Filtered backprojection: parallel and fan beam (flat and equiangular detectors), short scans
with Parker weights, and FDK for circular cone beam. One function, any geometry, NumPy or CuPy.

The ramp filter is the *discrete* band-limited kernel (Kak & Slaney, eqs. 3.61 and 3.108), not a
sampled |ω|: it has no DC error, so flat regions come out at the right level without a
calibration step. Windows (Shepp–Logan, cosine, Hann) multiply its spectrum. Redundancy is
handled by per-ray weights: 1 for a parallel half turn, ½ for any full turn, Parker's for a fan or
cone short scan (π + fan angle ≤ range < 2π).

Helical cone beam: FDK generalised to a moving source (Wang et al., Med. Phys. 1993): every view
whose rays reach a voxel is backprojected into it with the FDK weights times a cos² window over
the detector rows, and each voxel is normalised by the sum of those weights over the views that
reached it (π / Φ(x) in place of the circular scan's ½ per full turn), computed by
backprojecting the window with the same interpolation, and scaled by the full-turn mean of
FDK's distance weight at that voxel (the views a voxel sees are not a fair sample of it).
Approximate, like circular FDK away from its mid-plane; the iterative methods use the exact
helical projector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dicomnode.plugin import RawDataError, ScanGeometry
from dicomnode_ct_recon.projector import Grid, Projector

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")


def _window(name: str, f: np.ndarray) -> np.ndarray:
    """Window over normalised frequency f ∈ [−½, ½) (cycles per sample)."""
    if name == "ram-lak":
        return np.ones_like(f)
    w: np.ndarray
    if name == "shepp-logan":
        w = np.sinc(f)
    elif name == "cosine":
        w = np.cos(np.pi * f)
    elif name == "hann":
        w = 0.5 * (1 + np.cos(2 * np.pi * f))
    else:
            raise ValueError(f"unknown filter {name!r}; choose one of {', '.join(FILTERS)}")
    return w


def ramp_spectrum(n_det: int, spacing: float, name: str, equiangular: bool = False) -> tuple[
        np.ndarray, int]:
    """(spectrum of length P, P) of the discrete ramp kernel × spacing, zero-padded to P ≥ 2n.

    ``spacing`` is the detector sampling (mm at the isocentre, or rad for equiangular data,
    whose kernel has sin(nα) in place of nα)."""
    size = 1 << int(np.ceil(np.log2(2 * n_det)))
    n = np.concatenate([np.arange(0, size // 2 + 1), np.arange(-(size // 2) + 1, 0)])
    h = np.zeros(size)
    h[0] = 1.0 / (4 * spacing**2)
    odd = n % 2 == 1
    arg = np.sin(n[odd] * spacing) if equiangular else n[odd] * spacing
    h[odd] = -1.0 / (np.pi**2 * arg**2)
    spectrum = np.real(np.fft.fft(h)) * spacing
    return spectrum * _window(name, np.fft.fftfreq(size)), size


def parker_weights(g: ScanGeometry, gamma: np.ndarray) -> np.ndarray:
    """Parker (1982) weights [views, columns] for a short scan over ``gamma`` (fan angles).

    δ is taken from the covered range (π + 2δ), not the fan: a scan longer than the minimum
    then gets Parker's weights of a wider virtual fan, still exact in redundancy (Silver 2000).
    """
    delta = (g.angular_range - np.pi) / 2
    beta = np.abs(g.angles - g.angles[0])[:, None]
    gam = gamma[None, :]
    w = np.ones((g.views, gamma.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = beta < 2 * (delta - gam)
        w = np.where(rise, np.sin(np.pi / 4 * beta / (delta - gam)) ** 2, w)
        fall = beta > np.pi - 2 * gam
        w = np.where(fall, np.sin(np.pi / 4 * (np.pi + 2 * delta - beta) / (delta + gam)) ** 2,
                     w)
    return np.nan_to_num(np.clip(w, 0.0, 1.0))


def redundancy(g: ScanGeometry, gamma: np.ndarray) -> np.ndarray:
    """Weights [views, columns] so that every line through the object counts once."""
    full = 2 * np.pi
    covered = g.angular_range
    if g.kind == "parallel":
        if covered < np.pi * 0.99:
            raise RawDataError(f"parallel scan covers {np.degrees(covered):.0f}°: FBP needs "
                               "180°")
        return np.full((g.views, gamma.size), np.pi / covered)
    if covered >= full * 0.995:
        return np.full((g.views, gamma.size), full / covered / 2)
    needed = np.pi + 2 * g.fan_half_angle
    if covered < needed * 0.99:
        raise RawDataError(f"scan covers {np.degrees(covered):.0f}°: a short scan needs "
                           f"{np.degrees(needed):.0f}° (180° + fan angle)")
    return parker_weights(g, gamma)


def fbp(sino: Any, g: ScanGeometry, grid: Grid, filter_name: str = "shepp-logan",
        xp: Any = np, projector: Projector | None = None) -> Any:
    """Attenuation μ (mm⁻¹) on ``grid`` from line integrals ``sino`` [views, rows, columns].

    FDK when the detector has several rows and the beam diverges; plain FBP otherwise."""
    p = projector or Projector(g, grid, xp)
    s = xp.asarray(sino, dtype=xp.float32)
    cols: np.ndarray = np.arange(g.columns) - g.u0
    rows = np.arange(g.rows) - g.v0
    if g.kind == "parallel":
        gamma = np.zeros(g.columns)
        pre = np.ones((g.rows, g.columns))
        spacing, equiangular = g.du, False
    elif g.detector == "flat":
        scale = g.sod / g.sdd  # the virtual detector through the isocentre
        u = cols * g.du * scale
        v = rows * g.dv * scale
        gamma = np.arctan(u / g.sod)
        pre = g.sod / np.sqrt(g.sod**2 + u[None, :] ** 2 + v[:, None] ** 2)
        spacing, equiangular = g.du * scale, False
    else:
        gamma = cols * g.du / g.sdd
        v = rows * g.dv
        cone = g.sdd / np.sqrt(g.sdd**2 + v**2)
        pre = np.cos(gamma)[None, :] * cone[:, None] / g.sod
        spacing, equiangular = g.du / g.sdd, True
    step = g.angular_range / g.views
    # [views, columns]; helical: normalised per voxel after the backprojection instead
    weights = np.ones((g.views, gamma.size)) if g.helical else redundancy(g, gamma) * step
    spectrum, size = ramp_spectrum(g.columns, spacing, filter_name, equiangular)
    weighted = s * xp.asarray(pre[None, :, :] * weights[:, None, :], dtype=xp.float32)
    filtered = xp.fft.irfft(xp.fft.rfft(weighted, n=size, axis=-1)
                            * xp.asarray(spectrum[: size // 2 + 1], dtype=xp.complex64),
                            n=size, axis=-1)[..., : g.columns]
    if not g.helical:
        return p.back(xp.ascontiguousarray(filtered.astype(xp.float32)), weighting="fbp")
    taper = xp.asarray(row_taper(g.rows), dtype=xp.float32)[None, :, None]
    image = p.back(xp.ascontiguousarray((filtered * taper).astype(xp.float32)), weighting="fbp")
    # Σ taper·U over the views that reach each voxel (U: FDK's distance weight), and U's mean
    # over a full turn: the views a voxel sees are not a fair sample of U (near the source its
    # projection is magnified, so it leaves the detector sooner), and FDK's sums assume one
    seen = p.back(xp.broadcast_to(taper, p.sino_shape).astype(xp.float32), weighting="fbp")
    r2 = xp.asarray((grid.x0 + np.arange(grid.nx) * grid.dx)[None, None, :] ** 2
                    + (grid.y0 + np.arange(grid.ny) * grid.dx)[None, :, None] ** 2,
                    dtype=xp.float32)
    big = g.sod**2
    mean_u = big / xp.maximum(big - r2, 1e-6) if g.detector == "cylindrical" else \
        g.sod**3 / xp.maximum(big - r2, 1e-6) ** 1.5
    ok = seen > 1e-3 * float(seen.max())
    return xp.where(ok, image * (np.pi * mean_u / xp.where(ok, seen, 1.0)), 0).astype(
        xp.float32)


def row_taper(rows: int) -> np.ndarray:
    """Weights of the detector rows for helical FDK: a cos² window over the detector height,
    so that a voxel enters and leaves the cone gently instead of by a hard step (the step
    streaks, and narrower tapers broke down at pitch 1: see docs/ct-recon.md)."""
    t = (np.arange(rows) - (rows - 1) / 2) / (rows / 2)  # −1 … 1 over the rows
    weights: np.ndarray = np.cos(np.pi / 2 * t) ** 2
    return weights


def to_hu(mu: Any, mu_water: float) -> Any:
    return (mu - mu_water) * (1000.0 / mu_water)
