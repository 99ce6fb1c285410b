"""LabelMap → DICOM Segmentation (highdicom), on the grid of its source series.

The label map must lie on the source images' grid (same shape and geometry), frame k on source
image k in slice order: highdicom does not sort source images, so the order is guaranteed by
:func:`dicomnode.run.inputs.series_input`. Resampled label maps are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.coding import Code as PydicomCode

from dicomnode.package.provenance import MANUFACTURER, Provenance, output_uid
from dicomnode.plugin import Code, Geometry, LabelMap, PluginError, to_numpy


def pd_code(c: Code) -> PydicomCode:
    return PydicomCode(c.value, c.scheme, c.meaning)


def algorithm(prov: Provenance) -> hd.AlgorithmIdentificationSequence:
    """Which plugin, which version, which family (CID 7162) produced a SEG or measurement."""
    if prov.algorithm_family is None:
        raise PluginError(f"{prov.plugin_name} returned a segmentation or measurements but "
                          "declares no algorithm_family (CID 7162), which SEG and SR require")
    value, scheme, meaning = prov.algorithm_family
    return hd.AlgorithmIdentificationSequence(
        name=prov.plugin_name, version=prov.plugin_version,
        family=hd.sr.CodedConcept(value, scheme, meaning))


def _same_grid(a: Geometry, b: Geometry) -> bool:
    return (a.shape == b.shape and np.allclose(a.origin, b.origin, atol=1e-3)
            and np.allclose(a.spacing, b.spacing, atol=1e-4)
            and np.allclose(a.row_direction, b.row_direction, atol=1e-5)
            and np.allclose(a.column_direction, b.column_direction, atol=1e-5))


def _unknown_labels(labels: np.ndarray, numbers: Sequence[int]) -> set[int]:
    """Values in ``labels`` (besides 0) that no segment has. One pass (max) when the segments
    are 1…n as usual; otherwise a table lookup, and np.unique only over the strays (np.unique
    of a whole CT-sized label map sorts it; bincount widened it to 8-byte counts: ~0.5 s)."""
    if labels.size == 0:
        return set()
    top = int(labels.max())
    known = np.zeros(max(top, *numbers, 0) + 1, dtype=bool)
    known[0] = True
    known[list(numbers)] = True
    if known[: top + 1].all():
        return set()
    strays = labels[~known[labels]]
    return set(np.unique(strays).tolist())


def label_map_to_seg(label_map: LabelMap, sources: Sequence[Any], source_geometry: Geometry,
                     prov: Provenance, series_number: int, index: int = 0) -> hd.seg.Segmentation:
    if not _same_grid(label_map.geometry, source_geometry):
        raise PluginError("label map is not on the source series grid (resampled SEG is not "
                          "supported yet)")
    labels = to_numpy(label_map.array).astype(np.uint16, copy=False)
    numbers = [s.number for s in label_map.segments]
    unknown = _unknown_labels(labels, numbers)
    if unknown:
        raise PluginError(f"label map has values {sorted(unknown)} with no Segment")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.number, segment_label=s.label[:64],
            segmented_property_category=pd_code(s.category),
            segmented_property_type=pd_code(s.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm(prov),
        ) for s in label_map.segments]
    # one binary mask per segment: (frames, rows, cols, segments)
    masks = np.stack([labels == n for n in numbers], axis=-1)
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=output_uid(prov.job_id, "seg", index),
        series_number=series_number,
        sop_instance_uid=output_uid(prov.job_id, "seg", index, "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=prov.plugin_name[:64],
        # highdicom annotates tuple[str]; Software Versions is LO 1-n and pydicom wants a list
        software_versions=list(prov.software_versions),  # type: ignore[arg-type]
        device_serial_number=prov.node_ae_title,
        series_description=f"{prov.plugin_name} segmentation"[:64],
        omit_empty_frames=False,
    )
