"""The store's structure walker and index attributes on pydicom's corpus: truncations anywhere,
character sets, fast decoding equal to pydicom's, fast pixel values, the hand-built file meta."""

from __future__ import annotations

import glob
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.store.parse import MalformedDataset, check_complete, read_index_attributes
from tests.helpers import split_part10

TEST_FILES = os.path.dirname(get_testdata_file("CT_small.dcm"))


def _samples() -> list[str]:
    files = sorted(glob.glob(TEST_FILES + "/*.dcm"))
    out = []
    for f in files:
        try:
            split_part10(f)
        except Exception:
            continue  # no file meta: not something a network peer sends us as-is
        out.append(f)
    return out


def test_walker_accepts_pydicom_corpus_and_catches_its_truncated_files() -> None:
    bad = {}
    for f in _samples():
        ts, data = split_part10(f)
        try:
            read_index_attributes(check_complete(data, ts))
        except MalformedDataset as e:
            bad[os.path.basename(f)] = str(e)
    assert set(bad) == {"MR_truncated.dcm", "rtplan_truncated.dcm"}, bad
    assert len(_samples()) > 50


@pytest.mark.parametrize("cut", [1, 7, 100, 2000])
def test_walker_catches_truncation_anywhere(cut: int) -> None:
    checked = 0
    for f in _samples():
        ts, data = split_part10(f)
        if "truncated" in f or ts == "1.2.840.10008.1.2.1.99":
            continue  # deflate: trailing padding after the stream end is legal
        if len(data) <= cut:
            continue
        with pytest.raises(MalformedDataset):
            check_complete(data[: len(data) - cut], ts)
        checked += 1
    assert checked > 40


def test_deflated_truncation_detected() -> None:
    ts, data = split_part10(get_testdata_file("image_dfl.dcm"))
    with pytest.raises(MalformedDataset, match="deflate"):
        check_complete(data[:-50], ts)


def test_index_attributes() -> None:
    ts, data = split_part10(get_testdata_file("CT_small.dcm"))
    a = read_index_attributes(check_complete(data, ts))
    assert a.modality == "CT" and a.patient_name == "CompressedSamples^CT1"
    assert a.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"


def test_fast_pixel_values_equal_pydicoms() -> None:
    """Plugins' pixels read native little-endian data in place; on every single-frame sample
    pydicom decodes, and with bits set above BitsStored (cleared, or sign-extended), the
    values must equal pydicom's ``pixel_array``."""
    from dicomnode.run.inputs import stored_values

    checked = 0
    for f in _samples():
        try:
            ds = pydicom.dcmread(f)
            ref = ds.pixel_array
        except Exception:
            continue
        if ref.ndim != 2:
            continue
        assert np.array_equal(stored_values(ds), ref), f
        checked += 1
    assert checked > 20
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # signed, 16 of 16 bits
    for signed in (0, 1):
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, 12, 11
        raw = np.array([[0x0FFF, 0x1800], [0xF800, 0x0801]], dtype=np.uint16)
        ds.Rows, ds.Columns, ds.PixelData = 2, 2, raw.tobytes()
        ref = ds.pixel_array
        assert np.array_equal(stored_values(ds), ref), signed
        assert stored_values(ds).dtype == ref.dtype


def test_fast_index_decoding_agrees_with_pydicom() -> None:
    """Plain-ASCII values are read without pydicom; on every sample and every character-set
    file the result must be exactly what the all-pydicom reference gives."""
    from pydicom.data import get_charset_files

    from dicomnode.store.parse import read_index_attributes_pydicom

    checked = 0
    for f in _samples() + get_charset_files("*.dcm"):
        try:
            ts, data = split_part10(f)
            plain = check_complete(data, ts)
        except (MalformedDataset, ValueError, KeyError, AttributeError):
            continue
        assert read_index_attributes(plain) == read_index_attributes_pydicom(plain), f
        checked += 1
    assert checked > 60
    # the fast path's edges: padding, signs, odd numbers, multi-values, escapes
    from dicomnode.store.parse import _TAGS, PlainDataset

    def one(kw: str, value: bytes, vr: bytes) -> PlainDataset:
        return PlainDataset(value, False, True, {_TAGS[kw]: (vr, len(value), 0)})

    for kw, vr, value in [("SeriesNumber", b"IS", b" +12 "), ("InstanceNumber", b"IS", b"-3"),
                          ("InstanceNumber", b"IS", b"1.5 "), ("SeriesNumber", b"IS", b"x"),
                          ("PatientName", b"PN", b"A^B \x00"), ("PatientID", b"LO", b" ID "),
                          ("PatientID", b"LO", b"A\\B"), ("StudyDescription", b"LO", b"\x1b$B"),
                          ("SOPInstanceUID", b"UI", b"1.2.3\x00"), ("Modality", b"CS", b"")]:
        plain = one(kw, value, vr)
        assert read_index_attributes(plain) == read_index_attributes_pydicom(plain), (kw, value)


def test_garbage_is_malformed() -> None:
    with pytest.raises(MalformedDataset):
        check_complete(os.urandom(4096), "1.2.840.10008.1.2.1")
    with pytest.raises(MalformedDataset):
        check_complete(b"", "1.2.840.10008.1.2")


def test_index_attributes_match_pydicom_in_every_character_set() -> None:
    """The walker hands pydicom only the indexed elements; decoding must match a full read."""
    import pydicom
    from pydicom.data import get_charset_files

    from dicomnode.store.meta import part10_header

    checked = 0
    for f in get_charset_files("*.dcm"):
        ds = pydicom.dcmread(f)
        if "PatientName" not in ds or "SpecificCharacterSet" not in ds:
            continue
        ts, data = split_part10(f) if ds.file_meta else ("", b"")
        if not data:
            continue
        a = read_index_attributes(check_complete(data, ts))
        assert a.patient_name == str(ds.PatientName)[:324], f
        checked += 1
    assert checked >= 10
    # and the hand-built file meta reads back as pydicom would write it
    h = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2", "NODE", "CT1")
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble
    fp = io.BytesIO(h)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    assert fp.tell() == len(h) and meta.SendingApplicationEntityTitle == "CT1"
    assert meta.FileMetaInformationGroupLength == len(h) - 128 - 4 - 12
