"""Process machinery every stage may use: allocator tuning (``memory``), polling threads
(``periodic``). Nothing here knows about DICOM or the SQL state."""
