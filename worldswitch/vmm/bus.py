"""The port-I/O and MMIO buses: an exit's address is looked up here and handed to the device that
owns it, with the offset inside the device's range.

Devices register by address range; overlapping ranges are refused. Lookups sit on the hot path of
every I/O exit, so the port bus keeps a dense table (ports are few) and the MMIO bus a sorted
list searched with bisect behind a one-entry cache.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import BusError

ReadFn = Callable[[int, int], int]  # (offset, size) -> value
WriteFn = Callable[[int, int, int], None]  # (offset, size, value)


@dataclass(frozen=True, slots=True)
class BusRange:
    name: str
    base: int
    length: int
    read: ReadFn
    write: WriteFn

    @property
    def end(self) -> int:
        return self.base + self.length


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


class PioBus(_Bus):
    """x86 port I/O space (64 Ki ports)."""

    def __init__(self, warn: Callable[[str], None] | None = None) -> None:
        super().__init__("port", 0x10000, warn)
        self.table: dict[int, BusRange] = {}  # port -> owner; the run loop reads it directly

    def register(self, name: str, base: int, length: int, read: ReadFn, write: WriteFn) -> BusRange:
        self._check(name, base, length)
        entry = BusRange(name, base, length, read, write)
        self.ranges.append(entry)
        for port in range(base, base + length):
            self.table[port] = entry
        return entry

    def read(self, port: int, size: int) -> int:
        entry = self.table.get(port)
        if entry is None:
            self.unmapped.record(port, size, False, 0)
            return (1 << (8 * size)) - 1  # an undriven bus reads as all ones
        return entry.read(port - entry.base, size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self.table.get(port)
        if entry is None:
            self.unmapped.record(port, size, True, value)
            return
        entry.write(port - entry.base, size, value)


class MmioBus(_Bus):
    """Guest-physical addresses that are not RAM and belong to an emulated device."""

    def __init__(self, warn: Callable[[str], None] | None = None) -> None:
        super().__init__("MMIO address", 1 << 52, warn)
        self._bases: list[int] = []
        self._last: BusRange | None = None

    def register(self, name: str, base: int, length: int, read: ReadFn, write: WriteFn) -> BusRange:
        self._check(name, base, length)
        entry = BusRange(name, base, length, read, write)
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

    def read(self, address: int, size: int) -> int:
        entry = self._find(address)
        if entry is None or address + size > entry.end:
            self.unmapped.record(address, size, False, 0)
            return (1 << (8 * size)) - 1
        return entry.read(address - entry.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        entry = self._find(address)
        if entry is None or address + size > entry.end:
            self.unmapped.record(address, size, True, value)
            return
        entry.write(address - entry.base, size, value)
