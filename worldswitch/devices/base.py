"""What a device is given by the VMM: an interrupt line (or MSI vectors) to drive and guest memory to read. Devices
depend on these protocols only, never on a vCPU, a file descriptor or the KVM binding."""

from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    """One interrupt input of the machine (an ISA IRQ of the in-kernel PIC/IOAPIC, or a fake)."""

    def set_level(self, asserted: bool) -> None: ...


class MsiSink(Protocol):
    """Where a function's MSI-X vectors go: `program` when the guest writes a table entry (so the
    VMM's route follows it), `deliver` when a vector fires (an irqfd bound to the route)."""

    def program(self, vector: int, address: int, data: int) -> None: ...

    def deliver(self, vector: int, address: int, data: int) -> None: ...


class GuestRam(Protocol):
    """The bounds-checked guest-physical accessor (worldswitch.memory.guest.GuestMemory)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def read_cstring(self, gpa: int, max_length: int) -> bytes: ...
