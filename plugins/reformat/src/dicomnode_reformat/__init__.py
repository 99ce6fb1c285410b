"""Multiplanar reformats (axial/coronal/sagittal at a chosen spacing) and thick-slab MIP, MinIP
or average, resampled with trilinear interpolation on the GPU (CuPy) when the job holds one,
else on the CPU (SciPy): one code path, ``ctx.xp`` decides.

Output planes are the patient's anatomical planes (LPS), whatever the source orientation, and
cover the source volume's bounding box. Thick slabs are made by resampling thin sub-slices at
the source's finest spacing and reducing them, so a 10 mm MIP really spans 10 mm.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from dicomnode.plugin import (
    GPU,
    Accepts,
    Code,
    Context,
    Geometry,
    ImageVolume,
    Inputs,
    Needs,
    Outputs,
    Params,
    Plugin,
    PluginError,
)
from dicomnode.plugin import resample as resample_grid

Plane = Literal["axial", "coronal", "sagittal"]
# (row_direction, column_direction) per plane, in LPS; the slice normal is their cross product
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
AIR_HU = -1024.0


class ReformatParams(Params):
    planes: tuple[Plane, ...] = ("coronal", "sagittal")
    spacing_mm: float = 2.0  # distance between output slices
    pixel_mm: float | None = None  # in-plane pixel size; default: the source's finest
    projection: Literal["none", "mip", "minip", "average"] = "none"
    slab_mm: float = 0.0  # slab thickness for projections (0: a plain reformat)
    window: tuple[float, float] = (40.0, 400.0)



def output_grid(src: Geometry, plane: str, spacing: float, pixel: float) -> Geometry:
    """The plane's grid covering the source volume's bounding box."""
    row, col = (np.asarray(v) for v in PLANES[plane])
    normal = np.cross(row, col)
    corners = np.array([src.to_patient([k, i, j]) for k in (0, src.shape[0] - 1)
                        for i in (0, src.shape[1] - 1) for j in (0, src.shape[2] - 1)])
    axes = np.stack([normal, col, row])  # slice, row, column directions
    lo, hi = (corners @ axes.T).min(axis=0), (corners @ axes.T).max(axis=0)
    steps = np.array([spacing, pixel, pixel])
    shape = tuple(int(np.floor((h - low) / s + 1e-6)) + 1 for low, h, s in zip(lo, hi, steps,
                                                                            strict=True))
    origin = axes.T @ lo
    return Geometry(origin=tuple(float(x) for x in origin),  # type: ignore[arg-type]
                    row_direction=tuple(float(x) for x in row),  # type: ignore[arg-type]
                    column_direction=tuple(float(x) for x in col),  # type: ignore[arg-type]
                    slice_direction=tuple(float(x) for x in normal),  # type: ignore[arg-type]
                    spacing=(spacing, pixel, pixel), shape=shape,  # type: ignore[arg-type]
                    frame_of_reference_uid=src.frame_of_reference_uid)


def resample(xp: Any, volume: Any, src: Geometry, dst: Geometry, offsets: Any) -> Any:
    """Sample ``volume`` (on ``src``) at ``dst``'s voxels shifted by ``offsets`` mm along the
    normal; returns [len(offsets), *dst.shape]. Trilinear, air outside: the plugin API's
    :func:`dicomnode.plugin.resample` on the shifted grid."""
    out = xp.empty((len(offsets), *dst.shape), dtype=xp.float32)
    normal = np.asarray(dst.slice_direction)
    for n, off in enumerate(offsets):
        origin = np.asarray(dst.origin) + normal * float(off)
        shifted = replace(dst, origin=(float(origin[0]), float(origin[1]), float(origin[2])))
        out[n] = resample_grid(volume, src, shifted, xp, order=1, cval=AIR_HU)
    return out


def _axis_map(src: Geometry, dst: Geometry) -> list[tuple[int, float]] | None:
    """For each output axis, (matching source axis, sign) if all axes align, else None."""
    s_axes = [np.asarray(src.slice_direction), np.asarray(src.column_direction),
              np.asarray(src.row_direction)]
    d_axes = [np.asarray(dst.slice_direction), np.asarray(dst.column_direction),
              np.asarray(dst.row_direction)]
    out = []
    for d in d_axes:
        dots = [float(d @ s) for s in s_axes]
        b = int(np.argmax(np.abs(dots)))
        if abs(abs(dots[b]) - 1.0) > 1e-6:
            return None
        out.append((b, dots[b]))
    return out if sorted(b for b, _ in out) == [0, 1, 2] else None


def _lerp_axis(xp: Any, vol: Any, axis: int, coords: np.ndarray) -> Any:
    """Linear interpolation of ``vol`` along ``axis`` at fractional ``coords`` (host array);
    air outside. Positions that fall on source samples are gathered, not blended, and an
    identical grid is returned as is: in a reformat one axis usually matches the source."""
    n = vol.shape[axis]
    coords = np.asarray(coords, dtype=np.float64)
    nearest = np.rint(coords)
    inside = (coords >= -1e-4) & (coords <= n - 1 + 1e-4)
    if inside.all() and np.all(np.abs(coords - nearest) < 1e-4):
        index = nearest.astype(np.int64)
        if index.size == n and np.array_equal(index, np.arange(n)):
            return vol
        return xp.take(vol, xp.asarray(index), axis=axis)
    i0 = np.clip(np.floor(coords).astype(np.int64), 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    w = np.clip(coords - i0, 0.0, 1.0)
    shape = list(vol.shape)
    shape[axis] = len(coords)
    out = xp.empty(shape, dtype=xp.float32)
    if axis > 0:
        # along an inner axis, one leading-axis slab at a time: the gathers stay inside a
        # cache-sized slab (per output index they would stride across the whole volume)
        lo_i, hi_i = xp.asarray(i0), xp.asarray(i1)
        bshape = [1] * (vol.ndim - 1)
        bshape[axis - 1] = len(coords)
        wv = xp.asarray(w, dtype=xp.float32).reshape(bshape)
        outside = None if inside.all() else xp.asarray(~inside)
        for k in range(vol.shape[0]):
            dst = out[k]
            lo = xp.take(vol[k], lo_i, axis=axis - 1)
            xp.subtract(xp.take(vol[k], hi_i, axis=axis - 1), lo, out=dst)
            dst *= wv
            dst += lo
            if outside is not None:
                xp.moveaxis(dst, axis - 1, 0)[outside] = AIR_HU
        return out
    lead: tuple[slice, ...] = (slice(None),) * axis
    # one output slab at a time, in place: slab-sized work stays in cache, and no volume-sized
    # temporaries (np.take + blend made four)
    for j in range(len(coords)):
        dst = out[(*lead, j)]
        lo = vol[(*lead, int(i0[j]))]
        if not inside[j]:
            dst[...] = AIR_HU
        elif w[j] < 1e-6 or i0[j] == i1[j]:
            dst[...] = lo
        else:
            xp.subtract(vol[(*lead, int(i1[j]))], lo, out=dst)
            dst *= xp.float32(w[j])
            dst += lo
    return out


def resample_aligned(xp: Any, volume: Any, src: Geometry, dst: Geometry,
                     offsets: Any, axes: list[tuple[int, float]]) -> Any:
    """:func:`resample` for grids whose axes are parallel: trilinear interpolation separates
    into three 1-D interpolations, O(output size) array work instead of per-sample lookups."""
    s_dirs = [np.asarray(src.slice_direction), np.asarray(src.column_direction),
              np.asarray(src.row_direction)]
    d_dirs = [np.asarray(dst.slice_direction), np.asarray(dst.column_direction),
              np.asarray(dst.row_direction)]
    out = xp.empty((len(offsets), *dst.shape), dtype=xp.float32)
    for n, off in enumerate(offsets):
        origin = np.asarray(dst.origin) + np.asarray(dst.slice_direction) * off
        vol = volume
        # interpolate each source axis at the coordinates of its matching output axis
        for a, (b, _sign) in enumerate(axes):
            t = np.arange(dst.shape[a]) * dst.spacing[a]
            pos = (origin - np.asarray(src.origin)) @ s_dirs[b] + t * (d_dirs[a] @ s_dirs[b])
            vol = _lerp_axis(xp, vol, b, pos / src.spacing[b])
        out[n] = xp.transpose(vol, [b for b, _ in axes])
    return out


class Reformat(Plugin[ReformatParams]):
    name = "reformat"
    version = "1.0.0"
    description = "Axial/coronal/sagittal reformats and thick-slab MIP/MinIP/average."
    algorithm_family = Code("123106", "DCM", "Multi-Scale/Resolution Filtering")
    params_model = ReformatParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=4096, timeout_seconds=300)
    accepts = Accepts(modalities=("CT",), min_instances=2)

    def run(self, inputs: Inputs, params: ReformatParams, ctx: Context) -> Outputs:
        series = inputs.primary
        src = series.geometry
        if params.projection != "none" and params.slab_mm <= 0:
            raise PluginError("a projection needs slab_mm > 0")
        xp = ctx.xp
        volume = series.pixels(xp)

        def sample(grid: Geometry, offsets: Any) -> Any:
            axes = _axis_map(src, grid)
            if axes is not None:
                return resample_aligned(xp, volume, src, grid, offsets, axes)
            return resample(xp, volume, src, grid, offsets)  # oblique: general trilinear

        pixel = params.pixel_mm or float(min(src.spacing[1], src.spacing[2]))
        fine = float(min(src.spacing))
        def one_plane(plane: str) -> ImageVolume:
            grid = output_grid(src, plane, params.spacing_mm, pixel)
            if params.projection == "none":
                data = sample(grid, [0.0])[0]
                what = f"{plane.upper()} MPR {params.spacing_mm:g}mm"
                how = f"{plane} reformat, {params.spacing_mm:g} mm slices, trilinear"
            else:
                # sub-slices from one face of the slab to the other at the finest source step,
                # endpoints included, so a one-voxel peak is sampled at its centre
                n = max(1, round(params.slab_mm / fine))
                offsets = np.linspace(-params.slab_mm / 2, params.slab_mm / 2, n + 1)
                stack = sample(grid, offsets)
                reduce = {"mip": xp.max, "minip": xp.min, "average": xp.mean}
                data = reduce[params.projection](stack, axis=0)
                what = f"{plane.upper()} {params.projection.upper()} {params.slab_mm:g}mm"
                how = (f"{plane} {params.projection} of {params.slab_mm:g} mm slabs every "
                       f"{params.spacing_mm:g} mm")
            ctx.log.info("%s: %s on %s", what, grid.shape, ctx.device)
            return ImageVolume(data, grid, what, how, series.series_uid, window=params.window)

        # planes are independent and NumPy releases the GIL in its loops: on the CPU, one
        # thread per plane uses the cores the job has (a GPU queues them on one device anyway)
        workers = 1 if ctx.device != "cpu" else min(len(params.planes), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            volumes = list(pool.map(one_plane, params.planes))
        return Outputs(volumes=tuple(volumes),
                       summary=", ".join(v.series_description for v in volumes))
