"""Who made an object, and the deterministic UIDs of what a job makes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.dataset import Dataset

from dicomnode import __version__

MANUFACTURER = "dicomnode"


_NAMESPACE = uuid.UUID("0f6d3c39-9a4e-5d2b-8c1e-6b7a2f4e9d10")


def output_uid(job_id: str, *parts: object) -> str:
    """A UID determined by the job and the object's role in it.

    A re-run of the same job yields the same UIDs, so a receiver that already has an object
    recognises the re-sent copy as a duplicate. Built as ``2.25.<UUID>`` (PS3.5 B.2) from a
    name-based (version 5) UUID. Not pydicom's ``generate_uid(prefix=None, entropy_srcs=…)``:
    with no prefix it ignores the entropy and returns a random UID.
    """
    name = "\x1f".join(["dicomnode", job_id, *map(str, parts)])
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


@dataclass(frozen=True)
class Provenance:
    job_id: str
    plugin_name: str
    plugin_version: str
    algorithm_family: tuple[str, str, str] | None = ("123105", "DCM", "Histogram Analysis")
    node_ae_title: str = "DICOMNODE"
    node_version: str = __version__
    created: datetime | None = None

    @property
    def when(self) -> datetime:
        return self.created or datetime.now(UTC)

    @property
    def software_versions(self) -> list[str]:
        return [f"dicomnode {self.node_version}", f"{self.plugin_name} {self.plugin_version}"]

    def contributing_equipment(self, description: str) -> Dataset:
        """One ContributingEquipmentSequence item: this node as processing equipment."""
        item = Dataset()
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = self.plugin_name[:64]
        item.SoftwareVersions = self.software_versions
        item.StationName = self.node_ae_title
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator = "109102", "DCM"
        purpose.CodeMeaning = "Processing Equipment"
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.ContributionDateTime = self.when.strftime("%Y%m%d%H%M%S.%f+0000")
        item.ContributionDescription = description[:64]
        return item
