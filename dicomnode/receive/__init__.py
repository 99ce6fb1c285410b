"""Receive stage: pynetdicom SCP (C-ECHO, C-STORE), access control, PDU guard."""
