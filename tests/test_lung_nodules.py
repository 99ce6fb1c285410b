"""lung-nodules on generated chest CTs (``dicomnode simulate chest-ct``; synthetic, ground truth
known): nodules found and measured, categories, refusals, SR/SEG conformance, end to end into
Orthanc. Tuning seeds (< 200); bench/detect.py measures FROC on held-out seeds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomnode_lung_nodules import LungNodules, NoduleParams, confidence, size_category

from dicomnode.package import Provenance
from dicomnode.package.seg import label_map_to_seg
from dicomnode.package.sr import findings_to_sr
from dicomnode.plugin import Context, Inputs, NotApplicable, SeriesInput
from dicomnode.run.inputs import series_input
from dicomnode.simulate.chest import write_chest_ct
from dicomnode.simulate.head import write_head_ct
from tests.helpers import cupy_or_none, storescu
from tests.test_pipeline import make_node, pipeline_config
from tests.validators import dciodvfy_errors, dsrdump_errors

SMALL = {"slices": 90, "slice_mm": 1.5, "size": 256, "pixel_mm": 1.0}


def ctx(tmp_path: Path) -> Context:
    return Context("job", np, "cpu", tmp_path, logging.getLogger("test"))


def run(tmp_path: Path, seed: int, specs: list[tuple[str, float]]) -> tuple[object, object,
                                                                            np.ndarray, Inputs]:
    files, truth = write_chest_ct(tmp_path / f"chest{seed}", seed, specs=specs, **SMALL)
    inputs = Inputs("1", (series_input([pydicom.dcmread(f) for f in files]),), {})
    out = LungNodules().run(inputs, NoduleParams(), ctx(tmp_path))
    mask = np.load(tmp_path / f"chest{seed}" / "truth-mask.npy")
    return out, truth, mask, inputs


@pytest.fixture(scope="module")
def three_nodules(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, np.ndarray,
                                                                       Inputs]:
    """Seed 51 (two solid nodules and a ground-glass one) through the plugin, once: the
    detection takes ~30–80 s on 2 cores; its findings are measured and also reported."""
    return run(tmp_path_factory.mktemp("three-nodules"), 51,  # type: ignore[return-value]
               [("solid", 10.0), ("ground-glass", 16.0), ("solid", 6.5)])


def test_finds_solid_and_ground_glass_nodules_and_measures_them(three_nodules) -> None:  # type: ignore[no-untyped-def]
    out, truth, mask, _ = three_nodules
    [lm] = out.label_maps  # type: ignore[attr-defined]
    labels = np.asarray(lm.array)
    by_truth = {}
    for f in out.findings:  # type: ignore[attr-defined]
        hit = np.unique(mask[labels == f.segment])
        hit = hit[hit > 0]
        if hit.size:
            by_truth[int(hit[0])] = f
    assert set(by_truth) == {1, 2, 3}, f"found {sorted(by_truth)} of 3"
    false = len(out.findings) - len(by_truth)  # type: ignore[attr-defined]
    assert false <= 1
    for k, nodule in enumerate(truth.nodules, start=1):  # type: ignore[attr-defined]
        f = by_truth[k]
        values = {m.name.meaning: m.value for m in f.measurements}
        assert values["Diameter"] == pytest.approx(nodule.diameter_mm, rel=0.3)
        assert values["Long axis"] >= values["Short axis"]
        assert values["Volume"] == pytest.approx(nodule.volume_ml, rel=0.45)
        assert np.linalg.norm(np.subtract(f.location, nodule.centroid_lps)) < 3.0
        assert f.site is not None and f.site.meaning == "Lung structure"
        assert f.laterality is not None
        assert f.laterality.meaning == ("Left" if nodule.centroid_lps[0] > 0 else "Right")
        consistency = dict((n.meaning, v.meaning) for n, v in f.evaluations)
        assert consistency["Nodule consistency"] == (
            "Solid" if nodule.kind == "solid" else "Sub-solid")
        assert consistency["Lung-RADS-style size category"] == \
            f"Category {size_category(nodule.kind == 'solid', values['Diameter'])}"


def test_size_categories() -> None:
    assert [size_category(True, d) for d in (4, 6, 7.9, 8, 14.9, 15, 30)] == \
        ["2", "3", "3", "4A", "4A", "4B", "4B"]
    assert [size_category(False, d) for d in (10, 29.9, 30)] == ["2", "2", "3"]


def test_faint_ground_glass_nodule_found(tmp_path: Path) -> None:
    """An 8 mm ground-glass nodule (−464 HU) answers the dot filter at 16 HU: below the old
    20 HU candidate threshold it was never a candidate (development seed 20, 2 mm slices)."""
    from dicomnode.simulate.chest import chest_ct

    hu, truth, mask = chest_ct(20, specs=[("ground-glass", 8.0), ("ground-glass", 12.0),
                                          ("solid", 6.0)], slices=75, slice_mm=2.0)
    g = truth.plan.geometry(hu.shape, truth.pixel_mm, "1.2.3")
    inputs = Inputs("1", (SeriesInput("1.2.3.4", "CT", "CHEST", "1.2.840.10008.5.1.4.1.1.2",
                                      tuple(f"1.2.3.{k}" for k in range(hu.shape[0])), g, (),
                                      hu),), {})
    out = LungNodules().run(inputs, NoduleParams(), ctx(tmp_path))
    labels = np.asarray(out.label_maps[0].array)
    found = {int(k) for f in out.findings for k in np.unique(mask[labels == f.segment]) if k}
    assert truth.nodules[0].kind == "ground-glass" and truth.nodules[0].diameter_mm == 8.0
    assert found == {1, 2, 3}
    assert len(out.findings) - len(found) <= 1


def test_confidence_is_one_scale_for_every_scan() -> None:
    """Confidence depends on the detection only (a FROC ranks detections of many scans
    together): a weak, elongated blob alone in its scan does not get a high score."""
    assert confidence(15.0, 1.8) < 0.05
    assert confidence(30.0, 1.1) > 0.7
    assert confidence(120.0, 1.05) > 0.95
    assert confidence(30.0, 1.1) > confidence(30.0, 1.5) > confidence(30.0, 1.9)
    assert confidence(20.0, 1.2) < confidence(40.0, 1.2)


def test_no_nodule_few_false_positives(tmp_path: Path) -> None:
    out, _, _, _ = run(tmp_path, 52, [])
    assert len(out.findings) <= 1  # type: ignore[attr-defined]


def test_refuses_what_is_not_a_chest_ct(tmp_path: Path) -> None:
    head = [pydicom.dcmread(f) for f in write_head_ct(tmp_path / "head", 5, kind="none",
                                                      slice_mm=2.0)[0]]
    params, c = NoduleParams(), ctx(tmp_path)
    with pytest.raises(NotApplicable, match="not a chest CT"):
        LungNodules().run(Inputs("1", (series_input(head),), {}), params, c)
    files, _ = write_chest_ct(tmp_path / "five", 3, specs=[], slices=5, slice_mm=1.0,
                              size=128, pixel_mm=2.0)
    five = [pydicom.dcmread(f) for f in files]
    with pytest.raises(NotApplicable, match="5 slice"):
        LungNodules().run(Inputs("1", (series_input(five),), {}), params, c)
    for ds in five:
        ds.Modality = "MR"
    with pytest.raises(NotApplicable, match="needs CT"):
        LungNodules().run(Inputs("1", (series_input(five),), {}), params, c)


def test_report_is_conformant(three_nodules, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SEG and SR of a real detection (the three nodules of seed 51: solid and ground-glass,
    one volumetric group each)."""
    out, _, _, inputs = three_nodules
    assert len(out.findings) >= 3
    src = inputs.primary
    prov = Provenance("job-51", "lung-nodules", "1.0.0",
                      algorithm_family=("123104", "DCM", "Morphological Operations"))
    seg = label_map_to_seg(out.label_maps[0], src.datasets, src.geometry, prov, 9005)  # type: ignore[attr-defined]
    sr = findings_to_sr(out.findings, src.datasets, seg, prov, 9008)  # type: ignore[attr-defined]
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert dsrdump_errors(tmp_path / "sr.dcm") == []
    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert len(back.content.get_volumetric_roi_measurement_groups()) == len(out.findings)


def test_chest_ct_to_orthanc(node_factory, orthanc, generated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    route = {"name": "nodules", "match": {"Modality": "CT",
                                          "SeriesDescription": {"regex": "CHEST"}},
             "pipeline": [{"plugin": "lung-nodules"}], "send_to": ["pacs"]}
    cfg = pipeline_config(orthanc, [route])
    cfg["assemble"] = {"quiet_seconds": 1}
    node = make_node(node_factory, cfg)
    files, truth = generated("chest-54", lambda d: write_chest_ct(d, 54, specs=[("solid", 14.0)],
                                                                  **SMALL))
    storescu(node.port, files, aet="CT_SCANNER")
    paths = orthanc.valid_results({"SR", "SEG"}, tmp_path)
    sr = hd.sr.srread(paths["SR"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    diameters = [g.get_measurements(name=hd.sr.CodedConcept("81827009", "SCT", "Diameter"))[0]
                 .value for g in groups]
    assert any(abs(d - truth.nodules[0].diameter_mm) < 0.3 * truth.nodules[0].diameter_mm
               for d in diameters)


@pytest.mark.parametrize("orientation", ["coronal", "tilted"])
def test_coronal_and_gantry_tilted_series(tmp_path: Path, orientation: str) -> None:
    """The same chest (one seed) as a coronal series and as a gantry-tilted (sheared) one:
    every nodule found where the truth has it, on the right side, sized within 30 %."""
    files, truth = write_chest_ct(tmp_path / orientation, 52, orientation=orientation,
                                  specs=[("solid", 9.0), ("ground-glass", 14.0)], **SMALL)
    inputs = Inputs("1", (series_input([pydicom.dcmread(f) for f in files]),), {})
    assert inputs.primary.geometry.sheared == (orientation == "tilted")
    out = LungNodules().run(inputs, NoduleParams(), ctx(tmp_path))
    assert len(out.findings) <= len(truth.nodules) + 1  # at most one false positive
    for nodule in truth.nodules:
        near = [f for f in out.findings
                if np.linalg.norm(np.subtract(f.location, nodule.centroid_lps)) < 3.0]
        assert near, f"missed {nodule.kind} {nodule.diameter_mm:.0f} mm ({orientation})"
        values = {m.name.meaning: m.value for m in near[0].measurements}
        assert values["Diameter"] == pytest.approx(nodule.diameter_mm, rel=0.3)
        assert near[0].laterality.meaning == ("Left" if nodule.centroid_lps[0] > 0
                                              else "Right")


@pytest.mark.skipif(cupy_or_none() is None,
                    reason="no CUDA GPU with CuPy here (checked on a lent GPU)")
def test_gpu_matches_cpu(tmp_path: Path) -> None:
    """The same run with ctx.xp = CuPy (lung mask, Hessians, peaks on the GPU): the same
    nodules and measurements."""
    cp = cupy_or_none()
    files, _ = write_chest_ct(tmp_path / "c", 51, specs=[("solid", 10.0),
                                                        ("ground-glass", 16.0)], **SMALL)
    inputs = Inputs("1", (series_input([pydicom.dcmread(f) for f in files]),), {})
    cpu = LungNodules().run(inputs, NoduleParams(), ctx(tmp_path))
    gpu = LungNodules().run(inputs, NoduleParams(), Context("job", cp, "cuda:0", tmp_path,
                                                            logging.getLogger("test")))
    assert len(gpu.findings) == len(cpu.findings) >= 2
    for a, b in zip(cpu.findings, gpu.findings, strict=True):
        assert np.linalg.norm(np.subtract(a.location, b.location)) < 0.5
        for ma, mb in zip(a.measurements, b.measurements, strict=True):
            assert mb.value == pytest.approx(ma.value, rel=0.05, abs=0.2)
