"""What ingest costs the receiver per instance: dicomnode vs Orthanc, side by side, in one run.

Wall time on a shared 2-core VM drifts by ±20 % (sometimes 3×) between minutes, which is the
size of the differences being looked for. CPU time and thread switches drift much less, and
dividing the receiver's CPU by the senders' CPU (the same dcmtk ``storescu`` work every round)
cancels most of what remains. For each receiver, fresh each round, the same generated study is
pushed by N concurrent ``storescu`` (TCP_NODELAY=1); printed per instance (medians):

- receiver CPU (user + system of it and its child processes, exited threads included:
  ``psutil``),
- context switches of all its threads (``perf stat -e context-switches``; skipped if ``perf``
  is missing or not allowed),
- senders' CPU, and the ratio receiver CPU ÷ senders' CPU,

and the ratio node/Orthanc of that last figure.

    python bench/cpu.py [--instances 300] [--senders 4] [--rounds 5] [--receiver-processes 2]

Synthetic data (the ingest bench's phantom). Needs: dcmtk, orthanc (Debian), psutil, numpy;
``perf`` (linux-perf) for the context switches.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.associations import cpu_seconds
from bench.ingest import DCMTK, ENV, Node, Orthanc, Receiver, generate_study


def run_round(cls: type[Receiver], root: Path, groups: list[list[Path]],
              perf: str | None) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"{cls.name}-", dir=root))
    r = cls(work)
    r.start()
    try:
        assert r.proc is not None
        time.sleep(0.5)
        top = psutil.Process(r.proc.pid)
        pids = [top.pid] + [c.pid for c in top.children(recursive=True)]
        counter = None
        if perf is not None:
            counter = subprocess.Popen(
                [perf, "stat", "-x", ",", "-e", "context-switches", "-o",
                 str(work / "perf.txt"), "-p", ",".join(map(str, pids))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        os.sync()
        c0 = cpu_seconds(top.pid)
        senders = [subprocess.Popen([str(DCMTK / "storescu"), "-aec", "DICOMNODE", "-aet",
                                     f"SCU{k}", "127.0.0.1", str(r.port), *map(str, g)],
                                    env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for k, g in enumerate(groups)]
        sender_cpu = 0.0
        for p in senders:
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                raise RuntimeError(f"storescu exited {p.returncode}")
            sender_cpu += usage.ru_utime + usage.ru_stime
        time.sleep(0.3)  # what the last response started (association close) finishes
        receiver_cpu = cpu_seconds(top.pid) - c0
        switches = float("nan")
        if counter is not None:
            counter.send_signal(2)
            counter.wait()
            m = re.search(r"^([\d.]+),,context-switches", (work / "perf.txt").read_text(), re.M)
            if m:
                switches = float(m.group(1))
        n = sum(len(g) for g in groups)
        if r.count() != n:
            raise RuntimeError(f"{cls.name} stored {r.count()} of {n} instances")
        return {"cpu": receiver_cpu * 1000 / n, "switches": switches / n,
                "senders": sender_cpu * 1000 / n, "ratio": receiver_cpu / sender_cpu}
    finally:
        r.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--receiver-processes", type=int, default=2)
    a = ap.parse_args()
    Node.receiver_processes = a.receiver_processes
    perf = shutil.which("perf")
    if perf is not None and subprocess.run([perf, "stat", "-e", "context-switches", "true"],
                                           capture_output=True).returncode != 0:
        perf = None
    root = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    try:
        files = generate_study(root / "study", a.instances)
        groups = [files[k::a.senders] for k in range(a.senders)]
        results: dict[str, list[dict[str, float]]] = {Node.name: [], Orthanc.name: []}
        for _ in range(a.rounds):
            for cls in (Node, Orthanc):  # interleaved: drift hits both alike
                results[cls.name].append(run_round(cls, root, groups, perf))
        print(f"{a.instances} × 512² CT (synthetic), {a.senders} sender(s), {a.rounds} rounds, "
              f"node.receiver_processes {a.receiver_processes}; medians per instance")
        med: dict[str, dict[str, float]] = {}
        for name, rows in results.items():
            med[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            m = med[name]
            each = ", ".join(f"{r['ratio']:.2f}" for r in rows)
            print(f"  {name:10s} CPU {m['cpu']:5.2f} ms  context switches {m['switches']:5.1f}  "
                  f"senders' CPU {m['senders']:4.2f} ms  CPU ÷ senders' {m['ratio']:4.2f}  "
                  f"(rounds: {each})")
        print(f"  ratio node/orthanc (CPU ÷ senders' CPU) = "
              f"{med[Node.name]['ratio'] / med[Orthanc.name]['ratio']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
