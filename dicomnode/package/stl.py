"""Mesh → Encapsulated STL Storage (1.2.840.10008.5.1.4.1.1.104.3, Modality M3D).

Built directly with pydicom (highdicom has no class for it). Modules per PS3.3 A.85.1: Patient,
General Study, Encapsulated Document Series, General Equipment + Enhanced General Equipment,
Frame of Reference (the mesh is in the source's patient space), Encapsulated Document,
Manufacturing 3D Model (units: mm), SOP Common. The STL is binary, vertices in LPS mm.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.package.provenance import MANUFACTURER, Provenance, output_uid
from dicomnode.package.series import copy_patient_study
from dicomnode.plugin import Mesh, PluginError

ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"


def binary_stl(vertices: np.ndarray, faces: np.ndarray, name: str) -> bytes:
    """Binary STL: 80-byte header, triangle count, per triangle normal + 3 vertices."""
    tri = vertices[faces].astype(np.float32)  # (M, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(lengths > 0, normals / np.maximum(lengths, 1e-12), 0).astype(np.float32)
    records = np.zeros(len(faces), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)),
                                          ("attr", "<u2")])
    records["n"], records["v"] = normals, tri
    header = name.encode("ascii", "replace")[:80].ljust(80, b" ")
    return header + struct.pack("<I", len(faces)) + records.tobytes()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def mesh_to_stl(mesh: Mesh, sources: Sequence[Any], prov: Provenance, series_number: int,
                index: int = 0) -> Dataset:
    if not sources:
        raise PluginError("an STL needs the images it was made from")
    src = sources[0]
    v, f = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    if len(f) == 0:
        raise PluginError(f"mesh {mesh.name!r} has no faces")
    payload = binary_stl(v, f, f"dicomnode {prov.plugin_name} {mesh.name}")
    when = prov.when
    ds = Dataset()
    copy_patient_study(src, ds)
    ds.SOPClassUID = ENCAPSULATED_STL
    ds.SOPInstanceUID = output_uid(prov.job_id, "stl", index, "instance")
    ds.Modality = "M3D"
    ds.SeriesInstanceUID = output_uid(prov.job_id, "stl", index)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{prov.plugin_name} {mesh.name}"[:64]
    ds.FrameOfReferenceUID = mesh.frame_of_reference_uid or src.FrameOfReferenceUID
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = prov.plugin_name[:64]
    ds.DeviceSerialNumber = prov.node_ae_title
    ds.SoftwareVersions = prov.software_versions
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = mesh.name[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "model/stl"
    ds.EncapsulatedDocument = payload + (b"\0" if len(payload) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(payload)
    ds.MeasurementUnitsCodeSequence = [_code("mm", "UCUM", "mm")]
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
    ds.SourceInstanceSequence = [ref]
    # Common Instance Reference module: the series (same study) holding what we reference
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = src.SeriesInstanceUID
    items = []
    for s in sources:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = s.SOPClassUID, s.SOPInstanceUID
        items.append(r)
    series_ref.ReferencedInstanceSequence = items
    ds.ReferencedSeriesSequence = [series_ref]
    ds.ContributingEquipmentSequence = [prov.contributing_equipment(f"surface {mesh.name}")]
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
