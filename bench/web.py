"""Web console benchmark: the audit page's filtered queries and the CSV export, through the
real app (``dicomnode web`` in its own process, bearer token, HTTP over loopback), with 10,000
and 1,000,000 audit events (10,000 studies) in SQLite and in PostgreSQL, side by side.

    python bench/web.py [--sizes 10000 1000000] [--db sqlite postgres] [--requests 50]
                        [--cache build/bench-web] [--json out.json]

The trail is a valid hash chain computed here in Python (the node's own ``row_hash``; the
``audit_head`` row is set to its end, so ``verify_chain`` passes and the console appends to
it) and bulk-inserted: sqlite3 ``executemany`` in one transaction, PostgreSQL ``COPY``. It is
built once per (database, size) and reused on later runs (SQLite file under ``--cache``,
PostgreSQL database ``dicomnode_bench_web_<size>``); the build time is printed. The mix is
that of a busy node: associations, instances received (each naming one of 10,000 studies),
completions, routes, jobs, deliveries, logins and study views by 50 users, a few refusals;
timestamps evenly spread over 90 days.

Measured per (database, size): p50 and p95 over ``--requests`` requests of a page of 50
(``/api/audit?…&limit=50``) filtered by event type, by user, by a one-day date range and by
study (a random value for each request; each request also writes its own ``audit-viewed``
event, as in production), then an unfiltered CSV export (rows/s) and the console process's
peak RSS (VmHWM) before and after it. Goals: p95 < 100 ms, export ≥ 50,000 rows/s, page cost
flat from 10k to 1M, memory flat during the export. Needs: a local PostgreSQL for ``postgres``
(``DICOMNODE_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.audit.events import EventKind  # noqa: E402
from dicomnode.audit.log import GENESIS, canonical_json, row_hash, study_uids  # noqa: E402

PG_ADMIN = os.environ.get("DICOMNODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
PASSWORD = "bench password 1"
STUDIES = 10_000
USERS = [f"user{i:02d}" for i in range(50)]
AES = ["CT_SCANNER_1", "CT_SCANNER_2", "MR_ROOM_3", "US_4", "PACS_MAIN"]
START = datetime(2026, 9, 1, tzinfo=UTC)
SPAN = timedelta(days=90)
COLUMNS = ("seq", "ts", "event_code", "event_name", "event_type", "action", "outcome",
           "source_aet", "source_host", "dest_aet", "user", "detail", "prev_hash", "hash")
QUOTED = ",".join(f'"{c}"' for c in COLUMNS)
# (kind, weight): the mix of a busy node
MIX = [("association-accepted", 20), ("instances-received", 20), ("series-completed", 15),
       ("study-completed", 8), ("route-matched", 8), ("job-finished", 8),
       ("results-sent", 8), ("user-login", 4), ("study-viewed", 6), ("store-refused", 1),
       ("login-failed", 1), ("send-failed", 1)]
KINDS = {k.type_name: k for k in EventKind}


def study_uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{1000000 + i}"


def _event(rng: random.Random, kind: str, n: int) -> dict[str, Any]:
    """(columns without seq/ts/hashes) of one synthetic event."""
    st = study_uid(rng.randrange(STUDIES))
    ae = rng.choice(AES[:4])
    out: dict[str, Any] = {"source_aet": "", "source_host": "", "dest_aet": "", "user": "",
                           "outcome": 0}
    d: dict[str, Any]
    if kind == "association-accepted":
        out.update(source_aet=ae, source_host=f"10.1.0.{AES.index(ae)}")
        d = {"association_id": n, "contexts": 3}
    elif kind == "instances-received":
        out.update(source_aet=ae, source_host=f"10.1.0.{AES.index(ae)}")
        d = {"instances": 300, "failed": 0, "duplicates": 0, "refusals": {},
             "studies": {st: [st + ".1"]}, "ended": "released"}
    elif kind in ("series-completed", "study-completed"):
        d = {"study_uid": st, "series_uid": st + ".1", "revision": 1, "instances": 300}
    elif kind == "route-matched":
        d = {"study_uid": st, "routes": ["ct-recon"], "jobs": [n]}
    elif kind == "job-finished":
        d = {"job_id": n, "route": "ct-recon", "state": "succeeded", "seconds": 12.5}
    elif kind in ("results-sent", "send-failed"):
        out["dest_aet"] = "PACS_MAIN"
        d = {"job_id": n, "destination": "pacs", "instances": 3}
        if kind == "send-failed":
            out["outcome"] = 8
            d.update(state="pending", reason="Connection refused")
    elif kind in ("user-login", "login-failed"):
        out.update(user=rng.choice(USERS), source_host="10.2.0.9")
        d = {"via": "cookie"}
        if kind == "login-failed":
            out["outcome"] = 4
            d["reason"] = "wrong password"
    elif kind == "study-viewed":
        out.update(user=rng.choice(USERS), source_host="10.2.0.9")
        d = {"study_uid": st}
    else:  # store-refused
        out.update(source_aet=ae, source_host=f"10.1.0.{AES.index(ae)}", outcome=4)
        d = {"status": "0xA700", "reason": "out of resources"}
    out["detail"] = canonical_json(d)
    out["_studies"] = study_uids(d)
    return out


def generate(n: int, chunk: int = 20_000) -> Iterator[tuple[list[tuple[Any, ...]],
                                                            list[tuple[str, int]]]]:
    """The chain in chunks: (audit_events rows, audit_event_studies rows)."""
    rng = random.Random(21)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    prev = GENESIS
    step = SPAN / n
    rows: list[tuple[Any, ...]] = []
    studies: list[tuple[str, int]] = []
    for seq in range(1, n + 1):
        kind = rng.choices(kinds, weights)[0]
        ev = _event(rng, kind, seq)
        k = KINDS[kind]
        c = {"seq": seq, "ts": (START + step * seq).isoformat(timespec="microseconds"),
             "event_code": k.code, "event_name": k.meaning, "event_type": kind,
             "action": k.action, "outcome": ev["outcome"], "source_aet": ev["source_aet"],
             "source_host": ev["source_host"], "dest_aet": ev["dest_aet"],
             "user": ev["user"], "detail": ev["detail"], "prev_hash": prev}
        c["hash"] = prev = row_hash(c)
        rows.append(tuple(c[x] for x in COLUMNS))
        studies += [(u, seq) for u in ev["_studies"]]
        if len(rows) >= chunk:
            yield rows, studies
            rows, studies = [], []
    if rows:
        yield rows, studies


def _head(n: int) -> str:
    last = ""
    for rows, _ in generate(n):
        last = rows[-1][-1]
    return last


# -- building the databases ---------------------------------------------------------------------


def build_sqlite(path: Path, n: int) -> str:
    from dicomnode.database import upgrade

    url = f"sqlite:///{path}"
    if path.exists():
        with sqlite3.connect(path) as c:
            if c.execute("SELECT seq FROM audit_head").fetchone()[0] >= n:
                upgrade(url)
                return url
        path.unlink()
    t0 = time.perf_counter()
    upgrade(url)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA synchronous=OFF")
    c.execute("BEGIN")
    last = GENESIS
    for rows, studies in generate(n):
        c.executemany(f"INSERT INTO audit_events ({','.join(COLUMNS)}) VALUES "
                      f"({','.join('?' * len(COLUMNS))})", rows)
        c.executemany("INSERT INTO audit_event_studies (study_uid, seq) VALUES (?, ?)",
                      studies)
        last = rows[-1][-1]
    c.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (n, last))
    c.execute("COMMIT")
    c.execute("ANALYZE")
    c.close()
    print(f"  built SQLite {n:,} events in {time.perf_counter() - t0:.0f} s ({path})",
          flush=True)
    return url


def build_postgres(n: int) -> str:
    import psycopg

    from dicomnode.database import upgrade

    name = f"dicomnode_bench_web_{n}"
    base = PG_ADMIN.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                               (name,)).fetchone()
        if exists:
            with psycopg.connect(url) as c:
                row = c.execute("SELECT seq FROM audit_head").fetchone()
            if row and row[0] >= n:
                upgrade(url)
                return url
            admin.execute(f'DROP DATABASE "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    t0 = time.perf_counter()
    upgrade(url)
    with psycopg.connect(url) as c:
        last = GENESIS
        with c.cursor() as cur:
            for rows, studies in generate(n):
                with cur.copy(f"COPY audit_events ({QUOTED}) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
                with cur.copy("COPY audit_event_studies (study_uid, seq) FROM STDIN") as cp:
                    for s in studies:
                        cp.write_row(s)
                last = rows[-1][-1]
            cur.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", (n, last))
        c.commit()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")
    print(f"  built PostgreSQL {n:,} events in {time.perf_counter() - t0:.0f} s ({name})",
          flush=True)
    return url


# -- measuring through the app ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Console:
    """``dicomnode web`` on ``url`` in its own process, with a user 'auditor'."""

    def __init__(self, url: str, work: Path) -> None:
        from dicomnode.audit import AuditLog
        from dicomnode.database import make_engine, make_sessionmaker
        from dicomnode.web.auth import add_user

        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with sessions() as s, s.begin():
            from sqlalchemy import select

            from dicomnode.schema import User
            if s.execute(select(User.id).where(User.name == "auditor")).first() is None:
                add_user(s, AuditLog(sessions), "auditor", "auditor", PASSWORD, by="bench")
        engine.dispose()
        self.port = _free_port()
        cfg = work / "node.yaml"
        cfg.write_text(json.dumps({"storage": {"path": str(work / "data"), "min_free_mb": 1},
                                   "database": {"url": url},
                                   "logging": {"level": "WARNING"},
                                   "web": {"host": "127.0.0.1", "port": self.port}}))
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "web", "--config",
                                      str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                         [str(ROOT), os.environ.get("PYTHONPATH", "")])})
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                httpx.get(f"{self.base}/api/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(f"{self.base}/api/token", data={"username": "auditor",
                                                       "password": PASSWORD}, timeout=30)
        r.raise_for_status()
        self.client = httpx.Client(base_url=self.base, timeout=600, headers={
            "Authorization": f"Bearer {r.json()['access_token']}"})

    def hwm_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


def _params(kind: str, rng: random.Random, n: int) -> dict[str, Any]:
    if kind == "event":
        return {"event": rng.choice(["store-refused", "study-completed", "send-failed",
                                     "user-login", "job-finished"])}
    if kind == "user":
        return {"user": rng.choice(USERS)}
    if kind == "date range":
        day = START + timedelta(days=rng.randrange(89))
        return {"since": day.isoformat(), "until": (day + timedelta(days=1)).isoformat()}
    return {"study": study_uid(rng.randrange(STUDIES))}


def measure(url: str, n: int, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        con = Console(url, Path(tmp))
        try:
            rng = random.Random(n)
            for kind in ("event", "user", "date range", "study"):
                for _ in range(5):  # warm-up (caches, connections)
                    con.client.get("/api/audit", params={**_params(kind, rng, n),
                                                         "limit": 50}).raise_for_status()
                times, shown = [], 0
                for _ in range(requests):
                    p = {**_params(kind, rng, n), "limit": 50}
                    t0 = time.perf_counter()
                    r = con.client.get("/api/audit", params=p)
                    times.append(1000 * (time.perf_counter() - t0))
                    r.raise_for_status()
                    shown += len(r.json()["items"])
                times.sort()
                out[kind] = {"p50_ms": statistics.median(times),
                             "p95_ms": times[int(0.95 * (len(times) - 1))],
                             "rows_per_page": shown / requests}
            before = con.hwm_mib()
            t0 = time.perf_counter()
            rows = -1  # the header line
            with con.client.stream("GET", "/api/audit.csv") as r:
                r.raise_for_status()
                for chunk in r.iter_bytes(1 << 16):
                    rows += chunk.count(b"\r\n")
            seconds = time.perf_counter() - t0
            out["export"] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                             "rss_before_mib": before, "rss_peak_mib": con.hwm_mib()}
        finally:
            con.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgres"],
                    choices=["sqlite", "postgres"])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "bench-web")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, Any]] = {}
    for db in a.db:
        for n in a.sizes:
            print(f"{db} {n:,}: building / reusing …", flush=True)
            url = (build_sqlite(a.cache / f"audit-{n}.sqlite3", n) if db == "sqlite"
                   else build_postgres(n))
            print(f"{db} {n:,}: measuring …", flush=True)
            results.setdefault(db, {})[n] = measure(url, n, a.requests)
    print()
    sizes = a.sizes
    head = " | ".join(f"{n:,} events: p50 / p95 ms" for n in sizes)
    print(f"| database | page of 50 by | {head} |")
    print("|---|---|" + "---|" * len(sizes))
    for db, by in results.items():
        for kind in ("event", "user", "date range", "study"):
            cells = " | ".join(f"{by[n][kind]['p50_ms']:.1f} / {by[n][kind]['p95_ms']:.1f}"
                               for n in sizes)
            print(f"| {db} | {kind} | {cells} |")
    print()
    print("| database | events | CSV rows/s | export s | console RSS before → peak MiB |")
    print("|---|---|---|---|---|")
    for db, by in results.items():
        for n in sizes:
            e = by[n]["export"]
            print(f"| {db} | {e['rows']:,} | {e['rows_per_s']:,.0f} | {e['seconds']:.1f} | "
                  f"{e['rss_before_mib']:.0f} → {e['rss_peak_mib']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
