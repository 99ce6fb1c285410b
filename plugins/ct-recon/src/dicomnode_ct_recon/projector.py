"""Voxel-driven projector / backprojector pair for parallel, fan and circular cone beams.

One geometry model, two back ends:

* CPU: Numba kernels (compiled once, cached on disk), parallel over image rows for the
  backprojection (gather, no write conflicts) and over views for the forward projection
  (each view owns its detector row: no atomics);
* NumPy or CuPy (``xp``): the same arithmetic vectorised over the voxels of one view at a time.
  This is the GPU path (CuPy), and on the CPU the reference the Numba kernels are tested against.

Each voxel centre is mapped to a fractional detector (column, row) per view and read with
linear interpolation. ``weighting``:

* ``"fbp"``: the distance weight of filtered backprojection: 1 (parallel), (R/a)² (flat
  detector, a = depth of the voxel along the central ray), (R/L)² (cylindrical, L = in-plane
  distance source → voxel);
* ``"matched"``: voxel volume ÷ the footprint of one detector cell at the voxel, so that the
  forward projection approximates line integrals (mm) and the backprojection is its exact
  transpose (adjoint test in the test suite).

Conventions (from :mod:`dicomnode.formats.ctpd`): source at (−R sin φ, R cos φ, z_s), z_s per view
(constant for a circular scan, advancing for a helical one); central ray
n = (sin φ, −cos φ, 0); columns along e_u = (cos φ, sin φ, 0); rows along +z.
"""

# Numba: int(math.floor(x)) keeps the index an integer type in compiled code too.
# ruff: noqa: RUF046

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from dicomnode.plugin import ScanGeometry

MODES = {"parallel": 0, "flat": 1, "cylindrical": 2}


@dataclass(frozen=True)
class Grid:
    """Output voxel grid [z, y, x], centred on the isocentre in x/y, ``z`` slice centres (mm)."""

    nx: int
    ny: int
    dx: float  # in-plane voxel size (mm)
    z: np.ndarray  # slice centre positions (mm)
    dz: float  # slice spacing (mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.z.size), self.ny, self.nx)

    @property
    def x0(self) -> float:
        return -(self.nx - 1) / 2 * self.dx

    @property
    def y0(self) -> float:
        return -(self.ny - 1) / 2 * self.dx


def mode_of(g: ScanGeometry) -> int:
    return MODES["parallel"] if g.kind == "parallel" else MODES[g.detector]


@njit(inline="always", fastmath=True)
def _map(mode: int, x: float, y: float, z: float, c: float, s: float, sod: float, sdd: float,
         du: float, dv: float, u0: float, v0: float, zs: float, two_d: bool, vox: float,
         matched: bool) -> tuple[float, float, float]:
    """(column, row, weight) of voxel (x, y, z) in the view with cos φ = c, sin φ = s and
    source height zs."""
    b = x * c + y * s
    if mode == 0:
        col = b / du + u0
        row = 0.0 if two_d else (z - zs) / dv + v0
        w = (vox / du if two_d else vox / (du * dv)) if matched else 1.0
        return col, row, w
    a = x * s - y * c + sod
    if a <= 1e-6:
        return -1e9, 0.0, 0.0
    if mode == 1:
        col = b * sdd / (a * du) + u0
        row = 0.0 if two_d else (z - zs) * sdd / (a * dv) + v0
        if matched:
            lin = math.sqrt(a * a + b * b)
            wu = du * a / sdd * a / lin  # cell width at the voxel, perpendicular to the ray
            w = vox / wu if two_d else vox / (wu * dv * a / sdd)
        else:
            w = (sod / a) * (sod / a)
        return col, row, w
    lin = math.sqrt(a * a + b * b)
    col = math.atan2(b, a) * sdd / du + u0
    row = 0.0 if two_d else (z - zs) * sdd / (lin * dv) + v0
    if matched:
        wu = du / sdd * lin
        w = vox / wu if two_d else vox / (wu * dv * lin / sdd)
    else:
        w = (sod / lin) * (sod / lin)
    return col, row, w


@njit(parallel=True, fastmath=True, cache=True)
def _bp_numba(sino: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray,
              x0: float, y0: float, dx: float, zc: np.ndarray, mode: int, sod: float,
              sdd: float, du: float, dv: float, u0: float, v0: float, zs: np.ndarray,
              vox: float, matched: bool) -> None:
    nv, nrow, ncol = sino.shape
    nz, ny, nx = out.shape
    two_d = nrow == 1 and nz == 1
    for zy in prange(nz * ny):
        iz = zy // ny
        iy = zy - iz * ny
        y = y0 + iy * dx
        z = zc[iz]
        acc = np.zeros(nx, dtype=np.float32)
        for k in range(nv):
            c = cos[k]
            s = sin[k]
            proj = sino[k]
            if mode == 0 and two_d:
                # the hot path of 2D parallel FBP: the column is linear in x
                col = (x0 * c + y * s) / du + u0
                step = dx * c / du
                wgt = vox / du if matched else 1.0
                for ix in range(nx):
                    i0 = int(math.floor(col))
                    if 0 <= i0 < ncol - 1:
                        f = col - i0
                        acc[ix] += wgt * ((1.0 - f) * proj[0, i0] + f * proj[0, i0 + 1])
                    col += step
                continue
            for ix in range(nx):
                x = x0 + ix * dx
                col, row, w = _map(mode, x, y, z, c, s, sod, sdd, du, dv, u0, v0, zs[k],
                                   two_d, vox, matched)
                i0 = int(math.floor(col))
                if i0 < 0 or i0 >= ncol - 1:
                    continue
                f = col - i0
                if two_d:
                    acc[ix] += w * ((1.0 - f) * proj[0, i0] + f * proj[0, i0 + 1])
                    continue
                j0 = int(math.floor(row))
                if j0 < 0 or j0 >= nrow - 1:
                    continue
                g = row - j0
                acc[ix] += w * ((1.0 - g) * ((1.0 - f) * proj[j0, i0] + f * proj[j0, i0 + 1])
                                + g * ((1.0 - f) * proj[j0 + 1, i0]
                                       + f * proj[j0 + 1, i0 + 1]))
        for ix in range(nx):
            out[iz, iy, ix] += acc[ix]


@njit(parallel=True, fastmath=True, cache=True)
def _fp_numba(vol: np.ndarray, cos: np.ndarray, sin: np.ndarray, sino: np.ndarray,
              x0: float, y0: float, dx: float, zc: np.ndarray, mode: int, sod: float,
              sdd: float, du: float, dv: float, u0: float, v0: float, zs: np.ndarray,
              vox: float) -> None:
    """Exact transpose of ``_bp_numba(matched=True)``: splat each voxel into its cells."""
    nv, nrow, ncol = sino.shape
    nz, ny, nx = vol.shape
    two_d = nrow == 1 and nz == 1
    for k in prange(nv):
        c = cos[k]
        s = sin[k]
        proj = sino[k]
        for iz in range(nz):
            z = zc[iz]
            for iy in range(ny):
                y = y0 + iy * dx
                for ix in range(nx):
                    val = vol[iz, iy, ix]
                    if val == 0.0:
                        continue
                    x = x0 + ix * dx
                    col, row, w = _map(mode, x, y, z, c, s, sod, sdd, du, dv, u0, v0, zs[k],
                                       two_d, vox, True)
                    i0 = int(math.floor(col))
                    if i0 < 0 or i0 >= ncol - 1:
                        continue
                    f = col - i0
                    wv = w * val
                    if two_d:
                        proj[0, i0] += (1.0 - f) * wv
                        proj[0, i0 + 1] += f * wv
                        continue
                    j0 = int(math.floor(row))
                    if j0 < 0 or j0 >= nrow - 1:
                        continue
                    g = row - j0
                    proj[j0, i0] += (1.0 - g) * (1.0 - f) * wv
                    proj[j0, i0 + 1] += (1.0 - g) * f * wv
                    proj[j0 + 1, i0] += g * (1.0 - f) * wv
                    proj[j0 + 1, i0 + 1] += g * f * wv


class Projector:
    """A = forward projection (line integrals, mm), A.T = its transpose, and the weighted FBP
    backprojection, for one scan geometry and output grid, on ``xp`` (numpy or cupy)."""

    def __init__(self, g: ScanGeometry, grid: Grid, xp: Any = np,
                 backend: str | None = None) -> None:
        """``backend``: ``"numba"`` (CPU default) or ``"xp"`` (default when ``xp`` is CuPy;
        with NumPy it is the reference implementation the tests compare against)."""
        self.g, self.grid, self.xp = g, grid, xp
        self.mode = mode_of(g)
        self.cos = np.cos(g.angles).astype(np.float64)
        self.sin = np.sin(g.angles).astype(np.float64)
        self.zs = g.source_z
        self.vox = grid.dx * grid.dx * (1.0 if self._two_d else grid.dz)
        self.gpu = backend == "xp" or (backend is None and xp is not np)
        if self.gpu:
            z, y, x = np.meshgrid(grid.z, grid.y0 + np.arange(grid.ny) * grid.dx,
                                  grid.x0 + np.arange(grid.nx) * grid.dx, indexing="ij")
            self._xyz = tuple(xp.asarray(a.ravel(), dtype=xp.float32) for a in (x, y, z))

    @property
    def _two_d(self) -> bool:
        return self.g.rows == 1 and self.grid.shape[0] == 1

    @property
    def sino_shape(self) -> tuple[int, int, int]:
        return (self.g.views, self.g.rows, self.g.columns)

    def _args(self, idx: np.ndarray) -> tuple[Any, ...]:
        g, grid = self.g, self.grid
        return (grid.x0, grid.y0, grid.dx, np.asarray(grid.z, dtype=np.float64), self.mode,
                g.sod, g.sdd, g.du, g.dv, g.u0, g.v0, np.ascontiguousarray(self.zs[idx]),
                self.vox)

    def back(self, sino: Any, weighting: str = "matched", views: Any = None) -> Any:
        """Backprojection of ``sino`` [views, rows, columns] onto the grid; ``weighting``:
        ``"matched"`` (A.T) or ``"fbp"`` (see the module docstring)."""
        matched = weighting == "matched"
        idx = np.arange(self.g.views) if views is None else np.asarray(views)
        if self.gpu:
            return self._back_xp(sino, matched, idx)
        out = np.zeros(self.grid.shape, dtype=np.float32)
        _bp_numba(  # type: ignore[call-arg]
            np.ascontiguousarray(sino, dtype=np.float32), self.cos[idx], self.sin[idx],
            out, *self._args(idx), matched)
        return out

    def forward(self, vol: Any, views: Any = None) -> Any:
        """Line integrals (mm × voxel unit) of ``vol`` for the given views (default all)."""
        idx = np.arange(self.g.views) if views is None else np.asarray(views)
        if self.gpu:
            return self._forward_xp(vol, idx)
        sino = np.zeros((idx.size, self.g.rows, self.g.columns), dtype=np.float32)
        _fp_numba(np.ascontiguousarray(vol, dtype=np.float32), self.cos[idx], self.sin[idx],
                  sino, *self._args(idx))
        return sino

    # --- the xp (NumPy/CuPy) path -------------------------------------------------------------

    def _map_xp(self, k: int, matched: bool) -> tuple[Any, Any, Any]:
        xp, g = self.xp, self.g
        x, y, z = self._xyz
        c, s, zs = float(self.cos[k]), float(self.sin[k]), float(self.zs[k])
        b = x * c + y * s
        two_d = self._two_d
        if self.mode == 0:
            col = b / g.du + g.u0
            row = xp.zeros_like(col) if two_d else (z - zs) / g.dv + g.v0
            w = xp.full_like(col, self.vox / g.du if two_d else self.vox / (g.du * g.dv)) \
                if matched else xp.ones_like(col)
            return col, row, w
        a = xp.maximum(x * s - y * c + g.sod, 1e-6)
        lin = xp.sqrt(a * a + b * b)
        if self.mode == 1:
            col = b * g.sdd / (a * g.du) + g.u0
            row = xp.zeros_like(col) if two_d else (z - zs) * g.sdd / (a * g.dv) + g.v0
            if matched:
                wu = g.du * a / g.sdd * a / lin
                w = self.vox / wu if two_d else self.vox / (wu * g.dv * a / g.sdd)
            else:
                w = (g.sod / a) ** 2
            return col, row, w
        col = xp.arctan2(b, a) * g.sdd / g.du + g.u0
        row = xp.zeros_like(col) if two_d else (z - zs) * g.sdd / (lin * g.dv) + g.v0
        if matched:
            wu = g.du / g.sdd * lin
            w = self.vox / wu if two_d else self.vox / (wu * g.dv * lin / g.sdd)
        else:
            w = (g.sod / lin) ** 2
        return col, row, w

    def _taps(self, col: Any, row: Any, w: Any) -> list[tuple[Any, Any]]:
        """(flat detector index, weight) of the 2 or 4 interpolation taps; invalid → weight 0."""
        xp, g = self.xp, self.g
        i0 = xp.floor(col)
        f = col - i0
        ok = (i0 >= 0) & (i0 < g.columns - 1)
        if self._two_d:
            i = xp.where(ok, i0, 0).astype(xp.int64)
            wv = xp.where(ok, w, 0)
            return [(i, wv * (1 - f)), (i + 1, wv * f)]
        j0 = xp.floor(row)
        gg = row - j0
        ok &= (j0 >= 0) & (j0 < g.rows - 1)
        i = xp.where(ok, i0, 0).astype(xp.int64)
        j = xp.where(ok, j0, 0).astype(xp.int64)
        wv = xp.where(ok, w, 0)
        base = j * g.columns + i
        return [(base, wv * (1 - gg) * (1 - f)), (base + 1, wv * (1 - gg) * f),
                (base + g.columns, wv * gg * (1 - f)), (base + g.columns + 1, wv * gg * f)]

    def _back_xp(self, sino: Any, matched: bool, idx: np.ndarray) -> Any:
        xp = self.xp
        sino = xp.asarray(sino, dtype=xp.float32)
        acc = xp.zeros(self._xyz[0].shape, dtype=xp.float32)
        for n, k in enumerate(idx):
            proj = sino[n].ravel()
            for where, wt in self._taps(*self._map_xp(int(k), matched)):
                acc += wt * proj[where]
        return acc.reshape(self.grid.shape)

    def _forward_xp(self, vol: Any, idx: np.ndarray) -> Any:
        xp = self.xp
        v = xp.asarray(vol, dtype=xp.float32).ravel()
        size = self.g.rows * self.g.columns
        out = xp.zeros((idx.size, self.g.rows, self.g.columns), dtype=xp.float32)
        for n, k in enumerate(idx):
            proj = xp.zeros(size, dtype=xp.float32)
            for where, wt in self._taps(*self._map_xp(int(k), True)):
                proj += xp.bincount(where, weights=wt * v, minlength=size)[:size]
            out[n] = proj.reshape(self.g.rows, self.g.columns)
        return out
