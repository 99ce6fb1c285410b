"""bench/gpu.py, the GPU check of issue 20, in its CPU dry run: every stage runs (NumPy standing
in for CuPy, small sizes) and reports numbers that make sense, and a stage that outlives its
time limit is reported as a timeout instead of holding up the run. The real run needs a lent
GPU (bench/README.md, "GPU check")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_PY = ROOT / "bench" / "gpu.py"
STAGES = ["env", "recon-agree", "recon-fbp", "recon-fdk", "recon-iter", "ich", "nodules",
          "reformat", "model-runner", "e2e", "pytest-gpu"]


def run_check(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *(str(p) for p in sorted((ROOT / "plugins").glob("*/src"))),
         os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(GPU_PY), "--cpu-dry-run", "--out", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, int]:
    out = tmp_path_factory.mktemp("gpu-check")
    p = run_check(out, timeout=1500)
    report = json.loads((out / "gpu-check.json").read_text())
    return report, (out / "gpu-check.md").read_text(), p.returncode


def values(report: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    [st] = [s for s in report["stages"] if s["name"] == stage]
    return [r["values"] for r in st["rows"]]


@pytest.mark.timeout(1600)
def test_dry_run_every_stage_ok_with_sane_numbers(
        dry_run: tuple[dict[str, Any], str, int]) -> None:
    report, md, rc = dry_run
    assert report["mode"] == "cpu-dry-run"
    by_name = {s["name"]: s for s in report["stages"]}
    assert list(by_name) == STAGES
    bad = {n: (s["status"], s.get("error")) for n, s in by_name.items() if s["status"] != "ok"}
    assert not bad, bad
    assert rc == 0
    assert all(s["rows"] and all(r["ok"] for r in s["rows"]) for s in report["stages"])
    [env] = values(report, "env")
    assert env["backend"] == "NumPy standing in for CuPy"
    assert env["astra_cuda"].startswith("not available")
    # ct-recon: the vectorised (GPU) code path on NumPy vs the Numba kernels: ~0 HU
    agree = values(report, "recon-agree")
    assert len(agree) == 7  # FBP parallel and fan, SIRT, OS-SART, CGLS, TV, FDK
    for v in agree:
        assert 0 <= v["mean_abs"] <= v["max_abs"] < 0.1
    [fbp] = values(report, "recon-fbp")
    assert fbp["max_abs"] < 0.1 and fbp["cpu_s"] > 0 and fbp["gpu_s"] > 0
    assert 10 < fbp["rmse_cpu_hu"] < 150
    assert fbp["rmse_gpu_hu"] == pytest.approx(fbp["rmse_cpu_hu"], abs=0.5)
    assert fbp["astra_cuda_s"] is None
    [fdk] = values(report, "recon-fdk")
    assert fdk["gpu_gups"] > 0 and fdk["cpu_gups"] > 0 and fdk["astra_cuda_gups"] is None
    iters = values(report, "recon-iter")
    assert len(iters) == 2
    for v in iters:
        assert v["max_abs"] < 0.1 and v["cpu_per_iteration_s"] > 0
    # the plugins with NumPy on both sides: identical
    for stage in ("ich", "nodules"):
        [v] = values(report, stage)
        assert v["findings_cpu"] == v["findings_gpu"] >= 1
        assert v["dice"] == 1.0 and v["volume_diff_ml"] == 0.0
    [ich] = values(report, "ich")
    assert sum(ich["volumes_cpu_ml"]) == pytest.approx(ich["truth_ml"], rel=0.3)
    for v in values(report, "reformat"):
        assert v["max_abs"] == 0.0 and v["volumes"] == 3
    [model] = values(report, "model-runner")
    assert model["label_agreement"] == 1.0 and model["logits_max_abs"] == 0.0
    assert model["logits_scale"] > 0
    # the node's job ran (on the CPU: the GPU slot has no usable GPU here) and sent its results
    [e2e] = values(report, "e2e")
    assert e2e["job_state"] == "succeeded" and not e2e["on_gpu"]
    assert {"SR", "SEG"} <= set(e2e["received"])
    assert e2e["sr_volume_ml"] == pytest.approx(e2e["truth_ml"], rel=0.3)
    [tests] = values(report, "pytest-gpu")
    assert tests.get("skipped", 0) >= 8 and not tests.get("failed")  # no GPU: all skip
    # the table: a header and at least one line per stage
    assert "| stage | status | item | CPU |" in md
    for name in STAGES:
        assert f"| {name} | **ok**" in md


def test_a_stage_past_its_limit_is_reported_as_timeout(tmp_path: Path) -> None:
    t = time.monotonic()
    p = run_check(tmp_path, "--only", "env", "--inject-hang", "--limit", "hang=3",
                  timeout=240)
    took = time.monotonic() - t
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    assert by_name["env"]["status"] == "ok"
    assert by_name["hang"]["status"] == "timeout"
    assert by_name["hang"]["seconds"] < 30 and "3 s limit" in by_name["hang"]["error"]
    assert p.returncode == 1  # not every stage ok
    assert "| hang | **timeout**" in (tmp_path / "gpu-check.md").read_text()
    assert took < 200
