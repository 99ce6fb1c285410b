"""Store stage: durable instance files (tmp → fsync → rename → fsync dir) and the SQL index."""

from dicomnode.store.files import DiskFull, FileStore
from dicomnode.store.service import InstanceStore, Received, Status, StoreResult

__all__ = ["DiskFull", "FileStore", "InstanceStore", "Received", "Status", "StoreResult"]
