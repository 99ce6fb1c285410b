"""3D surface from a HU window: mask → marching cubes → Taubin smoothing → decimation.

Volume is measured on the voxel mask (what the SEG shows); surface area on the smoothed mesh
(what the STL shows). Vertices are in the source's patient coordinates (LPS mm), faces wound
counter-clockwise seen from outside (normals outward) whatever the handedness of the grid
(checked by the mesh's signed volume).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import trimesh
from skimage.measure import marching_cubes
from trimesh.smoothing import filter_taubin

from dicomnode.plugin import (
    AREA,
    GPU,
    TISSUE,
    VOLUME,
    Accepts,
    Code,
    Context,
    Finding,
    Inputs,
    LabelMap,
    Measurement,
    Mesh,
    Needs,
    Outputs,
    Params,
    Plugin,
    Segment,
    to_numpy,
)

BONE = Code("272673000", "SCT", "Bone")


class SurfaceParams(Params):
    hu_min: float = 300.0
    hu_max: float | None = None
    label: str = "Bone"
    smoothing_iterations: int = 10
    target_faces: int = 100_000
    min_component_voxels: int = 50


def surface_mesh(mask: np.ndarray, spacing: tuple[float, float, float], iterations: int,
                 target_faces: int) -> trimesh.Trimesh:
    """Smoothed, decimated surface of a boolean mask, vertices in (slice,row,col)·spacing mm."""
    padded = np.pad(mask.astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(  # type: ignore[no-untyped-call]
        padded, level=0.5, spacing=spacing)
    verts -= np.asarray(spacing)  # undo the padding
    mesh = trimesh.Trimesh(verts, faces, process=True)
    if iterations > 0:
        # Taubin λ|μ: trimesh alternates +λΔ and -νΔ and needs 0 < 1/λ - 1/ν < 0.1
        # (here 0.077): smooths without the shrinkage of plain Laplacian smoothing
        filter_taubin(mesh, lamb=0.5, nu=0.52,  # type: ignore[no-untyped-call]
                      iterations=2 * iterations)
    if len(mesh.faces) > target_faces:
        mesh = mesh.simplify_quadric_decimation(face_count=target_faces)
    return mesh


class Surface(Plugin[SurfaceParams]):
    name = "surface"
    version = "1.0.0"
    description = "HU window → marching cubes → Taubin → decimation: STL + SEG + SR."
    algorithm_family = Code("123104", "DCM", "Morphological Operations")
    params_model = SurfaceParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=4096, timeout_seconds=300)
    accepts = Accepts(modalities=("CT",), min_instances=2)

    def run(self, inputs: Inputs, params: SurfaceParams, ctx: Context) -> Outputs:
        series = inputs.primary
        g = series.geometry
        xp = ctx.xp
        hu = series.pixels(xp)
        mask = hu >= params.hu_min
        if params.hu_max is not None:
            mask &= hu <= params.hu_max
        mask = to_numpy(mask)
        # work inside the mask's bounding box: labelling and marching cubes cost scales with
        # the voxels they visit, and a bone or lesion is a small part of a 512² × 300 study
        box = tuple(np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
        if any(len(b) == 0 for b in box):
            return Outputs(summary=f"nothing at or above {params.hu_min} HU")
        lo = np.array([int(b[0]) for b in box])
        hi = np.array([int(b[-1]) + 1 for b in box])
        crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        labels, n = ndi.label(crop)
        if n:
            sizes = ndi.sum(crop, labels, index=np.arange(1, n + 1))
            keep = np.flatnonzero(sizes >= params.min_component_voxels) + 1
            crop = np.isin(labels, keep)
        mask = np.zeros_like(mask)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = crop
        voxels = int(crop.sum())
        if voxels == 0:
            return Outputs(summary=f"nothing at or above {params.hu_min} HU")
        mesh = surface_mesh(crop, g.spacing, params.smoothing_iterations, params.target_faces)
        # (slice, row, col) mm of the crop → LPS: origin + (lo + v)·spacing along n, col, row
        axes = np.stack([g.slice_direction, g.column_direction, g.row_direction])
        offset = lo * np.asarray(g.spacing)
        vertices = np.asarray(g.origin) + (np.asarray(mesh.vertices) + offset) @ axes
        faces = np.asarray(mesh.faces)
        # the index → LPS map may mirror; orient by the signed volume (closed mesh) so that
        # normals point outward, as STL readers and 3D printers expect
        if trimesh.Trimesh(vertices, faces, process=False).volume < 0:
            faces = faces[:, ::-1]
        ml = voxels * g.voxel_ml
        area = float(mesh.area)
        centre = g.to_patient([float(c) for c in np.argwhere(crop).mean(axis=0) + lo])
        ctx.log.info("%d voxels, %.2f mL, %d faces, %.0f mm2", voxels, ml, len(faces), area)
        return Outputs(
            meshes=(Mesh(vertices, faces, params.label, g.frame_of_reference_uid),),
            label_maps=(LabelMap(mask.astype(np.uint8), g,
                                 (Segment(1, params.label, TISSUE, BONE),), series.series_uid),),
            findings=(Finding(BONE, (Measurement(VOLUME, ml, "ml"),
                                     Measurement(AREA, area, "mm2")),
                              location=centre, segment=1, source_series_uid=series.series_uid),),
            summary=f"{params.label}: {ml:.1f} mL, {area:.0f} mm², {len(faces)} faces")
