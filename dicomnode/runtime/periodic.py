"""A background thread that runs one pass every few seconds until stopped.

Used by the stages that poll SQL (assembler, router): a failed pass is logged and retried on
the next tick, so a database hiccup never ends a stage for good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, interval: float, run_once: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.run_once = run_once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("%s pass failed; retrying", self.name)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
