from __future__ import annotations

import pytest

from worldswitch.errors import BusError
from worldswitch.vmm.platform.bus import MmioBus, PioBus, UnmappedAccessLog


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0x1000 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_pio_dispatches_with_the_offset_inside_the_range() -> None:
    bus, dev = PioBus(), Recorder()
    bus.register("dev", 0x3F8, 8, dev.read, dev.write)
    bus.write(0x3FB, 1, 0x80)
    assert dev.writes == [(3, 1, 0x80)]
    assert bus.read(0x3FD, 1) == 0x1005


def test_overlapping_ranges_are_refused_with_both_names() -> None:
    bus, dev = PioBus(), Recorder()
    bus.register("uart", 0x3F8, 8, dev.read, dev.write)
    with pytest.raises(BusError, match="overlaps uart"):
        bus.register("other", 0x3FF, 2, dev.read, dev.write)
    mmio = MmioBus()
    mmio.register("a", 0x1000, 0x1000, dev.read, dev.write)
    with pytest.raises(BusError, match="overlaps a"):
        mmio.register("b", 0x1800, 0x1000, dev.read, dev.write)
    mmio.register("c", 0x2000, 0x10, dev.read, dev.write)  # adjacent is fine


def test_ranges_outside_the_address_space_are_refused() -> None:
    dev = Recorder()
    with pytest.raises(BusError):
        PioBus().register("x", 0xFFFF, 2, dev.read, dev.write)
    with pytest.raises(BusError):
        PioBus().register("x", 0, 0, dev.read, dev.write)


class Bytes:
    """A device whose every byte reads as its offset (low 8 bits), recording accesses."""

    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size))
        return int.from_bytes(bytes((offset + i) & 0xFF for i in range(size)), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size))
        assert 0 <= value < 1 << (8 * size)


def test_mmio_lookup_finds_each_device_and_splits_straddling_accesses() -> None:
    bus = MmioBus()
    devs = [Recorder() for _ in range(3)]
    for i, dev in enumerate(devs):
        bus.register(f"d{i}", 0x10000 * (i + 1), 0x100, dev.read, dev.write)
    for i, dev in enumerate(devs):
        bus.write(0x10000 * (i + 1) + 8, 4, i)
        assert dev.writes == [(8, 4, i)]
    # runs past the end of d0: d0 answers its two bytes, the two beyond it read as all ones
    assert bus.read(0x100FE, 4) == 0xFFFF0000 | (0x1000 + 0xFE) & 0xFFFF
    assert bus.unmapped.count == 0


@pytest.mark.parametrize("offset", range(16))
@pytest.mark.parametrize("size", range(1, 9))
def test_every_size_at_every_offset_reaches_devices_as_aligned_pieces(offset: int, size: int) -> None:
    """What x86 and KVM can produce (1 to 8 bytes, anywhere) arrives at a device only as naturally
    aligned powers of two no wider than it takes, and reads back byte for byte as the device has it."""
    bus, wide, narrow = MmioBus(), Bytes(), Bytes()
    bus.register("wide", 0x1000, 0x10, wide.read, wide.write)
    bus.register("dword", 0x1010, 0x10, narrow.read, narrow.write, max_size=4)
    address = 0x1008 + offset  # from the middle of one device, across the other, past its end
    value = bus.read(address, size)
    expected = bytes((a - 0x1000) & 0xFF if a < 0x1010 else (a - 0x1010) & 0xFF if a < 0x1020 else 0xFF
                     for a in range(address, address + size))
    assert value.to_bytes(size, "little") == expected
    bus.write(address, size, (1 << (8 * size)) - 1)
    for device, limit in ((wide, 8), (narrow, 4)):
        for _, at, piece in device.accesses:
            assert piece <= limit and not piece & (piece - 1) and at % piece == 0


def test_an_access_nobody_owns_is_one_unmapped_access_whatever_its_size() -> None:
    bus = MmioBus()
    assert bus.read(0x5003, 7) == (1 << 56) - 1
    bus.write(0x5003, 5, 0)
    assert bus.unmapped.count == 2


def test_unmapped_reads_return_all_ones_and_are_counted() -> None:
    bus = PioBus()
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 2) == 0xFFFF
    bus.write(0x80, 1, 0)
    assert bus.unmapped.count == 3


def test_unmapped_warnings_are_rate_limited() -> None:
    warnings: list[str] = []
    log = UnmappedAccessLog("MMIO address", warnings.append, burst=3, interval_s=3600)
    for i in range(1000):
        log.record(0xD0000000, 4, True, i)
    assert log.count == 1000
    assert len(warnings) == 3
    assert log.suppressed == 997
