"""Booting like a PC on a real /dev/kvm: Debian's SeaBIOS (the binary QEMU's pc machine runs) on
worldswitch's i440FX, CMOS and fw_cfg prints its banner on COM1, finds a virtio-blk disk (raw or
qcow2) and runs its boot sector, which prints through the BIOS (int 10h, redirected to the serial
port by etc/sercon-port) and powers off through ACPI."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from worldswitch.boot.bios import SEABIOS
from worldswitch.guests.bootsector import MESSAGE, boot_sector
from worldswitch.vmm.config import DiskConfig, MachineConfig
from worldswitch.vmm.result import StopReason

from .helpers import Output

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not Path(SEABIOS).exists(), reason="seabios is not installed")]


@pytest.fixture
def raw_disk(tmp_path: Path) -> Path:
    path = tmp_path / "boot.img"
    path.write_bytes(boot_sector(MESSAGE) + bytes((8 << 20) - 512))
    return path


def boot(config: MachineConfig, timeout: float = 120) -> tuple[object, bytes]:
    from worldswitch.vmm.builder import build_for_boot

    output = Output()
    machine = build_for_boot(config, output)
    with machine:
        machine.start()
        result = machine.wait(timeout)
        if result is None:
            machine.stop()
        stats = machine.stats()
    return result, bytes(output.data), stats  # type: ignore[return-value]


def test_seabios_boots_a_raw_disk_from_virtio_blk(raw_disk: Path) -> None:
    result, output, stats = boot(MachineConfig(disk=[DiskConfig(str(raw_disk))]))  # firmware: the default with a disk
    assert b"SeaBIOS (version" in output and b"Booting from Hard Disk" in output
    assert MESSAGE in output
    assert result is not None and result.reason is StopReason.POWER_OFF, (result, output[-500:])  # type: ignore[attr-defined]
    assert stats.devices["virtio-blk0"]["reads"] >= 1  # type: ignore[attr-defined]  # the boot sector, through virtio


def test_seabios_boots_a_qcow2_overlay(tmp_path: Path, raw_disk: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-utils is not installed")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw_disk), "-F", "raw", str(overlay)], check=True)
    result, output, _ = boot(MachineConfig(firmware="bios", disk=[DiskConfig(str(overlay))]))
    assert MESSAGE in output and result.reason is StopReason.POWER_OFF  # type: ignore[attr-defined]


def test_without_a_bootable_disk_seabios_says_so(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    result, output, _ = boot(MachineConfig(firmware="bios", disk=[DiskConfig(str(blank))]), timeout=20)
    assert b"SeaBIOS (version" in output and b"No bootable device" in output, output[-500:]


def test_the_command_line_boots_a_disk_with_firmware_and_refuses_a_bad_rom(tmp_path: Path, raw_disk: Path) -> None:
    command = [sys.executable, "-m", "worldswitch", "run", "--disk", str(raw_disk), "--timeout", "120", "--stats"]
    done = subprocess.run(command, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert MESSAGE in done.stdout and b"powered off" in done.stderr
    assert b"fw_cfg: dma_transfers" in done.stderr  # the firmware read the machine through fw_cfg's DMA
    bad = tmp_path / "bad.rom"
    bad.write_bytes(b"not a bios")
    done = subprocess.run([sys.executable, "-m", "worldswitch", "run", "--firmware", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"worldswitch: error: firmware {bad} is 10 bytes; a BIOS image is a multiple of 64 KiB, at most 16 MiB"]


def test_a_firmware_machine_snapshots_and_resumes_where_it_waited(tmp_path: Path) -> None:
    """The boot sector waits for a key in the BIOS (int 16h); the machine is snapshotted there and
    restored (its ROM mapped again, its CMOS and devices put back); the key, typed into the
    restored machine's serial port, reaches the BIOS, and the boot sector goes on to power off."""
    from worldswitch.guests.bootsector import WAITING
    from worldswitch.vmx.api import Machine

    disk = tmp_path / "wait.img"
    disk.write_bytes(boot_sector(MESSAGE, wait_for_key=True) + bytes((1 << 20) - 512))
    with Machine(disk=[f"{disk},format=raw"]) as vm:
        vm.start()
        vm.console.expect(WAITING, timeout=60)
        vm.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap") as vm:
        vm.start()
        vm.console.send("x")
        vm.console.expect(MESSAGE, timeout=60)
        result = vm.wait(60)
        assert result is not None and result.reason is StopReason.POWER_OFF


def debian_kernel() -> Path:
    from worldswitch.vmx.debian import fetch_debian

    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: not a Debian-based host")
    return fetch_debian(Path(__file__).resolve().parent.parent / ".cache" / "debian").kernel


def test_the_firmware_layout_of_a_kernel_is_what_boot_rst_asks() -> None:
    from worldswitch.boot import firmware
    from worldswitch.devices import fw_cfg as fc
    from worldswitch.errors import ConfigError

    image = debian_kernel().read_bytes()
    laid = firmware.firmware_kernel(image, "vmlinuz", b"i" * 5000, "console=ttyS0", 512 << 20)
    setup = laid.items[fc.SETUP_DATA]
    assert setup[firmware.TYPE_OF_LOADER] == firmware.LOADER_ID and setup[firmware.LOADFLAGS] & firmware.CAN_USE_HEAP
    assert struct.unpack_from("<I", setup, firmware.CMD_LINE_PTR)[0] == firmware.CMDLINE_AT
    assert laid.initrd_address is not None and laid.initrd_address % 4096 == 0
    assert laid.initrd_address + 5000 <= 512 << 20 and struct.unpack_from("<II", setup, firmware.RAMDISK_IMAGE) == (
        laid.initrd_address, 5000)
    assert len(setup) + len(laid.items[fc.KERNEL_DATA]) == len(image) and laid.items[fc.CMDLINE_DATA] == b"console=ttyS0\0"
    with pytest.raises(ConfigError, match="command line is 5000 bytes"):
        firmware.firmware_kernel(image, "vmlinuz", None, "x" * 5000, 512 << 20)
    with pytest.raises(ConfigError, match="does not fit"):
        firmware.firmware_kernel(image, "vmlinuz", bytes(300 << 20), "", 256 << 20)


@pytest.mark.skipif(not Path("/usr/share/qemu/linuxboot_dma.bin").exists(), reason="qemu-system-data is not installed")
def test_the_firmware_boots_a_kernel_through_fw_cfg() -> None:
    """--firmware bios --kernel: SeaBIOS runs QEMU's linuxboot_dma option ROM, which loads the kernel,
    initrd and command line from fw_cfg and enters the kernel's real-mode setup code (which, told to,
    says so on the serial port: the rest of the boot is the kernel's, emulated and slow on PVM)."""
    from worldswitch.vmx.api import Machine

    with Machine(firmware="bios", kernel=str(debian_kernel()), append="console=ttyS0 debug earlyprintk=serial,ttyS0") as vm:
        vm.start()
        vm.console.expect(r"Booting from ROM", timeout=60)
        # each letter may come twice: once from the kernel on COM1, once through the BIOS screen (sercon)
        vm.console.expect(r"e+a+r+l+y+ +c+o+n+s+o+l+e+ +i+n+ +s+e+t+u+p+ +c+o+d+e+", timeout=60)


def test_firmware_goes_with_disks_a_cd_or_a_kernel_not_a_program() -> None:
    from worldswitch.errors import ConfigError

    with pytest.raises(ConfigError, match="firmware boots disks, a CD or a Linux kernel"):
        MachineConfig(firmware="bios", guest="hello").program()
    with pytest.raises(ConfigError, match="--cdrom is for a machine that boots through firmware"):
        MachineConfig(kernel="vmlinuz", cdrom="x.iso").program()
    assert MachineConfig(cdrom="x.iso").boots_firmware and MachineConfig(firmware="bios", kernel="k").boots_firmware
    assert not MachineConfig(kernel="k", disk=[DiskConfig("d.img")]).boots_firmware
