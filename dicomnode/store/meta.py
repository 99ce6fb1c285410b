"""Part 10 file meta information for a received instance, built directly.

Why by hand: pydicom's ``write_file_meta_info`` took ~0.3 ms per instance (a tenth of the whole
per-instance budget) for ~200 bytes of fixed structure. The layout is PS3.10 7.1: group 0002,
explicit VR little endian, group length first. Tested against pydicom's reader and dcmtk.
"""

from __future__ import annotations

import struct
import uuid

from dicomnode import __version__

# 2.25 (UUID-derived) root: the node has no registered organisation root of its own.
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.UUID("6f1f5a52-5d3b-4f4e-9b7a-3c2d1e0f9a8b").int)
IMPLEMENTATION_VERSION_NAME = ("DICOMNODE_" + __version__.replace(".", ""))[:16]


def _short(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def _ui(value: str) -> bytes:
    b = value.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def _text(value: str) -> bytes:
    b = value.encode("ascii", "replace")
    return b + b" " if len(b) % 2 else b


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                  source_aet: str, sending_aet: str = "", receiving_aet: str = "") -> bytes:
    """Preamble, ``DICM`` and the file meta group for a dataset received over the network.

    ``source_aet`` is the AE that wrote the file (the node); ``sending_aet``/``receiving_aet``
    (0002,0017)/(0002,0018) record who sent it to whom, so the file itself keeps its provenance.
    """
    body = b"".join((
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short(0x0002, b"UI", _ui(sop_class_uid)),
        _short(0x0003, b"UI", _ui(sop_instance_uid)),
        _short(0x0010, b"UI", _ui(transfer_syntax_uid)),
        _short(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _short(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        _short(0x0016, b"AE", _text(source_aet)) if source_aet else b"",
        _short(0x0017, b"AE", _text(sending_aet)) if sending_aet else b"",
        _short(0x0018, b"AE", _text(receiving_aet)) if receiving_aet else b"",
    ))
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body
