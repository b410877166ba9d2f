"""The guest-physical memory map of a worldswitch machine, the one source for memory slots, the
e820 table and the ACPI/MP tables.

    0x0000_0000 - 0x0009_ffff  RAM (low memory)
    0x000a_0000 - 0x000b_ffff  legacy video hole: not backed, accesses are MMIO exits
    0x000c_0000 - 0x000f_ffff  "ROM" area: backed, reserved in e820, holds the MP/ACPI tables
    0x0010_0000 - below 3 GiB  RAM
    0xc000_0000 - 0xdfff_ffff  PCI hole: the window where PCI BARs are placed
    0xe000_0000 - 0xe00f_ffff  PCIe ECAM for bus 0 (reserved in e820, as MCFG requires)
    0xe010_0000 - 0xffff_ffff  more of the hole: IOAPIC, LAPIC, the test device, KVM's TSS
    0x1_0000_0000 -            RAM above 4 GiB, when the machine has more than fits below
"""

from __future__ import annotations

from enum import Enum

from ..errors import ConfigError
from ..record import record

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

LOW_RAM_END = 0xA0000
VGA_HOLE_END = 0xC0000
ROM_END = 0x100000
HIGH_RAM_START = ROM_END
PCI_HOLE_START = 0xC000_0000
PCI_HOLE_END = 1 << 32
PCI_MMIO_START = PCI_HOLE_START
PCI_MMIO_END = 0xE000_0000
ECAM_BASE = 0xE000_0000
ECAM_SIZE = 1 << 20  # bus 0 only: 32 devices x 8 functions x 4 KiB
RAM_ABOVE_4G = 1 << 32

MIN_MEMORY = 2 * MIB
MAX_MEMORY = 1 << 40


class RegionKind(Enum):
    RAM = "ram"  # e820 type 1
    RESERVED = "reserved"  # e820 type 2: backed but not for the OS (our ROM area)
    DEVICE = "device"  # e820 type 2 too, but not backed: a device window the OS must leave alone (ECAM)
    MMIO = "mmio"  # not backed: device windows and holes


@record(frozen=True)
class Region:
    start: int
    size: int
    kind: RegionKind
    name: str

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def backed(self) -> bool:
        return self.kind in (RegionKind.RAM, RegionKind.RESERVED)


@record(frozen=True)
class MemoryMap:
    memory: int  # guest RAM the user asked for, in bytes
    regions: tuple[Region, ...]

    @classmethod
    def for_memory(cls, memory: int) -> "MemoryMap":
        if memory < MIN_MEMORY:
            raise ConfigError(f"memory must be at least {MIN_MEMORY // MIB} MiB")
        if memory > MAX_MEMORY:
            raise ConfigError(f"memory must be at most {MAX_MEMORY // GIB} GiB")
        if memory % (4 * KIB):
            raise ConfigError("memory must be a multiple of 4 KiB")
        # The user's figure counts RAM the guest can use; the legacy hole and ROM area come on top,
        # as on a PC. Low RAM ends at 640 KiB, the rest starts at 1 MiB.
        regions = [
            Region(0, LOW_RAM_END, RegionKind.RAM, "low RAM"),
            Region(LOW_RAM_END, VGA_HOLE_END - LOW_RAM_END, RegionKind.MMIO, "legacy video hole"),
            Region(VGA_HOLE_END, ROM_END - VGA_HOLE_END, RegionKind.RESERVED, "firmware tables (ROM area)"),
        ]
        remaining = memory - LOW_RAM_END
        below = min(remaining, PCI_HOLE_START - HIGH_RAM_START)
        regions.append(Region(HIGH_RAM_START, below, RegionKind.RAM, "RAM"))
        remaining -= below
        regions.append(Region(PCI_MMIO_START, PCI_MMIO_END - PCI_MMIO_START, RegionKind.MMIO, "PCI BAR window"))
        regions.append(Region(ECAM_BASE, ECAM_SIZE, RegionKind.DEVICE, "PCIe ECAM"))
        regions.append(Region(ECAM_BASE + ECAM_SIZE, PCI_HOLE_END - ECAM_BASE - ECAM_SIZE, RegionKind.MMIO,
                              "platform devices"))
        if remaining > 0:
            regions.append(Region(RAM_ABOVE_4G, remaining, RegionKind.RAM, "RAM above 4 GiB"))
        return cls(memory, tuple(regions))

    def backed_ranges(self) -> list[tuple[int, int]]:
        """(start, size) of every range that gets a KVM memory slot, adjacent ones merged."""
        merged: list[list[int]] = []
        for region in self.regions:
            if not region.backed:
                continue
            if merged and merged[-1][0] + merged[-1][1] == region.start:
                merged[-1][1] += region.size
            else:
                merged.append([region.start, region.size])
        return [(start, size) for start, size in merged]

    def reserving(self, start: int, size: int, name: str) -> "MemoryMap":
        """This map with [start, start + size) of its RAM set aside: still backed, reserved in e820,
        as memory the VMM keeps for itself inside the guest (the in-guest monitor's pages)."""
        regions: list[Region] = []
        for region in self.regions:
            if region.kind is RegionKind.RAM and region.start <= start and start + size <= region.end:
                parts = (Region(region.start, start - region.start, RegionKind.RAM, region.name),
                         Region(start, size, RegionKind.RESERVED, name),
                         Region(start + size, region.end - start - size, RegionKind.RAM, region.name))
                regions.extend(part for part in parts if part.size)
            else:
                regions.append(region)
        if len(regions) == len(self.regions) and all(a == b for a, b in zip(regions, self.regions)):
            raise ConfigError(f"{name} ({size >> 20} MiB at {start:#x}) does not fit in one range of guest RAM")
        return MemoryMap(self.memory, tuple(regions))

    def ram(self) -> list[Region]:
        return [r for r in self.regions if r.kind is RegionKind.RAM]

    @property
    def top_of_low_ram(self) -> int:
        """End of RAM below the PCI hole."""
        return max(r.end for r in self.ram() if r.end <= PCI_HOLE_START)

    @property
    def top_of_ram(self) -> int:
        return max(r.end for r in self.ram())
