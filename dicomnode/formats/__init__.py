"""Data formats the node reads beside plain images: DICOM-CT-PD raw projections (``ctpd``).

Plugins reach these through :mod:`dicomnode.plugin`, the public API, never directly.
"""
