"""The x86 boot protocol on synthetic kernels: setup header validation, host decompression of every
payload format, placement of kernel, initrd and command line, and the zero page."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import lz4.block
import pytest
import zstandard

from worldswitch.boot import bootparams as bp
from worldswitch.boot.bzimage import decompress, extract_vmlinux, parse_bzimage
from worldswitch.boot.linux import (CMDLINE_ADDR, ZERO_PAGE, choose_decompression, e820_map, enters_linux, load_linux,
                                    take_over_linux)
from worldswitch.errors import ConfigError, GuestImageError
from worldswitch.memory.guest import GuestMemory
from worldswitch.memory.layout import GIB, MIB, MemoryMap

from .helpers import LOADER_ZERO_PAGE, loaded_by_a_boot_loader, make_elf

VMLINUX = make_elf([(0x1000000, b"\x90" * 64 + b"startup_64", 0x200000)])


def lz4_blocks(data: bytes) -> bytes:
    out = struct.pack("<I", 0x184C2102)
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i : i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def with_size(data: bytes, compressed: bytes) -> bytes:
    """What the kernel build's *_with_size commands do: the unpacked size appended (size_append)."""
    return compressed + struct.pack("<I", len(data) & 0xFFFFFFFF)


def lz4_legacy(data: bytes) -> bytes:
    return with_size(data, lz4_blocks(data))


COMPRESSORS = {  # as arch/x86/boot/compressed/Makefile makes them: gzip's own ISIZE, the rest with their size
    "gzip": gzip.compress,
    "xz": lambda d: with_size(d, lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    "lzma": lambda d: with_size(d, lzma.compress(d, format=lzma.FORMAT_ALONE)),
    "bzip2": lambda d: with_size(d, bz2.compress(d)),
    "lz4": lz4_legacy,
    "zstd": lambda d: with_size(d, zstandard.ZstdCompressor().compress(d)),
}


def make_bzimage(payload: bytes = b"", *, version: int = 0x020F, xloadflags: int = bp.XLF_KERNEL_64,
                 loadflags: int = bp.LOADED_HIGH, boot_flag: int = bp.BOOT_FLAG, init_size: int = 0x800000,
                 cmdline_size: int = 2047, initrd_addr_max: int = 0x7FFFFFFF, magic: bytes = b"HdrS") -> bytes:
    setup_sects = 4
    setup = bytearray((setup_sects + 1) * 512)
    header = bp.setup_header(
        setup_sects=setup_sects, boot_flag=boot_flag, version=version, loadflags=loadflags, xloadflags=xloadflags,
        kernel_alignment=0x200000, relocatable_kernel=1, cmdline_size=cmdline_size, initrd_addr_max=initrd_addr_max,
        pref_address=0x1000000, init_size=init_size, kernel_version=0x400,
    )
    protected = b"\xfa\xf4" * 8  # the decompressor's code, as far as anyone here cares
    header.payload_offset = len(protected)
    header.payload_length = len(payload)
    header.syssize = (len(protected) + len(payload) + 4 + 15) // 16
    setup[0x1F1 : 0x1F1 + len(bytes(header))] = bytes(header)
    setup[0x200:0x202] = bytes([0xEB, 0x6A])  # jmp over the header, as header.S does
    setup[0x202:0x206] = magic
    setup[0x600:0x620] = b"6.1.0-test (worldswitch@tests)\0\0"
    return bytes(setup) + protected + payload + struct.pack("<I", len(VMLINUX))


@pytest.fixture
def machine_memory():
    memory_map = MemoryMap.for_memory(128 * MIB)
    memory = GuestMemory(memory_map.backed_ranges())
    yield memory, memory_map
    memory.close()


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_every_payload_format_decompresses_on_the_host(compression: str) -> None:
    kernel = parse_bzimage(make_bzimage(COMPRESSORS[compression](VMLINUX)))
    assert kernel.compression == compression
    assert extract_vmlinux(kernel) == VMLINUX


def test_lz4_legacy_frames_larger_than_one_block() -> None:
    big = make_elf([(0x1000000, bytes(range(256)) * 40000, 10 << 20)])  # 10 MiB: two 8 MiB blocks
    assert decompress(lz4_legacy(big), "lz4") == big


def _corrupt_lz4(kind: str) -> bytes:
    big = make_elf([(0x1000000, bytes(range(256)) * 40000, 10 << 20)])
    good = lz4_legacy(big)
    first_block = struct.unpack_from("<I", good, 4)[0]
    if kind == "truncated":
        return good[: len(good) - 100]  # the last block runs past what is left
    if kind == "wrong size":
        return good[:-4] + struct.pack("<I", len(big) + 1)
    if kind == "short block first":  # blocks swapped: the short one is no longer last
        second_at = 8 + first_block
        second = good[second_at : len(good) - 4]
        return good[:4] + second + good[4:second_at] + good[-4:]
    if kind == "garbage after":
        return good[:-4] + b"\x00\x00\x00\x00garbage" + good[-4:]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "runs past the end"),
    ("wrong size", "the kernel build recorded"),
    ("short block first", "follows one shorter than 8 MiB"),
    ("garbage after", "corrupt"),
])
def test_a_corrupt_lz4_payload_is_refused(kind: str, message: str) -> None:
    kernel = parse_bzimage(make_bzimage(_corrupt_lz4(kind), init_size=32 << 20))
    with pytest.raises(GuestImageError, match=message):
        extract_vmlinux(kernel)


def test_a_payload_larger_than_init_size_is_refused() -> None:
    kernel = parse_bzimage(make_bzimage(lz4_legacy(VMLINUX), init_size=64))
    with pytest.raises(GuestImageError, match="more than the 64 bytes its header says the kernel needs"):
        extract_vmlinux(kernel)


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_decompression_stops_past_its_limit(compression: str) -> None:
    """A payload that unpacks to far more than its header declares (a guest's boot loader hands one
    over under the monitor) costs the host no more than the limit: 64 MiB of zeros, cut at 1 MiB."""
    bomb = COMPRESSORS[compression](bytes(64 * MIB))
    out = decompress(bomb, compression, limit=MIB)
    assert MIB < len(out) <= MIB + (8 << 20)  # lz4 stops at its block's end; the others one byte past
    kernel = parse_bzimage(make_bzimage(bomb, init_size=MIB))
    with pytest.raises(GuestImageError, match="more than the 1048576 bytes"):
        extract_vmlinux(kernel)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"magic": b"XXXX"}, "not a Linux kernel"),
        ({"boot_flag": 0x1234}, "boot sector signature"),
        ({"version": 0x0206}, "boot protocol 2.06"),
        ({"xloadflags": 0}, "no 64-bit entry point"),
        ({"loadflags": 0}, "zImage"),
    ],
)
def test_setup_header_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(GuestImageError, match=message):
        parse_bzimage(make_bzimage(gzip.compress(VMLINUX), **kwargs))


def test_truncated_and_corrupt_kernels() -> None:
    image = make_bzimage(gzip.compress(VMLINUX))
    with pytest.raises(GuestImageError, match="truncated"):
        parse_bzimage(image[:2600])
    corrupt = make_bzimage(b"\x28\xb5\x2f\xfd" + b"garbage" * 50)
    with pytest.raises(GuestImageError, match="zstd payload is corrupt"):
        extract_vmlinux(parse_bzimage(corrupt))
    with pytest.raises(GuestImageError, match="cannot decompress a lzo payload"):
        extract_vmlinux(parse_bzimage(make_bzimage(b"\x89LZO\x00" + bytes(100))))


def test_vmlinux_fast_path_places_everything(machine_memory) -> None:
    memory, memory_map = machine_memory
    initrd = b"070701" + bytes(5000)
    boot = load_linux(memory, memory_map, make_bzimage(lz4_legacy(VMLINUX)), "vmlinuz", initrd, "initrd",
                      "console=ttyS0 quiet", "host", False, 0xE0000)
    assert boot.mode == "vmlinux" and boot.entry == 0x1000000 and boot.compression == "lz4"
    assert memory.read(0x1000000 + 64, 10) == b"startup_64"
    params = memory.read_obj(ZERO_PAGE, bp.boot_params)
    hdr = params.hdr
    assert hdr.header == bp.HDRS_MAGIC and hdr.version == 0x020F  # the kernel's own header, copied
    assert hdr.type_of_loader == 0xFF and hdr.loadflags & bp.CAN_USE_HEAP
    assert hdr.cmd_line_ptr == CMDLINE_ADDR and memory.read_cstring(CMDLINE_ADDR, 100) == b"console=ttyS0 quiet"
    assert params.acpi_rsdp_addr == 0xE0000
    start, end = boot.initrd
    assert (hdr.ramdisk_image, hdr.ramdisk_size) == (start, len(initrd))
    assert memory.read(start, len(initrd)) == initrd
    assert start % 4096 == 0 and end <= memory_map.top_of_low_ram and start >= boot.kernel[1]
    assert memory_map.top_of_low_ram - end < 4096  # as high as possible
    e820 = [(params.e820_table[i].addr, params.e820_table[i].size, params.e820_table[i].type)
            for i in range(params.e820_entries)]
    assert e820 == e820_map(memory_map)
    assert e820[0] == (0, 0xA0000, bp.E820_RAM) and e820[1] == (0xC0000, 0x40000, bp.E820_RESERVED)


def test_bzimage_guest_decompression_path(machine_memory) -> None:
    memory, memory_map = machine_memory
    image = make_bzimage(gzip.compress(VMLINUX))
    boot = load_linux(memory, memory_map, image, "vmlinuz", None, "", "console=ttyS0", "guest", True, 0xE0000)
    assert boot.mode == "bzimage" and boot.entry == 0x100000 + 0x200
    kernel = parse_bzimage(image)
    assert memory.read(0x100000, len(kernel.kernel)) == kernel.kernel
    assert boot.kernel == (0x100000, 0x1000000 + kernel.header.init_size)  # room to decompress to pref_address
    assert memory.read_obj(ZERO_PAGE, bp.boot_params).hdr.ramdisk_size == 0


def test_a_bare_vmlinux_gets_a_synthesised_header(machine_memory) -> None:
    memory, memory_map = machine_memory
    boot = load_linux(memory, memory_map, VMLINUX, "vmlinux", None, "", "x", "auto", True, 0xE0000)
    hdr = memory.read_obj(ZERO_PAGE, bp.boot_params).hdr
    assert boot.mode == "vmlinux"
    assert (hdr.boot_flag, hdr.header, hdr.type_of_loader) == (bp.BOOT_FLAG, bp.HDRS_MAGIC, 0xFF)


def test_decompression_defaults_follow_the_host() -> None:
    assert choose_decompression("auto", kernel_code_emulated=True) == "host"
    assert choose_decompression("auto", kernel_code_emulated=False) == "guest"
    assert choose_decompression("guest", kernel_code_emulated=True) == "guest"
    with pytest.raises(ConfigError):
        choose_decompression("sometimes", True)


def test_limits_are_clear_errors(machine_memory) -> None:
    memory, memory_map = machine_memory
    image = make_bzimage(gzip.compress(VMLINUX), cmdline_size=256)
    with pytest.raises(ConfigError, match="at most 255"):
        load_linux(memory, memory_map, image, "k", None, "", "x" * 256, "host", True, 0xE0000)
    load_linux(memory, memory_map, image, "k", None, "", "x" * 255, "host", True, 0xE0000)  # exactly fits
    with pytest.raises(GuestImageError, match="initrd big .* does not fit"):
        load_linux(memory, memory_map, image, "k", bytes(120 * MIB), "big", "", "host", True, 0xE0000)
    with pytest.raises(GuestImageError, match="not a Linux kernel"):
        load_linux(memory, memory_map, b"#!/bin/sh\n" * 100, "script", None, "", "", "host", True, 0xE0000)
    with pytest.raises(GuestImageError, match="needs .* MiB of RAM"):
        load_linux(memory, memory_map, make_bzimage(gzip.compress(VMLINUX), init_size=200 * MIB), "k", None, "", "",
                   "guest", False, 0xE0000)


def test_initrd_respects_initrd_addr_max(machine_memory) -> None:
    memory, memory_map = machine_memory
    image = make_bzimage(gzip.compress(VMLINUX), initrd_addr_max=0x3FFFFFF)  # 64 MiB
    boot = load_linux(memory, memory_map, image, "k", bytes(4096), "i", "", "host", True, 0xE0000)
    assert boot.initrd[1] <= 0x4000000


@pytest.mark.parametrize("memory", [3 * GIB - 0x60000, 3 * GIB - 0x60000 + 4096, 6 * GIB])
def test_e820_just_under_and_over_the_pci_hole(memory: int) -> None:
    entries = e820_map(MemoryMap.for_memory(memory))
    assert sum(size for _, size, kind in entries if kind == bp.E820_RAM) == memory
    assert all(not (0xC0000000 <= addr < 1 << 32) for addr, _, kind in entries if kind == bp.E820_RAM)  # no RAM in the hole
    assert (0xE0000000, 1 << 20, bp.E820_RESERVED) in entries  # the ECAM window MCFG names is reserved
    above = [e for e in entries if e[0] >= 1 << 32]
    assert bool(above) == (memory > 3 * GIB - 0x60000)


# --- a kernel a boot loader started (firmware under the monitor: boot/linux.py take_over_linux) -----

ENTRY = 0x100000


def test_the_entry_is_known_by_a_zero_page_that_names_it(machine_memory) -> None:
    memory, _ = machine_memory
    assert not enters_linux(memory, LOADER_ZERO_PAGE, ENTRY)  # nothing there yet: GRUB's own code at 1 MiB
    loaded_by_a_boot_loader(memory, make_bzimage(gzip.compress(VMLINUX)), ENTRY)
    assert enters_linux(memory, LOADER_ZERO_PAGE, ENTRY)
    assert not enters_linux(memory, LOADER_ZERO_PAGE, ENTRY + 0x1000)
    assert not enters_linux(memory, 0xFFFF_F000, ENTRY)  # ESI outside RAM


@pytest.mark.parametrize("fields, message", [
    ({"syssize": 0x0FFF_FFFF}, "do not fit in guest RAM"),
    ({"init_size": 0x7FFF_FFFF}, "do not fit in guest RAM"),
    ({"ramdisk_image": 0x7F00_0000, "ramdisk_size": 1 << 20}, "its initrd at 0x7f000000"),
    ({"cmd_line_ptr": 0x7F00_0000}, "its command line at 0x7f000000"),
    ({"version": 0x0200}, "boot protocol 2.00"),
    ({"payload_length": 0x0FFF_0000}, "is truncated"),
    ({"init_size": 64}, "more than the 64 bytes"),
])
def test_what_a_guests_boot_loader_hands_over_is_checked_before_anything_is_written(
        machine_memory, fields: dict[str, int], message: str) -> None:
    """Every length and address in the zero page is guest-written: each is bounded by RAM, and a bad
    one refuses the kernel before a byte of guest memory changes."""
    memory, memory_map = machine_memory
    loaded_by_a_boot_loader(memory, make_bzimage(gzip.compress(VMLINUX)), ENTRY, **fields)
    with pytest.raises(GuestImageError, match=message):
        take_over_linux(memory, memory_map, LOADER_ZERO_PAGE, ENTRY, {}, [])
    assert memory.read(ZERO_PAGE, 16) == bytes(16) and memory.read(0x1000000, 16) == bytes(16)


def test_a_zero_page_that_does_not_name_the_entry_is_refused(machine_memory) -> None:
    memory, memory_map = machine_memory
    loaded_by_a_boot_loader(memory, make_bzimage(gzip.compress(VMLINUX)), ENTRY, code32_start=0x200000)
    with pytest.raises(GuestImageError, match="code32_start 0x200000"):
        take_over_linux(memory, memory_map, LOADER_ZERO_PAGE, ENTRY, {}, [])
    with pytest.raises(GuestImageError, match="zero page at 0xfffff000 is not in guest RAM"):
        take_over_linux(memory, memory_map, 0xFFFF_F000, ENTRY, {}, [])
