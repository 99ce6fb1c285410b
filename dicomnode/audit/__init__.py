"""Audit: append-only, hash-chained events in SQL, in the DICOM PS3.15 A.5 vocabulary."""

from dicomnode.audit.events import EventKind, Outcome
from dicomnode.audit.log import AuditLog, VerifyResult, verify_chain

__all__ = ["AuditLog", "EventKind", "Outcome", "VerifyResult", "verify_chain"]
