"""``ct-recon``: CT reconstruction from raw projections (DICOM-CT-PD) to a diagnostic CT series.

Parallel, fan (flat or equiangular detector), circular and helical cone-beam scans; FBP (FDK
for cone beam, generalised FDK for helical) with Ram-Lak, Shepp–Logan, cosine or Hann filters
and Parker short-scan weights, or iterative SIRT, OS-SART, CGLS and TV (Chambolle–Pock) on a
matched projector pair. Runs on the GPU through CuPy when the job holds one (``ctx.xp``), else
on the CPU (Numba kernels): the same algorithms, the same arithmetic. Output:
``ORIGINAL\\PRIMARY\\AXIAL`` CT slices in HU (water attenuation from the raw data), centred
on the isocentre, in the raw data's frame of reference.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from dicomnode.plugin import (
    GPU,
    Accepts,
    Context,
    Geometry,
    ImageVolume,
    Inputs,
    Needs,
    NotApplicable,
    Outputs,
    Params,
    Plugin,
    PluginError,
    RawDataError,
    ScanGeometry,
    is_projection_data,
    read_scan,
)
from dicomnode_ct_recon import iterative
from dicomnode_ct_recon.analytic import fbp, to_hu
from dicomnode_ct_recon.projector import Grid, Projector

Algorithm = Literal["fbp", "fdk", "sirt", "os-sart", "cgls", "tv"]
DEFAULT_ITERATIONS = {"sirt": 100, "os-sart": 8, "cgls": 20, "tv": 200}


class CTReconParams(Params):
    algorithm: Algorithm = "fbp"  # fbp and fdk are one method: FDK whenever the beam is a cone
    filter: Literal["ram-lak", "shepp-logan", "cosine", "hann"] = "shepp-logan"
    matrix: int = Field(512, ge=16, le=2048)  # output pixels per side
    fov_mm: float | None = Field(None, gt=0)  # default: the field the detector covers
    slice_thickness_mm: float | None = Field(None, gt=0)  # cone/multi-row: default row pitch
    slices: int | None = Field(None, ge=1)  # cone/multi-row: default covers the detector
    iterations: int | None = Field(None, ge=1, le=5000)  # default per algorithm
    subsets: int = Field(16, ge=1)  # OS-SART
    tv_weight: float = Field(3e-4, gt=0)  # TV: λ relative to the normalised data term
    window: tuple[float, float] = (40.0, 400.0)


def scanned_fov(g: ScanGeometry) -> float:
    """Diameter (mm) of the circle every view sees: the largest sensible output FOV."""
    half = min(g.u0, g.columns - 1 - g.u0) * g.du
    if g.kind == "parallel":
        return 2 * half
    angle = half / g.sdd if g.detector == "cylindrical" else float(np.arctan(half / g.sdd))
    return float(2 * g.sod * np.sin(angle))


def output_grid(g: ScanGeometry, params: CTReconParams) -> Grid:
    fov = params.fov_mm or scanned_fov(g)
    dx = fov / params.matrix
    if g.rows == 1:
        return Grid(params.matrix, params.matrix, dx, np.array([g.z]),
                    params.slice_thickness_mm or g.dv / g.magnification)
    pitch = g.dv / g.magnification  # row pitch at the isocentre
    thickness = params.slice_thickness_mm or pitch
    if g.helical:
        # slices whose every voxel (within the FOV) is seen over at least a full turn: half the
        # detector's z coverage (at the FOV edge nearest the source) in from each end
        zs = g.source_z
        half = g.rows * pitch / 2 * (1 - (fov / 2) / g.sod)
        lo, hi = float(zs.min()) + half, float(zs.max()) - half
        if hi < lo:
            raise PluginError(f"helical scan of {abs(zs[-1] - zs[0]):.1f} mm covers less than "
                              "the detector's width: nothing is seen over a full turn")
        n = params.slices or int(np.floor((hi - lo) / thickness)) + 1
        z = (lo + hi) / 2 + (np.arange(n) - (n - 1) / 2) * thickness
        return Grid(params.matrix, params.matrix, dx, z, thickness)
    # cone beam: the slab every view sees fully shrinks with distance from the isocentre
    covered = g.rows * pitch * (1 - (fov / 2) / g.sod) if g.kind == "cone" else g.rows * pitch
    n = params.slices or max(1, int(np.floor(covered / thickness)))
    z = g.z + (np.arange(n) - (n - 1) / 2) * thickness
    return Grid(params.matrix, params.matrix, dx, z, thickness)


def reconstruct(sino: Any, g: ScanGeometry, grid: Grid, params: CTReconParams,
                xp: Any = np) -> Any:
    """Attenuation μ (mm⁻¹) on ``grid`` by the chosen algorithm (``xp``: numpy or cupy)."""
    p = Projector(g, grid, xp)
    algo = params.algorithm
    n = params.iterations or DEFAULT_ITERATIONS.get(algo, 0)
    if algo in ("fbp", "fdk"):
        return fbp(sino, g, grid, params.filter, xp, p)
    if algo == "sirt":
        return iterative.sirt(p, sino, n)
    if algo == "os-sart":
        return iterative.os_sart(p, sino, n, params.subsets)
    if algo == "cgls":
        return iterative.cgls(p, sino, n)
    start = fbp(sino, g, grid, "hann", xp, p)  # warm start: TV converges in far fewer steps
    return iterative.tv(p, sino, n, params.tv_weight, balance=4.0, x0=start)


class CTRecon(Plugin[CTReconParams]):
    name = "ct-recon"
    version = "1.0.0"
    description = ("CT reconstruction from DICOM-CT-PD raw projections: FBP/FDK, SIRT, "
                   "OS-SART, CGLS, TV; GPU (CuPy) or CPU (Numba)")
    # no algorithm_family: it is recorded in SEG/SR, and this plugin makes images only
    params_model = CTReconParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=4096, timeout_seconds=3600)
    accepts = Accepts(modalities=("CT",), min_instances=2, projections=True)

    def run(self, inputs: Inputs, params: CTReconParams, ctx: Context) -> Outputs:
        src = inputs.primary
        if not is_projection_data(src.datasets[0]):
            raise NotApplicable("not CT projection data (no DICOM-CT-PD detector tags)")
        try:
            g, sino = read_scan(src.datasets)
        except RawDataError as e:
            raise PluginError(f"raw data cannot be reconstructed: {e}") from e
        if params.algorithm == "fdk" and g.kind != "cone":
            ctx.log.info("fdk asked for %s-beam data: plain FBP is the same method", g.kind)
        grid = output_grid(g, params)
        ctx.log.info("%s %s%s/%s, %d views × %d×%d → %s on %s", params.algorithm,
                     "helical " if g.helical else "", g.kind, g.detector, g.views, g.rows,
                     g.columns, grid.shape, ctx.device)
        mu = reconstruct(sino, g, grid, params, ctx.xp)
        hu = to_hu(mu, g.mu_water)
        frame = str(src.datasets[0].get("FrameOfReferenceUID", "")) or \
            src.geometry.frame_of_reference_uid
        geometry = Geometry(origin=(grid.x0, grid.y0, float(grid.z[0])),
                            row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0),
                            slice_direction=(0.0, 0.0, 1.0),
                            spacing=(grid.dz, grid.dx, grid.dx), shape=grid.shape,
                            frame_of_reference_uid=frame)
        algo = "FDK" if params.algorithm in ("fbp", "fdk") and g.kind == "cone" else \
            params.algorithm.upper()
        beam = (f"helical {g.kind}-beam (pitch {g.pitch:.2f})" if g.helical
                else f"{g.kind}-beam")
        how = (f"{algo} {params.filter}" if params.algorithm in ("fbp", "fdk")
               else f"{algo} {params.iterations or DEFAULT_ITERATIONS[params.algorithm]} it")
        attributes: dict[str, str | float] = {
            "ConvolutionKernel": (params.filter if params.algorithm in ("fbp", "fdk")
                                  else params.algorithm).upper()[:16],
            "ReconstructionDiameter": round(grid.nx * grid.dx, 3),
            "DataCollectionDiameter": round(scanned_fov(g), 3)}
        if g.kind != "parallel":
            attributes["DistanceSourceToDetector"] = round(g.sdd, 3)
            attributes["DistanceSourceToPatient"] = round(g.sod, 3)
        volume = ImageVolume(
            array=hu.astype(ctx.xp.float32), geometry=geometry,
            series_description=f"CT recon {how}"[:64],
            derivation=(f"{how} reconstruction from {g.views} {beam} projections "
                        f"({g.detector} detector), {grid.dx:.3f} mm pixels"),
            source_series_uid=src.series_uid, original=True, window=params.window,
            attributes=attributes)
        return Outputs(volumes=(volume,),
                       summary=f"{how}: {grid.shape[0]}×{grid.ny}×{grid.nx} from "
                               f"{g.views} {beam} views")
