"""The public plugin API, plugin discovery, and route rules (checked at start, matched later)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomnode.config import ConfigError, load_settings
from dicomnode.plugin import (
    Code,
    Context,
    Finding,
    Geometry,
    ImageVolume,
    Inputs,
    LabelMap,
    Mesh,
    Segment,
    SeriesInput,
)
from dicomnode.route import compile_routes, select_series
from dicomnode.run.registry import discover

AXIAL = dict(row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0),
             slice_direction=(0.0, 0.0, 1.0), frame_of_reference_uid="1.2.3")


def geometry(shape: tuple[int, int, int] = (20, 30, 40),
             spacing: tuple[float, float, float] = (2.0, 0.5, 0.75)) -> Geometry:
    return Geometry(origin=(-10.0, -20.0, 30.0), spacing=spacing, shape=shape, **AXIAL)


# --- API values ------------------------------------------------------------------------------

def test_geometry_maps_indices_to_patient_mm() -> None:
    g = geometry()
    assert g.to_patient([0, 0, 0]) == (-10.0, -20.0, 30.0)
    # slice index moves along slice_direction by spacing[0]; row along column_direction by
    # spacing[1]; column along row_direction by spacing[2]
    assert g.to_patient([1, 2, 4]) == pytest.approx((-10 + 4 * 0.75, -20 + 2 * 0.5, 30 + 2.0))


@pytest.mark.parametrize("bad,match", [
    (dict(spacing=(0.0, 1.0, 1.0)), "spacing"),
    (dict(shape=(0, 1, 1)), "shape"),
    (dict(row_direction=(1.0, 1.0, 0.0)), "unit vector"),
    (dict(column_direction=(0.6, 0.8, 0.0)), "orthogonal"),
    (dict(slice_direction=(0.0, 0.9, 0.4358899)), "leave the image plane"),  # 64° off
])
def test_geometry_refuses_nonsense(bad: dict, match: str) -> None:  # type: ignore[type-arg]
    kw = dict(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), shape=(2, 2, 2), **AXIAL)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        Geometry(**kw)  # type: ignore[arg-type]


def _series(uid: str, n: int, gap: float, plane: str = "axial") -> SeriesInput:
    dirs = {"axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
            "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
            "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
            "tilted": ((1.0, 0.0, 0.0), (0.0, 0.9397, 0.3420), (0.0, -0.3420, 0.9397))}[plane]
    g = Geometry(origin=(0.0, 0.0, 0.0), row_direction=dirs[0], column_direction=dirs[1],
                 slice_direction=dirs[2], spacing=(gap, 0.5, 0.5), shape=(n, 8, 8),
                 frame_of_reference_uid="1.2.3")
    return SeriesInput(uid, "CT", "", "1.2.840.10008.5.1.4.1.1.2",
                       tuple(f"{uid}.{k}" for k in range(n)), g, ())


def test_inputs_volume_picks_the_series_to_read() -> None:
    """A head CT study: a one-image lateral scout, sagittal and coronal reformats, a thick and a
    thin axial series. The series closest to axial wins, then the one covering most."""
    scout, sag, cor = _series("scout", 1, 1.0, "sagittal"), _series("sag", 80, 2.5, "sagittal"), \
        _series("cor", 80, 2.5, "coronal")
    thick, thin, tilted = _series("ax5", 32, 5.0), _series("ax1", 40, 1.0), \
        _series("tilt", 40, 4.0, "tilted")
    study = Inputs("1", (scout, sag, cor, tilted, thin, thick), {})
    assert study.primary is scout
    assert study.volume(min_slices=8) is thick  # axial; 160 mm covered against 40
    assert study.volume(min_slices=8, max_gap_mm=3.0) is thin  # lung nodules: thin only
    assert Inputs("1", (scout, sag, cor, tilted), {}).volume(min_slices=8) is tilted  # 20°
    assert Inputs("1", (scout, sag, cor), {}).volume(min_slices=8) is sag  # equal: first
    assert Inputs("1", (sag, cor), {}).volume(normal=(0.0, 1.0, 0.0)) is cor
    assert Inputs("1", (scout,), {}).volume(min_slices=8) is scout  # none fits: primary


def test_outputs_refuse_inconsistent_values() -> None:
    g = geometry((2, 3, 4))
    code = Code("85756007", "SCT", "Tissue")
    with pytest.raises(ValueError, match="shape"):
        ImageVolume(np.zeros((2, 3, 5)), g, "MPR", "test", "1.2")
    with pytest.raises(ValueError, match="shape"):
        LabelMap(np.zeros((1, 3, 4)), g, (Segment(1, "x", code, code),), "1.2")
    with pytest.raises(ValueError, match="distinct"):
        LabelMap(np.zeros((2, 3, 4)), g, (Segment(1, "a", code, code),
                                          Segment(1, "b", code, code)), "1.2")
    with pytest.raises(ValueError, match="background"):
        Segment(0, "x", code, code)
    with pytest.raises(ValueError, match="confidence"):
        Finding(code, confidence=1.5)
    with pytest.raises(ValueError, match="outside"):
        Mesh(np.zeros((3, 3)), np.array([[0, 1, 3]]), "m", "1.2.3")
    with pytest.raises(ValueError, match="scheme"):
        Code("1", "", "x")


# --- discovery -------------------------------------------------------------------------------

def _fake_dist(root: Path, name: str, module: str, source: str, entry: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dicomnode.plugins]\n{entry}\n")


def test_discovery_reports_broken_plugins_without_failing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dist(tmp_path, "broken-import", "broken_import", "raise ImportError('no cuda')",
               "crashes = broken_import:X")
    _fake_dist(tmp_path, "not-a-plugin", "not_a_plugin", "class X: pass", "plain = not_a_plugin:X")
    _fake_dist(tmp_path, "misnamed", "misnamed", """
        from dicomnode.plugin import Code, Plugin, Outputs
        FAMILY = Code("123110", "DCM", "Artificial Intelligence")
        class X(Plugin):
            name, version, algorithm_family = "other", "1", FAMILY
            def run(self, inputs, params, ctx): return Outputs()
        class Future(Plugin):
            name, version, api_version, algorithm_family = "future", "1", 99, FAMILY
            def run(self, inputs, params, ctx): return Outputs()
        class Anonymous(Plugin):  # no family: fine for a plugin that makes images only
            name, version = "anonymous", "1"
            def run(self, inputs, params, ctx): return Outputs()
        class Uncoded(Plugin):
            name, version, algorithm_family = "uncoded", "1", "Artificial Intelligence"
            def run(self, inputs, params, ctx): return Outputs()
        """, "misnamed = misnamed:X\nfuture = misnamed:Future\nanonymous = misnamed:Anonymous\n"
        "uncoded = misnamed:Uncoded")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover()
    assert found["threshold"].ok  # the installed example plugin
    assert "cannot import: ImportError: no cuda" in found["crashes"].error
    assert "not a subclass" in found["plain"].error
    assert "calls itself 'other'" in found["misnamed"].error
    assert found["future"].error == (
        "plugin 'future' was built for plugin API 99, this node has API 1.1: refused (a plugin "
        "built for 99.x loads only on a node with API 99.y)")
    assert found["anonymous"].ok
    assert "algorithm_family' must be a Code" in found["uncoded"].error
    assert not any(found[n].ok for n in ("crashes", "plain", "misnamed", "future"))


def test_plugins_cli_lists_the_example() -> None:
    r = subprocess.run([sys.executable, "-m", "dicomnode", "plugins", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import json

    [row] = [p for p in json.loads(r.stdout) if p["name"] == "threshold"]
    assert row["ok"] and row["version"] == "1.0.0" and row["gpu"] == "preferred"
    assert row["params"]["properties"]["hu_min"]["default"] == 300.0


# --- the worked example plugin on synthetic data --------------------------------------------

def test_example_threshold_plugin_measures_a_known_volume(tmp_path: Path) -> None:
    from dicomnode_example_threshold import Threshold, ThresholdParams

    g = geometry((20, 30, 40), spacing=(2.0, 0.5, 0.75))
    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    hu[5:15, 10:20, 8:28] = 700.0  # 10 × 10 × 20 voxels of "bone"
    series = SeriesInput("1.2.3.4", "CT", "synthetic", "1.2.840.10008.5.1.4.1.1.2",
                         tuple(f"1.2.3.4.{i}" for i in range(20)), g, (), hu)
    ctx = Context("job-1", np, "cpu", tmp_path, logging.getLogger("test"))
    out = Threshold().run(Inputs("1.2.3", (series,), {}), ThresholdParams(hu_min=300), ctx)
    [finding] = out.findings
    [volume] = finding.measurements
    assert volume.unit == "ml"
    assert volume.value == pytest.approx(10 * 10 * 20 * 2.0 * 0.5 * 0.75 / 1000)  # 1.5 mL
    assert finding.location == pytest.approx(g.to_patient([9.5, 14.5, 17.5]))
    [labels] = out.label_maps
    assert int(labels.array.sum()) == 2000 and labels.array.dtype == np.uint8
    empty = Threshold().run(Inputs("1.2.3", (series,), {}), ThresholdParams(hu_min=3000), ctx)
    assert empty.empty and "no voxel" in empty.summary


# --- routes ----------------------------------------------------------------------------------

def _config(tmp_path: Path, routes: list, destinations: dict | None = None) -> Path:  # type: ignore[type-arg]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "destinations": destinations if destinations is not None else {
            "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
        "routes": routes}))
    return f


def test_routes_compile_against_installed_plugins(tmp_path: Path) -> None:
    f = _config(tmp_path, [{"name": "ct-bone", "match": {"Modality": "CT"},
                            "pipeline": [{"plugin": "threshold", "params": {"hu_min": 250}}],
                            "send_to": ["pacs"]}])
    [rule] = compile_routes(load_settings(f), discover())
    assert rule.level == "study" and rule.send_to == ("pacs",)
    assert rule.steps[0].params.hu_min == 250  # type: ignore[attr-defined]


def test_every_route_problem_is_named_by_key(tmp_path: Path) -> None:
    f = _config(tmp_path, [
        {"name": "a", "pipeline": [{"plugin": "threshold", "params": {"hu_mni": 1}},
                                   {"plugin": "threshold", "params": {"hu_min": "high"}},
                                   {"plugin": "no-such-plugin"}]},
    ])
    with pytest.raises(ConfigError) as e:
        compile_routes(load_settings(f), discover())
    msg = str(e.value)
    assert "routes.0.pipeline.0.params.hu_mni: unknown parameter" in msg
    assert "routes.0.pipeline.1.params.hu_min:" in msg
    assert "routes.0.pipeline.2.plugin: 'no-such-plugin' is not installed" in msg


@pytest.mark.parametrize("routes,destinations,match", [
    ([{"name": "a", "pipeline": [{"plugin": "threshold"}], "send_to": ["archive"]}], None,
     "routes.0.send_to.0: unknown destination 'archive'"),
    ([{"name": "a", "match": {"Modalty": "CT"}, "pipeline": [{"plugin": "threshold"}]}], None,
     "did you mean 'Modality'"),
    ([{"name": "a", "match": {"SeriesDescription": {"regex": "(["}},
       "pipeline": [{"plugin": "threshold"}]}], None, "bad regex"),
    ([{"name": "a", "pipeline": []}], None, "routes.0.pipeline"),
    ([{"name": "a", "pipeline": [{"plugin": "x"}]}, {"name": "a", "pipeline": [{"plugin": "x"}]}],
     None, "name 'a' is used twice"),
])
def test_malformed_routes_are_config_errors(tmp_path: Path, routes: list, destinations: dict,  # type: ignore[type-arg]
                                            match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(_config(tmp_path, routes, destinations))


def test_serve_and_check_refuse_a_broken_route_at_start(tmp_path: Path) -> None:
    f = _config(tmp_path, [{"name": "a", "pipeline": [{"plugin": "threshold",
                                                       "params": {"hu_mni": 1}}]}])
    for cmd in (["check"], ["serve"]):
        r = subprocess.run([sys.executable, "-m", "dicomnode", *cmd, "--config", str(f)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "routes.0.pipeline.0.params.hu_mni" in r.stderr
    good = _config(tmp_path, [{"name": "a", "pipeline": [{"plugin": "threshold"}]}])
    ok = subprocess.run([sys.executable, "-m", "dicomnode", "check", "--config", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "1 route(s)" in ok.stdout


def test_matching_semantics(tmp_path: Path) -> None:
    f = _config(tmp_path, [{
        "name": "chest-ct", "level": "study",
        "match": {"Modality": ["CT", "PT"], "SeriesDescription": {"regex": "(?i)chest"},
                  "ImageType": "AXIAL", "CallingAETitle": "CT_SCANNER"},
        "pipeline": [{"plugin": "threshold"}]}])
    [rule] = compile_routes(load_settings(f), discover())
    base = {"Modality": "CT", "SeriesDescription": "Thorax CHEST 1mm",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "CallingAETitle": "CT_SCANNER"}
    assert rule.matches(base)
    assert not rule.matches({**base, "Modality": "MR"})
    assert not rule.matches({**base, "SeriesDescription": "Head"})
    assert not rule.matches({**base, "ImageType": ["DERIVED", "SECONDARY"]})
    assert not rule.matches({**base, "CallingAETitle": "OTHER"})
    assert not rule.matches({k: v for k, v in base.items() if k != "Modality"})
    study = [{**base, "SeriesDescription": "scout"}, base, {**base, "Modality": "SR"}]
    assert select_series(rule, study) == [1]
    assert select_series(rule, study[:1]) == []


def test_gpu_required_plugin_needs_gpu_slots(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dist(tmp_path, "gpu-only", "gpu_only", """
        from dicomnode.plugin import Code, GPU, Needs, Outputs, Plugin
        class G(Plugin):
            name, version = "gpu-only", "1"
            algorithm_family = Code("123110", "DCM", "Artificial Intelligence")
            needs = Needs(gpu=GPU.REQUIRED)
            def run(self, inputs, params, ctx): return Outputs()
        """, "gpu-only = gpu_only:G")
    monkeypatch.syspath_prepend(str(tmp_path))
    routes = [{"name": "a", "pipeline": [{"plugin": "gpu-only"}]}]
    with pytest.raises(ConfigError, match=r"requires a GPU but runner\.gpu_slots is 0"):
        compile_routes(load_settings(_config(tmp_path, routes)), discover())
    f = tmp_path / "with_gpu.yaml"
    f.write_text(yaml.safe_dump({"runner": {"gpu_slots": 1}, "routes": routes}))
    assert len(compile_routes(load_settings(f), discover())) == 1


def test_array_module_falls_back_to_numpy_without_a_usable_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.run.execute import array_module

    assert array_module(None) == (np, "cpu")
    monkeypatch.setitem(sys.modules, "cupy", None)  # "not installed"
    assert array_module(0) == (np, "cpu")


def test_a_plugin_for_another_api_major_is_refused_at_start(tmp_path: Path) -> None:
    """`dicomnode serve` (with routes: plugins are loaded only then) names the plugin, its API
    version and the node's in its log, leaves the plugin out and starts; a plugin built for an
    older 1.x loads beside it and runs a route. A route naming the refused plugin stops the
    start with the same reason."""
    from tests.helpers import NodeProc

    plugins = tmp_path / "site"
    plugins.mkdir()
    _fake_dist(plugins, "next-gen", "next_gen", """
        from dicomnode.plugin import Outputs, Plugin
        class Next(Plugin):
            name, version, api_version = "next-gen", "3", "2.0"
            def run(self, inputs, params, ctx): return Outputs()
        class Old(Plugin):
            name, version, api_version = "old-one", "1", "1.0"
            def run(self, inputs, params, ctx): return Outputs()
        """, "next-gen = next_gen:Next\nold-one = next_gen:Old")
    path = os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])
    route = {"name": "old", "match": {"Modality": "CT"}, "pipeline": [{"plugin": "old-one"}]}
    node = NodeProc(tmp_path / "node", f"sqlite:///{tmp_path / 'index.db'}",
                    overrides={"routes": [route]}, env={"PYTHONPATH": path})
    try:
        node.start()
        assert ("plugin next-gen (next-gen) not loaded: plugin 'next-gen' was built for plugin "
                "API 2.0, this node has API 1.1: refused") in node.log()
        assert "old-one" not in node.log()
        r = subprocess.run([sys.executable, "-m", "dicomnode", "plugins", "--json"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": path})
        listed = {p["name"]: p for p in json.loads(r.stdout)}
        assert listed["old-one"]["ok"] and not listed["next-gen"]["ok"]
    finally:
        node.stop()
    route = {"name": "next", "match": {"Modality": "CT"}, "pipeline": [{"plugin": "next-gen"}]}
    refused = NodeProc(tmp_path / "refused", f"sqlite:///{tmp_path / 'refused.db'}",
                       overrides={"routes": [route]}, env={"PYTHONPATH": path})
    refused.write_config()
    r = subprocess.run([sys.executable, "-m", "dicomnode", "serve", "--config",
                        str(refused.config_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": path})
    assert r.returncode != 0
    assert "was built for plugin API 2.0, this node has API 1.1: refused" in r.stdout + r.stderr
