"""End to end with real peers: dcmtk storescu → node → route → plugin job → SEG + SR → Orthanc
(the Debian package, started per test). Failures: destinations down, plugins that raise, hang
or return nonsense, the node killed mid-job."""

from __future__ import annotations

import getpass
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import psutil
import pydicom
import pytest

from dicomnode.simulate import write_ct_series
from tests.helpers import (
    Webhook,
    dcmtk,
    dcmtk_env,
    echoscu,
    free_port,
    storescu,
    wait_until,
)
from tests.orthanc import Orthanc
from tests.validators import dciodvfy_errors, dsrdump_errors


def pipeline_config(orthanc: Orthanc, routes: list[dict[str, Any]],
                    extra_destinations: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": orthanc.port}, **(extra_destinations or {})},
        "routes": routes,
        "runner": {"processes": 2, "max_attempts": 2, "poll_seconds": 0.2},
    }


CT_THRESHOLD = {"name": "ct-threshold", "match": {"Modality": "CT"},
                "pipeline": [{"plugin": "threshold", "params": {"hu_min": 300}}],
                "send_to": ["pacs"]}


def make_node(node_factory, cfg: dict[str, Any], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return node_factory(env=env, **cfg).start()


def ct_study(tmp_path: Path, n: int = 10) -> tuple[list[Path], np.ndarray]:
    files = write_ct_series(tmp_path / "ct", n=n, size=64)
    hu = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float32) - 1024 for f in files])
    return files, hu


def wait_jobs(node, pred, what: str, timeout: float = 90) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return wait_until(lambda: (lambda js: js if pred(js) else None)(node.jobs()),  # type: ignore[no-any-return]
                      timeout=timeout, interval=0.5, what=what)


def test_storescu_to_orthanc_seg_and_sr(node_factory, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = make_node(node_factory, pipeline_config(orthanc, [CT_THRESHOLD]))
    files, hu = ct_study(tmp_path)
    storescu(node.port, files, aet="CT_SCANNER")
    wait_until(lambda: len(orthanc.series()) == 2, timeout=60, what="SEG and SR in Orthanc")
    by_modality = {s["MainDicomTags"]["Modality"]: s for s in orthanc.series()}
    assert set(by_modality) == {"SEG", "SR"}
    seg_path = orthanc.instance_file(by_modality["SEG"]["Instances"][0], tmp_path / "seg.dcm")
    sr_path = orthanc.instance_file(by_modality["SR"]["Instances"][0], tmp_path / "sr.dcm")
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    assert dsrdump_errors(sr_path) == []
    # the values written are the values of the data: volume of voxels >= 300 HU
    spacing = 1.0 * 0.9765625 * 0.9765625
    expected_ml = float((hu >= 300).sum()) * spacing / 1000
    sr = hd.sr.srread(sr_path)
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    [volume] = group.get_measurements()
    assert volume.value == pytest.approx(expected_ml, rel=1e-4)
    seg = hd.seg.segread(seg_path)
    assert int(seg.get_volume().array.sum()) == int((hu >= 300).sum())
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    [job] = node.jobs()
    assert job["state"] == "succeeded" and job["deliveries"][0]["state"] == "sent"
    types = [e["event_type"] for e in node.audit()]
    for t in ("study-completed", "route-matched", "job-finished", "results-sent"):
        assert t in types, t
    assert node.cli("audit", "verify").returncode == 0


def test_destination_down_retries_then_dead_letter_then_retry(node_factory, orthanc,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    down_port = free_port()
    route = {**CT_THRESHOLD, "send_to": ["pacs", "backup"]}
    # backoff 1 s then 2 s: the backup cannot be a dead letter sooner than 3 s after its
    # first attempt, which is ample for the PACS's one association (two small objects)
    node = make_node(node_factory, pipeline_config(orthanc, [route], {"backup": {
        "ae_title": "BACKUP", "host": "127.0.0.1", "port": down_port, "max_retries": 2,
        "retry_delay_seconds": 1.0, "retry_multiplier": 2, "timeout_seconds": 5}}))
    files, _ = ct_study(tmp_path)
    storescu(node.port, files)
    wait_until(lambda: len(orthanc.series()) == 2, timeout=60, what="results in Orthanc")
    [job] = wait_jobs(node, lambda js: js and {d["state"] for d in js[0]["deliveries"]}
                      == {"sent", "dead"}, "backup to become a dead letter")
    by_dest = {d["destination"]: d for d in job["deliveries"]}
    dead = by_dest["backup"]
    assert dead["attempts"] == 3 and "no association" in dead["last_error"]
    # the dead destination did not hold the working one back: the PACS got the results at
    # its first attempt, while the backup was still being retried (the order of the audit
    # trail, not the clock)
    assert by_dest["pacs"]["state"] == "sent" and by_dest["pacs"]["attempts"] == 1
    trail = node.audit()
    [sent] = [e for e in trail if e["event_type"] == "results-sent"]
    assert sent["detail"]["destination"] == "pacs"
    failures = [e for e in trail if e["event_type"] == "send-failed"
                and e["detail"]["destination"] == "backup"]
    assert [e["detail"]["state"] for e in failures] == ["pending", "pending", "dead"]
    assert [e["detail"]["attempt"] for e in failures] == [1, 2, 3]
    assert sent["seq"] < failures[-1]["seq"]
    # the backup comes up; the admin re-queues the dead letter
    out = tmp_path / "backup"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "BACKUP", "-od", str(out), "+xa",
                            str(down_port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: echoscu(down_port, aec="BACKUP").returncode == 0, what="storescp")
        assert "1 dead delivery re-queued" in node.cli("jobs", "retry", str(job["id"])).stdout
        wait_until(lambda: len(list(out.iterdir())) == 2, timeout=30, what="backup delivery")
        assert len(orthanc.series()) == 2  # nothing sent twice to the PACS that had it
        # the admin's retry is audited with who did it
        (moved,) = node.audit("delivery-state")
        assert moved["user"] == getpass.getuser()
        assert (moved["detail"]["from"], moved["detail"]["to"], moved["detail"]["job_id"]) == (
            "dead", "pending", job["id"])
    finally:
        scp.terminate()
        scp.wait(10)


BAD_PLUGINS = '''
import time
from dicomnode.plugin import Code, Needs, Outputs, Plugin
FAMILY = Code("123110", "DCM", "Artificial Intelligence")

class Raises(Plugin):
    name, version, algorithm_family = "raises", "0.1", FAMILY
    def run(self, inputs, params, ctx):
        raise RuntimeError("model weights missing")

class Hangs(Plugin):
    name, version, algorithm_family = "hangs", "0.1", FAMILY
    needs = Needs(timeout_seconds=2)
    def run(self, inputs, params, ctx):
        time.sleep(3600)

class Nonsense(Plugin):
    name, version, algorithm_family = "nonsense", "0.1", FAMILY
    def run(self, inputs, params, ctx):
        return "a string, not Outputs"

class Slow(Plugin):
    name, version, algorithm_family = "slow", "0.1", FAMILY
    def run(self, inputs, params, ctx):
        time.sleep(6)
        from dicomnode_example_threshold import Threshold, ThresholdParams
        return Threshold().run(inputs, ThresholdParams(), ctx)

class Critical(Plugin):
    name, version, algorithm_family = "critical", "0.1", FAMILY
    def run(self, inputs, params, ctx):
        return Outputs(summary="alarm", critical="test: something critical")
'''


@pytest.fixture
def bad_plugins(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "badplugins"
    root.mkdir()
    (root / "bad_plugins.py").write_text(textwrap.dedent(BAD_PLUGINS))
    info = root / "bad_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[dicomnode.plugins]\nraises = bad_plugins:Raises\nhangs = bad_plugins:Hangs\n"
        "nonsense = bad_plugins:Nonsense\nslow = bad_plugins:Slow\n"
        "critical = bad_plugins:Critical\n")
    # added to (not replacing) the caller's path: a worktree run keeps its own dicomnode
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH"))
                                          if p)}


def test_plugins_that_raise_hang_or_return_nonsense(node_factory, orthanc, bad_plugins,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    routes = [{"name": n, "match": {"Modality": "CT"}, "pipeline": [{"plugin": n}],
               "send_to": ["pacs"]} for n in ("raises", "hangs", "nonsense")]
    node = make_node(node_factory, pipeline_config(orthanc, routes), env=bad_plugins)
    files, _ = ct_study(tmp_path)
    storescu(node.port, files)
    jobs = wait_jobs(node, lambda js: len(js) == 3 and all(
        j["state"] in ("dead", "failed") for j in js), "three failed jobs", timeout=120)
    by_route = {j["route"]: j for j in jobs}
    assert by_route["raises"]["state"] == "dead" and by_route["raises"]["attempts"] == 2
    assert "RuntimeError: model weights missing" in by_route["raises"]["reason"]
    assert by_route["hangs"]["state"] == "dead" and "timed out" in by_route["hangs"]["reason"]
    assert by_route["nonsense"]["state"] == "failed"  # not retried: it will not get better
    assert by_route["nonsense"]["attempts"] == 1
    assert "returned str, not Outputs" in by_route["nonsense"]["reason"]
    assert all(j["deliveries"] == [] for j in jobs)
    assert orthanc.series() == []  # nothing sent
    assert echoscu(node.port).returncode == 0  # node unharmed
    storescu(node.port, write_ct_series(tmp_path / "more", n=4, size=32))  # still ingests


def test_node_killed_mid_job_finishes_after_restart_once(node_factory, orthanc, bad_plugins,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    route = {"name": "slow", "match": {"Modality": "CT"}, "pipeline": [{"plugin": "slow"}],
             "send_to": ["pacs"]}
    cfg = pipeline_config(orthanc, [route])
    node = make_node(node_factory, cfg, env=bad_plugins)
    files, _ = ct_study(tmp_path)
    storescu(node.port, files)
    wait_jobs(node, lambda js: js and js[0]["state"] == "running", "job running")
    running = psutil.Process(node.proc.pid).children()
    node.kill()  # SIGKILL mid-job
    # the job process must not outlive the node (PR_SET_PDEATHSIG)
    wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in running),
               timeout=10, what="orphaned job process to die")
    node2 = make_node(node_factory, cfg, env=bad_plugins)
    [job] = wait_jobs(node2, lambda js: js and js[0]["deliveries"]
                      and js[0]["deliveries"][0]["state"] == "sent", "job done and sent",
                      timeout=120)
    assert job["attempts"] >= 2
    time.sleep(2)
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in orthanc.series())
    assert modalities == ["SEG", "SR"]
    assert orthanc.get("/statistics")["CountInstances"] == 2  # each result exactly once


def test_each_step_is_sent_when_done_and_once_across_a_crash_and_a_failure(  # type: ignore[no-untyped-def]
        node_factory, orthanc, bad_plugins, tmp_path: Path) -> None:
    """Step 0's results reach the PACS while step 1 still runs; the node is killed during
    step 1; after the restart step 0 is kept (not re-run, not re-sent), step 1 runs and is
    sent; step 2 raises: the job is dead, what the finished steps made was delivered once."""
    route = {"name": "steps", "match": {"Modality": "CT"},
             "pipeline": [{"plugin": "threshold", "params": {"hu_min": 300}},
                          {"plugin": "slow"}, {"plugin": "raises"}],
             "send_to": ["pacs"]}
    cfg = pipeline_config(orthanc, [route])
    node = make_node(node_factory, cfg, env=bad_plugins)
    files, _ = ct_study(tmp_path)
    storescu(node.port, files)
    # step 0 delivered while the job is still running step 1 (slow: 6 s)
    [job] = wait_jobs(node, lambda js: js and any(d["state"] == "sent"
                                                  for d in js[0]["deliveries"]),
                      "step 0 sent", timeout=60)
    assert job["state"] == "running"
    assert orthanc.get("/statistics")["CountInstances"] == 2  # SEG + SR of step 0
    running = psutil.Process(node.proc.pid).children()
    node.kill()  # SIGKILL during step 1
    wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in running),
               timeout=10, what="orphaned job process to die")
    node2 = make_node(node_factory, cfg, env=bad_plugins)
    [job] = wait_jobs(node2, lambda js: js and js[0]["state"] == "dead"
                      and len(js[0]["deliveries"]) == 2
                      and all(d["state"] == "sent" for d in js[0]["deliveries"]),
                      "job dead, two steps sent", timeout=120)
    assert "RuntimeError: model weights missing" in job["reason"]
    assert sorted(d["step"] for d in job["deliveries"]) == [0, 1]
    assert len(job["results"]) == 4  # what was delivered: two steps, SEG + SR each
    sent = node2.audit("results-sent")
    assert sorted(e["detail"]["step"] for e in sent) == [0, 1]  # each step once
    assert orthanc.get("/statistics")["CountInstances"] == 4
    assert "step 0 (threshold) finished in an earlier attempt" in node2.log()


def test_critical_finding_of_a_step_is_notified_even_when_a_later_step_fails(  # type: ignore[no-untyped-def]
        node_factory, orthanc, bad_plugins, tmp_path: Path) -> None:
    """Step 0's results (and so its finding) go out when step 0 is done; the page must go with
    them, not wait for a job success that never comes (step 1 raises)."""
    hook = Webhook()
    hook.start()
    try:
        route = {"name": "alarm", "match": {"Modality": "CT"},
                 "pipeline": [{"plugin": "critical"}, {"plugin": "raises"}],
                 "send_to": ["pacs"], "notify": {"webhook": hook.url}}
        node = make_node(node_factory, pipeline_config(orthanc, [route]), env=bad_plugins)
        files, _ = ct_study(tmp_path)
        storescu(node.port, files)
        wait_jobs(node, lambda js: js and js[0]["state"] == "dead", "job dead", timeout=90)
        [alert] = wait_until(lambda: hook.received, timeout=30, what="the alert")
        assert alert["message"] == "critical: test: something critical"
        assert alert["step"] == 0
        time.sleep(2)
        assert len(hook.received) == 1  # once, across the job's two attempts
    finally:
        hook.stop()


def test_study_matching_no_route_is_audited(node_factory, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    route = {**CT_THRESHOLD, "match": {"Modality": "MR"}}
    node = make_node(node_factory, pipeline_config(orthanc, [route]))
    files, _ = ct_study(tmp_path, n=4)
    storescu(node.port, files)
    [event] = wait_until(lambda: node.audit("no-route"), what="no-route audit")
    assert event["detail"]["modalities"] == ["CT"]
    assert node.jobs() == []


def test_issue_example_config_reformat_and_surface_into_orthanc(node_factory, orthanc,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    """The configuration shape from the pipelines issue, verbatim: every kind of object lands
    in Orthanc and passes dciodvfy (SR also dsrdump)."""
    route = {"name": "ct-3d", "match": {"Modality": "CT"},
             "pipeline": [{"plugin": "reformat"},
                          {"plugin": "surface", "params": {"hu_min": 300}}],
             "send_to": ["pacs"]}
    node = make_node(node_factory, pipeline_config(orthanc, [route]))
    files, hu = ct_study(tmp_path, n=16)
    storescu(node.port, files)
    # reformat: coronal + sagittal series; surface: SEG, SR, STL
    wait_until(lambda: len(orthanc.series()) == 5, timeout=90, what="5 result series")
    series = orthanc.series()
    kinds = sorted((s["MainDicomTags"]["Modality"], s["MainDicomTags"].get("SeriesDescription",
                                                                          "")) for s in series)
    assert [k[0] for k in kinds] == ["CT", "CT", "M3D", "SEG", "SR"]
    assert {k[1] for k in kinds if k[0] == "CT"} == {"CORONAL MPR 2mm", "SAGITTAL MPR 2mm"}
    for s in series:
        ids = s["Instances"] if s["MainDicomTags"]["Modality"] != "CT" else s["Instances"][:2]
        for i, inst in enumerate(ids):
            p = orthanc.instance_file(inst, tmp_path / f"{s['ID']}_{i}.dcm")
            assert dciodvfy_errors(p) == [], (s["MainDicomTags"], p)
            if s["MainDicomTags"]["Modality"] == "SR":
                assert dsrdump_errors(p) == []
                sr = hd.sr.srread(p)
                [group] = sr.content.get_volumetric_roi_measurement_groups()
                values = {m.name.meaning: m.value for m in group.get_measurements()}
                expected_ml = float((hu >= 300).sum()) * 1.0 * 0.9765625**2 / 1000
                assert values["Volume"] == pytest.approx(expected_ml, rel=1e-3)
                assert values["Area"] > 0
    [job] = node.jobs()
    assert job["state"] == "succeeded" and "reformat" in job["summary"]


def test_cancel_running_and_queued_jobs(node_factory, orthanc, bad_plugins,  # type: ignore[no-untyped-def]
                                        tmp_path: Path) -> None:
    routes = [{"name": n, "match": {"Modality": "CT"}, "pipeline": [{"plugin": "slow"}],
               "send_to": ["pacs"]} for n in ("first", "second")]
    cfg = pipeline_config(orthanc, routes)
    cfg["runner"]["processes"] = 1  # the second job waits in the queue
    node = make_node(node_factory, cfg, env=bad_plugins)
    files, _ = ct_study(tmp_path, n=4)
    storescu(node.port, files)
    jobs = wait_jobs(node, lambda js: len(js) == 2 and any(j["state"] == "running"
                                                           for j in js), "one job running")
    running = next(j for j in jobs if j["state"] == "running")
    queued = next(j for j in jobs if j["state"] == "queued")
    assert "queued" not in node.cli("jobs", "cancel", str(queued["id"])).stdout
    assert "cancelling" in node.cli("jobs", "cancel", str(running["id"])).stdout
    final = wait_jobs(node, lambda js: all(j["state"] == "cancelled" for j in js),
                      "both cancelled", timeout=30)
    assert all(j["deliveries"] == [] for j in final)
    time.sleep(1)
    assert orthanc.series() == []
    refused = node.cli("jobs", "cancel", str(running["id"]), check=False)
    assert refused.returncode == 1 and "is cancelled: it cannot become cancelling" in \
        refused.stderr
    # both cancels audited with the operating-system user; the runner finished the second
    moves = [(e["user"], e["detail"]["job_id"], e["detail"]["from"], e["detail"]["to"])
             for e in node.audit("job-state") if e["detail"]["to"].startswith("cancel")]
    me = getpass.getuser()
    assert sorted(moves) == sorted([(me, queued["id"], "queued", "cancelled"),
                                    (me, running["id"], "running", "cancelling")])
    finished = [e for e in node.audit("job-finished") if e["detail"]["job_id"] == running["id"]]
    assert [(e["detail"]["from"], e["detail"]["to"], e["user"]) for e in finished] == [
        ("cancelling", "cancelled", "")]


def test_pydicoms_real_world_ct_sets(node_factory, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """pydicom's bundled CT sets (real headers, pixels shrunk to 16²), per series: a clean
    5-slice series is reformatted into valid MPRs; a series with a 200 mm gap and one of two
    differently oriented slices fail with clear reasons, and nothing is sent for them."""
    import os

    from pydicom.data import get_testdata_file

    root = Path(os.path.dirname(get_testdata_file("CT_small.dcm"))) / "dicomdirtests"
    clean = sorted((root / "98892001" / "CT5N").iterdir())
    gap = sorted((root / "77654033" / "CT2").iterdir())
    mixed = sorted((root / "98892001" / "CT2N").iterdir())
    route = {"name": "mpr", "level": "series", "match": {"Modality": "CT"},
             "pipeline": [{"plugin": "reformat", "params": {"spacing_mm": 1.0}}],
             "send_to": ["pacs"]}
    cfg = pipeline_config(orthanc, [route])
    cfg["assemble"] = {"level": "series"}
    node = make_node(node_factory, cfg)
    storescu(node.port, [*clean, *gap, *mixed])
    jobs = wait_jobs(node, lambda js: len(js) == 3 and all(
        j["state"] in ("succeeded", "failed", "dead") for j in js)
        and any(j["deliveries"] and j["deliveries"][0]["state"] == "sent" for j in js),
        "three finished jobs", timeout=120)
    reasons = sorted(j["reason"] for j in jobs if j["state"] != "succeeded")
    assert any("uneven slice spacing" in r for r in reasons), reasons
    assert any("different orientations" in r for r in reasons), reasons
    assert all("PluginError" in r for r in reasons)  # clear refusals, not crashes: no retry
    assert sum(j["state"] == "succeeded" for j in jobs) == 1
    assert all(j["attempts"] == 1 for j in jobs)
    series = orthanc.series()
    assert sorted(s["MainDicomTags"]["SeriesDescription"] for s in series) == [
        "CORONAL MPR 1mm", "SAGITTAL MPR 1mm"]
    for s in series:
        p = orthanc.instance_file(s["Instances"][0], tmp_path / f"{s['ID']}.dcm")
        assert dciodvfy_errors(p) == []
        ds = pydicom.dcmread(p)
        assert ds.StudyInstanceUID == pydicom.dcmread(clean[0]).StudyInstanceUID


def test_enhanced_derived_series_into_orthanc(node_factory, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """package.derived_series: enhanced — each MPR arrives in Orthanc as one valid object."""
    route = {"name": "mpr", "match": {"Modality": "CT"},
             "pipeline": [{"plugin": "reformat"}], "send_to": ["pacs"]}
    cfg = pipeline_config(orthanc, [route])
    cfg["package"] = {"derived_series": "enhanced"}
    node = make_node(node_factory, cfg)
    files, _ = ct_study(tmp_path, n=12)
    storescu(node.port, files)
    wait_until(lambda: len(orthanc.series()) == 2, timeout=60, what="two MPR series")
    for s in orthanc.series():
        [inst] = s["Instances"]  # one multi-frame object per plane
        p = orthanc.instance_file(inst, tmp_path / f"{s['ID']}.dcm")
        assert dciodvfy_errors(p) == []
        assert pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == \
            "1.2.840.10008.5.1.4.1.1.2.2"


def _spawned(node) -> list[Any]:  # type: ignore[no-untyped-def]
    """The node's job processes (spawned children), running or waiting as warm spares."""
    out = []
    for child in psutil.Process(node.proc.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def test_jobs_run_in_warm_spare_processes(node_factory, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = pipeline_config(orthanc, [CT_THRESHOLD])
    cfg["runner"]["warm_spares"] = 1
    node = make_node(node_factory, cfg)
    [spare] = wait_until(lambda: _spawned(node) or None, timeout=30, what="a warm spare")
    # runner.nice: receiving goes first (set by the spare itself as it starts)
    wait_until(lambda: spare.nice() == 10, timeout=30, what="the spare at nice 10")
    files, _ = ct_study(tmp_path)
    storescu(node.port, files)
    wait_jobs(node, lambda js: js and js[0]["state"] == "succeeded", "job succeeded")
    # the spare that was waiting before the study came ran the job (and, one job each, left)
    wait_until(lambda: not spare.is_running() or spare.status() == "zombie", timeout=30,
               what="the spare to exit after its job")
    # and a new one waits for the next job
    new = wait_until(lambda: [p for p in _spawned(node) if p.pid != spare.pid] or None,
                     timeout=30, what="a new warm spare")
    assert len(new) == 1
    assert orthanc.get("/statistics")["CountInstances"] >= 1


def test_critical_notification_survives_receiver_down_and_node_crash(  # type: ignore[no-untyped-def]
        node_factory, orthanc, bad_plugins, tmp_path: Path) -> None:
    """The webhook is down when the finding is made; the node is killed while it retries;
    after the restart (webhook up) the notification is delivered, once, and audited."""
    hook = Webhook()  # not started yet: connection refused
    route = {"name": "alarm", "match": {"Modality": "CT"}, "pipeline": [{"plugin": "critical"}],
             "send_to": ["pacs"], "notify": {"webhook": hook.url,
                                             "attempts": 20, "timeout_seconds": 2}}
    cfg = pipeline_config(orthanc, [route])
    node = make_node(node_factory, cfg, env=bad_plugins)
    files, _ = ct_study(tmp_path)
    storescu(node.port, files)
    wait_jobs(node, lambda js: js and js[0]["state"] == "succeeded", "job succeeded")
    time.sleep(2)  # a few failed attempts
    assert node.audit("critical-notified") == []
    node.kill()
    hook.start()
    try:
        node2 = make_node(node_factory, cfg, env=bad_plugins)
        wait_until(lambda: hook.received, timeout=60, what="the alert after the restart")
        [alert] = hook.received
        assert alert["message"] == "critical: test: something critical"
        assert alert["route"] == "alarm" and alert["notification_id"] >= 1
        [event] = wait_until(lambda: node2.audit("critical-notified"), timeout=30,
                             what="the audited delivery")
        assert event["outcome"] == 0 and event["detail"]["attempts"] >= 2
        assert event["detail"]["seconds_since_completion"] > 2
        time.sleep(2)
        assert len(hook.received) == 1  # delivered once
        assert node2.cli("audit", "verify").returncode == 0
    finally:
        hook.stop()
