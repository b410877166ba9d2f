"""Booting through firmware (SeaBIOS): the ROM image and where it goes, and what the firmware reads
through fw_cfg (devices/fw_cfg.py) about the machine: its e820 map, and the ACPI tables as QEMU's
"BIOS linker" hands them over (etc/table-loader: the firmware allocates the table files, patches the
pointers between them with the addresses it chose, and fixes the checksums), so a guest sees the
same tables whichever way it boots.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..devices import fw_cfg
from ..errors import ConfigError, GuestImageError
from ..memory.layout import MemoryMap
from ..record import record
from . import acpi
from .bios import LINUXBOOT_ROM, SEABIOS
from .bzimage import parse_bzimage
from .linux import e820_map

LINUXBOOT_FILE = "genroms/linuxboot_dma.bin"
ROM_TOP = 1 << 32  # the reset vector is 16 bytes below
LOW_ROM_END = 0x100000  # the BIOS's last 128 KiB also appear below 1 MiB
LOW_ROM_MAX = 128 << 10
MAX_ROM = 16 << 20

LOADER_ENTRY = 128
LOADER_FILE = 56
ALLOCATE, ADD_POINTER, ADD_CHECKSUM = 1, 2, 3
ZONE_HIGH, ZONE_FSEG = 1, 2
TABLES_FILE, RSDP_FILE, LOADER_FILE_NAME = "etc/acpi/tables", "etc/acpi/rsdp", "etc/table-loader"
E820_ENTRY = struct.Struct("<QQI")
HEADER_LENGTH_AT, HEADER_CHECKSUM_AT = 4, 9  # in every ACPI table header


def read_rom(path: str) -> bytes:
    try:
        rom = Path(path).read_bytes()
    except FileNotFoundError:
        hint = " (apt-get install seabios)" if path == SEABIOS else ""
        raise ConfigError(f"firmware {path} does not exist{hint}") from None
    except OSError as error:
        raise ConfigError(f"cannot read firmware {path}: {error.strerror}") from None
    if not rom or len(rom) % 0x10000 or len(rom) > MAX_ROM:
        raise GuestImageError(f"firmware {path} is {len(rom)} bytes; a BIOS image is a multiple of 64 KiB, "
                              f"at most {MAX_ROM >> 20} MiB")
    return rom


def low_copy(rom: bytes) -> tuple[int, bytes]:
    """(address, bytes) of the ROM's copy below 1 MiB: its last 128 KiB end at 1 MiB."""
    tail = rom[-LOW_ROM_MAX:]
    return LOW_ROM_END - len(tail), tail


def e820_file(memory_map: MemoryMap) -> bytes:
    """etc/e820: the RAM and reserved ranges, as QEMU hands them to SeaBIOS."""
    return b"".join(E820_ENTRY.pack(start, size, kind) for start, size, kind in e820_map(memory_map))


@record(frozen=True)
class FirmwareKernel:
    """A kernel, initrd and command line laid out for the firmware's Linux loader (linuxboot_dma):
    the fw_cfg items it reads, by key, and where each part goes."""

    items: dict[int, bytes]
    setup_address: int
    kernel_address: int
    initrd_address: int | None


REAL_MODE, CMDLINE_AT, PROTECTED_MODE = 0x10000, 0x20000, 0x100000  # boot.rst's layout for protocol 2.02+
TYPE_OF_LOADER, LOADFLAGS, RAMDISK_IMAGE, RAMDISK_SIZE, HEAP_END_PTR, CMD_LINE_PTR = 0x210, 0x211, 0x218, 0x21C, 0x224, 0x228
CAN_USE_HEAP = 0x80
LOADER_ID = 0xB0  # "QEMU", the loader linuxboot_dma is


def firmware_kernel(image: bytes, name: str, initrd: bytes | None, cmdline: str, ram_below_4g: int) -> FirmwareKernel:
    """What QEMU's x86_load_linux does for -kernel on a BIOS machine: split the bzImage into its
    real-mode setup and protected-mode kernel, fill in the header fields a boot loader owns
    (Documentation/arch/x86/boot.rst), and place the initrd as high as the kernel allows."""
    kernel = parse_bzimage(image, name)
    setup = bytearray(image[: len(image) - len(kernel.kernel)])
    command = cmdline.encode() + b"\0"
    if len(command) > min(kernel.header.cmdline_size + 1, 0x10000 - 0x200):
        raise ConfigError(f"the kernel command line is {len(command) - 1} bytes; {name} takes at most "
                          f"{kernel.header.cmdline_size}")
    setup[TYPE_OF_LOADER] = LOADER_ID
    setup[LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", setup, HEAP_END_PTR, CMDLINE_AT - REAL_MODE - 0x200)
    struct.pack_into("<I", setup, CMD_LINE_PTR, CMDLINE_AT)
    items = {fw_cfg.SETUP_ADDR: _u32(REAL_MODE), fw_cfg.SETUP_SIZE: _u32(len(setup)),
             fw_cfg.KERNEL_ADDR: _u32(PROTECTED_MODE), fw_cfg.KERNEL_SIZE: _u32(len(kernel.kernel)),
             fw_cfg.KERNEL_DATA: kernel.kernel, fw_cfg.CMDLINE_ADDR: _u32(CMDLINE_AT),
             fw_cfg.CMDLINE_SIZE: _u32(len(command)), fw_cfg.CMDLINE_DATA: command}
    initrd_address = None
    if initrd:
        top = min(kernel.header.initrd_addr_max, ram_below_4g - 1)
        initrd_address = (top + 1 - len(initrd)) & ~0xFFF
        if initrd_address < PROTECTED_MODE + kernel.header.init_size:
            raise ConfigError(f"the initrd ({len(initrd) >> 20} MiB) does not fit in memory below "
                              f"{top + 1:#x} beside the kernel: give the machine more memory")
        struct.pack_into("<II", setup, RAMDISK_IMAGE, initrd_address, len(initrd))
        items.update({fw_cfg.INITRD_ADDR: _u32(initrd_address), fw_cfg.INITRD_SIZE: _u32(len(initrd)),
                      fw_cfg.INITRD_DATA: initrd})
    items[fw_cfg.SETUP_DATA] = bytes(setup)
    return FirmwareKernel(items, REAL_MODE, PROTECTED_MODE, initrd_address)


def linuxboot_rom() -> bytes:
    try:
        return Path(LINUXBOOT_ROM).read_bytes()
    except OSError:
        raise ConfigError(f"booting a kernel through firmware needs QEMU's option ROM {LINUXBOOT_ROM} "
                          "(apt-get install qemu-system-data)") from None


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _name(name: str) -> bytes:
    return name.encode().ljust(LOADER_FILE, b"\0")


def _allocate(file: str, align: int, zone: int) -> bytes:
    return struct.pack("<I", ALLOCATE) + _name(file) + struct.pack("<IB", align, zone)


def _pointer(dest: str, src: str, offset: int, size: int) -> bytes:
    return struct.pack("<I", ADD_POINTER) + _name(dest) + _name(src) + struct.pack("<IB", offset, size)


def _checksum(file: str, offset: int, start: int, length: int) -> bytes:
    return struct.pack("<I", ADD_CHECKSUM) + _name(file) + struct.pack("<III", offset, start, length)


def acpi_files(tables: acpi.AcpiTables) -> dict[str, bytes]:
    """The tables (laid out from address 0, so every pointer holds an offset into the tables file)
    as etc/acpi/tables, the RSDP as etc/acpi/rsdp, and the loader script linking them."""
    if tables.base != 0:
        raise ValueError("tables for the loader are laid out from 0")
    blob = tables.blob
    length = lambda at: struct.unpack_from("<I", blob, at + HEADER_LENGTH_AT)[0]  # noqa: E731
    fadt, rsdt, xsdt = tables.addresses["FACP"], tables.addresses["RSDT"], tables.addresses["XSDT"]
    commands = [_allocate(TABLES_FILE, 64, ZONE_HIGH), _allocate(RSDP_FILE, 16, ZONE_FSEG),
                _pointer(TABLES_FILE, TABLES_FILE, fadt + 40, 4), _pointer(TABLES_FILE, TABLES_FILE, fadt + 140, 8)]
    for index in range(len(tables.listed)):
        commands.append(_pointer(TABLES_FILE, TABLES_FILE, rsdt + acpi.HEADER.size + 4 * index, 4))
        commands.append(_pointer(TABLES_FILE, TABLES_FILE, xsdt + acpi.HEADER.size + 8 * index, 8))
    for table in (fadt, rsdt, xsdt):
        commands.append(_checksum(TABLES_FILE, table + HEADER_CHECKSUM_AT, table, length(table)))
    rsdp = blob[: acpi.RSDP.size]
    commands += [_pointer(RSDP_FILE, TABLES_FILE, 16, 4), _pointer(RSDP_FILE, TABLES_FILE, 24, 8),
                 _checksum(RSDP_FILE, 8, 0, 20), _checksum(RSDP_FILE, 32, 0, acpi.RSDP.size)]
    script = b"".join(command.ljust(LOADER_ENTRY, b"\0") for command in commands)
    return {TABLES_FILE: blob, RSDP_FILE: rsdp, LOADER_FILE_NAME: script}
