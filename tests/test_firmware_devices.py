"""What a BIOS talks to, without KVM: fw_cfg (QEMU's docs/specs/fw_cfg.rst: selectors, the file
directory, DMA with hostile addresses and lengths), the ACPI table loader (executed here the way
SeaBIOS's romfile_loader.c executes it), the CMOS layout and clock, and the chipset registers."""

from __future__ import annotations

import struct
import time

import pytest

from worldswitch.boot import acpi
from worldswitch.boot.firmware import LOADER_ENTRY, acpi_files, e820_file, low_copy, read_rom
from worldswitch.devices import cmos as rtc
from worldswitch.devices import fw_cfg as fc
from worldswitch.devices.chipset import I440FX_PAM0, I440fxHostBridge, Piix3IsaBridge, PostCodes, SystemControlPort
from worldswitch.errors import ConfigError, GuestImageError
from worldswitch.memory.guest import GuestMemory
from worldswitch.memory.layout import MemoryMap

from .helpers import RecordingLine

MIB = 1 << 20


def device(files: list[fc.FwCfgFile] | None = None) -> tuple[fc.FwCfg, GuestMemory]:
    memory = GuestMemory([(0, 2 * MIB)])
    return fc.FwCfg(memory, {fc.NB_CPUS: struct.pack("<H", 3)}, files or []), memory


def select(cfg: fc.FwCfg, key: int) -> None:
    cfg.write(0, 2, key)


def read_item(cfg: fc.FwCfg, key: int, length: int) -> bytes:
    select(cfg, key)
    return bytes(cfg.read(1, 1) for _ in range(length))


def dma(cfg: fc.FwCfg, memory: GuestMemory, at: int, control: int, length: int, address: int) -> int:
    """Issue a request as a guest does: the structure in memory, its address big-endian in two dwords."""
    memory.write(at, fc.DMA_ACCESS.pack(control, length, address))
    swap = lambda value: int.from_bytes(value.to_bytes(4, "big"), "little")  # noqa: E731
    cfg.write(4, 4, swap(at >> 32))
    cfg.write(8, 4, swap(at & 0xFFFFFFFF))
    return int(struct.unpack(">I", memory.read(at, 4))[0])


def test_signature_id_and_numbered_items() -> None:
    cfg, _ = device()
    assert read_item(cfg, fc.SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(cfg, fc.ID, 4))[0] == fc.ID_TRADITIONAL | fc.ID_DMA
    assert read_item(cfg, fc.NB_CPUS, 2) == struct.pack("<H", 3)
    assert read_item(cfg, 0x1234, 4) == bytes(4)  # an item nobody has reads as zeros
    select(cfg, fc.SIGNATURE)
    assert [cfg.read(1, 1) for _ in range(6)] == [ord("Q"), ord("E"), ord("M"), ord("U"), 0, 0]  # past the end: 0
    assert cfg.read(1, 2) == 0xFFFF and cfg.read(0, 1) == 0xFF  # only byte reads of the data port


def test_the_file_directory_lists_every_file_with_its_selector() -> None:
    cfg, _ = device([fc.FwCfgFile("etc/one", b"1"), fc.FwCfgFile("etc/two", b"22")])
    count = struct.unpack(">I", read_item(cfg, fc.FILE_DIR, 4))[0]
    raw = read_item(cfg, fc.FILE_DIR, 4 + count * fc.FILE_ENTRY.size)[4:]
    entries = [fc.FILE_ENTRY.unpack_from(raw, i * fc.FILE_ENTRY.size) for i in range(count)]
    assert [(size, key, name.rstrip(b"\0")) for size, key, _, name in entries] == [(1, 0x20, b"etc/one"), (2, 0x21, b"etc/two")]
    assert read_item(cfg, 0x21, 2) == b"22"
    with pytest.raises(ValueError):
        fc.FwCfg(GuestMemory([(0, MIB)]), {}, [fc.FwCfgFile("a", b""), fc.FwCfgFile("a", b"")])


def test_dma_select_read_skip_and_zeros_past_the_end() -> None:
    cfg, memory = device([fc.FwCfgFile("etc/data", bytes(range(10)))])
    assert dma(cfg, memory, 0x1000, (0x20 << 16) | fc.DMA_SELECT | fc.DMA_READ, 4, 0x2000) == 0
    assert memory.read(0x2000, 4) == bytes(range(4))
    assert dma(cfg, memory, 0x1000, fc.DMA_SKIP, 2, 0) == 0
    memory.write(0x3000, b"\xff" * 16)
    assert dma(cfg, memory, 0x1000, fc.DMA_READ, 16, 0x3000) == 0
    assert memory.read(0x3000, 16) == bytes([6, 7, 8, 9]) + bytes(12)  # the rest of the buffer zeroed
    assert dma(cfg, memory, 0x1000, fc.DMA_WRITE, 4, 0x2000) == fc.DMA_ERROR  # nothing is writable
    assert cfg.counters() == {"dma_transfers": 4, "dma_errors": 1}


@pytest.mark.parametrize("request_at, length, target", [
    (0x1000, 0xFFFFFFFF, 0x2000),  # 4 GiB into 2 MiB of RAM
    (0x1000, 16, 2 * MIB - 8),  # across the end of RAM
    (0x1000, 16, 1 << 63),  # far outside
])
def test_hostile_dma_is_answered_with_the_error_bit(request_at: int, length: int, target: int) -> None:
    cfg, memory = device([fc.FwCfgFile("etc/data", b"x" * 64)])
    started = time.monotonic()
    assert dma(cfg, memory, request_at, (0x20 << 16) | fc.DMA_SELECT | fc.DMA_READ, length, target) == fc.DMA_ERROR
    assert time.monotonic() - started < 5


def test_a_request_outside_ram_is_dropped() -> None:
    cfg, memory = device()
    cfg.write(4, 4, 0)
    cfg.write(8, 4, int.from_bytes((3 * MIB).to_bytes(4, "big"), "little"))  # no RAM there to read or answer
    assert cfg.counters()["dma_errors"] == 1


def run_loader(files: dict[str, bytes], high: int, fseg: int) -> dict[str, bytearray]:
    """SeaBIOS's romfile_loader_execute, for the commands acpi_files emits."""
    script, placed, bases = files["etc/table-loader"], {}, {}
    for at in range(0, len(script), LOADER_ENTRY):
        command = struct.unpack_from("<I", script, at)[0]
        name = lambda offset: script[at + offset : at + offset + 56].rstrip(b"\0").decode()  # noqa: E731
        if command == 1:
            file, zone = name(4), script[at + 64]
            placed[file], bases[file] = bytearray(files[file]), high if zone == 1 else fseg
        elif command == 2:
            dest, src = name(4), name(60)
            offset, size = struct.unpack_from("<IB", script, at + 116)
            value = int.from_bytes(placed[dest][offset : offset + size], "little") + bases[src]
            placed[dest][offset : offset + size] = value.to_bytes(size, "little")
        elif command == 3:
            file = name(4)
            offset, start, length = struct.unpack_from("<III", script, at + 60)
            placed[file][offset] = (placed[file][offset] - sum(placed[file][start : start + length])) & 0xFF
    return placed


def test_the_table_loader_gives_the_firmware_the_tables_a_direct_boot_gets() -> None:
    built = acpi.build(0, 2, pci=acpi.PciHost(0xE0000000, 0xC0000000, 0xE0000000), cmos_rtc=True)
    files = acpi_files(built)
    placed = run_loader(files, high=0x7FF0000, fseg=0xF5000)
    # every table where the firmware put it, exactly as if laid out there in the first place
    direct = acpi.build(0x7FF0000, 2, pci=acpi.PciHost(0xE0000000, 0xC0000000, 0xE0000000), cmos_rtc=True)
    assert bytes(placed["etc/acpi/tables"][acpi.RSDP.size :]) == direct.blob[acpi.RSDP.size :]
    assert bytes(placed["etc/acpi/rsdp"]) == direct.blob[: acpi.RSDP.size]
    rsdp = placed["etc/acpi/rsdp"]
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    with pytest.raises(ValueError):
        acpi_files(acpi.build(0xE0000, 1))


def test_cmos_memory_bytes_as_qemu_sets_them() -> None:
    values = rtc.memory_bytes(below_4g=3 << 30, above_4g=1 << 30, cpus=4)
    assert values[0x15] | values[0x16] << 8 == 640
    assert values[0x17] | values[0x18] << 8 == 0xFFFF  # capped: more than 64 MiB
    assert values[0x34] | values[0x35] << 8 == ((3 << 30) - 16 * MIB) // (64 << 10)
    assert values[0x5B] | values[0x5C] << 8 | values[0x5D] << 16 == (1 << 30) // (64 << 10)
    assert values[0x5F] == 3
    small = rtc.memory_bytes(below_4g=8 * MIB, above_4g=0, cpus=1)
    assert small[0x17] | small[0x18] << 8 == 7 * 1024 and small[0x34] == small[0x35] == 0


def cmos_read(cmos: rtc.Cmos, index: int) -> int:
    cmos.write(0, 1, index)
    return cmos.read(1, 1)


def test_the_clock_reads_the_host_time_in_bcd_and_binary_and_keeps_a_guest_setting() -> None:
    cmos = rtc.Cmos(RecordingLine(), {})
    now = time.gmtime()
    year = cmos_read(cmos, rtc.YEAR)
    assert (year >> 4) * 10 + (year & 15) == now.tm_year % 100
    assert cmos_read(cmos, rtc.CENTURY) == 0x20
    assert cmos_read(cmos, rtc.REG_D) == rtc.D_VRT and not cmos_read(cmos, rtc.REG_A) & 0x80
    cmos.write(0, 1, rtc.REG_B)
    cmos.write(1, 1, rtc.B_24H | rtc.B_BINARY)
    assert cmos_read(cmos, rtc.MONTH) == time.gmtime().tm_mon
    cmos.write(0, 1, rtc.YEAR)
    cmos.write(1, 1, 99)  # the guest sets 2099
    assert cmos_read(cmos, rtc.YEAR) == 99 and cmos.clock_offset > 60 * 365 * 86400
    cmos.write(0, 1, rtc.REG_D)
    cmos.write(1, 1, 0)
    assert cmos_read(cmos, rtc.REG_D) == rtc.D_VRT  # read-only


def test_the_periodic_interrupt_fires_at_its_rate_until_turned_off() -> None:
    line = RecordingLine()
    cmos = rtc.Cmos(line, {})
    cmos.start()
    try:
        cmos.write(0, 1, rtc.REG_A)
        cmos.write(1, 1, 0x2F)  # rate 15: 2 Hz
        cmos.write(0, 1, rtc.REG_B)
        cmos.write(1, 1, rtc.B_24H | rtc.B_PIE)
        assert cmos.period() == 0.5
        deadline = time.monotonic() + 5
        while not line.level and time.monotonic() < deadline:
            time.sleep(0.01)
        assert line.level and cmos_read(cmos, rtc.REG_C) == rtc.C_IRQF | rtc.C_PF
        assert not line.level and cmos_read(cmos, rtc.REG_C) == 0  # reading C acknowledged it
        cmos.write(0, 1, rtc.REG_B)
        cmos.write(1, 1, rtc.B_24H)
        assert cmos.period() is None
    finally:
        cmos.close()


def test_chipset_registers_keep_what_firmware_writes() -> None:
    bridge = I440fxHostBridge()
    assert bridge.config_read(0, 4) == 0x12378086
    bridge.config_write(I440FX_PAM0, 1, 0x30)
    bridge.config_write(I440FX_PAM0 + 1, 2, 0x3333)
    assert bridge.config_read(I440FX_PAM0, 4) == 0x00333330
    bridge.config_write(I440FX_PAM0, 1, 0xFF)
    assert bridge.config_read(I440FX_PAM0, 1) == 0x33  # reserved bits stay 0
    isa = Piix3IsaBridge()
    assert isa.pirq_routes() == [None] * 4
    isa.config_write(0x60, 4, 0x0B0B0A0A)
    assert isa.pirq_routes() == [10, 10, 11, 11]
    resets: list[bool] = []
    port = SystemControlPort(lambda: resets.append(True))
    port.write(0, 1, 0x00)
    assert port.read(0, 1) == 0x02 and not resets  # A20 stays on
    port.write(0, 1, 0x01)
    assert resets == [True]
    post = PostCodes()
    post.write(0, 1, 0x55)
    assert post.counters() == {"post_codes": 1, "last_post_code": 0x55}


def test_firmware_images_and_the_e820_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="does not exist"):
        read_rom(str(tmp_path / "none.bin"))
    (tmp_path / "odd.bin").write_bytes(b"x" * 1000)
    with pytest.raises(GuestImageError, match="multiple of 64 KiB"):
        read_rom(str(tmp_path / "odd.bin"))
    rom = bytes(range(256)) * 1024  # 256 KiB
    address, low = low_copy(rom)
    assert address == 0xE0000 and low == rom[-(128 << 10) :]
    entries = e820_file(MemoryMap.for_memory(256 * MIB))
    assert len(entries) % 20 == 0 and struct.unpack_from("<QQI", entries) == (0, 0xA0000, 1)


def test_the_boot_sector_guest_powers_off_where_the_acpi_tables_say() -> None:
    from worldswitch.devices.acpi_pm import S5_SLEEP_TYPE
    from worldswitch.guests import bootsector

    assert bootsector.PM1_CNT == acpi.PM1_CNT_BLK and bootsector.S5_SLEEP_TYPE == S5_SLEEP_TYPE
    sector = bootsector.boot_sector(b"hello")
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa") and b"hello\r\n" in sector


def test_every_selector_read_past_its_end_by_port_and_by_dma_leaves_the_device_standing() -> None:
    """A guest that selects every selector value, reads past each item's end through the data port,
    and asks DMA for each at an MMIO address (the LAPIC's), outside RAM and across its top: each answer
    is zeros or the error bit, as QEMU gives them, and nothing raises."""
    cfg, memory = device([fc.FwCfgFile(f"etc/file{n}", bytes([n]) * n) for n in range(1, 5)])
    for key in range(0x10000):
        select(cfg, key)
        entry = cfg.entries.get(key, b"")
        got = bytes(cfg.read(1, 1) for _ in range(min(len(entry), 64) + 2))
        assert got[len(got) - 2 :] == bytes(2) or len(entry) > 64  # zeros past the end
    for target in (0xFEE00000, 3 * MIB, 2 * MIB - 4):
        for key in (fc.SIGNATURE, fc.FILE_DIR, fc.FILE_FIRST, 0xFFFF):
            assert dma(cfg, memory, 0x1000, (key << 16) | fc.DMA_SELECT | fc.DMA_READ, 64, target) == fc.DMA_ERROR
    assert dma(cfg, memory, 0x1000, (fc.SIGNATURE << 16) | fc.DMA_SELECT | fc.DMA_READ, 4, 0x2000) == 0  # still serves
    assert memory.read(0x2000, 4) == b"QEMU"
