"""The node's own pynetdicom AE, used both ways: the receive stage's SCP and the send stage's SCU.

Every change the node makes to pynetdicom lives in ``node_ae`` and only in the objects the
node's AE creates; a stock ``pynetdicom.AE`` in the same process behaves as upstream
(``docs/pynetdicom.md``). Nothing here knows about the SQL state or the other stages.
"""
