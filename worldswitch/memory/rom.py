"""Read-only guest memory: a firmware image mapped where the CPU looks for it (the top of 4 GiB),
as a KVM memory slot the guest can read and execute but not write (KVM_MEM_READONLY; a write
becomes an MMIO exit, which nobody claims)."""

from __future__ import annotations

import ctypes
import mmap

from ..errors import GuestMemoryError
from .guest import PAGE_SIZE, SlotTable

KVM_MEM_READONLY = 1 << 1


class Rom:
    def __init__(self, guest_phys_addr: int, data: bytes) -> None:
        if guest_phys_addr % PAGE_SIZE or not data or len(data) % PAGE_SIZE:
            raise GuestMemoryError(f"ROM {guest_phys_addr:#x}+{len(data):#x} is not page aligned")
        self.guest_phys_addr = guest_phys_addr
        self.size = len(data)
        self.backing = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.backing[:] = data
        self.host_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.backing))

    def register(self, vm: SlotTable, slot: int) -> None:
        vm.set_user_memory_region(slot, self.guest_phys_addr, self.size, self.host_addr, KVM_MEM_READONLY)

    def read(self, gpa: int, length: int) -> bytes:
        """What the guest reads there (for the trap-and-emulate path's code fetches)."""
        if not self.guest_phys_addr <= gpa <= gpa + length <= self.guest_phys_addr + self.size:
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in the ROM")
        return bytes(self.backing[gpa - self.guest_phys_addr : gpa - self.guest_phys_addr + length])
