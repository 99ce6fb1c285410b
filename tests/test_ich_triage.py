"""ich-triage on generated head CTs (``dicomnode simulate head-ct``; synthetic, ground truth known),
its report objects (SR/SEG/KOS conformance, values read back), refusals, and end to end into
Orthanc with a critical-finding webhook. The seeds here are tuning seeds; bench/detect.py
measures on held-out seeds never used while building the detector."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomnode_ich_triage import ICHParams, ICHTriage

from dicomnode.package import Provenance
from dicomnode.package.kos import key_images_to_kos
from dicomnode.package.seg import label_map_to_seg
from dicomnode.package.sr import findings_to_sr
from dicomnode.plugin import Context, Inputs, NotApplicable
from dicomnode.run.inputs import series_input
from dicomnode.simulate import write_ct_series
from dicomnode.simulate.head import write_head_ct
from tests.helpers import Webhook, cupy_or_none, storescu, wait_until
from tests.test_pipeline import make_node, pipeline_config
from tests.validators import dciodvfy_errors, dsrdump_errors


def ctx(tmp_path: Path) -> Context:
    return Context("job", np, "cpu", tmp_path, logging.getLogger("test"))


def study(tmp_path: Path, seed: int, **kw: Any) -> tuple[Inputs, Any, list[Path]]:
    files, truth = write_head_ct(tmp_path / f"head{seed}", seed, **kw)
    return Inputs("1", (series_input([pydicom.dcmread(f) for f in files]),), {}), truth, files


def lesions(out: Any) -> list[Any]:
    return [f for f in out.findings if f.measurements]


@pytest.mark.parametrize("seed,kind,ml", [(11, "iph", 3.0), (12, "sdh", 8.0), (13, "edh", 15.0),
                                          (14, "iph", 1.0), (15, "sdh", 30.0)])
def test_finds_the_hemorrhage_and_measures_it(tmp_path: Path, seed: int, kind: str,
                                              ml: float) -> None:
    inputs, truth, _ = study(tmp_path, seed, kind=kind, volume_ml=ml)
    out = ICHTriage().run(inputs, ICHParams(), ctx(tmp_path))
    [les] = truth.lesions
    found = lesions(out)
    assert found, f"missed {kind} {les.volume_ml:.1f} mL"
    best = found[0]  # largest first
    volume = best.measurements[0].value
    assert volume == pytest.approx(les.volume_ml, rel=0.3)
    assert np.linalg.norm(np.subtract(best.location, les.centroid_lps)) < 10.0
    assert best.measurements[1].value > 5.0  # maximum diameter, mm
    assert best.site is not None and best.site.meaning == "Cranial cavity"
    if abs(les.centroid_lps[0]) > 12:  # clearly on one side (LPS x: patient's left)
        assert best.laterality is not None
        assert best.laterality.meaning == ("Left" if les.centroid_lps[0] > 0 else "Right")
    assert 0 < best.confidence <= 1
    assert out.critical.startswith("Intracranial hemorrhage suspected")
    assert out.findings[0].evaluations[0][1].meaning == "Present"
    [lm] = out.label_maps
    assert int(lm.array.max()) == len(found)
    overlap = (np.asarray(lm.array) > 0) & (np.load(tmp_path / f"head{seed}" /
                                                    "truth-mask.npy") > 0)
    assert overlap.sum() > 0.5 * (np.asarray(lm.array) > 0).sum()  # mostly on the truth


@pytest.mark.parametrize("orientation,slice_mm,kind", [
    ("tilted", 2.5, "sdh"), ("tilted", 5.0, "iph"), ("oblique", 4.0, "iph"),
    ("coronal", 2.5, "edh"), ("sagittal", 2.0, "sdh")])
def test_any_plane_and_gantry_tilt(tmp_path: Path, orientation: str, slice_mm: float,
                                   kind: str) -> None:
    """The same head and bleed (one seed) acquired tilted (a sheared stack), oblique, coronal
    and sagittal: found, measured, placed and sided as in the axial study. Coronal and
    sagittal series are resampled to axial inside the plugin and the SEG comes back on the
    series' own slices."""
    slices = round((160 if orientation in ("tilted", "oblique") else 200) / slice_mm)
    inputs, truth, _ = study(tmp_path, 16, kind=kind, volume_ml=6.0, orientation=orientation,
                             slice_mm=slice_mm, slices=slices)
    g = inputs.primary.geometry
    assert g.sheared == (orientation == "tilted")
    out = ICHTriage().run(inputs, ICHParams(), ctx(tmp_path))
    [les] = truth.lesions
    found = lesions(out)
    assert found, f"missed {kind} {les.volume_ml:.1f} mL, {orientation}"
    best = found[0]
    assert best.measurements[0].value == pytest.approx(les.volume_ml, rel=0.3)
    assert np.linalg.norm(np.subtract(best.location, les.centroid_lps)) < 10.0
    if kind != "iph":  # this seed's extra-axial bleeds lie 40 mm right of the midline
        assert les.centroid_lps[0] < -30
        assert best.laterality is not None and best.laterality.meaning == "Right"
    [lm] = out.label_maps
    assert lm.geometry == g  # on the series' own voxels
    overlap = (np.asarray(lm.array) > 0) & (np.load(
        tmp_path / "head16" / "truth-mask.npy") > 0)
    assert overlap.sum() > 0.5 * (np.asarray(lm.array) == 1).sum()
    if orientation in ("tilted", "sagittal"):  # SEG/SR over a sheared stack, a sagittal one
        src = inputs.primary
        prov = Provenance("job-16", "ich-triage", "1.0.0",
                          algorithm_family=("123104", "DCM", "Morphological Operations"))
        seg = label_map_to_seg(out.label_maps[0], src.datasets, src.geometry, prov, 9005)
        sr = findings_to_sr(out.findings, src.datasets, seg, prov, 9008)
        for name, obj in (("seg", seg), ("sr", sr)):
            obj.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
            assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name
        assert dsrdump_errors(tmp_path / "sr.dcm") == []


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_no_hemorrhage_no_alarm(tmp_path: Path, seed: int) -> None:
    inputs, truth, _ = study(tmp_path, seed, kind="none")
    out = ICHTriage().run(inputs, ICHParams(), ctx(tmp_path))
    assert not truth.lesions and lesions(out) == [] and not out.label_maps
    assert out.critical == "" and out.findings[0].evaluations[0][1].meaning == "Absent"


@pytest.mark.parametrize("orientation,slice_mm,seed", [
    ("coronal", 3.0, 15), ("sagittal", 3.0, 21), ("coronal", 2.5, 17)])
def test_no_false_alarm_on_reformats(tmp_path: Path, orientation: str, slice_mm: float,
                                     seed: int) -> None:
    """Coronal/sagittal series average the skull into the brain across their thick voxels,
    and the axial grid they are resampled to can pass just above a bone surface: these
    seeds each raised a false bleed (0.3–0.8 mL skull shells) before seeds kept away from
    bone along the series' normal and the grid's z."""
    inputs, truth, _ = study(tmp_path, seed, kind="none", orientation=orientation,
                             slice_mm=slice_mm, slices=round(200 / slice_mm))
    out = ICHTriage().run(inputs, ICHParams(), ctx(tmp_path))
    assert not truth.lesions
    assert lesions(out) == [], [(f.measurements[0].value, f.location) for f in lesions(out)]


def test_reads_the_axial_series_of_a_study_with_scout_and_reformats(tmp_path: Path) -> None:
    """A study-level route hands the plugin every CT series of the study: a one-image scout, a
    coronal reformat and the axial series (same head, same bleed). It reads the axial one, and
    its findings, SEG and KOS refer to it."""
    from dicomnode.plugin import SeriesInput
    from dicomnode.simulate.head import head_ct

    def series(uid: str, **kw: Any) -> tuple[SeriesInput, Any]:
        hu, truth, _ = head_ct(16, kind="sdh", volume_ml=6.0, **kw)
        g = truth.plan.geometry(hu.shape, truth.pixel_mm, "1.2.3")
        return SeriesInput(uid, "CT", "", "1.2.840.10008.5.1.4.1.1.2",
                           tuple(f"{uid}.{k}" for k in range(hu.shape[0])), g, (), hu), truth

    scout, _ = series("1.9.1", orientation="sagittal", slices=1, slice_mm=2.0)
    coronal, _ = series("1.9.2", orientation="coronal", slices=80, slice_mm=2.5)
    axial, truth = series("1.9.3")
    out = ICHTriage().run(Inputs("1", (scout, coronal, axial), {}), ICHParams(), ctx(tmp_path))
    [les] = truth.lesions
    found = lesions(out)
    assert found and found[0].measurements[0].value == pytest.approx(les.volume_ml, rel=0.3)
    assert {f.source_series_uid for f in out.findings} == {"1.9.3"}
    assert out.label_maps[0].source_series_uid == "1.9.3"
    assert out.label_maps[0].geometry == axial.geometry
    assert all(uid.startswith("1.9.3.") for uid in out.key_images[0].sop_instance_uids)


def test_refuses_what_is_not_a_head_ct(tmp_path: Path) -> None:
    run = lambda files: ICHTriage().run(  # noqa: E731
        Inputs("1", (series_input([pydicom.dcmread(f) for f in files]),), {}), ICHParams(),
        ctx(tmp_path))
    body = write_ct_series(tmp_path / "chest", n=40, size=128, slice_mm=5.0)  # no skull
    with pytest.raises(NotApplicable, match="not a head CT"):
        run(body)
    five = write_head_ct(tmp_path / "five", 3, kind="iph", slices=5)[0]
    with pytest.raises(NotApplicable, match="5 slice"):
        run(five)
    mr = [pydicom.dcmread(f) for f in write_head_ct(tmp_path / "mr", 4, kind="none")[0]]
    for ds in mr:
        ds.Modality = "MR"
    with pytest.raises(NotApplicable, match="needs CT"):
        ICHTriage().run(Inputs("1", (series_input(mr),), {}), ICHParams(), ctx(tmp_path))
    thick = write_head_ct(tmp_path / "sag", 4, kind="none", orientation="sagittal",
                          slice_mm=4.0)[0]
    with pytest.raises(NotApplicable, match=r"90° off axial with slices 4\.0 mm apart"):
        run(thick)
    nospacing = [pydicom.dcmread(f) for f in five]
    for ds in nospacing:
        del ds.PixelSpacing
    with pytest.raises(NotApplicable, match="PixelSpacing missing"):
        series_input(nospacing)


def test_report_objects_are_conformant_and_read_back(tmp_path: Path) -> None:
    inputs, truth, _ = study(tmp_path, 31, kind="edh", volume_ml=10.0)
    out = ICHTriage().run(inputs, ICHParams(), ctx(tmp_path))
    src = inputs.primary
    prov = Provenance("job-31", "ich-triage", "1.0.0",
                      algorithm_family=("123104", "DCM", "Morphological Operations"))
    seg = label_map_to_seg(out.label_maps[0], src.datasets, src.geometry, prov, 9005)
    sr = findings_to_sr(out.findings, src.datasets, seg, prov, 9008)
    kos = key_images_to_kos(out.key_images[0], src.datasets, prov, 9007)
    for name, obj in (("seg", seg), ("sr", sr), ("kos", kos)):
        obj.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name
    assert dsrdump_errors(tmp_path / "sr.dcm") == []
    back = hd.sr.srread(tmp_path / "sr.dcm")
    groups = back.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(lesions(out))  # one volumetric group per lesion
    volume = groups[0].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
    assert volume[0].value == pytest.approx(truth.lesions[0].volume_ml, rel=0.3)
    text = str(back)
    assert "Present" in text and "Detection confidence" in text and "ich-triage" in text
    assert "Cranial cavity" in text  # finding site


def test_head_ct_to_orthanc_with_critical_alert(node_factory, orthanc, generated,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    hook = Webhook().start()
    route = {"name": "ich", "match": {"Modality": "CT",
                                      "SeriesDescription": {"regex": "HEAD"}},
             "pipeline": [{"plugin": "ich-triage"}], "send_to": ["pacs"],
             "notify": {"webhook": hook.url}}
    cfg = pipeline_config(orthanc, [route])
    cfg["assemble"] = {"quiet_seconds": 1}
    node = make_node(node_factory, cfg)
    try:
        files, truth = generated("head-41-iph", lambda d: write_head_ct(d, 41, kind="iph",
                                                                        volume_ml=6.0))
        files = sorted(files)
        storescu(node.port, files, aet="CT_SCANNER")
        paths = orthanc.valid_results({"SR", "SEG", "KO"}, tmp_path, timeout=90)
        sr = hd.sr.srread(paths["SR"])
        [group] = sr.content.get_volumetric_roi_measurement_groups()
        volume = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        assert volume[0].value == pytest.approx(truth.lesions[0].volume_ml, rel=0.3)
        wait_until(lambda: hook.received, timeout=30, what="the webhook")
        [alert] = hook.received
        assert alert["event"] == "critical-finding" and "hemorrhage" in alert["message"]
        assert alert["study_uid"] == pydicom.dcmread(files[0]).StudyInstanceUID
        assert alert["patient_id"] == "SYNTH-HEAD-41"
        events = wait_until(lambda: node.audit("critical-notified"), timeout=30,
                            what="audited notification")
        detail = events[0]["detail"]
        assert events[0]["outcome"] == 0 and detail["channel"].startswith("webhook")
        # from study completion to the alert: the quiet period has passed, the job ran
        assert 0 < detail["seconds_since_completion"] < 60
        assert node.cli("audit", "verify").returncode == 0
        # a study without hemorrhage: an SR saying so, and no alert
        clean, _ = generated("head-42-none", lambda d: write_head_ct(d, 42, kind="none"))
        storescu(node.port, sorted(clean), aet="CT_SCANNER")
        wait_until(lambda: len(orthanc.series()) == 4, timeout=90, what="the clean SR")
        assert len(hook.received) == 1
        # a body CT routed here by mistake: not applicable, with the reason; nothing is sent
        storescu(node.port, generated("body-40", lambda d: write_ct_series(
            d, n=40, size=96, slice_mm=5.0, series_description="HEAD? (mislabelled body)")))
        jobs = wait_until(lambda: [j for j in node.jobs() if j["state"] == "not-applicable"],
                          timeout=60, what="the not-applicable job")
        assert "not a head CT" in jobs[0]["reason"]
        time.sleep(1.0)
        assert len(orthanc.series()) == 4 and len(hook.received) == 1
    finally:
        hook.stop()


@pytest.mark.skipif(cupy_or_none() is None,
                    reason="no CUDA GPU with CuPy here (checked on a lent GPU)")
@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_gpu_matches_cpu(tmp_path: Path, orientation: str) -> None:
    """The same run with ctx.xp = CuPy: the same lesions, volumes and label map."""
    cp = cupy_or_none()
    inputs, _, _ = study(tmp_path, 16, kind="sdh", volume_ml=6.0, orientation=orientation,
                         slice_mm=2.0, slices=100)
    cpu = ICHTriage().run(inputs, ICHParams(), ctx(tmp_path))
    gpu = ICHTriage().run(inputs, ICHParams(), Context("job", cp, "cuda:0", tmp_path,
                                                       logging.getLogger("test")))
    assert len(lesions(gpu)) == len(lesions(cpu)) >= 1
    for a, b in zip(lesions(cpu), lesions(gpu), strict=True):
        assert b.measurements[0].value == pytest.approx(a.measurements[0].value, rel=0.02)
    agree = (np.asarray(cpu.label_maps[0].array) == np.asarray(gpu.label_maps[0].array)).mean()
    assert agree > 0.9999
