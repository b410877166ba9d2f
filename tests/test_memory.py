from __future__ import annotations

import ctypes

import pytest

from worldswitch.driver import structs as s
from worldswitch.errors import GuestMemoryError
from worldswitch.memory.guest import GuestMemory
from worldswitch.memory.layout import GIB, MIB, PCI_HOLE_START, MemoryMap, RegionKind


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory([(0, 0xA0000), (0x100000, 0x100000)])
    yield mem
    mem.close()


def test_reads_and_writes_inside_ram(memory: GuestMemory) -> None:
    memory.write(0x1000, b"hello")
    assert memory.read(0x1000, 5) == b"hello"
    memory.write_int(0x100000, 8, 0x1122334455667788)
    assert memory.read_int(0x100000, 4) == 0x55667788
    regs = s.kvm_regs(rip=0x1234)
    memory.write_obj(0x2000, regs)
    assert memory.read_obj(0x2000, s.kvm_regs).rip == 0x1234


@pytest.mark.parametrize(
    "gpa,length",
    [(0x9FFFF, 2), (0xA0000, 1), (0xFFFFF, 1), (0x1FFFFF, 2), (0x200000, 1), (-1, 1), (0, -1), (1 << 60, 8)],
)
def test_accesses_outside_ram_or_across_a_hole_are_refused(memory: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        memory.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            memory.write(gpa, b"\0" * length)


def test_views_are_zero_copy_and_bounded(memory: GuestMemory) -> None:
    view = memory.view(0x100000, 16)
    view[:4] = b"abcd"
    assert memory.read(0x100000, 4) == b"abcd"
    assert len(view) == 16


def test_cstring_stops_at_nul_and_at_the_end_of_ram(memory: GuestMemory) -> None:
    memory.write(0x3000, b"args here\0junk")
    assert memory.read_cstring(0x3000, 100) == b"args here"
    memory.write(0x9FFFC, b"abcd")
    assert memory.read_cstring(0x9FFFC, 100) == b"abcd"


def test_misaligned_or_overlapping_ranges_are_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0x10, 0x1000)])
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 0x2000), (0x1000, 0x1000)])


def test_memory_map_small_machine() -> None:
    mm = MemoryMap.for_memory(128 * MIB)
    kinds = [(r.start, r.end, r.kind) for r in mm.regions]
    assert kinds[0] == (0, 0xA0000, RegionKind.RAM)
    assert kinds[1] == (0xA0000, 0xC0000, RegionKind.MMIO)
    assert kinds[2] == (0xC0000, 0x100000, RegionKind.RESERVED)
    assert sum(r.size for r in mm.ram()) == 128 * MIB
    assert mm.backed_ranges() == [(0, 0xA0000), (0xC0000, 0x40000 + 128 * MIB - 0xA0000)]


@pytest.mark.parametrize("memory", [3 * GIB - 0x60000 - 4096, 3 * GIB - 0x60000, 3 * GIB - 0x60000 + 4096, 6 * GIB])
def test_memory_map_just_under_and_over_the_pci_hole(memory: int) -> None:
    mm = MemoryMap.for_memory(memory)
    assert sum(r.size for r in mm.ram()) == memory
    assert mm.top_of_low_ram <= PCI_HOLE_START
    above = [r for r in mm.ram() if r.start >= 1 << 32]
    fits_below = memory <= PCI_HOLE_START - 0x100000 + 0xA0000
    assert bool(above) == (not fits_below)
    if above:
        assert above[0].start == 1 << 32 and mm.top_of_low_ram == PCI_HOLE_START


def test_memory_the_vmm_keeps_in_the_guest_is_reserved_in_e820_and_stays_backed() -> None:
    from worldswitch.boot import bootparams as bp
    from worldswitch.boot.linux import e820_map, place_initrd
    from worldswitch.errors import ConfigError

    mm = MemoryMap.for_memory(512 * MIB)  # RAM to 0x2006_0000: 512 MiB and the legacy hole's 384 KiB
    kept = mm.reserving(0x1FC0_0000, 0x2006_0000 - 0x1FC0_0000, "the in-guest monitor")
    assert kept.backed_ranges() == mm.backed_ranges()  # the same memory slots: only its use changed
    assert (0x1FC0_0000, 0x46_0000, bp.E820_RESERVED) in e820_map(kept)
    assert (0x10_0000, 0x1FC0_0000 - 0x10_0000, bp.E820_RAM) in e820_map(kept)
    assert kept.top_of_low_ram == 0x1FC0_0000
    start, end = place_initrd(kept, 2 * MIB, 0x300_0000, 0x7FFF_FFFF, "initrd")
    assert end <= 0x1FC0_0000 and start >= 0x300_0000  # below what is kept, as high as it goes
    with pytest.raises(ConfigError, match="does not fit in one range of guest RAM"):
        mm.reserving(0x9F000, 0x2000, "across the legacy hole")


def test_memory_map_rejects_nonsense() -> None:
    from worldswitch.errors import ConfigError

    for bad in (0, 1024, 3 * MIB + 1):
        with pytest.raises(ConfigError):
            MemoryMap.for_memory(bad)


def test_ctypes_objects_written_byte_for_byte(memory: GuestMemory) -> None:
    value = ctypes.c_uint32(0xDEADBEEF)
    memory.write_obj(0x4000, value)
    assert memory.read(0x4000, 4) == b"\xef\xbe\xad\xde"
