"""A bootable Debian you can show, from Debian packages alone: the cloud kernel and a busybox
initramfs behind GRUB for BIOS, as a disk image (MBR, GRUB's boot.img and core.img in the gap
before the first partition, an ext2 partition with /boot) and as a hybrid ISO (grub-mkrescue with
xorriso), so that `worldswitch run --disk debian.img` and `--disk debian.iso` show the firmware,
GRUB's menu and then Linux on the console.

The tools are Debian's: grub-mkimage and the i386-pc modules (grub-pc-bin), mke2fs (e2fsprogs; it
fills the file system from a folder, so nothing is mounted and no root is needed), grub-mkrescue and
xorriso. What grub-bios-setup would do to put GRUB on a disk is done here: boot.img's code goes into
the MBR beside the partition table, and core.img (whose first sector already loads the rest from
sector 2 on) goes into sector 1.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from ..errors import ConfigError

GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "iso9660", "normal", "linux", "serial", "terminal", "configfile",
                "echo", "test")
SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, as partitioning tools align it; GRUB's core.img fits before
BOOT_CODE = 440  # bytes of the MBR that are code (then the disk signature and the partition table)
PARTITION_TABLE = 446
LINUX_PARTITION = 0x83
CMDLINE = "console=ttyS0"


def grub_config(cmdline: str = CMDLINE) -> str:
    """GRUB on the serial port (COM1 at 115200), a menu of one entry, booting after 5 s."""
    return f"""serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=5
menuentry 'Debian GNU/Linux (busybox, worldswitch)' {{
    linux /boot/vmlinuz {cmdline}
    initrd /boot/initrd.img
}}
"""


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(f"{tool} is not installed: apt-get install {package}")
    return path


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"status {done.returncode}"
        raise ConfigError(f"{Path(command[0]).name} failed: {last}")


def boot_tree(folder: Path, kernel: Path, initrd: bytes, cmdline: str = CMDLINE) -> Path:
    """folder/boot/{vmlinuz, initrd.img, grub/grub.cfg}."""
    grub = folder / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel, folder / "boot" / "vmlinuz")
    (folder / "boot" / "initrd.img").write_bytes(initrd)
    (grub / "grub.cfg").write_text(grub_config(cmdline))
    return folder


def mbr(boot_img: bytes, total_sectors: int) -> bytes:
    """boot.img's code, one bootable Linux partition from PARTITION_START to the end (LBA only: the
    CHS fields say "beyond 8 GiB", as tools write them today), and the boot signature."""
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", LINUX_PARTITION, b"\xfe\xff\xff", PARTITION_START,
                        total_sectors - PARTITION_START)
    return boot_img[:BOOT_CODE] + bytes(PARTITION_TABLE - BOOT_CODE) + entry + bytes(48) + b"\x55\xaa"


def build_disk(path: Path, kernel: Path, initrd: bytes, size: int = 256 << 20) -> None:
    """A raw disk image at `path` that SeaBIOS boots into GRUB, and GRUB into Linux."""
    mkimage, mke2fs = _need("grub-mkimage", "grub-pc-bin"), _need("mke2fs", "e2fsprogs")
    if not (GRUB_DIR / "boot.img").exists():
        raise ConfigError(f"{GRUB_DIR} has no boot.img: apt-get install grub-pc-bin")
    if path.exists():
        raise ConfigError(f"{path} exists; worldswitch does not overwrite it")
    with tempfile.TemporaryDirectory(prefix="ws-debian-") as work:
        tree = boot_tree(Path(work) / "tree", kernel, initrd)
        core = Path(work) / "core.img"
        _run([mkimage, "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core), "-p", "(hd0,msdos1)/boot/grub",
              *GRUB_MODULES])
        core_img = core.read_bytes()
        if len(core_img) > (PARTITION_START - 1) * SECTOR:
            raise ConfigError(f"GRUB's core.img ({len(core_img)} bytes) does not fit before the first partition")
        if struct.unpack_from("<QH", core_img, SECTOR - 12) != (2, -(-len(core_img) // SECTOR) - 1):
            raise ConfigError("GRUB's core.img does not load itself from sector 2 on; this GRUB is not one "
                              "worldswitch knows how to install")
        with open(path, "xb") as file:
            file.truncate(size)
        try:
            _run([mke2fs, "-q", "-F", "-t", "ext2", "-L", "debian", "-E", f"offset={PARTITION_START * SECTOR}",
                  "-d", str(tree), str(path), f"{(size - PARTITION_START * SECTOR) // 1024}k"])
            with open(path, "r+b") as file:
                file.write(mbr((GRUB_DIR / "boot.img").read_bytes(), size // SECTOR))
                file.write(core_img)
        except BaseException:
            path.unlink()
            raise


def build_iso(path: Path, kernel: Path, initrd: bytes) -> None:
    """A hybrid ISO at `path` (El Torito for CD drives, an MBR for disks) that boots into GRUB."""
    mkrescue = _need("grub-mkrescue", "grub-pc-bin and grub-common")
    _need("xorriso", "xorriso")
    if path.exists():
        raise ConfigError(f"{path} exists; worldswitch does not overwrite it")
    with tempfile.TemporaryDirectory(prefix="ws-debian-") as work:
        tree = boot_tree(Path(work) / "tree", kernel, initrd)
        _run([mkrescue, "-d", str(GRUB_DIR), "-o", str(path), str(tree)])
