"""Findings → TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom).

Comprehensive 3D SR because points and volumes are given in patient coordinates (SCOORD3D),
which Enhanced SR refuses. A finding with a segment becomes a volumetric ROI group referencing
that SEG segment (``ReferencedSegment`` built directly: highdicom's ``from_segmentation`` breaks
on a single-segment SEG); one with only a location becomes a point ROI group; one with neither a
plain measurement group. Every measurement names its algorithm (TID 4019) and the observer is
the device (the plugin). Every referenced image and the SEG are listed as evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from dicomnode.package.provenance import MANUFACTURER, Provenance, output_uid
from dicomnode.package.seg import pd_code
from dicomnode.plugin import Finding, PluginError

PROCEDURES = {
    "CT": PydicomCode("77477000", "SCT", "Computed Tomography"),
    "MR": PydicomCode("113091000", "SCT", "Magnetic Resonance Imaging"),
}
IMAGING_PROCEDURE = PydicomCode("363679005", "SCT", "Imaging procedure")


#: Private code (coding scheme 99DCMNODE): PS3.16 has no concept for a detector's confidence.
CONFIDENCE = PydicomCode("DN-CONF", "99DCMNODE", "Detection confidence")


def _measurements(f: Finding, prov: Provenance) -> list[hd.sr.Measurement]:
    algorithm = hd.sr.AlgorithmIdentification(name=prov.plugin_name,
                                              version=prov.plugin_version)
    out = [hd.sr.Measurement(name=pd_code(m.name), value=float(m.value),
                             unit=PydicomCode(m.unit, "UCUM", m.unit), algorithm_id=algorithm)
           for m in f.measurements]
    if f.confidence is not None:
        out.append(hd.sr.Measurement(name=CONFIDENCE, value=round(float(f.confidence), 4),
                                     unit=PydicomCode("1", "UCUM", "no units"),
                                     algorithm_id=algorithm))
    return out


def _sites(f: Finding) -> list[hd.sr.FindingSite] | None:
    if f.site is None:
        return None
    return [hd.sr.FindingSite(pd_code(f.site), laterality=None if f.laterality is None
                              else pd_code(f.laterality))]


def _evaluations(f: Finding) -> list[hd.sr.QualitativeEvaluation] | None:
    return [hd.sr.QualitativeEvaluation(pd_code(name), pd_code(value))
            for name, value in f.evaluations] or None


def findings_to_sr(findings: Sequence[Finding], sources: Sequence[Any],
                   seg: hd.seg.Segmentation | None, prov: Provenance, series_number: int,
                   index: int = 0) -> hd.sr.Comprehensive3DSR:
    if not sources:
        raise PluginError("an SR needs the images it reports on")
    src = sources[0]
    frame_of_reference = str(src.get("FrameOfReferenceUID", ""))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=output_uid(prov.job_id, "device", prov.plugin_name), name=prov.plugin_name,
        manufacturer_name=MANUFACTURER, model_name=prov.plugin_name)
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    groups: list[Any] = []
    for i, f in enumerate(findings):
        tracking = hd.sr.TrackingIdentifier(uid=output_uid(prov.job_id, "finding", index, i),
                                            identifier=f"Finding {i + 1}")
        measurements = _measurements(f, prov)
        if f.segment is not None:
            if seg is None:
                raise PluginError(f"finding {i + 1} refers to segment {f.segment} but there "
                                  "is no label map")
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=f.segment,
                source_series=hd.sr.SourceSeriesForSegmentation(
                    f.source_series_uid or str(src.SeriesInstanceUID)))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=ref,
                finding_type=pd_code(f.finding), measurements=measurements,
                qualitative_evaluations=_evaluations(f), finding_sites=_sites(f)))
        elif f.location is not None:
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                         graphic_data=np.array([f.location], dtype=float),
                                         frame_of_reference_uid=frame_of_reference)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_region=region,
                finding_type=pd_code(f.finding), measurements=measurements,
                qualitative_evaluations=_evaluations(f), finding_sites=_sites(f)))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=pd_code(f.finding),
                measurements=measurements or None, qualitative_evaluations=_evaluations(f),
                finding_sites=_sites(f)))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURES.get(str(src.get("Modality", "")), IMAGING_PROCEDURE),
        imaging_measurements=groups)
    evidence = [*sources, seg] if seg is not None else list(sources)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0],
        series_instance_uid=output_uid(prov.job_id, "sr", index),
        series_number=series_number,
        sop_instance_uid=output_uid(prov.job_id, "sr", index, "instance"),
        instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"{prov.plugin_name} report"[:64],
        institution_name=None, is_complete=True, is_final=False, is_verified=False)
