"""Guest RAM: anonymous host mappings registered as KVM memory slots, and the one bounds-checked
accessor through which every guest-physical read and write in worldswitch goes."""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Iterator, Protocol, TypeVar

from ..errors import GuestMemoryError
from ..record import record


class SlotTable(Protocol):
    """What registers guest RAM with the hypervisor (driver.kvm.Vm): memory knows no more of it."""

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None: ...

PAGE_SIZE = 4096
T = TypeVar("T", bound=ctypes.Structure)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


@record
class MemoryRegion:
    """One contiguous range of guest RAM backed by one host mapping (one KVM memory slot)."""

    slot: int
    guest_phys_addr: int
    size: int
    backing: mmap.mmap
    host_addr: int

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size


class GuestMemory:
    """Guest RAM as a set of non-overlapping regions. Every access is checked against them: an
    address or length a guest supplied can never reach host memory outside guest RAM."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        """`ranges` is a list of (guest_phys_addr, size) pairs, page aligned and non-overlapping."""
        self.regions: list[MemoryRegion] = []
        self._views: list[memoryview] = []
        for slot, (gpa, size) in enumerate(sorted(ranges)):
            if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise GuestMemoryError(f"memory range {gpa:#x}+{size:#x} is not page aligned")
            if self.regions and gpa < self.regions[-1].end:
                raise GuestMemoryError(f"memory range {gpa:#x}+{size:#x} overlaps another")
            # MAP_NORESERVE: guest RAM costs host memory only where the guest touches it.
            try:
                backing = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
            except OSError as error:
                self.close()
                raise GuestMemoryError(f"this host cannot map {size >> 20} MiB of guest memory: {error.strerror}") from None
            host_addr = ctypes.addressof(ctypes.c_char.from_buffer(backing))
            self.regions.append(MemoryRegion(slot, gpa, size, backing, host_addr))
        self._views = [memoryview(region.backing) for region in self.regions]
        # (start, end, view) per region: the accessor's hot loop reads nothing else.
        self._spans = [(r.guest_phys_addr, r.end, view) for r, view in zip(self.regions, self._views)]

    @property
    def size(self) -> int:
        return sum(region.size for region in self.regions)

    @property
    def top(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.regions[-1].end if self.regions else 0

    def resident_bytes(self) -> int:
        """Guest RAM backed by host memory right now (pages the guest or the VMM touched)."""
        total = 0
        for region in self.regions:
            pages = region.size // PAGE_SIZE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(region.host_addr, region.size, vector) == 0:
                total += sum(byte & 1 for byte in bytes(vector)) * PAGE_SIZE
        return total

    def register(self, vm: SlotTable) -> None:
        for region in self.regions:
            vm.set_user_memory_region(region.slot, region.guest_phys_addr, region.size, region.host_addr)

    def close(self) -> None:
        self._spans = []
        for view in self._views:
            view.release()
        self._views = []
        for region in self.regions:
            try:
                region.backing.close()
            except BufferError:
                pass  # a ctypes view still exports it; the mapping goes with the process
        self.regions = []

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    # --- the checked accessor -----------------------------------------------------------------

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        """(region index, offset) for [gpa, gpa+length), or GuestMemoryError."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest access {gpa:#x}+{length:#x}")
        for index, region in enumerate(self.regions):
            if region.guest_phys_addr <= gpa < region.end:
                if gpa + length > region.end:
                    break
                return index, gpa - region.guest_phys_addr
        else:
            if length == 0 and gpa == self.top:
                return len(self.regions) - 1, self.regions[-1].size
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        if gpa < 0 or length < 0:
            return False
        end = gpa + length
        for start, stop, _ in self._spans:  # a loop, not any(): this runs for every virtqueue buffer
            if start <= gpa and end <= stop:
                return True
        return False

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of [gpa, gpa+length) for device DMA."""
        if gpa >= 0 and length >= 0:
            end = gpa + length
            for start, stop, view in self._spans:
                if start <= gpa and end <= stop:
                    return view[gpa - start : end - start]
        self._locate(gpa, length)  # raises the precise error
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in guest RAM")

    def unpack(self, layout: struct.Struct, gpa: int) -> tuple:  # type: ignore[type-arg]
        """A struct read straight out of guest RAM, without an intermediate copy."""
        return layout.unpack_from(self.view(gpa, layout.size))

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.view(gpa, length)[:] = bytes([byte]) * length

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_obj(self, gpa: int, ctype: type[T]) -> T:
        return ctype.from_buffer_copy(self.view(gpa, ctypes.sizeof(ctype)))

    def write_obj(self, gpa: int, obj: ctypes.Structure | ctypes.Array) -> None:  # type: ignore[type-arg]
        self.write(gpa, bytes(obj))

    def read_cstring(self, gpa: int, max_length: int) -> bytes:
        """A NUL-terminated string of at most max_length bytes (without the NUL), clipped to RAM."""
        index, offset = self._locate(gpa, 0)
        region = self.regions[index]
        end = min(offset + max_length, region.size)
        chunk = bytes(self._views[index][offset:end])
        nul = chunk.find(b"\0")
        return chunk if nul < 0 else chunk[:nul]
