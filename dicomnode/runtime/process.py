"""Process set-up shared by the node's child processes (job processes, receiver workers)."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """Linux: SIGKILL this process if the node dies (a SIGKILLed node must not leave orphan
    jobs or receiver workers running; the restarted node re-runs the jobs)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        log.warning("could not set PR_SET_PDEATHSIG; an orphaned child may outlive the node")


def configure_logging(level: str) -> None:
    """The node's log format, in the node and in every child process."""
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs every PDU at INFO; keep it to warnings unless debugging
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else
                                             logging.WARNING)
