"""Assemble stage: decide when a study (or series) is complete."""

from dicomnode.assemble.assembler import Assembler

__all__ = ["Assembler"]
