"""Package stage: plugin outputs → conformant DICOM (derived series, SEG, TID 1500 SR).

Every object is built from the source datasets (same patient and study, references to the
sources), names its provenance (node, plugin, version: ContributingEquipmentSequence,
AlgorithmIdentification) and gets UIDs derived from the job, so a re-run re-creates the same
SOP Instance UIDs and PACS discards the duplicates. Tests validate every object with dciodvfy.
"""

from dicomnode.package.provenance import Provenance, output_uid

__all__ = ["Provenance", "output_uid"]
