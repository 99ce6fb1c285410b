"""Test helpers: a real node in a subprocess, dcmtk tools, DICOM file utilities."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import generate_uid

DCMTK_BIN = Path("/usr/bin")  # pynetdicom installs its own storescu/echoscu on PATH: avoid them
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        raise RuntimeError(f"dcmtk {tool} not found at {path}: apt-get install dcmtk")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    # without TCP_NODELAY dcmtk stalls ~40 ms per instance (Nagle + delayed ACK)
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, files: Sequence[Path | str], *, flag: str | None = None,
             aec: str = "DICOMNODE", aet: str = "STORESCU", check: bool = True,
             timeout: float = 120, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    # -R: propose exactly the SOP classes of the files (the default list lacks e.g. SEG)
    cmd = [dcmtk("storescu"), "-R", "-aec", aec, "-aet", aet, *extra]
    if flag:
        cmd.append(flag)
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())
    if check and p.returncode != 0:
        raise AssertionError(f"storescu failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def echoscu(port: int, aec: str = "DICOMNODE", aet: str = "ECHOSCU",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aec", aec, "-aet", aet, "-to", "10",
                           "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=timeout, env=dcmtk_env())


def split_part10(path: Path | str) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes after the file meta) of a Part 10 file."""
    raw = Path(path).read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return str(meta.TransferSyntaxUID), raw[fp.tell():]


def with_new_uids(src: Path | str, dst: Path, *, study_uid: str | None = None,
                  series_uid: str | None = None, **attrs: Any) -> pydicom.Dataset:
    """Copy a file with fresh SOP (and study/series) UIDs, keeping its transfer syntax."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def verbatim_scu(ae_title: str) -> Any:
    """A pynetdicom AE whose send_c_store(path) streams the file's dataset bytes unchanged.

    Without STORE_SEND_CHUNKED_DATASET pynetdicom parses and re-encodes the file, which would
    silently repair e.g. a truncated value length before it reaches the node.
    """
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    return AE(ae_title=ae_title)


def wait_until(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class NodeProc:
    """A dicomnode serving in a subprocess, as a hospital would run it."""

    workdir: Path
    db_url: str
    port: int = field(default_factory=free_port)
    overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "dicomnode.yaml"

    @property
    def storage(self) -> Path:
        return self.workdir / "data"

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": self.port,
                     "shutdown_grace_seconds": 10},
            "storage": {"path": str(self.storage), "min_free_mb": 10},
            "database": {"url": self.db_url},
            "assemble": {"quiet_seconds": 1.0, "poll_seconds": 0.2},
            "logging": {"level": "INFO"},
            # the console is off unless a test asks for it (overrides {"web": {"enabled":
            # True, "port": free_port()}}): tests run side by side, port 8080 is one
            "web": {"enabled": False},
        }
        for section, values in self.overrides.items():
            if isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section].update(values)
            else:
                cfg[section] = values  # e.g. routes: a list
        if not cfg.get("routes"):
            # no route, no job: a warm spare (runner.warm_spares, default 1) would only spend
            # ~2 s of CPU on imports beside the test and hold the node's stop up to 2 s more
            cfg["runner"] = {"warm_spares": 0, **(cfg.get("runner") or {})}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(cfg))

    def start(self, wait: bool = True) -> NodeProc:
        self.write_config()
        log = open(self.workdir / "node.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            env={**os.environ, **self.env})
        if wait:
            wait_until(self._ready, timeout=60, interval=0.1, what="node to accept C-ECHO")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited early:\n{self.log()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def log(self) -> str:
        p = self.workdir / "node.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def receiver_workers_ready(self, count: int = 1, timeout: float = 60) -> None:
        """Wait until receiver workers (node.receiver_processes) have said ``count`` times
        in all that they take connections (the node runs connections itself until then)."""
        wait_until(lambda: self.log().count(" ready (pid ") >= count, timeout=timeout,
                   what=f"{count} receiver worker start(s)")

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config",
                            str(self.config_path)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **self.env})
        if check and p.returncode != 0:
            raise AssertionError(f"dicomnode {' '.join(args)} failed ({p.returncode}):\n"
                                 f"{p.stdout}\n{p.stderr}")
        return p

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("studies", "--json").stdout)  # type: ignore[no-any-return]

    def instances(self) -> dict[str, dict[str, Any]]:
        out = {}
        for st in self.studies():
            for se in st["series"]:
                for i in se["instances"]:
                    out[i["sop_instance_uid"]] = {**i, "study_uid": st["study_uid"],
                                                  "study_state": st["state"]}
        return out

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        args = ["audit", "list", "--json", "--limit", "100000"]
        if event:
            args += ["--event", event]
        return json.loads(self.cli(*args).stdout)  # type: ignore[no-any-return]

    def jobs(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("jobs", "--json").stdout)  # type: ignore[no-any-return]

    def completions(self) -> list[dict[str, Any]]:
        from sqlalchemy import create_engine, text

        from dicomnode.database import make_engine
        engine = make_engine(self.db_url) if "sqlite" in self.db_url else create_engine(
            self.db_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect() as c:
                rows = c.execute(text("SELECT level, study_uid, series_uid, revision, "
                                      "num_instances FROM completions ORDER BY id")).mappings()
                return [dict(r) for r in rows]
        finally:
            engine.dispose()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Webhook:
    """A real HTTP receiver for critical-finding notifications, on ``port``; ``received`` holds
    the JSON bodies POSTed to it. ``start()`` later than construction to simulate a receiver
    that is down at first."""

    def __init__(self, port: int | None = None) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.port = port or free_port()
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server_class, self._handler, self._threading = HTTPServer, Handler, threading
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alert"

    def start(self) -> Webhook:
        self._server = self._server_class(("127.0.0.1", self.port), self._handler)
        self._threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def cupy_or_none() -> Any:
    """CuPy when a CUDA device is usable here (a lent GPU), else None: GPU tests skip."""
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        return cp
    except Exception:
        return None
