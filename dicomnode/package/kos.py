"""KeyImages → Key Object Selection Document (highdicom), so PACS viewers open the study on the
images a plugin flagged. The title comes from CID 7010 (e.g. 113000 "Of Interest")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes

from dicomnode.package.provenance import MANUFACTURER, Provenance, output_uid
from dicomnode.package.seg import pd_code
from dicomnode.plugin import KeyImages, PluginError


def key_images_to_kos(key_images: KeyImages, sources: Sequence[Any], prov: Provenance,
                      series_number: int, index: int = 0) -> hd.ko.KeyObjectSelectionDocument:
    by_uid = {str(d.SOPInstanceUID): d for d in sources}
    missing = [u for u in key_images.sop_instance_uids if u not in by_uid]
    if missing or not key_images.sop_instance_uids:
        raise PluginError(f"key images must be input instances; not inputs: {missing[:3]}")
    referenced = [by_uid[u] for u in key_images.sop_instance_uids]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(prov.job_id, "device", prov.plugin_name), name=prov.plugin_name,
            manufacturer_name=MANUFACTURER, model_name=prov.plugin_name))
    content = hd.ko.KeyObjectSelection(
        document_title=pd_code(key_images.title), referenced_objects=referenced,
        observer_device_context=device,
        description=f"{prov.plugin_name} {prov.plugin_version}"[:1024])
    return hd.ko.KeyObjectSelectionDocument(
        evidence=referenced, content=content,
        series_instance_uid=output_uid(prov.job_id, "kos", index),
        series_number=series_number,
        sop_instance_uid=output_uid(prov.job_id, "kos", index, "instance"),
        instance_number=1, manufacturer=MANUFACTURER)
