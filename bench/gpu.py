"""GPU check (issue 20): every GPU path against its CPU twin, timings, one job end to end.

Run on a lent GPU machine through ``bench/gpu.sh`` (it installs the carried wheels first); each
stage runs in its own process with its own time limit, so one hang or crash costs that stage
only, and a global ``--budget`` keeps the whole run inside the device lease. Stages:

* ``env``: Python, NumPy, CuPy, torch, the GPU, whether ASTRA CUDA is usable.
* ``recon-agree``: ct-recon's FBP, FDK, SIRT, OS-SART, CGLS and TV through ``reconstruct``
  with ``xp`` = CuPy against the Numba kernels on the same sinogram (max / mean |Δ| in HU).
* ``recon-fbp``, ``recon-fdk``, ``recon-iter``: timings, GPU vs CPU (Numba) vs ASTRA CUDA when
  importable: FBP 512² from 720 views, FDK 512³ from 720 views (giga voxel-view updates per
  second; goal ≥ 100 and faster than ASTRA CUDA), SIRT and TV iterations at 512².
* ``ich``, ``nodules``, ``reformat``, ``model-runner``: the plugins with ``ctx.xp`` = CuPy (torch
  on ``cuda`` for model-runner) against NumPy (CPU) on the same input: Dice of the label maps,
  volume differences, max |Δ| of images, and both timings (GPU first call and warm call).
* ``e2e``: a real node (``runner.gpu_slots: 1``) gets a 40-slice head CT with a bleed over
  DICOM (pynetdicom SCU); the job must succeed on GPU slot 0 and send an SR with the finding
  and a SEG to a pynetdicom SCP.
* ``pytest-gpu``: the test suite's GPU tests (they skip where CuPy sees no GPU).

``--cpu-dry-run`` runs the same stages with small sizes on the CPU: NumPy stands in for CuPy
(ct-recon takes its vectorised GPU code path with NumPy, the plugins get NumPy), so the
agreement columns compare CPU with CPU (~0) and ASTRA CUDA reports "not available".

    python bench/gpu.py [--cpu-dry-run] [--out DIR] [--only a,b] [--skip a,b] [--budget S]

Writes ``gpu-check.json``, ``gpu-check.md`` (the table) and ``stages.log`` to ``--out``
(default ``$OUT``, else ``./gpu-check-out``). Exit status 0 when every stage is ok.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

# --- sizes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    agree_n: int = 128          # recon agreement: 2D matrix
    agree_views: int = 180
    agree_iters: int = 10
    agree_cone: int = 48        # FDK agreement: n³ from a cone of n/3 rows
    fbp_n: int = 512
    fbp_views: int = 720
    fdk_n: int = 512
    fdk_cpu_n: int = 256        # the CPU FDK at 512³ would take minutes: compared per update
    fdk_views: int = 720
    iter_n: int = 512
    iter_views: int = 720
    iter_gpu: int = 5
    iter_cpu: int = 3
    head: tuple[int, int, float, int] = (40, 256, 0.9, 3)         # slices, size, pixel mm, sub
    chest: tuple[int, int, float, float, int] = (300, 320, 0.8, 1.0, 2)  # + slice mm
    reformat: tuple[int, int] = (300, 512)
    model_volume: tuple[int, int] = (128, 256)
    model_patch: int = 64
    model_channels: tuple[int, ...] = (16, 32, 64, 128)


GPU_SIZES = Sizes()
DRY_SIZES = Sizes(agree_n=48, agree_views=60, agree_iters=3, agree_cone=24, fbp_n=96,
                  fbp_views=120, fdk_n=32, fdk_cpu_n=32, fdk_views=60, iter_n=64,
                  iter_views=90, iter_gpu=2, iter_cpu=2, head=(40, 128, 1.8, 1),
                  chest=(40, 160, 2.0, 2.5, 1), reformat=(40, 96), model_volume=(32, 64),
                  model_patch=32, model_channels=(4, 8, 16))

# --- the backend: CuPy, or NumPy standing in for it -------------------------------------------


class _NumPyStandIn(types.ModuleType):
    """NumPy under another name: code that chooses its GPU path by ``xp is not np`` (ct-recon's
    projector) takes that path here, on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class Backend:
    def __init__(self, dry: bool) -> None:
        self.dry = dry
        if dry:
            self.xp: Any = _NumPyStandIn("numpy_standin")  # ct-recon: the vectorised path
            self.plugin_xp: Any = np  # plugins: ctx.xp as a job without a GPU gets it
            self.device = "cpu"
            self.name = "NumPy standing in for CuPy"
        else:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
            self.xp = self.plugin_xp = cupy
            self.device = "cuda:0"
            self.name = f"CuPy {cupy.__version__}"

    def sync(self) -> None:
        if not self.dry:
            self.xp.cuda.Device().synchronize()

    def host(self, a: Any) -> np.ndarray:
        get = getattr(a, "get", None)
        return np.asarray(get() if callable(get) else a)

    def free(self) -> None:
        if not self.dry:
            self.xp.get_default_memory_pool().free_all_blocks()


@dataclass
class Cfg:
    dry: bool
    sizes: Sizes
    work: Path

    _backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = Backend(self.dry)
        return self._backend


# --- measures ----------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], sync: Callable[[], None], repeat: int = 1
          ) -> tuple[Any, float, float]:
    """(result, first call s, best of ``repeat`` further calls s); GPU work synchronised."""
    def once() -> tuple[Any, float]:
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    out, first = once()
    best = float("inf") if repeat else first
    for _ in range(repeat):
        out, sec = once()
        best = min(best, sec)
    return out, first, best


def absdiff(a: Any, b: Any) -> dict[str, float]:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}


def dice(a: Any, b: Any) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def secs(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def speedup(cpu: float, gpu: float) -> str:
    return f" ({cpu / gpu:.1f}× CPU)" if gpu > 0 else ""


def row(item: str, cpu: str = "—", gpu: str = "—", astra: str = "—", agreement: str = "—",
        goal: str = "—", ok: bool = True, **values: Any) -> dict[str, Any]:
    return {"item": item, "cpu": cpu, "gpu": gpu, "astra_cuda": astra, "agreement": agreement,
            "goal": goal, "ok": bool(ok), "values": values}


def astra_why_not(cfg: Cfg) -> str:
    if cfg.dry:
        return "not available (dry run)"
    from recon import astra_cuda_available

    why = astra_cuda_available()
    return f"not available: {why}" if why else ""


# --- stages ------------------------------------------------------------------------------------


def stage_env(cfg: Cfg) -> list[dict[str, Any]]:
    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                            "cpus": os.cpu_count(), "backend": cfg.backend.name}
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception as e:
        info["numba"] = f"missing: {e}"
    if not cfg.dry:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else \
            str(props["name"])
        info["gpu_mib"] = int(props["totalGlobalMem"]) // 2**20
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
    except Exception as e:
        info["torch"] = f"missing: {e}"
    info["astra_cuda"] = astra_why_not(cfg) or "available"
    ok = cfg.dry or bool(info.get("torch_cuda"))
    return [row("versions and device", cpu=f"{info['cpus']} cores, NumPy {info['numpy']}",
                gpu=str(info.get("gpu", cfg.backend.name)), astra=info["astra_cuda"],
                goal="torch sees the GPU" if not cfg.dry else "—", ok=ok, **info)]


def stage_recon_agree(cfg: Cfg) -> list[dict[str, Any]]:
    from dicomnode_ct_recon import CTReconParams, output_grid, reconstruct
    from dicomnode_ct_recon.analytic import to_hu

    from dicomnode.simulate.ct import make_geometry, project_shepp_logan

    s, be = cfg.sizes, cfg.backend
    n = s.agree_n
    fan = make_geometry("fan", s.agree_views, 2 * n, detector="cylindrical")
    par = make_geometry("parallel", s.agree_views, 2 * n + 1, detector="flat", arc_deg=180.0)
    m = s.agree_cone
    cone = make_geometry("cone", s.agree_views, 2 * m, max(4, m // 3), detector="flat")
    cases = [("parallel", par, "fbp"), ("fan", fan, "fbp"), ("fan", fan, "sirt"),
             ("fan", fan, "os-sart"), ("fan", fan, "cgls"), ("fan", fan, "tv"),
             ("cone", cone, "fdk")]
    sinos = {id(g): project_shepp_logan(g) for g in (fan, par, cone)}
    rows = []
    for kind, g, algo in cases:
        matrix = m if kind == "cone" else n
        params = CTReconParams(algorithm=algo, matrix=matrix,  # type: ignore[arg-type]
                               iterations=None if algo in ("fbp", "fdk") else s.agree_iters)
        grid = output_grid(g, params)
        sino = sinos[id(g)]
        t = time.perf_counter()
        cpu = reconstruct(sino, g, grid, params)
        t_cpu = time.perf_counter() - t
        gpu, first, _ = timed(lambda g=g, grid=grid, params=params, sino=sino:  # type: ignore[misc]
                              reconstruct(sino, g, grid, params, be.xp), be.sync)
        gpu = be.host(gpu)
        d = absdiff(to_hu(gpu, g.mu_water), to_hu(cpu, g.mu_water))
        limit = 2e-3 * float(np.abs(cpu).max()) / g.mu_water * 1000  # the tests' bound, in HU
        rows.append(row(f"{algo.upper()} {kind} {grid.shape[0]}×{matrix}² ({g.views} views"
                        f"{'' if algo in ('fbp', 'fdk') else f', {s.agree_iters} it.'})",
                        cpu=secs(t_cpu) + " (first call)", gpu=secs(first) + " (first call)",
                        agreement=f"max {d['max_abs']:.3g} / mean {d['mean_abs']:.3g} HU",
                        goal=f"max ≤ {limit:.2g} HU", ok=d["max_abs"] <= limit,
                        limit_hu=limit, **d))
    return rows


def _fbp_case(cfg: Cfg) -> tuple[Any, np.ndarray, Any]:
    from dicomnode_ct_recon.projector import Grid
    from recon import FOV, scan

    from dicomnode.simulate.ct import project_shepp_logan

    n = cfg.sizes.fbp_n
    g = scan(n, cfg.sizes.fbp_views)
    return g, project_shepp_logan(g), Grid(n, n, FOV / n, np.array([0.0]), 1.0)


def stage_recon_fbp(cfg: Cfg) -> list[dict[str, Any]]:
    from dicomnode_ct_recon.analytic import fbp, to_hu
    from dicomnode_ct_recon.projector import Projector
    from recon import astra_cuda_2d, rmse

    be, n = cfg.backend, cfg.sizes.fbp_n
    g, sino, grid = _fbp_case(cfg)
    pc = Projector(g, grid)
    cpu, cpu_first, cpu_s = timed(lambda: fbp(sino, g, grid, "ram-lak", np, pc), lambda: None, 2)
    pg = Projector(g, grid, be.xp)
    dev = be.xp.asarray(sino)
    gpu, gpu_first, gpu_s = timed(lambda: fbp(dev, g, grid, "ram-lak", be.xp, pg), be.sync, 3)
    gpu = be.host(gpu)
    d = absdiff(to_hu(gpu, g.mu_water), to_hu(cpu, g.mu_water))
    err = {"rmse_cpu_hu": rmse(cpu[0], (n - 1) / 2, g.mu_water),
           "rmse_gpu_hu": rmse(gpu[0], (n - 1) / 2, g.mu_water)}
    astra, astra_s = astra_why_not(cfg), None
    if not astra:
        a = astra_cuda_2d("FBP_CUDA", sino, g, n)
        astra_s = a["seconds"]
        astra = f"{secs(astra_s)} (RMSE {rmse(a['image'], (n - 1) / 2, g.mu_water):.1f} HU)"
    limit = 2e-3 * float(np.abs(cpu).max()) / g.mu_water * 1000
    ok = d["max_abs"] <= limit
    return [row(f"FBP {n}² from {g.views} views (Ram-Lak)", cpu=secs(cpu_s),
                gpu=secs(gpu_s) + speedup(cpu_s, gpu_s) + f", first {secs(gpu_first)}",
                astra=astra, agreement=f"max {d['max_abs']:.3g} / mean {d['mean_abs']:.3g} HU;"
                f" RMSE vs phantom {err['rmse_cpu_hu']:.1f} / {err['rmse_gpu_hu']:.1f} HU",
                goal="faster than ASTRA CUDA" if astra_s else "—",
                ok=ok and (astra_s is None or gpu_s <= astra_s), cpu_s=cpu_s, gpu_s=gpu_s,
                gpu_first_s=gpu_first, cpu_first_s=cpu_first, astra_cuda_s=astra_s, **d, **err)]


def stage_recon_fdk(cfg: Cfg) -> list[dict[str, Any]]:
    from dicomnode_ct_recon.analytic import fbp
    from dicomnode_ct_recon.projector import Projector
    from recon import astra_cuda_fdk, cone_case

    s, be = cfg.sizes, cfg.backend
    views = s.fdk_views
    cone, grid, proj = cone_case(s.fdk_n, views)

    def on_gpu() -> tuple[float, float]:  # its arrays are freed when it returns
        p = Projector(cone, grid, be.xp)
        dev = be.xp.asarray(proj)
        _, first, best = timed(lambda: fbp(dev, cone, grid, "ram-lak", be.xp, p), be.sync, 1)
        return first, best

    gpu_first, gpu_s = on_gpu()
    be.free()
    gpu_gups = float(s.fdk_n) ** 3 * views / gpu_s / 1e9
    cone_c, grid_c, proj_c = cone_case(s.fdk_cpu_n, views)
    pc = Projector(cone_c, grid_c)
    _, cpu_first, cpu_s = timed(lambda: fbp(proj_c, cone_c, grid_c, "ram-lak", np, pc),
                                lambda: None, 1)
    cpu_gups = float(s.fdk_cpu_n) ** 3 * views / cpu_s / 1e9
    astra, astra_gups = astra_why_not(cfg), None
    if not astra:
        a = astra_cuda_fdk(cone, s.fdk_n, proj)
        astra_gups = a["gups"]
        astra = f"{secs(a['seconds'])}, {astra_gups:.1f} G upd/s"
    goal_ok = gpu_gups >= 100 and (astra_gups is None or gpu_gups > astra_gups)
    return [row(f"FDK {s.fdk_n}³ from {views} views (CPU: {s.fdk_cpu_n}³)",
                cpu=f"{secs(cpu_s)}, {cpu_gups:.2f} G upd/s",
                gpu=f"{secs(gpu_s)}, {gpu_gups:.1f} G upd/s, first {secs(gpu_first)}",
                astra=astra, agreement="see recon-agree (FDK)",
                goal="≥ 100 G upd/s, > ASTRA CUDA" + ("" if goal_ok or cfg.dry else ": NOT met"),
                ok=True, goal_met=goal_ok, cpu_s=cpu_s, cpu_gups=cpu_gups, gpu_s=gpu_s,
                gpu_first_s=gpu_first, gpu_gups=gpu_gups, astra_cuda_gups=astra_gups,
                cpu_first_s=cpu_first)]


def stage_recon_iter(cfg: Cfg) -> list[dict[str, Any]]:
    from dicomnode_ct_recon import iterative
    from dicomnode_ct_recon.analytic import fbp, to_hu
    from dicomnode_ct_recon.projector import Grid, Projector
    from recon import FOV, astra_cuda_2d, scan

    from dicomnode.simulate.ct import project_shepp_logan

    s, be = cfg.sizes, cfg.backend
    n = s.iter_n
    g = scan(n, s.iter_views)
    sino = project_shepp_logan(g)
    grid = Grid(n, n, FOV / n, np.array([0.0]), 1.0)
    pc, pg = Projector(g, grid), Projector(g, grid, be.xp)
    dev = be.xp.asarray(sino)
    astra_na = astra_why_not(cfg)
    rows = []
    for name in ("sirt", "tv"):
        def run(p: Any, b: Any, k: int, xp: Any, name: str = name) -> Any:
            if name == "sirt":
                return iterative.sirt(p, b, k)
            start = fbp(b, g, grid, "hann", xp, p)
            return iterative.tv(p, b, k, 3e-4, balance=4.0, x0=start)

        run(pc, sino, 1, np)  # Numba compiles on first use
        t = time.perf_counter()
        cpu = run(pc, sino, s.iter_cpu, np)
        cpu_s = (time.perf_counter() - t) / s.iter_cpu
        # the same iterations on the GPU (agreement; also its warm-up: CuPy compiles on first
        # use), then the timed run
        gpu_same = be.host(run(pg, dev, s.iter_cpu, be.xp))
        be.sync()
        t = time.perf_counter()
        run(pg, dev, s.iter_gpu, be.xp)
        be.sync()
        gpu_s = (time.perf_counter() - t) / s.iter_gpu
        d = absdiff(to_hu(gpu_same, g.mu_water), to_hu(cpu, g.mu_water))
        astra, astra_s = astra_na, None
        if not astra and name == "sirt":
            astra_s = astra_cuda_2d("SIRT_CUDA", sino, g, n, s.iter_gpu)["per_iteration"]
            astra = f"{secs(astra_s)} / iteration"
        elif not astra:
            astra = "— (no TV in ASTRA)"
        limit = 2e-3 * float(np.abs(cpu).max()) / g.mu_water * 1000
        rows.append(row(f"{name.upper()} {n}², {g.views} views: time per iteration"
                        + (" (incl. norm estimate + warm start)" if name == "tv" else ""),
                        cpu=f"{secs(cpu_s)} ({s.iter_cpu} it.)",
                        gpu=f"{secs(gpu_s)}{speedup(cpu_s, gpu_s)} ({s.iter_gpu} it.)",
                        astra=astra, agreement=f"max {d['max_abs']:.3g} / mean "
                        f"{d['mean_abs']:.3g} HU after {s.iter_cpu} it.",
                        goal="faster than ASTRA CUDA" if astra_s else "—",
                        ok=d["max_abs"] <= limit, cpu_per_iteration_s=cpu_s,
                        gpu_per_iteration_s=gpu_s, astra_cuda_per_iteration_s=astra_s,
                        limit_hu=limit, **d))
    return rows


def _plugin_pair(cfg: Cfg, plugin: Any, inputs: Any, params: Any
                 ) -> tuple[Any, Any, float, float, float]:
    """(CPU outputs, GPU outputs, CPU s, GPU first call s, GPU warm s) of one plugin run."""
    from dicomnode.plugin import Context

    be = cfg.backend
    log = logging.getLogger("gpu-check")
    cpu_ctx = Context("cpu", np, "cpu", cfg.work, log)
    gpu_ctx = Context("gpu", be.plugin_xp, be.device, cfg.work, log)
    t = time.perf_counter()
    cpu = plugin.run(inputs, params, cpu_ctx)
    cpu_s = time.perf_counter() - t
    # on the GPU a second call shows the cost without CuPy's first-use kernel compiles
    gpu, first, warm = timed(lambda: plugin.run(inputs, params, gpu_ctx), be.sync,
                             0 if cfg.dry else 1)
    return cpu, gpu, cpu_s, first, warm


def _compare_findings(cpu: Any, gpu: Any, host: Callable[[Any], np.ndarray] = np.asarray
                      ) -> dict[str, Any]:
    def volumes(out: Any) -> list[float]:
        return [m.value for f in out.findings for m in f.measurements
                if m.name.meaning == "Volume"]

    vc, vg = volumes(cpu), volumes(gpu)
    lc = host(cpu.label_maps[0].array) if cpu.label_maps else np.zeros(1)
    lg = host(gpu.label_maps[0].array) if gpu.label_maps else np.zeros(1)  # CuPy or NumPy
    same_shape = lc.shape == lg.shape
    return {"findings_cpu": len(cpu.findings), "findings_gpu": len(gpu.findings),
            "volumes_cpu_ml": vc, "volumes_gpu_ml": vg,
            "volume_diff_ml": float(abs(sum(vc) - sum(vg))),
            "dice": dice(lc, lg) if same_shape else 0.0,
            "label_agreement": float((lc == lg).mean()) if same_shape else 0.0}


def _plugin_row(item: str, cfg: Cfg, c: dict[str, Any], cpu_s: float, first: float,
                warm: float, min_dice: float = 0.99) -> dict[str, Any]:
    ok = (c["findings_cpu"] == c["findings_gpu"] and c["dice"] >= min_dice
          and c["volume_diff_ml"] <= 0.02 * max(sum(c["volumes_cpu_ml"]), 1.0))
    return row(item, cpu=secs(cpu_s), gpu=f"{secs(warm)}{speedup(cpu_s, warm)}, first "
               f"{secs(first)}", agreement=f"Dice {c['dice']:.4f}, findings "
               f"{c['findings_cpu']}/{c['findings_gpu']}, Δvolume {c['volume_diff_ml']:.3g} mL",
               goal=f"same findings, Dice ≥ {min_dice}", ok=ok, cpu_s=cpu_s,
               gpu_first_s=first, gpu_s=warm, **c)


def stage_ich(cfg: Cfg) -> list[dict[str, Any]]:
    from detect import as_input
    from dicomnode_ich_triage import ICHParams, ICHTriage

    from dicomnode.simulate.head import head_ct

    slices, size, pixel, sub = cfg.sizes.head
    hu, truth, _ = head_ct(4242, kind="iph", volume_ml=6.0, slices=slices, size=size,
                           pixel_mm=pixel, sub=sub)
    cpu, gpu, cpu_s, first, warm = _plugin_pair(cfg, ICHTriage(), as_input(hu, truth),
                                                ICHParams())
    c = _compare_findings(cpu, gpu, cfg.backend.host)
    c["truth_ml"] = truth.lesions[0].volume_ml
    r = _plugin_row(f"ich-triage, head CT {slices}×{size}² with a 6 mL bleed", cfg, c, cpu_s,
                    first, warm)
    r["ok"] = r["ok"] and c["findings_cpu"] >= 1
    return [r]


def stage_nodules(cfg: Cfg) -> list[dict[str, Any]]:
    from detect import as_input
    from dicomnode_lung_nodules import LungNodules, NoduleParams

    from dicomnode.simulate.chest import chest_ct

    slices, size, pixel, slice_mm, sub = cfg.sizes.chest
    hu, truth, _ = chest_ct(51, specs=[("solid", 10.0), ("ground-glass", 16.0), ("solid", 6.0)],
                            slices=slices, size=size, pixel_mm=pixel, slice_mm=slice_mm,
                            sub=sub)
    cpu, gpu, cpu_s, first, warm = _plugin_pair(cfg, LungNodules(), as_input(hu, truth),
                                                NoduleParams())
    c = _compare_findings(cpu, gpu, cfg.backend.host)
    r = _plugin_row(f"lung-nodules, chest CT {slices}×{size}² (3 nodules)", cfg, c, cpu_s,
                    first, warm)
    r["ok"] = r["ok"] and c["findings_cpu"] >= 1
    return [r]


def volume_input(hu: np.ndarray, spacing: tuple[float, float, float]) -> Any:
    """A plugin input of an axial series with this HU volume [slice, row, column]."""
    from dicomnode.plugin import Geometry, Inputs, SeriesInput

    g = Geometry(origin=(0.0, 0.0, 0.0), row_direction=(1.0, 0.0, 0.0),
                 column_direction=(0.0, 1.0, 0.0), slice_direction=(0.0, 0.0, 1.0),
                 spacing=spacing, shape=hu.shape, frame_of_reference_uid="1.2.3.9")
    uids = tuple(f"1.2.3.9.{k}" for k in range(hu.shape[0]))
    si = SeriesInput("1.2.3.9.1", "CT", "BODY", "1.2.840.10008.5.1.4.1.1.2", uids, g, (), hu)
    return Inputs("1.2.3.9", (si,), {})


def stage_reformat(cfg: Cfg) -> list[dict[str, Any]]:
    from dicomnode_reformat import Reformat, ReformatParams
    from scipy.ndimage import gaussian_filter

    slices, size = cfg.sizes.reformat
    rng = np.random.default_rng(5)
    hu = gaussian_filter(rng.normal(0, 300, (slices, size, size)).astype(np.float32), 1.0)
    inputs = volume_input(hu, (1.25, 0.7, 0.7))
    rows = []
    for projection, slab in (("none", 0.0), ("mip", 10.0)):
        params = ReformatParams(planes=("axial", "coronal", "sagittal"), spacing_mm=1.3,
                                projection=projection, slab_mm=slab)
        cpu, gpu, cpu_s, first, warm = _plugin_pair(cfg, Reformat(), inputs, params)
        diffs = [absdiff(cfg.backend.host(b.array), np.asarray(a.array))
                 for a, b in zip(cpu.volumes, gpu.volumes, strict=True)]
        same_grid = all(a.geometry == b.geometry for a, b in
                        zip(cpu.volumes, gpu.volumes, strict=True))
        worst = max(d["max_abs"] for d in diffs)
        mean = float(np.mean([d["mean_abs"] for d in diffs]))
        rows.append(row(f"reformat {projection} ×3 planes of {slices}×{size}²", cpu=secs(cpu_s),
                        gpu=f"{secs(warm)}{speedup(cpu_s, warm)}, first {secs(first)}",
                        agreement=f"max {worst:.3g} / mean {mean:.3g} HU",
                        goal="max ≤ 0.05 HU, same grids", ok=worst <= 0.05 and same_grid,
                        cpu_s=cpu_s, gpu_first_s=first, gpu_s=warm, max_abs=worst,
                        mean_abs=mean, volumes=len(diffs)))
    return rows


def stage_model_runner(cfg: Cfg) -> list[dict[str, Any]]:
    import torch
    import yaml
    from dicomnode_model_runner import ModelRunner, ModelRunnerParams, load_predictor
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    s, be = cfg.sizes, cfg.backend
    torch.manual_seed(0)
    k = len(s.model_channels)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=s.model_channels,
               strides=(2,) * (k - 1), num_res_units=1).eval()
    model = cfg.work / "unet.ts"
    torch.jit.script(net).save(str(model))
    p = s.model_patch
    spec = cfg.work / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "random-unet", "version": "0", "window": [-1000, 1000], "normalize": "minmax",
        "patch_size": [p, p, p], "overlap": 0.25, "output": "softmax",
        "labels": {1: {"label": "Tissue", "category": ["85756007", "SCT", "Tissue"],
                       "type": ["85756007", "SCT", "Tissue"]}}}))
    slices, size = s.model_volume
    rng = np.random.default_rng(3)
    from scipy.ndimage import gaussian_filter

    hu = gaussian_filter(rng.normal(0, 400, (slices, size, size)).astype(np.float32), 2.0)
    inputs = volume_input(hu, (1.5, 1.0, 1.0))
    params = ModelRunnerParams(model=model, spec=spec, sw_batch_size=4)
    cpu, gpu, cpu_s, first, warm = _plugin_pair(cfg, ModelRunner(), inputs, params)
    c = _compare_findings(cpu, gpu, cfg.backend.host)
    # the network's raw outputs on both devices, same sliding window
    dev = "cuda" if be.device.startswith("cuda") else "cpu"
    x = torch.from_numpy(np.clip((hu + 1000) / 2000, 0, 1)[None, None].copy())
    with torch.no_grad():
        yc = sliding_window_inference(x, (p, p, p), 4, load_predictor(model, "cpu"),
                                      overlap=0.25, mode="gaussian")
        yg = sliding_window_inference(x.to(dev), (p, p, p), 4, load_predictor(model, dev),
                                      overlap=0.25, mode="gaussian").cpu()
    d = absdiff(yg.numpy(), yc.numpy())
    scale = float(yc.abs().max())
    ok = c["label_agreement"] >= 0.999 and d["max_abs"] <= 1e-2 * max(scale, 1e-6)
    return [row(f"model-runner: MONAI UNet {s.model_channels}, sliding window {p}³ over "
                f"{slices}×{size}²", cpu=secs(cpu_s),
                gpu=f"{secs(warm)}{speedup(cpu_s, warm)}, first {secs(first)}",
                agreement=f"labels equal {c['label_agreement']:.5f}; logits max "
                f"{d['max_abs']:.3g} / mean {d['mean_abs']:.3g} (of {scale:.3g})",
                goal="labels ≥ 0.999 equal, logits ≤ 1 %", ok=ok, cpu_s=cpu_s,
                gpu_first_s=first, gpu_s=warm, logits_scale=scale,
                logits_max_abs=d["max_abs"], logits_mean_abs=d["mean_abs"], **c)]


def stage_e2e(cfg: Cfg) -> list[dict[str, Any]]:
    """A real node with a GPU slot: head CT in over DICOM, ich-triage's SR/SEG out."""
    import highdicom as hd
    import pydicom
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    from dicomnode.simulate.head import write_head_ct
    from tests.helpers import NodeProc, free_port, wait_until

    slices, size, pixel, sub = cfg.sizes.head
    files, truth = write_head_ct(cfg.work / "head", 4243, kind="iph", volume_ml=6.0,
                                 slices=slices, size=size, pixel_mm=pixel, sub=sub)
    t_start = time.perf_counter()

    def say(what: str) -> None:
        print(f"e2e +{time.perf_counter() - t_start:5.1f} s: {what}", flush=True)

    say(f"{len(files)} files written")
    received: list[pydicom.Dataset] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.supported_contexts = AllStoragePresentationContexts
    pacs_port = free_port()
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    node = NodeProc(cfg.work / "node", f"sqlite:///{cfg.work / 'node' / 'index.sqlite3'}",
                    overrides={
                        "runner": {"gpu_slots": 1, "processes": 1, "poll_seconds": 0.2},
                        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                  "port": pacs_port}},
                        "routes": [{"name": "ich", "match": {"Modality": "CT"},
                                    "pipeline": [{"plugin": "ich-triage"}],
                                    "send_to": ["pacs"]}]})
    try:
        node.start()
        say("node listening")
        scu = AE(ae_title="CT_SCANNER")
        scu.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)
        t0 = time.perf_counter()
        assoc = scu.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        if not assoc.is_established:
            raise RuntimeError("association with the node was refused")
        statuses = [assoc.send_c_store(str(f)).Status for f in files]
        assoc.release()
        pushed = time.perf_counter() - t0
        say("pushed")
        if any(s != 0 for s in statuses):
            raise RuntimeError(f"C-STORE statuses {sorted(set(statuses))}")
        jobs = wait_until(lambda: [j for j in node.jobs()
                                   if j["state"] in ("succeeded", "failed", "dead",
                                                     "not-applicable")],
                          timeout=240, interval=1.0, what="the job to finish")
        job = jobs[0]
        say(f"job {job['state']}")
        if job["state"] == "succeeded":
            wait_until(lambda: {str(d.Modality) for d in received} >= {"SR", "SEG"},
                       timeout=60, what="SR and SEG at the PACS")
        done = time.perf_counter() - t0
        log = node.log()
    finally:
        node.stop()
        server.shutdown()
        say("node and PACS stopped")
    slot = "GPU slot 0" in log
    unusable = "unusable" in log
    modalities = sorted({str(d.Modality) for d in received})
    volume = None
    srs = [d for d in received if str(d.Modality) == "SR"]
    if srs:
        sr = hd.sr.Comprehensive3DSR.from_dataset(srs[0])
        groups = sr.content.get_volumetric_roi_measurement_groups()
        vols = [m.value for gr in groups for m in gr.get_measurements(
            name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))]
        volume = float(vols[0]) if vols else None
    true_ml = truth.lesions[0].volume_ml
    found = volume is not None and abs(volume - true_ml) <= 0.3 * true_ml
    on_gpu = slot and not unusable
    ok = job["state"] == "succeeded" and "SR" in modalities and "SEG" in modalities and found \
        and (on_gpu or cfg.dry)
    device = "GPU slot 0" if on_gpu else ("CPU (slot held, no usable GPU)" if slot else "CPU")
    return [row(f"e2e: {len(files)}-slice head CT → node (gpu_slots 1) → ich-triage → PACS",
                gpu=f"job {job['state']} on {device}; push {pushed:.1f} s, results at "
                f"{done:.1f} s", agreement=f"received {', '.join(modalities) or 'nothing'}; "
                f"SR volume {volume if volume is None else round(volume, 2)} mL (truth "
                f"{true_ml:.2f})", goal="succeeded on the GPU, SR finding ±30 %", ok=ok,
                job_state=job["state"], reason=job.get("reason"), on_gpu=on_gpu,
                received=modalities, sr_volume_ml=volume, truth_ml=true_ml,
                push_s=pushed, results_s=done)]


GPU_TESTS = ["tests/test_ct_recon.py", "tests/test_ich_triage.py", "tests/test_lung_nodules.py",
             "tests/test_builtin_plugins.py"]


def stage_pytest_gpu(cfg: Cfg) -> list[dict[str, Any]]:
    import re

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "-k", "gpu_matches_cpu or on_the_gpu", *GPU_TESTS]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(p.stdout[-6000:], p.stderr[-3000:], flush=True)
    lines = [ln for ln in p.stdout.splitlines() if re.search(r"\d+ (passed|skipped|failed)", ln)]
    summary = lines[-1].strip("= ") if lines else f"no summary (exit {p.returncode})"
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    if cfg.dry:  # no GPU here: the tests must be collected and skip, nothing may fail
        ok = p.returncode in (0, 5) and not counts.get("failed") and not counts.get("error") \
            and counts.get("skipped", 0) >= 1
    else:
        ok = p.returncode == 0 and counts.get("passed", 0) >= 1 and not counts.get("skipped")
    return [row("pytest: " + " ".join(cmd[-5:-4]) + " (GPU tests of 4 files)", gpu=summary,
                goal="all pass on the GPU (dry run: all skip)", ok=ok, returncode=p.returncode,
                **counts)]


def stage_hang(cfg: Cfg) -> list[dict[str, Any]]:
    """Injected with ``--inject-hang``: proves a stage past its limit is reported, not waited."""
    time.sleep(3600)
    return []


@dataclass(frozen=True)
class Stage:
    fn: Callable[[Cfg], list[dict[str, Any]]]
    limit_s: float       # on the GPU machine
    dry_limit_s: float   # in the CPU dry run (2 shared cores)


STAGES: dict[str, Stage] = {
    "env": Stage(stage_env, 60, 60),
    "recon-agree": Stage(stage_recon_agree, 120, 120),
    "recon-fbp": Stage(stage_recon_fbp, 90, 90),
    "recon-fdk": Stage(stage_recon_fdk, 120, 90),
    "recon-iter": Stage(stage_recon_iter, 120, 90),
    "ich": Stage(stage_ich, 90, 90),
    "nodules": Stage(stage_nodules, 180, 90),
    "reformat": Stage(stage_reformat, 60, 60),
    "model-runner": Stage(stage_model_runner, 90, 90),
    "e2e": Stage(stage_e2e, 120, 240),
    "pytest-gpu": Stage(stage_pytest_gpu, 240, 120),
    "hang": Stage(stage_hang, 5, 5),
}

# --- running stages in their own processes -----------------------------------------------------


def run_child(name: str, dry: bool, result: Path) -> int:
    """In the stage's own process: run it, write its rows (or its error) to ``result``."""
    if str(ROOT) not in sys.path:  # tests.helpers (e2e); the checkout's dicomnode is the same
        sys.path.insert(1, str(ROOT))
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    cfg = Cfg(dry, DRY_SIZES if dry else GPU_SIZES, work)
    t = time.perf_counter()
    try:
        rows = STAGES[name].fn(cfg)
        out: dict[str, Any] = {"status": "ok" if all(r["ok"] for r in rows) else "fail",
                               "rows": rows}
    except Exception as e:
        traceback.print_exc()
        out = {"status": "error", "rows": [], "error": f"{type(e).__name__}: {e}"[:2000]}
    out["seconds"] = round(time.perf_counter() - t, 2)
    result.write_text(json.dumps(out, default=str))
    return 0


def run_stage(name: str, limit: float, dry: bool, tmp: Path, log: Any) -> dict[str, Any]:
    result = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name,
           "--result", str(result)] + (["--cpu-dry-run"] if dry else [])
    log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    t = time.perf_counter()
    # a new session: on timeout the stage and everything it started (a node, pool workers)
    # are killed together, by this process group's id
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                         start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return {"status": "timeout", "rows": [], "seconds": round(time.perf_counter() - t, 2),
                "error": f"killed after its {limit:.0f} s limit"}
    with contextlib.suppress(ProcessLookupError):  # anything the stage left running
        os.killpg(p.pid, signal.SIGKILL)
    if not result.exists():
        return {"status": "error", "rows": [], "seconds": round(time.perf_counter() - t, 2),
                "error": f"stage process exited {rc} without a result (crashed?)"}
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def markdown(report: dict[str, Any]) -> str:
    gpu = "GPU" if report["mode"] == "gpu" else "GPU path (NumPy stand-in)"
    lines = [f"# GPU check ({report['mode']}, {report['finished']})", "",
             f"| stage | status | item | CPU | {gpu} | ASTRA CUDA | agreement | goal |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(x: Any) -> str:
        return str(x).replace("|", "/").replace("\n", " ")

    for st in report["stages"]:
        status = f"**{st['status']}** ({st.get('seconds', 0):.0f} s)"
        if not st["rows"]:
            lines.append(f"| {st['name']} | {status} | {cell(st.get('error', ''))} "
                         "| | | | | |")
        for r in st["rows"]:
            mark = "" if r["ok"] else " ✗"
            lines.append(f"| {st['name']} | {status} | {cell(r['item'])}{mark} | "
                         f"{cell(r['cpu'])} | {cell(r['gpu'])} | {cell(r['astra_cuda'])} | "
                         f"{cell(r['agreement'])} | {cell(r['goal'])} |")
    counts = report["summary"]
    lines += ["", "Status: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
              "", "CPU: NumPy/Numba/SciPy on this machine's cores; GPU: the same code with "
              "CuPy (torch cuda for model-runner); agreement: GPU vs CPU on the same input "
              "(HU for images, Dice and volume for label maps); ✗: a check missed its bound."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="small sizes, NumPy standing in for CuPy (no GPU needed)")
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT") or "gpu-check-out"))
    ap.add_argument("--only", default="", help="comma-separated stages to run")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all stages together (default 420 on a GPU, 720 dry); a "
                    "stage gets at most what is left, none starts with under 10 s left")
    ap.add_argument("--inject-hang", action="store_true",
                    help="add a stage that never ends (to see it reported as timeout)")
    ap.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                    help="override one stage's time limit")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return run_child(args.stage, args.cpu_dry_run, args.result)

    dry = args.cpu_dry_run
    names = [n for n in STAGES if n != "hang"] + (["hang"] if args.inject_hang else [])
    if args.only:
        names = [n for n in args.only.split(",") if n in STAGES] + \
            (["hang"] if args.inject_hang and "hang" not in args.only else [])
    names = [n for n in names if n not in args.skip.split(",")]
    limits = {n: STAGES[n].dry_limit_s if dry else STAGES[n].limit_s for n in names}
    for spec in args.limit:
        k, _, v = spec.partition("=")
        limits[k] = float(v)
    budget = args.budget if args.budget is not None else (720.0 if dry else 420.0)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict[str, Any] = {"mode": "cpu-dry-run" if dry else "gpu",
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "host": platform.node(), "budget_s": budget, "stages": []}
    t0 = time.monotonic()
    print(f"GPU check ({report['mode']}): {', '.join(names)}; budget {budget:.0f} s",
          flush=True)
    with open(args.out / "stages.log", "w") as log:
        for name in names:
            left = budget - (time.monotonic() - t0)
            if left < 10:
                st: dict[str, Any] = {"status": "skipped", "rows": [], "seconds": 0,
                                      "error": "the run's --budget was spent"}
            else:
                st = run_stage(name, min(limits[name], left), dry, tmp, log)
            st = {"name": name, "limit_s": limits[name], **st}
            report["stages"].append(st)
            print(f"  {name:13s} {st['status']:8s} {st.get('seconds', 0):6.1f} s  "
                  + "; ".join(f"{r['item']}: {r['gpu']} | {r['agreement']}"
                              for r in st["rows"])[:400]
                  + (f" {st['error']}" if st.get("error") else ""), flush=True)
            (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    summary: dict[str, int] = {}
    for st in report["stages"]:
        summary[st["status"]] = summary.get(st["status"], 0) + 1
    report["summary"] = summary
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["seconds"] = round(time.monotonic() - t0, 1)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (args.out / "gpu-check.md").write_text(md)
    print(md, flush=True)
    return 0 if all(st["status"] == "ok" for st in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
