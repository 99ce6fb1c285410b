"""The built-in plugins on synthetic phantoms with known answers (CPU; the same code runs on
CuPy when a job holds a GPU)."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import trimesh
from dicomnode_reformat import Reformat, ReformatParams
from dicomnode_surface import Surface, SurfaceParams

from dicomnode.package import Provenance
from dicomnode.package.stl import mesh_to_stl
from dicomnode.plugin import Context, Inputs, PluginError
from dicomnode.run.inputs import series_input
from dicomnode.simulate import write_ct_series
from tests.helpers import cupy_or_none
from tests.validators import dciodvfy_errors


def ctx(tmp_path: Path) -> Context:
    return Context("job", np, "cpu", tmp_path, logging.getLogger("test"))


def load(tmp_path: Path, hu: np.ndarray, pixel_mm: float, slice_mm: float):  # type: ignore[no-untyped-def]
    files = write_ct_series(tmp_path / "src", hu=hu, pixel_mm=pixel_mm, slice_mm=slice_mm)
    return series_input([pydicom.dcmread(f) for f in files])


def test_reformat_puts_a_cube_at_the_same_patient_point_in_every_plane(tmp_path: Path) -> None:
    hu = np.full((20, 40, 40), -1000.0, np.float32)
    hu[8:12, 10:14, 25:29] = 1500.0
    si = load(tmp_path, hu, pixel_mm=1.0, slice_mm=2.0)
    # where the cube is, in LPS, from the source itself (slice order follows the normal)
    src_mask = si.pixels() > 500
    expected = si.geometry.to_patient(np.argwhere(src_mask).mean(axis=0))
    out = Reformat().run(Inputs("1", (si,), {}),
                         ReformatParams(planes=["axial", "coronal", "sagittal"], spacing_mm=1.0),
                         ctx(tmp_path))
    assert [v.series_description for v in out.volumes] == [
        "AXIAL MPR 1mm", "CORONAL MPR 1mm", "SAGITTAL MPR 1mm"]
    for v in out.volumes:
        a = np.asarray(v.array)
        found = v.geometry.to_patient(np.argwhere(a > 500).mean(axis=0))
        assert found == pytest.approx(expected, abs=0.6), v.series_description
        assert a.max() == pytest.approx(1500.0) and a.min() >= -1024.0
        assert np.cross(v.geometry.row_direction, v.geometry.column_direction) == \
            pytest.approx(v.geometry.slice_direction)


def test_reformat_projections(tmp_path: Path) -> None:
    hu = np.full((20, 40, 40), 0.0, np.float32)
    hu[10, 20, 20] = 2000.0  # one bright voxel
    hu[10, 5, 5] = -900.0  # one dark voxel
    si = load(tmp_path, hu, pixel_mm=1.0, slice_mm=1.0)
    run = lambda p, slab: Reformat().run(  # noqa: E731
        Inputs("1", (si,), {}), ReformatParams(planes=["coronal"], spacing_mm=10,
                                               projection=p, slab_mm=slab), ctx(tmp_path))
    mip = np.asarray(run("mip", 10).volumes[0].array)
    minip = np.asarray(run("minip", 10).volumes[0].array)
    avg = np.asarray(run("average", 10).volumes[0].array)
    assert mip.max() == pytest.approx(2000.0, rel=0.01)
    assert minip.min() < -800
    assert 0 < avg.max() < 400  # a 10 mm average dilutes one 1 mm voxel
    with pytest.raises(PluginError, match="slab_mm"):
        run("mip", 0)


def test_surface_of_a_sphere(tmp_path: Path) -> None:
    r = 12.0
    z, y, x = np.mgrid[0:60, 0:60, 0:60].astype(float)
    hu = np.where((z - 30) ** 2 + (y - 30) ** 2 + (x - 30) ** 2 <= r * r, 1000.0, -1000.0)
    si = load(tmp_path, hu.astype(np.float32), pixel_mm=1.0, slice_mm=1.0)
    out = Surface().run(Inputs("1", (si,), {}), SurfaceParams(target_faces=3000),
                        ctx(tmp_path))
    [finding] = out.findings
    volume, area = (m.value for m in finding.measurements)
    assert volume == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.03)  # mL
    assert area == pytest.approx(4 * math.pi * r**2, rel=0.06)  # mm², smoothed voxel surface
    [mesh] = out.meshes
    m = trimesh.Trimesh(mesh.vertices, mesh.faces)
    assert len(mesh.faces) <= 3000 and m.is_watertight
    assert m.volume > 0  # normals point outward
    assert m.volume / 1000 == pytest.approx(volume, rel=0.08)  # Taubin: no shrinkage
    centre_mm = si.geometry.to_patient(np.argwhere(si.pixels() > 0).mean(axis=0))
    assert m.centroid == pytest.approx(centre_mm, abs=0.5)
    # small components are dropped
    hu2 = np.full((20, 20, 20), -1000.0, np.float32)
    hu2[5, 5, 5] = 1000.0
    si2 = load(tmp_path / "tiny", hu2, 1.0, 1.0)
    assert Surface().run(Inputs("1", (si2,), {}), SurfaceParams(), ctx(tmp_path)).empty


def test_stl_is_valid_and_reads_back(tmp_path: Path) -> None:
    hu = np.full((10, 30, 30), -1000.0, np.float32)
    hu[3:7, 10:20, 10:20] = 800.0
    si = load(tmp_path, hu, 1.0, 1.0)
    out = Surface().run(Inputs("1", (si,), {}), SurfaceParams(), ctx(tmp_path))
    ds = mesh_to_stl(out.meshes[0], si.datasets, Provenance("j", "surface", "1.0.0"), 9009)
    ds.save_as(tmp_path / "stl.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "stl.dcm") == []
    back = pydicom.dcmread(tmp_path / "stl.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.3" and back.Modality == "M3D"
    payload = back.EncapsulatedDocument[: back.EncapsulatedDocumentLength]
    m = trimesh.load(io.BytesIO(payload), file_type="stl")
    assert len(m.faces) == len(out.meshes[0].faces)
    assert np.allclose(m.bounds, trimesh.Trimesh(out.meshes[0].vertices,
                                                 out.meshes[0].faces).bounds, atol=1e-3)


def test_reformat_fast_path_equals_general_trilinear() -> None:
    """Axis-aligned grids use separable 1-D interpolation; it must equal map_coordinates
    (inside the volume; on its very border the fast path keeps edge voxels the general one
    may drop by a rounding hair)."""
    from dicomnode_reformat import _axis_map, output_grid, resample, resample_aligned

    from dicomnode.plugin import Geometry

    rng = np.random.default_rng(0)
    vol = rng.normal(0, 100, (30, 50, 60)).astype(np.float32)
    src = Geometry(origin=(-30.0, -25.0, -60.0), row_direction=(1.0, 0, 0),
                   column_direction=(0, 1.0, 0), slice_direction=(0, 0, 1.0),
                   spacing=(2.0, 0.9, 1.1), shape=(30, 50, 60), frame_of_reference_uid="1")
    # (source axis, sign) per output axis (slice, row, column) of an axial source in LPS:
    # coronal slices step along y, their rows run down (-z); sagittal slices step along -x
    expected_axes = {"axial": [(0, 1.0), (1, 1.0), (2, 1.0)],
                     "coronal": [(1, 1.0), (0, -1.0), (2, 1.0)],
                     "sagittal": [(2, -1.0), (0, -1.0), (1, 1.0)]}
    for plane in ("axial", "coronal", "sagittal"):
        g = output_grid(src, plane, 1.3, 0.7)
        axes = _axis_map(src, g)
        assert axes == expected_axes[plane], plane
        a = resample(np, vol, src, g, [0.0, 0.65])
        b = resample_aligned(np, vol, src, g, [0.0, 0.65], axes)
        assert np.abs(a - b)[:, 1:-1, 1:-1, 1:-1].max() < 0.01, plane
    # the 1-D interpolation itself, along every axis, with samples outside (air) and on
    # source samples, against np.interp
    from dicomnode_reformat import AIR_HU, _lerp_axis

    coords = np.array([-0.5, 0.0, 0.25, 3.0, 7.9, 8.0, 8.2, 12.0])
    small = rng.normal(0, 100, (9, 10, 11)).astype(np.float32)[:, :9, :9]
    for axis in range(3):
        got = _lerp_axis(np, small, axis, coords)
        moved = np.moveaxis(small, axis, -1)
        ref = np.apply_along_axis(
            lambda line: np.interp(coords, np.arange(9), line, left=AIR_HU, right=AIR_HU),
            -1, moved)
        ref[..., (coords < -1e-4) | (coords > 8 + 1e-4)] = AIR_HU
        assert np.allclose(np.moveaxis(got, axis, -1), ref, atol=1e-3), axis
    c, s = math.cos(0.3), math.sin(0.3)
    oblique = Geometry(origin=(0.0, 0.0, 0.0), row_direction=(c, s, 0),
                       column_direction=(-s, c, 0), slice_direction=(0, 0, 1.0),
                       spacing=(1.0, 1.0, 1.0), shape=(5, 5, 5), frame_of_reference_uid="1")
    assert _axis_map(oblique, output_grid(oblique, "coronal", 1.0, 1.0)) is None


_cupy = cupy_or_none


@pytest.mark.skipif(_cupy() is None, reason="no CUDA GPU with CuPy here (checked on a lent GPU)")
@pytest.mark.parametrize("projection", ["none", "mip", "average"])
def test_reformat_on_the_gpu_equals_the_cpu(tmp_path: Path, projection: str) -> None:
    """The same plugin code with ctx.xp = CuPy (a job holding a GPU) gives the CPU's volumes."""
    cp = _cupy()
    rng = np.random.default_rng(5)
    hu = rng.normal(0, 300, (24, 48, 40)).astype(np.float32)
    si = load(tmp_path, hu, pixel_mm=0.8, slice_mm=1.5)
    params = ReformatParams(planes=["axial", "coronal", "sagittal"], spacing_mm=1.3,
                            projection=projection, slab_mm=0 if projection == "none" else 4)
    cpu = Reformat().run(Inputs("1", (si,), {}), params, ctx(tmp_path))
    gpu = Reformat().run(Inputs("1", (si,), {}), params,
                         Context("job", cp, "cuda:0", tmp_path, logging.getLogger("test")))
    for a, b in zip(cpu.volumes, gpu.volumes, strict=True):
        assert a.geometry == b.geometry
        assert np.allclose(np.asarray(a.array), cp.asnumpy(b.array), atol=0.05), \
            a.series_description
