"""dicomnode: a DICOM node that sits beside a hospital PACS.

Data flows one way; each subpackage is one stage of that path:
receive → store → assemble → (route → run → package → send) · audit everywhere.
"""

__version__ = "0.1.0"
