"""Reading back what the package stage wrote: TID 1500 measurement groups of an SR, the frames
of a SEG segment, the images a KOS selects. Plain pydicom, no highdicom parsing (its readers
rebuild every content item as an object; this walks only what the review needs).

TID 1500 (PS3.16): the document's root CONTAINER holds an "Imaging Measurements" container
(126010, DCM) whose "Measurement Group" containers (125007, DCM; TID 1501/1410/1411) each carry a
Tracking Identifier (112039) and Tracking Unique Identifier (112040), a Finding (121071), a
Finding Site (363698007, SCT) with its Laterality, NUM measurements, CODE qualitative
evaluations, a Referenced Segment (121191) or an Image Region (111030, SCOORD3D).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.package.sr import CONFIDENCE

SR_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
})
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"

IMAGING_MEASUREMENTS = ("126010", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_ID = ("112039", "DCM")
TRACKING_UID = ("112040", "DCM")
FINDING = ("121071", "DCM")
FINDING_SITE = ("363698007", "SCT")
LATERALITY = ("272741003", "SCT")
REFERENCED_SEGMENT = ("121191", "DCM")
IMAGE_REGION = ("111030", "DCM")
COMMENT = ("121106", "DCM", "Comment")


@dataclass(frozen=True)
class CodeValue:
    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class MeasuredValue:
    """One NUM item of a group: what (code meaning), how much, in which UCUM unit."""

    name: str
    value: float
    unit: str


@dataclass(frozen=True)
class MeasurementGroup:
    """One finding as the SR states it (one TID 1500 measurement group)."""

    index: int  # 0-based position among the document's measurement groups
    tracking_uid: str
    tracking_id: str
    finding: CodeValue | None
    site: str
    laterality: str
    confidence: float | None
    measurements: tuple[MeasuredValue, ...]
    evaluations: tuple[tuple[str, str], ...]  # (name meaning, value meaning)
    segment: tuple[str, int] | None  # (SEG SOP Instance UID, segment number)
    location: tuple[float, float, float] | None  # an Image Region POINT, LPS mm
    comments: tuple[str, ...]  # TEXT "Comment" items (a radiologist's amendment)


def code_of(seq: Any) -> CodeValue | None:
    """The first item of a code sequence (ConceptNameCodeSequence, ConceptCodeSequence, …)."""
    if not seq:
        return None
    item = seq[0]
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
    return CodeValue(str(value), str(item.get("CodingSchemeDesignator", "")),
                     str(item.get("CodeMeaning", "")))


def concept_is(item: Dataset, key: tuple[str, ...]) -> bool:
    c = code_of(item.get("ConceptNameCodeSequence"))
    return c is not None and (c.value, c.scheme) == key[:2]


def imaging_measurements(ds: Dataset) -> Dataset | None:
    """The Imaging Measurements container item of a TID 1500 document, or None."""
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "CONTAINER" and concept_is(item, IMAGING_MEASUREMENTS):
            return item  # type: ignore[no-any-return]
    return None


def group_items(ds: Dataset) -> list[Dataset]:
    """The measurement group container items, in document order."""
    container = imaging_measurements(ds)
    if container is None:
        return []
    return [g for g in container.get("ContentSequence", [])
            if g.get("ValueType") == "CONTAINER" and concept_is(g, MEASUREMENT_GROUP)]


def _group(index: int, g: Dataset) -> MeasurementGroup:
    tracking_uid = tracking_id = site = laterality = ""
    finding: CodeValue | None = None
    confidence: float | None = None
    measurements: list[MeasuredValue] = []
    evaluations: list[tuple[str, str]] = []
    comments: list[str] = []
    segment: tuple[str, int] | None = None
    location: tuple[float, float, float] | None = None
    for item in g.get("ContentSequence", []):
        vt = item.get("ValueType")
        name = code_of(item.get("ConceptNameCodeSequence"))
        key = (name.value, name.scheme) if name else ("", "")
        if vt == "UIDREF" and key == TRACKING_UID:
            tracking_uid = str(item.UID)
        elif vt == "TEXT" and key == TRACKING_ID:
            tracking_id = str(item.TextValue)
        elif vt == "TEXT" and key == COMMENT[:2]:
            comments.append(str(item.TextValue))
        elif vt == "CODE" and key == FINDING:
            finding = code_of(item.get("ConceptCodeSequence"))
        elif vt == "CODE" and key == FINDING_SITE:
            c = code_of(item.get("ConceptCodeSequence"))
            site = c.meaning if c else ""
            for mod in item.get("ContentSequence", []):
                if mod.get("ValueType") == "CODE" and concept_is(mod, LATERALITY):
                    lat = code_of(mod.get("ConceptCodeSequence"))
                    laterality = lat.meaning if lat else ""
        elif vt == "CODE" and name is not None:
            c = code_of(item.get("ConceptCodeSequence"))
            evaluations.append((name.meaning, c.meaning if c else ""))
        elif vt == "NUM" and name is not None:
            mv = item.get("MeasuredValueSequence")
            if not mv:
                continue  # a NUM with no value (TID 1501 allows it)
            unit = code_of(mv[0].get("MeasurementUnitsCodeSequence"))
            value = float(mv[0].NumericValue)
            if key == (CONFIDENCE.value, CONFIDENCE.scheme_designator):
                confidence = value
            else:
                measurements.append(MeasuredValue(name.meaning, value,
                                                  unit.value if unit else ""))
        elif vt == "IMAGE" and key == REFERENCED_SEGMENT:
            ref = item.ReferencedSOPSequence[0]
            numbers = ref.get("ReferencedSegmentNumber")
            number = numbers[0] if isinstance(numbers, list | MultiValue) \
                else numbers
            segment = (str(ref.ReferencedSOPInstanceUID), int(number))
        elif vt == "SCOORD3D" and key == IMAGE_REGION and item.get("GraphicType") == "POINT":
            x, y, z = (float(v) for v in item.GraphicData[:3])
            location = (x, y, z)
    return MeasurementGroup(index, tracking_uid, tracking_id, finding, site, laterality,
                            confidence, tuple(measurements), tuple(evaluations), segment,
                            location, tuple(comments))


def measurement_groups(ds: Dataset) -> list[MeasurementGroup]:
    """Every measurement group of a TID 1500 SR, in document order (none for another SR)."""
    return [_group(i, g) for i, g in enumerate(group_items(ds))]


def sop_class_of(path: Path) -> str:
    """The SOP Class UID from a Part 10 file's meta header (the data set is not read)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.get("MediaStorageSOPClassUID", ""))


def kos_references(ds: Dataset) -> list[str]:
    """The SOP Instance UIDs a Key Object Selection document selects, in document order."""
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "IMAGE":
            for ref in item.get("ReferencedSOPSequence", []):
                uid = str(ref.ReferencedSOPInstanceUID)
                if uid not in out:
                    out.append(uid)
    return out


def _frame_source(frame: Dataset) -> str:
    for der in frame.get("DerivationImageSequence", []):
        for src in der.get("SourceImageSequence", []):
            return str(src.ReferencedSOPInstanceUID)
    return ""


def segment_frames(seg: Dataset) -> Iterator[tuple[int, int, str]]:
    """(frame index, segment number, source image SOP Instance UID) of every SEG frame."""
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for k, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence", [])):
        ident = frame.get("SegmentIdentificationSequence") or \
            shared.get("SegmentIdentificationSequence")
        if not ident:
            continue
        yield k, int(ident[0].ReferencedSegmentNumber), _frame_source(frame) or \
            _frame_source(shared)


def segment_masks(seg: Dataset, segment: int) -> dict[str, np.ndarray]:
    """Source image SOP Instance UID → boolean mask of ``segment`` on it (frames of a BINARY or
    FRACTIONAL SEG, the latter thresholded at half)."""
    frames = [(k, src) for k, number, src in segment_frames(seg) if number == segment and src]
    if not frames:
        return {}
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    fractional = seg.get("SegmentationType") == "FRACTIONAL"
    half = float(seg.get("MaximumFractionalValue", 255)) / 2
    out: dict[str, np.ndarray] = {}
    for k, src in frames:
        mask = pixels[k] > half if fractional else pixels[k] > 0
        out[src] = out[src] | mask if src in out else mask
    return out
