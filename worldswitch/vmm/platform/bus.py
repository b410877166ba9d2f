"""The port-I/O and MMIO buses: an exit's address is looked up here and handed to the device that
owns it, with the offset inside the device's range.

Devices register by address range; overlapping ranges are refused. Lookups sit on the hot path of
every I/O exit, so the port bus keeps a dense table (ports are few) and the MMIO bus a sorted
list searched with bisect behind a one-entry cache.

A guest may access any address with any size from 1 to 8 bytes (KVM splits wider and page-crossing
accesses into such pieces, so 3, 5, 6 and 7 happen too). A device sees only accesses that are a
power of two, naturally aligned, no wider than it accepts (`max_size`) and inside its range: the bus
splits anything else into such pieces, lowest address first, and hands each piece to whoever owns
it (as a bus bridge would: QEMU's memory core does the same). What nobody owns reads as all ones
and drops writes.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Callable

from ...errors import BusError
from ...record import field, record

ReadFn = Callable[[int, int], int]  # (offset, size) -> value
WriteFn = Callable[[int, int, int], None]  # (offset, size, value)


def all_ones(size: int) -> int:
    """What an undriven bus reads as, `size` bytes wide."""
    return (1 << (8 * size)) - 1


@record(frozen=True, slots=True)
class BusRange:
    name: str
    base: int
    length: int
    read: ReadFn
    write: WriteFn
    max_size: int = 8  # the widest access the device takes (ECAM: a dword)
    end: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.base + self.length)

    def takes(self, address: int, size: int) -> bool:
        """Whether the device takes this access as it is: a power of two, naturally aligned, not
        wider than it accepts, inside its range."""
        return size <= self.max_size and not size & (size - 1) and not address & (size - 1) and address + size <= self.end


class UnmappedAccessLog:
    """Counts accesses nobody owns and warns about them at a bounded rate: a guest that scans or
    hammers unmapped addresses must not flood the user's terminal or slow the VMX down."""

    def __init__(self, kind: str, warn: Callable[[str], None] | None, burst: int = 5, interval_s: float = 1.0) -> None:
        self.kind = kind
        self.warn = warn
        self.burst = burst
        self.interval_s = interval_s
        self.count = 0
        self.suppressed = 0
        self._next_warning = 0.0
        self._lock = threading.Lock()

    def record(self, address: int, size: int, write: bool, value: int) -> None:
        with self._lock:
            self.count += 1
            if self.warn is None:
                return
            now = time.monotonic()
            if self.count > self.burst and now < self._next_warning:
                self.suppressed += 1
                return
            suppressed, self.suppressed = self.suppressed, 0
            self._next_warning = now + self.interval_s
        what = f"wrote {value:#x} ({size} bytes) to" if write else f"read {size} bytes from"
        more = f" ({suppressed} similar accesses not shown)" if suppressed else ""
        self.warn(f"guest {what} unmapped {self.kind} {address:#x}; ignored{more}")


class _Bus:
    def __init__(self, kind: str, limit: int, warn: Callable[[str], None] | None) -> None:
        self.kind = kind
        self.limit = limit
        self.ranges: list[BusRange] = []
        self.unmapped = UnmappedAccessLog(kind, warn)

    def _check(self, name: str, base: int, length: int) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(f"{name}: {self.kind} range {base:#x}+{length:#x} is invalid")
        for other in self.ranges:
            if base < other.end and other.base < base + length:
                raise BusError(
                    f"{name}: {self.kind} range {base:#x}-{base + length - 1:#x} overlaps {other.name} "
                    f"at {other.base:#x}-{other.end - 1:#x}"
                )

    def owner(self, address: int) -> BusRange | None:
        for entry in self.ranges:
            if entry.base <= address < entry.end:
                return entry
        return None

    def _find(self, address: int) -> BusRange | None:
        raise NotImplementedError

    def read(self, address: int, size: int) -> int:
        entry = self._find(address)
        if entry is not None and entry.takes(address, size):
            return entry.read(address - entry.base, size)
        owners = self._owners(address, size)
        if not any(owners):
            self.unmapped.record(address, size, False, 0)
            return all_ones(size)
        value = 0
        for at, piece, owner in self._pieces(address, owners):
            part = owner.read(at - owner.base, piece) if owner is not None else all_ones(piece)
            value |= (part & all_ones(piece)) << (8 * (at - address))
        return value

    def write(self, address: int, size: int, value: int) -> None:
        entry = self._find(address)
        if entry is not None and entry.takes(address, size):
            entry.write(address - entry.base, size, value & all_ones(size))
            return
        owners = self._owners(address, size)
        if not any(owners):
            self.unmapped.record(address, size, True, value)
            return
        for at, piece, owner in self._pieces(address, owners):
            if owner is not None:  # the bytes nobody owns are dropped
                owner.write(at - owner.base, piece, (value >> (8 * (at - address))) & all_ones(piece))

    def _owners(self, address: int, size: int) -> list[BusRange | None]:
        return [self._find(address + i) for i in range(size)]

    @staticmethod
    def _pieces(address: int, owners: list[BusRange | None]) -> list[tuple[int, int, BusRange | None]]:
        """(address, size, owner) pieces of a split access: each one owner's (or nobody's), a power of
        two aligned where it starts, no wider than the owner takes."""
        out: list[tuple[int, int, BusRange | None]] = []
        index = 0
        while index < len(owners):
            owner = owners[index]
            at = address + index
            piece = owner.max_size if owner is not None else 8
            while piece > len(owners) - index or at & (piece - 1) or any(o is not owner for o in owners[index : index + piece]):
                piece >>= 1
            out.append((at, piece, owner))
            index += piece
        return out


class PioBus(_Bus):
    """x86 port I/O space (64 Ki ports)."""

    def __init__(self, warn: Callable[[str], None] | None = None) -> None:
        super().__init__("port", 0x10000, warn)
        self.table: dict[int, BusRange] = {}  # port -> owner; the run loop reads it directly

    def register(self, name: str, base: int, length: int, read: ReadFn, write: WriteFn, max_size: int = 4) -> BusRange:
        self._check(name, base, length)
        entry = BusRange(name, base, length, read, write, max_size)
        self.ranges.append(entry)
        for port in range(base, base + length):
            self.table[port] = entry
        return entry

    def _find(self, port: int) -> BusRange | None:
        return self.table.get(port & 0xFFFF)


class MmioBus(_Bus):
    """Guest-physical addresses that are not RAM and belong to an emulated device."""

    def __init__(self, warn: Callable[[str], None] | None = None) -> None:
        super().__init__("MMIO address", 1 << 52, warn)
        self._bases: list[int] = []
        self._last: BusRange | None = None

    def register(self, name: str, base: int, length: int, read: ReadFn, write: WriteFn, max_size: int = 8) -> BusRange:
        self._check(name, base, length)
        entry = BusRange(name, base, length, read, write, max_size)
        index = bisect.bisect(self._bases, base)
        self._bases.insert(index, base)
        self.ranges.insert(index, entry)
        return entry

    def unregister(self, entry: BusRange) -> None:
        index = self.ranges.index(entry)
        del self.ranges[index]
        del self._bases[index]
        self._last = None

    def _find(self, address: int) -> BusRange | None:
        entry = self._last
        if entry is not None and entry.base <= address < entry.end:
            return entry
        index = bisect.bisect(self._bases, address) - 1
        if index >= 0:
            entry = self.ranges[index]
            if address < entry.end:
                self._last = entry
                return entry
        return None
