"""The IDE channel and its ATAPI CD-ROM (devices/ide.py), driven through its ports as SeaBIOS's and
Linux's drivers drive it: reset and signature, IDENTIFY PACKET DEVICE, PACKET commands with their
byte-count-limited data phases, sense data, and what a hostile driver asks for."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from worldswitch.devices import ide
from worldswitch.devices.disk.opener import open_disk

from .helpers import RecordingLine

SECTORS = 40


@pytest.fixture
def channel(tmp_path: Path) -> tuple[ide.IdeChannel, RecordingLine]:
    iso = tmp_path / "cd.iso"
    iso.write_bytes(b"".join(bytes([n]) * ide.CD_SECTOR for n in range(SECTORS)))
    line = RecordingLine()
    channel = ide.IdeChannel(line, ide.AtapiCdrom(open_disk(str(iso), read_only=True, format="raw")))
    yield channel, line
    channel.master.image.close()  # type: ignore[union-attr]


def packet(channel: ide.IdeChannel, cdb: bytes, limit: int = 0xFFFE) -> tuple[bytes, int]:
    """Send a PACKET command; (all data read, the final status)."""
    channel.write(ide.LBA_MID, 1, limit & 0xFF)
    channel.write(ide.LBA_HIGH, 1, limit >> 8)
    channel.write(ide.COMMAND, 1, ide.CMD_PACKET)
    assert channel.read(ide.STATUS, 1) & ide.DRQ and channel.read(ide.NSECTOR, 1) == ide.REASON_COD
    for at in range(0, 12, 2):
        channel.write(ide.DATA, 2, struct.unpack_from("<H", cdb.ljust(12, b"\0"), at)[0])
    data = bytearray()
    while (status := channel.read(ide.STATUS, 1)) & ide.DRQ:
        count = channel.read(ide.LBA_MID, 1) | channel.read(ide.LBA_HIGH, 1) << 8
        assert 0 < count <= limit and channel.read(ide.NSECTOR, 1) == ide.REASON_IO
        for _ in range(count // 2):
            data += struct.pack("<H", channel.read(ide.DATA, 2))
    assert channel.read(ide.NSECTOR, 1) == ide.REASON_IO | ide.REASON_COD
    return bytes(data), status


def read10(lba: int, count: int) -> bytes:
    return struct.pack(">BBIBHB", ide.READ_10, 0, lba, 0, count, 0)


def test_after_a_reset_the_drive_shows_the_atapi_signature(channel) -> None:  # type: ignore[no-untyped-def]
    bus, _ = channel
    bus.write_control(0, 1, ide.CONTROL_SRST)
    bus.write_control(0, 1, 0)
    assert [bus.read(r, 1) for r in (ide.NSECTOR, ide.LBA_LOW, ide.LBA_MID, ide.LBA_HIGH)] == [1, 1, 0x14, 0xEB]
    bus.write(ide.COMMAND, 1, ide.CMD_IDENTIFY)  # refused by an ATAPI drive, which keeps its signature
    assert bus.read(ide.STATUS, 1) & ide.ERR and bus.read(ide.ERROR, 1) == ide.ABRT
    bus.write(ide.SELECT, 1, ide.SELECT_SLAVE)
    assert bus.read(ide.STATUS, 1) == 0  # no slave: nothing answers


def test_identify_packet_device(channel) -> None:  # type: ignore[no-untyped-def]
    bus, line = channel
    bus.write(ide.COMMAND, 1, ide.CMD_IDENTIFY_PACKET)
    assert line.level
    words = [bus.read(ide.DATA, 2) for _ in range(256)]
    assert words[0] == 0x85C0 and words[49] & (1 << 9)
    model = b"".join(struct.pack(">H", w) for w in words[27:47])
    assert model.startswith(b"worldswitch ATAPI CD-ROM")
    assert not bus.read(ide.STATUS, 1) & ide.DRQ


def test_reads_come_in_pieces_no_bigger_than_the_host_asked(channel) -> None:  # type: ignore[no-untyped-def]
    bus, line = channel
    data, status = packet(bus, read10(3, 5), limit=3000)  # not a multiple of a sector, or even of 2048
    assert status & ide.DRDY and not status & ide.ERR
    assert data == b"".join(bytes([n]) * ide.CD_SECTOR for n in range(3, 8))
    assert len(line.changes) >= 2 * 4  # an interrupt per piece and one at the end
    capacity, _ = packet(bus, bytes([ide.READ_CAPACITY]))
    assert struct.unpack(">II", capacity) == (SECTORS - 1, ide.CD_SECTOR)
    inquiry, _ = packet(bus, struct.pack(">BBBHB", ide.INQUIRY, 0, 0, 36, 0))
    assert inquiry[0] == 0x05 and inquiry[8:16] == b"WSWTCH  "
    toc, _ = packet(bus, struct.pack(">BBBBBBHB", ide.READ_TOC, 0, 0, 0, 0, 0, 100, 0))
    assert struct.unpack_from(">H", toc)[0] == len(toc) - 2 and struct.unpack_from(">I", toc, 16)[0] == SECTORS


@pytest.mark.parametrize("cdb, key, code", [
    (read10(SECTORS, 1), ide.ILLEGAL_REQUEST, ide.LBA_OUT_OF_RANGE),  # just past the end
    (read10(SECTORS - 1, 2), ide.ILLEGAL_REQUEST, ide.LBA_OUT_OF_RANGE),  # across it
    (read10(0xFFFFFFFF, 0xFFFF), ide.ILLEGAL_REQUEST, ide.LBA_OUT_OF_RANGE),
    (bytes([0xFF]), ide.ILLEGAL_REQUEST, ide.INVALID_OPCODE),
])
def test_what_the_drive_cannot_do_ends_in_check_condition_with_sense(channel, cdb: bytes, key: int, code: int) -> None:  # type: ignore[no-untyped-def]
    bus, _ = channel
    data, status = packet(bus, cdb)
    assert data == b"" and status & ide.ERR and bus.read(ide.ERROR, 1) >> 4 == key
    sense, status = packet(bus, struct.pack(">BBBBBB", ide.REQUEST_SENSE, 0, 0, 0, 18, 0))
    assert not status & ide.ERR and sense[2] == key and sense[12] == code
    sense, _ = packet(bus, struct.pack(">BBBBBB", ide.REQUEST_SENSE, 0, 0, 0, 18, 0))
    assert sense[2] == 0  # reported once


def test_a_huge_read_is_served_a_piece_at_a_time(tmp_path: Path) -> None:
    big = tmp_path / "big.iso"
    with open(big, "wb") as file:
        file.truncate(0x10000 * ide.CD_SECTOR)  # 128 MiB, sparse
    bus = ide.IdeChannel(RecordingLine(), ide.AtapiCdrom(open_disk(str(big), read_only=True, format="raw")))
    bus.write(ide.LBA_MID, 1, 0xFE)
    bus.write(ide.LBA_HIGH, 1, 0xFF)
    bus.write(ide.COMMAND, 1, ide.CMD_PACKET)
    for at in range(0, 12, 2):
        bus.write(ide.DATA, 2, struct.unpack_from("<H", read10(0, 0xFFFF).ljust(12, b"\0"), at)[0])
    assert bus.read(ide.STATUS, 1) & ide.DRQ
    assert len(bus.pending) + len(bus.buffer) <= ide.PIECE_SECTORS * ide.CD_SECTOR + 0xFFFE  # not 128 MiB
    bus.write_control(0, 1, ide.CONTROL_SRST)  # the host gives up: a reset drops the rest
    assert bus.remaining is None and not bus.pending
    bus.master.image.close()  # type: ignore[union-attr]


def test_nien_keeps_the_interrupt_line_down(channel) -> None:  # type: ignore[no-untyped-def]
    bus, line = channel
    bus.write_control(0, 1, ide.CONTROL_NIEN)
    packet(bus, bytes([ide.TEST_UNIT_READY]))
    assert line.changes == []


def test_a_channel_mid_read_is_saved_and_restored(channel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bus, _ = channel
    bus.write(ide.LBA_MID, 1, 0x00)
    bus.write(ide.LBA_HIGH, 1, 0x08)  # 2 KiB pieces
    bus.write(ide.COMMAND, 1, ide.CMD_PACKET)
    for at in range(0, 12, 2):
        bus.write(ide.DATA, 2, struct.unpack_from("<H", read10(5, 3).ljust(12, b"\0"), at)[0])
    first = [struct.pack("<H", bus.read(ide.DATA, 2)) for _ in range(10)]
    saved = bus.state()
    again = ide.IdeChannel(RecordingLine(), ide.AtapiCdrom(bus.master.image))
    again.restore(saved)
    rest = b""
    while again.read(ide.STATUS, 1) & ide.DRQ:
        rest += struct.pack("<H", again.read(ide.DATA, 2))
    assert b"".join(first) + rest == bytes([5]) * 2048 + bytes([6]) * 2048 + bytes([7]) * 2048
    with pytest.raises(ValueError):
        again.restore(ide.IdeState([0], b"", 0, False, None, b"", 0, [0, 0]))


def test_the_pci_function_leaves_both_channels_decoded() -> None:
    function = ide.Piix3Ide()
    assert function.config_read(0, 4) == 0x70108086 and function.config_read(0x08, 4) >> 8 == 0x010180
    assert function.config_read(ide.IDETIM_PRIMARY, 2) & ide.IDE_DECODE_ENABLE
    assert function.config_read(ide.IDETIM_SECONDARY, 2) & ide.IDE_DECODE_ENABLE
    function.config_write(ide.IDETIM_SECONDARY, 2, 0xA307)  # firmware's timing: kept, read back
    assert function.config_read(ide.IDETIM_SECONDARY, 2) == 0xA307
