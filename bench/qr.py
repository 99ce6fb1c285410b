"""Query/Retrieve side by side: dicomnode and Orthanc (Debian, 1.10) holding the same data.

    python bench/qr.py [--studies 10000] [--instances 300] [--size 512] [--rounds 20]

Both receive the same instances with dcmtk storescu: ``--studies`` one-instance studies
(8×8 pixels, names from a list of 20 surnames, dates over 2015–2024) and one CT study of
``--instances`` slices (size² pixels). Then, against each, with a pynetdicom SCU (one
association per query, as a workstation does):

* C-FIND Study Root latency, p50/p95 over ``--rounds``: a wildcard name (``SMITH*``, 1/20 of
  the studies) and a date range (one year, ~1/10);
* C-MOVE of the CT study to a dcmtk ``storescp`` (time from C-MOVE-RQ to the final response;
  every instance checked on disk), and the node's peak RSS while it moves (sampled every
  20 ms, with its receiver processes).

Ratios are node ÷ Orthanc (below 1: the node is faster).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomnode.simulate import write_ct_series
from tests.helpers import NodeProc, dcmtk, dcmtk_env, free_port, storescu
from tests.orthanc import Orthanc

SURNAMES = ["SMITH", "JONES", "BROWN", "TAYLOR", "WILSON", "DAVIES", "EVANS", "THOMAS",
            "JOHNSON", "ROBERTS", "WALKER", "WRIGHT", "ROBINSON", "THOMPSON", "WHITE",
            "HUGHES", "EDWARDS", "GREEN", "HALL", "WOOD"]


def small_studies(out: Path, n: int) -> list[Path]:
    out.mkdir(parents=True)
    files = []
    pixels = np.zeros((8, 8), dtype=np.uint16).tobytes()
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName = f"{SURNAMES[i % 20]}^P{i}"
        ds.PatientID = f"BENCH{i:06d}"
        ds.StudyDate = f"{2015 + (i // 7) % 10}{1 + i % 12:02d}{1 + i % 28:02d}"
        ds.StudyTime = "120000"
        ds.AccessionNumber = f"A{i}"
        ds.Modality = "OT"
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        p = out / f"s{i:06d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def push(port: int, aec: str, files: list[Path], batch: int = 2000) -> None:
    for i in range(0, len(files), batch):
        storescu(port, files[i:i + batch], aec=aec, timeout=1200)


def find_times(port: int, aec: str, keys: dict[str, str], rounds: int) -> tuple[list[float],
                                                                               int]:
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(FIND)
    times, n = [], 0
    for _ in range(rounds):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.PatientName = ""
        ds.StudyDate = ""
        for k, v in keys.items():
            setattr(ds, k, v)
        t0 = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        n = 0
        for status, ident in assoc.send_c_find(ds, FIND):
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
                n += 1
        assoc.release()
        times.append(time.perf_counter() - t0)
    return times, n


def move_time(port: int, aec: str, study_uid: str, dest: str) -> tuple[float, int]:
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(MOVE)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    t0 = time.perf_counter()
    final = None
    for status, _ in assoc.send_c_move(ds, dest, MOVE):
        if status is not None:
            final = status
    elapsed = time.perf_counter() - t0
    assoc.release()
    completed = int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
    return elapsed, completed


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return int(sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]))
    except psutil.Error:
        return 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=10000)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sink-pdu", type=int, default=0,
                    help="storescp's maximum PDU length (default: dcmtk's 16 KiB)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-qr-"))
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    sink_port, orthanc_port = free_port(), free_port()
    node = NodeProc(workdir=work / "node", db_url=f"sqlite:///{work / 'node' / 'i.sqlite3'}",
                    overrides={"modalities": {
                        "bench": {"ae_title": "BENCHSCU", "host": "127.0.0.1", "port": 1,
                                  "allow": ["find", "move"]},
                        "sink": {"ae_title": "STORESCP", "host": "127.0.0.1",
                                 "port": sink_port}},
                        "query": {"max_results": 100000}})
    node.start()
    # Orthanc needs the C-MOVE destination and the caller among its modalities too
    orthanc = Orthanc(work / "orthanc", port=orthanc_port,
                      modalities={"sink": ["STORESCP", "127.0.0.1", sink_port],
                                  "bench": ["BENCHSCU", "127.0.0.1", 1]})
    sink_dir = work / "sink"
    sink_dir.mkdir()
    pdu = ["-pdu", str(args.sink_pdu)] if args.sink_pdu else []
    sink = subprocess.Popen([dcmtk("storescp"), "-v", "-aet", "STORESCP", "+xa", *pdu, "-od",
                             str(sink_dir), str(sink_port)], env=dcmtk_env(),
                            stdout=open(work / "storescp.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    try:
        t0 = time.perf_counter()
        files = small_studies(work / "small", args.studies)
        study_uid = generate_uid()
        ct = write_ct_series(work / "ct", n=args.instances, size=args.size,
                             study_uid=study_uid, patient_id="CTBENCH",
                             patient_name="CT^Bench")
        print(f"generated {len(files)} studies + {len(ct)} CT slices "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        for name, port, aec in (("node", node.port, "DICOMNODE"),
                                ("orthanc", orthanc.port, "ORTHANC")):
            t0 = time.perf_counter()
            push(port, aec, files + ct)
            print(f"pushed to {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        time.sleep(2)
        queries = {"wildcard name": {"PatientName": "SMITH*"},
                   "date range": {"StudyDate": "20200101-20201231"}}
        for label, keys in queries.items():
            row: dict[str, Any] = {}
            for name, port, aec in (("node", node.port, "DICOMNODE"),
                                    ("orthanc", orthanc.port, "ORTHANC")):
                times, n = find_times(port, aec, keys, args.rounds)
                row[name] = {"p50": statistics.median(times), "p95": pct(times, 0.95),
                             "matches": n}
            row["ratio_p50"] = row["node"]["p50"] / row["orthanc"]["p50"]
            out[f"find {label}"] = row
            print(f"C-FIND {label}: node p50 {row['node']['p50'] * 1000:.1f} ms p95 "
                  f"{row['node']['p95'] * 1000:.1f} ms ({row['node']['matches']} matches) | "
                  f"Orthanc p50 {row['orthanc']['p50'] * 1000:.1f} ms p95 "
                  f"{row['orthanc']['p95'] * 1000:.1f} ms ({row['orthanc']['matches']}) | "
                  f"ratio p50 {row['ratio_p50']:.2f}", flush=True)
        move: dict[str, Any] = {}
        for name, port, aec in (("node", node.port, "DICOMNODE"),
                                ("orthanc", orthanc.port, "ORTHANC")):
            for f in sink_dir.iterdir():
                f.unlink()
            peak = [tree_rss(node.proc.pid)] if node.proc else [0]
            stop = threading.Event()

            def sample(pk: list[int] = peak, ev: threading.Event = stop) -> None:
                while not ev.is_set():
                    if node.proc is not None:
                        pk.append(tree_rss(node.proc.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            before = peak[0]
            sampler.start()
            elapsed, completed = move_time(port, aec, study_uid, "STORESCP")
            stop.set()
            sampler.join()
            arrived = len(list(sink_dir.iterdir()))
            move[name] = {"seconds": elapsed, "completed": completed, "arrived": arrived}
            if name == "node":
                move[name]["rss_before_mib"] = before / 2**20
                move[name]["rss_peak_mib"] = max(peak) / 2**20
        move["ratio"] = move["node"]["seconds"] / move["orthanc"]["seconds"]
        out["move"] = move
        print(f"C-MOVE {args.instances} CT: node {move['node']['seconds']:.2f} s "
              f"({move['node']['arrived']} arrived; RSS {move['node']['rss_before_mib']:.0f}"
              f" → peak {move['node']['rss_peak_mib']:.0f} MiB) | Orthanc "
              f"{move['orthanc']['seconds']:.2f} s ({move['orthanc']['arrived']}) | ratio "
              f"{move['ratio']:.2f}", flush=True)
    finally:
        sink.terminate()
        orthanc.stop()
        node.stop()
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
