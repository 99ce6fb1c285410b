"""The audit vocabulary: DICOM PS3.15 A.5 event IDs, and the node's event types mapped onto them.

PS3.15 has no event for "study complete"; that one uses the private coding scheme ``99DCMNODE``
(documented in ``docs/audit.md``) so a consumer that knows only DCM codes can still filter it out.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class Outcome(IntEnum):
    """PS3.15 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class EventKind(Enum):
    """Node event type → (type name, event code, code meaning, PS3.15 EventActionCode).

    The type name is part of the value so that no two members are Enum aliases of each other.
    """

    APPLICATION_START = ("application-start", "110100", "Application Activity", "E")
    APPLICATION_STOP = ("application-stop", "110100", "Application Activity", "E")
    # Security Alert, event type (110126, DCM, "Node Authentication")
    ASSOCIATION_ACCEPTED = ("association-accepted", "110113", "Security Alert", "E")
    ASSOCIATION_REJECTED = ("association-rejected", "110113", "Security Alert", "E")
    ASSOCIATION_ABORTED = ("association-aborted", "110113", "Security Alert", "E")
    PROTOCOL_VIOLATION = ("protocol-violation", "110113", "Security Alert", "E")
    INSTANCES_RECEIVED = ("instances-received", "110104", "DICOM Instances Transferred", "C")
    STORE_REFUSED = ("store-refused", "110104", "DICOM Instances Transferred", "C")
    DUPLICATE_CONFLICT = ("duplicate-conflict", "110104", "DICOM Instances Transferred", "C")
    DICOMWEB_QUERY = ("dicomweb-query", "110112", "Query", "E")  # QIDO-RS
    DICOMWEB_RETRIEVE = ("dicomweb-retrieve", "110106", "Export", "R")  # WADO-RS
    # private coding scheme 99DCMNODE: PS3.15 has no event for these
    STUDY_COMPLETED = ("study-completed", "DN0001", "Study Completed", "E")
    SERIES_COMPLETED = ("series-completed", "DN0002", "Series Completed", "E")
    INSTANCES_SWEPT = ("instances-swept", "110100", "Application Activity", "E")
    RECEIVER_PROCESS_DIED = ("receiver-process-died", "110100", "Application Activity", "E")
    ROUTE_MATCHED = ("route-matched", "DN0003", "Routed", "E")
    NO_ROUTE = ("no-route", "DN0004", "Not Routed", "E")
    JOB_FINISHED = ("job-finished", "DN0005", "Job Finished", "E")
    RESULTS_SENT = ("results-sent", "110106", "Export", "R")
    SEND_FAILED = ("send-failed", "110106", "Export", "R")
    CRITICAL_NOTIFIED = ("critical-notified", "DN0006", "Critical Finding Notified", "E")
    # a job or delivery moved between states other than by finishing (claimed, queued again
    # after a lost lease or a restart, cancelled, retried by an admin): who did it is recorded
    JOB_STATE = ("job-state", "DN0007", "Job State Changed", "U")
    DELIVERY_STATE = ("delivery-state", "DN0008", "Delivery State Changed", "U")
    # people at the console and the REST API (dicomnode.web): user is always their name
    USER_LOGIN = ("user-login", "110114", "User Authentication", "E")  # 110122 Login
    USER_LOGOUT = ("user-logout", "110114", "User Authentication", "E")  # 110123 Logout
    LOGIN_FAILED = ("login-failed", "110114", "User Authentication", "E")
    ACCOUNT_LOCKED = ("account-locked", "110113", "Security Alert", "E")
    ACCESS_DENIED = ("access-denied", "110113", "Security Alert", "E")
    USER_CHANGED = ("user-changed", "110113", "Security Alert", "U")  # 110137 attributes changed
    STUDY_VIEWED = ("study-viewed", "110103", "DICOM Instances Accessed", "R")
    AUDIT_VIEWED = ("audit-viewed", "110101", "Audit Log Used", "R")
    AUDIT_EXPORTED = ("audit-exported", "110106", "Export", "R")
    AUDIT_VERIFIED = ("audit-verified", "110101", "Audit Log Used", "E")
    STUDY_FORCED_COMPLETE = ("study-forced-complete", "DN0010", "Study Completion Forced", "U")
    # a radiologist accepted, rejected or amended an AI finding; its verdict SR is queued
    FINDING_REVIEWED = ("finding-reviewed", "DN0009", "Finding Reviewed", "U")

    @property
    def type_name(self) -> str:
        """The stable, human-readable event type stored in the row (e.g. ``store-refused``)."""
        return str(self.value[0])

    @property
    def code(self) -> str:
        return str(self.value[1])

    @property
    def meaning(self) -> str:
        return str(self.value[2])

    @property
    def action(self) -> str:
        return str(self.value[3])
