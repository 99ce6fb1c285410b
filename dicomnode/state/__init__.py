"""Every state change of a job, delivery, notification, association or finding, in one place.

The states themselves are defined once in :mod:`dicomnode.schema` (``JobState``,
``DeliveryState``, …); this module holds which moves are legal and :func:`transition`, the one
function that makes a move: it refuses an illegal one (:class:`IllegalTransition`, nothing
written), sets the state and appends the audit event that says who did it (:class:`Actor`: an
operating-system user at the CLI, a logged-in user in the web console, or a named component of
the node), all in the caller's transaction. The runner, the senders, the notifier, the CLI and
later the web console and the Celery workers all move states through here, so a move that the
state machine does not allow cannot happen anywhere.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.schema import (
    Association,
    AssociationState,
    Delivery,
    DeliveryState,
    Finding,
    FindingStatus,
    Job,
    JobState,
    Notification,
    NotificationState,
)

__all__ = ["MOVES", "Actor", "IllegalTransition", "Stateful", "check_move", "transition"]

Stateful = Job | Delivery | Notification | Association | Finding

J, D, N, A, F = JobState, DeliveryState, NotificationState, AssociationState, FindingStatus

MOVES: dict[type[Any], dict[StrEnum, frozenset[StrEnum]]] = {
    Job: {
        # claimed by a runner; cancelled before it ran
        J.QUEUED: frozenset({J.RUNNING, J.CANCELLED}),
        # finished one way or the other; queued again (retry, lease lost, node restarted);
        # an admin asked to stop it
        J.RUNNING: frozenset({J.SUCCEEDED, J.FAILED, J.NOT_APPLICABLE, J.DEAD, J.QUEUED,
                              J.CANCELLING}),
        # the runner stopped it; it finished before the runner could
        J.CANCELLING: frozenset({J.CANCELLED, J.SUCCEEDED, J.FAILED, J.NOT_APPLICABLE,
                                 J.DEAD}),
        J.FAILED: frozenset({J.QUEUED}),  # an admin's retry
        J.DEAD: frozenset({J.QUEUED}),  # an admin's retry
        J.SUCCEEDED: frozenset(),
        J.NOT_APPLICABLE: frozenset(),
        J.CANCELLED: frozenset(),
    },
    Delivery: {
        D.PENDING: frozenset({D.SENT, D.DEAD, D.CANCELLED}),
        D.DEAD: frozenset({D.PENDING}),  # an admin's retry
        D.SENT: frozenset(),
        D.CANCELLED: frozenset(),
    },
    Notification: {
        N.PENDING: frozenset({N.SENT, N.FAILED}),
        N.SENT: frozenset(),
        N.FAILED: frozenset(),
    },
    Association: {
        A.OPEN: frozenset({A.RELEASED, A.ABORTED, A.INTERRUPTED}),
        A.RELEASED: frozenset(),
        A.ABORTED: frozenset(),
        A.INTERRUPTED: frozenset(),
    },
    Finding: {
        # a radiologist's one decision (dicomnode/review/verdict.py); final: a change of mind
        # is a new report in PACS, not a second verdict from here
        F.PENDING: frozenset({F.ACCEPTED, F.REJECTED, F.AMENDED}),
        F.ACCEPTED: frozenset(),
        F.REJECTED: frozenset(),
        F.AMENDED: frozenset(),
    },
}

# the audit event of a move when the caller names none
_DEFAULT_EVENT: dict[type[Any], EventKind] = {
    Job: EventKind.JOB_STATE,
    Delivery: EventKind.DELIVERY_STATE,
    Notification: EventKind.CRITICAL_NOTIFIED,
    Association: EventKind.ASSOCIATION_ABORTED,
    Finding: EventKind.FINDING_REVIEWED,
}
_ID_KEY = {Job: "job_id", Delivery: "delivery_id", Notification: "notification_id",
           Association: "association_id", Finding: "finding_id"}
# the column holding the state, where it is not ``state``
_STATE_ATTR: dict[type[Any], str] = {Finding: "status"}


class IllegalTransition(ValueError):
    """A move the state machine does not allow (e.g. cancelling a job that already
    succeeded). Nothing was written; the message says what the row's state is."""


@dataclass(frozen=True)
class Actor:
    """Who moved a state: a person (``human``: their login name goes into the audit event's
    user field) or a component of the node (named ``component@host:pid``)."""

    name: str
    human: bool = False

    @classmethod
    def user(cls, name: str) -> Actor:
        """A person, by the name they logged in with (web console) or their OS user (CLI)."""
        if not name:
            raise ValueError("a person acting on the node must be named")
        return cls(name, human=True)

    @classmethod
    def os_user(cls) -> Actor:
        """The operating-system user running this command (``dicomnode jobs retry``, …)."""
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            name = f"uid {os.getuid()}"
        return cls.user(name)

    @classmethod
    def system(cls, component: str) -> Actor:
        """A component of the node (runner, sender, notifier, recovery) on this machine."""
        return cls(f"{component}@{socket.gethostname()}:{os.getpid()}")

    def __str__(self) -> str:
        return f"user {self.name}" if self.human else self.name


def check_move(kind: type[Any], current: StrEnum | str, to: StrEnum, ident: object = "") -> None:
    """Raise :class:`IllegalTransition` unless ``current → to`` is a legal move of ``kind``
    (a row class: Job, Delivery, Notification, Association, Finding)."""
    table = MOVES[kind]
    state_enum = type(to)
    try:
        now = state_enum(current)
    except ValueError:
        raise IllegalTransition(f"{kind.__name__.lower()} {ident}: unknown state "
                                f"{current!r}") from None
    if to not in table[now]:
        allowed = ", ".join(sorted(table[now])) or "none: it is final"
        raise IllegalTransition(f"{kind.__name__.lower()} {ident} is {now}: it cannot become "
                                f"{to} (allowed: {allowed})")


def transition(session: Session, row: Stateful, to: StrEnum, *, by: Actor, audit: AuditLog,
               event: EventKind | None = None, outcome: Outcome | None = None,
               **detail: Any) -> StrEnum:
    """Move ``row`` to ``to`` in ``session``'s transaction and audit it; returns the state it
    had. Raises :class:`IllegalTransition` (nothing written) for a move the machine forbids.

    ``event`` and ``outcome`` default to the aggregate's state-change event and success;
    ``detail`` goes into the audit event beside the row's id, the old and the new state and
    who moved it."""
    kind = type(row)
    attr = _STATE_ATTR.get(kind, "state")
    before: StrEnum = getattr(row, attr)
    check_move(kind, before, to, row.id)
    setattr(row, attr, to)  # the right enum for the row: checked above
    moved: dict[str, Any] = {_ID_KEY[kind]: row.id, "from": str(before), "to": str(to),
                             "by": str(by), **detail}
    audit.record(event or _DEFAULT_EVENT[kind], Outcome.SUCCESS if outcome is None else outcome,
                 session=session, user=by.name if by.human else "", **moved)
    return before
