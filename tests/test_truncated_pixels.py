"""A truncated image re-encoded by its sender still gets refused (issue 19, point 8).

pynetdicom's SCU reads a file cut in half with pydicom, which keeps the short Pixel Data, and
sends a well-formed dataset: every element length fits, so only the Image Pixel module can tell
that the pixels stop early. The walker in ``store/parse.py`` compares the native Pixel Data
length with Rows x Columns x Samples x Frames x Bits Allocated.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from dicomnode.store.parse import MalformedDataset, check_complete, read_index_attributes
from tests.helpers import split_part10, with_new_uids

NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
          "1.2.840.10008.1.2.1.99"}


def _encode(ds: Dataset) -> tuple[bytes, str]:
    """(dataset bytes, transfer syntax) as a sender would put them on the wire: the
    arguments of ``check_complete``."""
    buf = io.BytesIO()
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = meta.get("MediaStorageSOPClassUID") or "1.2.3"
    meta.MediaStorageSOPInstanceUID = meta.get("MediaStorageSOPInstanceUID") or "1.2.3.4"
    ds.save_as(buf, enforce_file_format=True)
    fp = io.BytesIO(buf.getvalue())
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return buf.getvalue()[fp.tell():], str(meta.TransferSyntaxUID)


def _reencoded(name: str, keep: int) -> tuple[bytes, str]:
    """A pydicom test file with its Pixel Data cut to ``keep`` bytes, re-encoded by pydicom the
    way pynetdicom's SCU re-encodes a truncated file (an odd length is padded to even)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PixelData = ds.PixelData[:keep]
    return _encode(ds)


def _cut_on_wire(data: bytes, ts: str, keep: int, keyword: str = "PixelData"
                 ) -> tuple[bytes, str]:
    """The encoded dataset with the value of ``keyword`` cut to ``keep`` bytes in place (its
    length field rewritten, what follows it kept): a sender that does not pad, byte-exact."""
    uid = UID(ts)
    deflated = uid == DeflatedExplicitVRLittleEndian
    plain = zlib.decompress(data, -zlib.MAX_WBITS) if deflated else data
    ds = read_dataset(io.BytesIO(plain), uid.is_implicit_VR, uid.is_little_endian)
    el = ds.get_item(keyword)
    assert el is not None and el.value_tell is not None
    start, end = el.value_tell, el.value_tell + el.length
    length = struct.pack("<L" if uid.is_little_endian else ">L", keep)
    out = plain[: start - 4] + length + plain[start: start + keep] + plain[end:]
    if deflated:
        z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        out = z.compress(out) + z.flush()
    return out, ts


# --- (1) the check on pydicom's test files ----------------------------------------------------

@pytest.mark.parametrize("name", [
    "CT_small.dcm",                       # 128x128 16-bit, explicit little endian
    "MR_small.dcm",                       # 64x64 16-bit
    "MR_small_implicit.dcm",              # implicit VR
    "MR_small_bigendian.dcm",             # explicit big endian: US values read big-endian
    "rtdose.dcm",                         # 15 frames, 32-bit, implicit
    "liver_1frame.dcm",                   # Bits Allocated 1, packed
    "liver_expb_1frame.dcm",              # the same, big endian
    "SC_rgb_small_odd.dcm",               # 3x3 RGB: odd pixel count, padded value
    "SC_ybr_full_422_uncompressed.dcm",   # YBR_FULL_422: 2/3 of the full size
    "image_dfl.dcm",                      # deflated: checked after inflating
])
def test_intact_native_pixels_pass_and_short_ones_are_refused(name: str) -> None:
    ts, data = split_part10(get_testdata_file(name))
    assert ts in NATIVE
    read_index_attributes(check_complete(data, ts))  # the file as shipped passes

    ds = pydicom.dcmread(get_testdata_file(name))
    expected = pydicom.pixels.utils.get_expected_length(ds)
    assert len(ds.PixelData) >= expected
    # exactly the expected size (no padding byte) still passes: only short data is refused
    check_complete(*_cut_on_wire(data, ts, expected))
    # one byte short, byte-exact (odd or even), and a few bytes short
    for keep in (expected - 1, expected - 2, expected - 3):
        with pytest.raises(MalformedDataset, match=r"^truncated: Pixel Data holds") as e:
            check_complete(*_cut_on_wire(data, ts, keep))
        assert f"holds {keep} of {expected} bytes" in str(e.value)
        assert ("odd length" in str(e.value)) == bool(keep % 2)
    # half of it, re-encoded by pydicom as pynetdicom's SCU does (padded to even)
    half = (expected // 2) | 1
    with pytest.raises(MalformedDataset, match=f"holds {half + 1} of {expected} bytes"):
        check_complete(*_reencoded(name, half))


def test_every_native_image_in_pydicoms_corpus_is_checked() -> None:
    """No native single- or multi-frame image in pydicom's test files slips past the check
    when its Pixel Data is halved (so the check does not silently skip some encoding)."""
    folder = os.path.dirname(get_testdata_file("CT_small.dcm"))
    checked = 0
    for f in sorted(Path(folder).glob("*.dcm")):
        try:
            ts, data = split_part10(f)
        except Exception:
            continue
        if ts not in NATIVE or "truncated" in f.name:
            continue
        ds = pydicom.dcmread(f)
        if "PixelData" not in ds or "Rows" not in ds:
            continue  # e.g. nested_priv_SQ.dcm: 2 bytes of Pixel Data, no image module
        check_complete(data, ts)
        keep = len(ds.PixelData) // 2 - 1
        if f.name == "badVR.dcm":
            # Number of Frames '1A' is no number: one frame (400 bytes) is all that can be
            # demanded (399 would be padded to 400)
            keep = 398
        with pytest.raises(MalformedDataset, match="Pixel Data"):
            check_complete(*_reencoded(f.name, keep))
        checked += 1
    assert checked >= 15


def test_bits_allocated_1_multiframe_is_bit_packed_across_frames() -> None:
    """5 frames of 3x3 1-bit pixels are 45 bits packed end to end: 6 bytes, not 5 frames of
    2 bytes each (PS3.5 8.1.1)."""
    ds = _tiny(rows=3, columns=3, bits=1, frames=5)
    ds.PixelData = b"\xff" * 5 + b"\x1f"
    check_complete(*_encode(ds))
    ds.PixelData = b"\xff" * 4
    with pytest.raises(MalformedDataset, match=r"holds 4 of 6 bytes .*1 bits, 5 frame"):
        check_complete(*_encode(ds))
    ds.PixelData = b"\xff" * 5 + b"\x1f"
    with pytest.raises(MalformedDataset, match="holds 5 of 6 bytes, odd length"):
        check_complete(*_cut_on_wire(*_encode(ds), 5))


def test_multiframe_counts_every_frame() -> None:
    ds = _tiny(rows=4, columns=4, bits=16, frames=5)
    ds.PixelData = bytes(4 * 4 * 2 * 5)
    check_complete(*_encode(ds))
    ds.PixelData = bytes(4 * 4 * 2 * 4)  # one frame missing: even length, still short
    with pytest.raises(MalformedDataset, match=r"holds 128 of 160 bytes .*5 frame"):
        check_complete(*_encode(ds))


@pytest.mark.parametrize(("keyword", "bits"), [("FloatPixelData", 32),
                                               ("DoubleFloatPixelData", 64)])
def test_float_and_double_pixel_data(keyword: str, bits: int) -> None:
    ds = _tiny(rows=4, columns=3, bits=bits, frames=2)
    del ds.PixelRepresentation, ds.BitsStored, ds.HighBit
    full = 4 * 3 * 2 * bits // 8
    setattr(ds, keyword, bytes(full))
    check_complete(*_encode(ds))
    setattr(ds, keyword, bytes(full - 8))
    name = "Float Pixel Data" if bits == 32 else "Double Float Pixel Data"
    with pytest.raises(MalformedDataset, match=f"{name} holds {full - 8} of {full}"):
        check_complete(*_encode(ds))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "rtdose_rle.dcm"])
def test_encapsulated_pixels_are_not_measured(name: str) -> None:
    """Compressed fragments say nothing about the image size: never refused for it."""
    ts, data = split_part10(get_testdata_file(name))
    assert ts not in NATIVE
    check_complete(data, ts)


def test_attributes_missing_means_no_check_and_index_attributes_unchanged() -> None:
    ds = _tiny(rows=8, columns=8, bits=16, frames=1)
    ds.PixelData = bytes(10)
    with pytest.raises(MalformedDataset):
        check_complete(*_encode(ds))
    del ds.Rows  # cannot know the size: nothing refused on a guess
    plain = check_complete(*_encode(ds))
    # the pixel attributes never reach the index elements (the slow path would copy them)
    assert 0x7FE00010 not in plain.elements and 0x00280010 not in plain.elements
    assert read_index_attributes(plain).modality == "OT"


def _tiny(rows: int, columns: int, bits: int, frames: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2" if frames > 1 else "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


# --- (2) a real node, pynetdicom's own SCU sending a file cut in half -------------------------

def test_pynetdicom_scu_sending_a_half_file_is_refused(node, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE, _config

    # the default: the SCU reads the file with pydicom and re-encodes it (another test may
    # have switched on streaming file bytes unchanged)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    good = tmp_path / "good.dcm"
    sent = with_new_uids(get_testdata_file("CT_small.dcm"), good)
    half = tmp_path / "half.dcm"
    half_ds = with_new_uids(get_testdata_file("CT_small.dcm"), tmp_path / "whole.dcm")
    raw = (tmp_path / "whole.dcm").read_bytes()
    cut = len(raw) // 2
    half.write_bytes(raw[:cut])
    if len(pydicom.dcmread(half).PixelData) % 2 == 0:  # the UIDs' lengths vary: make it odd
        cut += 1
        half.write_bytes(raw[:cut])
    # what the SCU will send: a well-formed dataset whose pixels stop short, odd length
    on_wire = len(pydicom.dcmread(half).PixelData)
    assert 0 < on_wire < 128 * 128 * 2 and on_wire % 2 == 1

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(sent.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(str(half))
        ok = assoc.send_c_store(str(good))
    finally:
        assoc.release()
    assert refused.Status == 0xC001, hex(refused.Status)
    assert "Pixel Data" in str(refused.get("ErrorComment", ""))
    assert ok.Status == 0x0000

    # not indexed, not on disk; the intact one is
    indexed = node.instances()
    assert set(indexed) == {sent.SOPInstanceUID}
    files = list((node.storage / "objects").rglob("*.dcm"))
    assert [str(p.relative_to(node.storage)) for p in files] == [
        indexed[sent.SOPInstanceUID]["path"]]

    [event] = node.audit("store-refused")
    assert event["detail"]["status"] == "0xC001"
    assert event["detail"]["sop_instance_uid"] == half_ds.SOPInstanceUID
    assert event["source_aet"] == "PYSCU"
    reason = event["detail"]["reason"]
    assert reason.startswith(f"truncated: Pixel Data holds {on_wire} of 32768 bytes, odd length")
