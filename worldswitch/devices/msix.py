"""MSI-X (PCI Local Bus 3.0, section 6.8.2): a capability in configuration space, a vector table and
a pending-bit array in a BAR. A device raises vector N; whether that becomes a message now, or a
pending bit delivered when the guest unmasks, is decided here.

Delivery itself is the VMM's, given at construction as an MsiSink: `deliver(vector, address, data)`
(an irqfd bound to a GSI that KVM routes to the message; see vmm/platform/irqroute.py), and
`program(vector, address, data)`, which tells it that the guest changed an entry so that the route
can follow.
"""

from __future__ import annotations

import struct
import threading

from .base import MsiSink

CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
ENTRY_SIZE = 16
VECTOR_MASKED = 1 << 0
NO_VECTOR = 0xFFFF  # virtio's "no vector"


class MsixCapability:
    def __init__(self, vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int,
                 sink: MsiSink) -> None:
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X supports 1 to 2048 vectors")
        self.vectors = vectors
        self.table = bytearray(ENTRY_SIZE * vectors)
        for vector in range(vectors):  # every vector starts masked
            struct.pack_into("<I", self.table, vector * ENTRY_SIZE + 12, VECTOR_MASKED)
        self.pending = [False] * vectors
        self.control = vectors - 1
        self.table_bir = (table_offset & ~7) | table_bar
        self.pba_bir = (pba_offset & ~7) | pba_bar
        self.sink = sink
        self.delivered = 0
        self._lock = threading.Lock()

    def capability_body(self) -> bytes:
        """Message control, table offset/BIR, PBA offset/BIR (the bytes after ID and next)."""
        return struct.pack("<HII", self.control, self.table_bir, self.pba_bir)

    @staticmethod
    def capability_writable() -> bytes:
        return bytes([0x00, 0xC0]) + bytes(8)  # only enable and function mask are writable

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    def control_written(self, control: int) -> None:
        with self._lock:
            self.control = (self.control & ~(CONTROL_ENABLE | CONTROL_FUNCTION_MASK)) | (
                control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK))
            ready = self._deliverable_pending()
        for vector in ready:
            self._send(vector)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        address_low, address_high, data, control = struct.unpack_from("<IIII", self.table, vector * ENTRY_SIZE)
        return address_low | (address_high << 32), data, bool(control & VECTOR_MASKED)

    # --- the table and PBA, as the guest sees them in the BAR ---------------------------------

    def table_read(self, offset: int, size: int) -> int:
        if offset + size > len(self.table):
            return 0
        with self._lock:
            return int.from_bytes(self.table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if offset + size > len(self.table) or size not in (4, 8):
            return  # the spec allows dword and qword accesses only
        vector = offset // ENTRY_SIZE
        with self._lock:
            self.table[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            address, data, masked = self.entry(vector)
            ready = self._deliverable_pending()
        self.sink.program(vector, address, data)
        for pending_vector in ready:
            self._send(pending_vector)

    def pba_read(self, offset: int, size: int) -> int:
        with self._lock:
            bits = sum(1 << i for i, pending in enumerate(self.pending) if pending)
        return (bits >> (8 * offset)) & ((1 << (8 * size)) - 1)

    # --- raising vectors ----------------------------------------------------------------------

    def notify(self, vector: int) -> bool:
        """Raise `vector`: send the message, or leave it pending if masked. False if the vector
        does not exist (virtio's NO_VECTOR, or a guest's nonsense)."""
        if not 0 <= vector < self.vectors:
            return False
        with self._lock:
            _address, _data, masked = self.entry(vector)
            if masked or self.control & CONTROL_FUNCTION_MASK:
                self.pending[vector] = True
                return True
        self._send(vector)
        return True

    def _deliverable_pending(self) -> list[int]:
        """Called with the lock held: pending vectors that are no longer masked, now cleared."""
        if not self.enabled or self.control & CONTROL_FUNCTION_MASK:
            return []
        ready = [v for v, pending in enumerate(self.pending) if pending and not self.entry(v)[2]]
        for vector in ready:
            self.pending[vector] = False
        return ready

    def _send(self, vector: int) -> None:
        address, data, _ = self.entry(vector)
        self.delivered += 1
        self.sink.deliver(vector, address, data)
