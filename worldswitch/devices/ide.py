"""An IDE channel with an ATAPI CD-ROM drive, for `--cdrom FILE.iso`: the legacy controller that a
BIOS and an installer without virtio drivers both know (ATA/ATAPI-7 for the registers and the PACKET
protocol, MMC for the commands a CD drive answers, in PIO only).

The channel is the PIIX3's secondary one, in compatibility mode: command block at 0x170-0x177,
device control/alternate status at 0x376, ISA IRQ 15; the drive is its master. A PACKET command
takes 12 bytes of SCSI command through the data port, then moves data in pieces no bigger than the
byte count the host asked for, each announced by DRQ and an interrupt; a command the drive does not
know ends in CHECK CONDITION with ILLEGAL REQUEST sense. Reads are done a piece at a time, so a
guest asking for 65,535 sectors costs the VMX at most one piece (64 KiB) of memory. Every LBA and
length is checked against the medium.
"""

from __future__ import annotations

import struct
import threading

from ..record import record
from .base import InterruptLine
from .disk.image import DiskImage
from .pci import PciFunction

COMMAND_BASE, CONTROL_PORT, IRQ = 0x170, 0x376, 15
DATA, ERROR, NSECTOR, LBA_LOW, LBA_MID, LBA_HIGH, SELECT, STATUS = range(8)
FEATURES, COMMAND = ERROR, STATUS
BSY, DRDY, DSC, DRQ, ERR = 0x80, 0x40, 0x10, 0x08, 0x01
ABRT = 0x04
CONTROL_NIEN, CONTROL_SRST = 0x02, 0x04
SELECT_SLAVE = 0x10
REASON_COD, REASON_IO = 0x01, 0x02
CMD_DEVICE_RESET, CMD_PACKET, CMD_IDENTIFY_PACKET, CMD_IDENTIFY = 0x08, 0xA0, 0xA1, 0xEC
CMD_SET_FEATURES, CMD_CHECK_POWER, CMD_IDLE_IMMEDIATE = 0xEF, 0xE5, 0xE1
ATAPI_SIGNATURE = (0x14, 0xEB)
CD_SECTOR = 2048
PIECE_SECTORS = 32  # read from the image at most this much at a time (64 KiB)

# SCSI/MMC
TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, START_STOP, PREVENT_ALLOW = 0x00, 0x03, 0x12, 0x1B, 0x1E
READ_CAPACITY, READ_10, READ_TOC, GET_CONFIGURATION, GET_EVENT_STATUS = 0x25, 0x28, 0x43, 0x46, 0x4A
MODE_SENSE_10, READ_12, SET_CD_SPEED = 0x5A, 0xA8, 0xBB
NO_SENSE, NOT_READY, ILLEGAL_REQUEST = 0x0, 0x2, 0x5
INVALID_OPCODE, LBA_OUT_OF_RANGE, INVALID_FIELD, MEDIUM_NOT_PRESENT = 0x20, 0x21, 0x24, 0x3A


def _ata_string(text: str, length: int) -> bytes:
    """An IDENTIFY string: space padded, each pair of characters swapped (ATA strings are words)."""
    raw = text.encode().ljust(length)[:length]
    return b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, length, 2))


def identify_packet_device() -> bytes:
    words = [0] * 256
    words[0] = 0x85C0  # ATAPI, CD-ROM (type 5), removable, 12-byte packets, DRQ within 3 ms
    words[49] = 1 << 9  # LBA (no DMA: PIO only)
    words[53] = 0x0006  # words 64-70 and 88 are valid
    words[64] = 0x0003  # PIO modes 3 and 4
    words[80] = 0x007E  # ATA/ATAPI-1 to -6
    raw = bytearray(struct.pack("<256H", *words))
    raw[20:40] = _ata_string("WS-CD-0001", 20)
    raw[46:54] = _ata_string("1.0", 8)
    raw[54:94] = _ata_string("worldswitch ATAPI CD-ROM", 40)
    return bytes(raw)


class CheckCondition(Exception):
    def __init__(self, key: int, code: int) -> None:
        super().__init__(f"sense {key:#x}/{code:#x}")
        self.key, self.code = key, code


class AtapiCdrom:
    """The drive: a medium of 2048-byte sectors, and the SCSI commands it answers."""

    def __init__(self, image: DiskImage) -> None:
        self.image = image
        self.sectors = image.size // CD_SECTOR
        self.sense = (NO_SENSE, 0)
        self.reads = 0

    def execute(self, cdb: bytes) -> tuple[bytes, tuple[int, int] | None]:
        """(data the command returns at once, or (first LBA, sectors) to read piece by piece)."""
        opcode = cdb[0]
        if opcode == TEST_UNIT_READY or opcode in (START_STOP, PREVENT_ALLOW, SET_CD_SPEED):
            return b"", None
        if opcode == REQUEST_SENSE:
            key, code = self.sense
            self.sense = (NO_SENSE, 0)
            return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, code, 0, 0, 0, 0, 0])[: cdb[4]], None
        if opcode == INQUIRY:
            data = bytes([0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0]) + b"WSWTCH  " + b"ATAPI CD-ROM".ljust(16) + b"1.0 "
            return data[: struct.unpack_from(">H", cdb, 3)[0]], None
        if opcode == READ_CAPACITY:
            return struct.pack(">II", max(self.sectors - 1, 0), CD_SECTOR), None
        if opcode in (READ_10, READ_12):
            lba = struct.unpack_from(">I", cdb, 2)[0]
            count = struct.unpack_from(">H", cdb, 7)[0] if opcode == READ_10 else struct.unpack_from(">I", cdb, 6)[0]
            if lba > self.sectors or count > self.sectors - lba:
                raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
            return b"", (lba, count)
        if opcode == READ_TOC:
            return self._toc(msf=bool(cdb[1] & 0x02), format=cdb[2] & 0x0F)[: struct.unpack_from(">H", cdb, 7)[0]], None
        if opcode == GET_CONFIGURATION:
            data = struct.pack(">IHH", 4, 0, 0x0008)  # current profile: CD-ROM
            return data[: struct.unpack_from(">H", cdb, 7)[0]], None
        if opcode == GET_EVENT_STATUS:
            if not cdb[1] & 0x01:
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)  # only the polled form exists in ATAPI
            return bytes([0, 2, 0x80, 0x10])[: struct.unpack_from(">H", cdb, 7)[0]], None  # no event available
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_OPCODE)

    def _toc(self, msf: bool, format: int) -> bytes:
        if format != 0:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)

        def address(lba: int) -> bytes:
            if not msf:
                return struct.pack(">I", lba)
            frames = lba + 150
            return bytes([0, frames // (75 * 60), frames // 75 % 60, frames % 75])

        body = bytes([1, 1]) + bytes([0, 0x14, 1, 0]) + address(0) + bytes([0, 0x14, 0xAA, 0]) + address(self.sectors)
        return struct.pack(">H", len(body)) + body

    def read(self, lba: int, count: int) -> bytes:
        data = bytearray(count * CD_SECTOR)
        self.image.readv([memoryview(data)], lba * CD_SECTOR)
        self.reads += 1
        return bytes(data)


@record
class IdeState:
    """A channel mid-command, for snapshots: registers, the data phase, the drive's sense."""

    registers: list[int]  # features, error, nsector, lba_low, lba_mid, lba_high, select, status, control
    buffer: bytes
    position: int
    receiving_packet: bool
    remaining: list[int] | None  # [next LBA, sectors]
    pending: bytes
    byte_limit: int
    sense: list[int]


REGISTERS = ("features", "error", "nsector", "lba_low", "lba_mid", "lba_high", "select", "status", "control")


class IdeChannel:
    """One IDE channel's registers, with an optional master drive (there is never a slave)."""

    def __init__(self, irq: InterruptLine, master: AtapiCdrom | None) -> None:
        self.irq = irq
        self.master = master
        self.lock = threading.Lock()
        self.control = 0
        self.commands = 0
        self._reset()

    def _reset(self) -> None:
        self.features = self.error = 0
        self.nsector, self.lba_low, (self.lba_mid, self.lba_high) = 1, 1, ATAPI_SIGNATURE
        self.select = 0xA0
        self.status = 0  # ATAPI devices do not set DRDY after a reset
        self.error = 0x01  # diagnostics passed
        self.buffer = bytearray()  # what the host reads or writes through the data port now
        self.position = 0
        self.receiving_packet = False
        self.remaining: tuple[int, int] | None = None  # (next LBA, sectors) still to read
        self.pending = bytearray()  # read from the medium, not yet handed over
        self.byte_limit = 0
        self.irq.set_level(False)

    @property
    def drive(self) -> AtapiCdrom | None:
        return None if self.select & SELECT_SLAVE else self.master

    # --- ports ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset == DATA:
                return self._read_data(size)
            if size != 1:
                return (1 << (8 * size)) - 1
            if self.drive is None:
                return 0  # no drive answers: status 0 tells the host nothing is there
            if offset == STATUS:
                self.irq.set_level(False)  # reading the status acknowledges the interrupt
                return self.status
            return {ERROR: self.error, NSECTOR: self.nsector, LBA_LOW: self.lba_low, LBA_MID: self.lba_mid,
                    LBA_HIGH: self.lba_high, SELECT: self.select}[offset]

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset == DATA:
                self._write_data(size, value)
                return
            if size != 1:
                return
            value &= 0xFF
            if offset == COMMAND:
                if self.drive is not None:
                    self._command(value)
                return
            setattr(self, {FEATURES: "features", NSECTOR: "nsector", LBA_LOW: "lba_low", LBA_MID: "lba_mid",
                           LBA_HIGH: "lba_high", SELECT: "select"}[offset], value | (0xA0 if offset == SELECT else 0))

    def read_control(self, offset: int, size: int) -> int:
        with self.lock:
            return self.status if size == 1 and self.drive is not None else 0

    def write_control(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        with self.lock:
            if value & CONTROL_SRST and not self.control & CONTROL_SRST:
                self._reset()
            self.control = value
            if value & CONTROL_NIEN:
                self.irq.set_level(False)

    # --- commands ---------------------------------------------------------------------------

    def _interrupt(self) -> None:
        if not self.control & CONTROL_NIEN:
            self.irq.set_level(True)

    def _done(self, error: int = 0) -> None:
        self.status = DRDY | DSC | (ERR if error else 0)
        self.error = error
        self.buffer, self.position = bytearray(), 0
        self._interrupt()

    def _command(self, command: int) -> None:
        self.commands += 1
        if command == CMD_PACKET:
            self.receiving_packet = True
            self.buffer, self.position = bytearray(12), 0
            self.nsector = REASON_COD
            self.status = DRDY | DRQ
        elif command == CMD_IDENTIFY_PACKET:
            self.buffer, self.position = bytearray(identify_packet_device()), 0
            self.status = DRDY | DRQ
            self._interrupt()
        elif command == CMD_IDENTIFY:  # an ATAPI device refuses it, leaving its signature for the host
            self.nsector, self.lba_low, (self.lba_mid, self.lba_high) = 1, 1, ATAPI_SIGNATURE
            self._done(ABRT)
        elif command == CMD_DEVICE_RESET:
            self._reset()
        elif command in (CMD_SET_FEATURES, CMD_CHECK_POWER, CMD_IDLE_IMMEDIATE):
            if command == CMD_CHECK_POWER:
                self.nsector = 0xFF  # active
            self._done()
        else:
            self._done(ABRT)

    def _write_data(self, size: int, value: int) -> None:
        if not self.receiving_packet:
            return
        for index in range(size):
            if self.position < len(self.buffer):
                self.buffer[self.position] = (value >> (8 * index)) & 0xFF
                self.position += 1
        if self.position == len(self.buffer):
            self.receiving_packet = False
            self._packet(bytes(self.buffer))

    def _packet(self, cdb: bytes) -> None:
        drive = self.master
        assert drive is not None
        limit = self.lba_mid | self.lba_high << 8
        self.byte_limit = (limit or 0xFFFE) & ~1
        try:
            data, reads = drive.execute(cdb)
        except CheckCondition as condition:
            self._check_condition(condition.key, condition.code)
            return
        except OSError:
            self._check_condition(NOT_READY, MEDIUM_NOT_PRESENT)  # the medium failed, as a drive would say
            return
        self.pending, self.remaining = bytearray(data), reads
        self._next_piece()

    def _check_condition(self, key: int, code: int) -> None:
        """End the PACKET command with CHECK CONDITION: the sense kept for REQUEST SENSE, the key in
        the error register."""
        if self.master is not None:
            self.master.sense = (key, code)
        self.nsector = REASON_IO | REASON_COD
        self._done(key << 4 | ABRT)

    def _next_piece(self) -> None:
        """Hand over the next piece of the answer, or end the command."""
        left = len(self.pending) + (self.remaining[1] * CD_SECTOR if self.remaining else 0)
        if not left:
            self.nsector = REASON_IO | REASON_COD
            self._done()
            return
        piece = min(self.byte_limit, left)
        while len(self.pending) < piece and self.remaining is not None and self.remaining[1]:
            lba, count = self.remaining
            take = min(count, PIECE_SECTORS)
            try:
                self.pending += self.master.read(lba, take)  # type: ignore[union-attr]
            except OSError:
                self.pending, self.remaining = bytearray(), None
                self._check_condition(NOT_READY, MEDIUM_NOT_PRESENT)
                return
            self.remaining = (lba + take, count - take)
        self.buffer, self.position = self.pending[:piece], 0
        del self.pending[:piece]
        self.lba_mid, self.lba_high = piece & 0xFF, piece >> 8
        self.nsector = REASON_IO
        self.status = DRDY | DRQ
        self._interrupt()

    def _read_data(self, size: int) -> int:
        if not self.status & DRQ or self.receiving_packet:
            return 0
        chunk = self.buffer[self.position : self.position + size]
        self.position += len(chunk)
        value = int.from_bytes(bytes(chunk).ljust(size, b"\0"), "little")
        if self.position >= len(self.buffer):
            if self.remaining is not None or self.pending:
                self._next_piece()
            else:
                self.nsector = REASON_IO | REASON_COD
                self._done()
        return value

    def state(self) -> IdeState:
        with self.lock:
            sense = list(self.master.sense) if self.master is not None else [0, 0]
            return IdeState([getattr(self, name) for name in REGISTERS], bytes(self.buffer), self.position,
                            self.receiving_packet, list(self.remaining) if self.remaining else None, bytes(self.pending),
                            self.byte_limit, sense)

    def restore(self, state: IdeState) -> None:
        if len(state.registers) != len(REGISTERS) or len(state.sense) != 2:
            raise ValueError("the saved IDE channel does not match this one")
        with self.lock:
            for name, value in zip(REGISTERS, state.registers):
                setattr(self, name, value & 0xFF)
            self.buffer, self.position = bytearray(state.buffer), max(0, min(state.position, len(state.buffer)))
            self.receiving_packet, self.byte_limit = state.receiving_packet, state.byte_limit & 0xFFFE
            self.remaining = (state.remaining[0], state.remaining[1]) if state.remaining else None
            self.pending = bytearray(state.pending)
            if self.master is not None:
                self.master.sense = (state.sense[0], state.sense[1])

    def counters(self) -> dict[str, int]:
        return {"commands": self.commands, "reads": self.master.reads if self.master is not None else 0}


IDETIM_PRIMARY, IDETIM_SECONDARY, SIDETIM = 0x40, 0x42, 0x44
IDE_DECODE_ENABLE = 0x8000  # IDETIM bit 15: the channel's ports are decoded (Linux's ata_piix checks it)


class Piix3Ide(PciFunction):
    """Intel 82371SB (PIIX3) function 1: the IDE controller, both channels in compatibility mode at
    the legacy ports (class 01:01, programming interface 0x80: no native-mode switch; no bus master
    BAR: PIO only, which SeaBIOS and Linux's ata_piix both accept). Its timing registers (IDETIM,
    SIDETIM) keep what is written; both channels start decoded, as firmware leaves them."""

    def __init__(self) -> None:
        super().__init__(vendor=0x8086, device=0x7010, class_code=0x010180)
        for register in (IDETIM_PRIMARY, IDETIM_SECONDARY):
            struct.pack_into("<H", self.config, register, IDE_DECODE_ENABLE)
        self.writable[IDETIM_PRIMARY : SIDETIM + 1] = b"\xff" * (SIDETIM + 1 - IDETIM_PRIMARY)
