"""PCI: configuration space, BARs, and the host bridge that reaches them through ports 0xcf8/0xcfc
(configuration mechanism #1, PCI Local Bus 3.0 section 3.2.2.3.2) and through PCIe ECAM (PCI Express
Base 4.0 section 7.2.2; announced by the MCFG table).

A PciFunction owns a 256-byte configuration header (type 0) with a capability list, and up to six
BARs. BARs are placed by the VMM (the firmware's job) and may be moved by the guest; a BAR is
mapped on the MMIO or port bus only while its decoding is enabled in the command register, and
follows the guest when it writes a new address, as on real hardware. Where a BAR is mapped is the
VMM's business: the function calls the `on_bar_change(function, index, bar, old, new)` it was given.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

from ..errors import ConfigError
from ..record import record
from .base import InterruptLine

CONFIG_ADDRESS_PORT = 0xCF8
RESET_CONTROL_OFFSET = 1  # port 0xcf9, a byte inside the host bridge's 0xcf8-0xcfb
CONFIG_DATA_PORT = 0xCFC
CONFIG_SIZE = 256
ECAM_FUNCTION_SIZE = 4096  # PCIe: 4 KiB of configuration space per function

# Type-0 header offsets
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES = 1 << 4

BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8

CAP_MSIX = 0x11
CAP_VENDOR = 0x09
FIRST_CAPABILITY = 0x40

MAX_DEVICES = 32


@record
class Bar:
    size: int  # a power of two
    io: bool = False
    mem64: bool = False
    address: int = 0  # as the guest (or the VMM) programmed it
    mapped_at: int | None = None  # where it is decoded right now
    read: Callable[[int, int], int] | None = None  # the BAR's contents: (offset, size) -> value
    write: Callable[[int, int, int], None] | None = None

    @property
    def flags(self) -> int:
        return BAR_IO if self.io else (BAR_MEM64 if self.mem64 else 0)


BarChange = Callable[["PciFunction", int, "Bar", "int | None", "int | None"], None]  # (function, index, bar, old, new)


def _unmapped(function: "PciFunction", index: int, bar: "Bar", old: int | None, new: int | None) -> None:
    """For a function nobody maps (tests, or one without BARs)."""


class PciFunction:
    """A PCI function's configuration header and BARs. Subclasses add capabilities and behaviour."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0, subsystem_vendor: int = 0,
                 subsystem: int = 0, interrupt_pin: int = 0, on_bar_change: BarChange = _unmapped) -> None:
        self.config = bytearray(CONFIG_SIZE)
        self.writable = bytearray(CONFIG_SIZE)  # per-byte write masks
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        self.config[REVISION] = revision
        self.config[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self.config, SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self.writable[COMMAND] = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER
        self.writable[COMMAND + 1] = COMMAND_INTX_DISABLE >> 8
        self.writable[INTERRUPT_LINE] = 0xFF
        self.bars: list[Bar | None] = [None] * 6
        self.on_bar_change = on_bar_change
        self._next_capability = FIRST_CAPABILITY
        self._last_capability = 0
        self.lock = threading.RLock()

    # --- construction -----------------------------------------------------------------------

    def add_bar(self, index: int, bar: Bar) -> None:
        if bar.size & (bar.size - 1) or bar.size < (4 if bar.io else 16):
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two of the minimum size")
        if bar.mem64 and index == 5:
            raise ValueError("a 64-bit BAR needs two slots")
        self.bars[index] = bar

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (its ID and next pointer come first); returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SIZE:
            raise ValueError("configuration space is full")
        self.config[offset] = cap_id
        self.config[offset + 2 : offset + length] = body
        if writable is not None:
            self.writable[offset + 2 : offset + length] = writable
        if self._last_capability:
            self.config[self._last_capability + 1] = offset
        else:
            self.config[CAPABILITIES_POINTER] = offset
            struct.pack_into("<H", self.config, STATUS, struct.unpack_from("<H", self.config, STATUS)[0] | STATUS_CAPABILITIES)
        self._last_capability = offset
        self._next_capability = (offset + length + 3) & ~3
        return offset

    # --- configuration space access ---------------------------------------------------------

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.config, COMMAND)[0])

    def config_read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_SIZE:
            return 0  # PCIe extended space: nothing there
        with self.lock:
            if BAR0 <= offset < BAR0 + 24:
                return self._bar_read(offset, size)
            return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_SIZE or offset + size > CONFIG_SIZE:
            return
        with self.lock:
            if BAR0 <= offset < BAR0 + 24:
                self._bar_write(offset, size, value)
                return
            old_command = self.command
            for i in range(size):
                mask = self.writable[offset + i]
                byte = (value >> (8 * i)) & 0xFF
                self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
            self.capability_written(offset, size)
            if self.command != old_command:
                self._update_mappings()

    def capability_written(self, offset: int, size: int) -> None:
        """Hook for subclasses whose capabilities react to writes (MSI-X)."""

    # --- BARs -----------------------------------------------------------------------------

    def _bar_register(self, index: int) -> int:
        """The 32-bit register value of BAR slot `index` (the upper half of a 64-bit BAR too)."""
        bar = self.bars[index]
        if bar is None:
            if index > 0 and self.bars[index - 1] is not None and self.bars[index - 1].mem64:  # type: ignore[union-attr]
                return (self.bars[index - 1].address >> 32) & 0xFFFFFFFF  # type: ignore[union-attr]
            return 0
        return (bar.address & 0xFFFFFFFF & ~(bar.size - 1)) | bar.flags

    def _bar_read(self, offset: int, size: int) -> int:
        raw = b"".join(self._bar_register(i).to_bytes(4, "little") for i in range(6))
        at = offset - BAR0
        return int.from_bytes(raw[at : at + size], "little")

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        index, shift = divmod(offset - BAR0, 4)
        if shift or size != 4:
            return  # BARs are written as whole dwords by every driver worth emulating
        bar = self.bars[index]
        if bar is None and index > 0 and self.bars[index - 1] is not None and self.bars[index - 1].mem64:  # type: ignore[union-attr]
            bar, high = self.bars[index - 1], True
        else:
            high = False
        if bar is None:
            return
        if high:
            bar.address = (bar.address & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
        else:
            # Sizing writes all ones and reads back ~(size - 1): the address bits below the size
            # are hardwired to zero.
            low = value & ~(bar.size - 1) & (0xFFFFFFFC if bar.io else 0xFFFFFFF0)
            bar.address = (bar.address & ~0xFFFFFFFF) | low
        self._update_mappings()

    def _bar_decodes(self, bar: Bar) -> bool:
        enabled = self.command & (COMMAND_IO if bar.io else COMMAND_MEMORY)
        limit = 1 << 16 if bar.io else (1 << 64 if bar.mem64 else 1 << 32)
        # An address of 0 or one whose top bits are all set (a BAR mid-sizing) is not a mapping.
        return bool(enabled) and 0 < bar.address and bar.address + bar.size <= limit and \
            (bar.address | (bar.size - 1)) != (limit - 1)

    def _update_mappings(self) -> None:
        for index, bar in enumerate(self.bars):
            if bar is None:
                continue
            wanted = bar.address if self._bar_decodes(bar) else None
            if wanted != bar.mapped_at:
                old, bar.mapped_at = bar.mapped_at, wanted
                self.on_bar_change(self, index, bar, old, wanted)


class HostBridge(PciFunction):
    """00:00.0, the bridge between the CPU and PCI bus 0 (Red Hat's generic PCIe host bridge ID)."""

    def __init__(self) -> None:
        super().__init__(vendor=0x1B36, device=0x0008, class_code=0x060000)


@record
class Slot:
    number: int
    function: PciFunction
    intx: InterruptLine | None = None


def all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciBus:
    """Bus 0 and its two configuration access mechanisms.

    Ports 0xcf8-0xcfb: a dword there is CONFIG_ADDRESS; anything narrower is not the host bridge's
    but goes on to the chipset, where a byte at 0xcf9 is the reset control register (the PIIX's, and
    the FADT's reset register): `chipset` gets those accesses (offset from 0xcf8)."""

    def __init__(self, chipset_read: Callable[[int, int], int] | None = None,
                 chipset_write: Callable[[int, int, int], None] | None = None) -> None:
        self.slots: dict[int, Slot] = {}
        self.address = 0  # CONFIG_ADDRESS
        self._chipset_read = chipset_read or (lambda offset, size: all_ones(size))
        self._chipset_write = chipset_write or (lambda offset, size, value: None)
        self._lock = threading.Lock()

    def free_slot(self) -> int:
        free = [number for number in range(MAX_DEVICES) if number not in self.slots]
        if not free:
            raise ConfigError(f"too many PCI devices: bus 0 has {MAX_DEVICES} slots")
        return free[0]

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        if slot is None:
            slot = self.free_slot()
        if slot in self.slots or not 0 <= slot < MAX_DEVICES:
            raise ValueError(f"PCI slot {slot} is taken or does not exist")
        self.slots[slot] = Slot(slot, function)
        return slot

    def function_at(self, bus: int, device: int, function: int) -> PciFunction | None:
        if bus != 0 or function != 0:
            return None
        slot = self.slots.get(device)
        return slot.function if slot is not None else None

    # Mechanism #1: a dword at port 0xcf8 selects, 0xcfc-0xcff carry the data.
    def address_read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        return self._chipset_read(offset, size)

    def address_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            with self._lock:
                self.address = value & 0x80FFFFFC
        else:
            self._chipset_write(offset, size, value)

    def data_read(self, offset: int, size: int) -> int:
        return self._data(offset, size, None)

    def data_write(self, offset: int, size: int, value: int) -> None:
        self._data(offset, size, value)

    def _data(self, byte: int, size: int, value: int | None) -> int:
        address = self.address
        if not address & 0x80000000:
            return all_ones(size)
        bus, device, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        register = (address & 0xFC) + byte
        return self._access(bus, device, function, register, size, value)

    # ECAM: one 4 KiB page per function (bus << 20 | device << 15 | function << 12 | register).
    def ecam_read(self, offset: int, size: int) -> int:
        return self._ecam(offset, size, None)

    def ecam_write(self, offset: int, size: int, value: int) -> None:
        self._ecam(offset, size, value)

    def _ecam(self, offset: int, size: int, value: int | None) -> int:
        bus, device, function = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7
        return self._access(bus, device, function, offset & 0xFFF, size, value)

    def _access(self, bus: int, device: int, function: int, register: int, size: int, value: int | None) -> int:
        target = self.function_at(bus, device, function)
        if target is None or register + size > ECAM_FUNCTION_SIZE:
            return all_ones(size)  # no device: all ones, which is how scans end
        if value is None:
            return target.config_read(register, size)
        target.config_write(register, size, value)
        return 0
