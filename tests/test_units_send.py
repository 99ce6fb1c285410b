"""The send stage: C-STORE status classes, one job's results over parallel associations."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("status,verdict", [
    (0x0000, "ok"), (0x0001, "ok"), (0xB000, "ok"), (0xB007, "ok"),  # success, warnings
    (0xA700, "retry"), (0xA702, "retry"),  # out of resources: try again later
    (0xA900, "permanent"), (0xC000, "permanent"), (0xC211, "permanent"),  # wrong data
    (0x0122, "permanent"),  # SOP class not supported
])
def test_send_status_classification(status: int, verdict: str) -> None:
    from dicomnode.send.sender import classify

    assert classify(status) == verdict


def test_results_go_over_parallel_associations(tmp_path: Path) -> None:
    """send_files splits one job's results over destination.associations associations."""
    import threading

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from dicomnode.config import DestinationConfig
    from dicomnode.send.sender import send_files
    from dicomnode.simulate import write_ct_series
    from tests.helpers import free_port

    seen: dict[str, set[int]] = {}
    lock = threading.Lock()

    def on_store(event) -> int:  # type: ignore[no-untyped-def]
        with lock:
            seen.setdefault(event.request.AffectedSOPInstanceUID, set()).add(id(event.assoc))
        return 0x0000

    scp = AE(ae_title="PACS")
    for cx in AllStoragePresentationContexts:
        scp.add_supported_context(cx.abstract_syntax, "1.2.840.10008.1.2.1")
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        files = write_ct_series(tmp_path / "r", n=9, size=16)
        dest = DestinationConfig(ae_title="PACS", host="127.0.0.1", port=port, associations=3)
        assert send_files(dest, "DICOMNODE", files) == 9
    finally:
        server.shutdown()
    assert len(seen) == 9  # every object arrived once
    assert len(set().union(*seen.values())) == 3  # over three associations
