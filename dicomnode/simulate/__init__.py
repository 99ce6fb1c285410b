"""Synthetic studies for tests, benchmarks and demos (no patient data anywhere).

``series`` writes plain CT series (the header every simulator shares), ``ct`` DICOM-CT-PD raw
projections, ``head`` and ``chest`` studies with ground truth for the detectors.
"""

from dicomnode.simulate.series import (
    ORIENTATIONS,
    SlicePlan,
    ct_dataset,
    ellipse_phantom,
    slice_plan,
    write_ct_series,
)

__all__ = ["ORIENTATIONS", "SlicePlan", "ct_dataset", "ellipse_phantom", "slice_plan",
           "write_ct_series"]
