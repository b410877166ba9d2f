"""A hostile guest against the VMX's buses: every access size at every offset of every region the VMX
emulates must end the way it ends on hardware (reads of nothing give all ones, writes are dropped),
and never the VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldswitch.devices.pci import ECAM_FUNCTION_SIZE, HostBridge, PciBus
from worldswitch.vmm.config import DiskConfig
from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmm.result import StopReason

from .helpers import run_guest


@pytest.mark.parametrize("device", [0, 5])  # the host bridge, and a slot with nothing in it
@pytest.mark.parametrize("register", [0x00, 0x3E, 0xFF, 0x100, 0xFF8, 0xFFC, 0xFFF])
@pytest.mark.parametrize("size", range(1, 9))
def test_configuration_space_takes_every_size_at_every_register(device: int, register: int, size: int) -> None:
    bus = PciBus()
    bus.add(HostBridge(), slot=0)
    offset = (device << 15) | register
    value = bus.ecam_read(offset, size)
    assert 0 <= value < 1 << (8 * size)
    if device == 5 or register + size > ECAM_FUNCTION_SIZE:
        assert value == (1 << (8 * size)) - 1  # nothing there: all ones
    bus.ecam_write(offset, size, (1 << (8 * size)) - 1)
    bus.address_write(0, 4, 0x80000000 | (device << 11) | (register & 0xFC))
    for port_offset in range(4):
        for width in (1, 2, 4):
            assert 0 <= bus.data_read(port_offset, width) < 1 << (8 * width)


@pytest.mark.kvm
def test_a_guest_spraying_every_bus_at_every_size_ends_normally(tmp_path: Path) -> None:
    """The `spray` guest: reads and writes of 1, 2, 4 and 8 bytes, unaligned too, at every offset of
    every BAR of three virtio functions, the ECAM window and past it, the test device and unmapped
    MMIO, and every port. Every third offset (every 17th on an emulated CPU, where an exit costs ten
    times more) still meets every alignment, since neither stride shares a factor with 8."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    stride = 17 if detect_host_kind().cpu_emulated else 3
    run = run_guest("spray", str(stride), timeout=600, disk=[DiskConfig(str(disk))], rng=True, vconsole="none")
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    accesses, regions, _, _ = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert regions == 3 * 2 + 36  # two BARs per virtio function, 32 ECAM pages and four more regions
    assert accesses > 1_000_000 // stride
    assert disk.read_bytes() == bytes(1 << 20)  # no queue ever ran: the user's image is untouched
    assert not any("internal" in warning or "bug" in warning for warning in run.warnings)
