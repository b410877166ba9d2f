from __future__ import annotations

import pytest

from worldswitch.errors import BusError
from worldswitch.vmm.bus import MmioBus, PioBus, UnmappedAccessLog


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


def test_mmio_lookup_finds_each_device_and_rejects_straddling_accesses() -> None:
    bus = MmioBus()
    devs = [Recorder() for _ in range(3)]
    for i, dev in enumerate(devs):
        bus.register(f"d{i}", 0x10000 * (i + 1), 0x100, dev.read, dev.write)
    for i, dev in enumerate(devs):
        bus.write(0x10000 * (i + 1) + 8, 4, i)
        assert dev.writes == [(8, 4, i)]
    assert bus.read(0x100FE, 4) == 0xFFFFFFFF  # runs past the end of d0: unmapped
    assert bus.unmapped.count == 1


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
