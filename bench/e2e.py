"""End-to-end latency: last instance acknowledged → last result stored in Orthanc.

A generated CT study (default 300 × 512², synthetic ellipse phantom with a 700 HU "bone"
insert) is pushed with dcmtk storescu into the node, configured with ``quiet_seconds: 2`` and
the route of the pipelines issue (reformat + surface, hu_min 300) sending to Orthanc (Debian).
Prints the total and its breakdown from the node's own records (SQL timestamps and the job's
timings): assemble (quiet period), route, job start (process spawn), load, each plugin,
package, send. CPU only.

    python bench/e2e.py [--instances 300] [--size 512] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dicomnode.simulate import write_ct_series

sys.path.insert(0, str(Path(__file__).parent))
from ingest import ENV, ORTHANC, free_port, wait_port


def iso(ts: Any) -> float:
    if isinstance(ts, str):
        return datetime.fromisoformat(ts).timestamp()
    return float(ts)


CT_3D = [{"name": "ct-3d", "match": {"Modality": "CT"},
          "pipeline": [{"plugin": "reformat"}, {"plugin": "surface", "params": {"hu_min": 300}}],
          "send_to": ["pacs"]}]


def run_once(root: Path, files: list[Path], expected_series: int,
             derived_series: str = "classic", routes: list[dict[str, Any]] | None = None,
             quiet_seconds: float = 2, source_references: str = "images") -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=root))
    o_port, o_http, n_port = free_port(), free_port(), free_port()
    (work / "orthanc.json").write_text(json.dumps({
        "Name": "pacs", "StorageDirectory": str(work / "os"), "IndexDirectory": str(work / "oi"),
        "DicomAet": "ORTHANC", "DicomPort": o_port, "HttpPort": o_http,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "Plugins": []}))
    orthanc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = work / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": n_port},
        "storage": {"path": str(work / "data"), "min_free_mb": 100},
        "assemble": {"quiet_seconds": quiet_seconds, "poll_seconds": 0.1},
        "runner": {"poll_seconds": 0.1},
        "web": {"port": free_port()},  # the console runs beside the listener, as deployed
        "package": {"derived_series": derived_series, "source_references": source_references},
        "logging": {"level": "WARNING"},
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": o_port}},
        "routes": routes or CT_3D}))
    node = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "wb"))  # noqa: SIM115
    try:
        wait_port(n_port, node)
        wait_port(o_http, orthanc)
        os.sync()
        subprocess.run(["/usr/bin/storescu", "-aec", "DICOMNODE", "127.0.0.1", str(n_port),
                        *map(str, files)], env=ENV, check=True, capture_output=True)
        t_ack = time.time()
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{o_http}/series") as r:
                if len(json.load(r)) >= expected_series:
                    break
            if time.time() - t_ack > 600:
                raise RuntimeError("results never arrived; see " + str(work / "node.log"))
            time.sleep(0.05)
        t_done = time.time()

        def cli(*args: str) -> Any:
            out = subprocess.run([sys.executable, "-m", "dicomnode", *args, "--json",
                                  "--config", str(cfg)], capture_output=True, text=True,
                                 check=True).stdout
            return json.loads(out)

        [job] = cli("jobs")
        audit = cli("audit", "list")
        completed = next(e for e in audit if e["event_type"] == "study-completed")
        finished = next(e for e in audit if e["event_type"] == "job-finished")
        sends = sorted((e for e in audit if e["event_type"] == "results-sent"),
                       key=lambda e: iso(e["ts"]))
        failed = [e for e in audit if e["event_type"] == "send-failed"]
        timings = finished["detail"]["timings"]
        t_complete = iso(completed["ts"])
        t_start, t_finish = iso(job["started_at"]), iso(job["finished_at"])
        parts = {
            "assemble (quiet + poll)": t_complete - t_ack,
            "route → job start (incl. process spawn)": t_start - t_complete,
            "load": timings.get("load", 0.0),
        }
        for k, v in timings.items():
            if k.startswith("plugin:"):
                parts[k.replace("plugin:", "plugin ")] = v
        parts["package"] = timings.get("package", 0.0)
        inside = sum(v for k, v in timings.items())
        parts["job process overhead"] = (t_finish - t_start - inside)
        # each step's results are sent while later steps run: only what is left after the
        # job ended adds to the total
        parts["send, after the job ended"] = t_done - t_finish
        parts["(rest)"] = (t_done - t_ack) - sum(parts.values())
        parts["TOTAL last ack → last result in Orthanc"] = t_done - t_ack
        for e in sends:
            d = e["detail"]
            begun = iso(e["ts"]) - float(d["seconds"]) - t_start
            parts[f"  (step {d.get('step')}: {d['instances']} objects sent in "
                  f"{float(d['seconds']):.2f} s, from job start + {begun:.2f} s)"] = 0.0
        if failed:
            parts[f"  ({len(failed)} send attempt(s) FAILED and were retried)"] = 0.0
        return parts
    finally:
        node.terminate()
        orthanc.terminate()
        node.wait(30)
        orthanc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--derived-series", choices=["classic", "enhanced"], default="classic",
                    help="package.derived_series (enhanced: one multi-frame object per plane)")
    ap.add_argument("--source-references", choices=["images", "series"], default="images",
                    help="package.source_references (series: the source series once per "
                    "slice instead of every source image)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicomnode-e2e-"))
    try:
        files = write_ct_series(root / "study", n=args.instances, size=args.size,
                                series_description="E2E SYNTHETIC CT")
        print(f"study: {args.instances} × {args.size}² synthetic CT; quiet_seconds 2; "
              f"reformat + surface (hu_min 300) → Orthanc; derived series "
              f"{args.derived_series}, source references {args.source_references}; "
              f"CPU ({os.cpu_count()} cores)\n")
        for r in range(args.rounds):
            parts = run_once(root, files, expected_series=5,
                             derived_series=args.derived_series,
                             source_references=args.source_references)
            print(f"round {r + 1}")
            for k, v in parts.items():
                print(f"  {k}" if k.startswith("  ") else f"  {k:42s} {v:7.2f} s")
            total = parts["TOTAL last ack → last result in Orthanc"]
            print(f"  goal ≤ quiet + 5 s = 7.00 s: {'met' if total <= 7 else 'NOT met'}\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
