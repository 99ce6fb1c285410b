"""Check that a received dataset is whole, and read the attributes the index needs.

Why a hand-written walker: pydicom reads a truncated dataset without complaint (a short
PixelData value is returned as-is), so it cannot tell us "the sender stopped half-way". This walks
element headers only (values are skipped, never copied), checks every length fits inside the
buffer and every undefined-length sequence is closed, and costs microseconds per instance.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 64


class MalformedDataset(ValueError):
    """The dataset is truncated or structurally invalid; the message says where."""


class Walker:
    """One pass over an explicit/implicit, little/big endian data set: checks every element's
    length against the bytes there (nested sequences too) and collects the ``wanted`` top-level
    elements. Also used by :mod:`dicomnode.package.series` to read source headers fast."""

    def __init__(self, buf: bytes | memoryview, implicit: bool, little: bool,
                 wanted: frozenset[int] = frozenset()) -> None:
        self.buf = buf
        self.wanted = wanted
        self.found: dict[int, tuple[bytes | None, int, int]] = {}  # tag → (vr, length, vpos)
        self.end = len(buf)
        self.implicit = implicit
        e = "<" if little else ">"
        self.u16 = struct.Struct(e + "H")
        self.u32 = struct.Struct(e + "L")
        self.tag = struct.Struct(e + "HH")

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.end:
            raise MalformedDataset(
                f"truncated: {what} at byte {pos} needs {n} bytes, only {self.end - pos} remain"
            )

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Return (tag, vr, length, position of value)."""
        self._need(pos, 8, "element header")
        g, el = self.tag.unpack_from(self.buf, pos)
        tag = (g << 16) | el
        if g == 0xFFFE or implicit:
            return tag, None, self.u32.unpack_from(self.buf, pos + 4)[0], pos + 8
        vr = bytes(self.buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            self._need(pos, 12, "element header")
            return tag, vr, self.u32.unpack_from(self.buf, pos + 8)[0], pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise MalformedDataset(f"invalid VR {vr!r} for tag ({g:04X},{el:04X}) at byte {pos}")
        return tag, vr, self.u16.unpack_from(self.buf, pos + 6)[0], pos + 8

    def dataset(self, pos: int, stop: int, implicit: bool, depth: int, in_item: bool) -> int:
        """Walk elements from pos; in an undefined-length item, stop at the item delimiter."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        while pos < stop:
            tag, vr, length, vpos = self.header(pos, implicit)
            if tag == _ITEM_END:
                if not in_item:
                    raise MalformedDataset(f"item delimiter outside an item at byte {pos}")
                return vpos
            if tag in (_ITEM, _SEQ_END):
                raise MalformedDataset(f"unexpected item tag at byte {pos}")
            if depth == 0 and tag in self.wanted and length != _UNDEFINED:
                self.found[tag] = (vr, length, vpos)
            if length == _UNDEFINED:
                # SQ, or UN holding an implicit-VR sequence (PS3.5 6.2.2), or encapsulated pixels
                inner_implicit = implicit or vr == b"UN"
                pos = self.sequence(vpos, inner_implicit, depth + 1)
            else:
                self._need(vpos, length, f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                pos = vpos + length
        if in_item:
            raise MalformedDataset("truncated: item not closed by an item delimiter")
        if pos != stop:
            raise MalformedDataset("truncated: last element runs past the end")
        return pos

    def sequence(self, pos: int, implicit: bool, depth: int) -> int:
        while True:
            tag, _, length, vpos = self.header(pos, True)
            if tag == _SEQ_END:
                return vpos
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item in a sequence at byte {pos}")
            if length == _UNDEFINED:
                pos = self.dataset(vpos, self.end, implicit, depth, in_item=True)
            else:
                self._need(vpos, length, "sequence item")
                pos = vpos + length


def inflate(buf: bytes | memoryview) -> bytes:
    """Raw-deflate decode (PS3.5 A.5); raises MalformedDataset when the stream is cut short."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(buf) + d.flush()
    except zlib.error as e:
        raise MalformedDataset(f"deflate stream is corrupt: {e}") from None
    if not d.eof:
        raise MalformedDataset("truncated: deflate stream ends early")
    return out


@dataclass(frozen=True)
class PlainDataset:
    """A structurally checked dataset: inflated bytes and the encoding they really use."""

    data: bytes | memoryview
    implicit: bool
    little: bool
    elements: dict[int, tuple[bytes | None, int, int]]  # the indexed top-level elements


def check_complete(dataset: bytes | memoryview, transfer_syntax: str) -> PlainDataset:
    """Raise MalformedDataset unless ``dataset`` (no file meta) is structurally whole.

    Like dcmtk and pydicom, an explicit-VR syntax whose data turns out to be implicit-VR
    (a known sender bug) is accepted and stored as received.
    """
    ts = UID(transfer_syntax)
    plain = inflate(dataset) if ts == DeflatedExplicitVRLittleEndian else dataset
    implicit = ts.is_implicit_VR if ts.is_transfer_syntax else False
    little = ts != ExplicitVRBigEndian
    if len(plain) == 0:
        raise MalformedDataset("empty dataset")
    walker = Walker(plain, implicit, little, _WANTED)
    try:
        walker.dataset(0, len(plain), implicit, 0, in_item=False)
    except MalformedDataset as first:
        msg = str(first)
        if implicit or not little or "invalid VR" not in msg or "at byte 0" not in msg:
            raise
        walker = Walker(plain, True, True, _WANTED)
        walker.dataset(0, len(plain), True, 0, in_item=False)
        implicit = True
    found = walker.found
    # the pixel attributes leave the index elements here: the slow index path hands every
    # element to pydicom, and must never copy the Pixel Data
    pixels = {t: found.pop(t) for t in _PIXEL_TAGS if t in found}
    if ts in _NATIVE and pixels:
        check_pixel_length(plain, walker.u16, pixels)
    return PlainDataset(plain, implicit, little, found)


# --- the Pixel Data length (native transfer syntaxes) -----------------------------------------
#
# pynetdicom's SCU (and other toolkits) read a file cut short with pydicom, which returns the
# short Pixel Data value as-is, and re-encode it: the node receives a well-formed dataset whose
# pixels simply stop. The structure walk cannot see that; the Image Pixel module can
# (PS3.3 C.7.6.3, PS3.5 8.1.1). Encapsulated syntaxes carry compressed fragments whose length
# says nothing, and are not checked.

_SAMPLES, _PHOTOMETRIC, _FRAMES = 0x00280002, 0x00280004, 0x00280008
_ROWS, _COLUMNS, _BITS = 0x00280010, 0x00280011, 0x00280100
_PIXEL_DATA, _FLOAT_PIXELS, _DOUBLE_PIXELS = 0x7FE00010, 0x7FE00008, 0x7FE00009
_PIXEL_TAGS = (_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS, _PIXEL_DATA,
               _FLOAT_PIXELS, _DOUBLE_PIXELS)
_PIXEL_VALUES = ((_PIXEL_DATA, "Pixel Data", 0), (_FLOAT_PIXELS, "Float Pixel Data", 32),
                 (_DOUBLE_PIXELS, "Double Float Pixel Data", 64))  # 0: BitsAllocated says
_NATIVE = frozenset((ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian))

Element = tuple[bytes | None, int, int]  # (VR or None when implicit, length, value position)


def check_pixel_length(data: bytes | memoryview, u16: struct.Struct,
                       elements: dict[int, Element]) -> None:
    """Raise MalformedDataset when native pixel data is shorter than the Image Pixel module
    says: Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated, bit-packed
    for Bits Allocated 1 (PS3.5 8.1.1), two thirds of that for YBR_FULL_422 (PS3.3
    C.7.6.3.1.2), 32/64 bits for Float/Double Float Pixel Data. Only a value that is surely
    short is refused: when Rows, Columns or Bits Allocated are missing or not one US value,
    nothing is checked; a missing Samples per Pixel or Number of Frames counts as 1. A longer
    value (padding to even length, trailing bytes) is accepted, as pydicom and dcmtk do.

    ``elements``: top-level elements by tag, as the walker collects them (undefined-length
    values are absent: encapsulated pixels are never checked); ``u16``: the dataset's
    unsigned-short decoder (its byte order)."""

    def us(tag: int) -> int | None:
        e = elements.get(tag)
        if e is None or e[1] != 2:
            return None
        return int(u16.unpack_from(data, e[2])[0])

    def text(tag: int) -> bytes:
        e = elements.get(tag)
        return b"" if e is None else bytes(data[e[2]: e[2] + e[1]]).strip(b" \x00")

    rows, columns = us(_ROWS), us(_COLUMNS)
    if rows is None or columns is None:
        return
    samples = us(_SAMPLES) or 1
    try:
        frames = max(int(text(_FRAMES) or b"1"), 1)  # pydicom too reads 0 frames as 1
    except ValueError:
        frames = 1
    for tag, name, fixed_bits in _PIXEL_VALUES:
        e = elements.get(tag)
        if e is None:
            continue
        bits = fixed_bits or us(_BITS)
        if not bits:
            continue
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if fixed_bits == 0 and text(_PHOTOMETRIC) == b"YBR_FULL_422":
            expected = expected // 3 * 2
        length = e[1]
        if length < expected:
            odd = ", odd length" if length % 2 else ""
            raise MalformedDataset(
                f"truncated: {name} holds {length} of {expected} bytes{odd} "
                f"({rows}x{columns}, {samples} sample(s), {bits} bits, {frames} frame(s))")


@dataclass(frozen=True)
class IndexAttributes:
    """What the SQL index keeps of one instance (the keys PACS users filter on)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    modality: str
    series_number: str
    series_description: str
    body_part: str
    frame_of_reference_uid: str
    instance_number: int | None


_KEYWORDS = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
             "SeriesInstanceUID", "PatientID", "IssuerOfPatientID", "PatientName",
             "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
             "StudyID", "StudyDescription", "ReferringPhysicianName", "Modality", "SeriesNumber",
             "SeriesDescription", "BodyPartExamined", "FrameOfReferenceUID", "InstanceNumber")
_WANTED = frozenset(int(tag_for_keyword(k) or 0) for k in _KEYWORDS) | frozenset(_PIXEL_TAGS)


_FIELDS = (("sop_class_uid", "SOPClassUID", 64), ("sop_instance_uid", "SOPInstanceUID", 64),
           ("study_uid", "StudyInstanceUID", 64), ("series_uid", "SeriesInstanceUID", 64),
           ("patient_id", "PatientID", 64), ("issuer", "IssuerOfPatientID", 64),
           ("patient_name", "PatientName", 324), ("birth_date", "PatientBirthDate", 8),
           ("sex", "PatientSex", 16), ("study_date", "StudyDate", 8),
           ("study_time", "StudyTime", 16), ("accession_number", "AccessionNumber", 16),
           ("study_id", "StudyID", 16), ("study_description", "StudyDescription", 64),
           ("referring_physician", "ReferringPhysicianName", 324), ("modality", "Modality", 16),
           ("series_number", "SeriesNumber", 12),
           ("series_description", "SeriesDescription", 64),
           ("body_part", "BodyPartExamined", 16),
           ("frame_of_reference_uid", "FrameOfReferenceUID", 64))
_TAGS = {kw: int(tag_for_keyword(kw) or 0) for kw in _KEYWORDS}
_STRIP_BOTH = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
               "FrameOfReferenceUID", "SeriesNumber", "InstanceNumber"}  # UI and IS
# one value of printable ASCII (no backslash: not multi-valued, no ESC: no ISO 2022 switch),
# then padding: reads the same in every character set DICOM allows
_PLAIN = re.compile(rb"[\x20-\x5B\x5D-\x7E]*\x00*\Z")
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")


def _s(ds: Any, kw: str, limit: int) -> str:
    try:
        v = ds.get(kw)
    except Exception:  # a badly encoded optional value must not refuse the instance
        return ""
    return "" if v is None else str(v)[:limit]


def _fast_text(plain: PlainDataset, kw: str) -> str | None:
    """The value as pydicom would give it, for plain ASCII values; None: let pydicom decode."""
    found = plain.elements.get(_TAGS[kw])
    if found is None:
        return ""
    _, length, vpos = found
    raw = bytes(plain.data[vpos: vpos + length])
    if not _PLAIN.match(raw):
        return None
    text = raw.decode("ascii")
    if kw in _STRIP_BOTH:
        text = text.strip(" \x00")
        if kw in ("SeriesNumber", "InstanceNumber") and text and not _INTEGER.match(text):
            return None  # not an integer: pydicom's IS handling decides
        return text
    return text.rstrip(" \x00")


def read_index_attributes(plain: PlainDataset) -> IndexAttributes:
    """Decode just the indexed attributes the walker found. Plain ASCII values (nearly all)
    are read directly; anything else (other character sets, multi-values, odd numbers) is
    decoded by pydicom, Specific Character Set included. The rest of the header is never
    parsed. ``tests/test_units_parse.py`` checks both give the same on pydicom's test files."""
    values: dict[str, str] = {}
    slow: list[tuple[str, str, int]] = []
    for field_name, kw, limit in _FIELDS:
        text = _fast_text(plain, kw)
        if text is None:
            slow.append((field_name, kw, limit))
        else:
            values[field_name] = text[:limit]
    number = _fast_text(plain, "InstanceNumber")
    ds = _pydicom_dataset(plain) if slow or number is None else None
    for field_name, kw, limit in slow:
        values[field_name] = _s(ds, kw, limit)
    if number is None:
        try:
            value = ds.get("InstanceNumber") if ds is not None else None
            inst_no = int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            inst_no = None
    else:
        inst_no = int(number) if number else None
    return IndexAttributes(**values, instance_number=inst_no)


def read_index_attributes_pydicom(plain: PlainDataset) -> IndexAttributes:
    """The reference decoding (every value through pydicom); the fast path must agree."""
    ds = _pydicom_dataset(plain)
    inst_no: int | None
    try:
        number = ds.get("InstanceNumber")
        inst_no = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        inst_no = None
    return IndexAttributes(**{f: _s(ds, kw, limit) for f, kw, limit in _FIELDS},
                           instance_number=inst_no)


def _pydicom_dataset(plain: PlainDataset) -> Dataset:
    raw: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag, (vr, length, vpos) in plain.elements.items():
        value = bytes(plain.data[vpos: vpos + length])
        raw[BaseTag(tag)] = RawDataElement(
            BaseTag(tag), vr.decode("ascii") if vr else None, length, value, vpos,
            plain.implicit, plain.little, True, False)
    return Dataset(raw)
