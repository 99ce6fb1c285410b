"""What the review page shows of a finding: its key images as PNGs with the segment's outline
drawn over them, and its measurements as the SR states them.

Images are read from the node's store (the ``instances`` index), windowed for CT (brain 40/80
for a head, lung -600/1500 for a chest, else the image's own window or soft tissue 40/400) and
the finding's SEG segment drawn as an outline (mask minus its 4-neighbour erosion) in a colour
no grey pixel has, so the outline is unmistakable on any window.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import Settings
from dicomnode.review.sr_read import MeasurementGroup, measurement_groups, segment_masks
from dicomnode.schema import Finding, FindingReview, Instance

__all__ = [
    "OUTLINE_RGB",
    "WINDOWS",
    "FindingDetail",
    "KeyImage",
    "choose_window",
    "finding_detail",
    "outline",
    "render_key_images",
]

#: (centre, width) in HU
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0), "lung": (-600.0, 1500.0), "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}
_HEAD = ("HEAD", "BRAIN", "SKULL", "CRAN")
_CHEST = ("CHEST", "LUNG", "THORAX", "PULM")
OUTLINE_RGB = (255, 200, 0)  # amber: R ≠ B, so never a grey pixel


@dataclass(frozen=True)
class KeyImage:
    sop_instance_uid: str
    png: bytes
    frame_label: str  # e.g. "image 23 · z 12.0 mm · lesion 137 px"
    width: int
    height: int
    outline_pixels: int  # how many pixels the outline drew (0: no mask on this image)


def choose_window(ds: Dataset, hint: str = "") -> tuple[float, float]:
    """A CT window from what the series says it shows (BodyPartExamined, descriptions) or a
    ``hint`` (e.g. the finding site), else the image's own window, else soft tissue."""
    text = " ".join(str(ds.get(k, "")) for k in ("BodyPartExamined", "SeriesDescription",
                                                 "StudyDescription", "ProtocolName"))
    text = f"{text} {hint}".upper()
    if any(w in text for w in _HEAD):
        return WINDOWS["brain"]
    if any(w in text for w in _CHEST):
        return WINDOWS["lung"]
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        return _first(centre), max(_first(width), 1.0)
    return WINDOWS["soft-tissue"]


def _first(value: object) -> float:
    """A DS value or the first of several (a window can be listed more than once)."""
    return float(value[0] if isinstance(value, list | MultiValue) else value)  # type: ignore[arg-type]


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary: mask minus its erosion by the 4-neighbourhood (pixels outside the
    image count as background, so a mask touching the edge is outlined there too)."""
    m = np.pad(mask.astype(bool), 1)
    eroded = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge: np.ndarray = mask.astype(bool) & ~eroded
    return edge


def _grey(ds: Dataset, window: tuple[float, float]) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 3:  # a multi-frame image: its first frame
        pixels = pixels[0]
    hu = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0)
                                                                 or 0)
    centre, width = window
    low = centre - width / 2
    out = np.clip((hu - low) / width, 0.0, 1.0) * 255.0
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255.0 - out
    grey: np.ndarray = out.astype(np.uint8)
    return grey


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render_key_images(s: Session, settings: Settings, finding_id: int, *,
                      window: tuple[float, float] | str | None = None, max_images: int = 4,
                      sop_instance_uids: list[str] | None = None) -> list[KeyImage]:
    """The finding's key images (at most ``max_images``: the slices where its segment is
    largest, or the step's KOS images), as PNGs with the segment outlined. ``window``: (centre,
    width) in HU or a name from :data:`WINDOWS`; default chosen from the series.
    ``sop_instance_uids``: render these images of the study instead (e.g. a neighbour slice).
    Images no longer in the store are left out. Raises LookupError for an unknown finding."""
    finding = s.get(Finding, finding_id)
    if finding is None:
        raise LookupError(f"no finding {finding_id}")
    uids = list(sop_instance_uids if sop_instance_uids is not None
                else json.loads(finding.key_images))[:max_images]
    if not uids:
        return []
    paths = {uid: path for uid, path in s.execute(
        select(Instance.sop_instance_uid, Instance.path)
        .where(Instance.sop_instance_uid.in_(uids))).all()}
    masks: dict[str, np.ndarray] = {}
    if finding.seg_path and finding.segment_number is not None:
        masks = segment_masks(pydicom.dcmread(finding.seg_path), finding.segment_number)
    fixed = WINDOWS[window] if isinstance(window, str) else window
    out: list[KeyImage] = []
    for uid in uids:
        if uid not in paths:
            continue
        ds = pydicom.dcmread(Path(settings.storage.path) / paths[uid])
        grey = _grey(ds, fixed or choose_window(ds, finding.site))
        rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
        mask = masks.get(uid)
        edge = np.zeros(grey.shape, dtype=bool)
        if mask is not None and mask.shape == grey.shape:
            edge = outline(mask)
            rgb[edge] = OUTLINE_RGB
        z = ds.get("ImagePositionPatient")
        label = " · ".join(filter(None, [
            f"image {ds.get('InstanceNumber', '?')}",
            f"z {float(z[2]):.1f} mm" if z else "",
            f"segment {int(mask.sum())} px" if mask is not None and mask.any() else ""]))
        out.append(KeyImage(uid, _png(rgb), label, grey.shape[1], grey.shape[0],
                            int(edge.sum())))
    return out


@dataclass(frozen=True)
class FindingDetail:
    """A finding for the review page: what the SR says (read from the file), its row's
    priority, status and review."""

    finding_id: int
    group: MeasurementGroup
    priority: int
    critical: str
    status: str
    reviewed_by: str
    decision: str
    comment: str


def finding_detail(s: Session, finding_id: int) -> FindingDetail:
    """The finding's measurement group read from its SR (measurements with units,
    evaluations, site, confidence, segment) with its review, if any. Raises LookupError."""
    finding = s.get(Finding, finding_id)
    if finding is None:
        raise LookupError(f"no finding {finding_id}")
    ds = pydicom.dcmread(finding.sr_path)
    group = next((g for g in measurement_groups(ds) if g.tracking_uid == finding.tracking_uid),
                 None)
    if group is None:
        raise LookupError(f"finding {finding_id}: its group is no longer in {finding.sr_path}")
    review = s.execute(select(FindingReview).where(FindingReview.finding_fk == finding.id)
                       ).scalar_one_or_none()
    return FindingDetail(finding.id, group, finding.priority, finding.critical,
                         str(finding.status), finding.reviewed_by,
                         str(review.decision) if review else "",
                         review.comment if review else "")
