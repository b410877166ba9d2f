"""The Debian disk image and hybrid ISO `worldswitch fetch-debian --disk/--iso` makes (vmx/debian_image.py):
their layout, and booting them through SeaBIOS and GRUB. On this PVM host GRUB's menu comes up in about
a minute (real mode and GRUB's decompressor run emulated); Linux itself, behind GRUB, boots where guest
kernel code runs natively (the nested AMD-V host), so that part is `slow` here, like the other workloads."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from worldswitch.boot.bios import SEABIOS
from worldswitch.boot.initramfs import DEFAULT_MARKER, InitramfsSpec, build_initramfs, resolve_modules
from worldswitch.vmm.host import detect_host_kind
from worldswitch.vmm.result import StopReason
from worldswitch.vmx.api import Machine
from worldswitch.vmx.debian import DebianLinux, fetch_debian
from worldswitch.vmx.debian_image import PARTITION_START, build_disk, build_iso, grub_config, mbr
from worldswitch.vmx.stats_report import table

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "debian"
TOOLS = ("grub-mkimage", "grub-mkrescue", "xorriso", "mke2fs", "apt-get")
EMULATED = detect_host_kind().kernel_code_emulated
MENU_TIMEOUT = 300


def test_the_mbr_holds_grubs_code_one_bootable_partition_and_the_signature() -> None:
    code = bytes(range(256)) * 2
    sector = mbr(code, 1 << 20)
    assert len(sector) == 512 and sector[:440] == code[:440] and sector[510:] == b"\x55\xaa"
    status, _, kind, _, start, count = struct.unpack_from("<B3sB3sII", sector, 446)
    assert (status, kind, start, count) == (0x80, 0x83, PARTITION_START, (1 << 20) - PARTITION_START)
    assert sector[462:510] == bytes(48)  # the other three entries are empty
    assert "terminal_output serial" in grub_config() and "linux /boot/vmlinuz console=ttyS0" in grub_config()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not Path(SEABIOS).exists():
        pytest.skip(f"needs {', '.join(missing) or 'seabios'} (.ci/run installs grub-pc-bin, xorriso, seabios)")
    linux: DebianLinux = fetch_debian(CACHE)
    initrd = build_initramfs(InitramfsSpec(linux.busybox, resolve_modules(["virtio_pci", "virtio_blk"], linux.modules),
                                           shell=True))
    folder = tmp_path_factory.mktemp("debian-image")
    disk, iso = folder / "debian.img", folder / "debian.iso"
    build_disk(disk, linux.kernel, initrd, size=128 << 20)
    build_iso(iso, linux.kernel, initrd)
    return disk, iso


def test_the_images_are_what_they_say(images: tuple[Path, Path]) -> None:
    disk, iso = images
    head = disk.read_bytes()[: 2 * 512]
    assert head[510:512] == b"\x55\xaa" and struct.unpack_from("<I", head, 446 + 8)[0] == PARTITION_START
    assert struct.unpack_from("<QH", head, 1024 - 12)[0] == 2  # core.img in sector 1 loads the rest from sector 2
    with open(disk, "rb") as file:  # the ext2 superblock of the partition: magic 0xEF53, label "debian"
        file.seek(PARTITION_START * 512 + 1024)
        superblock = file.read(1024)
    assert superblock[56:58] == b"\x53\xef" and superblock[120:126] == b"debian"
    assert iso.read_bytes()[0x8001:0x8006] == b"CD001" and iso.read_bytes()[510:512] == b"\x55\xaa"  # ISO 9660 + MBR


@pytest.mark.kvm
def test_the_hybrid_iso_boots_through_seabios_into_grubs_menu(images: tuple[Path, Path]) -> None:
    _, iso = images
    with Machine(disk=[f"{iso},ro,format=raw"]) as vm:
        vm.start()
        vm.console.expect(r"SeaBIOS \(version", timeout=60)
        vm.console.expect(r"GNU GRUB", timeout=MENU_TIMEOUT)
        vm.console.expect(r"Booting `Debian GNU/Linux", timeout=60)  # the menu's timeout picks the entry


@pytest.mark.kvm
@pytest.mark.parametrize("which", ["disk", "iso"])
def test_linux_boots_to_its_shell_from_the_disk_and_the_iso_and_powers_off(images: tuple[Path, Path], which: str) -> None:
    """Where guest kernel code is emulated, Linux runs under the monitor (--monitor), taken over where
    GRUB enters it (vmm/x86/handoff.py), where without the monitor it takes a quarter of an hour. On
    this host (2026-12-03) GRUB's menu came at 70 s and its loading of the kernel and initrd (16 MB)
    took 265 s, 222 million instructions emulated, nearly all in GRUB's byte-wise memmove
    (docs/monitor.md); since 2026-12-04 the VMM makes those copies and its relocator's REP MOVS
    (vmm/x86/copyloop.py), and the loading takes about 17 s, 166 s without them: the disk boots to its
    shell in about 65 s. The 900 s for that step are for a loaded host."""
    disk, iso = images
    spec = str(disk) if which == "disk" else f"{iso},ro,format=raw"
    with Machine(disk=[spec], monitor=EMULATED) as vm:
        vm.start()
        vm.console.expect(r"Booting `Debian GNU/Linux", timeout=MENU_TIMEOUT)
        vm.console.expect(r"Linux version", timeout=900)
        vm.console.expect(DEFAULT_MARKER, timeout=300)
        vm.console.expect(r"# ", timeout=60)  # busybox's shell
        vm.console.send("poweroff -f\n")
        result = vm.wait(120)
        assert result is not None and result.reason is StopReason.POWER_OFF, result
        handoff = vm.vmm.runners[0].handoff
        report = table(vm.vmm.stats())
    if EMULATED:  # GRUB loads a relocatable kernel at its pref_address, 16 MiB, and enters it there
        assert handoff is not None and handoff.boot is not None and "(type 0x72) started it at 0x1000000" in handoff.boot.notes[0]
        # its memmove, caught running by the sampling, run by the VMM; the kernel's header, if a served
        # copy carried it, said where GRUB would enter it (else all three entries stayed watched)
        assert handoff.copies > 1000 and handoff.copied_bytes > 10 << 20, handoff.copies
        assert f"the VMX made {handoff.copies} of the boot loader's copies" in report  # --stats says so
        assert handoff.kernel_entry in (None, 0x1000000)
        # SeaBIOS's fill, found in its ROM and watched from the reset on, served during POST; the kernel's
        # entries are watched from the boot sector on
        assert handoff.firmware_copies > 0 and handoff.loader_running, handoff.firmware_copies


@pytest.mark.kvm
def test_the_iso_boots_from_the_ide_cdrom_before_a_blank_disk(images: tuple[Path, Path], tmp_path: Path) -> None:
    """An installer's set-up: an empty disk and the ISO on the IDE controller's ATAPI drive. The
    bootorder fw_cfg file puts the CD first; SeaBIOS reads its El Torito image through ATAPI PIO."""
    _, iso = images
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    with Machine(cdrom=str(iso), disk=[f"{blank},format=raw"]) as vm:
        vm.start()
        vm.console.expect(r"Booting from DVD/CD", timeout=60)
        vm.console.expect(r"GNU GRUB", timeout=MENU_TIMEOUT)
        vm.console.expect(r"Booting `Debian GNU/Linux", timeout=60)
        assert "Booting from Hard Disk" not in vm.console.text
        assert vm.stats()["devices"]["cdrom"]["reads"] > 0


@pytest.mark.kvm
@pytest.mark.skipif(EMULATED, reason="Linux takes a quarter of an hour where kernel code is emulated")
def test_linux_reads_the_cd_through_ata_piix(images: tuple[Path, Path], tmp_path: Path) -> None:
    """An installer's view of the IDE CD-ROM: Linux's own ata_piix and sr drivers, no virtio. The BIOS
    boots the kernel (--firmware bios --kernel); its initramfs mounts the CD and lists it."""
    if not Path("/usr/share/qemu/linuxboot_dma.bin").exists():
        pytest.skip("qemu-system-data is not installed")
    _, iso = images
    linux = fetch_debian(CACHE)
    spec = InitramfsSpec(linux.busybox, resolve_modules(["ata_piix", "sr_mod", "isofs"], linux.modules),
                         commands=["mkdir -p /cd",
                                   # libata probes the port after the module has loaded: wait for the drive
                                   "for i in $(seq 120); do [ -b /dev/sr0 ] && break; sleep 1; done",
                                   "dmesg | grep -E 'ata2|sr0|sr 1' ",
                                   "mount -t iso9660 -o ro /dev/sr0 /cd && ls /cd/boot && echo CD-OK"])
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(build_initramfs(spec))
    with Machine(firmware="bios", kernel=str(linux.kernel), initrd=str(initrd), append="console=ttyS0",
                 cdrom=str(iso)) as vm:
        vm.start()
        vm.console.expect(r"Booting from ROM", timeout=120)
        vm.console.expect(DEFAULT_MARKER, timeout=600)
        vm.console.expect(r"vmlinuz", timeout=180)  # the CD's /boot, read through ATAPI
        vm.console.expect(r"CD-OK", timeout=60)
