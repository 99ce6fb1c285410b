"""Orthanc (the Debian package) as the PACS that receives results: one server per test."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import dcmtk_env, free_port, wait_until

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(self, work: Path, port: int | None = None,
                 modalities: dict[str, list[Any]] | None = None) -> None:
        """``port``: its DICOM port (default: a free one). ``modalities``: its
        ``DicomModalities`` (name → [AE title, host, port]), the peers it may query and
        retrieve from (Orthanc as a Query/Retrieve client)."""
        self.port, self.http = port or free_port(), free_port()
        work.mkdir(parents=True, exist_ok=True)
        cfg = work / "orthanc.json"
        cfg.write_text(json.dumps({
            "Name": "pacs", "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"), "DicomAet": "ORTHANC",
            "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
            "DicomModalities": modalities or {}}))
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], env=dcmtk_env(),
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(work / "orthanc.log", "wb"))  # noqa: SIM115
        wait_until(self._up, timeout=30, what="Orthanc REST")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, body: Any, timeout: float = 60) -> Any:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.read()
        return json.loads(out) if out[:1] in (b"{", b"[") else out

    def series(self) -> list[dict[str, Any]]:
        return self.get("/series?expand")  # type: ignore[no-any-return]

    def instance_file(self, instance_id: str, dst: Path) -> Path:
        dst.write_bytes(self.get(f"/instances/{instance_id}/file"))
        return dst

    def stop(self) -> None:
        # the test is over and its folder is thrown away: Orthanc's orderly shutdown (~3.5 s,
        # its DICOM server's threads) would only add to every test that uses it
        self.proc.kill()
        self.proc.wait(15)

    def valid_results(self, modalities: set[str], dst: Path,
                      timeout: float = 120) -> dict[str, Path]:
        """Wait for exactly one series per modality, fetch each one's first instance into
        ``dst`` and check it: dciodvfy with zero errors, and dsrdump -Ee for an SR."""
        from tests.validators import dciodvfy_errors, dsrdump_errors

        wait_until(lambda: len(self.series()) == len(modalities), timeout=timeout,
                   what=" + ".join(sorted(modalities)) + " in Orthanc")
        by_modality = {s["MainDicomTags"]["Modality"]: s for s in self.series()}
        assert set(by_modality) == modalities
        paths = {m: self.instance_file(s["Instances"][0], dst / f"{m}.dcm")
                 for m, s in by_modality.items()}
        for m, p in paths.items():
            assert dciodvfy_errors(p) == [], m
        if "SR" in paths:
            assert dsrdump_errors(paths["SR"]) == []
        return paths
