"""Plugin outputs → DICOM: every object passes dciodvfy with zero errors (SR also dsrdump -Ee)
and reads back, with highdicom and pydicom, to the values that were written."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.package import Provenance, output_uid
from dicomnode.package.seg import label_map_to_seg
from dicomnode.package.series import image_volume_to_ct
from dicomnode.package.sr import findings_to_sr
from dicomnode.plugin import (
    Code,
    Context,
    Finding,
    ImageVolume,
    Inputs,
    LabelMap,
    Measurement,
    NotApplicable,
    PluginError,
    Segment,
)
from dicomnode.run.inputs import series_input
from dicomnode.simulate import write_ct_series
from tests.validators import dciodvfy_errors, dsrdump_errors

VOLUME = Code("118565006", "SCT", "Volume")
DIAMETER = Code("81827009", "SCT", "Diameter")
NODULE = Code("27925004", "SCT", "Nodule")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("src")
    files = write_ct_series(d, n=8, size=48, slice_mm=2.5)
    datasets = [pydicom.dcmread(f) for f in files]
    random.Random(3).shuffle(datasets)  # arrival order is not slice order
    return series_input(datasets)


@pytest.fixture
def prov() -> Provenance:
    return Provenance("job-42", "threshold", "1.0.0",
                      algorithm_family=("123105", "DCM", "Histogram Analysis"))


def save_all(datasets: list, d: Path) -> list[Path]:  # type: ignore[type-arg]
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = d / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_series_input_sorts_and_describes(source) -> None:  # type: ignore[no-untyped-def]
    g = source.geometry
    assert g.shape == (8, 48, 48) and g.spacing == pytest.approx((2.5, 0.9765625, 0.9765625))
    z = [float(ds.ImagePositionPatient[2]) for ds in source.datasets]
    assert z == sorted(z)  # along the slice normal (+z), whatever the arrival order
    hu = source.pixels()
    assert hu.dtype == np.float32 and hu.shape == g.shape
    assert hu.min() < -900 and hu.max() > 600  # air and "bone", in HU


def test_series_input_refuses_bad_geometry(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "a", n=4, size=16)
    ds = [pydicom.dcmread(f) for f in files]
    ds[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(PluginError, match="orientations"):
        series_input(ds)
    ds = [pydicom.dcmread(f) for f in files]
    ds[2].ImagePositionPatient = [ds[2].ImagePositionPatient[0], ds[2].ImagePositionPatient[1],
                                  -2.7]
    with pytest.raises(PluginError, match="uneven slice spacing"):
        series_input(ds)
    ds = [pydicom.dcmread(f) for f in files]
    del ds[0].PixelSpacing
    with pytest.raises(NotApplicable, match="PixelSpacing"):
        series_input(ds)


def test_series_input_takes_gantry_tilt_and_oblique_planes(tmp_path: Path) -> None:
    """A gantry-tilted CT is a sheared stack (tilted planes stacked along the table): its
    geometry steps along the table, the planes are slice_gap_mm apart and voxel_ml is the
    parallelepiped's; every slice lands where its ImagePositionPatient says."""
    from dicomnode.simulate import slice_plan

    rng = np.random.default_rng(5)
    for orientation in ("tilted", "oblique", "coronal", "sagittal"):
        plan = slice_plan(orientation, rng, 6, 3.0, offset_mm=4.0)
        files = write_ct_series(tmp_path / orientation, n=6, size=24, pixel_mm=0.8,
                                slice_mm=3.0, plan=plan)
        datasets = [pydicom.dcmread(f) for f in files]
        random.Random(1).shuffle(datasets)
        g = series_input(datasets).geometry
        assert g.sheared == (orientation == "tilted"), orientation
        assert g.slice_gap_mm == pytest.approx(3.0, abs=1e-6)
        assert g.voxel_ml == pytest.approx(3.0 * 0.8 * 0.8 / 1000)
        if orientation == "tilted":
            assert g.spacing[0] > 3.05 and g.slice_direction == pytest.approx((0, 0, 1))
        for k, f in enumerate(files):
            assert g.to_patient([k, 0, 0]) == pytest.approx(
                [float(v) for v in pydicom.dcmread(f).ImagePositionPatient], abs=1e-4)
        assert g.normal == pytest.approx(plan.normal)
    # refused: positions off one line, and a "tilt" beyond 45°
    plan = slice_plan("tilted", rng, 6, 3.0)
    files = write_ct_series(tmp_path / "bent", n=6, size=24, slice_mm=3.0, plan=plan)
    ds = [pydicom.dcmread(f) for f in files]
    ds[3].ImagePositionPatient = [float(ds[3].ImagePositionPatient[0]) + 2.0,
                                  *ds[3].ImagePositionPatient[1:]]
    with pytest.raises(PluginError, match="one line"):
        series_input(ds)
    ds = [pydicom.dcmread(f) for f in write_ct_series(tmp_path / "flat", n=4, size=16)]
    for k, d in enumerate(ds):  # 1 mm apart along z, 2 mm sideways: 63° off the normal
        d.ImagePositionPatient = [2.0 * k, 0.0, float(k)]
    with pytest.raises(PluginError, match="not a gantry tilt"):
        series_input(ds)


def test_derived_series_of_a_gantry_tilted_stack(prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dicomnode.simulate import slice_plan

    plan = slice_plan("tilted", np.random.default_rng(2), 8, 2.5)
    files = write_ct_series(tmp_path / "src", n=8, size=32, slice_mm=2.5, plan=plan)
    src = series_input([pydicom.dcmread(f) for f in files])
    vol = ImageVolume(np.clip(src.pixels(), -200, 2000), src.geometry, "CLIP", "clipped",
                      src.series_uid)
    paths = save_all(image_volume_to_ct(vol, src.datasets, prov, series_number=102),
                     tmp_path / "out")
    for p in paths:
        assert dciodvfy_errors(p) == [], p
    first = pydicom.dcmread(paths[0])
    assert float(first.SliceThickness) == pytest.approx(2.5)  # between the planes
    back = series_input([pydicom.dcmread(p) for p in paths]).geometry
    assert back.sheared and back.affine == pytest.approx(src.geometry.affine, abs=1e-4)


def test_derived_ct_series_is_valid_and_round_trips(source, prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hu = np.clip(source.pixels(), -200, 2000)
    vol = ImageVolume(hu, source.geometry, "SOFT TISSUE CLIP", "HU clipped to -200..2000",
                      source.series_uid, window=(40, 400))
    out = image_volume_to_ct(vol, source.datasets, prov, series_number=101)
    paths = save_all(out, tmp_path)
    for p in paths:
        assert dciodvfy_errors(p) == [], p
    back = series_input([pydicom.dcmread(p) for p in paths])
    assert back.geometry.shape == source.geometry.shape
    assert back.geometry.origin == pytest.approx(source.geometry.origin)
    assert back.geometry.spacing == pytest.approx(source.geometry.spacing)
    assert np.abs(back.pixels() - hu).max() <= 0.5  # HU survive the int16 + rescale
    first = pydicom.dcmread(paths[0])
    assert first.StudyInstanceUID == source.datasets[0].StudyInstanceUID
    assert first.PatientID == source.datasets[0].PatientID
    assert first.SeriesInstanceUID != source.series_uid
    assert first.ImageType[:2] == ["DERIVED", "SECONDARY"]
    refs = {r.ReferencedSOPInstanceUID for r in first.SourceImageSequence}
    assert refs == set(source.sop_instance_uids)
    [related] = first.RelatedSeriesSequence
    assert related.SeriesInstanceUID == source.series_uid
    assert related.StudyInstanceUID == first.StudyInstanceUID
    assert related.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    eq = first.ContributingEquipmentSequence[0]
    assert "threshold 1.0.0" in eq.SoftwareVersions
    # a re-run of the same job makes the same UIDs; another job other UIDs
    again = image_volume_to_ct(vol, source.datasets, prov, series_number=101)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in out]
    other = image_volume_to_ct(vol, source.datasets, Provenance("job-43", "threshold", "1"), 101)
    assert other[0].SOPInstanceUID != out[0].SOPInstanceUID
    assert output_uid("job-42", "series", 0) == out[0].SeriesInstanceUID
    # package.source_references: series — the source series only, still conformant
    lean = image_volume_to_ct(vol, source.datasets, prov, 101, source_references="series")
    assert [d.SOPInstanceUID for d in lean] == [d.SOPInstanceUID for d in out]
    lean_paths = save_all(lean, tmp_path / "lean")
    assert dciodvfy_errors(lean_paths[0]) == []
    back_lean = pydicom.dcmread(lean_paths[0])
    assert "SourceImageSequence" not in back_lean
    assert back_lean.RelatedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    assert lean_paths[0].stat().st_size < paths[0].stat().st_size
    with pytest.raises(ValueError, match="source_references"):
        image_volume_to_ct(vol, source.datasets, prov, 101, source_references="none")


def _plugin_outputs(source, tmp_path):  # type: ignore[no-untyped-def]
    from dicomnode_example_threshold import Threshold, ThresholdParams

    ctx = Context("job-42", np, "cpu", tmp_path, logging.getLogger("test"))
    return Threshold().run(Inputs("1.2", (source,), {}), ThresholdParams(hu_min=300), ctx)


def test_seg_and_sr_from_a_plugin_are_valid_and_read_back(source, prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = _plugin_outputs(source, tmp_path)
    [lm] = out.label_maps
    seg = label_map_to_seg(lm, source.datasets, source.geometry, prov, series_number=201)
    seg.save_as(tmp_path / "seg.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    seg_back = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg_back.number_of_segments == 1
    mask = seg_back.get_volume().array if hasattr(seg_back, "get_volume") else None
    assert mask is not None and int(mask.sum()) == int(np.asarray(lm.array).sum())
    algo = seg_back.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("threshold", "1.0.0")

    sr = findings_to_sr(out.findings, source.datasets, seg, prov, series_number=202)
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert dsrdump_errors(tmp_path / "sr.dcm") == []
    back = hd.sr.srread(tmp_path / "sr.dcm")
    [group] = back.content.get_volumetric_roi_measurement_groups()
    [m] = group.get_measurements(name=pydicom.sr.coding.Code(*VOLUME.__dict__.values()))
    assert m.value == pytest.approx(out.findings[0].measurements[0].value, rel=1e-6)
    assert m.unit.value == "ml"
    modifiers = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
                 for item in m[0].ContentSequence if item.ValueType == "TEXT"}
    assert modifiers == {"Algorithm Name": "threshold", "Algorithm Version": "1.0.0"}
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.referenced_segment.referenced_segment_numbers == [1]
    assert group.finding_type.meaning == "Tissue"
    evidence = {r.ReferencedSOPInstanceUID for s in back.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and set(source.sop_instance_uids) <= evidence


def test_sr_with_point_and_plain_findings(source, prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    g = source.geometry
    findings = [
        Finding(NODULE, (Measurement(DIAMETER, 6.5, "mm"),), location=g.to_patient([3, 20, 20]),
                confidence=0.9),
        Finding(NODULE, (Measurement(VOLUME, 0.14, "ml"),)),
    ]
    sr = findings_to_sr(findings, source.datasets, None, prov, series_number=203)
    sr.save_as(tmp_path / "sr2.dcm")
    assert dciodvfy_errors(tmp_path / "sr2.dcm") == []
    assert dsrdump_errors(tmp_path / "sr2.dcm") == []
    back = hd.sr.srread(tmp_path / "sr2.dcm")
    [planar] = back.content.get_planar_roi_measurement_groups()
    diameter, confidence = planar.get_measurements()  # the confidence is a measurement too
    assert diameter.value == pytest.approx(6.5) and diameter.unit.value == "mm"
    assert confidence.name.meaning == "Detection confidence"
    assert confidence.value == pytest.approx(0.9) and confidence.unit.value == "1"
    assert np.allclose(planar.roi.value, [g.to_patient([3, 20, 20])])


def test_package_refuses_what_it_cannot_do_right(source, prov) -> None:  # type: ignore[no-untyped-def]
    tissue = Code("85756007", "SCT", "Tissue")
    g = source.geometry
    from dataclasses import replace

    shifted = replace(g, origin=(g.origin[0] + 5, g.origin[1], g.origin[2]))
    lm = LabelMap(np.zeros(g.shape, np.uint8), shifted, (Segment(1, "x", tissue, tissue),),
                  source.series_uid)
    with pytest.raises(PluginError, match="not on the source series grid"):
        label_map_to_seg(lm, source.datasets, g, prov, 1)
    bad = np.zeros(g.shape, np.uint8)
    bad[0, 0, 0] = 7
    ok = np.zeros(g.shape, np.uint8)
    ok[0, 0, 0] = 1
    with pytest.raises(PluginError, match="declares no algorithm_family"):
        label_map_to_seg(LabelMap(ok, g, (Segment(1, "x", tissue, tissue),), "1"),
                         source.datasets, g, replace(prov, algorithm_family=None), 1)
    with pytest.raises(PluginError, match=r"values \[7\]"):
        label_map_to_seg(LabelMap(bad, g, (Segment(1, "x", tissue, tissue),), "1"),
                         source.datasets, g, prov, 1)
    with pytest.raises(PluginError, match="no label map"):
        findings_to_sr([Finding(tissue, segment=1)], source.datasets, None, prov, 1)
    from dicomnode.package.seg import _unknown_labels

    gaps = np.array([[0, 1, 3], [3, 0, 0]], np.uint16)
    assert _unknown_labels(gaps, [1, 3]) == set()
    assert _unknown_labels(gaps, [1, 2]) == {3}
    assert _unknown_labels(gaps, [3, 5]) == {1}
    assert _unknown_labels(np.zeros((2, 2), np.uint16), [1]) == set()


def test_key_images_become_a_valid_kos(source, prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dicomnode.package.kos import key_images_to_kos
    from dicomnode.plugin import KeyImages

    keys = KeyImages(source.sop_instance_uids[2:4])
    kos = key_images_to_kos(keys, source.datasets, prov, series_number=207)
    kos.save_as(tmp_path / "kos.dcm")
    assert dciodvfy_errors(tmp_path / "kos.dcm") == []
    assert dsrdump_errors(tmp_path / "kos.dcm") == []
    back = pydicom.dcmread(tmp_path / "kos.dcm")
    assert back.Modality == "KO"
    assert back.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    refs = {r.ReferencedSOPInstanceUID for s in back.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert refs == set(source.sop_instance_uids[2:4])
    with pytest.raises(PluginError, match="must be input instances"):
        key_images_to_kos(KeyImages(("1.2.3.999",)), source.datasets, prov, 207)


def test_fast_series_encoding_is_byte_identical_to_pydicom(source, prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dicomnode.package.series import part10_bytes

    vol = ImageVolume(source.pixels(), source.geometry, "COPY", "identity", source.series_uid)
    cache: dict = {}  # type: ignore[type-arg]
    for k, ds in enumerate(image_volume_to_ct(vol, source.datasets, prov, 1)):
        ds.save_as(tmp_path / f"{k}.dcm", enforce_file_format=True)
        assert part10_bytes(ds, cache) == (tmp_path / f"{k}.dcm").read_bytes()
    assert len(cache) == 1  # the shared SourceImageSequence was encoded once


@pytest.mark.parametrize(("original", "refs"), [(False, "images"), (True, "images"),
                                               (False, "series")])
def test_spliced_series_files_are_byte_identical(source, prov, original: bool, refs: str) -> None:  # type: ignore[no-untyped-def]
    """ct_series_part10 re-encodes only what differs between slices; every file must equal
    the one pydicom writes from the full dataset (odd/even UID and number lengths included)."""
    from pydicom.filebase import DicomBytesIO

    from dicomnode.package.series import ct_series_part10

    pixels = source.pixels()
    pixels[0, 0, 0] = 40000.0  # out of int16 range: rescale slope/intercept in play
    vol = ImageVolume(pixels, source.geometry, "COPY", "identity", source.series_uid,
                      original=original, attributes={"ConvolutionKernel": "RAMLAK"}
                      if original else {})
    from dataclasses import replace
    from datetime import UTC, datetime

    prov = replace(prov, created=datetime(2026, 11, 21, 12, 0, 1, 5, tzinfo=UTC))
    full = image_volume_to_ct(vol, source.datasets, prov, 12, 3, refs)
    spliced = list(ct_series_part10(vol, source.datasets, prov, 12, 3, refs))
    assert len(spliced) == len(full) > 2
    for ds, data in zip(full, spliced, strict=True):
        fp = DicomBytesIO()
        ds.save_as(fp, enforce_file_format=True)
        assert data == fp.getvalue(), ds.InstanceNumber




def test_enhanced_multiframe_derived_series(source, prov, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """package.derived_series: enhanced — one Legacy Converted Enhanced CT per series, built
    directly from the volume: valid, frames in slice order at the classic slices' positions
    and values, every source image referenced and nothing else (no never-stored slices)."""
    from dataclasses import replace
    from datetime import UTC, datetime

    from pydicom.filebase import DicomBytesIO

    from dicomnode.package.series import enhanced_ct_dataset, enhanced_ct_part10

    prov = replace(prov, created=datetime(2026, 11, 21, 12, 0, 1, 5, tzinfo=UTC))
    hu = np.clip(source.pixels(), -200, 2000)
    hu[0, 0, 0] = -1500.5  # a value that rounds: stored = rint(HU)
    for window, original in ((None, False), ((40.0, 400.0), True)):
        vol = ImageVolume(hu, source.geometry, "ENH", "clip", source.series_uid,
                          original=original, window=window,
                          attributes={"ConvolutionKernel": "RAMLAK"} if original else {})
        slices = image_volume_to_ct(vol, source.datasets, prov, 101)
        data = enhanced_ct_part10(vol, source.datasets, prov, 101)
        fp = DicomBytesIO()
        enhanced_ct_dataset(vol, source.datasets, prov, 101).save_as(fp, enforce_file_format=True)
        assert data == fp.getvalue()  # the fast writer is pydicom's encoding, byte for byte
        (tmp_path / "mf.dcm").write_bytes(data)
        assert dciodvfy_errors(tmp_path / "mf.dcm") == []
        back = pydicom.dcmread(tmp_path / "mf.dcm")
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT
        assert int(back.NumberOfFrames) == len(slices)
        assert list(back.ImageType[:2]) == (["ORIGINAL", "PRIMARY"] if original
                                            else ["DERIVED", "PRIMARY"])
        assert back.StudyInstanceUID == source.datasets[0].StudyInstanceUID
        shared = back.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == \
            [float(v) for v in slices[0].PixelSpacing]
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] \
            == [float(v) for v in slices[0].ImageOrientationPatient]
        rescale = shared.PixelValueTransformationSequence[0]
        frames = back.pixel_array.astype(np.float64) * float(rescale.RescaleSlope) \
            + float(rescale.RescaleIntercept)
        for k, (group, classic) in enumerate(zip(back.PerFrameFunctionalGroupsSequence, slices,
                                                 strict=True)):
            assert group.FrameContentSequence[0].InStackPositionNumber == k + 1
            assert [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient] == \
                [float(v) for v in classic.ImagePositionPatient]
            assert np.array_equal(frames[k], classic.pixel_array * float(classic.RescaleSlope)
                                  + float(classic.RescaleIntercept))
            assert np.abs(frames[k] - hu[k]).max() <= 0.5
        if window is None:
            assert "FrameVOILUTSequence" not in shared
        else:
            assert [float(v) for v in (shared.FrameVOILUTSequence[0].WindowCenter,
                                       shared.FrameVOILUTSequence[0].WindowWidth)] == [40, 400]
        sources = {r.ReferencedSOPInstanceUID
                   for r in shared.DerivationImageSequence[0].SourceImageSequence}
        assert sources == set(source.sop_instance_uids)
        common = {r.ReferencedSOPInstanceUID for s in back.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
        assert common == set(source.sop_instance_uids)
        evidence = {r.ReferencedSOPInstanceUID for e in back.SourceImageEvidenceSequence
                    for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        assert evidence == set(source.sop_instance_uids)
        if not original:
            assert shared.DerivationImageSequence[0].DerivationDescription == "clip"
        else:
            assert shared.UnassignedSharedConvertedAttributesSequence[0].ConvolutionKernel \
                == "RAMLAK"
        # no reference anywhere to an instance that is not a source image
        referenced = {line.split("UI: ")[1].strip() for line in str(back).splitlines()
                      if "Referenced SOP Instance UID" in line}
        assert referenced == set(source.sop_instance_uids)
