"""Cost of an association: dicomnode vs Orthanc (vs dcmtk storescp), side by side, in one run.

A scanner or PACS often opens one association per series or per study, and a C-STORE client
such as dcmtk ``storescu`` proposes ~100 presentation contexts each time. Here ``storescu``
(TCP_NODELAY=1, its default proposals) sends one generated CT slice per association, N times
in a row, to each receiver started fresh; printed: the receiver's CPU time per association
(user + system, the receiver and its child processes, from ``psutil``), wall time per
association, and the ratio node/Orthanc. CPU time is the figure to read: wall time includes
starting ``storescu`` and the VM's noise.

    python bench/associations.py [--associations 30] [--rounds 3]

Synthetic data (the ingest bench's phantom). Needs: dcmtk, orthanc (Debian), psutil, numpy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import DCMTK, ENV, RECEIVERS, Receiver, generate_study


def cpu_seconds(pid: int) -> float:
    total = 0.0
    root = psutil.Process(pid)
    for p in (root, *root.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def run_round(cls: type[Receiver], root: Path, files: list[Path]) -> tuple[float, float]:
    """(CPU ms, wall ms) per association for ``len(files)`` associations of one instance."""
    work = Path(tempfile.mkdtemp(prefix=f"{cls.name}-", dir=root))
    r = cls(work)
    r.start()
    try:
        assert r.proc is not None
        time.sleep(1.0)  # a running receiver, not its start-up
        c0, t0 = cpu_seconds(r.proc.pid), time.perf_counter()
        for f in files:
            subprocess.run([str(DCMTK / "storescu"), "-aec", "DICOMNODE", "-aet", "SCU",
                            "127.0.0.1", str(r.port), str(f)], env=ENV, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        time.sleep(0.5)  # association-closing work finishes after storescu has gone
        cpu = cpu_seconds(r.proc.pid) - c0
        if r.count() != len(files):
            raise RuntimeError(f"{cls.name} stored {r.count()} of {len(files)} instances")
        return 1000 * cpu / len(files), 1000 * wall / len(files)
    finally:
        r.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--associations", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicomnode-bench-"))
    try:
        files = generate_study(root / "study", args.associations)
        print(f"{args.associations} associations × 1 instance (512² CT, synthetic); "
              f"{args.rounds} rounds\n")
        cpu: dict[str, list[float]] = {c.name: [] for c in RECEIVERS}
        wall: dict[str, list[float]] = {c.name: [] for c in RECEIVERS}
        for _ in range(args.rounds):
            for cls in RECEIVERS:  # interleaved, so drift hits everyone alike
                c, w = run_round(cls, root, files)
                cpu[cls.name].append(c)
                wall[cls.name].append(w)
        med = {n: statistics.median(v) for n, v in cpu.items()}
        for n in cpu:
            print(f"  {n:10s} CPU {med[n]:6.1f} ms per association  "
                  f"(rounds: {', '.join(f'{x:.1f}' for x in cpu[n])});  "
                  f"wall {statistics.median(wall[n]):6.1f} ms")
        print(f"\n  ratio node/orthanc (CPU per association) = "
              f"{med['dicomnode'] / med['orthanc']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
