"""The whole virtio path on real KVM: a ring-3 driver in a guest (guests/src/vblk.c) finds the
disk on PCI, kicks through ioeventfd, and the device's I/O thread serves it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worldswitch.vmm.config import DiskConfig
from worldswitch.vmm.result import StopReason

from .helpers import run_guest

pytestmark = pytest.mark.kvm
SECTOR0 = b"worldswitch disk 0 sector 0"


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    data = bytearray(8 << 20)
    data[: len(SECTOR0)] = SECTOR0
    path.write_bytes(bytes(data))
    return path


def test_a_guest_driver_reads_writes_and_flushes_through_virtio_blk(disk) -> None:
    run = run_guest("vblk", "test", disk=[DiskConfig(str(disk), serial="ws-disk-01")])
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    passed, capacity, serial, _ = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert passed == 7
    assert capacity == (8 << 20) // 512
    assert serial.to_bytes(8, "little") == b"ws-disk-"
    assert disk.read_bytes()[8 * 512 : 8 * 512 + 4] == bytes([3, 10, 17, 24])  # the guest's pattern, on disk
    # Queue kicks went to the device's ioeventfd inside KVM: the VMX saw configuration accesses only.
    function = run.machine.devices["virtio-blk0"]
    assert function.device.requests == 6  # type: ignore[attr-defined]  # write, 3 reads, flush, GET_ID
    # one kick per request at most (an eventfd coalesces close ones), and the VMX's own at DRIVER_OK
    assert 1 <= function.worker.kicks <= 7  # type: ignore[attr-defined]
    assert run.stats.exits.get("mmio", 0) < 40
    # what --stats and the control API's stats show of it: a read past the end is the one error
    assert run.stats.devices["virtio-blk0"] == {"requests": 6, "reads": 2, "writes": 1, "flushes": 1,
                                               "bytes_read": 4608, "bytes_written": 4096, "errors": 1}
    assert run.stats.as_dict()["devices"]["virtio-blk0"]["writes"] == 1


@pytest.mark.parametrize("pattern", ["seq 300 8", "rand 300 1", "seq 300 32 packed", "rand 300 7 packed"])
def test_the_guest_benchmark_modes_complete(disk, pattern: str) -> None:
    run = run_guest("vblk", pattern, disk=[DiskConfig(str(disk))], packed_queues="packed" in pattern)
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    assert run.result.value == 300


def test_a_guest_driver_on_a_packed_ring(disk) -> None:
    """The same checks through VIRTIO_F_RING_PACKED; 300 reads of 3 descriptors each took the
    128-slot ring around several times in the benchmark test above."""
    run = run_guest("vblk", "test packed", disk=[DiskConfig(str(disk), serial="ws-packed")], packed_queues=True)
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    passed, _, serial, _ = run.result.details["ucall"].args  # type: ignore[union-attr]
    assert passed == 7 and serial.to_bytes(8, "little") == b"ws-packe"
    assert disk.read_bytes()[8 * 512 : 8 * 512 + 4] == bytes([3, 10, 17, 24])
    function = run.machine.devices["virtio-blk0"]
    assert type(function.device.queues[0]).__name__ == "PackedQueue"  # type: ignore[attr-defined]
    assert function.device.requests == 6 and function.device.errors == 0  # type: ignore[attr-defined]
    # Without packed queues offered, the driver's check that the device offers them fails.
    refused = run_guest("vblk", "test packed", disk=[DiskConfig(str(disk))])
    assert refused.result.reason is not StopReason.GUEST_DONE


def test_a_read_only_disk_is_refused_writes_by_the_guest(disk) -> None:
    run = run_guest("vblk", "test", disk=[DiskConfig(str(disk), read_only=True)])
    assert run.result.value == 5  # of 7: the write's status, and the pattern's read-back, fail
    assert disk.read_bytes()[8 * 512 : 8 * 512 + 4] == bytes(4)


def test_several_disks_each_on_its_own_function_and_file(disk, tmp_path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(disk.read_bytes())
    before = disk.read_bytes()
    run = run_guest("vblk", "test second", disk=[DiskConfig(str(disk), serial="first"), DiskConfig(str(other), serial="second")])
    assert run.result.reason is StopReason.GUEST_DONE, run.result.message
    passed, _, serial = run.result.details["ucall"].args[:3]
    assert passed == 7 and serial.to_bytes(8, "little").rstrip(b"\0") == b"second"
    assert other.read_bytes()[8 * 512 : 8 * 512 + 4] == bytes([3, 10, 17, 24])  # the guest's pattern landed here
    assert disk.read_bytes() == before  # and not on the first disk
    functions = [f for f in run.machine.pci.functions if getattr(f, "device", None) and f.device.name == "virtio-blk"]
    assert len(functions) == 2 and len({f.bars[0].address for f in functions}) == 2  # type: ignore[union-attr]


def test_cli_disk_options(disk) -> None:
    result = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--guest", "vblk", "--args", "test",
                             "--disk", f"{disk},serial=cli-disk"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    bad = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--disk", f"{disk},fast"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "expected PATH[,ro[,shared]][,serial=ID]" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--disk", "/nonexistent.img"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "cannot open disk image /nonexistent.img" in missing.stderr


def test_a_bug_in_a_device_thread_ends_the_vm_like_a_vcpus(tmp_path: Path, monkeypatch) -> None:
    """A device's I/O thread that dies of an exception must end the VM with status 70, as a vCPU
    thread's bug does: never a device that silently stops answering."""
    from worldswitch.devices.virtio.blk import VirtioBlock

    def broken(self, index: int) -> None:
        raise RuntimeError("a bug in the device")

    monkeypatch.setattr(VirtioBlock, "process", broken)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    run = run_guest("vblk", "test", timeout=60, disk=[DiskConfig(str(disk))])
    assert run.result.reason is StopReason.VMX_ERROR and run.result.exit_status == 70
    assert "virtio-blk's I/O thread: RuntimeError: a bug in the device" in run.result.message


def test_a_second_vm_cannot_take_a_disk_in_use(disk) -> None:
    from worldswitch.vmx.api import Machine

    with Machine(guest="fault", args="spin", disk=[str(disk)]) as vm:
        vm.start()
        second = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--disk", str(disk)], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"worldswitch: error: disk image {disk} is in use: another process does not let others write it"]
        shared = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--guest", "hello", "--disk", f"{disk},ro,shared"],
                                capture_output=True, text=True, timeout=60)
        assert shared.returncode == 0, shared.stderr  # read-only sharing, asked for by name
