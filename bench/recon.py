"""Reconstruction benchmark: ct-recon vs scikit-image ``iradon`` vs ASTRA, same data, one run.

Data: the Shepp–Logan head (ellipsoids, HU) projected *analytically* by dicomnode's simulator
(exact line integrals, synthetic), parallel beam over 180°, detector pitch = pixel size, an odd
number of columns wide enough for the image diagonal. Every method reconstructs the same
sinogram onto a grid centred the way that method centres it; error is RMSE (HU) against the
phantom averaged over each pixel, inside 95 % of the field. Each method runs in its own fresh
process so its peak host memory (ru_maxrss) is its own.

Times: best of ``--repeat`` after one warm-up call (our Numba kernels compile on first use and
are cached on disk; the warm-up time is printed too). Iterative methods: time per iteration and
error after ``--iterations``.

    python bench/recon.py [--size 512] [--views 720] [--iterations 10] [--json out.json]

GPU (when CuPy sees one): our FBP on the GPU, and FDK of a ``--cone-size``³ volume from
``--views`` cone-beam views, in giga voxel-view updates per second, beside ASTRA's CUDA FDK.
Needs: numba, scikit-image, astra-toolbox (and cupy for the GPU part).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.simulate.ct import _ellipsoids, make_geometry, project_shepp_logan

FOV = 250.0


def phantom(n: int, centre: float, sub: int = 4) -> np.ndarray:
    """HU averaged over each pixel of an n×n grid whose centre is at index ``centre``."""
    dx = FOV / n
    k = np.arange(n * sub) / sub - (sub - 1) / (2 * sub)  # sub-sample centres, in pixels
    y = (k - centre) * dx
    yy, xx = np.meshgrid(y, y, indexing="ij")
    pts = np.stack([xx, yy, np.zeros_like(xx)], axis=-1)
    rel = np.zeros(xx.shape)
    for amp, c, axes, rot in _ellipsoids():
        q = (pts - c) @ rot.T / axes
        rel += amp * (np.sum(q * q, axis=-1) <= 1)
    return np.asarray(((rel - 1) * 1000).reshape(n, sub, n, sub).mean(axis=(1, 3)))


def rmse(mu: np.ndarray, centre: float, mu_water: float) -> float:
    n = mu.shape[-1]
    hu = (mu / mu_water - 1) * 1000
    ref = phantom(n, centre)
    r = np.hypot(*np.meshgrid(np.arange(n) - centre, np.arange(n) - centre, indexing="ij"))
    mask = r < 0.95 * n / 2
    return float(np.sqrt(np.mean((hu - ref)[mask] ** 2)))


def scan(size: int, views: int) -> Any:
    cols = 2 * int(np.ceil(size * 0.72)) + 1  # odd: the centre is a detector element
    g = make_geometry("parallel", views, cols)
    return replace(g, du=FOV / size, u0=(cols - 1) / 2)


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float, float]:
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, first, best


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one task per fresh process ----------------------------------------------------------------

def task(name: str, sino_path: str, size: int, views: int, iterations: int,
         repeat: int) -> dict[str, Any]:
    g = scan(size, views)
    sino = np.load(sino_path)
    n = size
    if name.startswith("ours"):
        from dicomnode_ct_recon import iterative
        from dicomnode_ct_recon.analytic import fbp
        from dicomnode_ct_recon.projector import Grid, Projector

        grid = Grid(n, n, FOV / n, np.array([0.0]), 1.0)
        p = Projector(g, grid)
        if name == "ours-fbp":
            mu, first, best = _timed(lambda: fbp(sino, g, grid, "ram-lak", projector=p), repeat)
            return {"seconds": best, "first_call": first, "rmse": rmse(mu[0], (n - 1) / 2,
                                                                        g.mu_water)}
        algo = {"ours-sirt": iterative.sirt, "ours-cgls": iterative.cgls}[name]
        algo(p, sino, 1)  # compile
        t = time.perf_counter()
        mu = algo(p, sino, iterations)
        sec = time.perf_counter() - t
        return {"seconds": sec, "per_iteration": sec / iterations,
                "rmse": rmse(mu[0], (n - 1) / 2, g.mu_water)}
    if name == "skimage-iradon":
        from skimage.transform import iradon

        # scikit-image turns the other way (θ = −φ) and centres its grid on n // 2
        fn = lambda: iradon(sino[:, 0, :].T / g.du, theta=-np.degrees(g.angles),  # noqa: E731
                            filter_name="ramp", circle=False, output_size=n)
        rec, first, best = _timed(fn, repeat)
        return {"seconds": best, "first_call": first, "rmse": rmse(rec, n // 2, g.mu_water)}
    import astra

    vol = astra.create_vol_geom(n, n, -FOV / 2, FOV / 2, -FOV / 2, FOV / 2)
    proj = astra.create_proj_geom("parallel", g.du, g.columns, -g.angles)  # ASTRA: θ = −φ
    pid = astra.create_projector("linear", proj, vol)
    sid = astra.data2d.create("-sino", proj, sino[:, 0, :])
    rid = astra.data2d.create("-vol", vol, 0.0)
    cfg = astra.astra_dict({"astra-fbp": "FBP", "astra-sirt": "SIRT",
                            "astra-cgls": "CGLS"}[name])
    cfg.update(ReconstructionDataId=rid, ProjectionDataId=sid, ProjectorId=pid)
    if name == "astra-fbp":
        cfg["option"] = {"FilterType": "Ram-Lak"}
        aid = astra.algorithm.create(cfg)
        _, first, best = _timed(lambda: astra.algorithm.run(aid), repeat)
        return {"seconds": best, "first_call": first,
                "rmse": rmse(astra.data2d.get(rid), (n - 1) / 2, g.mu_water)}
    aid = astra.algorithm.create(cfg)
    t = time.perf_counter()
    astra.algorithm.run(aid, iterations)
    sec = time.perf_counter() - t
    return {"seconds": sec, "per_iteration": sec / iterations,
            "rmse": rmse(astra.data2d.get(rid), (n - 1) / 2, g.mu_water)}


def cone_case(n: int, views: int, seed: int = 0) -> tuple[Any, Any, np.ndarray]:
    """(cone geometry, n×n×n grid, random projections [views, rows, columns]) of the FDK speed
    case: a flat detector 1.5 n wide and n rows, the volume's slab at half pitch."""
    from dicomnode_ct_recon.projector import Grid

    cone = make_geometry("cone", views, int(n * 1.5), n, detector="flat", row_mm=FOV / n)
    proj = np.random.default_rng(seed).random((views, cone.rows, cone.columns),
                                               dtype=np.float32)
    z = (np.arange(n) - (n - 1) / 2) * FOV / n * 0.5
    return cone, Grid(n, n, FOV / n, z, FOV / n * 0.5), proj


def astra_cuda_available() -> str:
    """Empty when ASTRA's CUDA algorithms can run here, else why not (never calls a 3D GPU
    function without ``astra.use_cuda()``: on a machine without a GPU that kills the process)."""
    try:
        import astra
    except Exception as e:
        return f"astra-toolbox not importable ({type(e).__name__}: {e})"
    try:
        return "" if astra.use_cuda() else "astra.use_cuda() is False"
    except Exception as e:
        return f"astra.use_cuda() failed ({type(e).__name__}: {e})"


def astra_cuda_fdk(cone: Any, n: int, proj: np.ndarray, repeat: int = 2) -> dict[str, Any]:
    """ASTRA's FDK_CUDA on the same projections as :func:`cone_case` (seconds, G updates/s)."""
    import astra

    vol_geom = astra.create_vol_geom(n, n, n)
    pg = astra.create_proj_geom("cone", cone.du / (FOV / n), cone.dv / (FOV / n),
                                cone.rows, cone.columns, cone.angles,
                                cone.sod / (FOV / n), (cone.sdd - cone.sod) / (FOV / n))
    pid = astra.data3d.create("-sino", pg, np.transpose(proj, (1, 0, 2)))
    rid = astra.data3d.create("-vol", vol_geom)
    cfg = astra.astra_dict("FDK_CUDA")
    cfg.update(ReconstructionDataId=rid, ProjectionDataId=pid)
    aid = astra.algorithm.create(cfg)
    _, first, best = _timed(lambda: astra.algorithm.run(aid), repeat)
    astra.data3d.delete([pid, rid])
    return {"seconds": best, "first_call": first, "gups": float(n) ** 3 * cone.views / best / 1e9}


def astra_cuda_2d(algorithm: str, sino: np.ndarray, g: Any, n: int, iterations: int = 1,
                  repeat: int = 2) -> dict[str, Any]:
    """ASTRA's 2D ``FBP_CUDA`` (seconds) or ``SIRT_CUDA`` (seconds per iteration) on the
    parallel sinogram of :func:`scan`; returns the image too (``"image"``)."""
    import astra

    vol = astra.create_vol_geom(n, n, -FOV / 2, FOV / 2, -FOV / 2, FOV / 2)
    proj = astra.create_proj_geom("parallel", g.du, g.columns, -g.angles)  # ASTRA: θ = −φ
    sid = astra.data2d.create("-sino", proj, sino[:, 0, :])
    rid = astra.data2d.create("-vol", vol, 0.0)
    cfg = astra.astra_dict(algorithm)
    cfg.update(ReconstructionDataId=rid, ProjectionDataId=sid)
    if algorithm == "FBP_CUDA":
        cfg["option"] = {"FilterType": "Ram-Lak"}
    aid = astra.algorithm.create(cfg)
    if algorithm == "FBP_CUDA":
        _, first, best = _timed(lambda: astra.algorithm.run(aid), repeat)
        out: dict[str, Any] = {"seconds": best, "first_call": first}
    else:
        t = time.perf_counter()
        astra.algorithm.run(aid, iterations)
        sec = time.perf_counter() - t
        out = {"seconds": sec, "per_iteration": sec / iterations}
    out["image"] = astra.data2d.get(rid)
    astra.data2d.delete([sid, rid])
    return out


def gpu_task(size: int, cone_size: int, views: int, sino_path: str) -> dict[str, Any]:
    """Our FBP (2D) and FDK (3D) on the GPU, beside ASTRA's CUDA FDK."""
    import cupy as cp
    from dicomnode_ct_recon.analytic import fbp
    from dicomnode_ct_recon.projector import Grid, Projector

    out: dict[str, Any] = {}
    g = scan(size, views)
    sino = np.load(sino_path)
    grid = Grid(size, size, FOV / size, np.array([0.0]), 1.0)
    p = Projector(g, grid, cp)

    def run2d() -> Any:
        mu = fbp(sino, g, grid, "ram-lak", cp, p)
        cp.cuda.Device().synchronize()
        return mu

    mu, first, best = _timed(run2d, 3)
    out["ours-gpu-fbp"] = {"seconds": best, "first_call": first,
                           "rmse": rmse(cp.asnumpy(mu)[0], (size - 1) / 2, g.mu_water)}
    n = cone_size
    cone, grid3, proj = cone_case(n, views)
    p3 = Projector(cone, grid3, cp)
    dev = cp.asarray(proj)
    cp.get_default_memory_pool().free_all_blocks()

    def run3d() -> Any:
        vol = fbp(dev, cone, grid3, "ram-lak", cp, p3)
        cp.cuda.Device().synchronize()
        return vol

    _, first, best = _timed(run3d, 2)
    updates = float(n) ** 3 * views
    out["ours-gpu-fdk"] = {"seconds": best, "first_call": first,
                           "gups": updates / best / 1e9,
                           "peak_gpu_mib": cp.get_default_memory_pool().total_bytes() / 2**20}
    try:
        if not astra_cuda_available():
            out["astra-cuda-fdk"] = astra_cuda_fdk(cone, n, proj)
    except Exception as e:  # report, do not hide
        out["astra-cuda-fdk"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        result = pool.submit(_with_peak, fn, *args).result()
    return result


def _with_peak(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    out = fn(*args)
    out["peak_host_mib"] = round(_peak_mib(), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--views", type=int, default=720)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cone-size", type=int, default=512)
    ap.add_argument("--skip", default="", help="comma-separated task names to skip")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    g = scan(args.size, args.views)
    work = Path(tempfile.mkdtemp(prefix="bench-recon-"))
    sino_path = work / "sino.npy"
    t = time.perf_counter()
    np.save(sino_path, project_shepp_logan(g))
    print(f"data: Shepp-Logan {args.size}², {args.views} parallel views × {g.columns} "
          f"columns (analytic, {time.perf_counter() - t:.1f} s)", flush=True)
    results: dict[str, Any] = {}
    names = ["ours-fbp", "skimage-iradon", "astra-fbp", "ours-sirt", "astra-sirt",
             "ours-cgls", "astra-cgls"]
    for name in names:
        if name in args.skip.split(","):
            continue
        r = _in_fresh_process(task, name, str(sino_path), args.size, args.views,
                              args.iterations, args.repeat)
        results[name] = r
        print(f"{name:16s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.items()), flush=True)
    try:
        import cupy

        have_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        have_gpu = False
    if have_gpu:
        gpu = _in_fresh_process(gpu_task, args.size, args.cone_size, args.views, str(sino_path))
        results.update({k: v for k, v in gpu.items() if isinstance(v, dict)})
        for k, v in gpu.items():
            print(f"{k:16s} {v}", flush=True)
    else:
        print("GPU: none here (CuPy sees no device): GPU rows skipped")

    def ratio(a: str, b: str, key: str) -> None:
        if a in results and b in results and key in results[a] and key in results[b]:
            r = results[a][key] / results[b][key]
            results[f"{a}/{b}"] = r
            print(f"ratio {a}/{b} ({key}): {r:.2f}")

    ratio("ours-fbp", "astra-fbp", "seconds")
    ratio("ours-fbp", "skimage-iradon", "seconds")
    ratio("ours-sirt", "astra-sirt", "per_iteration")
    ratio("ours-cgls", "astra-cgls", "per_iteration")
    ratio("ours-gpu-fdk", "astra-cuda-fdk", "seconds")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
