"""DICOMweb benchmark: WADO-RS retrieval of a whole CT study from the node (``dicomnode serve``
with its console, ``/dicomweb``) and from Orthanc's DICOMweb plugin (Debian
``orthanc-dicomweb``) holding the same data, side by side.

    python bench/dicomweb.py [--instances 300] [--size 512] [--runs 3] [--json out.json]

The study (``--instances`` slices of ``--size``² 16-bit CT, ~0.5 MB each at 512) is sent with
dcmtk storescu to both. Each run is one ``GET /studies/{uid}`` (Accept: multipart/related;
type="application/dicom"; transfer-syntax=*) read to the end over loopback with httpx in
1 MiB chunks; the MB/s of the best and median run are printed, with the server process's peak
RSS while streaming (sampled every 20 ms with psutil) less its RSS before the request.
The node authenticates the request with a bearer token; Orthanc runs without
authentication.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.simulate import write_ct_series  # noqa: E402
from tests.helpers import NodeProc, dcmtk_env, free_port, storescu, wait_until  # noqa: E402
from tests.orthanc import ORTHANC  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PASSWORD = "bench password 1"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def start_orthanc(work: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    port, http = free_port(), free_port()
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"), "DicomAet": "ORTHANC", "DicomPort": port,
        "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    proc = subprocess.Popen([ORTHANC, str(cfg)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=open(work / "orthanc.log", "wb"))  # noqa: SIM115

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{http}/dicom-web/studies", timeout=2
                             ).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=60, what="Orthanc DICOMweb")
    return proc, port, http


def retrieve(url: str, headers: dict[str, str], pid: int) -> tuple[float, int, int]:
    """(seconds, bytes, peak RSS growth) of one whole-study retrieve."""
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    got = 0
    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as c, c.stream("GET", url, headers={
            "Accept": ACCEPT, **headers}) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            got += len(chunk)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    return seconds, got, peak[0] - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-") as tmp:
        root = Path(tmp)
        files = write_ct_series(root / "ct", n=args.instances, size=args.size)
        total = sum(f.stat().st_size for f in files)
        import pydicom

        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        web_port = free_port()
        node = NodeProc(root / "node", f"sqlite:///{root / 'node.db'}", overrides={
            "web": {"enabled": True, "host": "127.0.0.1", "port": web_port,
                    "failure_delay_seconds": 0}}).start()
        orthanc, o_port, o_http = start_orthanc(root / "orthanc")
        try:
            from dicomnode.audit import AuditLog
            from dicomnode.database import make_engine, make_sessionmaker
            from dicomnode.web.auth import add_user

            sessions = make_sessionmaker(make_engine(node.db_url))
            with sessions() as s, s.begin():
                add_user(s, AuditLog(sessions), "bench", "admin", PASSWORD, by="bench")
            wait_until(lambda: _up(web_port), timeout=60, what="console")
            token = httpx.post(f"http://127.0.0.1:{web_port}/api/token",
                               data={"username": "bench", "password": PASSWORD}
                               ).json()["access_token"]
            storescu(node.port, files)
            storescu(o_port, files, aec="ORTHANC")
            wait_until(lambda: len(node.instances()) == len(files), timeout=300,
                       what="node indexed the study")
            targets = {
                "dicomnode": (f"http://127.0.0.1:{web_port}/dicomweb/studies/{study}",
                              {"Authorization": f"Bearer {token}"}, node.proc.pid),  # type: ignore[union-attr]
                "orthanc": (f"http://127.0.0.1:{o_http}/dicom-web/studies/{study}", {},
                            orthanc.pid),
            }
            results: dict[str, Any] = {}
            print(f"study: {len(files)} instances, {total / 1e6:.0f} MB of files")
            print(f"{'server':<10} {'best MB/s':>10} {'median MB/s':>12} {'peak RSS +MB':>13}")
            for name, (url, headers, pid) in targets.items():
                retrieve(url, headers, pid)  # warm the page cache and the server
                runs = [retrieve(url, headers, pid) for _ in range(args.runs)]
                rates = [b / s / 1e6 for s, b, _ in runs]
                results[name] = {"mb_s_best": max(rates), "mb_s_median": statistics.median(rates),
                                 "bytes": runs[0][1],
                                 "peak_rss_growth_mb": max(p for _, _, p in runs) / 1e6}
                r = results[name]
                print(f"{name:<10} {r['mb_s_best']:>10.0f} {r['mb_s_median']:>12.0f} "
                      f"{r['peak_rss_growth_mb']:>13.1f}")
            if args.json:
                args.json.write_text(json.dumps({"instances": len(files), "bytes": total,
                                                 "results": results}, indent=2))
        finally:
            node.stop()
            orthanc.terminate()
            orthanc.wait(15)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
