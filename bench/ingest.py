"""Ingest benchmark: dicomnode vs dcmtk storescp vs Orthanc, side by side, in one run.

The same generated CT study (default 300 × 512², 16-bit, ~150 MB; synthetic data: a noisy
ellipse phantom, so sizes are real but content is not clinical) is pushed with dcmtk ``storescu``
over loopback (TCP_NODELAY=1) into each receiver; each round starts every receiver fresh on an
empty storage folder. Prints median seconds per receiver and the ratios node/Orthanc and
node/storescp, then the same with N concurrent senders, then node peak RSS for a small and a
full-size study (memory must not grow with study size).

    python bench/ingest.py [--instances 300] [--rounds 3] [--senders 4]
                           [--receiver-processes 1] [--json out.json]

Receivers as configured: dicomnode with its defaults (SQLite WAL synchronous=FULL, fsync of
file and directories before each acknowledgement); Orthanc (Debian package) with its defaults
(SyncStorageArea true, SQLite index); storescp writing files (no fsync: it has none).
Needs: dcmtk, orthanc (Debian), psutil, numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from dicomnode.simulate import write_ct_series

DCMTK = Path("/usr/bin")
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early ({proc.args})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def generate_study(out: Path, n: int, size: int = 512) -> list[Path]:
    """A synthetic CT series (dicomnode.simulate's ellipse phantom), one file per slice."""
    return write_ct_series(out, n=n, size=size, series_description="BENCH SYNTHETIC CT",
                           patient_id="BENCH001")


# --- receivers -----------------------------------------------------------------------------

class Receiver:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_idle(pid: int, timeout: float = 30.0) -> None:
    """Wait until the node and its children (the warm job process importing plugins) are idle:
    the bench measures a running node, not its start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for p in procs:  # the first call only starts each process's measurement
            p.cpu_percent(interval=None)
        time.sleep(0.5)
        if sum(p.cpu_percent(interval=None) for p in procs) < 5.0:
            return


class Node(Receiver):
    name = "dicomnode"
    receiver_processes = 1  # node.receiver_processes (--receiver-processes)

    def start(self) -> None:
        cfg = self.work / "node.yaml"
        cfg.write_text(json.dumps({
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": self.port,
                     "receiver_processes": self.receiver_processes},
            "storage": {"path": str(self.work / "data"), "min_free_mb": 100},
            # the node as deployed: its web console runs beside the listener
            "web": {"port": free_port()},
            "logging": {"level": "WARNING"}}))
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config",
                                      str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / "node.log", "wb"))  # noqa: SIM115
        wait_port(self.port, self.proc)
        self.cfg = cfg
        wait_idle(self.proc.pid)

    def count(self) -> int:
        out = subprocess.run([sys.executable, "-m", "dicomnode", "studies", "--json",
                              "--config", str(self.cfg)], capture_output=True, text=True,
                             check=True).stdout
        return sum(se["num_instances"] for st in json.loads(out) for se in st["series"])


class StoreSCP(Receiver):
    name = "storescp"

    def start(self) -> None:
        (self.work / "out").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(DCMTK / "storescp"), "-aet", "DICOMNODE", "-od",
                                      str(self.work / "out"), str(self.port)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        return len(list((self.work / "out").iterdir()))


class Orthanc(Receiver):
    name = "orthanc"

    def start(self) -> None:
        self.http = free_port()
        cfg = self.work / "orthanc.json"
        cfg.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "index"), "DicomAet": "DICOMNODE",
            "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "StorageCompression": False, "Plugins": []}))
        # dcmtk inside Orthanc reads TCP_NODELAY from its environment too: without it every
        # instance stalls ~40 ms on Nagle + delayed ACK and the comparison would be unfair
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / "orthanc.log", "wb"))  # noqa: SIM115
        wait_port(self.port, self.proc)
        wait_port(self.http, self.proc)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics") as r:
            return int(json.load(r)["CountInstances"])


RECEIVERS: list[type[Receiver]] = [Node, Orthanc, StoreSCP]


def push(port: int, groups: list[list[Path]]) -> float:
    """Send each group over its own association, all at once; seconds until all are done.

    Starts from a clean page cache (``sync``): storescp leaves ~150 MB of dirty pages behind
    (it never fsyncs), and whoever runs next would otherwise pay for their write-back.
    """
    os.sync()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([str(DCMTK / "storescu"), "-aec", "DICOMNODE", "-aet", f"SCU{k}",
                               "127.0.0.1", str(port), *map(str, g)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for k, g in enumerate(groups)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t0


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.p = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.p.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run_round(cls: type[Receiver], root: Path, groups: list[list[Path]],
              measure: Callable[[Receiver], Any] | None = None) -> tuple[float, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"{cls.name}-", dir=root))
    r = cls(work)
    r.start()
    try:
        extra = None
        if measure is not None:
            assert r.proc is not None
            with RssSampler(r.proc.pid) as s:
                secs = push(r.port, groups)
            extra = s.peak
        else:
            secs = push(r.port, groups)
        n = r.count()
        expected = sum(len(g) for g in groups)
        if n != expected:
            raise RuntimeError(f"{cls.name} stored {n} of {expected} instances")
        return secs, extra
    finally:
        r.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--receiver-processes", type=int, default=1,
                    help="the node's node.receiver_processes (peak RSS: the node process)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    Node.receiver_processes = args.receiver_processes

    root = Path(tempfile.mkdtemp(prefix="dicomnode-bench-"))
    try:
        files = generate_study(root / "study", args.instances)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} × 512² CT, {mb:.0f} MB (synthetic phantom); "
              f"{os.cpu_count()} CPU(s); {args.rounds} rounds; node.receiver_processes "
              f"{args.receiver_processes}\n")
        results: dict[str, Any] = {"instances": len(files), "megabytes": round(mb, 1)}
        k = args.senders
        for label, groups in (("1 association", [files]),
                              (f"{k} concurrent senders", [files[i::k] for i in range(k)])):
            times: dict[str, list[float]] = {c.name: [] for c in RECEIVERS}
            for _ in range(args.rounds):
                for cls in RECEIVERS:  # interleaved, so drift hits everyone alike
                    times[cls.name].append(run_round(cls, root, groups)[0])
            med = {n: statistics.median(t) for n, t in times.items()}
            print(f"== {label}")
            for n, t in times.items():
                print(f"  {n:10s} median {med[n]:6.2f} s  ({mb / med[n]:6.1f} MB/s)  "
                      f"rounds: {', '.join(f'{x:.2f}' for x in t)}")
            print(f"  ratio node/orthanc  = {med['dicomnode'] / med['orthanc']:.2f}  "
                  "(goal <= 1.0)")
            print(f"  ratio node/storescp = {med['dicomnode'] / med['storescp']:.2f}  "
                  "(stretch goal <= 2.0)\n")
            results[label] = {"median_s": med, "rounds": times}

        small = files[: max(1, len(files) // 3)]
        _, peak_small = run_round(Node, root, [small], measure=lambda r: None)
        _, peak_full = run_round(Node, root, [files], measure=lambda r: None)
        print("== node memory (peak RSS while ingesting)")
        print(f"  {len(small):4d} instances: {peak_small / 2**20:6.1f} MiB")
        print(f"  {len(files):4d} instances: {peak_full / 2**20:6.1f} MiB  "
              f"(growth {(peak_full - peak_small) / 2**20:+.1f} MiB for "
              f"{len(files) / len(small):.0f}× the data)")
        results["rss_mib"] = {len(small): peak_small / 2**20, len(files): peak_full / 2**20}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
